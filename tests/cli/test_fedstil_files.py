"""A folder of FedSTIL-format experiment files runs through the CLI unchanged.

configs/fedstil/ holds a common.yaml with a ``defaults`` block and one file per method, written key for key
as FedSTIL ships them (method options in ``model_opts`` and ``server``, ``loader_opts``, ``model_ckpt_name``,
no ``task_opts.dataset``). Only ``datasets_dir``, ``checkpoints_dir``, ``--device`` and ``--logs-dir`` are
given on the command line, as a FedSTIL user moving over would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedevents.cli import main
from fedevents.federated.methods import REGISTRY
from fedevents.federated.synth_reid import generate_synth_reid

FOLDER = Path(__file__).resolve().parents[2] / "configs" / "fedstil"
#: File -> the method it names; files of methods not in the registry are skipped, saying so.
FILES = {"sm": "baseline", "mm": "baseline", "fedavg": "fedavg", "fedprox": "fedprox", "ewc": "ewc", "mas": "mas",
         "fedcurv": "fedcurv", "icarl": "icarl", "fedweit": "fedweit", "fedstil": "fedstil",
         "fedstil-atten": "fedstil-atten",
         # FedSTIL's four ablations (FEDSTIL.md section 1.4): the fedstil file with one option changed.
         "fedstil-wo-al": "fedstil", "fedstil-wo-pt": "fedstil", "fedstil-wo-pr": "fedstil", "fedstil-wo-st": "fedstil",
         # Its backbone files: full-size models, so they run on the smaller data set below.
         "fedstil-res50": "fedstil", "fedstil-swin": "fedstil"}
#: Files whose full-size backbone costs seconds per image on a CPU: a Swin-tiny sees every image at 224x224.
BIG = {"fedstil-res50", "fedstil-swin"}
#: The width a backbone file that gives none runs at: its model's published one.
PUBLISHED_WIDTH = {"fedstil-res50": 64, "fedstil-swin": 96}
#: What each ablation file changes from fedstil.yaml, key for key (and nothing else but its exp_name).
ABLATIONS = {"fedstil-wo-al": ("atten_default", 1.0), "fedstil-wo-st": ("atten_default", 0.0),
             "fedstil-wo-pt": ("lambda_l1", 0.0), "fedstil-wo-pr": ("lambda_k", 0)}
METRICS = {"val_rank_1", "val_rank_3", "val_rank_5", "val_rank_10", "val_map"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fedstil-2x2")
    generate_synth_reid(out, clients=2, tasks=2, ids_per_task=4, images_per_id=4, cameras=2, img_size=(32, 16))
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fedstil-2x2-small")
    generate_synth_reid(out, clients=2, tasks=2, ids_per_task=2, images_per_id=4, cameras=2, img_size=(32, 16))
    return out


def test_the_folder_holds_a_file_per_method() -> None:
    assert {p.stem for p in FOLDER.glob("*.yaml")} == {"common", *FILES}


@pytest.mark.parametrize("name", ABLATIONS)
def test_an_ablation_file_is_the_fedstil_file_with_one_option_changed(name: str) -> None:
    base = yaml.safe_load((FOLDER / "fedstil.yaml").read_text())
    ablation = yaml.safe_load((FOLDER / f"{name}.yaml").read_text())
    key, value = ABLATIONS[name]
    assert ablation["exp_name"] == name and ablation["model_opts"][key] == value != base["model_opts"][key]
    for doc in (base, ablation):
        del doc["exp_name"], doc["model_opts"][key]
    assert ablation == base


# The full-size backbones take most of this file's time: CI runs them (`make test-slow`), `make test` does not.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in FILES])
def test_a_fedstil_file_runs_unchanged(request: pytest.FixtureRequest, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], name: str) -> None:
    if FILES[name] not in REGISTRY:
        pytest.skip(f"method {FILES[name]!r} is not in the method registry of this build")
    data = request.getfixturevalue("small_data" if name in BIG else "data")
    logs = tmp_path / "logs"
    status = main(["run", str(FOLDER / f"{name}.yaml"), "--common", str(FOLDER / "common.yaml"),
                   "--set", f"datasets_dir={data}", "--set", f"checkpoints_dir={tmp_path / 'ckpts'}",
                   "--device", "cpu", "--logs-dir", str(logs)])
    assert status == 0, capsys.readouterr().err
    (record_path,) = (p for p in logs.glob(f"{name}-*.json") if not p.name.endswith(".trace.json"))
    record = json.loads(record_path.read_text())
    assert record["config"]["exp_method"] == FILES[name]
    # The file's model, at its full size: nothing but the four command-line settings changed it.
    model_opts = yaml.safe_load((FOLDER / f"{name}.yaml").read_text())["model_opts"]
    assert record["config"]["model_opts"]["name"] == model_opts["name"]
    assert record["config"]["model_opts"]["width"] == model_opts.get("width", PUBLISHED_WIDTH.get(name))
    assert record["config"]["task_opts"]["dataset"] == "reid"  # inferred: a ReID backbone over task folders
    assert record["config"]["task_opts"]["batch_size"] == 8  # given as loader_opts.batch_size
    assert record["config"]["task_opts"]["loader_opts"]["multiprocessing_context"] == "spawn"
    assert record["config"]["optimizer_opts"]["lr"] == 0.001  # '1e-3', a string to PyYAML
    # Round 2 validates every client's model on both tasks of its stream, with ReID metrics.
    for client in ("client-0", "client-1"):
        scored = record["data"][client]["2"]
        assert set(scored) == {f"{client}-task-0", f"{client}-task-1"}
        assert all(set(m) >= METRICS for m in scored.values())


def test_a_fedstil_file_runs_as_the_original_runner_did_under_legacy(data: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    logs = tmp_path / "logs"
    status = main(["run", str(FOLDER / "fedstil.yaml"), "--common", str(FOLDER / "common.yaml"),
                   "--set", f"datasets_dir={data}", "--set", f"checkpoints_dir={tmp_path / 'ckpts'}",
                   "--set", "exp_opts.legacy=true", "--device", "cpu", "--logs-dir", str(logs)])
    assert status == 0, capsys.readouterr().err
    (record_path,) = (p for p in logs.glob("fedstil-*.json") if not p.name.endswith(".trace.json"))
    record = json.loads(record_path.read_text())
    # The runner's mAP and torch's StepLR gamma, which the file does not set.
    assert record["config"]["task_opts"]["map_mode"] == "fedstil-runner"
    assert record["config"]["scheduler_opts"] == {"name": "step_lr", "step_size": 5, "gamma": 0.1}
    # A query's runner AP is 1 when its first match is at rank 1, else 1 / (2 * rank) <= 1/4: so mAP lies
    # between the rank-1 fraction and that plus a quarter of the rest (a true mAP can fall below rank-1).
    for scores in (s for client in ("client-0", "client-1") for s in record["data"][client]["2"].values()):
        rank_1 = scores["val_rank_1"]
        assert rank_1 <= scores["val_map"] <= rank_1 + (1 - rank_1) / 4 + 1e-12
