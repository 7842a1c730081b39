"""One SGD step without torch's per-call machinery, where that is certain to compute what ``step()`` computes.

``torch.optim.SGD.step()`` wraps each call in a grad-mode switch, a step counter and hook checks, collects
each group's parameters and gradients into lists, and picks a kernel family from them (single-tensor,
foreach or fused) on every call. On a small model on the CPU that is several percent of the SGD step
(issue 12: per-step overhead; benchmarks/bench_step.py, docs/benchmarks.md). ``step_of(optimizer)`` gives
a step that runs the arithmetic of torch's single-tensor SGD directly — the path torch itself takes for
parameters on the CPU — and falls back to ``optimizer.step`` for anything else.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import SGD, Optimizer
from torch.optim import optimizer as _optimizer_module

from .lazydynamo import STEP_WRAPPERS

__all__ = ["step_of"]

#: The function torch's ``SGD.step`` runs, under the wrappers torch (and fedevents) put around it.
_TORCH_SGD_STEP = inspect.unwrap(SGD.step)
#: torch's registries of step hooks for every optimizer (``register_optimizer_step_pre_hook`` and post).
_GLOBAL_HOOKS = (getattr(_optimizer_module, "_global_optimizer_pre_hooks", None),
                 getattr(_optimizer_module, "_global_optimizer_post_hooks", None))
_GROUP_KEYS = ("params", "lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


def step_of(optimizer: Optimizer) -> Callable[[], Any]:
    """What to call for one step of ``optimizer``: ``optimizer.step`` itself, or for a plain SGD on the CPU
    the same arithmetic written out (``_written_out_sgd``).

    Plain means: exactly ``torch.optim.SGD`` with the class's own ``step`` (torch's, or fedevents' lazy-dynamo
    wrapper of it), no ``step`` patched on the instance (an LR scheduler's call counter does that), no step
    hooks of its own or global ones, no AMP scaling attributes, and every group on the single-tensor path:
    all parameters plain CPU tensors, ``foreach``/``fused``/``differentiable`` not set. Anything else, and any
    step taken while torch's profiler records or with a tensor ``lr`` or ``weight_decay``, goes through
    ``optimizer.step()`` unchanged.
    """
    if not _plain(optimizer):
        return optimizer.step
    return _written_out_sgd(optimizer)


def _plain(optimizer: Optimizer) -> bool:
    cls = type(optimizer)
    if cls is not SGD or "step" in vars(optimizer):
        return False
    if not _is_torch_sgd_step(cls.step):
        return False
    if any(hooks is None or hooks for hooks in _GLOBAL_HOOKS):
        return False
    if (getattr(optimizer, "_optimizer_step_pre_hooks", None) or getattr(optimizer, "_optimizer_step_post_hooks", None)
            or getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None):
        return False
    for group in optimizer.param_groups:
        if any(key not in group for key in _GROUP_KEYS):
            return False
        if group.get("foreach") or group.get("fused") or group.get("differentiable"):
            return False
        for p in group["params"]:
            if type(p) is not torch.nn.Parameter and type(p) is not Tensor or p.device.type != "cpu":
                return False
    return True


def _is_torch_sgd_step(step: Any) -> bool:
    """True if ``step`` is torch's SGD step under none but torch's and fedevents' own wrappers (not a user's,
    which ``functools.wraps`` gives the attributes of the function it wraps, but not its code)."""
    while step is not _TORCH_SGD_STEP:
        known = getattr(step, "__code__", None) in STEP_WRAPPERS
        step = getattr(step, "__wrapped__", None)
        if not known or step is None:
            return False
    return True


def _written_out_sgd(optimizer: Optimizer) -> Callable[[], Any]:
    """``torch.optim.sgd._single_tensor_sgd`` over each group, state kept where torch keeps it.

    Same operations in the same order: the gradient negated under ``maximize``, ``grad + weight_decay * p``,
    the momentum buffer cloned from the first gradient and then ``buf * momentum + (1 - dampening) * grad``,
    Nesterov's ``grad + momentum * buf``, and ``p - lr * grad``; parameters without a gradient are skipped.
    """
    groups, state = optimizer.param_groups, optimizer.state
    profiling = torch.autograd._profiler_enabled

    def step() -> None:
        # Under a profiler the step is recorded as torch labels it; tensor hyperparameters take torch's own
        # scalar handling.
        if profiling() or any(isinstance(g["lr"], Tensor) or isinstance(g["weight_decay"], Tensor) for g in groups):
            optimizer.step()
            return
        with torch.no_grad():
            for group in groups:
                lr, decay = group["lr"], group["weight_decay"]
                momentum, dampening = group["momentum"], group["dampening"]
                nesterov, maximize = group["nesterov"], group["maximize"]
                for p in group["params"]:
                    grad = p.grad
                    if grad is None:
                        continue
                    if maximize:
                        grad = -grad
                    if decay != 0:
                        grad = grad.add(p, alpha=decay)
                    if momentum != 0:
                        slot = state[p]
                        buf = slot.get("momentum_buffer")
                        if buf is None:
                            buf = slot["momentum_buffer"] = grad.detach().clone()
                        else:
                            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                        grad = grad.add(buf, alpha=momentum) if nesterov else buf
                    p.add_(grad, alpha=-lr)

    return step
