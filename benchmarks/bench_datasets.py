"""Reading full-size image data sets and sharing them out: seconds, and memory kept as uint8.

    python benchmarks/bench_datasets.py [--repeats 3] [--clients 100]

Writes a CIFAR-10-sized folder (50,000 + 10,000 images in the python pickle batches) and an MNIST-sized one
(60,000 + 10,000 in gzipped IDX files) of random pixels into a temporary folder, then times, median (best)
of ``--repeats``: reading each; building ``ImageTasks`` with a Dirichlet(0.1) partition over ``--clients``
clients (the partition and the per-channel statistics); one client's ``train_data``; scoring an MLP on the
pooled test set. Memory is the training images' bytes as kept (uint8) against float32.
"""

from __future__ import annotations

import argparse
import gzip
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.federated.datasets import ImageOpts, ImageTasks, read_cifar10, read_mnist  # noqa: E402
from fedevents.federated.seeds import generator  # noqa: E402


def write_cifar10(root: Path, rng: np.random.Generator) -> None:
    root.mkdir()
    for name, count in [(f"data_batch_{i}", 10_000) for i in range(1, 6)] + [("test_batch", 10_000)]:
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, count).tolist()}
        # The published batches are Python 2 pickles whose pixels load as one bytes object; protocol 4 stores
        # them the same way (a Python 3 protocol 2 pickle would go through a latin-1 string instead).
        (root / name).write_bytes(pickle.dumps(batch, protocol=4))


def write_mnist(root: Path, rng: np.random.Generator) -> None:
    root.mkdir()
    for prefix, count in (("train", 60_000), ("t10k", 10_000)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)),
                            ("labels-idx1", rng.integers(0, 10, count, dtype=np.uint8))):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes(), compresslevel=1))


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(describe())
    rng = np.random.default_rng(0)
    clients = [f"client-{i}" for i in range(args.clients)]
    opts = ImageOpts.from_dict({"partition": {"name": "dirichlet", "alpha": 0.1}})
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar10(Path(tmp) / "cifar10", rng)
        write_mnist(Path(tmp) / "mnist", rng)
        rows = []
        for name, read in (("cifar10", read_cifar10), ("mnist (.gz)", read_mnist)):
            med, best, data = timed(lambda: read(Path(tmp) / name.split()[0]), args.repeats)
            rows.append((f"read {name}", med, best))
            med, best, tasks = timed(lambda: ImageTasks(data, opts, clients, 0, [name]), args.repeats)
            rows.append((f"ImageTasks {name}, dirichlet 0.1 over {args.clients}", med, best))
            sizes = [len(part) for part in tasks.train_parts]
            middle = clients[sorted(range(len(sizes)), key=sizes.__getitem__)[len(sizes) // 2]]
            med, best, _ = timed(lambda: tasks.train_data(middle, name), args.repeats)
            label = f"train_data of the median client ({sorted(sizes)[len(sizes) // 2]} samples), {name}"
            rows.append((label, med, best))
            model = tasks.build_model({"name": "mlp", "hidden": [64]}, generator(0))
            med, best, _ = timed(lambda: tasks.score(model, "client-0", name, torch.device("cpu")), args.repeats)
            rows.append((f"score MLP 64 on the pooled test set, {name}", med, best))
            kept = data.train.images.numel()
            print(f"{name}: training images kept {kept / 2**20:.0f} MiB as uint8, "
                  f"{4 * kept / 2**20:.0f} MiB as float32")
    print(f"\n| step | median s | best s |\n|---|---:|---:|")
    for label, med, best in rows:
        print(f"| {label} | {med:.4f} | {best:.4f} |")


if __name__ == "__main__":
    main()
