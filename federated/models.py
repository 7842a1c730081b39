"""The model zoo: small networks named in ``model_opts``, built without touching torch's global RNG."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import backbones
from .meta import materialise
from .registry import Catalogue, Component

__all__ = ["MODELS", "CATALOGUE", "build_model", "empty_model"]

#: The small models of the synthetic task, by name, with their ``model_opts`` and defaults.
SMALL_MODELS: dict[str, dict[str, Any]] = {"cnn": {"channels": [16, 32]}, "mlp": {"hidden": [64, 64]}}
MODELS = tuple(sorted(SMALL_MODELS))
#: ``model_opts`` of every ReID backbone in backbones.REID_MODELS (FEDSTIL.md section 5).
REID_OPTIONS: dict[str, Any] = {"num_classes": None, "last_stride": 1, "neck": "bnneck", "fine_tuning": [],
                                "pretrained": None, "width": 64}


def _entries() -> dict[str, Component]:
    small = {name: Component(name, options, tags=frozenset({"small"})) for name, options in SMALL_MODELS.items()}
    # Read when asked: backbones.REID_MODELS may gain names after this module is imported.
    reid = {name: Component(name, REID_OPTIONS, tags=frozenset({"reid"})) for name in backbones.REID_MODELS}
    return {**small, **reid}


#: Models a config may name in ``model_opts.name``: the small models and the ReID backbones.
CATALOGUE = Catalogue("models", _entries, lambda obj: "a built-in model name (user models are not supported yet)")


def build_model(
    model_opts: Mapping[str, Any],
    input_shape: Sequence[int],
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build the model ``model_opts`` names on the CPU, its weights drawn from ``generator``.

    The initial weights follow PyTorch's default ranges for Linear and Conv layers, but come from the given
    generator, so they do not depend on whatever else has drawn from the global RNG.
    """
    model = empty_model(model_opts, input_shape, num_classes, device="cpu")
    _init_parameters(model, generator if generator is not None else torch.default_generator)
    return model


def empty_model(
    model_opts: Mapping[str, Any], input_shape: Sequence[int], num_classes: int, *, device: str | torch.device
) -> nn.Module:
    """Build the model with uninitialised weights on ``device``, for loading a state dict into at once.

    Skipping initialisation matters: clients build a model per training call and overwrite it right away.
    """
    with torch.device("meta"):
        model = _construct(model_opts, tuple(input_shape), num_classes)
    return materialise(model, device)


def _construct(model_opts: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    name = model_opts.get("name")
    if name == "mlp":
        return _mlp(_sizes(model_opts, "hidden"), input_shape, num_classes)
    if name == "cnn":
        return _cnn(_sizes(model_opts, "channels"), input_shape, num_classes)
    raise ValueError(f"model_opts.name: expected one of {', '.join(MODELS)}, found {name!r}")


def _mlp(hidden: list[int], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(channels: list[int], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"model_opts.name = 'cnn': expected input_shape [C, H, W], found {list(input_shape)}")
    layers: list[nn.Module] = []
    width = input_shape[0]
    for size in channels:
        # ceil_mode keeps a 1-pixel map at 1 pixel, so any number of blocks fits any image size.
        layers += [nn.Conv2d(width, size, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        width = size
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def _sizes(model_opts: Mapping[str, Any], key: str) -> list[int]:
    sizes = model_opts.get(key)
    if not isinstance(sizes, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise ValueError(f"model_opts.{key}: expected a list of positive ints, found {sizes!r}")
    return list(sizes)


@torch.no_grad()
def _init_parameters(model: nn.Module, gen: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            # PyTorch's default (kaiming_uniform with a=sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            module.weight.uniform_(-bound, bound, generator=gen)
            if module.bias is not None:
                module.bias.uniform_(-bound, bound, generator=gen)
