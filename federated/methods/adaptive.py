"""Layers whose weight is composed from parts, and the model surgery that puts them in place.

FedSTIL, FedSTIL-atten and FedWeIT all replace every leaf ``nn.Linear`` / ``nn.Conv2d`` whose parameters are
all trainable (with a ReID net fine-tuning ``base.layer4`` and ``classifier``: layer4's convs and the
classifier) by a layer that computes its weight ``theta`` from a global part the server sends and local parts
the client trains. Each layer keeps the original layer's bias and call (stride, padding, dilation, groups),
so with ``theta`` equal to the original weight it computes exactly what the original layer did.

Frozen parts (the global weight, anchors, banks) are buffers, so they are in the state dict, never in the
optimizer, and never moved by weight decay.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..predictions import complement_scaled

__all__ = ["AdaptiveLayer", "BankLayer", "ComposedLayer", "WeitLayer", "adapt", "adaptive_layers", "expand_last",
           "layer_entries"]


def expand_last(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``vector`` (one value per index of ``like``'s last axis) shaped to broadcast against ``like``."""
    return vector.reshape((1,) * (like.dim() - 1) + (-1,))


class ComposedLayer(nn.Module):
    """A Linear or Conv2d whose weight is ``theta()``, composed by a subclass; bias and call as the original."""

    def __init__(self, layer: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.conv = None
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros":
                raise ValueError(f"adaptive layer: expected a conv with zero padding, found {layer.padding_mode!r}")
            self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def theta(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.theta()
        if self.conv is None:
            return F.linear(x, weight, self.bias)
        return F.conv2d(x, weight, self.bias, **self.conv)


class AdaptiveLayer(ComposedLayer):
    """FedSTIL's layer: ``theta = a * G + A`` with ``a`` broadcast along the weight's last axis.

    ``G`` (the global weight), the attention ``a`` and the anchors ``a0``, ``A0`` are buffers; only ``A`` and
    the bias train. ``reset`` starts a round: ``a = atten_default``, ``A = (1 - a) * G``, anchors = copies,
    so ``theta`` starts equal to ``G`` whatever ``atten_default`` is. With ``trainable_anchors`` (FedSTIL's
    runner, B11; ``exp_opts.legacy``) the anchors are parameters that train too, under the same names.

    Fixed anchors are always ``a0 = a`` and ``A0 = (1 - a0) * G`` (``a`` and ``G`` never train), so they are
    left out of the state dict and rebuilt from ``a`` and ``G`` whenever a state is loaded: a stored model
    costs two weight-sized tensors, not three. A state that holds them (saved by an earlier fedevents) loads
    too; its anchors are those same values and are rebuilt like the others.
    """

    def __init__(self, layer: nn.Linear | nn.Conv2d, atten_default: float, *, trainable_anchors: bool = False) -> None:
        super().__init__(layer)
        weight = layer.weight.detach()
        self.atten_default = atten_default
        self.register_buffer("G", weight.clone())
        self.register_buffer("a", torch.empty(weight.shape[-1], dtype=weight.dtype, device=weight.device))
        self.A = nn.Parameter(torch.empty_like(weight))
        for name, like in (("a0", self.a), ("A0", weight)):
            if trainable_anchors:
                self.register_parameter(name, nn.Parameter(torch.empty_like(like)))
            else:
                self.register_buffer(name, torch.empty_like(like), persistent=False)
        self.fixed_anchors = not trainable_anchors
        self.reset()

    @torch.no_grad()
    def reset(self, global_weight: torch.Tensor | None = None) -> None:
        """Take ``global_weight`` as ``G`` (when given) and restart ``a``, ``A`` and the anchors from it."""
        if global_weight is not None:
            self.G.copy_(global_weight)
        self.a.fill_(self.atten_default)
        self.A.copy_(complement_scaled(self.a, self.G))
        self.a0.copy_(self.a)
        self.A0.copy_(self.A)

    @torch.no_grad()
    def rebuild_anchors(self) -> None:
        """Set fixed anchors to what ``reset`` made them from this layer's ``a`` and ``G``."""
        self.a0.copy_(self.a)
        self.A0.copy_(complement_scaled(self.a0, self.G))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if self.fixed_anchors:
            # An earlier fedevents stored the fixed anchors; they are rebuilt below, like any state's.
            for name in ("a0", "A0"):
                state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.fixed_anchors:
            self.rebuild_anchors()

    def theta(self) -> torch.Tensor:
        return expand_last(self.a, self.G) * self.G + self.A

    def drift(self) -> torch.Tensor:
        """``||a0 - a||_1 + ||A0 - A||_1``, the L1 pull towards the round's starting point."""
        return (self.a0 - self.a).abs().sum() + (self.A0 - self.A).abs().sum()


class BankLayer(ComposedLayer):
    """FedSTIL-atten's layer: ``theta = sum_k alpha_k * G[..., k] + A`` over a bank of ``slots`` weights.

    The bank ``G`` and the anchors ``alpha0``, ``A0`` are buffers; ``alpha`` (one value per slot), ``A`` and
    the bias train, and ``A`` persists across rounds. The bank has a fixed number of slots, so the state dict
    and the optimizer keep their shapes whatever the number of clients; slot 0 starts as the layer's weight,
    the others as zeros, and ``A`` as ``(1 - alpha_0) * weight``, so ``theta`` starts equal to the weight.
    """

    def __init__(self, layer: nn.Linear | nn.Conv2d, atten_default: float, slots: int) -> None:
        super().__init__(layer)
        weight = layer.weight.detach()
        self.atten_default = atten_default
        bank = torch.zeros((*weight.shape, slots), dtype=weight.dtype, device=weight.device)
        bank[..., 0] = weight
        self.register_buffer("G", bank)
        self.alpha = nn.Parameter(torch.full((slots,), atten_default, dtype=weight.dtype, device=weight.device))
        self.A = nn.Parameter((1 - atten_default) * weight.clone())
        self.register_buffer("alpha0", self.alpha.detach().clone())
        self.register_buffer("A0", self.A.detach().clone())

    @torch.no_grad()
    def reset(self, bank: torch.Tensor | None = None) -> None:
        """Take ``bank`` (when given), restart ``alpha`` at ``atten_default`` and the anchors; ``A`` is kept."""
        if bank is not None:
            self.G.copy_(bank)
        self.alpha.fill_(self.atten_default)
        self.alpha0.copy_(self.alpha)
        self.A0.copy_(self.A)

    def theta(self) -> torch.Tensor:
        return (self.G * self.alpha).sum(-1) + self.A

    def drift(self) -> torch.Tensor:
        """``||alpha0 - alpha||_1 + ||A0 - A||_1``."""
        return (self.alpha0 - self.alpha).abs().sum() + (self.A0 - self.A).abs().sum()


class WeitLayer(ComposedLayer):
    """FedWeIT's layer: ``theta = m * sw + aw + sum_k atten_k * aw_kb[..., k]``, with hard thresholds.

    ``sw`` (the shared weight) and ``aw_kb`` (other clients' adaptive weights, ``kb_cnt`` slots) are buffers;
    the mask ``m`` (one value per output unit, starting at 0.5), ``aw``, ``atten`` and the bias train. ``aw``
    counts only where ``|aw| > l1_threshold`` and ``m`` only where ``|m| > mask_threshold``, in training and
    in evaluation alike, so the model scored is the model trained.
    """

    def __init__(self, layer: nn.Linear | nn.Conv2d, kb_cnt: int, l1_threshold: float, mask_threshold: float) -> None:
        super().__init__(layer)
        weight = layer.weight.detach()
        self.thresholds = (l1_threshold, mask_threshold)
        self.register_buffer("sw", weight.clone())
        self.register_buffer("aw_kb", torch.zeros((*weight.shape, kb_cnt), dtype=weight.dtype, device=weight.device))
        self.mask = nn.Parameter(torch.full((weight.shape[0],), 0.5, dtype=weight.dtype, device=weight.device))
        self.aw = nn.Parameter(torch.empty_like(weight))
        self.atten = nn.Parameter(torch.zeros(kb_cnt, dtype=weight.dtype, device=weight.device))
        self.reset()

    @torch.no_grad()
    def reset(self, sw: torch.Tensor | None = None, kb: torch.Tensor | None = None) -> None:
        """Take ``sw`` and ``kb`` (when given); restart ``aw = (1 - m) * sw`` and ``atten = 0``; ``m`` is kept."""
        if sw is not None:
            self.sw.copy_(sw)
        if kb is not None:
            self.aw_kb.copy_(kb)
        self.aw.copy_((1 - self._per_unit(self.mask)) * self.sw)
        self.atten.zero_()

    def _per_unit(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape((-1,) + (1,) * (self.sw.dim() - 1))

    def kept_aw(self) -> torch.Tensor:
        """``aw`` with entries at or below the L1 threshold set to zero."""
        return self.aw * (self.aw.abs() > self.thresholds[0])

    def kept_mask(self) -> torch.Tensor:
        """The mask with entries at or below the mask threshold set to zero."""
        return self.mask * (self.mask.abs() > self.thresholds[1])

    def theta(self) -> torch.Tensor:
        return self._per_unit(self.kept_mask()) * self.sw + self.kept_aw() + (self.aw_kb * self.atten).sum(-1)

    def sparsity(self) -> torch.Tensor:
        """``||aw||_1 + ||m||_1``, FedWeIT's sparsity term."""
        return self.aw.abs().sum() + self.mask.abs().sum()


def adapt(model: nn.Module, make: Callable[[nn.Linear | nn.Conv2d], nn.Module]) -> nn.Module:
    """Replace, in place, every leaf Linear/Conv2d whose parameters all train by ``make(layer)``; give ``model``.

    A model that has such layers replaced already is left as it is, so building a model twice is harmless.
    """
    targets = [
        (name, module) for name, module in model.named_modules()
        if name and type(module) in (nn.Linear, nn.Conv2d) and all(p.requires_grad for p in module.parameters())
    ]
    for name, module in targets:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, make(module))
    return model


def adaptive_layers(model: nn.Module) -> Iterator[tuple[str, ComposedLayer]]:
    """The composed layers of ``model`` with their names, in registration order."""
    for name, module in model.named_modules():
        if isinstance(module, ComposedLayer):
            yield name, module


def layer_entries(layers: Iterable[str], parts: Iterable[str]) -> Callable[[str], bool]:
    """A test of whether a state entry's name is one of ``parts`` of one of ``layers`` (``layer.part``)."""
    names = frozenset(f"{layer}.{part}" for layer in layers for part in parts)
    return names.__contains__
