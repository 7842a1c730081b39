"""The examples of docs/extending.md, copied out of the page and run through the CLI as a user would.

Each example is a pair of marked code blocks (```python file=NAME.py and ```yaml file=NAME.yaml), so the page
cannot drift from what is tested. The checks are the ones a user would make: FedAdam's first step against
the arithmetic done by hand, SCAFFOLD's control variates after one round against the gradients written out
by hand and a run killed and resumed against an uninterrupted one, the user model's parameters in the
checkpoint, the user data set's samples in the events clients trained on, worker processes against threads.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedevents.cli import main
from fedevents.engine import read_events
from fedevents.federated.models import build_model
from fedevents.federated.seeds import generator
from fedevents.federated.tasks import build_task_source
from fedevents.handlers.checkpoint import find_latest, load_checkpoint

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"
BLOCK = re.compile(r"^```(python|yaml) file=(\S+)\n(.*?)^```$", re.S | re.M)
EXAMPLES = ("fedadam", "scaffold", "two_layer", "blobs")

KILLER = '''
import os
import signal

from fedevents.engine.events import TrainStarted


class KillAt:
    """Kills this process with SIGKILL when round ``round``'s first training starts, as a crash would."""

    def __init__(self, round):
        self.round = round

    def subscribe(self, bus):
        return [bus.subscribe(TrainStarted, self.started)]

    def started(self, ev):
        if ev.round == self.round:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def blocks() -> dict[str, str]:
    """Every marked code block of the page, by file name."""
    found = {name: body for _, name, body in BLOCK.findall(DOC.read_text(encoding="utf-8"))}
    assert len(found) == len(BLOCK.findall(DOC.read_text(encoding="utf-8"))), "two blocks name the same file"
    return found


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The page's files in a fresh folder, the working folder; each test imports its own copies."""
    for name, body in blocks().items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    (tmp_path / "killer.py").write_text(KILLER, encoding="utf-8")
    for module in EXAMPLES:
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(*args: str) -> None:
    assert main(["run", *args]) == 0


def record(folder: Path, name: str) -> dict[str, Any]:
    (path,) = (p for p in (folder / "logs").glob(f"{name}-*.json") if not p.name.endswith(".trace.json"))
    return json.loads(path.read_text())


def events(folder: Path, name: str, kind: str) -> list[dict[str, Any]]:
    (path,) = (folder / "logs").glob(f"{name}-*.events.jsonl")
    return [e for e in read_events(path) if e["event"] == kind]


def server(folder: Path, name: str) -> dict[str, Any]:
    return load_checkpoint(find_latest(folder / "ckpts", name)).federation["server"]


def initial_model(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model every run of ``config``'s seed starts from (synthetic task)."""
    synth = config["task_opts"]["synthetic"]
    model = build_model(config["model_opts"], synth["input_shape"], synth["num_classes"],
                        generator=generator(config["random_seed"], "init"))
    return {key: value.detach() for key, value in model.state_dict().items()}


def test_the_page_has_every_example_as_a_file_and_an_experiment() -> None:
    assert set(blocks()) == {f"{name}.{ext}" for name in EXAMPLES for ext in ("py", "yaml")}


def test_fedadam_moves_the_global_model_by_adams_first_step_on_fedavgs_change(folder: Path) -> None:
    run("fedadam.yaml", "--set", "exp_opts.comm_rounds=1")
    run("fedadam.yaml", "--set", "exp_opts.comm_rounds=1", "--set", "exp_name=plain", "--set", "exp_method=fedavg",
        "--set", "method_opts={}")
    config = record(folder, "fedadam")["config"]
    lr, tau = config["method_opts"]["server_lr"], config["method_opts"]["tau"]
    x0 = initial_model(config)
    adam, fedavg = server(folder, "fedadam")["model"], server(folder, "plain")["model"]
    for key, start in x0.items():
        delta = fedavg[key].double() - start.double()
        # m = 0.1 delta and v = 0.01 delta^2 after one round, so sqrt(v) = 0.1 |delta|.
        expected = start.double() + lr * 0.1 * delta / (0.1 * delta.abs() + tau)
        torch.testing.assert_close(adam[key].double(), expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(adam[key], fedavg[key])
    extras = server(folder, "fedadam")["extras"]
    torch.testing.assert_close(extras["m"]["1.weight"].double(),
                               0.1 * (fedavg["1.weight"].double() - x0["1.weight"].double()), rtol=1e-5, atol=1e-7)


def test_scaffolds_control_variates_after_one_round_are_the_clients_gradients(folder: Path) -> None:
    run("scaffold.yaml", "--set", "exp_opts.comm_rounds=1")
    config = record(folder, "scaffold")["config"]
    x0 = initial_model(config)
    weight, bias = x0["1.weight"].double(), x0["1.bias"].double()
    tasks = build_task_source(config, config["random_seed"])
    state = load_checkpoint(find_latest(folder / "ckpts", "scaffold")).federation
    by_hand = {}
    for client in ("client-0", "client-1", "client-2"):
        x, y = (t.double() for t in tasks.train_data(client, "synth"))
        # The gradient of the mean cross-entropy of a linear layer: (softmax(Wx + b) - onehot(y))^T x / n.
        error = torch.softmax(x @ weight.T + bias, dim=1) - torch.nn.functional.one_hot(y.long(), 10).double()
        by_hand[client] = {"1.weight": error.T @ x / len(y), "1.bias": error.mean(0)}
        memory = state["clients"][client]["memory"]
        assert memory["new"] == 1
        for key, expected in by_hand[client].items():
            torch.testing.assert_close(memory["control"][key].double(), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(memory["delta"][key].double(), expected, rtol=1e-5, atol=1e-6)
    extras = state["server"]["extras"]
    assert extras["clients"] == 3
    for key in ("1.weight", "1.bias"):
        mean = sum(by_hand[c][key] for c in by_hand) / 3
        torch.testing.assert_close(extras["control"][key].double(), mean, rtol=1e-5, atol=1e-6)


def test_scaffold_killed_in_round_two_and_resumed_ends_as_the_uninterrupted_run(folder: Path) -> None:
    run("scaffold.yaml")
    kill = '[{target: "killer:KillAt", kwargs: {round: 2}}]'
    killed = subprocess.run([sys.executable, "-m", "fedevents.cli", "run", "scaffold.yaml", "--set", "exp_name=resumed",
                             "--set", f"handlers={kill}"], cwd=folder, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert record(folder, "resumed")["status"] == "running"
    run("scaffold.yaml", "--set", "exp_name=resumed", "--resume")
    resumed, whole = record(folder, "resumed"), record(folder, "scaffold")
    assert resumed["status"] == "finished"
    assert resumed["data"] == whole["data"]  # every metric of every round, to the last digit
    ours, theirs = server(folder, "resumed"), server(folder, "scaffold")
    assert ours["extras"]["clients"] == theirs["extras"]["clients"] == 3
    for key, value in theirs["extras"]["control"].items():
        assert torch.equal(ours["extras"]["control"][key], value)
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value)


def test_the_user_model_is_built_for_the_data_sets_shape_and_checkpointed(folder: Path) -> None:
    run("two_layer.yaml")
    model = server(folder, "two-layer")["model"]
    assert {key: list(value.shape) for key, value in model.items()} == {
        "body.1.weight": [5, 6], "body.1.bias": [5], "head.weight": [3, 5], "head.bias": [3]}
    assert record(folder, "two-layer")["config"]["model_opts"] == {"name": "two_layer:TwoLayer", "hidden": 5}
    assert main(["run", "two_layer.yaml", "--dry-run", "--set", "exp_name=planned"]) == 0


def test_clients_train_on_the_user_data_sets_samples(folder: Path) -> None:
    run("blobs.yaml")
    trained = {(e["client"], e["round"], e["task"]): e["samples"] for e in events(folder, "blobs", "TrainDone")}
    assert trained == {(f"client-{k}", rnd, task): 8 * (k + 1)
                       for k in range(3) for rnd, task in ((1, "plane"), (2, "turned"))}
    scored = events(folder, "blobs", "ValDone")
    assert {e["samples"] for e in scored if e.get("client")} == {8}
    data = record(folder, "blobs")
    assert data["config"]["task_opts"]["dataset_opts"] == {"samples": 8, "spread": 0.4}
    assert set(data["global"]["2"]) == {"plane", "turned"}


def test_user_method_model_and_data_set_give_worker_processes_the_threads_numbers(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The config in a folder of its own, run from elsewhere: worker processes import its modules from there."""
    project = folder / "project"
    project.mkdir()
    for name in ("blobs.py", "two_layer.py", "scaffold.py", "blobs.yaml"):
        (folder / name).rename(project / name)
    plugins = ("--set", "model_opts={name: two_layer:TwoLayer, hidden: 4}", "--set", "exp_method=scaffold:Scaffold")
    run("project/blobs.yaml", *plugins)
    run("project/blobs.yaml", *plugins, "--set", "exp_name=spawned", "--executor", "process")
    assert record(folder, "spawned")["data"] == record(folder, "blobs")["data"]


def test_a_typo_in_the_data_sets_option_gets_the_line_the_page_shows(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shown = re.search(r"^fedevents: error: .*$", DOC.read_text(encoding="utf-8"), re.M)
    assert shown is not None
    (folder / "blobs.yaml").write_text((folder / "blobs.yaml").read_text().replace("{samples: 8,", "{sampels: 8,"))
    assert main(["run", "blobs.yaml"]) == 2
    assert capsys.readouterr().err == shown.group(0) + "\n"
