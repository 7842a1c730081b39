"""Backbones for person re-identification: a ResNet or Swin trunk, a global feature, an identity head.

The trunk follows the residual-network recipe (He et al., 2016): a strided 7x7 stem and max-pool, then four
stages whose first block may halve the map and widen the channels, with BasicBlock (two 3x3 convs) for the
18- and 34-layer nets and Bottleneck (1x1 reduce, 3x3, 1x1 expand by 4) for the 50-, 101- and 152-layer
ones. The Swin trunks live in ``swin``; the head below is the same for both kinds. Two ReID
habits sit on top (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person Re-identification",
2019): the last stage may keep stride 1 for a larger final map, and a BatchNorm "neck" separates the
feature a triplet loss sees from the one the identity classifier sees.

Parameter names match the usual ResNet layout (``base.layer1.0.conv1.weight``,
``base.layer2.0.downsample.0.weight``, ...), so a converted ImageNet state dict loads into ``base`` as is;
the Swin trunks keep the names of the Swin authors' release the same way.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .meta import materialise
from .swin import SWIN_DERIVED_KEYS, SWIN_LAYOUTS, SwinTrunk

__all__ = ["NECKS", "REID_MODELS", "ReidNet", "build_reid_model", "empty_reid_model", "load_pretrained"]

REID_MODELS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "swin_transformer_tiny", "swin_transformer_small", "swin_transformer_base", "swin_transformer_large",
)
NECKS = ("bnneck", "no")

# name -> (block kind, blocks per stage)
_LAYOUTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    # Every conv is followed by a BatchNorm, whose shift makes a conv bias redundant.
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """Give the 1x1 projection the skip path needs when a block changes size, or None when it does not."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs plus the input: the block of the 18- and 34-layer nets."""

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + skip)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4, plus the input: the block of the 50-layer net.

    The stride sits on the 3x3 conv rather than the first 1x1, so no input pixel is skipped unseen.
    """

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        cout = planes * _EXPANSION["bottleneck"]
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, cout, 1)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + skip)


class ResNetTrunk(nn.Module):
    """The residual trunk without its ImageNet head: images in, the last stage's feature map out."""

    def __init__(self, kind: str, depths: tuple[int, int, int, int], width: int, last_stride: int) -> None:
        super().__init__()
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = width
        stages = []
        for index, (depth, stride) in enumerate(zip(depths, (1, 2, 2, last_stride))):
            planes = width * 2**index
            blocks = [block(cin, planes, stride)]
            cin = planes * _EXPANSION[kind]
            blocks += [block(cin, planes, 1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ReidNet(nn.Module):
    """A ReID network: trunk, global average pool, optional BNNeck, identity classifier.

    In train mode ``forward`` gives ``(logits, feature)``, the feature being the pooled vector before the
    neck (the one a triplet loss compares); in eval mode it gives the retrieval embedding, taken after the
    neck when there is one.
    """

    def __init__(self, base: ResNetTrunk | SwinTrunk, num_classes: int, neck: str) -> None:
        super().__init__()
        self.base = base
        self.pool = nn.AdaptiveAvgPool2d(1)
        dim = base.out_channels
        self.bottleneck = nn.BatchNorm1d(dim) if neck == "bnneck" else None
        # After a BNNeck the classifier's bias would only duplicate the neck's shift, which stays at zero.
        self.classifier = nn.Linear(dim, num_classes, bias=self.bottleneck is None)
        self.feature_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feature = self.pool(self.base(x)).flatten(1)
        embedding = feature if self.bottleneck is None else self.bottleneck(feature)
        if not self.training:
            return embedding
        return self.classifier(embedding), feature


def build_reid_model(model_opts: Mapping[str, Any], *, generator: torch.Generator | None = None) -> ReidNet:
    """Build the ReID network ``model_opts`` names on the CPU, its weights drawn from ``generator``.

    Keys: ``name`` (one of ``REID_MODELS``), ``num_classes``, ``last_stride`` (1 or 2, default 1; a Swin
    trunk has no strided last stage and ignores it), ``neck`` (``bnneck`` or ``no``, default ``bnneck``),
    ``fine_tuning`` (submodule paths left trainable, such as ``base.layer4`` or ``base.layers.3``; empty or
    missing leaves all trainable), ``pretrained`` (a local weights file, see ``load_pretrained``) and ``width``
    (channels of the first stage: default 64 for a ResNet, the variant's 96, 128 or 192 for a Swin, whose
    width must be a multiple of 32). ResNet convs get Kaiming-normal weights (fan-out, for ReLU); Swin linear
    layers, its patch embedding and its position-bias tables truncated N(0, 0.02) with zero biases; norms scale
    1 and shift 0; the classifier N(0, 0.001). All from ``generator``, never from torch's global RNG.
    """
    model = empty_reid_model(model_opts, device="cpu")
    _init_parameters(model, generator if generator is not None else torch.default_generator)
    if model_opts.get("pretrained") is not None:
        load_pretrained(model, model_opts["pretrained"])
    return model


def empty_reid_model(model_opts: Mapping[str, Any], *, device: str | torch.device) -> ReidNet:
    """Build the network with uninitialised weights on ``device``, for loading a state dict into at once.

    Options are checked exactly as ``build_reid_model`` checks them, and trainability is set the same way.
    """
    name = model_opts.get("name")
    if name not in REID_MODELS:
        raise ValueError(f"model_opts.name: expected one of {', '.join(REID_MODELS)}, found {name!r}")
    num_classes = _positive_int(model_opts, "num_classes", None)
    width = _positive_int(model_opts, "width", SWIN_LAYOUTS[name][0] if name in SWIN_LAYOUTS else 64)
    last_stride = model_opts.get("last_stride", 1)
    if type(last_stride) is not int or last_stride not in (1, 2):
        raise ValueError(f"model_opts.last_stride: expected 1 or 2, found {last_stride!r}")
    neck = model_opts.get("neck", "bnneck")
    if neck not in NECKS:
        raise ValueError(f"model_opts.neck: expected one of {', '.join(NECKS)}, found {neck!r}")
    with torch.device("meta"):
        model = ReidNet(_trunk(name, width, last_stride), num_classes, neck)
    model = materialise(model, device)
    _freeze(model, model_opts)
    return model


def _trunk(name: str, width: int, last_stride: int) -> ResNetTrunk | SwinTrunk:
    if name in SWIN_LAYOUTS:
        try:
            return SwinTrunk(width, SWIN_LAYOUTS[name][1])
        except ValueError as error:
            raise ValueError(f"{error} (for {name})") from None
    kind, depths = _LAYOUTS[name]
    return ResNetTrunk(kind, depths, width, last_stride)


def load_pretrained(model: ReidNet, path: str | Path) -> None:
    """Load the weights in ``path`` (read with ``torch.load(weights_only=True)``; nothing is downloaded).

    The file holds either a whole ``ReidNet`` state dict (every key under ``base.``, ``bottleneck.`` or
    ``classifier.``), loaded into the whole model, or a trunk state dict (``conv1.weight``,
    ``layer1.0.conv1.weight``, ``patch_embed.proj.weight``, ...), loaded into ``base``. Both loads are strict:
    a missing key, an unexpected key or a shape that differs is a ValueError naming the file. The exceptions
    are in trunk files: an ImageNet head (``fc.*``, ``head.*``), which a ReID network has no place for, and
    the Swin index buffers this project recomputes, are dropped; a Swin release file's ``{"model": ...}``
    wrapper is opened.
    """
    if not Path(path).is_file():
        raise ValueError(f"model_opts.pretrained: expected a local weights file, found no file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's own message suggests weights_only=False, which would run code from the file: not an option here.
        raise ValueError(
            f"model_opts.pretrained: cannot read {path} as a weights file: it is not a plain state dict of tensors"
        ) from error
    except (OSError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"model_opts.pretrained: cannot read {path} as a weights file: {reason}") from error
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"model_opts.pretrained: expected {path} to hold a state dict, found {type(state).__name__}")
    if set(state) == {"model"} and isinstance(state["model"], Mapping):
        state = state["model"]  # the Swin authors' release format
    whole = all(k.split(".", 1)[0] in ("base", "bottleneck", "classifier") for k in state)
    target: nn.Module = model if whole else model.base
    if not whole:
        state = {k: v for k, v in state.items() if k not in ("fc.weight", "fc.bias") and not _derived(k)}
    _check_state(target, state, path)
    target.load_state_dict(state, strict=True)


def _derived(key: str) -> bool:
    return key in SWIN_DERIVED_KEYS or key.rsplit(".", 1)[-1] in SWIN_DERIVED_KEYS


def _check_state(target: nn.Module, state: Mapping[str, Any], path: str | Path) -> None:
    expected = target.state_dict()
    # BatchNorm fills in a missing batch counter itself; older checkpoints were saved before it existed.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"model_opts.pretrained: {path} does not fit the model: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            found = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"model_opts.pretrained: {path}: {key} expected shape {list(expected[key].shape)}, found {found}"
            )


def _few(keys: list[str]) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:3])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > 3 else ''})"


def _freeze(model: ReidNet, model_opts: Mapping[str, Any]) -> None:
    """Leave trainable only what ``fine_tuning`` names (everything when it names nothing)."""
    paths = model_opts.get("fine_tuning") or []
    if not isinstance(paths, (list, tuple)):
        raise ValueError(f"model_opts.fine_tuning: expected a list of submodule paths, found {paths!r}")
    known = {name for name, _ in model.named_modules() if name} | {name for name, _ in model.named_parameters()}
    for index, path in enumerate(paths):
        if not isinstance(path, str) or path not in known:
            raise ValueError(
                f"model_opts.fine_tuning[{index}]: expected a submodule path of {model_opts['name']} "
                f"such as {_example_path(model)} or classifier, found {path!r}"
            )
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not paths or any(name == p or name.startswith(p + ".") for p in paths))
    if model.bottleneck is not None:
        # The BNNeck's shift stays at zero: the trick is a scale-only normalisation before the classifier.
        model.bottleneck.bias.requires_grad_(False)


def _example_path(model: ReidNet) -> str:
    return "base.layers.3" if isinstance(model.base, SwinTrunk) else "base.layer4"


def _positive_int(model_opts: Mapping[str, Any], key: str, default: int | None) -> int:
    value = model_opts.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model_opts.{key}: expected an int >= 1, found {value!r}")
    return value


@torch.no_grad()
def _init_parameters(model: ReidNet, gen: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            # Kaiming normal in fan-out mode for ReLU: std = sqrt(2 / (out_channels * kh * kw)).
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            module.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=gen)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.weight.fill_(1.0)
            module.bias.zero_()
            module.reset_running_stats()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, 0.001, generator=gen)
            if module.bias is not None:
                module.bias.zero_()
    if isinstance(model.base, SwinTrunk):
        _init_swin(model.base, gen)


@torch.no_grad()
def _init_swin(base: SwinTrunk, gen: torch.Generator) -> None:
    # The Swin recipe: truncated N(0, 0.02) for every weight matrix and the relative-position bias tables.
    for name, parameter in base.named_parameters():
        if name.endswith("relative_position_bias_table") or (parameter.dim() > 1 and name.endswith("weight")):
            nn.init.trunc_normal_(parameter, std=0.02, generator=gen)
        elif name.endswith("bias"):
            parameter.zero_()
