"""Person re-identification tasks read from the FedSTIL on-disk layout, decoded once and augmented in batches.

A task lives at ``<datasets_dir>/<task_name>/{train,query,gallery}/<person_id>/<image files>``. Person ids
are the numeric folder names; camera ids are read from Market-1501 style file names (``0001_c1s1_000151_01.jpg``
is camera 1) and are -1 where a name carries none. Decoded splits are kept in a byte-bounded cache, so a
client's task is decoded on its first round and reused afterwards. They are kept as the 8-bit pixels the
files hold (12 kB per image at 64x32, 24 kB at 128x64, a quarter of float32) and normalised a batch at a time
by ``AugmentOpts.normalise``, with the same arithmetic, in the same order, as normalising the whole split.
Decoding may run in worker processes (``task_opts.loader_opts.num_workers``); each worker decodes a run of
files in order, so the pixels are the same whatever the number of workers.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import threading
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Sequence

import numpy as np
import torch

__all__ = [
    "AUGMENT_LEVELS",
    "IMAGE_CACHE",
    "SPLITS",
    "AugmentOpts",
    "ImageCache",
    "ImageSet",
    "ImageDecoder",
    "LoaderOpts",
    "ReidSample",
    "ReidTask",
    "augment",
    "is_image_file",
    "load_image_set",
    "load_reid_task",
]

SPLITS = ("train", "query", "gallery")
AUGMENT_LEVELS = ("none", "default", "strong")
IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp"})

_PERSON_ID = re.compile(r"-?\d+")
_CAMERA_ID = re.compile(r"_c(\d+)")
# The padding and erasing sizes of the usual ReID baselines (strong-baseline, FedSTIL).
_PAD = 10
_ERASE_AREA = (0.02, 0.4)
_ERASE_RATIO = (0.3, 1 / 0.3)
_ERASE_P = 0.5


class ReidSample(NamedTuple):
    """One image of a split: its path, person id and camera id (-1 when the file name names no camera)."""

    path: str
    pid: int
    camid: int


@dataclass(frozen=True, slots=True)
class ReidTask:
    """The three splits of one task, in a stable order (person id numerically, then file name)."""

    name: str
    root: Path
    train: tuple[ReidSample, ...]
    query: tuple[ReidSample, ...]
    gallery: tuple[ReidSample, ...]
    num_ids: int
    # Derived from ``train``, so it takes no part in equality or hashing.
    labels: Mapping[int, int] = field(repr=False, compare=False)

    def split(self, name: str) -> tuple[ReidSample, ...]:
        """Give the samples of the split called ``name``."""
        if name not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}, found {name!r}")
        return getattr(self, name)


@dataclass(frozen=True, slots=True)
class AugmentOpts:
    """How images are sized, normalised and augmented (``task_opts.augment_opts`` in a config)."""

    level: str = "default"
    img_size: tuple[int, int] = (64, 32)
    norm_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    norm_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def from_dict(cls, opts: Mapping[str, Any], *, where: str = "task_opts.augment_opts") -> AugmentOpts:
        """Build options from a config mapping; a missing key takes its default."""
        default = cls()
        level = opts.get("level", default.level)
        if level not in AUGMENT_LEVELS:
            raise ValueError(f"{where}.level: expected one of {', '.join(AUGMENT_LEVELS)}, found {level!r}")
        size = opts.get("img_size", default.img_size)
        if not _is_sequence(size, 2) or not all(_is_int(v) and v >= 8 for v in size):
            raise ValueError(f"{where}.img_size: expected [height, width], two ints >= 8, found {size!r}")
        mean = _triple(opts.get("norm_mean", default.norm_mean), f"{where}.norm_mean", positive=False)
        std = _triple(opts.get("norm_std", default.norm_std), f"{where}.norm_std", positive=True)
        return cls(level=level, img_size=(int(size[0]), int(size[1])), norm_mean=mean, norm_std=std)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Give 8-bit images [N, 3, H, W] as float32 ``(pixels / 255 - mean) / std``, on their device."""
        if pixels.dtype != torch.uint8:
            raise ValueError(f"pixels: expected 8-bit images (torch.uint8), found {pixels.dtype}")
        mean = torch.tensor(self.norm_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.norm_std, device=pixels.device).view(1, 3, 1, 1)
        return pixels.to(torch.float32).div_(255.0).sub_(mean).div_(std)


@dataclass(frozen=True, slots=True)
class LoaderOpts:
    """Where image files are decoded (the decoding keys of ``task_opts.loader_opts`` in a config).

    ``num_workers`` 0 decodes in the calling thread; more decodes in that many worker processes, started with
    ``multiprocessing_context`` (the platform's default when None; meaningless, and so accepted, without
    workers) and kept between splits when ``persistent_workers`` is true.
    """

    num_workers: int = 0
    multiprocessing_context: str | None = None
    persistent_workers: bool = False

    @classmethod
    def from_dict(cls, opts: Mapping[str, Any], *, where: str = "task_opts.loader_opts") -> LoaderOpts:
        """Read the decoding keys of ``opts``; the batch keys (``batch_size``, ``pin_memory``) are the trainer's."""
        workers = opts.get("num_workers", 0)
        if not _is_int(workers) or workers < 0:
            raise ValueError(f"{where}.num_workers: expected an int >= 0, found {workers!r}")
        context = opts.get("multiprocessing_context")
        methods = multiprocessing.get_all_start_methods()
        if context is not None and context not in methods:
            raise ValueError(f"{where}.multiprocessing_context: expected one of {', '.join(methods)}, found {context!r}")
        persistent = opts.get("persistent_workers", False)
        if not isinstance(persistent, bool):
            raise ValueError(f"{where}.persistent_workers: expected true or false, found {persistent!r}")
        return cls(num_workers=workers, multiprocessing_context=context, persistent_workers=persistent)


class ImageDecoder:
    """Decodes image files to 8-bit pixels [N, 3, H, W], in this process or in worker processes.

    Safe to share between threads. With ``persistent_workers`` the pool lives until ``close``; otherwise each
    call starts and stops its own.
    """

    def __init__(self, opts: LoaderOpts | None = None) -> None:
        self.opts = opts if opts is not None else LoaderOpts()
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def decode(self, paths: Sequence[str], size: tuple[int, int]) -> np.ndarray:
        """Give the images at ``paths`` resized to ``size`` (width, height), in order."""
        workers = self.opts.num_workers
        if workers == 0 or len(paths) < 2:
            return _read_images(paths, size)
        # A few runs per worker evens out uneven file sizes without paying for a task per file.
        step = max(1, math.ceil(len(paths) / (4 * workers)))
        runs = [paths[i:i + step] for i in range(0, len(paths), step)]
        out = np.empty((len(paths), 3, size[1], size[0]), dtype=np.uint8)
        pool = self._acquire()
        try:
            # Each run is copied into place as it arrives, so at most a few runs exist twice at a time.
            for index, pixels in enumerate(pool.map(_read_images, runs, [size] * len(runs))):
                out[index * step:index * step + len(pixels)] = pixels
        finally:
            if not self.opts.persistent_workers:
                pool.shutdown()
        return out

    def close(self) -> None:
        """Stop the persistent worker processes, if any."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()

    def _acquire(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context(self.opts.multiprocessing_context)
        if not self.opts.persistent_workers:
            return ProcessPoolExecutor(self.opts.num_workers, mp_context=context)
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.opts.num_workers, mp_context=context)
            return self._pool


@dataclass(frozen=True, slots=True, eq=False)
class ImageSet:
    """One split decoded to 8-bit images [N, 3, H, W]; shared through the cache, so never modify it.

    ``labels`` are the contiguous training labels of ``ReidTask.labels``, and -1 for a person the train
    split does not hold (every query and gallery person, under the ReID protocol).
    """

    pixels: torch.Tensor
    pids: torch.Tensor
    camids: torch.Tensor
    labels: torch.Tensor
    paths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


class ImageCache:
    """Decoded splits kept between rounds; past ``max_bytes`` the least recently used ones are dropped.

    The newest split always stays, even when it alone is over budget. Safe to share between worker threads:
    two threads asking for the same split decode it once.
    """

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes: expected an int >= 0, found {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, ImageSet] = OrderedDict()
        self._loading: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, load: Callable[[], ImageSet]) -> ImageSet:
        """Give the split cached under ``key``, calling ``load`` to decode it when it is not there."""
        with self._lock:
            hit = self._lookup(key)
            if hit is not None:
                return hit
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            return self._load_once(key, load)

    def _load_once(self, key: Hashable, load: Callable[[], ImageSet]) -> ImageSet:
        with self._lock:
            hit = self._lookup(key)  # another thread may have decoded it while this one waited
        if hit is not None:
            return hit
        try:
            value = load()
        except BaseException:
            with self._lock:
                self._loading.pop(key, None)
            raise
        with self._lock:
            self._entries[key] = value
            self._loading.pop(key, None)
            self._evict()
        return value

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached images."""
        with self._lock:
            return sum(entry.pixels.nbytes for entry in self._entries.values())

    def clear(self) -> None:
        """Drop every cached split (for instance after the files on disk changed)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _lookup(self, key: Hashable) -> ImageSet | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def _evict(self) -> None:
        total = sum(entry.pixels.nbytes for entry in self._entries.values())
        while total > self.max_bytes and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            total -= dropped.pixels.nbytes


IMAGE_CACHE = ImageCache()


def load_reid_task(datasets_dir: str | Path, task_name: str) -> ReidTask:
    """Read the file lists of one task; raises ``ValueError`` with one line naming the path when the layout is off."""
    if not task_name or Path(task_name).name != task_name or task_name in (".", ".."):
        raise ValueError(f"task name: expected a folder name under {datasets_dir}, found {task_name!r}")
    root = Path(datasets_dir) / task_name
    if not root.is_dir():
        raise ValueError(f"{root}: expected the folder of task {task_name!r} (train/, query/, gallery/), found none")
    _check_eval_pair(root)
    splits = {name: _read_split(root / name, task_name) for name in SPLITS}
    train_pids = sorted({sample.pid for sample in splits["train"]})
    return ReidTask(
        name=task_name,
        root=root,
        train=splits["train"],
        query=splits["query"],
        gallery=splits["gallery"],
        num_ids=len(train_pids),
        labels={pid: label for label, pid in enumerate(train_pids)},
    )


def load_image_set(
    task: ReidTask, split: str, opts: AugmentOpts, *, cache: ImageCache | None = None, decoder: ImageDecoder | None = None
) -> ImageSet:
    """Give ``split`` of ``task`` decoded to 8-bit pixels, from ``cache`` (``IMAGE_CACHE`` by default) when there.

    The cache key is the split's file list and image size (normalisation comes later, per batch), so files
    rewritten in place on disk need a ``cache.clear()`` to be read again. ``decoder`` decodes a split that is
    not cached (in this thread when None).
    """
    samples = task.split(split)
    key = (samples, opts.img_size)
    decoder = decoder if decoder is not None else ImageDecoder()
    return (IMAGE_CACHE if cache is None else cache).get(key, lambda: _decode_set(samples, task.labels, opts, decoder))


def augment(images: torch.Tensor, level: str, *, generator: torch.Generator) -> torch.Tensor:
    """Give a randomly augmented copy of a batch [N, 3, H, W]; the input is left as it is.

    ``"none"`` returns the batch unchanged; ``"default"`` flips half the images left-right and pads each by 10
    pixels before cropping it back at a random offset; ``"strong"`` also erases a random rectangle in half of
    them. Every draw comes from ``generator`` (a CPU generator), in the same number whatever the images hold.
    """
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"augment level: expected one of {', '.join(AUGMENT_LEVELS)}, found {level!r}")
    if images.dim() != 4:
        raise ValueError(f"images: expected a batch [N, 3, H, W], found shape {tuple(images.shape)}")
    if level == "none" or images.shape[0] == 0:
        return images
    out = _pad_crop(_flip(images, generator), generator)
    return _erase(out, generator) if level == "strong" else out


def _check_eval_pair(root: Path) -> None:
    has_query, has_gallery = (root / "query").is_dir(), (root / "gallery").is_dir()
    if has_query != has_gallery:
        found, missing = ("gallery", "query") if has_gallery else ("query", "gallery")
        raise ValueError(f"{root}: expected query/ and gallery/ together, found {found}/ but no {missing}/")


def _read_split(split_dir: Path, task_name: str) -> tuple[ReidSample, ...]:
    if not split_dir.is_dir():
        raise ValueError(f"{split_dir}: expected the {split_dir.name} split folder of task {task_name!r}, found none")
    samples: list[ReidSample] = []
    for pid, person_dir in _person_dirs(split_dir):
        for image in sorted(p for p in person_dir.iterdir() if is_image_file(p)):
            samples.append(ReidSample(str(image), pid, _camera(image.name)))
    if not samples:
        raise ValueError(f"{split_dir}: expected images under <person_id>/ folders, found none")
    return tuple(samples)


def _person_dirs(split_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in split_dir.iterdir():
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if not _PERSON_ID.fullmatch(entry.name):
            raise ValueError(f"{entry}: expected a numeric person id folder, found {entry.name!r}")
        found.append((int(entry.name), entry))
    return sorted(found, key=lambda item: (item[0], item[1].name))


def is_image_file(path: Path) -> bool:
    """Whether the loader reads ``path`` as an image: an image suffix, not hidden, a file (or a link to one)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _camera(file_name: str) -> int:
    match = _CAMERA_ID.search(file_name)
    return int(match.group(1)) if match else -1


def _decode_set(
    samples: Sequence[ReidSample], labels: Mapping[int, int], opts: AugmentOpts, decoder: ImageDecoder
) -> ImageSet:
    height, width = opts.img_size
    return ImageSet(
        pixels=torch.from_numpy(decoder.decode([s.path for s in samples], (width, height))),
        pids=torch.tensor([s.pid for s in samples], dtype=torch.int64),
        camids=torch.tensor([s.camid for s in samples], dtype=torch.int64),
        labels=torch.tensor([labels.get(s.pid, -1) for s in samples], dtype=torch.int64),
        paths=tuple(s.path for s in samples),
    )


def _read_images(paths: Sequence[str], size: tuple[int, int]) -> np.ndarray:
    """Decode ``paths`` into one [N, 3, H, W] array (a module-level function, so worker processes can run it)."""
    width, height = size
    # Channels first, as the networks take them, written in place: no second copy of the split.
    out = np.empty((len(paths), 3, height, width), dtype=np.uint8)
    for row, path in enumerate(paths):
        out[row] = _read_image(path, size).transpose(2, 0, 1)
    return out


def _read_image(path: str, size: tuple[int, int]) -> np.ndarray:
    # Imported here: a run on synthetic or tensor data sets never decodes an image, and Pillow costs about
    # 20 ms of every start-up (issue 12).
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        if rgb.size != size:
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    # Pillow reports a file it cannot identify as UnidentifiedImageError (an OSError), a truncated one as
    # OSError, and some broken PNG chunks as SyntaxError.
    except UnidentifiedImageError:
        raise ValueError(f"{path}: expected a readable image, found a file of no known image format") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: expected a readable image, found a corrupt or truncated one ({exc})") from None


def _flip(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(images.shape[0], generator=gen) < 0.5).to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def _pad_crop(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Padding with zeros pads with the mean colour once images are normalised, so the border adds no signal.
    count, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (_PAD, _PAD, _PAD, _PAD))
    top = torch.randint(0, 2 * _PAD + 1, (count,), generator=gen).to(images.device)
    left = torch.randint(0, 2 * _PAD + 1, (count,), generator=gen).to(images.device)
    rows = top[:, None] + torch.arange(height, device=images.device)  # [N, H]
    cols = left[:, None] + torch.arange(width, device=images.device)  # [N, W]
    batch = torch.arange(count, device=images.device)[:, None, None]
    # Channels last while gathering, so one advanced index picks a [H, W] window per image.
    window = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return window.permute(0, 3, 1, 2).contiguous()


def _erase(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    count, _, height, width = images.shape
    apply, area, log_ratio, y, x = torch.rand(5, count, generator=gen)
    area = (_ERASE_AREA[0] + area * (_ERASE_AREA[1] - _ERASE_AREA[0])) * height * width
    lo, hi = math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])
    ratio = torch.exp(lo + log_ratio * (hi - lo))
    box_h = torch.sqrt(area * ratio).round().clamp(1, height)
    box_w = torch.sqrt(area / ratio).round().clamp(1, width)
    top = (y * (height - box_h + 1)).floor()
    left = (x * (width - box_w + 1)).floor()
    in_rows = _between(torch.arange(height), top, top + box_h)  # [N, H]
    in_cols = _between(torch.arange(width), left, left + box_w)  # [N, W]
    mask = (apply < _ERASE_P)[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
    return images.masked_fill(mask[:, None].to(images.device), 0.0)


def _between(positions: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    return (positions[None, :] >= start[:, None]) & (positions[None, :] < stop[:, None])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sequence(value: Any, length: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == length


def _triple(value: Any, where: str, *, positive: bool) -> tuple[float, float, float]:
    ok = _is_sequence(value, 3) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
        for v in value
    )
    if not ok:
        raise ValueError(f"{where}: expected three {'positive ' if positive else ''}numbers (R, G, B), found {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))
