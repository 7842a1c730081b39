"""Executors side by side: start-up, per-client cost, and a CPU-bound experiment on one thread vs two workers.

    python benchmarks/bench_executors.py [--executors thread,process] [--repeats 3]

Three measurements, each a whole experiment run in this process through ``build_experiment``, interleaved
(thread, process, thread, process, …) so that a noisy neighbour hits every executor alike; medians:

* **start-up**: from ``run`` to the first TrainStarted, the demo config (process workers start here);
* **per client**: the demo with tiny clients (16 samples, one epoch): seconds per work item (trainings
  plus validations) after the first training started — the executor's own cost per job;
* **CPU-bound**: 20 clients × 8,192 samples of 1×16×16 inputs, MLP 256-384-10, 3 local epochs, batch 32,
  SGD lr 0.05, 10 clients per round, 3 rounds; one thread (``parallel 1``) against each executor with two
  workers (``parallel 2``). Every run of it must give the same global record, or the benchmark stops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.cli import build_experiment  # noqa: E402
from fedevents.engine import TrainStarted  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY = {"exp_opts.comm_rounds": 6, "exp_opts.val_interval": 3, "exp_opts.online_clients": 10,
        "task_opts.synthetic.samples_per_client": 16, "task_opts.synthetic.test_size": 16}
CPU_BOUND = {"exp_opts.comm_rounds": 3, "exp_opts.val_interval": 3, "exp_opts.online_clients": 10,
             "exp_opts.val_clients": "online", "task_opts.train_epochs": 3, "task_opts.batch_size": 32,
             "task_opts.synthetic.samples_per_client": 8192, "task_opts.synthetic.test_size": 256,
             "task_opts.synthetic.input_shape": "[1, 16, 16]", "model_opts.name": "mlp",
             "model_opts.hidden": "[256, 384]", "optimizer_opts.name": "sgd", "optimizer_opts.lr": 0.05,
             "clients": "{count: 20, tasks: [synth]}"}


def run(sets: dict, workdir: Path) -> dict:
    """One whole experiment; its wall time, time to the first training, work items and record data."""
    overrides = {**sets, "logs_dir": str(workdir / "logs"), "checkpoints_dir": str(workdir / "ckpts")}
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=[f"{k}={v}" for k, v in overrides.items()],
                           console=None)
    first: list[float] = []
    items = [0]
    exp.bus.subscribe(TrainStarted, lambda ev: first or first.append(time.perf_counter()))
    exp.bus.subscribe(TrainStarted, lambda ev: items.__setitem__(0, items[0] + 1))
    began = time.perf_counter()
    anyio.run(exp.run_async)
    ended = time.perf_counter()
    record = json.loads(exp.paths.record.read_text())
    validations = sum(1 for c in record["data"].values() for r in c.values() for m in r.values() if "val_acc" in m)
    return {"wall": ended - began, "startup": first[0] - began, "after_first": ended - first[0],
            "items": items[0] + validations, "data": record["data"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executors", default="thread,process")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    executors = args.executors.split(",")
    print(f"machine: {describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        tiny = {e: [] for e in executors}
        cpu = {e: [] for e in ["thread/1", *(f"{e}/2" for e in executors)]}
        reference = None
        for rep in range(args.repeats):
            for e in executors:
                tiny[e].append(run({**TINY, "executor": e, "parallel": 1}, tmp_path / f"tiny-{e}-{rep}"))
            for label in cpu:
                e, parallel = label.split("/")
                out = run({**CPU_BOUND, "executor": e, "parallel": int(parallel)}, tmp_path / f"cpu-{e}{parallel}-{rep}")
                if reference is None:
                    reference = out["data"]
                elif out["data"] != reference:
                    sys.exit(f"{label}: the record differs from the first run's; the comparison is void")
                cpu[label].append(out)
    med = lambda runs, key: statistics.median(r[key] for r in runs)
    print("\nstart-up and per-client cost (demo, tiny clients, parallel 1)")
    print(f"{'executor':<10} {'start-up s':>11} {'per item ms':>12} {'items':>6}")
    for e, runs in tiny.items():
        per_item = statistics.median(r["after_first"] / r["items"] for r in runs) * 1e3
        print(f"{e:<10} {med(runs, 'startup'):>11.3f} {per_item:>12.2f} {runs[0]['items']:>6}")
    base = med(cpu["thread/1"], "wall")
    print("\nCPU-bound experiment (20 clients x 8,192 samples, MLP 256-384-10, 3 epochs, 3 rounds)")
    print(f"{'executor/slots':<15} {'wall s':>8} {'/ thread,1':>10}")
    for label, runs in cpu.items():
        print(f"{label:<15} {med(runs, 'wall'):>8.2f} {med(runs, 'wall') / base:>10.2f}")


if __name__ == "__main__":
    main()
