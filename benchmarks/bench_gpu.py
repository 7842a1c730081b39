"""fedevents on one device with 1 and several slots: the side-by-side presets, and the ReID backbones in float32
and in bfloat16 (``exp_opts.precision``). Whole ``fedevents run`` processes, one after another.

    python benchmarks/bench_gpu.py [--device cuda:0] [--slots 1,4] [--presets small,wide,heavy]
                                   [--backbones resnet18,resnet50] [--precisions fp32,bf16] [--quick] [--out F]

For each run: wall time, start of the process to the first training, the mean of the rounds after the first,
the mean time a training held its slot (``TrainDone.ran_s``), training samples per second over the rounds,
the CPU time and peak RSS of the process tree. On a CUDA device also: the device's utilisation (mean of
``nvidia-smi`` samples every 100 ms between the first training and the last event) and its memory in use
(peak of the same samples), torch's peak allocated memory (``gpu_probe.PeakMemory``, a handler the run loads
from its config), and what each slot past the first adds to that peak: (peak at N slots - peak at 1) / (N - 1),
the memory one more concurrent client costs. ``--device cpu`` runs the same on the CPU (no device columns).

ReID: synthetic ReID data (``fedevents data synth-reid``; 4 clients, 1 task, 64 identities of 8 images, 256x128,
``--quick``: 64x32 and 12 identities), FedAvg with the data set's own experiment (cross-entropy and triplet,
Adam), 3 rounds of every client, 2 epochs; the backbone at its full width (``--quick``: width 8).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import compile_fedevents, describe  # noqa: E402
from _process import run_sampled  # noqa: E402
from bench_vs_loop import fedevents_config  # noqa: E402
from workload import PRESETS, QUICK  # noqa: E402

from fedevents.engine import read_events  # noqa: E402


class DeviceSampler:
    """``nvidia-smi`` samples of one GPU's utilisation (%) and memory in use (MiB), every 100 ms, with times."""

    def __init__(self, index: int) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._process = subprocess.Popen(
            ["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu,memory.used",
             "--format=csv,noheader,nounits", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and all(p.replace(".", "", 1).isdigit() for p in parts):
                self.samples.append((time.time(), float(parts[0]), float(parts[1])))

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
        self._reader.join(timeout=10)

    def between(self, start: float, end: float) -> tuple[float | None, float | None]:
        """Mean utilisation and peak memory of the samples taken between ``start`` and ``end``."""
        inside = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not inside:
            return None, None
        return statistics.fmean(u for u, _ in inside), max(m for _, m in inside)


def run(config: dict, folder: Path, device: str) -> dict:
    """One ``fedevents run`` of ``config`` in ``folder``: the figures the module docstring lists."""
    folder.mkdir(parents=True)
    shutil.copy(HERE / "gpu_probe.py", folder / "gpu_probe.py")
    probe = folder / "probe.json"
    config = {**config, "device": [device],
              "handlers": [{"target": "gpu_probe:PeakMemory", "kwargs": {"out": str(probe), "device": device}}]}
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    sampler = DeviceSampler(int(device.partition(":")[2] or 0)) if device.startswith("cuda") else None
    try:
        done = run_sampled([sys.executable, "-m", "fedevents.cli", "run", str(path), "--quiet"], folder / "run.log")
    finally:
        if sampler is not None:
            sampler.stop()
    (events_file,) = (folder / "logs").glob("*.events.jsonl")
    events = list(read_events(events_file))
    first = min(e["wall_time"] for e in events if e["event"] == "TrainStarted")
    trained = [e for e in events if e["event"] == "TrainDone"]
    rounds = [e["seconds"] for e in events if e["event"] == "RoundFinished" and e["round"] > 0]
    samples = sum(e["samples"] for e in trained) * int(config["task_opts"].get("train_epochs", 1))
    util, used = sampler.between(first, events[-1]["wall_time"]) if sampler is not None else (None, None)
    peak = json.loads(probe.read_text())
    return {"wall_s": done.wall_s, "cpu_s": done.cpu_s, "peak_rss_mib": done.peak_rss / 2**20,
            "startup_s": first - done.started, "round_s": statistics.fmean(rounds[1:] or rounds),
            "train_ran_ms": 1000 * statistics.fmean(e["ran_s"] for e in trained),
            "samples_per_s": samples / sum(rounds), "gpu_util_pct": util, "gpu_used_mib": used,
            "allocated_mib": peak["allocated"] / 2**20, "reserved_mib": peak["reserved"] / 2**20}


def reid_config(data: Path, backbone: str, precision: str, slots: int, quick: bool) -> dict:
    config = yaml.safe_load((data / "experiment.yaml").read_text())
    config.update(exp_name=f"reid-{backbone}-{precision}-{slots}", parallel=slots)
    config["exp_opts"].update(comm_rounds=3, val_interval=3, precision=precision)
    config["model_opts"].update(name=backbone, **({"width": 8} if quick else {}))
    config["task_opts"].update(train_epochs=2)
    return config


def table(rows: list[tuple[str, dict]]) -> str:
    def cell(value: float | None, digits: int) -> str:
        return "—" if value is None else f"{value:,.{digits}f}"

    lines = ["| run | wall (s) | start-up (s) | round (s) | training holds its slot (ms) | samples/s | CPU (s) "
             "| peak RSS (MiB) | device util (%) | device memory used (MiB) | torch peak allocated (MiB) |",
             "|---|" + "---:|" * 10]
    for name, r in rows:
        lines.append(f"| {name} | {cell(r['wall_s'], 2)} | {cell(r['startup_s'], 2)} | {cell(r['round_s'], 3)} | "
                     f"{cell(r['train_ran_ms'], 1)} | {cell(r['samples_per_s'], 0)} | {cell(r['cpu_s'], 2)} | "
                     f"{cell(r['peak_rss_mib'], 0)} | {cell(r['gpu_util_pct'], 0)} | {cell(r['gpu_used_mib'], 0)} | "
                     f"{cell(r['allocated_mib'] or None, 0)} |")
    return "\n".join(lines)


def per_slot(rows: dict[str, dict], slots: list[int]) -> list[str]:
    """What each slot past the first adds to torch's peak allocated memory, per run family."""
    out = []
    for name, r in rows.items():
        if not name.endswith(f" x{slots[0]}") or not r["allocated_mib"]:
            continue
        family = name[: -len(f" x{slots[0]}")]
        for n in slots[1:]:
            more = rows.get(f"{family} x{n}")
            if more is not None and more["allocated_mib"]:
                out.append(f"{family}: {(more['allocated_mib'] - r['allocated_mib']) / (n - slots[0]):,.0f} MiB "
                           f"per slot past {slots[0]} (x{n})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--slots", default="1,4", help="slot counts (parallel) to run each workload with")
    parser.add_argument("--presets", default="small,wide,heavy", help="side-by-side presets ('' for none)")
    parser.add_argument("--backbones", default="resnet18,resnet50", help="ReID backbones ('' for none)")
    parser.add_argument("--precisions", default="fp32,bf16", help="precisions of the ReID runs")
    parser.add_argument("--quick", action="store_true", help="small presets and images: a smoke test")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    slots = [int(s) for s in args.slots.split(",")]
    presets = QUICK if args.quick else PRESETS
    print(f"machine: {describe()}; device {args.device}")
    print(compile_fedevents())
    rows: dict[str, dict] = {}
    with TemporaryDirectory(prefix="bench-gpu-") as scratch:
        root = Path(scratch)
        for name in filter(None, args.presets.split(",")):
            for n in slots:
                label = f"{name} x{n}"
                folder = root / label.replace(" ", "-")
                config = fedevents_config(presets[name], folder, n)
                rows[label] = run(config, folder, args.device)
                print(f"{label}: {rows[label]['wall_s']:.2f} s", flush=True)
        backbones = list(filter(None, args.backbones.split(",")))
        if backbones:
            data = root / "reid-data"
            size = ["64", "32"] if args.quick else ["256", "128"]
            ids = "12" if args.quick else "64"
            subprocess.run([sys.executable, "-m", "fedevents.cli", "data", "synth-reid", str(data), "--clients", "4",
                            "--tasks", "1", "--ids-per-task", ids, "--images-per-id", "8", "--img-size", *size],
                           check=True, stdout=subprocess.DEVNULL)
        for backbone in backbones:
            for precision in args.precisions.split(","):
                for n in slots:
                    label = f"{backbone} {precision} x{n}"
                    folder = root / label.replace(" ", "-")
                    config = reid_config(data, backbone, precision, n, args.quick)
                    config.update(logs_dir=str(folder / "logs"), checkpoints_dir=str(folder / "ckpts"))
                    rows[label] = run(config, folder, args.device)
                    print(f"{label}: {rows[label]['wall_s']:.2f} s", flush=True)
    print()
    print(table(list(rows.items())))
    for line in per_slot(rows, slots):
        print(line)
    if args.out:
        args.out.write_text(json.dumps({"device": args.device, "machine": describe(), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
