"""The identity of the data a run trains on, cheap enough to take at every start and compare on resume.

ReID tasks are folders of image files: a task's fingerprint is its number of images, their total size and
a hash of the sorted (path, size) list, so it takes one ``stat`` per file and never reads an image. Only
the files the loader reads count: a note, a thumbnail cache or a broken link beside the images is not data.
A generated data set is its spec.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

from .reid_data import is_image_file
from .registry import is_target
from .tasks import all_tasks

__all__ = ["data_fingerprint", "describe_change"]


def data_fingerprint(config: Mapping[str, Any]) -> dict[str, Any]:
    """Give the fingerprint of the data ``config``'s tasks read: by task for ReID, the spec otherwise."""
    opts = config["task_opts"]
    dataset = opts.get("dataset")
    if dataset == "reid":
        root = Path(config["datasets_dir"])
        return {"dataset": "reid", "tasks": {task: _folder(root / task) for task in sorted(set(all_tasks(config["clients"])))}}
    # A user data set is what its options and the seed make of its files, which only it knows.
    spec = opts.get("dataset_opts") if is_target(str(dataset)) else opts.get(dataset)
    return {"dataset": dataset, "spec": dict(spec or {}), "seed": config.get("random_seed")}


def describe_change(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """Say in one line how the data fingerprint ``now`` differs from ``saved``."""
    if saved.get("dataset") != now.get("dataset") or "tasks" not in saved or "tasks" not in now:
        return f"expected the data set {_brief(saved)}, found {_brief(now)}"
    before, after = saved["tasks"], now["tasks"]
    changed = [task for task in sorted(before.keys() | after.keys()) if before.get(task) != after.get(task)]
    shown = "; ".join(f"task {task}: expected {_files(before.get(task))}, found {_files(after.get(task))}"
                      for task in changed[:3])
    more = f"; and {len(changed) - 3} more tasks" if len(changed) > 3 else ""
    return f"{shown}{more}"


def _folder(root: Path) -> dict[str, Any]:
    listing = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # the loader skips hidden folders too
        for name in sorted(files):
            path = os.path.join(folder, name)
            if is_image_file(Path(path)):
                listing.append(f"{os.path.relpath(path, root)}\0{os.path.getsize(path)}")
    digest = hashlib.blake2b("\n".join(listing).encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
    return {"files": len(listing), "bytes": sum(int(entry.rpartition("\0")[2]) for entry in listing),
            "digest": digest}


def _files(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "no such task"
    same_counts = "" if entry.get("files") is None else f"{entry['files']} files, {entry['bytes']} bytes"
    return f"{same_counts} (list {str(entry.get('digest'))[:8]})"


def _brief(fingerprint: Mapping[str, Any]) -> str:
    if "tasks" in fingerprint:
        return f"{fingerprint.get('dataset')} with {len(fingerprint['tasks'])} tasks"
    return f"{fingerprint.get('dataset')} {fingerprint.get('spec')}"
