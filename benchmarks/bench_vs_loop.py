"""Side by side: fedevents, a hand-written loop and Flower's simulation on the same workload, whole processes.

    python benchmarks/bench_vs_loop.py [--presets small,wide,heavy] [--repeat 3] [--quick] [--parallel 1]
                                       [--actors 2] [--no-flower] [--before TREE] [--out bench_vs_loop.json]

Presets (workload.py): small (N=100 clients, K=10 per round, R=5 rounds, E=1 epoch, 64 samples each), wide
(N=1000, K=100, R=3, E=1, 64) and heavy (N=20, K=10, R=3, E=3, 8,192); synthetic 1x16x16 inputs, 10 classes,
Dirichlet(0.5) label skew, equal sample counts, MLP 256-384-10, SGD lr 0.05 without momentum, batch 32, torch
threads 1, FedAvg weighted by samples, the global model scored on 2,000 held-out samples before round 1 and
after each round. Contenders, each a process of its own:

- fedevents: ``python -m fedevents.cli run CFG.yaml --quiet`` with a config written to a scratch folder
  (default outputs and checkpoints, as a user gets them);
- loop: handloop.py, no framework;
- Flower: flower_sim.py (Ray backend, ``--actors`` actors of one CPU), when ``flwr`` is installed
  (``pip install 'fedevents[bench]'``); otherwise skipped with a note;
- before (with ``--before TREE``): fedevents again, imported from another source tree (``git archive`` of an
  earlier commit, say), so that a change is measured against the code before it in the same interleaved run.

Runs are paired and interleaved (fedevents, loop, Flower, fedevents, loop, Flower, ...); the table gives
medians and the ratios of interleaved pairs (median, and the range over pairs). Per run: wall time of the
process; start-up (process start to the first training step: fedevents' first TrainStarted event, the
others' marks); round time (end of one global evaluation to the end of the next: round 1 apart, the median
of the later rounds);
exit lag (the last event or mark to the process's exit); peak RSS of the process tree (sampled every 50 ms
from /proc, Ray's processes included); CPU seconds (the command and the children it waited for); SGD steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import compile_fedevents, describe  # noqa: E402
from _process import run_sampled  # noqa: E402
from workload import PRESETS, QUICK, Preset  # noqa: E402

from fedevents.engine import read_events  # noqa: E402

CONTENDERS = ("fedevents", "loop", "flower")
#: fedevents' code folders, each imported as ``fedevents.<name>`` (pyproject.toml's package-dir).
SUBPACKAGES = ("cli", "engine", "federated", "handlers")


def fedevents_config(preset: Preset, folder: Path, parallel: int) -> dict:
    """The preset in fedevents' keys. ``val_clients: all`` with ``val_model: global`` scores the global model
    in round 0 too and no client at all; ``val_clients: online`` would skip round 0's evaluation."""
    return {
        "exp_name": preset.name, "exp_method": "fedavg", "random_seed": preset.seed,
        "logs_dir": str(folder / "logs"), "checkpoints_dir": str(folder / "ckpts"),
        "parallel": parallel, "device": ["cpu"],
        "exp_opts": {"comm_rounds": preset.rounds, "val_interval": 1, "online_clients": preset.per_round,
                     "val_clients": "all", "val_model": "global", "torch_threads": 1},
        "model_opts": {"name": "mlp", "hidden": [preset.hidden]},
        "optimizer_opts": {"name": "sgd", "lr": preset.lr, "momentum": 0.0},
        "criterion_opts": {"name": "cross_entropy"},
        "task_opts": {"dataset": "synthetic", "train_epochs": preset.epochs, "batch_size": preset.batch,
                      "synthetic": {"num_classes": preset.classes, "input_shape": list(preset.shape),
                                    "samples_per_client": preset.samples, "label_skew": preset.alpha,
                                    # clients are never scored under val_model: global; 1 is the least allowed
                                    "test_size": 1, "global_test_size": preset.test_size}},
        "clients": {"count": preset.clients, "tasks": ["synth"]},
    }


def measure(command: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``command``; give its start and exit (wall clock), CPU seconds and the peak RSS of its tree."""
    done = run_sampled(command, log, env=env)
    return {"started": done.started, "exited": done.exited, "wall_s": done.exited - done.started,
            "cpu_s": done.cpu_s, "peak_rss_mib": done.peak_rss / 2**20}


def source_path(tree: Path, scratch: Path) -> dict[str, str]:
    """An environment whose ``fedevents`` package is the one in source tree ``tree``: a folder on PYTHONPATH
    whose ``fedevents/<name>`` links to each code folder of ``tree``, found before the installed package."""
    missing = [name for name in SUBPACKAGES if not (tree / name / "__init__.py").is_file()]
    if missing:
        raise SystemExit(f"--before {tree}: expected a fedevents source tree, found no {missing[0]}/__init__.py")
    shim = scratch / "before-path" / "fedevents"
    shim.mkdir(parents=True)
    for name in SUBPACKAGES:
        (shim / name).symlink_to((tree / name).resolve(), target_is_directory=True)
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(shim.parent), os.environ.get("PYTHONPATH")])))


def run_fedevents(preset: Preset, folder: Path, parallel: int, env: dict[str, str] | None = None) -> dict:
    folder.mkdir(parents=True)
    config = folder / f"{preset.name}.yaml"
    config.write_text(yaml.safe_dump(fedevents_config(preset, folder, parallel)))
    result = measure([sys.executable, "-m", "fedevents.cli", "run", str(config), "--quiet"], folder / "run.log",
                     env=env)
    (events_file,) = (folder / "logs").glob("*.events.jsonl")
    events = list(read_events(events_file))
    first = min(e["wall_time"] for e in events if e["event"] == "TrainStarted")
    rounds = [(e["round"], e["wall_time"], e["metrics"]["val_acc"]) for e in events if e["event"] == "GlobalValDone"]
    trained = [e for e in events if e["event"] == "TrainDone"]
    # TrainDone.samples is the client's data set (FedAvg's weight); the epochs are the config's.
    if any(e["samples"] != preset.samples for e in trained):
        raise RuntimeError(f"fedevents: expected {preset.samples} samples per training, "
                           f"found {sorted({e['samples'] for e in trained})}")
    return _summary(result, first, rounds, events[-1]["wall_time"], len(trained) * preset.steps_per_training)


def run_marked(script: str, preset: Preset, folder: Path, quick: bool, extra: list[str]) -> dict:
    """Run handloop.py or flower_sim.py, which write their marks to a file."""
    folder.mkdir(parents=True)
    marks_file = folder / "marks.txt"
    command = [sys.executable, str(HERE / script), preset.name, str(marks_file), *(["--quick"] if quick else []),
               *extra]
    result = measure(command, folder / "run.log")
    marks = [line.split() for line in marks_file.read_text().splitlines()]
    first = min(float(m[1]) for m in marks if m[0] == "train")
    rounds = [(int(m[1]), float(m[2]), float(m[3])) for m in marks if m[0] == "round"]
    steps = sum(int(m[2]) for m in marks if m[0] == "train") + sum(int(m[1]) for m in marks if m[0] == "steps")
    end = max(float(m[1]) for m in marks if m[0] == "end")
    return _summary(result, first, rounds, end, steps)


def _summary(result: dict, first_train: float, rounds: list[tuple[int, float, float]], last: float,
             steps: int) -> dict:
    rounds = sorted(rounds)
    if [r for r, _, _ in rounds] != list(range(len(rounds))):
        raise RuntimeError(f"expected global evaluations of rounds 0, 1, ..., found {[r for r, _, _ in rounds]}")
    per_round = [b - a for (_, a, _), (_, b, _) in zip(rounds, rounds[1:])]
    # Round 1 also pays for whatever starts lazily (Flower's Ray actors); start-up measures that, so the
    # round time is the median of the later rounds.
    steady = per_round[1:] or per_round
    return {"wall_s": result["wall_s"], "cpu_s": result["cpu_s"], "peak_rss_mib": result["peak_rss_mib"],
            "startup_s": first_train - result["started"], "round_s": statistics.median(steady),
            "round1_s": per_round[0],
            "exit_lag_s": result["exited"] - last, "steps": steps, "final_acc": rounds[-1][2]}


def run_once(contender: str, preset: Preset, folder: Path, args: argparse.Namespace) -> dict:
    if contender == "fedevents":
        return run_fedevents(preset, folder, args.parallel)
    if contender == "before":
        return run_fedevents(preset, folder, args.parallel, args.before_env)
    if contender == "loop":
        return run_marked("handloop.py", preset, folder, args.quick, [])
    return run_marked("flower_sim.py", preset, folder, args.quick, ["--actors", str(args.actors)])


def pair_ratios(runs: dict[str, list[dict]], top: str, bottom: str, key: str = "wall_s") -> list[float]:
    """``top`` / ``bottom`` of each interleaved pair (the same repeat): wall time, or another measure."""
    return [a[key] / b[key] for a, b in zip(runs.get(top, []), runs.get(bottom, []))]


def _ratio(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def table(results: dict, contenders: tuple[str, ...]) -> str:
    """The markdown tables of docs/benchmarks.md: medians per contender, then the ratios of pairs."""
    keys = ("wall_s", "startup_s", "round1_s", "round_s", "exit_lag_s", "peak_rss_mib", "cpu_s")
    lines = ["| preset | contender | wall (s) | start-up to first training (s) | round 1 (s) | later rounds (s) "
             "| exit lag (s) | peak RSS, process tree (MiB) | CPU (s) | SGD steps | final global acc |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        for contender in contenders:
            if not runs.get(contender):
                continue
            med = {k: statistics.median(r[k] for r in runs[contender]) for k in keys}
            steps = sorted({r["steps"] for r in runs[contender]})
            acc = statistics.median(r["final_acc"] for r in runs[contender])
            # Ray's actors are not the command's waited-for children: Flower's CPU time is its driver's alone.
            cpu = f"{med['cpu_s']:.2f}" + (" (driver only)" if contender == "flower" else "")
            lines.append(f"| {name} | {contender} | {med['wall_s']:.2f} | {med['startup_s']:.2f} | "
                         f"{med['round1_s']:.3f} | {med['round_s']:.3f} | {med['exit_lag_s']:.2f} | "
                         f"{med['peak_rss_mib']:.0f} | "
                         f"{cpu} | {', '.join(map(str, steps))} | {acc:.3f} |")
    # No CPU ratio for Flower: its CPU time leaves out Ray's actors.
    lines += ["", "| preset | fedevents / loop | fedevents / loop, CPU s | Flower / fedevents | Flower / loop |",
              "|---|---:|---:|---:|---:|"]
    for name, runs in results.items():
        lines.append(f"| {name} | {_ratio(pair_ratios(runs, 'fedevents', 'loop'))} | "
                     f"{_ratio(pair_ratios(runs, 'fedevents', 'loop', 'cpu_s'))} | "
                     f"{_ratio(pair_ratios(runs, 'flower', 'fedevents'))} | "
                     f"{_ratio(pair_ratios(runs, 'flower', 'loop'))} |")
    if "before" in contenders:
        lines += ["", "| preset | before / loop | before / loop, CPU s | fedevents / before | fedevents / before, "
                  "CPU s |", "|---|---:|---:|---:|---:|"]
        for name, runs in results.items():
            lines.append(f"| {name} | {_ratio(pair_ratios(runs, 'before', 'loop'))} | "
                         f"{_ratio(pair_ratios(runs, 'before', 'loop', 'cpu_s'))} | "
                         f"{_ratio(pair_ratios(runs, 'fedevents', 'before'))} | "
                         f"{_ratio(pair_ratios(runs, 'fedevents', 'before', 'cpu_s'))} |")
    return "\n".join(lines)


def check_steps(preset: Preset, runs: dict[str, list[dict]]) -> str:
    """One line with every contender's SGD steps; stops the benchmark if one did other work."""
    counts = {c: sorted({r["steps"] for r in rs}) for c, rs in runs.items() if rs}
    line = f"{preset.name}: SGD steps expected {preset.steps}, " + ", ".join(f"{c} {s}" for c, s in counts.items())
    if any(s != [preset.steps] for s in counts.values()):
        raise SystemExit(f"{line}: the contenders did not do the same work; the comparison is void")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="small,wide,heavy")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats of each contender")
    parser.add_argument("--quick", action="store_true", help="smaller presets and one repeat: a smoke test")
    parser.add_argument("--parallel", type=int, default=1, help="fedevents' slots on the CPU")
    parser.add_argument("--actors", type=int, default=2, help="Flower's Ray actors (one CPU each)")
    parser.add_argument("--no-flower", action="store_true", help="leave Flower out even when installed")
    parser.add_argument("--before", type=Path, help="a fedevents source tree run beside this one as 'before'")
    parser.add_argument("--out", type=Path, default=Path("bench_vs_loop.json"), help="where the JSON goes")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    presets = [(QUICK if args.quick else PRESETS)[name] for name in args.presets.split(",")]
    contenders = CONTENDERS
    if args.no_flower or importlib.util.find_spec("flwr") is None:
        contenders = CONTENDERS[:2]
        print("Flower skipped: " + ("--no-flower" if args.no_flower else
                                    "flwr is not installed (pip install 'fedevents[bench]')"), flush=True)
    if args.before is not None:
        contenders = ("fedevents", "before", *contenders[1:])
    print(f"machine: {describe()}", flush=True)
    print(compile_fedevents(), flush=True)
    print(f"load average before: {os.getloadavg()}", flush=True)
    results: dict[str, dict[str, list[dict]]] = {}
    document = {"machine": describe(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": " ".join(sys.argv), "load_average_before": os.getloadavg(), "repeat": repeat,
                "presets": {p.name: {"clients": p.clients, "per_round": p.per_round, "rounds": p.rounds,
                                     "epochs": p.epochs, "samples": p.samples, "steps": p.steps} for p in presets},
                "runs": results}
    with tempfile.TemporaryDirectory() as scratch:
        args.before_env = None if args.before is None else source_path(args.before, Path(scratch))
        for preset in presets:
            runs = results[preset.name] = {c: [] for c in contenders}
            for i in range(repeat):
                for contender in contenders:
                    run = run_once(contender, preset, Path(scratch) / f"{preset.name}-{contender}-{i}", args)
                    runs[contender].append(run)
                    args.out.write_text(json.dumps(document, indent=1))  # a long run's results survive a failure
                    print(f"{preset.name} #{i + 1} {contender}: {run['wall_s']:.2f} s wall, start-up "
                          f"{run['startup_s']:.2f} s, round {run['round_s']:.3f} s, "
                          f"exit lag {run['exit_lag_s']:.2f} s, "
                          f"peak {run['peak_rss_mib']:.0f} MiB, acc {run['final_acc']:.3f}", flush=True)
            print(check_steps(preset, runs), flush=True)
    print(f"load average after: {os.getloadavg()}\n", flush=True)
    print(table(results, contenders))
    document["load_average_after"] = os.getloadavg()
    args.out.write_text(json.dumps(document, indent=1))
    print(f"\nruns written to {args.out}")


if __name__ == "__main__":
    main()
