"""The image data sets by name, each with the reader that loads it from a local folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .base import ImageData
from .cifar import read_cifar10, read_cifar100
from .digits import read_digits
from .femnist import read_femnist
from .idx import read_mnist

__all__ = ["IMAGE_DATASETS", "SHAPES", "read_dataset"]

#: ``name -> reader(root, seed, test_fraction)``; digits ships inside scikit-learn and needs no folder.
_READERS: dict[str, Callable[[Path | None, int, float], ImageData]] = {
    "mnist": lambda root, seed, frac: read_mnist(_folder(root, "mnist"), name="mnist"),
    "fashion_mnist": lambda root, seed, frac: read_mnist(_folder(root, "fashion_mnist"), name="fashion_mnist"),
    "cifar10": lambda root, seed, frac: read_cifar10(_folder(root, "cifar10")),
    "cifar100": lambda root, seed, frac: read_cifar100(_folder(root, "cifar100")),
    "femnist": lambda root, seed, frac: read_femnist(_folder(root, "femnist")),
    "digits": lambda root, seed, frac: read_digits(seed=seed, test_fraction=frac),
}
IMAGE_DATASETS = tuple(_READERS)
#: ``name -> (input shape, classes)`` as the readers give them, known before any file is read (so a model's
#: size can be checked before the run).
SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "femnist": ((1, 28, 28), 62),
    "digits": ((1, 8, 8), 10),
}


def read_dataset(name: str, root: str | Path | None, *, seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """Read the data set ``name`` from the folder ``root`` (ignored for ``digits``)."""
    if name not in _READERS:
        raise ValueError(f"task_opts.dataset: expected one of {', '.join(IMAGE_DATASETS)}, found {name!r}")
    return _READERS[name](Path(root) if root is not None else None, seed, test_fraction)


def _folder(root: Path | None, name: str) -> Path:
    if root is None:
        raise ValueError(f"datasets_dir: expected the folder holding the {name} files, found none")
    if not root.is_dir():
        raise ValueError(f"datasets_dir: expected the folder holding the {name} files, found no folder {root}")
    return root
