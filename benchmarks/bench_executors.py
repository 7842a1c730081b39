"""Executors side by side: start-up, per-client overhead on the demo, and a CPU-bound experiment.

    python benchmarks/bench_executors.py [--executors thread,process,ray] [--repeats 3]

Each executor has one function here; ``main`` runs the ones asked for. A comparison runs its two sides
interleaved (A, B, A, B, …) in one process, so a change in the machine's load touches both, and every pair
must write the same record (``data`` and ``comm``) or the benchmark stops: the ratios compare equal work.

- start-up: building the experiment (for ``ray``: starting a private Ray and its actors; ``process`` workers
  start with the first job, so their start-up shows in the run time) and closing it.
- per client: the demo (12 rounds, 5 of 10 clients, validation every 2 rounds) at ``parallel: 1``, so jobs
  run one at a time; the difference in run time divided by the number of jobs (trainings and validations).
- CPU-bound: 20 clients x 8,192 samples of synthetic 1x16x16 input, MLP 256-384-10, 3 local epochs, batch
  32, SGD lr 0.05 (the demo's momentum 0.9), 10 online per round, 3 rounds; two workers of the executor
  (``--parallel 2``) against one thread (``--parallel 1``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import structlog

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.cli import build_experiment  # noqa: E402
from fedevents.engine.events import TrainDone, ValStarted  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/demo.yaml"
CPU_BOUND = ["clients.count=20", "task_opts.synthetic.samples_per_client=8192",
             "task_opts.synthetic.input_shape=[1,16,16]", "model_opts.hidden=[256,384]",
             "task_opts.train_epochs=3", "task_opts.batch_size=32", "optimizer_opts.lr=0.05",
             "exp_opts.online_clients=10", "exp_opts.comm_rounds=3"]


class Run:
    """One experiment run: seconds to build, to run, to close; its jobs and its record."""

    def __init__(self, executor: str, parallel: int, extra: list[str], logs: Path) -> None:
        overrides = [f"executor={executor}", f"parallel={parallel}", f"logs_dir={logs}",
                     f"checkpoints_dir={logs / 'ckpts'}", *extra]
        began = time.perf_counter()
        exp = build_experiment(DEMO, overrides=overrides, console=None)
        self.build_s = time.perf_counter() - began
        jobs = [0]
        exp.bus.subscribe((TrainDone, ValStarted), lambda ev: jobs.__setitem__(0, jobs[0] + 1))
        began = time.perf_counter()
        exp.run(handle_signals=False)  # closes the executor (a private Ray shuts down) after the last round
        self.run_s = time.perf_counter() - began
        self.jobs = jobs[0]
        record = json.loads(exp.paths.record.read_text())
        self.result = {"data": record["data"], "comm": record["comm"]}


def interleaved(sides: dict[str, Callable[[Path], Run]], repeats: int) -> dict[str, list[Run]]:
    """Run each side ``repeats`` times, alternating, and check that all of them wrote the same record."""
    runs: dict[str, list[Run]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for name, side in sides.items():
                runs[name].append(side(Path(tmp) / f"{name}-{i}"))
    first = next(iter(runs.values()))[0].result
    if any(r.result != first for rs in runs.values() for r in rs):
        raise SystemExit("the executors wrote different records: the comparison would not be of equal work")
    return runs


def med(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def against_thread(executor: str, repeats: int) -> None:
    """``executor`` against the thread executor: start-up, per-client cost, CPU-bound speed-up."""
    demo = interleaved({"thread": lambda logs: Run("thread", 1, [], logs),
                        executor: lambda logs: Run(executor, 1, [], logs)}, repeats)
    thread, other = demo["thread"], demo[executor]
    jobs = thread[0].jobs
    print(f"\n## {executor} vs thread, demo at parallel 1 ({jobs} jobs per run), median of {repeats}")
    print("| executor | build (s) | run (s) | run per job (ms) |")
    print("|---|---:|---:|---:|")
    for name, runs in demo.items():
        print(f"| {name} | {med(runs, 'build_s'):.2f} | {med(runs, 'run_s'):.2f} | "
              f"{1000 * med(runs, 'run_s') / jobs:.1f} |")
    print(f"build time over thread's: {med(other, 'build_s') - med(thread, 'build_s'):.2f} s; run time over "
          f"thread's per job (worker start-up included): "
          f"{1000 * (med(other, 'run_s') - med(thread, 'run_s')) / jobs:.1f} ms")

    heavy = interleaved({"thread x1": lambda logs: Run("thread", 1, CPU_BOUND, logs),
                         f"{executor} x2": lambda logs: Run(executor, 2, CPU_BOUND, logs)}, repeats)
    one, two = heavy["thread x1"], heavy[f"{executor} x2"]
    print(f"\n## CPU-bound: 2 {executor} workers vs 1 thread, median of {repeats} (interleaved)")
    print("| executor | parallel | run (s) | build (s) |")
    print("|---|---:|---:|---:|")
    for name, runs in heavy.items():
        print(f"| {name.split()[0]} | {name[-1]} | {med(runs, 'run_s'):.2f} | {med(runs, 'build_s'):.2f} |")
    ratios = [b.run_s / a.run_s for a, b in zip(one, two)]
    print(f"{executor} x2 / thread x1 run time: {statistics.median(ratios):.3f} (each pair: "
          f"{', '.join(f'{r:.3f}' for r in ratios)})")


def bench_thread(repeats: int) -> None:
    """The thread executor alone on the demo: the baseline the others are compared with."""
    runs = interleaved({"thread": lambda logs: Run("thread", 1, [], logs)}, repeats)["thread"]
    print(f"\n## thread, demo at parallel 1, median of {repeats}")
    print(f"build {med(runs, 'build_s'):.2f} s, run {med(runs, 'run_s'):.2f} s, "
          f"{1000 * med(runs, 'run_s') / runs[0].jobs:.1f} ms per job")


EXECUTORS: dict[str, Callable[[int], None]] = {
    "thread": bench_thread,
    "process": lambda repeats: against_thread("process", repeats),
    "ray": lambda repeats: against_thread("ray", repeats),
}


def main() -> None:
    # Per-epoch lines would go to the console otherwise: no run here attaches a console sink.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    parser = argparse.ArgumentParser()
    parser.add_argument("--executors", default="thread,process,ray",
                        help=f"comma-separated, from {', '.join(EXECUTORS)}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    names = [n.strip() for n in args.executors.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXECUTORS]
    if unknown:
        parser.error(f"--executors: expected names from {', '.join(EXECUTORS)}, found {', '.join(unknown)}")
    print(f"machine: {describe()}")
    for name in names:
        EXECUTORS[name](args.repeats)


if __name__ == "__main__":
    main()
