"""The readers give back exactly what the standard files hold, and name the file and the fault when they can't."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from fedevents.federated.datasets import (
    read_cifar10, read_cifar100, read_dataset, read_digits, read_femnist, read_idx, read_mnist,
)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_round_trips_pixels_and_labels(write_mnist: Callable[..., Path], patterns: Callable, gz: bool) -> None:
    root = write_mnist(train=30, test=12, gz=gz)
    data = read_mnist(root)
    assert data.train.images.dtype == torch.uint8
    assert data.train.images.shape == (30, 1, 28, 28) and data.test.images.shape == (12, 1, 28, 28)
    assert data.train.labels.tolist() == [i % 10 for i in range(30)]
    expected = patterns(np.arange(30) % 10, 1, 28, 0)
    assert torch.equal(data.train.images, torch.from_numpy(expected))
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10


def test_fashion_mnist_reads_the_same_file_names(write_mnist: Callable[..., Path]) -> None:
    data = read_dataset("fashion_mnist", write_mnist(train=20, test=10))
    assert data.name == "fashion_mnist" and len(data.train) == 20 and len(data.test) == 10


def test_idx_with_a_wrong_type_code_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x0D, 3]) + b"\0" * 12)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: expected an IDX header of unsigned bytes "
                                         r"\(00 00 08 ndim\), found 00 00 0d 03"):
        read_idx(path)


def test_truncated_idx_says_how_many_bytes_are_missing(tmp_path: Path) -> None:
    path = tmp_path / "t.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\1" * 7))
    with pytest.raises(ValueError, match=r"t.gz: expected 10 bytes of data for shape \[10\], found 7"):
        read_idx(path)


def test_missing_mnist_file_names_both_spellings(write_mnist: Callable[..., Path]) -> None:
    root = write_mnist()
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match="expected t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz, found neither"):
        read_mnist(root)


def test_cifar10_joins_five_batches_in_order_and_keeps_the_channel_layout(write_cifar10: Callable[..., Path]) -> None:
    data = read_cifar10(write_cifar10(per_batch=4, test=6))
    assert data.train.images.shape == (20, 3, 32, 32) and data.test.images.shape == (6, 3, 32, 32)
    assert data.train.labels.tolist() == [(j + i) % 10 for i in range(1, 6) for j in range(4)]
    raw = pickle.loads((write_cifar10(per_batch=4, test=6) / "data_batch_2").read_bytes(), encoding="bytes")[b"data"]
    # A row is 1024 red values, then green, then blue, each 32x32 row-major.
    assert data.train.images[4, 1, 3, 5] == raw[0, 1024 + 3 * 32 + 5]
    assert data.train.images[7, 2, 31, 0] == raw[3, 2048 + 31 * 32]


def test_cifar100_uses_the_fine_labels(write_cifar100: Callable[..., Path]) -> None:
    data = read_cifar100(write_cifar100(train=150, test=50))
    assert data.num_classes == 100 and data.train.labels.tolist() == [i % 100 for i in range(150)]
    assert len(data.test) == 50


def test_cifar100_without_meta_is_a_clear_error(write_cifar100: Callable[..., Path]) -> None:
    root = write_cifar100()
    (root / "meta").unlink()
    with pytest.raises(ValueError, match=r"cifar-100-python: expected the CIFAR batch meta, found no such file"):
        read_cifar100(root)


def test_a_batch_that_names_other_code_is_refused_unrun(write_cifar10: Callable[..., Path], tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (tmp_path / "ran",))

    root = write_cifar10()
    (root / "test_batch").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match=r"test_batch: expected a CIFAR python pickle batch, found an unreadable "
                                         r"file \(global pathlib.*is not part of a CIFAR batch\)"):
        read_cifar10(root)
    assert not (tmp_path / "ran").exists()


def test_cifar_batch_of_the_wrong_width_says_what_it_found(write_cifar10: Callable[..., Path]) -> None:
    root = write_cifar10()
    batch = {b"data": np.zeros((3, 100), dtype=np.uint8), b"labels": [0, 1, 2]}
    (root / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3: expected b'data' as a uint8 array of shape \[N, 3072\], "
                                         r"found uint8 array of shape \[3, 100\]"):
        read_cifar10(root)


def test_femnist_keeps_each_sample_with_its_writer(write_femnist: Callable[..., Path], patterns: Callable) -> None:
    data = read_femnist(write_femnist(writers=4, per_writer=3, files=2))
    assert data.num_classes == 62 and data.train.images.shape == (12, 1, 28, 28)
    # Files in name order; file 0 holds writers 0 and 2, file 1 writers 1 and 3.
    assert data.train.writers == tuple(w for w in ("f0000_00", "f0002_02", "f0001_01", "f0003_00") for _ in range(3))
    assert data.train.labels[:6].tolist() == [0, 1, 2, 1, 2, 3]
    assert torch.equal(data.train.images[:3], torch.from_numpy(patterns(np.arange(3), 1, 28, 0)[:, :1]))
    assert len(data.test) == 8


def test_femnist_count_mismatch_names_the_user(write_femnist: Callable[..., Path]) -> None:
    root = write_femnist(writers=2, files=1)
    path = next((root / "train").glob("*.json"))
    doc = json.loads(path.read_text())
    doc["num_samples"][1] = 9
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"user_data\['f0001_01'\]: expected num_samples = 9 samples, found 5"):
        read_femnist(root)


def test_femnist_without_a_test_folder_is_a_clear_error(write_femnist: Callable[..., Path]) -> None:
    root = write_femnist()
    for path in (root / "test").glob("*.json"):
        path.unlink()
    with pytest.raises(ValueError, match=r"femnist/test: expected a folder of LEAF \*.json files, found no json files"):
        read_femnist(root)


def test_digits_csv_format_is_scaled_to_bytes_and_split_per_class(tmp_path: Path) -> None:
    rows = np.zeros((50, 65), dtype=int)
    rows[:, 64] = np.arange(50) % 10
    rows[:, 0] = 16
    rows[:, 1] = 8
    path = tmp_path / "digits.csv.gz"
    path.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode()))
    data = read_digits(path, seed=3, test_fraction=0.2)
    assert data.train.images.shape == (40, 1, 8, 8) and data.test.images.shape == (10, 1, 8, 8)
    assert sorted(data.test.labels.tolist()) == list(range(10))  # one of each class's five
    assert data.train.images[0, 0, 0, :3].tolist() == [255, 128, 0]
    again = read_digits(path, seed=3, test_fraction=0.2)
    assert torch.equal(again.test.labels, data.test.labels)


def test_digits_csv_with_a_short_row_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "digits.csv"
    path.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"digits.csv: expected rows of 64 pixels and a label \(65 columns\), found 3"):
        read_digits(path)


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs fedevents[datasets] (scikit-learn)")
def test_digits_from_scikit_learn_are_the_1797_real_digits() -> None:
    data = read_dataset("digits", None, seed=0)
    assert len(data.train) + len(data.test) == 1797
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.test) == sum(round(0.2 * n) for n in (178, 182, 177, 183, 181, 182, 181, 179, 174, 180))


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="task_opts.dataset: expected one of mnist, fashion_mnist, cifar10, cifar100, "
                                         "femnist, digits, found 'svhn'"):
        read_dataset("svhn", "/nowhere")


def test_a_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"datasets_dir: expected the folder holding the cifar10 files, found no "
                                         f"folder {tmp_path / 'gone'}"):
        read_dataset("cifar10", tmp_path / "gone")


def test_a_gzip_stream_cut_short_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + bytes(100))[:-12])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: expected a readable IDX file, found "
                                         r"Compressed file ended before the end-of-stream marker was reached"):
        read_idx(path)
