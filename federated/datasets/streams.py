"""Class-incremental streams: any data set cut into named tasks of consecutive classes (Split-MNIST style).

Task ``k`` holds classes ``[k*c, (k+1)*c)`` for ``c = classes_per_task``; when ``c`` does not divide the
number of classes, the last task holds the rest. Labels keep their data-set numbering (one classifier over
every class, the class-incremental setting), so a model of ``num_classes`` outputs learns every task.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["class_incremental", "single_task", "in_classes"]


def class_incremental(
    num_classes: int, classes_per_task: int, names: Sequence[str] | None = None, *, where: str = "task_opts.image"
) -> dict[str, tuple[int, ...]]:
    """Name each task (``task_0``, ``task_1``, … or ``names`` in order) and give the classes it holds."""
    per_task = classes_per_task
    if isinstance(per_task, bool) or not isinstance(per_task, int) or not 1 <= per_task <= num_classes:
        raise ValueError(f"{where}.classes_per_task: expected an int from 1 to {num_classes}, found {per_task!r}")
    ranges = [tuple(range(lo, min(lo + per_task, num_classes))) for lo in range(0, num_classes, per_task)]
    if names is None:
        names = [f"task_{k}" for k in range(len(ranges))]
    elif len(names) != len(ranges) or len(set(names)) != len(names):
        raise ValueError(f"{where}.task_names: expected {len(ranges)} distinct names (one per task of "
                         f"{classes_per_task} classes), found {list(names)!r}")
    return {str(name): classes for name, classes in zip(names, ranges)}


def single_task(num_classes: int, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Every task name stands for the whole data set: the plain (not continual) federated setting."""
    return {str(name): tuple(range(num_classes)) for name in names}


def in_classes(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """The positions of ``labels`` whose class is one of ``classes``, in order."""
    return torch.isin(labels, torch.as_tensor(list(classes), dtype=labels.dtype)).nonzero().flatten()
