"""Start-up and exit: process start to the first training, and the last event to the process's end.

    python benchmarks/bench_startup.py [--pairs 5] [--rounds 2]

Paired, interleaved whole-process runs: `fedevents run configs/demo.yaml` (default sinks, checkpoints, quiet)
beside two bare torch scripts that train the demo's MLP on data of the demo's shape, one with a hand-written
SGD update and one with ``torch.optim.SGD`` (which imports ``torch._dynamo`` on its first use). Each figure is
the median over the pairs; "gap" is the median of the per-pair differences fedevents minus the bare script.

fedevents' first training is its first TrainStarted event, its last event ExperimentFinished (wall times read
from the events file); a bare script prints the wall time when it starts its first step and after its last.
CPU time (user + system) of the whole process is given too: on a shared machine it is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import compile_fedevents, describe  # noqa: E402

from fedevents.engine import read_events  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

BARE = """
import sys, time
import torch
from torch import nn
from torch.nn import functional as F
rounds, clients, optim = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
x, y = torch.randn(clients, 64, 32, generator=gen), torch.randint(0, 10, (clients, 64), generator=gen)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
first = None
for r in range(rounds):
    for c in range(clients):
        if first is None:
            first = time.time()
        opt = torch.optim.SGD(model.parameters(), lr=0.05) if optim == "torch" else None
        for epoch in range(2):
            for batch in torch.randperm(64, generator=gen).split(32):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[c, batch]), y[c, batch]).backward()
                if opt is not None:
                    opt.step()
                else:
                    with torch.no_grad():
                        for p in model.parameters():
                            p.add_(p.grad, alpha=-0.05)
print(first, time.time())
"""


def _cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def _timed(cmd: list[str], cwd: Path) -> tuple[float, float, str, float]:
    """Wall clock before and after ``cmd``, its stdout, and its CPU seconds (user + system)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cpu = _cpu()
    began = time.time()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    ended = time.time()
    if done.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed with exit status {done.returncode}:\n{done.stderr[-2000:]}")
    return began, ended, done.stdout, _cpu() - cpu


def fedevents_run(rounds: int, folder: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "fedevents.cli", "run", str(ROOT / "configs/demo.yaml"), "--quiet",
           "--logs-dir", str(folder / "logs"), "--set", f"exp_opts.comm_rounds={rounds}",
           "--set", "task_opts.synthetic.samples_per_client=64", "--set", f"checkpoints_dir={folder / 'ckpts'}"]
    began, ended, _, cpu = _timed(cmd, folder)
    events = list(read_events(next((folder / "logs").glob("*.events.jsonl"))))
    first = next(e["wall_time"] for e in events if e["event"] == "TrainStarted")
    last = next(e["wall_time"] for e in events if e["event"] == "ExperimentFinished")
    return {"start": first - began, "exit": ended - last, "total": ended - began, "cpu": cpu}


def bare_run(rounds: int, optim: str, folder: Path) -> dict[str, float]:
    script = folder / "bare.py"
    script.write_text(BARE)
    began, ended, out, cpu = _timed([sys.executable, str(script), str(rounds), "5", optim], folder)
    first, last = map(float, out.split())
    return {"start": first - began, "exit": ended - last, "total": ended - began, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {describe()}; load average {os.getloadavg()[0]:.1f} at start")
    print(compile_fedevents())
    print(f"{args.pairs} interleaved runs of each; demo, {args.rounds} rounds, 5 of 10 clients, 64 samples each\n")
    runs: dict[str, list[dict[str, float]]] = {"fedevents": [], "bare, hand-written SGD": [],
                                               "bare, torch.optim.SGD": []}
    for _ in range(args.pairs):
        with tempfile.TemporaryDirectory() as tmp:
            runs["fedevents"].append(fedevents_run(args.rounds, Path(tmp)))
            runs["bare, hand-written SGD"].append(bare_run(args.rounds, "hand", Path(tmp)))
            runs["bare, torch.optim.SGD"].append(bare_run(args.rounds, "torch", Path(tmp)))
    print("| process | start → first training (s) | last event → exit (s) | whole process (s) | whole process, CPU (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, rows in runs.items():
        med = {key: statistics.median(r[key] for r in rows) for key in ("start", "exit", "total", "cpu")}
        print(f"| {name} | {med['start']:.3f} | {med['exit']:.3f} | {med['total']:.3f} | {med['cpu']:.3f} |")
    for name in ("bare, hand-written SGD", "bare, torch.optim.SGD"):
        gap = statistics.median(f["start"] - b["start"] for f, b in zip(runs["fedevents"], runs[name]))
        print(f"\nstart-up gap, fedevents − {name}: {gap:+.3f} s (median of per-pair differences)")


if __name__ == "__main__":
    main()
