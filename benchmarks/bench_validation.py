"""Validation at scale: a dry run of many clients with the default validation, kept scores on and off.

    python benchmarks/bench_validation.py [--clients 100000] [--rounds 10] [--online 1000]
                                          [--variants reuse,rescore,online] [--repeat 1] [--real]
                                          [--out FILE.json]

Each variant is one dry run (``fedevents run --dry-run``, default outputs: record, log, events, trace) of
FedAvg on the synthetic task, ``--clients`` clients of which ``--online`` train per round, in a process of
its own; variants alternate when ``--repeat`` is above 1. On a shared machine the wall time measures the
neighbours too; the CPU time (user + system) of the run's process, the events and the bytes do not. ``--real`` trains and scores for real instead (use
it with a few hundred clients): there a validation job is real work, and kept scores save it. Reported per run: the wall time of the process,
its CPU time, its peak resident set size (``ru_maxrss`` of the child), the bytes it wrote and the events it
emitted.

- ``reuse``: the default, ``val_clients: all`` with ``val_reuse: true``: clients whose stored state has not
  changed keep their scores.
- ``rescore``: ``val_reuse: false``, every client scored in every validation round (the behaviour before
  kept scores existed).
- ``online``: ``val_clients: online``, only the round's trained clients scored (the lower bound).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.engine import read_events  # noqa: E402

VARIANTS = {
    "reuse": {"exp_opts": {"val_clients": "all", "val_reuse": True}},
    "rescore": {"exp_opts": {"val_clients": "all", "val_reuse": False}},
    "online": {"exp_opts": {"val_clients": "online"}},
}


def experiment(args: argparse.Namespace, variant: str, folder: Path) -> Path:
    opts = {"comm_rounds": args.rounds, "online_clients": args.online, **VARIANTS[variant]["exp_opts"]}
    config = {
        "exp_name": f"bench-{variant}", "exp_method": "fedavg", "random_seed": 1,
        "logs_dir": str(folder / "logs"), "checkpoints_dir": str(folder / "ckpts"),
        "device": ["cpu"], "parallel": 2, "exp_opts": opts, "model_opts": {"name": "mlp"},
        "task_opts": {"dataset": "synthetic"},
        "clients": {"count": args.clients, "tasks": ["synth"], "prefix": "edge-"},
    }
    path = folder / "experiment.json"  # JSON is YAML
    path.write_text(json.dumps(config))
    return path


def run_one(args: argparse.Namespace, variant: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-validation-") as tmp:
        folder = Path(tmp)
        exp = experiment(args, variant, folder)
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        began = time.perf_counter()
        dry = [] if args.real else ["--dry-run"]
        subprocess.run([sys.executable, "-m", "fedevents.cli", "run", str(exp), *dry, "--quiet"],
                       cwd=folder, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - began
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak = usage.ru_maxrss
        files = list((folder / "logs").iterdir())
        written = sum(f.stat().st_size for f in files)
        events = sum(1 for f in files if f.name.endswith(".events.jsonl") for _ in read_events(f))
    # The largest resident set of any child of this process: it has this one child only.
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": peak / 1024,
            "written_mb": written / 1e6, "events": events}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--online", type=int, default=1000)
    parser.add_argument("--variants", default="reuse,rescore,online")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--real", action="store_true", help="train and score instead of a dry run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variants = args.variants.split(",")
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.repeat):
        for variant in variants:
            # One process per run, so each peak RSS is its own: run the measuring child from a fresh parent.
            out = subprocess.run([sys.executable, __file__, "--child", variant, str(args.clients), str(args.rounds),
                                  str(args.online), "real" if args.real else "dry"],
                                 check=True, capture_output=True, text=True).stdout
            results[variant].append(json.loads(out))
            print(f"{variant:<8} {json.dumps(results[variant][-1])}", flush=True)
    summary = {"machine": describe(), "date": time.strftime("%Y-%m-%d"), "clients": args.clients,
               "rounds": args.rounds, "online": args.online, "real": args.real, "runs": results}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


def child(variant: str, clients: str, rounds: str, online: str, mode: str = "dry") -> None:
    args = argparse.Namespace(clients=int(clients), rounds=int(rounds), online=int(online), real=mode == "real")
    print(json.dumps(run_one(args, variant)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
    else:
        main()
