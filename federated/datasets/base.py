"""What every reader gives back: uint8 images with their labels (and writers), split into train and test."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ImageSet", "ImageData"]


@dataclass(frozen=True, slots=True)
class ImageSet:
    """One split of an image data set, kept compact: ``images`` is uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]``.

    ``writers`` names who produced each sample (FEMNIST's writers), for the natural partition; ``None``
    where a data set does not record it.
    """

    images: torch.Tensor
    labels: torch.Tensor
    writers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"ImageSet.images: expected a uint8 [N, C, H, W] tensor, found {self.images.dtype} "
                             f"of shape {list(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"ImageSet.labels: expected {self.images.shape[0]} labels, found shape "
                             f"{list(self.labels.shape)}")
        if self.writers is not None and len(self.writers) != self.images.shape[0]:
            raise ValueError(f"ImageSet.writers: expected {self.images.shape[0]} writers, found {len(self.writers)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, slots=True)
class ImageData:
    """A whole data set as read from disk: its train and test splits and how many classes it has."""

    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image, what ``federated.models`` builds a model for."""
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)
