"""Writers of tiny data sets in the exact on-disk formats the readers take, with learnable class patterns."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import pytest


def pattern_images(labels: np.ndarray, channels: int, size: int, seed: int) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` images: class ``c`` lights a horizontal band of rows, over random noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 80, size=(len(labels), channels, size, size), dtype=np.uint8)
    band = max(1, size // 10)
    for i, label in enumerate(labels):
        top = (int(label) * band) % size
        images[i, :, top:top + band, :] = 230
    return images


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def write_mnist(tmp_path: Path) -> Callable[..., Path]:
    """Write the four MNIST IDX files (``gz=True``: gzipped) of ``train``/``test`` samples; give the folder."""

    def write(train: int = 60, test: int = 20, *, gz: bool = False, seed: int = 0) -> Path:
        root = tmp_path / "mnist"
        root.mkdir(exist_ok=True)
        for prefix, count, part_seed in (("train", train, seed), ("t10k", test, seed + 1)):
            labels = np.arange(count) % 10
            images = pattern_images(labels, 1, 28, part_seed)[:, 0]
            for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
                name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
                data = _idx_bytes(array)
                (root / name).write_bytes(gzip.compress(data) if gz else data)
        return root

    return write


def _cifar_batch(labels: np.ndarray, seed: int, label_key: str) -> dict:
    images = pattern_images(labels, 3, 32, seed).reshape(len(labels), -1)
    # The real batches are Python 2 pickles with bytes keys; labels are plain lists.
    return {b"batch_label": b"testing", label_key.encode(): [int(x) for x in labels], b"data": images}


@pytest.fixture
def write_cifar10(tmp_path: Path) -> Callable[..., Path]:
    """Write ``data_batch_1..5`` (``per_batch`` samples each) and ``test_batch``; give the folder."""

    def write(per_batch: int = 20, test: int = 20) -> Path:
        root = tmp_path / "cifar-10-batches-py"
        root.mkdir(exist_ok=True)
        for i in range(1, 6):
            labels = (np.arange(per_batch) + i) % 10
            (root / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(labels, i, "labels"), protocol=2))
        (root / "test_batch").write_bytes(pickle.dumps(_cifar_batch(np.arange(test) % 10, 9, "labels"), protocol=2))
        (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
        return root

    return write


@pytest.fixture
def write_cifar100(tmp_path: Path) -> Callable[..., Path]:
    """Write CIFAR-100's ``train``, ``test`` and ``meta`` with fine labels; give the folder."""

    def write(train: int = 200, test: int = 100) -> Path:
        root = tmp_path / "cifar-100-python"
        root.mkdir(exist_ok=True)
        for name, count, seed in (("train", train, 0), ("test", test, 1)):
            batch = _cifar_batch(np.arange(count) % 100, seed, "fine_labels")
            batch[b"coarse_labels"] = [int(x) % 20 for x in np.arange(count)]
            (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        meta = {b"fine_label_names": [b"f%d" % i for i in range(100)], b"coarse_label_names": [b"c"] * 20}
        (root / "meta").write_bytes(pickle.dumps(meta, protocol=2))
        return root

    return write


@pytest.fixture
def write_femnist(tmp_path: Path) -> Callable[..., Path]:
    """Write LEAF JSON ``train/`` and ``test/`` folders: ``writers`` writers over ``files`` files; give the root."""

    def write(writers: int = 6, per_writer: int = 5, files: int = 2) -> Path:
        root = tmp_path / "femnist"
        for split, count, seed in (("train", per_writer, 0), ("test", 2, 1)):
            (root / split).mkdir(parents=True, exist_ok=True)
            names = [f"f{w:04d}_{w % 3:02d}" for w in range(writers)]
            for f in range(files):
                mine = names[f::files]
                doc = {"users": mine, "num_samples": [count] * len(mine), "user_data": {}}
                for w, name in enumerate(mine):
                    labels = (np.arange(count) + w) % 62
                    pixels = pattern_images(labels, 1, 28, seed + w).reshape(count, -1) / 255.0
                    doc["user_data"][name] = {"x": pixels.round(6).tolist(), "y": labels.tolist()}
                (root / split / f"all_data_{f}_niid_0_keep_0_{split}_9.json").write_text(json.dumps(doc))
        return root

    return write


@pytest.fixture
def patterns() -> Callable[[np.ndarray, int, int, int], np.ndarray]:
    """``pattern_images``, for tests that compare what a reader gives back with what was written."""
    return pattern_images
