"""Bus cost: events per second and microseconds per emit, bare and with the default sinks attached.

    python benchmarks/bench_bus.py [--events 20000] [--repeats 5]

Emits TrainDone events (the most frequent event with a payload) with round/client context bound, as in a
run. "default sinks" is what `fedevents run` attaches: the structlog JSONL sink (console off), the JSON
recorder and the trace recorder, writing to a temporary folder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
from structlog.contextvars import bound_contextvars

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.engine import EventBus, ExperimentFinished, ExperimentStarted, RoundFinished, TrainDone  # noqa: E402
from fedevents.engine.context import RunContext  # noqa: E402
from fedevents.handlers import JsonRecorder, LogSink, TraceRecorder  # noqa: E402


async def measure(bus: EventBus, ctx: RunContext, n: int) -> float:
    events = [ctx.make(TrainDone, round=1 + i // 100, client=f"client-{i % 100}", task="synth", device="cpu",
                       slot=i % 2, waited_s=0.0, ran_s=0.01, samples=256,
                       metrics={"tr_acc": 0.5, "tr_loss": 1.0}) for i in range(n)]
    with bound_contextvars(round=1, client="client-0", task="synth"):
        began = time.perf_counter()
        for ev in events:
            await bus.emit(ev)
        return (time.perf_counter() - began) / n


async def scenario(kind: str, n: int, folder: Path) -> float:
    bus, ctx = EventBus(), RunContext("bench", "bench")
    sinks = []
    if kind == "one no-op handler":
        bus.subscribe(TrainDone, lambda e: None)
    if kind == "default sinks":
        sinks = [LogSink(folder / "b.log.jsonl", console=None), JsonRecorder(folder / "b.json", {"exp_name": "bench"}),
                 TraceRecorder(folder / "b.events.jsonl", folder / "b.trace.json")]
        for s in sinks:
            s.subscribe(bus)
    await bus.emit(ctx.make(ExperimentStarted, method="fedavg", rounds=1, clients=100, online_clients=100,
                            devices=("cpu",), parallel=2, seed=0, dry_run=False))
    per_event = await measure(bus, ctx, n)
    await bus.emit(ctx.make(RoundFinished, round=1, trained=100, failed=0, validated=0, seconds=1.0))
    await bus.emit(ctx.make(ExperimentFinished, rounds=1, seconds=1.0))
    for s in sinks:
        s.close()
    return per_event


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {describe()}")
    print(f"{args.events} TrainDone events per repeat, {args.repeats} repeats, median (best)\n")
    print("| bus | µs per emit | events/s |")
    print("|---|---:|---:|")
    for kind in ("no handlers", "one no-op handler", "default sinks"):
        times = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                times.append(anyio.run(scenario, kind, args.events, Path(tmp)))
        med, best = statistics.median(times), min(times)
        print(f"| {kind} | {med * 1e6:.1f} ({best * 1e6:.1f}) | {1 / med:,.0f} |")


if __name__ == "__main__":
    main()
