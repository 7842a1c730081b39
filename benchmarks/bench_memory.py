"""Memory over a long run: the process must not grow round over round.

    python benchmarks/bench_memory.py [--rounds 200] [--clients 10] [--device cpu] [--out FILE.json]
                                      [--many-clients 1000] [--many-rounds 60]
                                      [--sinks log,record,trace] [--no-checkpoints] [--tracemalloc]

Long run: the demo experiment (configs/demo.yaml) for ``--rounds`` rounds with the default sinks and a
checkpoint after every round, logs and checkpoints in a temporary folder. A handler on RoundFinished that
runs after every other handler of the round (the checkpoint included) reads the current resident set size
from /proc/self/statm and, where CUDA is available, ``torch.cuda.memory_allocated`` and ``memory_reserved``.
The slope is a least-squares fit from round 20 to the end: the first rounds fill caches, thread pools and
allocator arenas once, and are left out.

Many clients: ``--many-clients`` clients, 20 online per round, ``exp_opts.val_clients=online``, run twice,
with a checkpoint after every round and with checkpoints only in round 0 and the last round. Client states
must exist only for clients that have trained and, past ``exp_opts.clients_in_memory``, spill to disk.

To find the cause of a growth in the long run: ``--sinks`` attaches only some default sinks (``none`` for
none), ``--no-checkpoints`` keeps only round 0's and the last round's, ``--many-rounds 0`` skips the
many-clients runs, and ``--tracemalloc`` lists the Python allocation sites that grew from round 20 to the
end. Python reuses freed dicts and tuples without asking the allocator, so tracemalloc can charge a block
to the site that first allocated it. Each run has a process of its own.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import multiprocessing
import os
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.cli import build_experiment  # noqa: E402
from fedevents.engine import Experiment, RoundFinished, TrainDone  # noqa: E402
from fedevents.handlers import ClientWork, JsonRecorder, LogSink, TraceRecorder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SINKS = ("log", "record", "trace")
SETTLED = 20  # the first round of the fitted slope
FLAT_KIB = 6.0  # growth above this many KiB per round; runs without sinks measure 1 to 5 (allocator noise)
IN_MEMORY = 256  # exp_opts.clients_in_memory of the many-clients runs (its default)
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") / 1024


def rss_kib() -> float:
    """The resident set size now (not its peak, which ru_maxrss gives), in KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_KIB


@dataclass
class Series:
    """One value per finished round, in round order."""

    rounds: list[int] = field(default_factory=list)
    rss_kib: list[float] = field(default_factory=list)
    cuda_allocated_kib: list[float] = field(default_factory=list)
    cuda_reserved_kib: list[float] = field(default_factory=list)
    clients_trained: list[int] = field(default_factory=list)
    states: list[int] = field(default_factory=list)
    states_in_memory: list[int] = field(default_factory=list)
    state_kib_in_memory: list[float] = field(default_factory=list)

    def at(self, name: str, rnd: int) -> float:
        return getattr(self, name)[self.rounds.index(rnd)]


class Sampler:
    """Records memory and client states at every RoundFinished; snapshots Python allocations when tracing."""

    def __init__(self, exp: Experiment, device: str) -> None:
        self.series = Series()
        self.store = exp.component(ClientWork).federation.store
        # Where the builder spills states: the files there are the states that are not in memory.
        self.spill = exp.config.checkpoints_dir / exp.paths.run_id / "spill"
        self.cuda = torch.device(device) if device.startswith("cuda") else None
        self.trained: set[str] = set()
        self.settled = min(SETTLED, exp.config.rounds // 2)
        self.snapshots: list[tracemalloc.Snapshot] = []
        exp.bus.subscribe(TrainDone, lambda ev: self.trained.add(ev.client))
        # Last of all handlers: the round's record, logs and checkpoint are written (and freed) before.
        exp.bus.subscribe(RoundFinished, self.sample, priority=-10_000)

    def sample(self, ev: RoundFinished) -> None:
        s = self.series
        s.rounds.append(ev.round)
        s.rss_kib.append(rss_kib())
        if torch.cuda.is_available():
            s.cuda_allocated_kib.append(torch.cuda.memory_allocated(self.cuda) / 1024)
            s.cuda_reserved_kib.append(torch.cuda.memory_reserved(self.cuda) / 1024)
        spilled = sum(1 for _ in self.spill.glob("*.pt")) if self.spill.is_dir() else 0
        s.clients_trained.append(len(self.trained))
        s.states.append(len(self.store))
        s.states_in_memory.append(len(self.store) - spilled)
        s.state_kib_in_memory.append(self.store.nbytes_in_memory() / 1024)
        if tracemalloc.is_tracing() and ev.round == self.settled:
            self.snapshot()

    def snapshot(self) -> None:
        gc.collect()  # garbage cycles are not growth; leave them out of the comparison
        self.snapshots.append(tracemalloc.take_snapshot())


def add_sinks(exp: Experiment, sinks: tuple[str, ...]) -> None:
    """Attach some of the default sinks, as ``build_experiment`` attaches all of them."""
    if "log" in sinks:
        exp.add(LogSink(exp.paths.log, console=None, record_path=exp.paths.record))
    if "record" in sinks:
        exp.add(JsonRecorder(exp.paths.record, exp.config.data))
    if "trace" in sinks:
        exp.add(TraceRecorder(exp.paths.events, exp.paths.trace))


def run(overrides: list[str], folder: Path, device: str, *, sinks: tuple[str, ...] = SINKS,
        traced: bool = False) -> tuple[Series, float, list[tracemalloc.Snapshot]]:
    """Run the demo with ``overrides`` in a fresh process; give its series, seconds and any Python snapshots.

    A process of its own, so that no run starts on a heap that an earlier run grew.
    """
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(run_here, overrides, folder, device, sinks, traced).result()


def run_here(overrides: list[str], folder: Path, device: str, sinks: tuple[str, ...],
             traced: bool) -> tuple[Series, float, list[tracemalloc.Snapshot]]:
    """``run`` in this process."""
    if "log" not in sinks:  # nothing else would keep training's per-epoch lines off the console
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    where = [f"logs_dir={str(folder / 'logs')!r}", f"checkpoints_dir={str(folder / 'ckpts')!r}"]
    began = time.perf_counter()
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=[*overrides, *where], console=None, sinks=False)
    add_sinks(exp, sinks)
    sampler = Sampler(exp, device)
    if traced:
        tracemalloc.start()
    try:
        exp.run()
        if traced:
            sampler.snapshot()
    finally:
        tracemalloc.stop()
    return sampler.series, time.perf_counter() - began, sampler.snapshots


def slope(xs: list[int], ys: list[float]) -> float:
    """The least-squares slope of ``ys`` over ``xs``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def first_fitted(series: Series) -> int:
    return min(SETTLED, series.rounds[-1] // 2)


def fitted(series: Series, name: str, last: int | None = None) -> float:
    """KiB per round of ``name`` from round ``SETTLED`` (half the run, if shorter) to ``last`` (the end)."""
    first, last = first_fitted(series), series.rounds[-1] if last is None else last
    pairs = [(r, v) for r, v in zip(series.rounds, getattr(series, name)) if first <= r <= last]
    return slope([r for r, _ in pairs], [v for _, v in pairs])


def growth(series: Series, label: str, name: str) -> str:
    first, last = first_fitted(series), series.rounds[-1]
    per_round, base = fitted(series, name), series.at(name, first)
    whole = per_round * (last - first)
    share = f" = {100 * whole / base:.2f}% of the {base / 1024:.1f} MiB at round {first}" if base else ""
    word = "flat" if per_round <= FLAT_KIB else "GROWS"
    return (f"{label} {word}, {per_round:+.2f} KiB per round, {whole / 1024:+.2f} MiB over rounds "
            f"{first}–{last}{share}")


def print_long_run(series: Series, rounds: int) -> None:
    marks = sorted({m for m in (10, 50, 100, 200) if m <= rounds} | {rounds})
    rows = [("RSS", "rss_kib")]
    if series.cuda_allocated_kib:
        rows += [("CUDA allocated", "cuda_allocated_kib"), ("CUDA reserved", "cuda_reserved_kib")]
    first = first_fitted(series)
    print("| memory | " + " | ".join(f"round {m} (MiB)" for m in marks) + f" | slope r{first}–{rounds} (KiB/round) |")
    print("|---|" + "---:|" * (len(marks) + 1))
    for label, name in rows:
        values = " | ".join(f"{series.at(name, m) / 1024:.1f}" for m in marks)
        print(f"| {label} | {values} | {fitted(series, name):.2f} |")
    print("\nverdict: " + "; ".join(growth(series, label, name) for label, name in rows))


def print_many_clients(every: Series, ends: Series, clients: int) -> None:
    last = every.rounds[-1]
    marks = sorted({m for m in (1, 5, 10, 20, 40, 60, 100, 200) if m < last} | {last - 1, last})
    print("| round | clients trained | client states | in memory | spilled | state tensors in memory (MiB) "
          "| RSS, checkpoint every round (MiB) | RSS, checkpoints round 0 and last only (MiB) |")
    print("|---:|" + "---:|" * 7)
    for m in marks:
        states, kept = every.at("states", m), every.at("states_in_memory", m)
        print(f"| {m} | {every.at('clients_trained', m)} | {states} | {kept} | {states - kept} | "
              f"{every.at('state_kib_in_memory', m) / 1024:.1f} | {every.at('rss_kib', m) / 1024:.1f} | "
              f"{ends.at('rss_kib', m) / 1024:.1f} |")
    same = all(getattr(every, n) == getattr(ends, n) for n in ("clients_trained", "states", "states_in_memory"))
    states, trained = every.at("states", last), every.at("clients_trained", last)
    most = max(every.states_in_memory + ends.states_in_memory)
    mib = lambda series, rnd: f"{series.at('rss_kib', rnd) / 1024:.1f} MiB"
    per_round = lambda series: f"{fitted(series, 'rss_kib', last - 1):+.1f}"
    print(f"\nat the end: {states} client states {'=' if states == trained else '≠'} {trained} clients that "
          f"trained (of {clients}); at most {most} in memory {'≤' if most <= IN_MEMORY else '>'} "
          f"clients_in_memory = {IN_MEMORY}{'' if same else ' (the two runs differ in client states!)'}")
    print(f"RSS at the end: {mib(every, last)} with a checkpoint every round, {mib(ends, last)} with checkpoints "
          f"round 0 and last only ({mib(ends, last - 1)} a round before its one checkpoint); slope from round "
          f"{first_fitted(every)} to {last - 1}: {per_round(every)} and {per_round(ends)} KiB/round")


def print_growth(snapshots: list[tracemalloc.Snapshot], first: int, top: int = 10) -> None:
    """The Python allocation sites that grew most from round ``first`` to the end."""
    if len(snapshots) < 2:
        return
    grew = [s for s in snapshots[1].compare_to(snapshots[0], "lineno") if s.size_diff > 0][:top]
    print(f"\nPython allocations that grew from round {first} to the end (tracemalloc, top {top}):\n")
    print("| where | grew (KiB) | blocks added | now (KiB) |")
    print("|---|---:|---:|---:|")
    for s in grew:
        frame = s.traceback[0]
        where = Path(frame.filename)
        where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
        print(f"| {where}:{frame.lineno} | {s.size_diff / 1024:.1f} | {s.count_diff} | {s.size / 1024:.1f} |")


def sink_list(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n and n != "none")
    unknown = [n for n in names if n not in SINKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(SINKS)} or none, found {', '.join(unknown)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="write every run's per-round series here as JSON")
    parser.add_argument("--many-clients", type=int, default=1000)
    parser.add_argument("--many-rounds", type=int, default=60, help="0 leaves the many-clients runs out")
    parser.add_argument("--sinks", type=sink_list, default=SINKS,
                        help=f"the default sinks of the long run: some of {','.join(SINKS)}, or none")
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="checkpoint the long run only in round 0 and the last round")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="list where Python allocations grew in the long run (it runs a few times slower)")
    args = parser.parse_args()
    device = f"device=[{args.device!r}]"
    online = min(5, args.clients)
    long_run = [device, f"exp_opts.comm_rounds={args.rounds}", f"clients={{count: {args.clients}, tasks: [synth]}}",
                f"exp_opts.online_clients={online}"]
    if args.no_checkpoints:
        long_run.append(f"exp_opts.checkpoint_interval={args.rounds + 1000}")
    many_online = min(20, args.many_clients)
    many = [device, f"exp_opts.comm_rounds={args.many_rounds}",
            f"clients={{count: {args.many_clients}, tasks: [synth]}}", f"exp_opts.online_clients={many_online}",
            "exp_opts.val_clients=online", f"exp_opts.clients_in_memory={IN_MEMORY}"]
    ends_only = [*many, f"exp_opts.checkpoint_interval={args.many_rounds + 1000}"]

    print(f"machine: {describe()}")
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (other work on these cores "
          f"slows the runs down, it does not change this process's memory)")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        series, seconds, snapshots = run(long_run, Path(tmp) / "long", args.device, sinks=args.sinks,
                                         traced=args.tracemalloc)
    runs = {"long_run": (long_run, series)}
    checkpoints = "round 0 and last only" if args.no_checkpoints else "every round"
    print(f"\ndemo config, {args.rounds} rounds, {args.clients} clients ({online} online), device {args.device}, "
          f"sinks {','.join(args.sinks) or 'none'}, checkpoints {checkpoints}; {seconds:.0f} s; memory read after "
          f"the last handler of each round\n")
    print_long_run(series, args.rounds)
    print_growth(snapshots, first_fitted(series))

    if args.many_rounds:
        with tempfile.TemporaryDirectory() as tmp:
            every, every_s, _ = run(many, Path(tmp) / "every", args.device)
            ends, ends_s, _ = run(ends_only, Path(tmp) / "ends", args.device)
        print(f"\n{args.many_clients} clients, {many_online} online per round, val_clients=online, "
              f"clients_in_memory = {IN_MEMORY}, {args.many_rounds} rounds, default sinks; checkpoint every round "
              f"{every_s:.0f} s, round 0 and last only {ends_s:.0f} s\n")
        print_many_clients(every, ends, args.many_clients)
        runs.update(many_clients_checkpoint_every_round=(many, every),
                    many_clients_checkpoint_ends_only=(ends_only, ends))
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    if args.out is not None:
        data = {name: {"overrides": ov, **asdict(s)} for name, (ov, s) in runs.items()}
        args.out.write_text(json.dumps({"machine": describe(), **data}, indent=1) + "\n")


if __name__ == "__main__":
    main()
