"""Checkpoints leave out what a client's next dispatch overwrites, and a killed run still resumes exactly.

A tiny ReID experiment (3 clients, 2 of them online each round, every client validated every round, one
task switch per client) is killed at the end of a round, before its checkpoint, and resumed; its record must equal an uninterrupted
run's to the last digit. Kept scores are off (``val_reuse``), so that every client's stored model is
read in every round. With seed 5 the rounds sample clients 1 and 2, then 1 and 2 again (both switch to
their second task), then 0 (new) and 2, then 1 and 2: the checkpoint of round 1 is followed by task
switches, which FedWeIT and the consolidating methods read the stored model at; that of round 2 by a round
in which client 1 sits out but is validated with its stored model.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fedevents.federated.synth_reid import generate_synth_reid
from fedevents.handlers.checkpoint import load_checkpoint

from .conftest import KEEPER, KILLER, fedevents, record

# Real `fedevents run` processes, killed and resumed: CI runs these (`make test-slow`), `make test` does not.
pytestmark = pytest.mark.slow

HELPERS = KEEPER + '''
class EveryEntry:
    """Declares every entry of a FedWeIT client's model replaced by its dispatch, wrongly at a task switch."""
    def __init__(self):
        from fedevents.federated.methods import FedWeIT
        from fedevents.federated.methods.base import every_entry
        FedWeIT.replaced_on_dispatch = lambda self, server, *, switching: every_entry
    def subscribe(self, bus):
        return []

class EveryClient:
    """Has checkpoints take every client for one the next round dispatches to, wrongly for those that sit out."""
    def __init__(self):
        import fedevents.handlers.checkpoint as ck
        ck.online_clients = lambda config, rnd: tuple(config.clients.names)
    def subscribe(self, bus):
        return []
'''

OPTIONS = {
    "fedavg": {},
    "fedstil": {"lambda_k": 6, "atten_default": 0.9, "distance_calculate_step": 1},
    "fedweit": {"kb_cnt": 2, "lambda_l1": 1e-4, "lambda_l2": 1e-2},
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reid")
    generate_synth_reid(out, clients=3, tasks=2, ids_per_task=12, images_per_id=4, cameras=2, img_size=(32, 16),
                        sustain_rounds=1, seed=5)
    return out


def experiment(folder: Path, dataset: Path, method: str, **exp_opts: Any) -> Path:
    data = yaml.safe_load((dataset / "experiment.yaml").read_text())
    data.update(exp_method=method, exp_name=method, method_opts=OPTIONS[method], logs_dir=str(folder / "logs"),
                checkpoints_dir=str(folder / "ckpts"))
    data["exp_opts"].update({"comm_rounds": 4, "val_interval": 1, "online_clients": 2, "val_clients": "all",
                             "val_reuse": False, "checkpoint_keep": 4, **exp_opts})
    data["model_opts"].update(width=4, fine_tuning=["base.layer4", "classifier"])
    data["task_opts"].update(batch_size=8)
    data["optimizer_opts"]["keep_state"] = False
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "killer.py").write_text(KILLER)
    (folder / "keeper.py").write_text(HELPERS)  # and the careless variants beside it
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> dict[str, Path]:
    """An uninterrupted run of each method, whose checkpoints are kept (no kill ever deletes them)."""
    out = {}
    for method in OPTIONS:
        folder = tmp_path_factory.mktemp(f"reference-{method}")
        keeper = {"target": "keeper:Keeper", "kwargs": {"into": str(folder / "manifests")}}
        run = fedevents("run", str(experiment(folder, dataset, method)), "--set",
                        f"handlers=[{json.dumps(keeper)}]", cwd=folder, timeout=300)
        assert run.returncode == 0, run.stderr
        out[method] = folder
    return out


def manifest(folder: Path, rnd: int) -> dict[str, Any]:
    return torch.load(folder / "manifests" / f"round-{rnd:06d}.pt", weights_only=True)


@pytest.mark.parametrize("method", sorted(OPTIONS))
@pytest.mark.parametrize("kill_round", [2, 3])
def test_a_run_killed_after_a_checkpoint_that_left_entries_out_resumes_exactly(
        tmp_path: Path, dataset: Path, references: dict[str, Path], method: str, kill_round: int) -> None:
    exp = experiment(tmp_path, dataset, method)
    # Killed as round ``kill_round`` ends, once the checkpoint before it is announced (written beside the
    # round's training): the resumed run trains and validates that round again from the checkpoint.
    killer = {"target": "killer:Killer", "kwargs": {"at": "CheckpointSaved", "round": kill_round - 1}}
    killed = fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(killer)}]", cwd=tmp_path, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"after round {kill_round - 1}" in resumed.stderr
    final, expected = record(tmp_path), record(references[method])
    assert final["status"] == "finished"
    assert final["data"] == expected["data"]  # every metric, every client, to the last digit
    assert final["comm"] == expected["comm"]


@pytest.mark.parametrize(("method", "kill_round", "careless"), [
    ("fedweit", 2, "EveryEntry"),  # the stored model read at a task switch
    ("fedavg", 3, "EveryClient"),  # the stored model of a client that sits out, validated
])
def test_these_resumes_would_differ_if_a_live_entry_were_left_out(
        tmp_path: Path, dataset: Path, references: dict[str, Path], method: str, kill_round: int,
        careless: str) -> None:
    """The test above can fail: a checkpoint that leaves out an entry still read gives another record."""
    exp = experiment(tmp_path, dataset, method)
    handlers = [{"target": "killer:Killer", "kwargs": {"at": "CheckpointSaved", "round": kill_round - 1}},
                {"target": f"keeper:{careless}"}]
    killed = fedevents("run", str(exp), "--set", f"handlers={json.dumps(handlers)}", cwd=tmp_path, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = fedevents("run", str(exp), "--resume", cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert record(tmp_path)["data"] != record(references[method])["data"]


def test_what_each_checkpoint_leaves_out(references: dict[str, Path]) -> None:
    """Only states of clients dispatched to next, only what their method's dispatch replaces."""
    fedavg = [manifest(references["fedavg"], rnd)["dispatched"] for rnd in range(5)]
    every = sorted(manifest(references["fedavg"], 1)["federation"]["server"]["model"])
    # Round 0 stores no client; round 2's next round dispatches to client 0 (new) and 2, not to 1; the last
    # one's next round (a run extended with --resume) to clients 0 and 2.
    assert fedavg == [{}, {"client-1": every, "client-2": every}, {"client-2": every},
                      {"client-1": every, "client-2": every}, {"client-0": every, "client-2": every}]

    # FedWeIT reads the stored model at a task switch (round 2), so round 1's checkpoint keeps it whole.
    fedweit = [manifest(references["fedweit"], rnd)["dispatched"] for rnd in range(4)]
    assert fedweit[1] == {}
    kept = {name.rpartition(".")[2] for names in fedweit[3].values() for name in names}
    assert set(fedweit[3]) == {"client-1", "client-1@client-1-task-1", "client-2", "client-2@client-2-task-1"}
    assert kept == {"sw", "aw", "atten", "aw_kb"}

    # FedSTIL restarts its adaptive layers at every dispatch, a task switch or not; the model it keeps for
    # a finished task is validated every round, so it is never left out.
    fedstil = manifest(references["fedstil"], 1)["dispatched"]
    assert set(fedstil) == {"client-1", "client-2"}
    assert {name.rpartition(".")[2] for names in fedstil.values() for name in names} == {"G", "a", "A"}
    assert set(manifest(references["fedstil"], 3)["dispatched"]) == {
        "client-1", "client-1@client-1-task-1", "client-2", "client-2@client-2-task-1"}


def test_a_loaded_checkpoint_holds_every_entry_again(references: dict[str, Path]) -> None:
    (path,) = (references["fedavg"] / "ckpts").glob("*/round-000004.pt")
    loaded = load_checkpoint(path)
    glob = loaded.federation["server"]["model"]
    for client in ("client-0", "client-2"):
        model = loaded.federation["clients"][client]["model"]
        assert list(model) == list(glob)
        assert all(model[name] is glob[name] for name in glob)
    # Client 1 would sit out a fifth round: its trained model is stored, and differs from the global one.
    own = loaded.federation["clients"]["client-1"]["model"]
    assert list(own) == list(glob)
    assert any(not torch.equal(own[name], glob[name]) for name in glob)


def test_failures_tolerated_leave_nothing_out(tmp_path: Path, dataset: Path) -> None:
    """A client whose next round fails keeps its stored model, which may then be validated."""
    exp = experiment(tmp_path, dataset, "fedavg", failure_policy="tolerate", comm_rounds=2)
    keeper = {"target": "keeper:Keeper", "kwargs": {"into": str(tmp_path / "manifests")}}
    run = fedevents("run", str(exp), "--set", f"handlers=[{json.dumps(keeper)}]", cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert manifest(tmp_path, 1)["dispatched"] == {}
    assert set(manifest(tmp_path, 1)["federation"]["clients"]["client-1"]["model"]) == set(
        manifest(tmp_path, 1)["federation"]["server"]["model"])
