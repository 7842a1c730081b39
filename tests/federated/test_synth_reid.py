from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from fedevents.federated.reid_data import AugmentOpts, ImageCache, load_image_set, load_reid_task
from fedevents.federated.reid_metrics import reid_scores
from fedevents.federated.synth_reid import generate_synth_reid

TINY = {"clients": 2, "tasks": 2, "ids_per_task": 5, "images_per_id": 4, "cameras": 2, "img_size": (32, 16)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    return root, generate_synth_reid(root, **TINY)


def test_the_layout_has_one_task_folder_per_client_and_task(tiny: tuple[Path, dict]) -> None:
    root, summary = tiny
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert names == ["client-0-task-0", "client-0-task-1", "client-1-task-0", "client-1-task-1"]
    for name in names:
        assert sorted(p.name for p in (root / name).iterdir()) == ["gallery", "query", "train"]
    # 5 people per task: 3 in train (4 images each), 2 evaluated (1 query and 1 gallery image per camera).
    assert summary["images"] == {"train": 4 * 3 * 4, "query": 4 * 2 * 2, "gallery": 4 * 2 * 2}
    assert summary["train_ids"] == 12 and summary["eval_ids"] == 8
    assert summary["tasks"] == {"client-0": names[:2], "client-1": names[2:]}
    assert len(list(root.rglob("*.png"))) == 48 + 16 + 16


def test_file_names_are_market_style(tiny: tuple[Path, dict]) -> None:
    root, _ = tiny
    files = sorted(p.name for p in (root / "client-0-task-0" / "train" / "0001").iterdir())
    # Person 1's four images alternate between cameras 1 and 2; frame numbers run over the whole task.
    assert files == [
        "0001_c1s1_000000_00.png",
        "0001_c1s1_000002_00.png",
        "0001_c2s1_000001_00.png",
        "0001_c2s1_000003_00.png",
    ]
    assert sorted(p.name for p in (root / "client-0-task-1" / "query").iterdir()) == ["0009", "0010"]


def test_the_set_reads_back_with_disjoint_train_and_evaluation_people(tiny: tuple[Path, dict]) -> None:
    root, summary = tiny
    seen: set[int] = set()
    for name in [n for row in summary["tasks"].values() for n in row]:
        task = load_reid_task(root, name)
        train = {s.pid for s in task.train}
        query, gallery = {s.pid for s in task.query}, {s.pid for s in task.gallery}
        assert task.num_ids == 3 and len(train) == 3
        assert query == gallery and len(query) == 2
        assert not train & query
        assert not (train | query) & seen  # person ids are unique over the whole set
        seen |= train | query
        assert sorted({s.camid for s in task.query}) == [1, 2]
        assert all(len([s for s in task.query if s.pid == pid]) == 2 for pid in query)
    assert seen == set(range(1, 21))


def test_the_same_seed_writes_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    small = {**TINY, "clients": 1}
    generate_synth_reid(tmp_path / "a", **small, seed=3)
    generate_synth_reid(tmp_path / "b", **small, seed=3)
    generate_synth_reid(tmp_path / "c", **small, seed=4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)


def test_the_experiment_file_lists_clients_and_tasks_in_the_fedstil_format(tiny: tuple[Path, dict]) -> None:
    root, summary = tiny
    experiment = yaml.safe_load(Path(summary["experiment"]).read_text())
    assert summary["experiment"] == str(root / "experiment.yaml")
    assert experiment["datasets_dir"] == str(root) and Path(experiment["datasets_dir"]).is_absolute()
    assert experiment["clients"] == [
        {"client_name": "client-0", "tasks": ["client-0-task-0", "client-0-task-1"]},
        {"client_name": "client-1", "tasks": ["client-1-task-0", "client-1-task-1"]},
    ]
    assert experiment["model_opts"] == {"name": "resnet18", "last_stride": 1, "neck": "bnneck", "num_classes": 12}
    assert experiment["criterion_opts"] == [
        {"name": "cross_entropy", "epsilon": 0.1},
        {"name": "triplet", "margin": 0.3},
    ]
    assert experiment["optimizer_opts"] == {"name": "adam", "lr": 3.5e-4, "weight_decay": 5.0e-4}
    assert experiment["exp_opts"] == {"comm_rounds": 10, "val_interval": 5, "online_clients": 2}
    task_opts = experiment["task_opts"]
    assert task_opts["dataset"] == "reid" and task_opts["sustain_rounds"] == 5
    assert AugmentOpts.from_dict(task_opts["augment_opts"]) == AugmentOpts(level="default", img_size=(32, 16))
    assert experiment["exp_name"] == "synth-reid" and experiment["exp_method"] == "fedavg"
    assert experiment["random_seed"] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_people_are_told_apart_across_cameras_once_the_colour_cast_is_undone(tmp_path: Path, seed: int) -> None:
    """Dividing each colour channel by its image mean undoes a camera's cast: an invariant for a model to learn."""
    generate_synth_reid(tmp_path, clients=1, tasks=1, ids_per_task=40, images_per_id=4, seed=seed)
    task = load_reid_task(tmp_path, "client-0-task-0")
    plain = AugmentOpts(norm_mean=(0.0, 0.0, 0.0), norm_std=(1.0, 1.0, 1.0))
    query, gallery = (load_image_set(task, split, plain, cache=ImageCache()) for split in ("query", "gallery"))

    def grey_world(images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(images, 4)
        return (pooled / pooled.mean(dim=(2, 3), keepdim=True)).flatten(1)

    features = grey_world(plain.normalise(query.pixels)), grey_world(plain.normalise(gallery.pixels))
    scores = reid_scores(features[0], query.pids, query.camids, features[1], gallery.pids, gallery.camids)
    assert scores["rank_1"] > 0.4  # chance is 1 in 20


def test_tasks_differ_in_palette(tmp_path: Path) -> None:
    generate_synth_reid(tmp_path, clients=1, tasks=2, ids_per_task=10, images_per_id=4)
    means = []
    for name in ("client-0-task-0", "client-0-task-1"):
        train = load_image_set(load_reid_task(tmp_path, name), "train", AugmentOpts(), cache=ImageCache())
        means.append(AugmentOpts().normalise(train.pixels).mean(dim=(0, 2, 3)))
    assert (means[0] - means[1]).abs().max() > 0.1


def test_existing_data_is_kept_unless_overwrite_is_asked(tmp_path: Path) -> None:
    small = {**TINY, "clients": 1, "tasks": 1}
    generate_synth_reid(tmp_path, **small)
    with pytest.raises(ValueError, match=r"client-0-task-0: expected a place for new synthetic data, found it"):
        generate_synth_reid(tmp_path, **small)
    (tmp_path / "client-0-task-0" / "train" / "stray.txt").write_text("left from before")
    summary = generate_synth_reid(tmp_path, **{**small, "ids_per_task": 2}, overwrite=True)
    assert not (tmp_path / "client-0-task-0" / "train" / "stray.txt").exists()
    assert summary["images"]["train"] == 4


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"clients": 0}, "clients: expected an int >= 1, found 0"),
        ({"ids_per_task": 1}, "ids_per_task: expected an int >= 2, found 1"),
        ({"cameras": 1}, "cameras: expected an int >= 2, found 1"),
        ({"images_per_id": 3}, "images_per_id: expected an int >= 2 \\* cameras = 4, found 3"),
        ({"img_size": (8, 8)}, "img_size: expected \\[height, width\\], two ints >= 16, found \\(8, 8\\)"),
    ],
)
def test_bad_arguments_are_named_before_anything_is_written(tmp_path: Path, override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synth_reid(tmp_path / "out", **{**TINY, **override})
    assert not (tmp_path / "out").exists()
