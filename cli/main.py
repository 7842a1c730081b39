"""The ``fedevents`` command: ``fedevents run EXPERIMENT.yaml [...]``."""

from __future__ import annotations

import _io
import argparse
import atexit
import gc
import io
import os
import sys
import threading
import time
import traceback
from typing import NoReturn, Sequence

from fedevents.engine.config import EXECUTORS
from fedevents.engine.errors import ConfigError, FedEventsError, Interrupted, one_line

from .collector import collector_paused, frozen_heap

__all__ = ["main", "report_main"]

# MKL picks its kernels by the memory alignment of each matrix unless told to keep one code path, so the same
# training could differ in the last bits between two runs (seen as rare mismatches of a resumed record). Set
# before torch loads MKL; a user's own setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``fedevents: error:`` line and exit status 2, like any bad input."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, one_line(f"fedevents: error: {self.prog}: {message} (see {self.prog} --help)") + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedevents", description="Run federated learning experiments as events.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run one or more experiments")
    run.add_argument("experiments", nargs="+", metavar="EXPERIMENT.yaml")
    run.add_argument("--common", metavar="COMMON.yaml", help="common file: dirs, devices and a defaults block")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override any config key (repeatable); the value is read as YAML")
    run.add_argument("--device", dest="devices", action="append", metavar="DEVICE",
                     help="device to run on, e.g. cpu or cuda:0 (repeatable; replaces the config's list)")
    run.add_argument("--parallel", type=int, metavar="N", help="concurrent trainings per device")
    run.add_argument("--logs-dir", metavar="DIR", help="where logs, records and traces go")
    run.add_argument("--executor", choices=EXECUTORS,
                     help="where client work runs: thread (default), process or ray (docs/executors.md)")
    run.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                     help="run each experiment once per seed, as one group (docs/config.md)")
    run.add_argument("--sweep", action="append", default=[], metavar="KEY.PATH=V1,V2",
                     help="run each experiment once per value (repeatable: the product of all sweeps)")
    run.add_argument("--dry-run", action="store_true", help="emit the whole event sequence without training")
    run.add_argument("--resume", action="store_true",
                     help="continue the newest checkpointed run of each experiment (start fresh if there is none)")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    run.add_argument("--tensorboard", metavar="DIR", help="log per-round scalars for TensorBoard under DIR "
                     "(needs fedevents[tensorboard])")
    run.add_argument("--mlflow", metavar="URI", help="log the run to the MLflow tracking store at URI "
                     "(needs fedevents[mlflow])")
    run.add_argument("--quiet", action="store_true",
                     help="no live progress display on a terminal: the plain lines alone, as off a terminal")

    data = sub.add_parser("data", help="make data sets").add_subparsers(dest="data_command", required=True,
                                                                         parser_class=_Parser)
    synth = data.add_parser("synth-reid", help="write a synthetic ReID data set in the FedSTIL layout")
    synth.add_argument("out_dir", metavar="OUT_DIR")
    synth.add_argument("--clients", type=int, default=3)
    synth.add_argument("--tasks", type=int, default=3, help="tasks per client")
    synth.add_argument("--ids-per-task", type=int, default=20, help="identities per task (half train, half eval)")
    synth.add_argument("--images-per-id", type=int, default=8)
    synth.add_argument("--cameras", type=int, default=2)
    synth.add_argument("--img-size", type=int, nargs=2, default=(64, 32), metavar=("H", "W"))
    synth.add_argument("--sustain-rounds", type=int, default=5, help="rounds per task in the written experiment")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--overwrite", action="store_true", help="replace an existing data set in OUT_DIR")
    synth.add_argument("--debug", action="store_true", help="show tracebacks")

    report = sub.add_parser("report", help="tables and plots from JSON records")
    report.add_argument("records", nargs="+", metavar="LOG.json|DIR",
                        help="records, or folders searched for them (traces and dry runs are left out)")
    report.add_argument("--out", default="report", metavar="DIR", help="where report.md, report.csv and PNGs go")
    report.add_argument("--metric", default=None, help="primary metric (default: val_rank_1, else val_acc)")
    report.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedevents`` command with ``argv`` and give its exit status.

    Without ``argv`` (the installed command, ``python -m fedevents.cli``) the arguments are ``sys.argv`` and
    the process ends here, once the command is done (see ``_leave``).
    """
    status = _command(argv)
    if argv is None:
        _leave(status)
    return status


def _command(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except FedEventsError as exc:
        if args.debug:
            traceback.print_exc()
        label = "interrupted" if isinstance(exc, Interrupted) else "error"
        # One line whatever the message quotes: a --set value or a user's error may hold control characters.
        print(one_line(f"fedevents: {label}: {exc}"), file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("fedevents: interrupted", file=sys.stderr)
        return 130


def _leave(status: int) -> NoReturn:
    """End the process with ``status`` without the interpreter's teardown of every module and object.

    Tearing down torch's thousand modules took 0.3-2 s after the last event, with every file already closed.
    The exit handlers still run (logging's flush, worker processes' joins, a plugin's own), and open files
    and the standard streams are flushed. The ordinary exit is kept for a non-daemon thread still alive after
    a second (it waits for it) and under a profiler or tracer (``python -m cProfile -m fedevents.cli`` writes
    its stats after this returns).
    """
    if sys.getprofile() or sys.gettrace() or not _threads_done(grace_s=1.0):
        sys.exit(status)
    atexit._run_exitfuncs()  # what the interpreter runs after joining the threads
    _flush_open_files()
    os._exit(status)


def _threads_done(grace_s: float) -> bool:
    """Whether every non-daemon thread has ended, waiting up to ``grace_s`` in all: the event loop's worker
    threads are still finishing just after it closes, and the ordinary exit would join them too."""
    deadline = time.monotonic() + grace_s
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                return False
    return True


# The C base classes of every io class: a subclass check of each object's own type against them is faster
# than isinstance against the io.IOBase ABC over the 200,000 objects of a process with torch, and unlike any
# isinstance it never reads an object's __class__ (a deprecated torch object warns when that is read).
_FILE: type = getattr(_io, "_IOBase", io.IOBase)
_TEXT: type = getattr(_io, "_TextIOBase", io.TextIOBase)


def _flush_open_files() -> None:
    """Flush every open file object, standard streams included, as the teardown that ``_leave`` skips
    would on deleting them: a plugin's file left open keeps what was written to it. Text files go first,
    since they write into the buffered files beneath them."""
    files = [obj for obj in gc.get_objects() if issubclass(type(obj), _FILE)]
    for text in (True, False):
        for file in files:
            if issubclass(type(file), _TEXT) is text:
                try:
                    if not file.closed:
                        file.flush()
                except (OSError, ValueError):  # a reader gone away, a file closed meanwhile: nothing to keep
                    pass


def _run(args: argparse.Namespace) -> int:
    if args.command == "data":
        return _synth_reid(args)
    if args.command == "report":
        return report_main(args)
    return _run_experiments(args)


def _run_experiments(args: argparse.Namespace) -> int:
    """Every experiment (times every seed and swept value), all validated before the first one starts.

    Without ``--seeds``/``--sweep`` the first failing run ends the command with its exit status. A group
    goes on past a failing run, and ends with a line saying how many runs failed (exit 1 if any did).
    """
    # torch's import and the building make many objects and little garbage (cli/collector.py)
    with collector_paused(then_freeze=True) as paused:
        experiments, grouped = _build_experiments(args)
    try:
        return _run_all(experiments, grouped, args.dry_run)
    finally:
        paused.thaw()  # each run hands back what it froze; this is for a command that ends before one did


def _run_all(experiments: list, grouped: bool, dry_run: bool) -> int:
    if not grouped:
        for index, exp in enumerate(experiments):
            _run_one(exp, dry_run, after_another=index > 0)
        return 0
    failed: list[str] = []
    for index, exp in enumerate(experiments):
        try:
            _run_one(exp, dry_run, after_another=index > 0)
        except Interrupted:
            raise
        except FedEventsError as exc:
            failed.append(exp.config.exp_name)
            print(one_line(f"fedevents: error: {exp.config.exp_name}: {exc}"), file=sys.stderr)
    summary = f"{len(experiments)} runs, {len(failed)} failed" + (f": {', '.join(failed)}" if failed else "")
    print(f"fedevents: group {experiments[0].config.data['group']}: {summary}", file=sys.stderr)
    return 1 if failed else 0


def _build_experiments(args: argparse.Namespace) -> tuple[list, bool]:
    """Every experiment the command runs, built; and whether they form a group (``--seeds``/``--sweep``)."""
    from fedevents.engine.context import new_run_id

    from .builder import build_experiment, build_experiments, flag_overrides, load_configs
    from .groups import expand

    flags = flag_overrides(devices=args.devices, parallel=args.parallel, logs_dir=args.logs_dir,
                           executor=args.executor)
    overrides = [*args.overrides, *flags]
    variants = expand(args.seeds, args.sweep)
    wiring = dict(resume=args.resume, progress=_wants_progress(args), tensorboard=args.tensorboard,
                  mlflow=args.mlflow)
    if not variants:
        return build_experiments(args.experiments, common=args.common, overrides=overrides, dry_run=args.dry_run,
                                 **wiring), False
    bases = load_configs(args.experiments, common=args.common, overrides=overrides, dry_run=True)
    runs = []
    for path, base in zip(args.experiments, bases):
        group = ("--seeds/--sweep", f"group={new_run_id(base.exp_name)!r}")
        for variant in variants:
            name = ("--seeds/--sweep", f"exp_name={base.exp_name}-{variant.suffix}")
            runs.extend(load_configs([path], common=args.common, overrides=[*overrides, *variant.overrides,
                                                                              group, name], dry_run=args.dry_run))
    return [build_experiment(cfg, dry_run=args.dry_run, **wiring) for cfg in runs], True


def _run_one(exp, dry_run: bool, *, after_another: bool = False) -> None:
    # What was built is left out of the collector's walks while this experiment runs; an earlier
    # experiment's garbage is collected first rather than kept frozen through this one.
    with frozen_heap(collect_first=after_another):
        exp.run()
    if dry_run:
        _print_dry_run(exp)


def _wants_progress(args: argparse.Namespace) -> bool:
    """A live display on a terminal unless --quiet; off a terminal (CI, a file) the plain lines."""
    return not args.quiet and sys.stderr.isatty() and os.environ.get("TERM", "") != "dumb"


def report_main(args: argparse.Namespace) -> int:
    """Run ``fedevents report RECORD.json ... [--out DIR] [--metric NAME]``; give the exit status.

    Prints the table, writes report.md, report.csv and the plots into ``--out`` (default ``./report``).
    Bad input raises ConfigError, which the CLI turns into one line and exit status 2.
    """
    from .report import build_report, find_records, format_table, make_out_dir, write_report

    found, notes = find_records(args.records)
    for note in notes:
        print(note, file=sys.stderr)
    report = build_report([record for _, record in found], metric=args.metric)
    out = make_out_dir(args.out or "report")
    print(format_table(report))
    try:
        from .report_plots import plot_report
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "matplotlib":
            raise
        plots: list = []
        print("report: plots skipped: matplotlib is not installed (pip install 'matplotlib>=3.8' to get them)",
              file=sys.stderr)
    else:
        plots = plot_report(report, out)
    written = write_report(report, out, plots)
    print(f"\nreport: wrote {', '.join(p.name for p in written)} and {len(plots)} plot(s) to {out}")
    return 0



def _synth_reid(args: argparse.Namespace) -> int:
    from fedevents.federated.synth_reid import generate_synth_reid

    try:
        summary = generate_synth_reid(
            args.out_dir, clients=args.clients, tasks=args.tasks, ids_per_task=args.ids_per_task,
            images_per_id=args.images_per_id, cameras=args.cameras, img_size=tuple(args.img_size), seed=args.seed,
            sustain_rounds=args.sustain_rounds, overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as exc:
        raise ConfigError(f"data synth-reid: {exc}") from None
    images = sum(summary["images"].values()) if isinstance(summary["images"], dict) else summary["images"]
    print(f"wrote {images} images for {args.clients} clients x {args.tasks} tasks under {summary['out_dir']}")
    print(f"experiment: {summary['experiment']}  (fedevents run {summary['experiment']})")
    return 0


def _print_dry_run(exp) -> None:
    from fedevents.handlers import ClientWork, TraceRecorder

    summary = exp.component(ClientWork).executor.summary()
    cfg = exp.config
    print(f"dry run of {cfg.exp_name}: {cfg.rounds} rounds, {len(cfg.clients)} clients "
          f"({cfg.online_clients} online per round), {len(cfg.devices)} device(s) x {cfg.parallel} slot(s)")
    for slot, count in summary["per_slot"].items():
        print(f"  {slot:<16} {count:>6} work items")
    print(f"  predicted makespan {summary['predicted_makespan_s']:.2f}s "
          f"(train {summary['train_s_each']:.3f}s per client, validate {summary['val_s_per_task']:.3f}s per task)")
    tracer = exp.component(TraceRecorder)
    files = [] if tracer is None else [(k, p) for k, p in (("trace", tracer.chrome_path), ("events", tracer.events_path))
                                       if p is not None]
    if files:
        print("  " + "  ".join(f"{kind}: {path}" for kind, path in files))


if __name__ == "__main__":
    sys.exit(main())
