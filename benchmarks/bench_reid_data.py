"""ReID data at Market-1501 size: decode time, memory held, peak RSS and seconds per training epoch.

    python benchmarks/bench_reid_data.py [--data DIR] [--workers 0,2] [--batches 12] [--out FILE.json]

The task has Market-1501's split sizes (12,936 train images of 751 people; 3,368 query and 15,913 gallery
images of 750 others; six cameras) at 128x64, as JPEG files with a colour layout per person, written once
to ``--data`` (a temporary folder when not given). Each measurement runs in a process of its own, so its
peak RSS (``ru_maxrss`` of the process and of its worker processes) is its own:

- ``decode``: the three splits through ``ReidTasks`` (as a run reads them) with ``loader_opts.num_workers``
  from ``--workers``: wall time and the bytes the cache holds;
- ``float32``: the same splits held as normalised float32, as fedevents held them before splits stayed 8-bit;
- ``train``: one epoch of the train split with ``batch_size`` 32, ``default`` augmentation and SGD, for a
  resnet18 at width 64 (the standard one) and at width 16, on ``--threads`` torch threads (default 1, as
  fedevents trains). On a CPU a full-width epoch takes many minutes, so each timing is of ``--batches``
  batches after two warm-up batches, scaled to the 405 batches of an epoch.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

SPLITS = {"train": (12_936, range(1, 752)), "query": (3_368, range(752, 1502)), "gallery": (15_913, range(752, 1502))}
SIZE = (128, 64)  # height, width
BATCH = 32
TASK = "market-sized"


def write_task(root: Path) -> None:
    """Write the Market-sized task under ``root/market-sized`` (skipped when it is there already)."""
    task = root / TASK
    if (task / "done").exists():
        return
    for split, (count, people) in SPLITS.items():
        pids = list(people)
        for index in range(count):
            pid = pids[index % len(pids)]
            camera = 1 + index // len(pids) % 6
            folder = task / split / f"{pid:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_person(pid, index)).save(folder / f"{pid:04d}_c{camera}s1_{index:06d}_00.jpg", quality=90)
    (task / "done").touch()


def _person(pid: int, index: int) -> np.ndarray:
    """A 128x64 image: the person's colours in three bands (head, torso, legs) over noise."""
    rng = np.random.default_rng(pid * 100_003 + index)
    colours = np.random.default_rng(pid).integers(0, 256, (3, 3))
    image = rng.integers(0, 64, (*SIZE, 3)).astype(np.int32)
    for band, (top, bottom) in enumerate(((0, 24), (24, 72), (72, 128))):
        image[top:bottom, 12:52] += colours[band]
    return np.clip(image, 0, 255).astype(np.uint8)


def _task_opts(workers: int) -> dict:
    return {
        "augment_opts": {"level": "default", "img_size": list(SIZE)},
        "loader_opts": {"num_workers": workers, "multiprocessing_context": "fork"},
    }


def _peak_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def measure_decode(root: str, workers: int) -> dict:
    from fedevents.federated.reid_data import IMAGE_CACHE, load_image_set
    from fedevents.federated.tasks import ReidTasks

    tasks = ReidTasks(_task_opts(workers), root, [TASK], num_classes=751)
    start = time.perf_counter()
    counts = {split: len(load_image_set(tasks.tasks[TASK], split, tasks.augment_opts, decoder=tasks.decoder))
              for split in SPLITS}
    seconds = time.perf_counter() - start
    return {"workers": workers, "decode_s": seconds, "images": counts, "held_mib": IMAGE_CACHE.nbytes / 2**20,
            "peak_rss_mib": _peak_mib()}


def measure_float(root: str) -> dict:
    from fedevents.federated.reid_data import IMAGE_CACHE, load_image_set
    from fedevents.federated.tasks import ReidTasks

    tasks = ReidTasks(_task_opts(0), root, [TASK], num_classes=751)
    held = [tasks.augment_opts.normalise(load_image_set(tasks.tasks[TASK], s, tasks.augment_opts).pixels)
            for s in SPLITS]
    IMAGE_CACHE.clear()  # only the float copies stay, as before
    return {"held_mib": sum(t.nbytes for t in held) / 2**20, "peak_rss_mib": _peak_mib()}


def measure_train(root: str, width: int, batches: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from fedevents.federated.backbones import build_reid_model
    from fedevents.federated.seeds import generator
    from fedevents.federated.tasks import ReidTasks
    from fedevents.federated.training import train_local

    tasks = ReidTasks(_task_opts(0), root, [TASK], num_classes=751)
    pixels, labels = tasks.train_inputs("c", TASK)
    model = build_reid_model({"name": "resnet18", "num_classes": 751, "width": width}, generator=generator(0, "i"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def batch_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = model(xb)
        return torch.nn.functional.cross_entropy(logits, yb), logits

    def run(count: int) -> float:
        start = time.perf_counter()
        train_local(model, optimizer, None, None, pixels[: count * BATCH], labels[: count * BATCH], epochs=1,
                    batch_size=BATCH, shuffle=generator(0, "s"), batch_loss=batch_loss, augment=tasks.augment,
                    augment_generator=generator(0, "a"))
        return time.perf_counter() - start

    run(2)  # warm-up: allocator, kernels
    seconds = run(batches)
    per_epoch = seconds / batches * math.ceil(len(labels) / BATCH)
    return {"width": width, "batches_timed": batches, "epoch_s": per_epoch, "peak_rss_mib": _peak_mib(),
            "threads": torch.get_num_threads()}


def _isolated(function, *args) -> dict:
    # A fresh process per measurement (not a daemon: the decode workers are its children).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training (fedevents' default: 1)")
    parser.add_argument("--parts", default="decode,float32,train")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data if args.data is not None else Path(scratch)
        start = time.perf_counter()
        write_task(root)
        print(f"data: {root / TASK} ({time.perf_counter() - start:.0f} s to write)", flush=True)
        parts = args.parts.split(",")
        results = {"machine": describe(), "date": time.strftime("%Y-%m-%d"), "load": os.getloadavg(),
                   "decode": [], "train": []}
        for workers in (int(w) for w in args.workers.split(",")) if "decode" in parts else ():
            results["decode"].append(_isolated(measure_decode, str(root), workers))
            print(json.dumps(results["decode"][-1]), flush=True)
        if "float32" in parts:
            results["float32"] = _isolated(measure_float, str(root))
            print(json.dumps(results["float32"]), flush=True)
        for width in (64, 16) if "train" in parts else ():
            results["train"].append(_isolated(measure_train, str(root), width, args.batches, args.threads))
            print(json.dumps(results["train"][-1]), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
