"""Unit costs behind the side-by-side benchmark: µs per SGD step, and the engine's cost per client and per event.

    python benchmarks/bench_costs.py [--repeat 5] [--clients 1000 --per-round 100 --rounds 10] [--only divergence]
    python benchmarks/bench_costs.py --only engine [--before TREE] [--repeat 5]

Per step: one local training of the heavy preset (8,192 samples of 1x16x16, 3 epochs of batches of 32: 768
steps, MLP 256-384-10, SGD lr 0.05, torch threads 1), from the same initial weights and the same shuffling
generator, through (a) fedevents' training function (``fedevents.federated.training.train_local`` with the
optimizer and criterion fedevents builds from the config), (b) the bare loop of workload.py (the update written
out, no bookkeeping) and (c) the bare loop with ``torch.optim.SGD``; interleaved, median µs per step.

Per client and per event: a dry run of fedevents (the engine, the bus, the client-work handler and its
simulated executor, nothing trained) of ``--clients`` clients, ``--per-round`` trained per round, for
``--rounds`` rounds with the global model scored each round, with the default sinks (log, events, trace, the
record, checkpoints of the dry run) and without any; wall time over trainings and over emitted events.
``--before TREE`` (with ``--only engine``) runs each dry run in a fresh process of this checkout and of the
fedevents source tree TREE (``git archive`` of an earlier commit, say), in turns, and gives both side by side.

Per commit: the divergence check of one trained client of the wide preset (its MLP's four weight tensors),
element by element with ``isfinite`` and as fedevents does it (``all_finite``: a sum first); CPU µs per client.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import describe  # noqa: E402
from bench_vs_loop import fedevents_config  # noqa: E402
from workload import PRESETS, Preset, build_model, client_data, train  # noqa: E402

from fedevents.cli import build_experiment  # noqa: E402
from fedevents.engine import read_events  # noqa: E402
from fedevents.federated.federation import all_finite  # noqa: E402
from fedevents.federated.training import build_criterion, build_optimizer, train_local  # noqa: E402


def _fedevents_step(model: torch.nn.Module, preset: Preset, x: torch.Tensor, y: torch.Tensor,
                    shuffle: torch.Generator) -> int:
    optimizer = build_optimizer({"name": "sgd", "lr": preset.lr, "momentum": 0.0}, model.parameters())
    train_local(model, optimizer, None, build_criterion({"name": "cross_entropy"}), x, y, epochs=preset.epochs,
                batch_size=preset.batch, shuffle=shuffle)
    return preset.steps_per_training


def _optim_step(model: torch.nn.Module, preset: Preset, x: torch.Tensor, y: torch.Tensor,
                shuffle: torch.Generator) -> int:
    optimizer = torch.optim.SGD(model.parameters(), lr=preset.lr)
    model.train()
    steps = 0
    for _ in range(preset.epochs):
        for batch in torch.randperm(y.numel(), generator=shuffle).split(preset.batch):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
            steps += 1
    return steps


TRAINERS = {"fedevents train_local": _fedevents_step, "bare loop": train, "bare loop + torch.optim.SGD": _optim_step}


def per_step(repeat: int) -> dict[str, dict[str, float]]:
    """Median µs per SGD step of each trainer, wall and CPU; the trainers must end with the same weights.

    CPU time (of this process, whose torch runs one thread) leaves out the time a loaded machine gives
    to other processes; wall time does not.
    """
    preset = PRESETS["heavy"]
    x, y = client_data(preset, 0)
    start = build_model(preset, seed=0).state_dict()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in TRAINERS}
    for _ in range(repeat + 1):  # the first round warms caches and is dropped
        finals = {}
        for name, trainer in TRAINERS.items():
            model = build_model(preset)
            model.load_state_dict(start)
            wall, cpu = time.perf_counter(), time.process_time()
            steps = trainer(model, preset, x, y, torch.Generator().manual_seed(1))
            times[name]["cpu"].append((time.process_time() - cpu) / steps * 1e6)
            times[name]["wall"].append((time.perf_counter() - wall) / steps * 1e6)
            finals[name] = model.state_dict()
        if not all(torch.equal(finals["bare loop"][k], f[k]) for f in finals.values() for k in f):
            raise SystemExit("the trainers did not compute the same weights; the comparison is void")
    return {name: {k: statistics.median(v[1:]) for k, v in t.items()} for name, t in times.items()}


def divergence_check(repeat: int, calls: int = 200) -> dict[str, float]:
    """Median CPU µs per client of each way to check a trained wide client's weights for NaN and infinity."""
    weights = [t for t in build_model(PRESETS["wide"], seed=0).state_dict().values() if t.is_floating_point()]
    ways = {"isfinite, element by element": lambda t: bool(torch.isfinite(t).all()),
            "all_finite (a sum first)": all_finite}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeat + 1):  # the first round warms caches and is dropped
        for name, check in ways.items():
            began = time.process_time()
            for _ in range(calls):
                if not all(check(t) for t in weights):
                    raise SystemExit(f"{name}: found a finite model not finite; the comparison is void")
            times[name].append((time.process_time() - began) / calls * 1e6)
    return {name: statistics.median(v[1:]) for name, v in times.items()}


def engine_cost(clients: int, per_round: int, rounds: int, sinks: bool) -> dict[str, float]:
    """Wall seconds of a dry run, per training and per event."""
    preset = Preset("engine", clients=clients, per_round=per_round, rounds=rounds, epochs=1, samples=64)
    with tempfile.TemporaryDirectory() as scratch:
        config = fedevents_config(preset, Path(scratch), parallel=1)
        began = time.perf_counter()
        exp = build_experiment(config, dry_run=True, console=None, sinks=sinks)
        built, cpu = time.perf_counter(), time.process_time()
        exp.run()
        seconds, cpu_s = time.perf_counter() - built, time.process_time() - cpu
        events_files = list((Path(scratch) / "logs").glob("*.events.jsonl"))
        events = sum(1 for _ in read_events(events_files[0])) if events_files else None
    trainings = per_round * rounds
    return {"build_s": built - began, "run_s": seconds, "cpu_s": cpu_s, "trainings": trainings, "events": events,
            "ms_per_training": seconds / trainings * 1e3,
            "us_per_event": seconds / events * 1e6 if events else None}


def engine_side_by_side(args: argparse.Namespace) -> None:
    """Dry runs with and without sinks, each in a fresh process, of ``--before`` (when given) and of this
    checkout in turns; medians of CPU and wall per training and per event, and the ratios."""
    from bench_vs_loop import source_path

    sides = ("before", "after") if args.before is not None else ("after",)
    runs: dict[tuple[str, str], list[dict]] = {(side, sinks): [] for side in sides for sinks in ("none", "sinks")}
    print(f"machine: {describe()}\nload average at the start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        envs = {"after": None, "before": source_path(args.before, Path(scratch)) if args.before else None}
        for _ in range(args.repeat):
            for sinks in ("none", "sinks"):
                for side in sides:
                    child = [sys.executable, __file__, "--child", sinks, "--clients", str(args.clients),
                             "--per-round", str(args.per_round), "--rounds", str(args.rounds)]
                    done = subprocess.run(child, env=envs[side], capture_output=True, text=True, check=True)
                    runs[(side, sinks)].append(json.loads(done.stdout.splitlines()[-1]))
    events = runs[("after", "sinks")][0]["events"]
    trainings = args.per_round * args.rounds
    print(f"\ndry run, {args.clients} clients, {args.per_round} per round, {args.rounds} rounds: {trainings} trainings, "
          f"{events} events; median of {args.repeat}, one process each\n")
    print("| code | sinks | CPU ms per training | wall ms per training | CPU µs per event | wall µs per event |\n"
          "|---|---|---:|---:|---:|---:|")
    medians = {}
    for (side, sinks), results in runs.items():
        cpu = statistics.median(r["cpu_s"] for r in results)
        wall = statistics.median(r["run_s"] for r in results)
        medians[(side, sinks)] = (cpu, wall)
        print(f"| {side} | {'default' if sinks == 'sinks' else 'none'} | {cpu / trainings * 1e3:.3f} | "
              f"{wall / trainings * 1e3:.3f} | {cpu / events * 1e6:.1f} | {wall / events * 1e6:.1f} |")
    if args.before is not None:
        for sinks in ("none", "sinks"):
            (cpu_b, wall_b), (cpu_a, wall_a) = medians[("before", sinks)], medians[("after", sinks)]
            print(f"\nafter / before, {'default sinks' if sinks == 'sinks' else 'no sinks'}: CPU {cpu_a / cpu_b:.2f}, "
                  f"wall {wall_a / wall_b:.2f}")
        sinks_b = medians[("before", "sinks")][0] - medians[("before", "none")][0]
        sinks_a = medians[("after", "sinks")][0] - medians[("after", "none")][0]
        print(f"the sinks' own CPU per training (default minus none): before {sinks_b / trainings * 1e3:.3f} ms, "
              f"after {sinks_a / trainings * 1e3:.3f} ms ({sinks_a / sinks_b:.2f})")
    print(f"load average at the end: {os.getloadavg()}")


def main() -> None:
    # train_local logs each epoch; the benchmark measures the logging call, not a console writing it.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--only", choices=("divergence", "step", "engine"), help="measure only the divergence "
                        "check, only the per-step cost, or only the dry runs")
    parser.add_argument("--before", type=Path, help="with --only engine: a fedevents source tree measured beside "
                        "this checkout")
    parser.add_argument("--child", choices=("sinks", "none"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(engine_cost(args.clients, args.per_round, args.rounds, args.child == "sinks")))
        return
    if args.only == "engine":
        engine_side_by_side(args)
        return
    print(f"machine: {describe()}", flush=True)
    checks = {}
    if args.only != "step":
        checks = divergence_check(args.repeat)
        print(f"\ndivergence check of one trained wide client (MLP 256-384-10), median of {args.repeat}\n")
        print("| check | CPU µs per client |\n|---|---:|")
        for name, us in checks.items():
            print(f"| {name} | {us:.0f} |")
        if args.only == "divergence":
            return
    steps = per_step(args.repeat)
    bare = steps["bare loop"]
    print(f"\nheavy preset, one training of {PRESETS['heavy'].steps_per_training} steps, median of {args.repeat}; "
          "final weights bit-identical\n")
    print("| trainer | µs per SGD step, wall | / bare loop | µs per SGD step, CPU | / bare loop |\n"
          "|---|---:|---:|---:|---:|")
    for name, us in steps.items():
        print(f"| {name} | {us['wall']:.0f} | {us['wall'] / bare['wall']:.3f} | {us['cpu']:.0f} | "
              f"{us['cpu'] / bare['cpu']:.3f} |")
    if args.only == "step":
        return
    runs = {}
    for sinks in (False, True):
        results = [engine_cost(args.clients, args.per_round, args.rounds, sinks) for _ in range(args.repeat)]
        runs["default sinks" if sinks else "no sinks"] = results
    print(f"\ndry run, {args.clients} clients, {args.per_round} per round, {args.rounds} rounds, median of "
          f"{args.repeat}\n")
    print("| sinks | run (s) | CPU (s) | trainings | events | ms per training | µs per event | CPU µs per event |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    events = runs["default sinks"][0]["events"]  # the same sequence with or without sinks
    for label, results in runs.items():
        seconds = statistics.median(r["run_s"] for r in results)
        cpu = statistics.median(r["cpu_s"] for r in results)
        trainings = results[0]["trainings"]
        print(f"| {label} | {seconds:.2f} | {cpu:.2f} | {trainings} | {events} | {seconds / trainings * 1e3:.3f} | "
              f"{seconds / events * 1e6:.1f} | {cpu / events * 1e6:.1f} |")
    if args.out:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        document = {"machine": describe(), "date": date, "us_per_step": steps, "dry_runs": runs,
                    "us_per_divergence_check": checks}
        args.out.write_text(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
