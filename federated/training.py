"""Local training and validation: optimizer, scheduler and criterion from options, and the plain loops.

The loops index the client's tensors with a shuffled permutation instead of a DataLoader, and keep running
sums on the device, so a batch costs what a hand-written torch loop costs (one host sync per epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import structlog
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LRScheduler, StepLR

from .lazydynamo import prepare_optimizer_class
from .registry import Catalogue, Component, is_target, load_target
from .progress import report_epoch
from .sgdstep import step_of

__all__ = [
    "OPTIMIZERS",
    "SCHEDULERS",
    "CRITERIA",
    "OPTIMIZER_CATALOGUE",
    "SCHEDULER_CATALOGUE",
    "Scores",
    "build_optimizer",
    "build_scheduler",
    "EarlyStop",
    "build_criterion",
    "direct_call",
    "train_local",
    "evaluate",
]

#: Built-in optimizers and schedulers with their options and defaults: the one list the config asks.
OPTIMIZER_OPTIONS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 0.05, "weight_decay": 0.0},
    "sgd": {"lr": 0.05, "momentum": 0.0, "weight_decay": 0.0},
}
SCHEDULER_OPTIONS: dict[str, dict[str, Any]] = {
    "cosine": {"t_max": 10},
    "none": {},
    "step_lr": {"step_size": 10, "gamma": 0.5},
}
OPTIMIZERS = tuple(sorted(OPTIMIZER_OPTIONS))
SCHEDULERS = tuple(sorted(SCHEDULER_OPTIONS))
CRITERIA = ("cross_entropy",)


def _subclass_of(base: type, what: str) -> Callable[[Any], str | None]:
    return lambda obj: None if isinstance(obj, type) and issubclass(obj, base) else what


#: ``optimizer_opts.name``: a built-in, or a user's torch.optim.Optimizer subclass as "package.module:Name",
#: built as ``Name(params, **options)`` and declaring its options in a ``defaults`` class mapping.
OPTIMIZER_CATALOGUE = Catalogue(
    "optimizers", lambda: {n: Component(n, o) for n, o in OPTIMIZER_OPTIONS.items()},
    _subclass_of(torch.optim.Optimizer, "a subclass of torch.optim.Optimizer"))
#: ``scheduler_opts.name``: a built-in, or a user's LRScheduler subclass, built as ``Name(optimizer, **options)``.
SCHEDULER_CATALOGUE = Catalogue(
    "schedulers", lambda: {n: Component(n, o) for n, o in SCHEDULER_OPTIONS.items()},
    _subclass_of(LRScheduler, "a subclass of torch.optim.lr_scheduler.LRScheduler"))


def _number(opts: Mapping[str, Any], key: str, where: str, *, positive: bool = True, whole: bool = False) -> Any:
    """``opts[key]`` checked: a finite number (> 0, or >= 0 unless ``positive``), whole if asked."""
    value = opts[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0) and (not whole or float(value).is_integer())
    if not ok:
        kind = "an integer" if whole else "a number"
        raise ValueError(f"{where}.{key}: expected {kind} {'> 0' if positive else '>= 0'}, found {value!r}")
    return int(value) if whole else float(value)


def _user_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    # ``keep_state`` is fedevents' own (whether the optimizer's state outlives a round), not the class's.
    return {key: value for key, value in opts.items() if key not in ("name", "keep_state")}

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
    if name in OPTIMIZER_OPTIONS:
        opts = {**OPTIMIZER_OPTIONS[name], **opts}
        lr = _number(opts, "lr", "optimizer_opts")
        decay = _number(opts, "weight_decay", "optimizer_opts", positive=False)
        cls = torch.optim.SGD if name == "sgd" else torch.optim.Adam
        prepare_optimizer_class(cls)
        if name == "sgd":
            momentum = _number(opts, "momentum", "optimizer_opts", positive=False)
            return cls(params, lr=lr, momentum=momentum, weight_decay=decay)
        return cls(params, lr=lr, weight_decay=decay)
    if isinstance(name, str) and is_target(name):
        return _build_user(name, OPTIMIZER_CATALOGUE, "optimizer_opts", params, opts)
    raise ValueError(f"optimizer_opts.name: expected one of {', '.join(OPTIMIZERS)}, found {name!r}")


def build_scheduler(opts: Mapping[str, Any], optimizer: torch.optim.Optimizer) -> LRScheduler | None:
    """Build the scheduler ``scheduler_opts`` names; it steps once per local epoch of one client."""
    name = opts.get("name")
    if name in SCHEDULER_OPTIONS:
        opts = {**SCHEDULER_OPTIONS[name], **opts}
    if name == "none":
        return None
    if name == "step_lr":
        step = _number(opts, "step_size", "scheduler_opts", whole=True)
        return StepLR(optimizer, step_size=step, gamma=_number(opts, "gamma", "scheduler_opts"))
    if name == "cosine":
        return CosineAnnealingLR(optimizer, T_max=_number(opts, "t_max", "scheduler_opts", whole=True))
    if isinstance(name, str) and is_target(name):
        return _build_user(name, SCHEDULER_CATALOGUE, "scheduler_opts", optimizer, opts)
    raise ValueError(f"scheduler_opts.name: expected one of {', '.join(SCHEDULERS)}, found {name!r}")


def _build_user(name: str, catalogue: Catalogue, where: str, first: Any, opts: Mapping[str, Any]) -> Any:
    """A user's optimizer or scheduler class (imported when the config was checked), built with its options."""
    cls = load_target(name)
    problem = catalogue.check(cls)
    if problem:
        raise ValueError(f"{where}.name: expected {problem}, found {name}")
    prepare_optimizer_class(cls)
    try:
        return cls(first, **_user_options(opts))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {name}(**{_user_options(opts)!r}) failed: {type(exc).__name__}: {exc}") from None


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
    patience: int | None = None,
) -> Scores:
    """Train ``model`` for ``epochs`` passes over ``(x, y)``; give mean loss and accuracy over all samples seen.

    ``patience`` (``exp_opts.legacy``: 3) stops as FedSTIL's runner did: an epoch that neither lowers the
    loss nor keeps the accuracy at its best counts against it, one that does both resets the count, and
    the epoch that brings it to ``patience`` still trains but is not counted in ``samples``; the loss and
    accuracy given are then those of the last epoch run, as the runner logged them.

    Each batch's loss is ``criterion(model(xb), yb)``, or ``batch_loss(xb, yb) -> (loss, logits)`` when
    given (a method's penalty, a model with two outputs). ``augment(xb, generator)`` transforms each
    training batch. ``shuffle`` is a CPU generator; each epoch draws its permutation from it, so the batch
    order is fixed by the seed alone.
    """
    if batch_loss is None:
        if criterion is None:
            raise ValueError("train_local: expected a criterion or a batch_loss, found neither")

        loss_of = direct_call(criterion)

        def batch_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(xb)
            return loss_of(logits, yb), logits

    model.train()
    count = y.shape[0]
    total_loss = total_correct = 0.0
    stop = EarlyStop(patience) if patience is not None else None
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
        if stop is not None and stop.ends(epoch_loss / count, epoch_correct / count):
            break
    _drop_gradients(optimizer)
    if stop is not None:
        return Scores(samples=count * stop.counted, loss=epoch_loss / count, acc=epoch_correct / count)
    seen = count * epochs
    return Scores(samples=seen, loss=total_loss / seen, acc=total_correct / seen)


def _drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``: gradients would otherwise keep a model-sized buffer alive in a
    model that is reused. Done directly unless the optimizer's class has its own ``zero_grad``: torch's opens a
    profiler range on every call, about 0.3 ms per training of a small model (issue 12: per-client cost)."""
    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def direct_call(criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``criterion`` as the function its module would call, where that is certain to compute the same.

    A plain ``nn.CrossEntropyLoss`` without hooks calls ``F.cross_entropy`` with its attributes; calling that
    directly skips ``Module.__call__``, about 4 % of a small model's SGD step (issue 12: per-step overhead).
    Anything else (a subclass, a module with hooks, a user's loss) is called as it is.
    """
    plain = (type(criterion) is nn.CrossEntropyLoss and not criterion._forward_hooks
             and not criterion._forward_pre_hooks and not _global_module_hooks())
    if not plain:
        return criterion
    weight, ignore, reduction, smoothing = (criterion.weight, criterion.ignore_index, criterion.reduction,
                                            criterion.label_smoothing)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore, reduction=reduction,
                               label_smoothing=smoothing)

    return loss


def _global_module_hooks() -> bool:
    from torch.nn.modules import module as _module  # where torch keeps hooks registered for every module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


class EarlyStop:
    """FedSTIL's runner's early stop inside a local round (FEDSTIL.md section 3.1), for ``exp_opts.legacy``."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_loss, self.best_acc = float("inf"), 0.0
        self.waited = 0
        #: Epochs that count (the runner's ``train_cnt``): every epoch run but the one that stops the round.
        self.counted = 0

    def ends(self, loss: float, acc: float) -> bool:
        """Take one epoch's loss and accuracy; True if the round stops after it."""
        self.waited += 1
        if loss <= self.best_loss and acc >= self.best_acc:
            self.best_loss, self.best_acc, self.waited = loss, acc, 0
        if self.waited >= self.patience:
            return True
        self.counted += 1
        return False


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
    predicted = torch.empty(order.shape, device=x.device, dtype=torch.long)
    # zero_grad(set_to_none=True) without the profiler range torch opens around it on every call.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step = step_of(optimizer)  # a plain SGD's arithmetic without torch's wrappers around each call
    for batch, guesses in zip(order.split(batch_size), predicted.split(batch_size)):
        xb = x[batch]
        if augment is not None:
            xb = augment(xb, augment_generator)
        for p in params:
            p.grad = None
        loss, logits = batch_loss(xb, y[batch])
        loss.backward()
        step()
        # Sums stay on the device: reading them per batch would stall a GPU on every step. The loss is summed
        # batch by batch (the record's float sums, in their order); the predictions are kept and compared with
        # the labels once per epoch, one kernel per batch instead of four (issue 12: per-step overhead).
        loss_sum.add_(loss.detach(), alpha=batch.numel())
        torch.argmax(logits.detach(), 1, out=guesses)
    correct = (predicted == y[order]).sum()
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
