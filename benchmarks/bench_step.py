"""Per-step cost of local training: fedevents' ``train_local`` beside a bare torch loop, same SGD steps.

    python benchmarks/bench_step.py [--samples 640] [--epochs 5] [--repeats 7]

The issue-12 workload: an MLP 256-384-10 on 1x16x16 inputs, 10 classes, SGD (lr 0.05, no momentum), batch 32,
one torch thread. The bare loop is the hand-written loop of bench_vs_loop: it draws the same permutations,
drops the gradients and writes the SGD update out (torch.optim.SGD's arithmetic without momentum), without
keeping loss or accuracy; ``train_local`` takes each batch the way a client's training in a run does (the model's
output read as logits and features, the configured loss, the method's batch_loss hook) and sums loss and
accuracy (what the record shows). Both start from the same weights
and must end with bit-identical weights, or the benchmark stops. A third loop, the bare one stepping
torch.optim.SGD, tells what of the difference is torch's optimizer. Repeats interleave the three; the
figure is the median CPU time per SGD step (one torch thread: on a shared machine steadier than wall time,
and the same on an idle one), and the overhead the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.federated.methods.base import Method  # noqa: E402
from fedevents.federated.training import build_optimizer, train_local  # noqa: E402
from fedevents.federated.worker import build_loss, model_output  # noqa: E402
from fedevents.handlers.logsink import configure_logging  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(256, 384), nn.ReLU(), nn.Linear(384, 10))


def _loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, seed: int,
          update: Callable[[list[torch.Tensor]], None]) -> float:
    """CPU seconds of a bare training loop: gradients dropped, the loss backpropagated, ``update(params)``."""
    params = list(model.parameters())
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    began = time.process_time()
    for _ in range(epochs):
        for idx in torch.randperm(y.shape[0], generator=shuffle).split(batch):
            for p in params:
                p.grad = None
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            update(params)
    return time.process_time() - began


def _written_out(params: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(p.grad, alpha=-0.05)


def bare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, seed: int) -> float:
    """The hand-written loop of bench_vs_loop (workload.py): gradients dropped, the SGD update written out."""
    return _loop(model, x, y, epochs, batch, seed, _written_out)


def bare_optim(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, seed: int) -> float:
    """The same loop stepping ``torch.optim.SGD`` (built as fedevents builds it): what the optimizer costs."""
    optimizer = build_optimizer({"name": "sgd", "lr": 0.05}, model.parameters())
    return _loop(model, x, y, epochs, batch, seed, lambda params: optimizer.step())


def fedevents(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, seed: int) -> float:
    optimizer = build_optimizer({"name": "sgd", "lr": 0.05}, model.parameters())
    # Each batch goes the way a client's training takes it in a run (federated/worker.py): the model's output
    # read as logits and features, the criterion_opts loss, then the method's batch_loss hook (FedAvg's
    # leaves the loss as it is).
    criterion = build_loss({"name": "cross_entropy"}, None)

    def batch_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model_output(model(xb))
        return Method.batch_loss(None, None, xb, yb, out, criterion(out.logits, out.features, yb)), out.logits

    began = time.process_time()
    train_local(model, optimizer, None, None, x, y, epochs=epochs, batch_size=batch,
                shuffle=torch.Generator().manual_seed(seed), batch_loss=batch_loss)
    return time.process_time() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=640)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    # train_local logs a line per epoch: configured as in a run without a console (a JSON line to a file).
    configure_logging(open(os.devnull, "w"), console=None)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.samples, 1, 16, 16, generator=gen)
    y = torch.randint(0, 10, (args.samples,), generator=gen)
    steps = args.epochs * -(-args.samples // 32)
    contenders = {"bare": bare, "bare + torch.optim.SGD": bare_optim, "fedevents": fedevents}
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for repeat in range(args.repeats + 1):
        models = {}
        order = list(contenders)[repeat % 3:] + list(contenders)[:repeat % 3]  # each goes first in turn
        for name in order:
            models[name] = _model()
            took = contenders[name](models[name], x, y, args.epochs, 32, seed=repeat)
            if repeat:  # the first round warms all up
                times[name].append(took / steps)
        first = models["bare"]
        if not all(all(torch.equal(a, b) for a, b in zip(first.parameters(), m.parameters())) for m in models.values()):
            raise SystemExit("the loops ended with different weights: they did not do the same arithmetic")
    print(f"machine: {describe()}")
    print(f"{steps} SGD steps per run, {args.repeats} interleaved runs each; median (best)\n")
    print("| loop | CPU ms per step |")
    print("|---|---:|")
    for name, runs in times.items():
        print(f"| {name} | {statistics.median(runs) * 1e3:.3f} ({min(runs) * 1e3:.3f}) |")
    for base in ("bare", "bare + torch.optim.SGD"):
        ratio = statistics.median(f / b for f, b in zip(times["fedevents"], times[base]))
        print(f"\nper-step overhead of train_local against {base}: {(ratio - 1) * 100:+.1f} % "
              "(median of per-run ratios)")

if __name__ == "__main__":
    main()
