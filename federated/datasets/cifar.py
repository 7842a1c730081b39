"""CIFAR-10 and CIFAR-100 from their python pickle batches (``cifar-10-batches-py``, ``cifar-100-python``)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ImageData, ImageSet

__all__ = ["read_cifar10", "read_cifar100"]

_PIXELS = 3 * 32 * 32
# The batches hold numpy arrays and nothing else; refusing every other global keeps a crafted file from
# running code while it is read (plain pickle.load would import and call whatever the file names).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how a Python 3 pickle of protocol 2 spells the bytes inside an array
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not part of a CIFAR batch")
        return super().find_class(module, name)


def read_cifar10(root: str | Path) -> ImageData:
    """Read CIFAR-10 from ``root``: ``data_batch_1`` … ``data_batch_5`` and ``test_batch``."""
    root = Path(root)
    train = _concat([_read_batch(root / f"data_batch_{i}", b"labels", 10) for i in range(1, 6)])
    test = _read_batch(root / "test_batch", b"labels", 10)
    return ImageData(name="cifar10", train=train, test=test, num_classes=10)


def read_cifar100(root: str | Path) -> ImageData:
    """Read CIFAR-100 from ``root``: ``train`` and ``test`` with their 100 fine labels (``meta`` is checked)."""
    root = Path(root)
    names = _load(root / "meta").get(b"fine_label_names")
    if not isinstance(names, list) or len(names) != 100:
        raise ValueError(f"{root / 'meta'}: expected 100 fine_label_names, found {_describe(names)}")
    train = _read_batch(root / "train", b"fine_labels", 100)
    test = _read_batch(root / "test", b"fine_labels", 100)
    return ImageData(name="cifar100", train=train, test=test, num_classes=100)


def _read_batch(path: Path, label_key: bytes, num_classes: int) -> ImageSet:
    batch = _load(path)
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise ValueError(f"{path}: expected b'data' as a uint8 array of shape [N, {_PIXELS}], found {_describe(data)}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != data.shape[0]:
        raise ValueError(f"{path}: expected {data.shape[0]} {label_key.decode()}, found {_describe(labels)}")
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if labels_t.numel() and (labels_t.min() < 0 or labels_t.max() >= num_classes):
        raise ValueError(f"{path}: expected {label_key.decode()} in 0-{num_classes - 1}, found "
                         f"{int(labels_t.min())}-{int(labels_t.max())}")
    # Rows are the red plane, then green, then blue, each 32x32 row-major: exactly [3, 32, 32].
    images = torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32)
    return ImageSet(images, labels_t)


def _load(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise ValueError(f"{path.parent}: expected the CIFAR batch {path.name}, found no such file") from None
    except Exception as exc:  # a malformed pickle can fail in many ways; each is the same fault of the file
        raise ValueError(f"{path}: expected a CIFAR python pickle batch, found an unreadable file ({exc})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    return batch


def _concat(sets: list[ImageSet]) -> ImageSet:
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} array of shape {list(value.shape)}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return "none" if value is None else type(value).__name__
