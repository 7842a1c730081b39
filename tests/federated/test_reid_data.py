from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from fedevents.federated.reid_data import (
    AugmentOpts,
    ImageCache,
    ImageDecoder,
    ImageSet,
    LoaderOpts,
    ReidSample,
    augment,
    load_image_set,
    load_reid_task,
)
from fedevents.federated.seeds import generator

RED = (255, 0, 0)


def _image(path: Path, colour: tuple[int, int, int] = RED, size: tuple[int, int] = (8, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _task(root: Path, name: str = "t0", *, train=(1, 2), evaluate=(7,)) -> Path:
    """Write a task with one camera-1 and one camera-2 image per person and split."""
    for split, pids in (("train", train), ("query", evaluate), ("gallery", evaluate)):
        for pid in pids:
            for cam in (1, 2):
                _image(root / name / split / str(pid) / f"{pid:04d}_c{cam}s1_{cam:06d}_00.png")
    return root / name


def test_person_ids_sort_numerically_and_train_labels_are_contiguous(tmp_path: Path) -> None:
    _task(tmp_path, train=(10, 2, 1))
    task = load_reid_task(tmp_path, "t0")
    assert [s.pid for s in task.train] == [1, 1, 2, 2, 10, 10]
    assert task.num_ids == 3
    assert dict(task.labels) == {1: 0, 2: 1, 10: 2}
    assert [s.pid for s in task.query] == [7, 7] and len(task.gallery) == 2
    assert task.name == "t0" and task.root == tmp_path / "t0"


def test_camera_ids_come_from_market_style_names_or_are_unknown(tmp_path: Path) -> None:
    _task(tmp_path)
    person = tmp_path / "t0" / "train" / "3"
    for name in ("0003_c3s1_000151_01.jpg", "0003_c12_f0046182.jpg", "frame_0007.png"):
        _image(person / name)
    (person / "notes.txt").write_text("not an image")
    (person / ".hidden.png").write_bytes(b"")
    task = load_reid_task(tmp_path, "t0")
    found = {Path(s.path).name: s.camid for s in task.train if s.pid == 3}
    assert found == {"0003_c3s1_000151_01.jpg": 3, "0003_c12_f0046182.jpg": 12, "frame_0007.png": -1}
    assert task.train[0] == ReidSample(str(tmp_path / "t0/train/1/0001_c1s1_000001_00.png"), 1, 1)


def _one_line_error(tmp_path: Path, task: str = "t0") -> str:
    with pytest.raises(ValueError) as caught:
        load_reid_task(tmp_path, task)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_missing_task_folder_is_named(tmp_path: Path) -> None:
    message = _one_line_error(tmp_path, "nope")
    assert message == f"{tmp_path / 'nope'}: expected the folder of task 'nope' (train/, query/, gallery/), found none"


def test_a_missing_train_folder_is_named(tmp_path: Path) -> None:
    root = tmp_path / "t0"
    _image(root / "query" / "1" / "a.png")
    _image(root / "gallery" / "1" / "b.png")
    assert _one_line_error(tmp_path) == f"{root / 'train'}: expected the train split folder of task 't0', found none"


@pytest.mark.parametrize(("kept", "gone"), [("gallery", "query"), ("query", "gallery")])
def test_query_and_gallery_come_together(tmp_path: Path, kept: str, gone: str) -> None:
    root = tmp_path / "t0"
    _image(root / "train" / "1" / "a.png")
    _image(root / kept / "2" / "b.png")
    assert _one_line_error(tmp_path) == f"{root}: expected query/ and gallery/ together, found {kept}/ but no {gone}/"


def test_neither_query_nor_gallery_is_a_missing_split(tmp_path: Path) -> None:
    _image(tmp_path / "t0" / "train" / "1" / "a.png")
    assert _one_line_error(tmp_path).startswith(f"{tmp_path / 't0' / 'query'}: expected the query split folder")


def test_a_split_with_no_images_is_named(tmp_path: Path) -> None:
    root = _task(tmp_path)
    (root / "query" / "7" / "0007_c1s1_000001_00.png").unlink()
    (root / "query" / "7" / "0007_c2s1_000002_00.png").rename(root / "query" / "loose.png")
    assert _one_line_error(tmp_path) == f"{root / 'query'}: expected images under <person_id>/ folders, found none"


def test_a_non_numeric_person_folder_is_named(tmp_path: Path) -> None:
    root = _task(tmp_path)
    _image(root / "gallery" / "p12" / "a.png")
    assert _one_line_error(tmp_path) == f"{root / 'gallery' / 'p12'}: expected a numeric person id folder, found 'p12'"


def test_a_task_name_must_be_one_folder(tmp_path: Path) -> None:
    assert "expected a folder name" in _one_line_error(tmp_path, "../t0")


OPTS = AugmentOpts(level="none", img_size=(16, 8))


def test_images_are_decoded_resized_and_normalised(tmp_path: Path) -> None:
    root = _task(tmp_path)
    _image(root / "train" / "2" / "0002_c1s1_000001_00.png", (0, 255, 0), size=(20, 50))  # other size, green
    task = load_reid_task(tmp_path, "t0")
    train = load_image_set(task, "train", OPTS, cache=ImageCache())
    assert train.pixels.shape == (4, 3, 16, 8) and train.pixels.dtype == torch.uint8
    assert train.pixels[0].flatten(1).tolist() == [[255] * 128, [0] * 128, [0] * 128]
    images = OPTS.normalise(train.pixels)
    assert images.dtype == torch.float32
    red = torch.tensor([(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0 - 0.406) / 0.225])
    assert torch.allclose(images[0].mean((1, 2)), red, atol=1e-5)
    green = torch.tensor([(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (0 - 0.406) / 0.225])
    assert torch.allclose(images[2].mean((1, 2)), green, atol=1e-5)
    assert train.pids.tolist() == [1, 1, 2, 2] and train.camids.tolist() == [1, 2, 1, 2]
    assert train.labels.tolist() == [0, 0, 1, 1]
    query = load_image_set(task, "query", OPTS, cache=ImageCache())
    assert query.labels.tolist() == [-1, -1] and len(query) == 2


def test_normalising_a_batch_gives_the_bits_of_normalising_the_whole_split() -> None:
    """Splits are stored as 8-bit pixels; a batch normalised on its own must equal its rows of the whole."""
    opts = AugmentOpts(norm_mean=(0.5, 0.4, 0.3), norm_std=(0.2, 0.25, 0.3))
    pixels = torch.randint(0, 256, (10, 3, 16, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    whole = pixels.to(torch.float32).div(255.0)
    whole = (whole - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    batch = opts.normalise(pixels[3:7])
    assert torch.equal(batch, whole[3:7]) and torch.equal(opts.normalise(pixels), whole)


def test_normalising_refuses_images_that_are_not_8_bit() -> None:
    with pytest.raises(ValueError, match=r"^pixels: expected 8-bit images \(torch.uint8\), found torch.float32$"):
        OPTS.normalise(torch.zeros(1, 3, 16, 8))


@pytest.mark.parametrize("content", [b"definitely not a png", None], ids=["garbage", "truncated"])
def test_a_corrupt_image_names_its_file(tmp_path: Path, content: bytes | None) -> None:
    root = _task(tmp_path)
    bad = root / "gallery" / "7" / "0007_c1s1_000001_00.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(bad)
    data = bad.read_bytes()
    bad.write_bytes(content if content is not None else data[: len(data) // 2])
    task = load_reid_task(tmp_path, "t0")
    with pytest.raises(ValueError, match="expected a readable image") as caught:
        load_image_set(task, "gallery", OPTS, cache=ImageCache())
    assert str(caught.value).startswith(f"{bad}: ") and "\n" not in str(caught.value)


def test_the_cache_hands_back_the_same_decoded_split(tmp_path: Path) -> None:
    _task(tmp_path)
    cache = ImageCache()
    first = load_image_set(load_reid_task(tmp_path, "t0"), "train", OPTS, cache=cache)
    again = load_image_set(load_reid_task(tmp_path, "t0"), "train", OPTS, cache=cache)
    assert again is first and again.pixels is first.pixels
    other_size = load_image_set(load_reid_task(tmp_path, "t0"), "train", AugmentOpts(img_size=(8, 8)), cache=cache)
    assert other_size is not first and len(cache) == 2


def test_the_cache_drops_the_least_recently_used_split_past_its_budget(tmp_path: Path) -> None:
    _task(tmp_path)
    task = load_reid_task(tmp_path, "t0")
    split_bytes = 4 * 3 * 16 * 8  # four train images, one byte per value
    cache = ImageCache(max_bytes=split_bytes + 2 * 3 * 16 * 8)  # room for train and one 2-image split
    train = load_image_set(task, "train", OPTS, cache=cache)
    load_image_set(task, "query", OPTS, cache=cache)
    assert load_image_set(task, "train", OPTS, cache=cache) is train  # train is now the most recent
    load_image_set(task, "gallery", OPTS, cache=cache)  # over budget: query goes
    assert len(cache) == 2 and cache.nbytes == split_bytes + 2 * 3 * 16 * 8
    assert load_image_set(task, "train", OPTS, cache=cache) is train


def test_a_failed_decode_is_not_cached(tmp_path: Path) -> None:
    root = _task(tmp_path)
    bad = root / "query" / "7" / "0007_c1s1_000001_00.png"
    bad.write_bytes(b"garbage")
    task = load_reid_task(tmp_path, "t0")
    cache = ImageCache()
    with pytest.raises(ValueError):
        load_image_set(task, "query", OPTS, cache=cache)
    _image(bad)
    assert len(load_image_set(task, "query", OPTS, cache=cache)) == 2


def _batch() -> torch.Tensor:
    return torch.randn(16, 3, 24, 12, generator=generator(0, "test", "batch"))


@pytest.mark.parametrize("level", ["default", "strong"])
def test_augmentation_is_deterministic_for_one_generator_and_keeps_shapes(level: str) -> None:
    images = _batch()
    before = images.clone()
    first = augment(images, level, generator=generator(0, "test", "augment"))
    second = augment(images, level, generator=generator(0, "test", "augment"))
    other = augment(images, level, generator=generator(1, "test", "augment"))
    assert first.shape == images.shape and first.dtype == images.dtype
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert not torch.equal(first, images)
    assert torch.equal(images, before)  # cached images must never change under augmentation


def test_level_none_leaves_images_as_they_are() -> None:
    images = _batch()
    assert augment(images, "none", generator=generator(0, "test")) is images


def test_default_augmentation_flips_and_shifts_without_erasing() -> None:
    # A constant image stays constant inside, with mean-colour (zero) padding wherever the crop left it.
    images = torch.ones(64, 3, 24, 12)
    out = augment(images, "default", generator=generator(0, "test", "shift"))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    kept = float((out == 1).all(dim=1).sum()) / (64 * 24 * 12)
    assert 0.2 < kept < 0.8  # shifts of up to 10 pixels each way move much of a 24 x 12 image out of view


def test_strong_augmentation_erases_a_rectangle_in_about_half_the_images() -> None:
    # Large images, so the 10-pixel shifts rarely hide an erased rectangle in the padding.
    images = torch.ones(200, 3, 128, 64)
    flat = augment(images, "default", generator=generator(0, "test", "erase"))
    strong = augment(images, "strong", generator=generator(0, "test", "erase"))
    erased = ((strong == 0) & (flat == 1)).flatten(1).any(1)
    assert 70 < int(erased.sum()) < 130
    assert torch.equal(strong[~erased], flat[~erased])  # the same flips and crops: one generator, same draws


def test_bad_augment_options_are_named() -> None:
    with pytest.raises(ValueError, match="task_opts.augment_opts.level: expected one of none, default, strong"):
        AugmentOpts.from_dict({"level": "heavy"})
    with pytest.raises(ValueError, match=r"img_size: expected \[height, width\], two ints >= 8, found \[64\]"):
        AugmentOpts.from_dict({"img_size": [64]})
    with pytest.raises(ValueError, match=r"norm_std: expected three positive numbers \(R, G, B\), found \[0, 1, 1\]"):
        AugmentOpts.from_dict({"norm_std": [0, 1, 1]})
    with pytest.raises(ValueError, match="augment level: expected one of"):
        augment(_batch(), "heavy", generator=generator(0, "test"))


def test_augment_opts_read_the_config_shape() -> None:
    opts = AugmentOpts.from_dict(
        {"level": "strong", "img_size": [64, 32], "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.25, 0.25, 0.25]}
    )
    assert opts == AugmentOpts(level="strong", img_size=(64, 32), norm_mean=(0.5,) * 3, norm_std=(0.25,) * 3)
    assert AugmentOpts.from_dict({}) == AugmentOpts()


def test_threads_asking_for_one_split_share_a_single_decode() -> None:
    import threading

    cache = ImageCache()
    started, release = threading.Event(), threading.Event()
    loads: list[int] = []
    none = torch.zeros(0, dtype=torch.long)
    value = ImageSet(pixels=torch.zeros(0, 3, 16, 8, dtype=torch.uint8), pids=none, camids=none, labels=none, paths=())

    def slow_load():
        loads.append(1)
        started.set()
        release.wait(timeout=10)
        return value

    results: list[ImageSet] = []
    first = threading.Thread(target=lambda: results.append(cache.get("key", slow_load)))
    first.start()
    started.wait(timeout=10)
    second = threading.Thread(target=lambda: results.append(cache.get("key", slow_load)))
    second.start()
    release.set()
    first.join(timeout=10)
    second.join(timeout=10)
    assert loads == [1] and results == [value, value]


def _many(root: Path, count: int) -> list[str]:
    """``count`` images of different colours and sizes, so a mix-up between workers would show."""
    paths = []
    for i in range(count):
        path = root / f"{i:03d}.png"
        _image(path, (i * 7 % 256, i * 31 % 256, i * 53 % 256), size=(8 + i % 5, 16 + i % 3))
        paths.append(str(path))
    return paths


def test_worker_processes_decode_the_same_pixels_in_the_same_order(tmp_path: Path) -> None:
    # "fork" keeps this fast: a spawned worker imports torch afresh, seconds on a busy machine.
    paths = _many(tmp_path, 23)
    alone = ImageDecoder().decode(paths, (8, 16))
    workers = ImageDecoder(LoaderOpts(num_workers=2, multiprocessing_context="fork")).decode(paths, (8, 16))
    assert alone.shape == (23, 3, 16, 8) and workers.dtype == alone.dtype
    assert (workers == alone).all()


def test_a_persistent_pool_serves_several_splits_until_closed(tmp_path: Path) -> None:
    paths = _many(tmp_path, 9)
    decoder = ImageDecoder(LoaderOpts(num_workers=2, multiprocessing_context="fork", persistent_workers=True))
    try:
        first = decoder.decode(paths, (8, 16))
        pool = decoder._pool
        second = decoder.decode(paths[:4], (8, 16))
        assert pool is not None and decoder._pool is pool
        assert (second == first[:4]).all()
    finally:
        decoder.close()
    assert decoder._pool is None


def test_a_corrupt_image_found_by_a_worker_is_named_as_in_this_process(tmp_path: Path) -> None:
    paths = _many(tmp_path, 6)
    Path(paths[4]).write_bytes(b"definitely not a png")
    decoder = ImageDecoder(LoaderOpts(num_workers=2, multiprocessing_context="fork"))
    with pytest.raises(ValueError) as caught:
        decoder.decode(paths, (8, 16))
    assert str(caught.value) == f"{paths[4]}: expected a readable image, found a file of no known image format"


def test_loader_opts_take_the_shipped_spawn_without_workers_and_name_bad_values() -> None:
    shipped = {"batch_size": 32, "num_workers": 0, "pin_memory": False, "multiprocessing_context": "spawn"}
    assert LoaderOpts.from_dict(shipped) == LoaderOpts(num_workers=0, multiprocessing_context="spawn")
    assert LoaderOpts.from_dict({}) == LoaderOpts()
    with pytest.raises(ValueError, match=r"^task_opts.loader_opts.num_workers: expected an int >= 0, found -1$"):
        LoaderOpts.from_dict({"num_workers": -1})
    with pytest.raises(ValueError, match=r"^task_opts.loader_opts.multiprocessing_context: expected one of .*spawn.*, "
                                         r"found 'threads'$"):
        LoaderOpts.from_dict({"multiprocessing_context": "threads"})
    with pytest.raises(ValueError, match=r"^task_opts.loader_opts.persistent_workers: expected true or false, "
                                         r"found 'yes'$"):
        LoaderOpts.from_dict({"persistent_workers": "yes"})
