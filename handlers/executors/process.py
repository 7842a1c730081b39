"""Worker processes on this machine: one per device slot, for CPU-bound work that threads would serialise.

Each slot gets its own process, started on first use with the ``spawn`` method (a fork of a process that
has started torch's thread pools or CUDA is unsafe). A process builds a ``Worker`` from the experiment's
config and seed, so it caches data and models exactly as a thread would and computes the same numbers.
Jobs and results cross the pipe pickled; a job whose time runs out is stopped by killing its process
(the slot is free once the process is gone, and the next job on the slot starts a fresh one).
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

from fedevents.engine.devices import Slot

from .base import Executor, WorkerLost

__all__ = ["ProcessExecutor"]

_STOP = b""


@dataclass
class _Process:
    process: multiprocessing.process.BaseProcess
    conn: Connection


class ProcessExecutor(Executor):
    """Runs each slot's jobs in a worker process of its own; results equal the thread executor's."""

    name = "process"

    def __init__(self, config: Mapping[str, Any], seed: int, *, torch_threads: int = 1) -> None:
        self.config = dict(config)
        self.seed = seed
        self.threads = torch_threads
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[tuple[str, int], _Process] = {}
        self._lock = threading.Lock()
        self._closed = False

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
        status, value = pickle.loads(reply)
        if status == "error":
            raise value
        return value

    def _process(self, slot: Slot) -> _Process:
        key = (slot.device, slot.index)
        with self._lock:
            if self._closed:
                raise WorkerLost("the process executor is closed")
            proc = self._processes.get(key)
            if proc is None or not proc.process.is_alive():
                ours, theirs = self._context.Pipe(duplex=True)
                process = self._context.Process(target=serve, args=(theirs, self.config, self.seed, self.threads),
                                                name=f"fedevents-{slot.device}-{slot.index}", daemon=True)
                process.start()
                theirs.close()
                proc = self._processes[key] = _Process(process, ours)
            return proc

    def _forget(self, slot: Slot, proc: _Process) -> None:
        with self._lock:
            if self._processes.get((slot.device, slot.index)) is proc:
                del self._processes[(slot.device, slot.index)]
        proc.conn.close()


def serve(conn: Connection, config: Mapping[str, Any], seed: int, threads: int) -> None:
    """A worker process's loop: answer jobs until told to stop or the driver goes away."""
    # Ctrl-C reaches every process of the terminal's group; the driver decides how the run ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch
    from fedevents.federated.worker import Worker

    torch.set_num_threads(threads)
    worker: Worker | None = None
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if message == _STOP:
            return
        kind, job = pickle.loads(message)
        try:
            if worker is None:
                worker = Worker(config, seed)
            reply = ("ok", getattr(worker, kind)(job))
        except Exception as exc:
            reply = ("error", _portable(exc))
        conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling, else a RuntimeError with its type, message and traceback."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return RuntimeError(f"{type(exc).__name__}: {exc}\n{text}")
