"""Bytes a dry run writes: every client validated every round, many clients, a few online.

    python benchmarks/bench_outputs.py --clients 10000 --online 100 --rounds 10 --outputs "[log, events, trace]"
    python benchmarks/bench_outputs.py ... --src /path/to/an/older/tree   # the same run by other code

Runs ``fedevents run --dry-run`` in a subprocess and prints the bytes of each file it wrote, their total, the
wall time and the events counted by type in the events stream (plain or gzip), so runs side by side show
what each form writes and that no event is missing. ``--src`` puts a folder holding ``fedevents/`` first on
PYTHONPATH, to run an older checkout's code on the same experiment.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

from fedevents.engine import read_events  # noqa: E402

EXPERIMENT = """\
exp_name: outputs
exp_method: fedavg
logs_dir: {logs}
checkpoints_dir: {ckpts}
parallel: 4
device: [cpu]
exp_opts: {{comm_rounds: {rounds}, val_interval: 1, online_clients: {online}, val_clients: all}}
clients: {{count: {clients}, tasks: [t0]}}
dry_run_opts: {{train_s_per_batch: 0.0, val_s_per_batch: 0.0}}
"""


def run(args: argparse.Namespace, folder: Path) -> tuple[float, dict[str, int]]:
    """Run the dry run in ``folder``; give its wall time and the bytes of each file under its logs."""
    exp = folder / "exp.yaml"
    text = EXPERIMENT.format(logs=folder / "logs", ckpts=folder / "ckpts", rounds=args.rounds, online=args.online,
                             clients=args.clients)
    if args.outputs is not None:
        text += f"outputs: {args.outputs}\n"
    exp.write_text(text)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([args.src, env.get("PYTHONPATH", "")])
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedevents.cli", "run", str(exp), "--dry-run"], cwd=folder, env=env,
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, {p.name.split(".", 1)[1]: p.stat().st_size for p in sorted((folder / "logs").iterdir())}


def count_events(logs: Path) -> Counter[str]:
    """The events of the stream under ``logs`` by type, read as a user reads them (older streams too)."""
    (path,) = [p for p in logs.iterdir() if ".events.jsonl" in p.name]
    return Counter(e["event"] for e in read_events(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--online", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--outputs", help="the outputs: list, as YAML (default: the config's default)")
    parser.add_argument("--src", help="a folder holding fedevents/ to run instead of the installed code")
    args = parser.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        wall, sizes = run(args, Path(tmp))
        events = count_events(Path(tmp) / "logs")
    print(f"{args.clients} clients, {args.online} online, {args.rounds} rounds, outputs {args.outputs or 'default'}"
          f"{'  src ' + args.src if args.src else ''}: {wall:.1f}s")
    for name, size in sizes.items():
        print(f"  {name:<18} {size:>14,} bytes")
    print(f"  {'total':<18} {sum(sizes.values()):>14,} bytes")
    print(f"  events: {sum(events.values()):,} ({', '.join(f'{k} {v}' for k, v in sorted(events.items()))})")


if __name__ == "__main__":
    main()
