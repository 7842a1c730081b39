"""Prototype rehearsal for FedSTIL: cached head inputs, the network after the head, and herded exemplars.

The *head* is the first module in execution order that trains as a whole (with a ReID net fine-tuning
``base.layer4``: layer4; ``base.layers.3``: a Swin trunk's last stage). Everything before it is frozen, so
its input for an image never changes: that input is the image's *prototype*. A round computes the prototypes
of its task once, then trains only the *tail* (the network from the head on, found by an FX trace that feeds
the head's input from a new graph input) on prototypes plus stored exemplars. Exemplars are kept in float16,
at most ``lambda_k`` per client.

The trace opens only modules that train in part: a frozen module or one that trains as a whole is one call,
so code inside it (a Swin block's shape arithmetic) is never traced. Cutting at a whole module, not at its
first layer, keeps what that module computes before its first layer (a block's shortcut, a Swin block's
trainable LayerNorm) in the tail, where it trains.
"""

from __future__ import annotations

import copy
import threading
from typing import Callable

import torch
from torch import fx, nn
from torch.nn import functional as F

from .adaptive import ComposedLayer
from .base import as_is
from .icarl import herding

__all__ = ["BATCH", "budgets", "prototypes", "split_tail", "herd_exemplars", "trace_network"]

#: Samples per forward pass when computing prototypes or herding features.
BATCH = 256
#: How exemplars are stored: half the bytes of float32; post-ReLU feature maps fit its range easily.
STORE_DTYPE = torch.float16


class _Tracer(fx.Tracer):
    """An FX tracer that opens only modules that train in part, so the head is one call found by name."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _trains(m) is not None or super().is_leaf_module(m, qualname)


def _trains(module: nn.Module) -> bool | None:
    """True if every parameter of ``module`` trains, False if none does (or it has none), None if some do."""
    flags = {p.requires_grad for p in module.parameters()}
    if len(flags) == 2:
        return None
    return flags == {True}


# FX patches torch.nn.Module's __call__ and __getattr__ for the whole process while it traces: a forward
# running in another thread meanwhile goes through the tracer and fails ("module is not installed as a
# submodule") or is recorded into the wrong graph. Traces therefore run one at a time, and a run traces once
# per worker, before its first job (``trace_network`` from ``Method.plan``), never beside a training.
_TRACE_LOCK = threading.Lock()


def trace_network(model: nn.Module) -> fx.Graph:
    """``model``'s forward in train mode as an FX graph, opened only at modules that train in part.

    The graph names modules and parameters by path, so it serves every model of the same network (one on
    the meta device, traced before any job, and each thread's own). Call it while no other thread runs a
    forward pass: FX patches torch for the whole process while it traces.
    """
    if not any(isinstance(m, ComposedLayer) for m in model.modules()):
        raise ValueError("fedstil: expected a model with a trainable Linear or Conv2d layer, found none")
    was_training = model.training
    model.train()
    try:
        with _TRACE_LOCK:
            return _Tracer().trace(model)
    except Exception as exc:  # FX raises several kinds (TraceError, TypeError) for code it cannot follow
        raise ValueError(f"fedstil: expected a model FX can trace through the modules that train in part, "
                         f"found {type(exc).__name__}: {exc}") from None
    finally:
        model.train(was_training)


def split_tail(model: nn.Module, network: fx.Graph | None = None) -> tuple[str, fx.GraphModule]:
    """The head's name and the network from the head on, as a module taking the head's input.

    ``network`` is ``trace_network`` of a model of the same network, taken earlier (it is copied, not
    changed); without it ``model`` is traced now. The tail shares ``model``'s parameters.
    """
    graph = copy.deepcopy(network) if network is not None else trace_network(model)
    head = next((n for n in graph.nodes if n.op == "call_module" and _trains(model.get_submodule(str(n.target)))),
                None)
    if head is None:
        raise ValueError("fedstil: expected a module that trains as a whole in the model's forward, found none")
    cut = head.args[0]
    first = next(iter(graph.nodes))
    with graph.inserting_before(first):
        feed = graph.placeholder("prototypes")
    # Every use of the head's input (a residual shortcut too) now reads the prototypes.
    cut.replace_all_uses_with(feed)
    tail = fx.GraphModule(model, graph)
    tail.graph.eliminate_dead_code()
    for node in [n for n in tail.graph.nodes if n.op == "placeholder" and n is not feed and not n.users]:
        tail.graph.erase_node(node)
    tail.delete_all_unused_submodules()
    tail.recompile()
    return str(head.target), tail


class _Stop(Exception):
    """Raised by the head's hook once its input is caught: nothing after the head needs to run."""


@torch.no_grad()
def prototypes(model: nn.Module, head: str, x: torch.Tensor,
               model_input: Callable[[torch.Tensor], torch.Tensor] = as_is, *,
               then: torch.Tensor | None = None) -> torch.Tensor:
    """The head's input for each sample of ``x``, from ``model`` in eval mode (float32, on the model's device).

    ``x`` may be in a stored form (8-bit images) that ``model_input`` turns into model input a batch at a
    time, so the whole task never exists as float images. The rows of ``then`` (stored exemplars), as
    float32, follow the prototypes in the same tensor, which is filled in place: one copy of each.
    """
    caught: list[torch.Tensor] = []

    def catch(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        caught.append(args[0].detach())
        raise _Stop

    extra = 0 if then is None else len(then)
    rows: torch.Tensor | None = None
    handle = model.get_submodule(head).register_forward_pre_hook(catch)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), BATCH):
            try:
                model(model_input(x[start:start + BATCH]))
            except _Stop:
                pass
            got = caught.pop()
            if rows is None:
                rows = torch.empty((len(x) + extra, *got.shape[1:]), dtype=torch.float32, device=got.device)
            rows[start:start + len(got)] = got
    finally:
        handle.remove()
        model.train(was_training)
    if rows is None:  # no samples: nothing gives the prototypes' shape
        empty = x[:0].float()
        return empty if not extra else torch.cat([empty, then.float()])
    if extra:
        if then.shape[1:] != rows.shape[1:]:
            raise ValueError(f"fedstil: expected stored exemplars of shape [*, {', '.join(map(str, rows.shape[1:]))}]"
                             f", found {list(then.shape)}")
        rows[len(x):] = then
    return rows


def budgets(ids: list[int], total: int) -> dict[int, int]:
    """Exemplars per identity: ``ceil(total / n)`` for the first ``total mod n`` ids, ``floor`` for the rest.

    So no identity gets more than ``ceil(total / n)`` and the client never holds more than ``total``.
    """
    ids = sorted(ids)
    if not ids:
        return {}
    low, extra = divmod(total, len(ids))
    return {pid: low + (1 if index < extra else 0) for index, pid in enumerate(ids)}


@torch.no_grad()
def _features(tail: nn.Module, protos: torch.Tensor) -> torch.Tensor:
    """The tail's eval-mode features of ``protos`` (its second output when it has two), L2-normalised."""
    was_training = tail.training
    tail.eval()
    try:
        outs = [tail(pb) for pb in protos.split(BATCH)]
    finally:
        tail.train(was_training)
    feats = torch.cat([out[1] if isinstance(out, tuple) else out for out in outs])
    return F.normalize(feats.flatten(1).float(), dim=1)


def herd_exemplars(
    tail: nn.Module,
    current: tuple[torch.Tensor, torch.Tensor],
    stored: tuple[torch.Tensor, torch.Tensor],
    seen: list[int],
    total: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new exemplar store: old identities keep a prefix of their herding order, current ones are herded.

    ``current`` is this round's (prototypes, ids); ``stored`` the exemplars so far (float16, int32), each
    identity's in herding order. Current identities are herded afresh over their prototypes and their old
    exemplars, on the tail's eval-mode features (normalised), without replacement.
    """
    protos, ids = current
    old_x, old_y = stored[0].to(protos.device), stored[1].to(protos.device)
    now = set(ids.tolist())
    # Features in two passes of the tail, not one per identity: current prototypes, old exemplars of current ids.
    redo = torch.isin(old_y, ids)
    feats = _features(tail, protos)
    old_feats = _features(tail, old_x[redo].float()) if bool(redo.any()) else feats[:0]
    old_redo_y = old_y[redo]
    kept_x, kept_y = [], []
    for pid, count in budgets(seen, total).items():
        if pid in now:
            candidates = torch.cat([protos[ids == pid], old_x[redo][old_redo_y == pid].float()])
            chosen = herding(torch.cat([feats[ids == pid], old_feats[old_redo_y == pid]]), count)
            candidates = candidates[chosen]
        else:
            candidates = old_x[old_y == pid]
        kept_x.append(candidates[:count].to(STORE_DTYPE))
        kept_y.append(torch.full((kept_x[-1].shape[0],), pid, dtype=torch.int32, device=protos.device))
    if not kept_x:
        return protos[:0].to(STORE_DTYPE), ids[:0].to(torch.int32)
    return torch.cat(kept_x), torch.cat(kept_y)
