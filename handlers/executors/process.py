"""Worker processes on this machine: one per device slot, for CPU-bound work that threads would serialise.

Each slot gets its own process, started on first use with the ``spawn`` method (a fork of a process that
has started torch's thread pools or CUDA is unsafe). A process builds a ``Worker`` from the experiment's
config and seed, so it caches data and models exactly as a thread would and computes the same numbers.
Jobs and results cross the pipe pickled; a job whose time runs out is stopped by killing its process
(the slot is free once the process is gone, and the next job on the slot starts a fresh one). Log lines a
job writes in its process come back with its result and are logged again in the driver, in the thread
that waited for the job, so they carry the run, round, client and task like lines from worker threads.
"""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Mapping

import structlog
from fedevents.engine.devices import Slot
from fedevents.federated.registry import plugin_folders, remember_folders

from .base import Executor, WorkerLost

__all__ = ["ProcessExecutor"]

_STOP = b""
_log = structlog.get_logger("fedevents.federated")


@dataclass
class _Process:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    #: Set once the process has said its worker is built.
    started: bool = False


class ProcessExecutor(Executor):
    """Runs each slot's jobs in a worker process of its own; results equal the thread executor's."""

    name = "process"

    def __init__(self, config: Mapping[str, Any], seed: int, *, torch_threads: int = 1,
                 worker: str = "fedevents.federated.worker:Worker") -> None:
        self.config = dict(config)
        self.seed = seed
        self.threads = torch_threads
        #: ``module:Name`` of the class each process builds as ``Name(config, seed)`` to answer its jobs.
        self.worker = worker
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[tuple[str, int], _Process] = {}
        self._lock = threading.Lock()
        self._closed = False

    def ready(self, slot: Slot) -> bool:
        proc = self._processes.get((slot.device, slot.index))
        return proc is not None and proc.started and proc.process.is_alive()

    def prepare(self, slot: Slot) -> None:
        self._process(slot)

    def train(self, job: Any, slot: Slot) -> Any:
        return self._call(slot, "train", job)

    def validate(self, job: Any, slot: Slot) -> Any:
        return self._call(slot, "validate", job)

    def stop(self, slot: Slot) -> None:
        with self._lock:
            proc = self._processes.get((slot.device, slot.index))
        if proc is not None:
            proc.process.kill()  # the thread waiting on its pipe sees the end and gives the slot back

    def close(self) -> None:
        with self._lock:
            self._closed = True
            processes, self._processes = list(self._processes.values()), {}
        for proc in processes:
            try:
                proc.conn.send_bytes(_STOP)
            except OSError:
                pass
        for proc in processes:
            proc.process.join(timeout=5)
            if proc.process.is_alive():
                proc.process.kill()
                proc.process.join(timeout=5)
            proc.conn.close()

    def _call(self, slot: Slot, kind: str, job: Any) -> Any:
        proc = self._process(slot)
        try:
            proc.conn.send_bytes(pickle.dumps((kind, job), protocol=pickle.HIGHEST_PROTOCOL))
            reply = proc.conn.recv_bytes()
        except (EOFError, OSError):
            self._forget(slot, proc)
            proc.process.join(timeout=5)
            raise WorkerLost(f"the worker process of {slot.device} slot {slot.index} (pid {proc.process.pid}) "
                             f"ended with exit code {proc.process.exitcode} before answering") from None
        status, value, lines = pickle.loads(reply)
        _replay(lines)
        if status == "error":
            raise value
        return value

    def _process(self, slot: Slot) -> _Process:
        """The slot's process, started (and waited for) if it has none; one thread at a time uses a slot."""
        key = (slot.device, slot.index)
        with self._lock:
            if self._closed:
                raise WorkerLost("the process executor is closed")
            proc = self._processes.get(key)
            if proc is None or not proc.process.is_alive():
                ours, theirs = self._context.Pipe(duplex=True)
                # The user modules the config names, imported here from the config's folder, import there
                # from the same folder: a spawned process starts in no particular one.
                process = self._context.Process(target=serve, args=(theirs, self.worker, self.config, self.seed,
                                                                     self.threads, plugin_folders()),
                                                name=f"fedevents-{slot.device}-{slot.index}", daemon=True)
                process.start()
                theirs.close()
                proc = self._processes[key] = _Process(process, ours)
        if not proc.started:  # outside the lock: the slots' processes start side by side
            self._await_ready(slot, proc)
        return proc

    def _await_ready(self, slot: Slot, proc: _Process) -> None:
        """Wait for a new process to say it has built its worker, or to say why it could not."""
        try:
            status, value = pickle.loads(proc.conn.recv_bytes())
        except (EOFError, OSError):
            self._forget(slot, proc)
            proc.process.join(timeout=5)
            raise WorkerLost(f"the worker process of {slot.device} slot {slot.index} ended with exit code "
                             f"{proc.process.exitcode} while starting") from None
        if status == "error":
            self._forget(slot, proc)
            raise value
        proc.started = True

    def _forget(self, slot: Slot, proc: _Process) -> None:
        with self._lock:
            if self._processes.get((slot.device, slot.index)) is proc:
                del self._processes[(slot.device, slot.index)]
        proc.conn.close()


def serve(conn: Connection, worker_class: str, config: Mapping[str, Any], seed: int, threads: int,
          folders: Mapping[str, str] | None = None) -> None:
    """A worker process's loop: answer jobs until told to stop or the driver goes away.

    ``folders`` maps the user modules the config names to the folders they were imported from.
    """
    # Ctrl-C reaches every process of the terminal's group; the driver decides how the run ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import importlib

    import torch

    torch.set_num_threads(threads)
    remember_folders(folders or {})
    lines = _capture_logs()
    try:
        module, _, name = worker_class.partition(":")
        worker = getattr(importlib.import_module(module), name)(config, seed)
        worker.warm_up()
        reply: tuple[str, Any] = ("ok", None)
    except Exception as exc:
        reply = ("error", _portable(exc))
    conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
    if reply[0] == "error":
        return
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if message == _STOP:
            return
        kind, job = pickle.loads(message)
        try:
            reply = ("ok", getattr(worker, kind)(job), lines[:])
        except Exception as exc:
            reply = ("error", _portable(exc), lines[:])
        lines.clear()
        conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


def _capture_logs() -> list[dict[str, Any]]:
    """Route this process's structlog lines into a list (sent back with each result) instead of stdout."""
    lines: list[dict[str, Any]] = []

    def collect(logger: Any, method: str, event_dict: dict[str, Any]) -> Any:
        lines.append({k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
                      for k, v in {**event_dict, "level": method}.items()})
        raise structlog.DropEvent

    structlog.configure(processors=[collect], cache_logger_on_first_use=False)
    return lines


def _replay(lines: list[dict[str, Any]]) -> None:
    for line in lines:
        fields = dict(line)
        level, event = fields.pop("level", "info"), fields.pop("event", "")
        getattr(_log, level, _log.info)(event, **fields)


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling, else a RuntimeError with its type, message and traceback."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return RuntimeError(f"{type(exc).__name__}: {exc}\n{text}")
