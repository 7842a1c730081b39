"""MNIST and Fashion-MNIST from their IDX files (``train-images-idx3-ubyte`` and friends, gzipped or not)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .base import ImageData, ImageSet

__all__ = ["read_idx", "read_mnist"]

_UBYTE = 0x08
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file of unsigned bytes (gzipped when its name ends in ``.gz``) into an array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # EOFError: a gzip stream cut short
        reason = getattr(exc, "strerror", None) or exc
        raise ValueError(f"{path}: expected a readable IDX file, found {reason}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE:
        raise ValueError(f"{path}: expected an IDX header of unsigned bytes (00 00 08 ndim), found {raw[:4].hex(' ')}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: expected {ndim} dimension sizes after the magic number, found a "
                         f"{len(raw)}-byte file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape)) if shape else 1
    if len(raw) - header != size:
        raise ValueError(f"{path}: expected {size} bytes of data for shape {list(shape)}, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_mnist(root: str | Path, *, name: str = "mnist") -> ImageData:
    """Read MNIST or Fashion-MNIST (the same four file names) from the folder ``root``."""
    root = Path(root)
    train, test = (_read_split(root, split) for split in ("train", "test"))
    return ImageData(name=name, train=train, test=test, num_classes=10)


def _read_split(root: Path, split: str) -> ImageSet:
    images_name, labels_name = _FILES[split]
    images = read_idx(_find(root, images_name))
    labels = read_idx(_find(root, labels_name))
    if images.ndim != 3:
        raise ValueError(f"{root / images_name}: expected images of shape [N, H, W], found {list(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{root / labels_name}: expected {images.shape[0]} labels, found shape {list(labels.shape)}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{root / labels_name}: expected labels 0-9, found {int(labels.max())}")
    return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise ValueError(f"{root}: expected {name} or {name}.gz, found neither")
