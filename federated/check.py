"""Checking a validated config against what torch can build, before anything is allocated or written.

The config loader knows the names and types of every option; this knows what they mean: it builds the
method, the optimizer, the scheduler and the loss, and the model on the ``meta`` device (shapes only, no
memory), and estimates the bytes a run needs, so that a model or an input too large for this machine is
refused in one line instead of failing (or swapping) in the first round. A dry run checks the same.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import torch

from .backbones import empty_reid_model
from .datasets.registry import SHAPES
from .datasets.user import class_shape
from .methods import build_method
from .models import empty_model
from .registry import is_target
from .synthetic import SyntheticSpec
from .training import build_optimizer, build_scheduler
from .worker import build_loss

__all__ = ["check_config", "physical_memory"]

#: Copies of the weights one training needs at once: the server's, the worker's model, its gradients, two
#: optimizer moments (Adam) and the client's stored state.
WEIGHT_COPIES = 6
_GIB = float(1 << 30)


def physical_memory() -> int | None:
    """This machine's memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_config(config: Mapping[str, Any], memory: int | None = None) -> None:
    """A ValueError ("where: expected ..., found ...") for anything torch could not build or hold."""
    memory = physical_memory() if memory is None else memory
    method = build_method(config["exp_method"], config.get("method_opts") or {})
    model = _meta_model(config)
    if model is not None:
        method.plan_network(lambda: model)
    dummy = [torch.nn.Parameter(torch.zeros(1))]
    build_scheduler(config["scheduler_opts"], build_optimizer(config["optimizer_opts"], dummy))
    build_loss(config["criterion_opts"], config["model_opts"].get("num_classes"))
    if model is None:  # a user data set whose shapes are known once it is built (the Federation checks then)
        return
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    params = sum(p.numel() for p in model.parameters())
    if memory is not None and weights * WEIGHT_COPIES > memory:
        raise ValueError(f"model_opts: expected a model that fits in this machine's {memory / _GIB:.1f} GiB, found "
                         f"{params:,} parameters, about {weights * WEIGHT_COPIES / _GIB:.1f} GiB to train "
                         f"(weights, gradients, optimizer state and stored copies)")
    _check_inputs(config, memory)


def _meta_model(config: Mapping[str, Any]) -> torch.nn.Module | None:
    opts = config["model_opts"]
    try:
        dataset = config["task_opts"]["dataset"]
        if is_target(str(dataset)):
            declared = class_shape(dataset)
            return None if declared is None else empty_model(opts, *declared, device="meta")
        if dataset == "synthetic":
            spec = SyntheticSpec.from_dict(config["task_opts"]["synthetic"])
            return empty_model(opts, spec.input_shape, spec.num_classes, device="meta")
        if dataset in SHAPES:
            shape, classes = SHAPES[dataset]
            return empty_model(opts, shape, classes, device="meta")
        return empty_reid_model(opts, device="meta")
    except (RuntimeError, OverflowError, MemoryError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"model_opts: expected a model torch can build, found {type(exc).__name__}: {first}") from None


def _check_inputs(config: Mapping[str, Any], memory: int | None) -> None:
    """One client's synthetic data, or one batch of ReID images, must fit (image data sets are as large as
    their files, and a user's data set is its own)."""
    opts = config["task_opts"]
    if opts["dataset"] in SHAPES or is_target(str(opts["dataset"])):
        return
    if opts["dataset"] == "synthetic":
        syn = opts["synthetic"]
        need = (syn["samples_per_client"] + syn["test_size"]) * math.prod(syn["input_shape"]) * 4
        where = "task_opts.synthetic"
        what = f"{syn['samples_per_client'] + syn['test_size']:,} samples of shape {syn['input_shape']}"
    else:
        h, w = opts["augment_opts"]["img_size"]
        need = opts["batch_size"] * 3 * h * w * 4 * 2  # the batch and its augmented copy
        where = "task_opts.augment_opts.img_size"
        what = f"batches of {opts['batch_size']} images of {h}x{w}"
    if memory is not None and need > memory:
        raise ValueError(f"{where}: expected inputs that fit in this machine's {memory / _GIB:.1f} GiB, found "
                         f"{what}, about {need / _GIB:.1f} GiB")
