"""Checkpoint bytes and seconds per round: content-addressed, incremental checkpoints against full copies.

    python benchmarks/bench_checkpoints.py [--only demo|reid-fedavg] [--method NAME] [--modes MODE ...]
                                           [--out FILE.json]

Two experiments, each run once with the checkpoint after every round (the default):

- ``demo``: configs/demo.yaml (FedAvg, MLP 64-64, 10 clients, 5 online, 12 rounds).
- ``reid-fedavg``: the FedSTIL-format FedAvg experiment file that ``fedevents data synth-reid`` writes, on a
  generated set of 3 clients x 2 tasks (20 people per task, 8 images each, 64x32), 3 rounds, resnet18 with
  FedSTIL's default ``fine_tuning`` (``base.layer4`` and ``classifier`` trainable, the rest frozen): the shape
  of FEDSTIL.md section 8, where the original runner writes 739 MiB of checkpoints.

Each experiment runs in six modes, one run after the other. "before": what the checkpointer did at first,
on the same states (same seeds, so the same training): a handler ``torch.save``s the whole state (every
client's full model and optimizer state) atomically (fsync, rename) after every round and keeps the newest
``checkpoint_keep`` (2) files; fedevents' own checkpoints run in round 0 and the last round only. The four
others are fedevents' checkpointer (``round-NNNNNN.pt`` manifests and ``packs/``) after every round, with the
optimizer's state kept across rounds or not (``optimizer_opts.keep_state``; the ReID file is a FedSTIL one in
all but its ``task_opts.dataset``, so it keeps the state unless told) and with the write overlapping the next
round or not; the sixth stores every client state whole, as fedevents did before checkpoints left out the
entries a client's next dispatch replaces. For each: the bytes the checkpoints wrote, their seconds (from taking the state to the end of
the write, from CheckpointSaved), the bytes left on disk when the run finished, and the run's wall time.

Last, the codecs: the final checkpoint's client weights that differ from the global model's, compressed each
way (plain, byte planes, XOR with the global weight, both; zlib and zstd at level 1), bytes and seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import anyio
import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.cli import build_experiment  # noqa: E402
from fedevents.engine import CheckpointSaved, RoundFinished  # noqa: E402
from fedevents.engine.config import load_experiments  # noqa: E402
from fedevents.federated.synth_reid import generate_synth_reid  # noqa: E402
from fedevents.handlers.atomic import write_atomic  # noqa: E402
from fedevents.handlers.checkpoint import Checkpointer, find_latest, load_checkpoint  # noqa: E402

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


#: name -> (keep the optimizer's state, overlap the write with the next round, leave out the entries the
#: next dispatch replaces); None: full copies.
MODES: dict[str, tuple[bool, bool, bool] | None] = {
    "before": None,
    "kept state, no overlap": (True, False, True),
    "kept state, overlap": (True, True, True),
    "fresh state, no overlap": (False, False, True),
    "fresh state, overlap": (False, True, True),
    "fresh state, overlap, whole states": (False, True, False),
}


def run_one(name: str, config_path: Path, overrides: list[str], work: Path, chosen: list[str]) -> dict[str, Any]:
    """One run of the experiment per mode, one after the other; then the codecs on the last one's checkpoint."""
    modes = {}
    for index, mode in enumerate(chosen):
        modes[mode] = run_mode(config_path, overrides, work / f"mode-{index}", MODES[mode])
        print(json.dumps({"name": name, "mode": mode, **modes[mode]}), flush=True)
    last = find_latest(work / f"mode-{len(chosen) - 1}" / "ckpts", load_experiments([config_path])[0].exp_name)
    return {"name": name, "rounds": len(modes[chosen[-1]]["bytes"]), "modes": modes,
            "codecs": codecs(last) if last is not None and MODES[chosen[-1]] is not None else {}}


def run_mode(config_path: Path, overrides: list[str], work: Path,
             how: tuple[bool, bool, bool] | None) -> dict[str, Any]:
    full_copies = how is None
    overrides = [*overrides, f"logs_dir={str(work / 'logs')!r}", f"checkpoints_dir={str(work / 'ckpts')!r}"]
    if full_copies:
        # fedevents' own checkpoints only in round 0 and the last round, so they barely touch the timing.
        overrides.append("exp_opts.checkpoint_interval=1000000")
    else:
        overrides.append(f"optimizer_opts.keep_state={str(how[0]).lower()}")
    (config,) = load_experiments([config_path], overrides=overrides)
    exp = build_experiment(config, console=None)
    if how is not None:
        exp.component(Checkpointer).overlap = how[1]
        exp.component(Checkpointer).leave_out = how[2]
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


def codecs(manifest: Path) -> dict[str, dict[str, float]]:
    """Bytes and seconds of each way to compress the checkpoint's client weights that differ from the global's."""
    state = load_checkpoint(manifest).federation
    glob = state["server"]["model"]
    pairs = [(tensor, glob[name]) for client in state["clients"].values() for name, tensor in client["model"].items()
             if tensor.dtype == torch.float32 and tensor.numel() >= 1024 and not torch.equal(tensor, glob[name])]

    def planes(bits: np.ndarray) -> bytes:
        return np.ascontiguousarray(bits.view(np.uint8).reshape(-1, 4).T).tobytes()

    forms: dict[str, Callable[[np.ndarray, np.ndarray], bytes]] = {
        "plain": lambda a, b: a.tobytes(), "byte planes": lambda a, b: planes(a),
        "xor": lambda a, b: (a ^ b).tobytes(), "xor + byte planes": lambda a, b: planes(a ^ b)}
    packers: dict[str, Callable[[bytes], bytes]] = {
        "zlib-1": lambda d: zlib.compress(d, 1), "zstd-1": zstandard.ZstdCompressor(level=1).compress,
        "zstd-3": zstandard.ZstdCompressor(level=3).compress}
    raw = sum(t.numel() * 4 for t, _ in pairs)
    if not raw:  # every client state of it left out what differs (the next round dispatches to them all)
        return {}
    out: dict[str, dict[str, float]] = {"raw": {"bytes": raw, "ratio": 1.0, "seconds": 0.0}}
    for form, shape in forms.items():
        for packer, pack in packers.items():
            began, size = time.perf_counter(), 0
            for tensor, base in pairs:
                size += len(pack(shape(tensor.numpy().view(np.uint32), base.numpy().view(np.uint32))))
            out[f"{form}, {packer}"] = {"bytes": size, "ratio": size / raw, "seconds": time.perf_counter() - began}
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| experiment | mode | checkpoints | written | on disk at the end | s per checkpoint | run wall s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for mode, m in r["modes"].items():
            lines.append(f"| {r['name']} | {mode} | {len(m['bytes'])} | {m['written'] / MIB:.2f} MiB | "
                         f"{m['on_disk'] / MIB:.2f} MiB | {sum(m['seconds']) / len(m['seconds']):.3f} | "
                         f"{m['wall_s']:.1f} |")
    for r in results:
        if r["codecs"]:
            lines += ["", f"{r['name']}: client weights that differ from the global model's, last checkpoint",
                      "", "| form, packer | MiB | of raw | s |", "|---|---:|---:|---:|"]
            lines += [f"| {k} | {v['bytes'] / MIB:.2f} | {v['ratio']:.3f} | {v['seconds']:.2f} |"
                      for k, v in r["codecs"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("demo", "reid-fedavg"))
    parser.add_argument("--method", help="run the ReID experiment with this exp_method instead of fedavg")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    print(describe())
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        for name, (path, overrides) in experiments(Path(tmp)).items():
            if args.only and name != args.only:
                continue
            if args.method and name != "demo":
                name, overrides = f"reid-{args.method}", [*overrides, f"exp_method={args.method}"]
            results.append(run_one(name, path, overrides, Path(tmp) / name, args.modes))
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps({"machine": describe(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
