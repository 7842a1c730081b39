"""Broken ReID data sets met through `fedevents run`: layout errors stop before the run, bad images fail a client."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fedevents.cli import main
from fedevents.federated.synth_reid import generate_synth_reid


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reid")
    generate_synth_reid(out / "data", clients=2, tasks=1, ids_per_task=4, images_per_id=4, img_size=(32, 16))
    return out


@pytest.fixture
def project(pristine: Path, tmp_path: Path) -> Path:
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    data = yaml.safe_load((tmp_path / "data/experiment.yaml").read_text())
    data.update(datasets_dir=str(tmp_path / "data"), logs_dir=str(tmp_path / "logs"),
                checkpoints_dir=str(tmp_path / "ckpts"))
    data["exp_opts"].update(comm_rounds=1, val_interval=1)
    data["model_opts"]["width"] = 8
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


def fedevents(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    status = main(["run", *args])
    return status, capsys.readouterr().err.strip().splitlines()[-1]


def test_a_task_with_a_gallery_but_no_query_is_refused_before_anything_is_written(project, capsys) -> None:
    shutil.rmtree(project / "data/client-1-task-0/query")
    status, line = fedevents(capsys, str(project / "exp.yaml"))
    assert status == 2
    assert line.startswith(f"fedevents: error: {project / 'exp.yaml'}: ")
    assert "client-1-task-0" in line and "query" in line
    assert not (project / "logs").exists() and not (project / "ckpts").exists()


def test_a_missing_task_folder_is_refused(project, capsys) -> None:
    shutil.rmtree(project / "data/client-0-task-0")
    status, line = fedevents(capsys, str(project / "exp.yaml"))
    assert status == 2 and "client-0-task-0" in line
    assert not (project / "logs").exists()


def test_an_empty_split_is_refused(project, capsys) -> None:
    for person in (project / "data/client-0-task-0/train").iterdir():
        shutil.rmtree(person)
    status, line = fedevents(capsys, str(project / "exp.yaml"))
    assert status == 2 and "client-0-task-0" in line and "train" in line


def corrupt_one_training_image(project: Path) -> Path:
    image = sorted((project / "data/client-1-task-0/train").rglob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:40])  # a truncated PNG
    return image


def test_a_corrupt_image_fails_its_client_under_the_fail_policy(project, capsys) -> None:
    image = corrupt_one_training_image(project)
    status, line = fedevents(capsys, str(project / "exp.yaml"))
    assert status == 1
    assert line.startswith("fedevents: error: client client-1 failed in round 1 while training: ValueError: ")
    assert image.name in line
    record = json.loads(next(p for p in (project / "logs").glob("*.json") if ".trace" not in p.name).read_text())
    assert record["status"] == "failed"


def test_a_corrupt_image_leaves_only_its_client_out_under_tolerate(project, capsys) -> None:
    corrupt_one_training_image(project)
    status = main(["run", str(project / "exp.yaml"), "--set", "exp_opts.failure_policy=tolerate"])
    assert status == 0, capsys.readouterr().err
    record = json.loads(next(p for p in (project / "logs").glob("*.json") if ".trace" not in p.name).read_text())
    assert [(f["client"], f["phase"]) for f in record["failures"]] == [("client-1", "train")]
    assert "tr_acc" in record["data"]["client-0"]["1"]["client-0-task-0"]


def test_resuming_on_other_data_is_refused_naming_the_task_that_changed(project, capsys) -> None:
    """Regression: a resume with another datasets_dir holding other images was accepted."""
    assert main(["run", str(project / "exp.yaml")]) == 0
    moved = project / "moved"
    shutil.copytree(project / "data", moved)
    extend = ("--resume", "--set", "exp_opts.comm_rounds=2", "--set", f"datasets_dir={str(moved)!r}")
    image = sorted((moved / "client-1-task-0/gallery").rglob("*.png"))[0]
    image.write_bytes(image.read_bytes() + b"\0")  # one byte more in one image of one task
    capsys.readouterr()
    status, line = fedevents(capsys, str(project / "exp.yaml"), *extend)
    assert status == 2
    assert line.startswith(f"fedevents: error: {project / 'exp.yaml'}: cannot resume run ")
    assert "on other data: task client-1-task-0: expected " in line and "client-0-task-0" not in line
    image.write_bytes(image.read_bytes()[:-1])  # the same data in another folder: datasets_dir may move
    status = main(["run", str(project / "exp.yaml"), *extend])
    assert status == 0, capsys.readouterr().err


def test_files_beside_the_images_are_not_data(project, capsys) -> None:
    """Regression: a broken symlink in a task folder ended every start in a traceback, and a .DS_Store or
    Thumbs.db made a resume on the very same images refused as other data."""
    assert main(["run", str(project / "exp.yaml")]) == 0
    task = project / "data/client-0-task-0"
    (task / ".DS_Store").write_bytes(b"\0" * 10)
    (task / "train/Thumbs.db").write_bytes(b"\0" * 20)
    (task / "notes.txt").symlink_to(project / "no-such-file")
    capsys.readouterr()
    status = main(["run", str(project / "exp.yaml"), "--resume", "--set", "exp_opts.comm_rounds=2"])
    assert status == 0, capsys.readouterr().err
    record = json.loads(next(p for p in (project / "logs").glob("*.json") if ".trace" not in p.name).read_text())
    assert record["status"] == "finished" and record["last_round"] == 2
