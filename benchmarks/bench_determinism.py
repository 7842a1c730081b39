"""How often do separate runs of one config and seed write different records?

    python benchmarks/bench_determinism.py --runs 40 --jobs 2 --rounds 1

Runs the small experiment of tests/reliability (configs/demo.yaml, 64 samples per client) ``--runs`` times as
plain ``fedevents run`` processes, ``--jobs`` at a time, groups the records by their ``data`` and ``comm``
sections and prints how many runs wrote each, and for every record unlike the most common one the first
(client, round, task, metric) that differs. A process builds its synthetic data and its thread pool afresh, so
this sees what the in-process determinism tests cannot: whatever changes between one process and the next.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def experiment(folder: Path, rounds: int) -> Path:
    """The reliability tests' experiment with ``rounds`` rounds, written into ``folder``."""
    data = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    data["exp_opts"].update(comm_rounds=rounds, val_interval=2)
    data["task_opts"]["synthetic"].update(samples_per_client=64, test_size=32)
    data.update(logs_dir=str(folder / "logs"), checkpoints_dir=str(folder / "ckpts"))
    folder.mkdir(parents=True)
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_once(folder: Path, rounds: int) -> dict[str, Any]:
    """One plain ``fedevents run`` in ``folder``; give its record."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, "-m", "fedevents.cli", "run", str(experiment(folder, rounds))], cwd=folder,
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (path,) = [p for p in (folder / "logs").glob("*.json") if not p.name.endswith(".trace.json")]
    return json.loads(path.read_text())


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Where the ``data`` of two records first differ, as ``client round task metric: a != b``."""
    for client in sorted(a["data"]):
        for rnd in sorted(a["data"][client], key=int):
            for task, metrics in sorted(a["data"][client][rnd].items()):
                for name, value in sorted(metrics.items()):
                    other = b["data"].get(client, {}).get(rnd, {}).get(task, {}).get(name)
                    if other != value:
                        return f"{client} round {rnd} {task} {name}: {value!r} != {other!r}"
    return "data equal; comm differs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (more load, more thread interleavings)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        with ThreadPoolExecutor(args.jobs) as pool:
            records = list(pool.map(lambda i: run_once(Path(tmp) / f"run{i}", args.rounds), range(args.runs)))
    keys = [json.dumps([r["data"], r["comm"]], sort_keys=True) for r in records]
    counts = Counter(keys)
    common = json.loads(counts.most_common(1)[0][0])
    print(f"{args.runs} runs of {args.rounds} round(s), {args.jobs} at a time: "
          f"{len(counts)} distinct record(s), sizes {sorted(counts.values(), reverse=True)}")
    for i, (record, key) in enumerate(zip(records, keys)):
        if counts[key] < counts.most_common(1)[0][1]:
            print(f"  run {i}: {first_difference({'data': common[0]}, record)}")


if __name__ == "__main__":
    main()
