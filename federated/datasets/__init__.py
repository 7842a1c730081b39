"""Image data sets read from their standard files, class-incremental streams, and the task source over them."""

from __future__ import annotations

from .base import ImageData, ImageSet
from .cifar import read_cifar10, read_cifar100
from .digits import read_digits
from .femnist import read_femnist
from .idx import read_idx, read_mnist
from .registry import IMAGE_DATASETS, read_dataset
from .source import ImageOpts, ImageTasks, build_image_tasks
from .streams import class_incremental

__all__ = [
    "IMAGE_DATASETS", "ImageData", "ImageSet", "ImageOpts", "ImageTasks", "build_image_tasks",
    "class_incremental", "read_cifar10", "read_cifar100", "read_dataset", "read_digits", "read_femnist",
    "read_idx", "read_mnist",
]
