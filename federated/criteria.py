"""ReID training losses: label-smoothed identity cross-entropy, triplet, and their weighted sum.

Names are FedSTIL's: ``cross_entropy`` and ``triplet_loss`` (``triplet`` is kept as another name of it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from .registry import Catalogue, Component, is_target, load_target

__all__ = [
    "REID_CRITERIA",
    "CATALOGUE",
    "LabelSmoothingCrossEntropy",
    "ReidCriterion",
    "ReidLoss",
    "TripletLoss",
    "build_reid_criterion",
]

#: Each criterion's options and defaults (``weight`` scales its term in the sum). A triplet's margin has no
#: default: FedSTIL's None crashes, so a file must say which margin it means (0 is the soft margin).
CRITERION_OPTIONS: dict[str, dict[str, Any]] = {
    "cross_entropy": {"epsilon": 0.0, "num_classes": None, "weight": 1.0},
    "triplet_loss": {"margin": None, "hard_mining": True, "norm_feat": False, "weight": 1.0},
}
CRITERION_OPTIONS["triplet"] = CRITERION_OPTIONS["triplet_loss"]
REID_CRITERIA = tuple(sorted(CRITERION_OPTIONS))


def _user_loss(obj: Any) -> str | None:
    return None if isinstance(obj, type) and issubclass(obj, nn.Module) else "a subclass of torch.nn.Module"


class _UserCriterion(Catalogue):
    """Criteria: a user's loss also takes ``weight``, which the sum reads, besides its own ``defaults``."""

    def describe(self, name: str, config_dir: Any = None) -> Component:
        found = super().describe(name, config_dir)
        if found.target is None:
            return found
        return Component(found.name, {**found.options, "weight": 1.0}, found.aliases, found.tags, found.target)


#: ``criterion_opts[].name``: the built-in losses, or a user's torch.nn.Module subclass as "package.module:Name",
#: built as ``Name(**options)`` (less ``name`` and ``weight``) and called as ``loss(logits, features, targets)``.
CATALOGUE = _UserCriterion("criteria", lambda: {n: Component(n, o) for n, o in CRITERION_OPTIONS.items()}, _user_loss)


class ReidLoss(Protocol):
    """What a ReID loss is called with: the classifier's logits, the pooled features and the identities."""

    def __call__(self, logits: torch.Tensor, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


class LabelSmoothingCrossEntropy(nn.Module):
    """Cross-entropy against targets smoothed towards uniform: (1 - eps) * CE + eps * mean_k(-log p_k).

    ``num_classes`` None takes the class count from the logits; otherwise a mismatch is an error, since it
    means the classifier and the data disagree on how many identities there are.
    """

    def __init__(self, num_classes: int | None, epsilon: float) -> None:
        super().__init__()
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon: expected a number in [0, 1], found {epsilon!r}")
        self.num_classes = num_classes
        self.epsilon = float(epsilon)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.num_classes is not None and logits.shape[-1] != self.num_classes:
            raise ValueError(f"expected logits for {self.num_classes} classes, found {logits.shape[-1]}")
        log_p = F.log_softmax(logits, dim=-1)
        hard = -log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        uniform = -log_p.mean(dim=-1)
        return ((1.0 - self.epsilon) * hard + self.epsilon * uniform).mean()


class TripletLoss(nn.Module):
    """Triplet loss on Euclidean distances: batch-hard (Hermans et al., 2017) or softmax-weighted mining.

    With ``hard_mining`` each sample is an anchor against its farthest same-identity sample and its nearest
    other-identity one; without, against the softmax-weighted mean of its positives' distances (far ones
    weigh more) and of its negatives' (near ones weigh more), as FedSTIL's ``hard_mining: false`` does.
    ``norm_feat`` L2-normalises the features first. The loss is ``mean(relu(d_ap - d_an + margin))``, or
    the soft margin ``mean(softplus(d_ap - d_an))`` when ``margin`` is 0. Anchors with no positive (other
    than themselves) or no negative in the batch are left out; a batch with no usable anchor gives a zero
    that still backpropagates.
    """

    def __init__(self, margin: float, *, hard_mining: bool = True, norm_feat: bool = False) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin: expected a number >= 0, found {margin!r}")
        self.margin = float(margin)
        self.hard_mining = bool(hard_mining)
        self.norm_feat = bool(norm_feat)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.norm_feat:
            features = F.normalize(features, dim=1)
        dist = _euclidean(features)
        same = targets.unsqueeze(0) == targets.unsqueeze(1)
        self_pair = torch.eye(len(targets), dtype=torch.bool, device=features.device)
        positive = same & ~self_pair
        negative = ~same
        usable = positive.any(1) & negative.any(1)
        if not usable.any():
            return (features * 0.0).sum()
        if self.hard_mining:
            # Masked entries are pushed out of reach of max (for positives) and min (for negatives).
            d_ap = dist.masked_fill(~positive, float("-inf")).amax(1)[usable]
            d_an = dist.masked_fill(~negative, float("inf")).amin(1)[usable]
        else:
            d_ap = _softmax_mean(dist, positive)[usable]
            d_an = _softmax_mean(-dist, negative)[usable].neg()
        if self.margin == 0.0:
            return F.softplus(d_ap - d_an).mean()
        return F.relu(d_ap - d_an + self.margin).mean()


def _softmax_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the mean of ``values`` over ``mask`` weighted by their softmax (rows without any give 0)."""
    weights = torch.softmax(values.masked_fill(~mask, float("-inf")), dim=1).nan_to_num(0.0)
    return (weights * values.masked_fill(~mask, 0.0)).sum(1)


def _euclidean(x: torch.Tensor) -> torch.Tensor:
    """Give the pairwise Euclidean distances of the rows of ``x``, via |a|^2 + |b|^2 - 2ab (no n*n*d copy)."""
    squared = x.pow(2).sum(1)
    d2 = squared.unsqueeze(1) + squared.unsqueeze(0) - 2.0 * x @ x.t()
    # The clamp keeps sqrt's gradient finite at zero distance and hides tiny negative rounding errors.
    return d2.clamp_min(1e-12).sqrt()


class ReidCriterion:
    """A weighted sum of ReID losses, called as ``criterion(logits, features, targets)``."""

    __slots__ = ("terms",)

    def __init__(self, terms: Sequence[tuple[str, float, nn.Module]]) -> None:
        self.terms = tuple(terms)

    def __call__(self, logits: torch.Tensor, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for name, weight, loss in self.terms:
            if name == "cross_entropy":
                value = loss(logits, targets)
            elif name == "triplet":
                value = loss(features, targets)
            else:
                value = loss(logits, features, targets)
            total = weight * value if total is None else total + weight * value
        assert total is not None  # build_reid_criterion never builds an empty sum
        return total


def build_reid_criterion(
    criterion_opts: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, num_classes: int | None = None
) -> ReidCriterion:
    """Build the loss ``criterion_opts`` names: one term as a mapping, or a weighted sum as a list of them.

    Each term is ``{name: cross_entropy, epsilon: 0.0}`` or ``{name: triplet, margin: 0.3}``, with an
    optional ``weight`` (default 1). ``num_classes``, when given, is checked against the logits.
    """
    if isinstance(criterion_opts, Mapping):
        return ReidCriterion([_term(criterion_opts, "criterion_opts", num_classes)])
    if not isinstance(criterion_opts, Sequence) or isinstance(criterion_opts, str) or not criterion_opts:
        raise ValueError(f"criterion_opts: expected a mapping or a non-empty list of them, found {criterion_opts!r}")
    return ReidCriterion(
        [_term(opts, f"criterion_opts[{i}]", num_classes) for i, opts in enumerate(criterion_opts)]
    )


def _term(opts: Any, where: str, num_classes: int | None) -> tuple[str, float, nn.Module]:
    if not isinstance(opts, Mapping):
        raise ValueError(f"{where}: expected a mapping with a name, found {opts!r}")
    name = opts.get("name")
    weight = _number(opts, "weight", 1.0, where)
    if name == "cross_entropy":
        epsilon = _number(opts, "epsilon", 0.0, where)
        if epsilon > 1.0:
            raise ValueError(f"{where}.epsilon: expected a number in [0, 1], found {opts['epsilon']!r}")
        return name, weight, LabelSmoothingCrossEntropy(num_classes, epsilon)
    if name in ("triplet", "triplet_loss"):
        if opts.get("margin") is None:
            raise ValueError(f"{where}.margin: expected a number >= 0 for {name} (0 for the soft margin), found none")
        loss = TripletLoss(_number(opts, "margin", 0.0, where), hard_mining=_flag(opts, "hard_mining", True, where),
                           norm_feat=_flag(opts, "norm_feat", False, where))
        return "triplet", weight, loss
    if isinstance(name, str) and is_target(name):
        return name, weight, _build_user_loss(name, opts, where)
    raise ValueError(f"{where}.name: expected one of {', '.join(REID_CRITERIA)}, found {name!r}")


def _build_user_loss(name: str, opts: Mapping[str, Any], where: str) -> nn.Module:
    """A user's loss class (imported when the config was checked), built with its options."""
    cls = load_target(name)
    problem = _user_loss(cls)
    if problem:
        raise ValueError(f"{where}.name: expected {problem}, found {name}")
    kwargs = {key: value for key, value in opts.items() if key not in ("name", "weight")}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {name}(**{kwargs!r}) failed: {type(exc).__name__}: {exc}") from None


def _flag(opts: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = opts.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key}: expected true or false, found {value!r}")
    return value


def _number(opts: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = opts.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where}.{key}: expected a number >= 0, found {value!r}")
    return float(value)
