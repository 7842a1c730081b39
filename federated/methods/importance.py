"""Per-parameter importances from per-sample gradients: the empirical Fisher (EWC, FedCurv) and MAS's
output sensitivity.

Both are means over samples of a function of one sample's gradient, so gradients are taken sample by
sample: squaring (or taking |.| of) a batch's mean gradient would give a different, smaller number. One
forward pass per batch of ``BATCH`` samples is differentiated for all its samples at once with
``autograd.grad(..., is_grads_batched=True)``. The pass runs in train mode, the mode in which every model
here gives logits (a ReID net gives only its embedding in eval mode); BatchNorm statistics the pass would
update are put back afterwards, so the model leaves exactly as it came.

In train mode BatchNorm ties a batch's samples together, so each sample's gradient needs a backward pass
through the whole batch: the per-sample Fisher costs a batch's backward pass per sample. ``fisher: batch``
(FedSTIL's form) squares each batch's mean gradient instead, one backward pass per batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from .base import ModelOutput

__all__ = ["BATCH", "FISHER_FORMS", "fisher_diagonal", "fisher_form", "output_sensitivity", "per_sample_mean"]

#: Samples per forward pass when computing importances.
BATCH = 64
#: Per-sample gradient elements held at once; a batch's samples are differentiated in chunks below this.
GRADIENT_BUDGET = 1 << 25

Forward = Callable[[torch.Tensor], ModelOutput]
#: ``(x, y) -> one scalar per sample``, the quantity whose per-sample gradients are reduced.
Scalars = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: The ways of measuring the Fisher diagonal (``method_opts.fisher``); the first is the default.
FISHER_FORMS = ("per_sample", "batch")


def fisher_form(options: Mapping[str, Any], *, method: str) -> str:
    """``method_opts.fisher``, checked: a one-line ValueError names the forms and the value."""
    value = options.get("fisher", FISHER_FORMS[0])
    if value not in FISHER_FORMS:
        raise ValueError(f"method_opts.fisher: expected one of {', '.join(FISHER_FORMS)} for {method}, "
                         f"found {value!r}")
    return value


def fisher_diagonal(model: nn.Module, forward: Forward, x: torch.Tensor, y: torch.Tensor, *,
                    batches: int | None = None, form: str = "per_sample") -> dict[str, torch.Tensor]:
    """The empirical Fisher diagonal by parameter name: with ``form`` per_sample, the mean over samples of
    (d log p(y | x) / dw)^2; with ``form`` batch, FedSTIL's estimate of it, the mean over batches of
    ``n_b * g_b^2``, ``g_b`` the gradient of batch b's mean log-likelihood and ``n_b`` its sample count.

    ``y`` is the true label; ``batches`` caps the samples used at ``batches * BATCH`` (evenly spaced).
    """
    def log_likelihood(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(forward(xb).logits, dim=1).gather(1, yb[:, None]).squeeze(1)

    if form == "batch":
        return _batch_fisher(model, log_likelihood, x, y, batches)
    return per_sample_mean(model, log_likelihood, x, y, torch.square, batches=batches)


def _batch_fisher(model: nn.Module, scalars: Scalars, x: torch.Tensor, y: torch.Tensor,
                  batches: int | None) -> dict[str, torch.Tensor]:
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    totals = [torch.zeros_like(p, requires_grad=False) for p in params]
    x, y = _subset(x, y, batches)
    spans = _spans(int(y.shape[0])) if y.shape[0] else []
    if params:
        with _training_pass(model):
            for start, stop in spans:
                grads = torch.autograd.grad(scalars(x[start:stop], y[start:stop]).mean(), params, allow_unused=True)
                for total, grad in zip(totals, grads):
                    if grad is not None:
                        total += grad.square() * (stop - start)
    return {name: total / max(len(spans), 1) for (name, _), total in zip(named, totals)}


def output_sensitivity(model: nn.Module, forward: Forward, x: torch.Tensor, y: torch.Tensor, *,
                       batches: int | None = None) -> dict[str, torch.Tensor]:
    """MAS's importances: the mean over samples of |d ||f(x)||_2^2 / dw|, f(x) the logits, by parameter name."""
    def squared_norm(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return forward(xb).logits.flatten(1).pow(2).sum(1)

    return per_sample_mean(model, squared_norm, x, y, torch.abs, batches=batches)


def per_sample_mean(model: nn.Module, scalars: Scalars, x: torch.Tensor, y: torch.Tensor,
                    reduce: Callable[[torch.Tensor], torch.Tensor], *,
                    batches: int | None = None) -> dict[str, torch.Tensor]:
    """The mean over samples of ``reduce(d scalars(x_n, y_n) / dw)``, for each trainable parameter by name.

    No samples give zeros. ``scalars`` must call the same ``model`` whose parameters are differentiated.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    totals = [torch.zeros_like(p, requires_grad=False) for p in params]
    x, y = _subset(x, y, batches)
    count = int(y.shape[0])
    if count and params:
        chunk = max(1, GRADIENT_BUDGET // sum(p.numel() for p in params))
        with _training_pass(model):
            for start, stop in _spans(count):
                _accumulate(totals, params, scalars(x[start:stop], y[start:stop]), reduce, chunk)
    return {name: total / max(count, 1) for (name, _), total in zip(named, totals)}


def _accumulate(totals: list[torch.Tensor], params: list[torch.Tensor], values: torch.Tensor,
                reduce: Callable[[torch.Tensor], torch.Tensor], chunk: int) -> None:
    # Row n of the identity picks sample n, so one batched backward gives every sample's own gradient.
    picks = torch.eye(values.shape[0], dtype=values.dtype, device=values.device).split(chunk)
    for i, pick in enumerate(picks):
        grads = torch.autograd.grad(values, params, grad_outputs=pick, is_grads_batched=True,
                                    retain_graph=i < len(picks) - 1, allow_unused=True)
        for total, grad in zip(totals, grads):
            if grad is not None:  # a parameter the scalar does not depend on has importance 0
                total += reduce(grad).sum(0)


def _subset(x: torch.Tensor, y: torch.Tensor, batches: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    count = int(y.shape[0])
    if batches is None or count <= batches * BATCH:
        return x, y
    # Evenly spaced rather than the first samples: task data may be sorted by class.
    keep = torch.arange(batches * BATCH, device=y.device) * count // (batches * BATCH)
    return x[keep], y[keep]


def _spans(count: int) -> list[tuple[int, int]]:
    """Batch bounds of ``BATCH`` samples; a lone last sample joins the batch before it (BatchNorm needs two)."""
    stops = list(range(BATCH, count, BATCH)) + [count]
    if len(stops) > 1 and stops[-1] - stops[-2] == 1:
        del stops[-2]
    return list(zip([0] + stops[:-1], stops))


@contextmanager
def _training_pass(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    saved = [buffer.detach().clone() for buffer in model.buffers()]
    model.train()
    try:
        with torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)
        model.train(was_training)
