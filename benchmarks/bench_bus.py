"""Bus cost: microseconds per emitted event and per client, bare and with the default sinks attached.

    python benchmarks/bench_bus.py [--events 20000] [--clients 2000] [--repeats 5] [--split] [--before TREE]

"per event" emits TrainDone events (the most frequent event with a payload) with round/client context
bound, as in a run. "per client" emits the seven events one client's work item makes in a round
(ClientDispatched, TrainStarted, TrainDone, ClientUploaded, ValScheduled, ValStarted, ValDone), as the engine
does, clients by the hundred per round with a RoundFinished after each hundred. "default sinks" is what
`fedevents run` attaches: the structlog JSONL sink (console off), the JSON recorder and the trace recorder,
writing to a temporary folder, with the run's default handler time limit (300 s). Events are built before the
clock starts (building them is the engine's cost, reported as "build"). Wall time and this process's CPU time
are both given: on a shared machine the CPU time is the steadier of the two.

``--split`` adds each default sink alone (the log sink, the record, the trace recorder writing only the events
file, and only the Chrome trace). ``--before TREE`` measures this checkout and the fedevents source tree TREE
(``git archive`` of an earlier commit, say) side by side: each repeat is one fresh process of each, in
turns, and the table gives both and their ratio.
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
from typing import Any, Callable

import anyio
from structlog.contextvars import bound_contextvars

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.engine import (  # noqa: E402
    ClientDispatched,
    ClientUploaded,
    EventBus,
    ExperimentFinished,
    ExperimentStarted,
    RoundFinished,
    TrainDone,
    TrainStarted,
    ValDone,
    ValScheduled,
    ValStarted,
)
from fedevents.engine.context import RunContext  # noqa: E402
from fedevents.handlers import JsonRecorder, LogSink, TraceRecorder  # noqa: E402

SINKS = ("no handlers", "one no-op handler", "default sinks")
ALONE = ("log sink alone", "record alone", "events file alone", "trace file alone")


def train_done_events(ctx: RunContext, n: int) -> list[Any]:
    return [ctx.make(TrainDone, round=1 + i // 100, client=f"client-{i % 100}", task="synth", device="cpu",
                     slot=i % 2, waited_s=0.0, ran_s=0.01, samples=256,
                     metrics={"tr_acc": 0.5, "tr_loss": 1.0}) for i in range(n)]


def client_events(ctx: RunContext, clients: int) -> list[Any]:
    """Each client's seven events of a round; a RoundFinished closes every hundred clients."""
    events = []
    for i in range(clients):
        rnd, client, slot = 1 + i // 100, f"client-{i}", i % 2
        where = dict(round=rnd, client=client)
        events += [
            ctx.make(ClientDispatched, **where, task="synth", state="integrated"),
            ctx.make(TrainStarted, **where, task="synth", device="cpu", slot=slot, waited_s=0.001),
            ctx.make(TrainDone, **where, task="synth", device="cpu", slot=slot, waited_s=0.001, ran_s=0.01,
                     samples=256, metrics={"tr_acc": 0.5, "tr_loss": 1.0}),
            ctx.make(ClientUploaded, **where, task="synth", samples=256, nbytes=0),
            ctx.make(ValScheduled, **where, tasks=("synth",)),
            ctx.make(ValStarted, **where, device="cpu", slot=slot, waited_s=0.0),
            ctx.make(ValDone, **where, task="synth", device="cpu", slot=slot, ran_s=0.001, samples=128,
                     metrics={"val_acc": 0.5, "val_loss": 1.0}),
        ]
        if i % 100 == 99:
            events.append(ctx.make(RoundFinished, round=rnd, trained=100, failed=0, validated=100, seconds=1.0))
    return events


async def scenario(kind: str, make: Callable[[RunContext, int], list[Any]], n: int,
                   folder: Path) -> tuple[float, float, float]:
    """Wall and CPU seconds to emit what ``make`` builds, and the seconds building took."""
    bus, ctx = EventBus(), RunContext("bench", "bench")
    bus.time_limit_s = 300.0  # exp_opts.handler_timeout_s's default, as in a run
    sinks = []
    if kind == "one no-op handler":
        bus.subscribe(TrainDone, lambda e: None)
    if kind == "default sinks" or kind == "log sink alone":
        sinks.append(LogSink(folder / "b.log.jsonl", console=None))
    if kind == "default sinks" or kind == "record alone":
        sinks.append(JsonRecorder(folder / "b.json", {"exp_name": "bench"}))
    if kind == "default sinks":
        sinks.append(TraceRecorder(folder / "b.events.jsonl", folder / "b.trace.json"))
    elif kind == "events file alone":
        sinks.append(TraceRecorder(folder / "b.events.jsonl", None))
    elif kind == "trace file alone":
        sinks.append(TraceRecorder(None, folder / "b.trace.json"))
    for s in sinks:
        s.subscribe(bus)
    await bus.emit(ctx.make(ExperimentStarted, method="fedavg", rounds=1, clients=100, online_clients=100,
                            devices=("cpu",), parallel=2, seed=0, dry_run=False))
    built = time.perf_counter()
    events = make(ctx, n)
    built = time.perf_counter() - built
    with bound_contextvars(round=1, client="client-0", task="synth"):
        wall, cpu = time.perf_counter(), time.process_time()
        for ev in events:
            await bus.emit(ev)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await bus.emit(ctx.make(ExperimentFinished, rounds=1, seconds=1.0))
    for s in sinks:
        s.close()
    return wall, cpu, built


def _measure(kind: str, make: Callable[[RunContext, int], list[Any]], n: int, repeats: int) -> list[tuple]:
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(anyio.run(scenario, kind, make, n, Path(tmp)))
    return runs


def _row(label: str, runs: list[tuple], per: int) -> str:
    wall = [r[0] / per * 1e6 for r in runs]
    cpu = [r[1] / per * 1e6 for r in runs]
    built = statistics.median(r[2] / per * 1e6 for r in runs)
    return (f"| {label} | {statistics.median(wall):.1f} ({min(wall):.1f}) | {statistics.median(cpu):.1f} "
            f"({min(cpu):.1f}) | {built:.1f} |")


def _tables(args: argparse.Namespace) -> list[tuple[str, str, Callable[[RunContext, int], list[Any]], int]]:
    """(table, kind, events to emit, how many) of every measurement asked for."""
    kinds = SINKS + (ALONE if args.split else ())
    client_kinds = ("no handlers", "default sinks") + (ALONE if args.split else ())
    return ([("event", kind, train_done_events, args.events) for kind in kinds]
            + [("client", kind, client_events, args.clients) for kind in client_kinds])


def _once(args: argparse.Namespace) -> dict[str, list[float]]:
    """One repeat of every measurement in this process: per event or per client, µs of wall and of CPU."""
    out = {}
    for table, kind, make, n in _tables(args):
        wall, cpu, _ = _measure(kind, make, n, 1)[0]
        out[f"{table}|{kind}"] = [wall / n * 1e6, cpu / n * 1e6]
    return out


def _side_by_side(args: argparse.Namespace) -> None:
    """Each repeat: one process of the code in ``--before``, then one of this checkout; medians and ratios."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_vs_loop import source_path

    child = [sys.executable, __file__, "--events", str(args.events), "--clients", str(args.clients), "--child"]
    child += ["--split"] if args.split else []
    runs: dict[str, list[dict[str, list[float]]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as scratch:
        before_env = source_path(args.before, Path(scratch))
        for _ in range(args.repeats):
            for side, env in (("before", before_env), ("after", None)):
                done = subprocess.run(child, env=env, capture_output=True, text=True, check=True)
                runs[side].append(json.loads(done.stdout.splitlines()[-1]))
    for table, unit in (("event", "µs per TrainDone"), ("client", "µs per client (seven events)")):
        print(f"\n| {unit}, median (best) of {args.repeats} | CPU before | CPU after | after / before | "
              "wall before | wall after | after / before |\n|---|---:|---:|---:|---:|---:|---:|")
        for name, kind, _, _ in _tables(args):
            if name != table:
                continue
            cells = []
            for i in (1, 0):  # CPU, then wall
                before = [r[f"{table}|{kind}"][i] for r in runs["before"]]
                after = [r[f"{table}|{kind}"][i] for r in runs["after"]]
                ratio = statistics.median(after) / statistics.median(before)
                cells += [f"{statistics.median(before):.1f} ({min(before):.1f})",
                          f"{statistics.median(after):.1f} ({min(after):.1f})", f"{ratio:.2f}"]
            print(f"| {kind} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--split", action="store_true", help="also measure each default sink alone")
    parser.add_argument("--before", type=Path, help="a fedevents source tree measured beside this checkout")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_once(args)))
        return
    print(f"machine: {describe()}")
    print(f"load average at the start: {os.getloadavg()}")
    print(f"{args.events} TrainDone events and {args.clients} clients' events per repeat, {args.repeats} repeats; "
          "median (best)")
    if args.before is not None:
        _side_by_side(args)
        print(f"load average at the end: {os.getloadavg()}")
        return
    print("\n| TrainDone events | µs per event, wall | µs per event, CPU | build µs |")
    print("|---|---:|---:|---:|")
    for _, kind, make, n in _tables(args):
        if make is train_done_events:
            print(_row(kind, _measure(kind, make, n, args.repeats), n))
    print("\n| one client's seven events | µs per client, wall | µs per client, CPU | build µs |")
    print("|---|---:|---:|---:|")
    for _, kind, make, n in _tables(args):
        if make is client_events:
            print(_row(kind, _measure(kind, make, n, args.repeats), n))
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
