"""A synthetic person re-identification data set in the FedSTIL layout, so ReID runs need no downloads.

Each person is a figure with a distinct appearance: upper and lower body colours, a pattern on the upper body
(plain, stripes either way, checks), hair and skin tones, and sometimes a bag. Each image moves the figure a
little and adds noise; each camera of a client casts its own colour and brightness over what it sees. Task
``t`` is a period of time with its own palette and lighting, shared by every client, so moving from task to
task changes the domain and forgetting shows; every (client, task) folder holds its own people.

Within a task, train people and query/gallery people are disjoint (the ReID protocol); the query split holds
each evaluated person's first image from every camera and the gallery the rest.
"""

from __future__ import annotations

import colorsys
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from .seeds import generator

__all__ = ["generate_synth_reid", "task_name"]

# The palette of a task spans this share of the hue circle, so tasks overlap a little but differ on the whole.
_HUE_SPAN = 0.3
# Camera casts of up to ±25 % per channel: strong enough that raw pixels often fail to match across cameras.
_CAMERA_GAIN = 0.25
_CAMERA_OFFSET = 0.06
_NOISE = 0.04
_SKIN = ((0.87, 0.72, 0.60), (0.72, 0.53, 0.40), (0.50, 0.35, 0.25), (0.95, 0.82, 0.72))
_HAIR = ((0.08, 0.06, 0.05), (0.35, 0.22, 0.12), (0.75, 0.62, 0.35), (0.55, 0.55, 0.55))
_PATTERNS = 4  # plain, horizontal stripes, vertical stripes, checks


def task_name(client: int, task: int) -> str:
    """Give the folder name of ``task`` of ``client``."""
    return f"client-{client}-task-{task}"


def generate_synth_reid(
    out_dir: str | Path,
    *,
    clients: int,
    tasks: int,
    ids_per_task: int,
    images_per_id: int = 8,
    cameras: int = 2,
    img_size: tuple[int, int] | list[int] = (64, 32),
    seed: int = 0,
    sustain_rounds: int = 5,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a synthetic ReID data set and its experiment file under ``out_dir``; give a summary of both.

    Each of the ``clients * tasks`` task folders holds ``ids_per_task`` people: the first
    ``ids_per_task - ids_per_task // 2`` in train, the others in query and gallery. Person ids are unique
    over the whole set (they start at 1), so a model may share one classifier over every task. Images are
    ``img_size`` = [height, width] PNG files, byte-identical for the same arguments. ``out_dir/experiment.yaml``
    is a FedSTIL-format FedAvg experiment over the set, ``sustain_rounds`` rounds per task. Existing task
    folders or experiment file are an error unless ``overwrite`` is set, which replaces just those.
    """
    height, width = _check_args(clients, tasks, ids_per_task, images_per_id, cameras, img_size, sustain_rounds)
    root = Path(out_dir).resolve()
    names = [[task_name(c, t) for t in range(tasks)] for c in range(clients)]
    _make_room(root, [n for row in names for n in row], overwrite)
    counts = {split: 0 for split in ("train", "query", "gallery")}
    for c in range(clients):
        for t in range(tasks):
            first_pid = 1 + (c * tasks + t) * ids_per_task
            spec = _TaskSpec(seed, c, t, ids_per_task, images_per_id, cameras, height, width, first_pid)
            for split, written in _write_task(root / names[c][t], spec).items():
                counts[split] += written
    train_ids = clients * tasks * (ids_per_task - ids_per_task // 2)
    experiment = root / "experiment.yaml"
    experiment.write_text(_experiment_yaml(root, names, seed, train_ids, sustain_rounds, (height, width)))
    return {
        "out_dir": str(root),
        "experiment": str(experiment),
        "tasks": {f"client-{c}": names[c] for c in range(clients)},
        "images": counts,
        "train_ids": train_ids,
        "eval_ids": clients * tasks * (ids_per_task // 2),
    }


@dataclass(frozen=True, slots=True)
class _TaskSpec:
    """Everything that decides the pixels of one (client, task) folder."""

    seed: int
    client: int
    task: int
    ids: int
    per_id: int
    cameras: int
    height: int
    width: int
    first_pid: int


def _write_task(task_dir: Path, spec: _TaskSpec) -> dict[str, int]:
    person = np.repeat(np.arange(spec.ids), spec.per_id)  # local person index per image
    shot = np.tile(np.arange(spec.per_id), spec.ids)  # image index within its person
    camera = shot % spec.cameras  # 0-based; file names count cameras from 1
    pixels = _render(spec, person, camera)
    train_ids = spec.ids - spec.ids // 2
    counts = {"train": 0, "query": 0, "gallery": 0}
    made: set[Path] = set()
    for frame, (p, n, cam) in enumerate(zip(person.tolist(), shot.tolist(), camera.tolist())):
        split = "train" if p < train_ids else ("query" if n < spec.cameras else "gallery")
        pid = spec.first_pid + p
        folder = task_dir / split / f"{pid:04d}"
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        Image.fromarray(pixels[frame]).save(folder / f"{pid:04d}_c{cam + 1}s1_{frame:06d}_00.png", format="PNG")
        counts[split] += 1
    return counts


# Pixels are computed in numpy: the arrays are small, and torch's intra-op threads cost far more than they
# save here whenever other processes keep the cores busy. Every draw still comes from a seeded torch generator.
def _render(spec: _TaskSpec, person: np.ndarray, camera: np.ndarray) -> np.ndarray:
    """Draw every image of a task at once: uint8 [N, H, W, 3]."""
    people = {key: value[person] for key, value in _people(spec).items()}
    count = person.size
    gen = generator(spec.seed, "synth-reid", "images", spec.client, spec.task)
    shift_x = (_uniform(gen, count, 1, 1) - 0.5) * 0.16
    shift_y = (_uniform(gen, count, 1, 1) - 0.5) * 0.08
    stretch = 0.9 + 0.2 * _uniform(gen, count, 1, 1)
    ys = ((np.arange(spec.height, dtype=np.float32) + 0.5) / spec.height).reshape(1, -1, 1)
    xs = ((np.arange(spec.width, dtype=np.float32) + 0.5) / spec.width).reshape(1, 1, -1)
    # Body coordinates per image [N, H, W]: x from the body's centre line in body widths, y from the top.
    bx = (xs - 0.5 - shift_x) / (stretch * _column(people["build"]))
    by = ys - shift_y
    canvas = _background(spec, count, gen)
    waist = _column(people["waist"])
    legs = (np.abs(bx) >= 0.035) & (np.abs(bx) <= 0.25) & (by >= waist) & (by < 0.95)
    _paint(canvas, legs, people["lower"])
    torso = (np.abs(bx) <= 0.3) & (by >= 0.21) & (by < waist)
    _paint(canvas, torso, people["upper"])
    _paint(canvas, torso & _pattern(people, bx, by), people["accent"])
    head = (bx / 0.17) ** 2 + ((by - 0.12) / 0.085) ** 2 <= 1.0
    _paint(canvas, head, people["skin"])
    _paint(canvas, head & (by < 0.1), people["hair"])
    side = _column(people["bag_side"])
    bag = _column(people["bag"]) & (side * bx >= 0.3) & (side * bx <= 0.44) & (by >= 0.33) & (by <= 0.6)
    _paint(canvas, bag, people["bag_colour"])
    return _photograph(spec, canvas, camera, gen)


def _people(spec: _TaskSpec) -> dict[str, np.ndarray]:
    """Draw the appearance of every person of a task, colours as [people, 3] in [0, 1]."""
    gen = generator(spec.seed, "synth-reid", "people", spec.client, spec.task)
    hue = _palette_centre(spec.seed, spec.task)
    n = spec.ids

    def colours(spread: float) -> np.ndarray:
        hues = hue + (_uniform(gen, n) - 0.5) * spread
        return _hsv_to_rgb(hues, 0.35 + 0.65 * _uniform(gen, n), 0.3 + 0.7 * _uniform(gen, n))

    upper, lower = colours(_HUE_SPAN), colours(_HUE_SPAN)
    # The accent is a darkened complement of the upper colour, so a pattern always stands out.
    accent = 1.0 - upper * (0.6 + 0.4 * _uniform(gen, n, 1))
    return {
        "upper": upper,
        "lower": lower,
        "accent": accent,
        "pattern": _integers(gen, 0, _PATTERNS, n),
        "period": _integers(gen, 2, 5, n).astype(np.float32),
        "skin": np.array(_SKIN, dtype=np.float32)[_integers(gen, 0, len(_SKIN), n)],
        "hair": np.array(_HAIR, dtype=np.float32)[_integers(gen, 0, len(_HAIR), n)],
        "build": 0.85 + 0.3 * _uniform(gen, n),
        "waist": 0.5 + 0.1 * _uniform(gen, n),
        "bag": _uniform(gen, n) < 0.4,
        "bag_side": (_integers(gen, 0, 2, n) * 2 - 1).astype(np.float32),
        "bag_colour": colours(1.0),
    }


def _pattern(people: dict[str, np.ndarray], bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    # Stripes are measured in pixels of a 64 x 32 image, so a pattern keeps its look at other sizes.
    period = _column(people["period"])
    rows = np.floor(by * 64 / period).astype(np.int64) % 2 == 1
    cols = np.floor((bx + 1.0) * 32 / period).astype(np.int64) % 2 == 1
    kind = _column(people["pattern"])
    return ((kind == 1) & rows) | ((kind == 2) & cols) | ((kind == 3) & (rows ^ cols))


def _background(spec: _TaskSpec, count: int, gen: torch.Generator) -> np.ndarray:
    base = 0.25 + 0.35 * _uniform(generator(spec.seed, "synth-reid", "domain", spec.task), 3)
    # A vertical gradient per image, like a floor and a wall, so the background is not one flat colour.
    ramp = (np.arange(spec.height, dtype=np.float32) / spec.height).reshape(1, -1, 1, 1)
    tilt = 0.15 * (_uniform(gen, count, 1, 1, 1) - 0.5)
    canvas = base.reshape(1, 1, 1, 3) + tilt * ramp
    return np.ascontiguousarray(np.broadcast_to(canvas, (count, spec.height, spec.width, 3)))


def _photograph(spec: _TaskSpec, canvas: np.ndarray, camera: np.ndarray, gen: torch.Generator) -> np.ndarray:
    """Apply the task's lighting, each camera's cast, and sensor noise; give uint8 [N, H, W, 3]."""
    lighting = 0.8 + 0.4 * _uniform(generator(spec.seed, "synth-reid", "lighting", spec.task), 3)
    cams = generator(spec.seed, "synth-reid", "cameras", spec.client)
    gain = 1.0 + _CAMERA_GAIN * (2 * _uniform(cams, spec.cameras, 3) - 1)
    offset = _CAMERA_OFFSET * (2 * _uniform(cams, spec.cameras, 1) - 1)
    image = canvas * lighting * gain[camera].reshape(-1, 1, 1, 3) + offset[camera].reshape(-1, 1, 1, 1)
    image += _NOISE * torch.randn(image.shape, generator=gen).numpy()
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _paint(canvas: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> None:
    np.copyto(canvas, colour.reshape(-1, 1, 1, 3), where=mask[..., None])


def _column(values: np.ndarray) -> np.ndarray:
    return values.reshape(-1, 1, 1)


def _uniform(gen: torch.Generator, *shape: int) -> np.ndarray:
    return torch.rand(shape, generator=gen).numpy()


def _integers(gen: torch.Generator, low: int, high: int, count: int) -> np.ndarray:
    return torch.randint(low, high, (count,), generator=gen).numpy()


def _palette_centre(seed: int, task: int) -> float:
    # Golden-ratio steps spread the tasks' palettes evenly round the hue circle; the seed turns the circle.
    turn = float(_uniform(generator(seed, "synth-reid", "palette"), 1)[0])
    return (turn + task * 0.618034) % 1.0


def _hsv_to_rgb(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    rgb = [colorsys.hsv_to_rgb(h % 1.0, s, v) for h, s, v in zip(hue.tolist(), sat.tolist(), val.tolist())]
    return np.array(rgb, dtype=np.float32).reshape(-1, 3)


def _experiment_yaml(
    root: Path, names: list[list[str]], seed: int, train_ids: int, sustain: int, size: tuple[int, int]
) -> str:
    tasks = len(names[0])
    experiment = {
        "exp_name": "synth-reid",
        "exp_method": "fedavg",
        "datasets_dir": str(root),
        "random_seed": seed,
        # One validation at the end of each task, so each line of the record shows what the last task cost.
        "exp_opts": {"comm_rounds": tasks * sustain, "val_interval": sustain, "online_clients": len(names)},
        "model_opts": {"name": "resnet18", "last_stride": 1, "neck": "bnneck", "num_classes": train_ids},
        "criterion_opts": [{"name": "cross_entropy", "epsilon": 0.1}, {"name": "triplet", "margin": 0.3}],
        "optimizer_opts": {"name": "adam", "lr": 3.5e-4, "weight_decay": 5.0e-4},
        "scheduler_opts": {"name": "step_lr", "step_size": 20, "gamma": 0.5},
        "task_opts": {
            "dataset": "reid",
            "sustain_rounds": sustain,
            "train_epochs": 1,
            "batch_size": 32,
            "augment_opts": {
                "level": "default",
                "img_size": list(size),
                "norm_mean": [0.485, 0.456, 0.406],
                "norm_std": [0.229, 0.224, 0.225],
            },
        },
        "clients": [{"client_name": f"client-{c}", "tasks": row} for c, row in enumerate(names)],
    }
    header = "# Written by fedevents.federated.synth_reid.generate_synth_reid; the data sits in datasets_dir.\n"
    return header + yaml.safe_dump(experiment, sort_keys=False, default_flow_style=None)


def _make_room(root: Path, names: list[str], overwrite: bool) -> None:
    targets = [root / name for name in names] + [root / "experiment.yaml"]
    existing = [path for path in targets if path.exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{existing[0]}: expected a place for new synthetic data, found it already there "
            f"(pass overwrite=True to replace the generated folders, or pick another out_dir)"
        )
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    root.mkdir(parents=True, exist_ok=True)


def _check_args(
    clients: Any, tasks: Any, ids: Any, per_id: Any, cameras: Any, img_size: Any, sustain: Any
) -> tuple[int, int]:
    for name, value, minimum in (
        ("clients", clients, 1),
        ("tasks", tasks, 1),
        ("ids_per_task", ids, 2),
        ("cameras", cameras, 2),
        ("sustain_rounds", sustain, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name}: expected an int >= {minimum}, found {value!r}")
    # Every camera needs a query image and at least one gallery image of each evaluated person.
    if not isinstance(per_id, int) or isinstance(per_id, bool) or per_id < 2 * cameras:
        raise ValueError(f"images_per_id: expected an int >= 2 * cameras = {2 * cameras}, found {per_id!r}")
    ok = isinstance(img_size, (list, tuple)) and len(img_size) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in img_size):
        raise ValueError(f"img_size: expected [height, width], two ints >= 16, found {img_size!r}")
    return int(img_size[0]), int(img_size[1])
