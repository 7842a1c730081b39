"""One training step of a ReID backbone in float32 and in bfloat16 (``exp_opts.precision: bf16``), side by side.

    python benchmarks/bench_precision.py [--device cpu] [--backbones resnet18,resnet50] [--batch 32]
                                         [--img-size 256 128] [--repeats 5] [--steps 5]

Each repeat times ``--steps`` steps of each precision in turn (after one step of warm-up), the model's forward
pass cast as fedevents casts it (``fedevents.federated.precision.forward_precision``), cross-entropy on its
logits, backward and an SGD step; the figure is the median over repeats of the mean step. CPU: process CPU
time with one torch thread; CUDA: wall time between synchronisations, and torch's peak allocated memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

from fedevents.federated import build_reid_model, generator  # noqa: E402
from fedevents.federated.precision import PRECISIONS, forward_precision  # noqa: E402


def timed_steps(model: torch.nn.Module, device: torch.device, precision: str, x: torch.Tensor, y: torch.Tensor,
                optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Seconds per step, over ``steps`` steps."""
    cuda = device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    with forward_precision(model, device, precision):
        if cuda:
            torch.cuda.synchronize(device)
        began = clock()
        for _ in range(steps):
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(logits, y).backward()
            optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
        return (clock() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbones", default="resnet18,resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    print(f"machine: {describe()}; device {device}; batch {args.batch} of {args.img_size[0]}x{args.img_size[1]}, "
          f"{args.repeats} repeats of {args.steps} steps each")
    print("\n| backbone | fp32, s per step | bf16, s per step | bf16 / fp32 | fp32 peak (MiB) | bf16 peak (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.backbones.split(","):
        model = build_reid_model({"name": name, "num_classes": 64}, generator=generator(0, "bench-precision")).to(device)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, *args.img_size, generator=gen).to(device)
        y = torch.randint(0, 64, (args.batch,), generator=gen).to(device)
        times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        peaks = dict.fromkeys(PRECISIONS, 0.0)
        for precision in PRECISIONS:
            timed_steps(model, device, precision, x, y, optimizer, 1)  # warm-up: kernels chosen, memory cached
        for _ in range(args.repeats):
            for precision in PRECISIONS:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times[precision].append(timed_steps(model, device, precision, x, y, optimizer, args.steps))
                if device.type == "cuda":
                    peaks[precision] = max(peaks[precision], torch.cuda.max_memory_allocated(device) / 2**20)
        fp32, bf16 = (statistics.median(times[p]) for p in PRECISIONS)
        peak = [f"{peaks[p]:,.0f}" if device.type == "cuda" else "—" for p in PRECISIONS]
        print(f"| {name} | {fp32:.4f} | {bf16:.4f} | {bf16 / fp32:.2f} | {peak[0]} | {peak[1]} |", flush=True)


if __name__ == "__main__":
    main()
