"""Checkpoint bytes and seconds per round: content-addressed, incremental checkpoints against full copies.

    python benchmarks/bench_checkpoints.py [--only demo|reid-fedavg] [--out FILE.json]

Two experiments, each run once with the checkpoint after every round (the default):

- ``demo``: configs/demo.yaml (FedAvg, MLP 64-64, 10 clients, 5 online, 12 rounds).
- ``reid-fedavg``: the FedSTIL-format FedAvg experiment file that ``fedevents data synth-reid`` writes, on a
  generated set of 3 clients x 2 tasks (20 people per task, 8 images each, 64x32), 3 rounds, resnet18 with
  FedSTIL's default ``fine_tuning`` (``base.layer4`` and ``classifier`` trainable, the rest frozen): the shape
  of FEDSTIL.md section 8, where the original runner writes 739 MiB of checkpoints.

Each experiment runs twice, one run after the other. "after": fedevents' checkpointer (``round-NNNNNN.pt``
manifests and ``packs/``) after every round; bytes each checkpoint wrote and its seconds, from
CheckpointSaved, and the bytes left on disk when the run finished. "before": what the checkpointer did until
now, on the same states (same seeds, so the same training): a handler ``torch.save``s the whole state (every
client's full model and optimizer state) atomically (fsync, rename) after every round and keeps the newest
``checkpoint_keep`` (2) files; fedevents' own checkpoints run in round 0 and the last round only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.cli import build_experiment  # noqa: E402
from fedevents.engine import CheckpointSaved, RoundFinished  # noqa: E402
from fedevents.engine.config import load_experiments  # noqa: E402
from fedevents.federated.synth_reid import generate_synth_reid  # noqa: E402
from fedevents.handlers.atomic import write_atomic  # noqa: E402
from fedevents.handlers.checkpoint import Checkpointer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


class FullCopies:
    """The checkpoints as they were: the whole state, every tensor in full, after every round; keep 2."""

    def __init__(self, checkpointer: Checkpointer, folder: Path, keep: int = 2) -> None:
        self.checkpointer, self.folder, self.keep = checkpointer, folder, keep
        self.rounds: list[dict[str, float]] = []
        folder.mkdir(parents=True)

    def subscribe(self, bus: Any) -> list[Any]:
        return [bus.subscribe(RoundFinished, self.save, work=True, priority=-2_000)]

    async def save(self, ev: RoundFinished) -> None:
        await anyio.to_thread.run_sync(self._write, ev.round)

    def _write(self, rnd: int) -> None:
        began = time.perf_counter()
        path = self.folder / f"round-{rnd:06d}.pt"
        state = {"round": rnd, "federation": self.checkpointer.federation.state_dict()}
        write_atomic(path, lambda f: torch.save(state, f))  # flushed to disk, as checkpoints are
        self.rounds.append({"round": rnd, "bytes": path.stat().st_size, "seconds": time.perf_counter() - began})
        for old in sorted(self.folder.glob("round-*.pt"), reverse=True)[self.keep:]:
            old.unlink()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_one(name: str, config_path: Path, overrides: list[str], work: Path) -> dict[str, Any]:
    """Two runs of one experiment: "after" with fedevents' checkpoints, "before" with full copies instead."""
    after = run_mode(config_path, overrides, work / "after", full_copies=False)
    before = run_mode(config_path, overrides, work / "before", full_copies=True)
    return {"name": name, "rounds": len(after["bytes"]), "after": after, "before": before}


def run_mode(config_path: Path, overrides: list[str], work: Path, *, full_copies: bool) -> dict[str, Any]:
    overrides = [*overrides, f"logs_dir={str(work / 'logs')!r}", f"checkpoints_dir={str(work / 'ckpts')!r}"]
    if full_copies:
        # fedevents' own checkpoints only in round 0 and the last round, so they barely touch the timing.
        overrides.append("exp_opts.checkpoint_interval=1000000")
    (config,) = load_experiments([config_path], overrides=overrides)
    exp = build_experiment(config, console=None)
    full = exp.add(FullCopies(exp.component(Checkpointer), work / "full")) if full_copies else None
    saved: list[CheckpointSaved] = []
    exp.bus.subscribe(CheckpointSaved, saved.append)
    began = time.perf_counter()
    exp.run(handle_signals=False)
    wall = time.perf_counter() - began
    if full is not None:
        return {"wall_s": wall, "written": sum(r["bytes"] for r in full.rounds),
                "on_disk": folder_bytes(work / "full"), "seconds": [round(r["seconds"], 4) for r in full.rounds],
                "bytes": [r["bytes"] for r in full.rounds]}
    return {"wall_s": wall, "written": sum(e.nbytes for e in saved), "on_disk": folder_bytes(work / "ckpts"),
            "seconds": [round(e.seconds, 4) for e in saved], "bytes": [e.nbytes for e in saved]}


def experiments(work: Path) -> dict[str, tuple[Path, list[str]]]:
    data = work / "reid-3x2"
    summary = generate_synth_reid(data, clients=3, tasks=2, ids_per_task=20, images_per_id=8, img_size=(64, 32))
    reid = ["exp_opts.comm_rounds=3", "exp_opts.val_interval=3",
            "model_opts.fine_tuning=[base.layer4, classifier]"]
    return {"demo": (ROOT / "configs/demo.yaml", []), "reid-fedavg": (Path(summary["experiment"]), reid)}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| experiment | checkpoints | written: before | written: after | on disk at the end: before | "
             "on disk at the end: after | s per checkpoint: before | s per checkpoint: after | run wall s: "
             "before | run wall s: after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['name']} | {r['rounds']} | {b['written'] / MIB:.2f} MiB | {a['written'] / MIB:.2f} MiB | "
                     f"{b['on_disk'] / MIB:.2f} MiB | {a['on_disk'] / MIB:.2f} MiB | "
                     f"{sum(b['seconds']) / len(b['seconds']):.3f} | {sum(a['seconds']) / len(a['seconds']):.3f} | "
                     f"{b['wall_s']:.1f} | {a['wall_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("demo", "reid-fedavg"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(describe())
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        for name, (path, overrides) in experiments(Path(tmp)).items():
            if args.only and name != args.only:
                continue
            results.append(run_one(name, path, overrides, Path(tmp) / name))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps({"machine": describe(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
