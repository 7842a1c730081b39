"""FEMNIST in LEAF's JSON layout: ``train/*.json`` and ``test/*.json``, samples grouped by writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ImageData, ImageSet

__all__ = ["read_femnist", "read_leaf_folder"]

_CLASSES = 62  # 10 digits, 26 upper-case and 26 lower-case letters
_PIXELS = 28 * 28


def read_femnist(root: str | Path) -> ImageData:
    """Read FEMNIST from ``root/train`` and ``root/test``; every sample keeps its writer for the natural partition."""
    root = Path(root)
    return ImageData(name="femnist", train=read_leaf_folder(root / "train"), test=read_leaf_folder(root / "test"),
                     num_classes=_CLASSES)


def read_leaf_folder(folder: str | Path) -> ImageSet:
    """Read every ``*.json`` file of one LEAF split, in file-name order; pixels in [0, 1] become uint8."""
    folder = Path(folder)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        raise ValueError(f"{folder}: expected a folder of LEAF *.json files, found "
                         f"{'no json files' if folder.is_dir() else 'no such folder'}")
    pixels: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    writers: list[str] = []
    for path in files:
        for writer, x, y in _read_file(path):
            pixels.append(x)
            labels.append(y)
            writers += [writer] * len(y)
    images = np.concatenate(pixels) if pixels else np.zeros((0, _PIXELS))
    images = torch.from_numpy(np.rint(images * 255.0).astype(np.uint8)).reshape(-1, 1, 28, 28)
    return ImageSet(images, torch.from_numpy(np.concatenate(labels).astype(np.int64)), tuple(writers))


def _read_file(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: expected a LEAF JSON file, found unreadable text ({exc})") from None
    well_formed = isinstance(doc, dict) and isinstance(doc.get("users"), list)
    if not well_formed or not isinstance(doc.get("user_data"), dict):
        raise ValueError(f"{path}: expected a JSON object with 'users' and 'user_data', found "
                         f"{sorted(doc) if isinstance(doc, dict) else type(doc).__name__}")
    counts = doc.get("num_samples", [None] * len(doc["users"]))
    return [_read_user(path, str(user), doc["user_data"].get(user), count)
            for user, count in zip(doc["users"], counts)]


def _read_user(path: Path, user: str, data: Any, count: Any) -> tuple[str, np.ndarray, np.ndarray]:
    where = f"{path}: user_data[{user!r}]"
    if not isinstance(data, dict) or "x" not in data or "y" not in data:
        raise ValueError(f"{where}: expected an object with 'x' and 'y', found {_kind(data)}")
    try:
        x = np.asarray(data["x"], dtype=np.float64)
        y = np.asarray(data["y"], dtype=np.int64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected x as lists of numbers and y as ints, found ragged or non-numeric "
                         "values") from None
    if x.ndim != 2 or x.shape[1] != _PIXELS or y.shape != (x.shape[0],):
        raise ValueError(f"{where}: expected x as N lists of {_PIXELS} pixels and N labels, found x of shape "
                         f"{list(x.shape)} and {y.size} labels")
    if count is not None and count != len(y):
        raise ValueError(f"{where}: expected num_samples = {count} samples, found {len(y)}")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(f"{where}: expected pixels in [0, 1], found {x.min():g} to {x.max():g}")
    if y.size and (y.min() < 0 or y.max() >= _CLASSES):
        raise ValueError(f"{where}: expected labels 0-{_CLASSES - 1}, found {y.min()} to {y.max()}")
    return user, x, y


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return f"keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__
