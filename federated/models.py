"""The model zoo: small networks named in ``model_opts``, built without touching torch's global RNG.

A user's model is a ``torch.nn.Module`` subclass named ``"package.module:Name"``: it declares its
``model_opts`` in ``defaults`` and is built as ``Name(input_shape=..., num_classes=..., **options)``, the
shape of one sample and the number of classes coming from the data set, as for ``mlp`` and ``cnn``. Its own
initialisation runs with torch's RNG seeded from the experiment's, so the initial model is the same in every
run of one seed, and the global RNG is left as it was.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import backbones
from .meta import materialise
from .registry import Catalogue, Component, is_target, load_target

__all__ = ["MODELS", "CATALOGUE", "RESERVED", "build_model", "empty_model", "fits_small"]

#: The small models of the synthetic task, by name, with their ``model_opts`` and defaults.
SMALL_MODELS: dict[str, dict[str, Any]] = {"cnn": {"channels": [16, 32]}, "mlp": {"hidden": [64, 64]}}
MODELS = tuple(sorted(SMALL_MODELS))
#: ``model_opts`` of every ReID backbone in backbones.REID_MODELS (FEDSTIL.md section 5).
REID_OPTIONS: dict[str, Any] = {"num_classes": None, "last_stride": 1, "neck": "bnneck", "fine_tuning": [],
                                "pretrained": None, "width": 64}


def _entries() -> dict[str, Component]:
    small = {name: Component(name, options, tags=frozenset({"small"})) for name, options in SMALL_MODELS.items()}
    # Read when asked: backbones.REID_MODELS may gain names after this module is imported.
    reid = {name: Component(name, {**REID_OPTIONS, "width": _default_width(name)}, tags=frozenset({"reid"}))
            for name in backbones.REID_MODELS}
    return {**small, **reid}


def _default_width(name: str) -> int:
    """The published width of a ReID backbone: a Swin layout's embedding width (96 for tiny), a ResNet's 64."""
    return backbones.SWIN_LAYOUTS[name][0] if name in backbones.SWIN_LAYOUTS else REID_OPTIONS["width"]


#: What the data set gives a user model's constructor; an option of that name would hide it.
RESERVED = ("input_shape", "num_classes")
#: Forking torch's global RNG is not thread-safe: one user model is constructed at a time.
_RNG_LOCK = threading.Lock()


def _not_a_model(obj: Any) -> str | None:
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        return "a subclass of torch.nn.Module"
    taken = [key for key in RESERVED if key in (getattr(obj, "defaults", None) or {})]
    if taken:
        return f"a model whose defaults leave out {', '.join(RESERVED)} (the data set gives them)"
    return None


#: Models a config may name in ``model_opts.name``: the small models, the ReID backbones, and a user's
#: torch.nn.Module subclass as "package.module:Name".
CATALOGUE = Catalogue("models", _entries, _not_a_model, user_tags=frozenset({"small"}))


def fits_small(name: Any) -> bool:
    """Whether model ``name`` takes a sample shape and a class count: mlp, cnn or a user's model."""
    return name in MODELS or is_target(str(name))


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
    gen = generator if generator is not None else torch.default_generator
    if is_target(str(model_opts.get("name"))):
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        return _user_model(model_opts, tuple(input_shape), num_classes, seed)
    model = empty_model(model_opts, input_shape, num_classes, device="cpu")
    _init_parameters(model, gen)
    return model


def empty_model(
    model_opts: Mapping[str, Any], input_shape: Sequence[int], num_classes: int, *, device: str | torch.device
) -> nn.Module:
    """Build the model with uninitialised weights on ``device``, for loading a state dict into at once.

    Skipping initialisation matters: clients build a model per training call and overwrite it right away.
    A user's model is built on the CPU and moved (its constructor may fill buffers a state dict does not
    hold), except on ``meta``, where only shapes are asked for.
    """
    if is_target(str(model_opts.get("name"))) and torch.device(device).type != "meta":
        return _user_model(model_opts, tuple(input_shape), num_classes, 0).to(device)
    with torch.device("meta"):
        model = _construct(model_opts, tuple(input_shape), num_classes)
    return materialise(model, device)


def _construct(model_opts: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    name = model_opts.get("name")
    if name == "mlp":
        return _mlp(_sizes(model_opts, "hidden"), input_shape, num_classes)
    if name == "cnn":
        return _cnn(_sizes(model_opts, "channels"), input_shape, num_classes)
    if is_target(str(name)):
        return _construct_user(model_opts, input_shape, num_classes)
    raise ValueError(f"model_opts.name: expected one of {', '.join(MODELS)}, found {name!r}")


def _user_model(model_opts: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int,
                seed: int) -> nn.Module:
    """The user's model, its own initialisation drawing from torch's RNG seeded with ``seed``."""
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _construct_user(model_opts, input_shape, num_classes)


def _construct_user(model_opts: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    name = model_opts["name"]
    # Imported when the config was checked (from the config's folder): this finds the loaded module.
    cls = load_target(name)
    problem = _not_a_model(cls)
    if problem:
        raise ValueError(f"model_opts.name: expected {problem}, found {name}")
    options = {key: value for key, value in model_opts.items() if key != "name"}
    try:
        model = cls(input_shape=input_shape, num_classes=num_classes, **options)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"model_opts.name: expected {name}(input_shape={list(input_shape)}, num_classes="
                         f"{num_classes}, ...) to build a model, found {type(exc).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model_opts.name: expected {name}(...) to build a torch.nn.Module, found "
                         f"{type(model).__name__}")
    return model


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
