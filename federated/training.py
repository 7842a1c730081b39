"""Local training and validation: optimizer, scheduler and criterion from options, and the plain loops.

The loops index the client's tensors with a shuffled permutation instead of a DataLoader, and keep running
sums on the device, so a batch costs what a hand-written torch loop costs (one host sync per epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import structlog
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR

from .progress import report_epoch

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "CRITERIA",
    "Scores",
    "build_optimizer",
    "build_scheduler",
    "build_criterion",
    "train_local",
    "evaluate",
]

OPTIMIZERS = ("adam", "sgd")
SCHEDULERS = ("cosine", "none", "step_lr")
CRITERIA = ("cross_entropy",)

_log = structlog.get_logger("fedevents.federated")

#: ``(xb, yb) -> (loss, logits)``: one training batch's loss and the logits its accuracy is read from.
BatchLoss = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True, slots=True)
class Scores:
    """Mean loss and accuracy over ``samples`` samples."""

    samples: int
    loss: float
    acc: float


def build_optimizer(opts: Mapping[str, Any], params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Build the optimizer ``optimizer_opts`` names."""
    name = opts.get("name")
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=opts["lr"], momentum=opts.get("momentum", 0.0), weight_decay=opts.get("weight_decay", 0.0)
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=opts["lr"], weight_decay=opts.get("weight_decay", 0.0))
    raise ValueError(f"optimizer_opts.name: expected one of {', '.join(OPTIMIZERS)}, found {name!r}")


def build_scheduler(opts: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> LRScheduler | None:
    """Build the scheduler ``scheduler_opts`` names; it steps once per local epoch of one client."""
    name = opts.get("name")
    if name == "none":
        return None
    if name == "step_lr":
        return StepLR(optimizer, step_size=opts["step_size"], gamma=opts["gamma"])
    if name == "cosine":
        return CosineAnnealingLR(optimizer, T_max=opts["t_max"])
    raise ValueError(f"scheduler_opts.name: expected one of {', '.join(SCHEDULERS)}, found {name!r}")


def build_criterion(opts: Mapping[str, Any]) -> nn.Module:
    """Build the training loss ``criterion_opts`` names (``epsilon`` is label smoothing)."""
    name = opts.get("name")
    if name == "cross_entropy":
        return nn.CrossEntropyLoss(label_smoothing=float(opts.get("epsilon", 0.0)))
    raise ValueError(f"criterion_opts.name: expected one of {', '.join(CRITERIA)}, found {name!r}")


def train_local(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    shuffle: torch.Generator,
    batch_loss: BatchLoss | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    augment_generator: torch.Generator | None = None,
) -> Scores:
    """Train ``model`` for ``epochs`` passes over ``(x, y)``; give mean loss and accuracy over all samples seen.

    Each batch's loss is ``criterion(model(xb), yb)``, or ``batch_loss(xb, yb) -> (loss, logits)`` when
    given (a method's penalty, a model with two outputs). ``augment(xb, generator)`` transforms each
    training batch. ``shuffle`` is a CPU generator; each epoch draws its permutation from it, so the batch
    order is fixed by the seed alone.
    """
    if batch_loss is None:
        if criterion is None:
            raise ValueError("train_local: expected a criterion or a batch_loss, found neither")

        def batch_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(xb)
            return criterion(logits, yb), logits

    model.train()
    count = y.shape[0]
    total_loss = total_correct = 0.0
    for epoch in range(epochs):
        order = torch.randperm(count, generator=shuffle).to(x.device, non_blocking=True)
        loss_sum, correct = _epoch(optimizer, batch_loss, x, y, order, batch_size, augment, augment_generator)
        if scheduler is not None:
            scheduler.step()
        epoch_loss, epoch_correct = loss_sum.item(), correct.item()
        _log.info("epoch finished", epoch=epoch, loss=epoch_loss / count, acc=epoch_correct / count)
        report_epoch(epoch + 1, epochs)
        total_loss += epoch_loss
        total_correct += epoch_correct
    # Gradients would otherwise keep a model-sized buffer alive in a model that is reused.
    optimizer.zero_grad(set_to_none=True)
    seen = count * epochs
    return Scores(samples=seen, loss=total_loss / seen, acc=total_correct / seen)


def _epoch(
    optimizer: torch.optim.Optimizer,
    batch_loss: BatchLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
    augment_generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for batch in order.split(batch_size):
        xb, yb = x[batch], y[batch]
        if augment is not None:
            xb = augment(xb, augment_generator)
        optimizer.zero_grad(set_to_none=True)
        loss, logits = batch_loss(xb, yb)
        loss.backward()
        optimizer.step()
        # Sums stay on the device: reading them per batch would stall a GPU on every step.
        loss_sum.add_(loss.detach(), alpha=batch.numel())
        correct += (logits.detach().argmax(1) == yb).sum()
    return loss_sum, correct


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024) -> Scores:
    """Score ``model`` on ``(x, y)`` in eval mode without gradients: plain cross-entropy and accuracy."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    with torch.inference_mode():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            logits = model(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    count = y.shape[0]
    return Scores(samples=count, loss=loss_sum.item() / count, acc=correct.item() / count)
