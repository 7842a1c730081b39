"""scikit-learn's 1,797 real 8x8 handwritten digits, read from the CSV that ships inside the package.

The file is read directly rather than through ``sklearn.datasets.load_digits``, so importing scipy and the
rest of scikit-learn costs nothing; scikit-learn only has to be installed (``pip install fedevents[datasets]``).
There is no official test split: a stratified ``test_fraction`` of each class is held out, chosen by the seed.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..seeds import derive_seed
from .base import ImageData, ImageSet

__all__ = ["digits_csv", "read_digits"]

_MAX_PIXEL = 16  # the digits count ink in 4x4 blocks of a 32x32 bitmap: 0-16


def digits_csv() -> Path:
    """The path of ``digits.csv.gz`` inside the installed scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("task_opts.dataset digits: expected scikit-learn to be installed "
                         "(pip install 'fedevents[datasets]'), found no sklearn package")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise ValueError(f"{path}: expected the digits CSV that ships with scikit-learn, found no such file")
    return path


def read_digits(path: str | Path | None = None, *, seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """Read the digits CSV (64 pixels 0-16 and a label per row) and hold out ``test_fraction`` of each class."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a number between 0 and 1, found {test_fraction!r}")
    path = Path(path) if path is not None else digits_csv()
    rows = _read_rows(path)
    images = np.rint(rows[:, :64] * (255.0 / _MAX_PIXEL)).astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = rows[:, 64].astype(np.int64)
    test = _held_out(labels, seed, test_fraction)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return ImageData(name="digits", train=_subset(images, labels, train), test=_subset(images, labels, test),
                     num_classes=10)


def _read_rows(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", ndmin=2)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: expected comma-separated rows of 65 numbers, found unreadable text "
                         f"({exc})") from None
    if rows.shape[1] != 65 or not rows.size:
        raise ValueError(f"{path}: expected rows of 64 pixels and a label (65 columns), found {rows.shape[1]} columns")
    if rows[:, :64].min() < 0 or rows[:, :64].max() > _MAX_PIXEL or not np.isin(rows[:, 64], range(10)).all():
        raise ValueError(f"{path}: expected pixels 0-{_MAX_PIXEL} and labels 0-9, found values outside those ranges")
    return rows


def _held_out(labels: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    rng = np.random.default_rng(derive_seed(seed, "digits", "test split"))
    picked = []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        picked.append(members[: int(round(fraction * len(members)))])
    return np.sort(np.concatenate(picked))


def _subset(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> ImageSet:
    return ImageSet(torch.from_numpy(images[index]), torch.from_numpy(labels[index]))
