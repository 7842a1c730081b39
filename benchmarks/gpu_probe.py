"""A run's handler for bench_gpu.py: the device's peak memory as torch's allocator saw it, written at the end.

    handlers: [{target: "gpu_probe:PeakMemory", kwargs: {out: probe.json, device: "cuda:0"}}]

bench_gpu.py copies this file next to the config it writes, where fedevents finds a handler's module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedevents.engine import EventBus, ExperimentFinished, RoundFinished


class PeakMemory:
    """Writes ``{"rounds": {round: peak bytes allocated in it}, "allocated": ..., "reserved": ...}`` to ``out``
    when the experiment finishes (all zeros on a device that is not CUDA)."""

    def __init__(self, out: str, device: str = "cuda:0") -> None:
        self.out = Path(out)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rounds: dict[int, int] = {}

    def subscribe(self, bus: EventBus) -> list:
        return [bus.subscribe(RoundFinished, self.round_finished), bus.subscribe(ExperimentFinished, self.finished)]

    def round_finished(self, ev: RoundFinished) -> None:
        if self.cuda:
            self.rounds[ev.round] = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def finished(self, ev: ExperimentFinished) -> None:
        peak = max(self.rounds.values(), default=0)
        reserved = torch.cuda.max_memory_reserved(self.device) if self.cuda else 0
        self.out.write_text(json.dumps({"rounds": self.rounds, "allocated": peak, "reserved": reserved}))
