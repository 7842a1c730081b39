"""User components named ``"module:Name"`` in YAML, and the Python API taking a mapping.

A FedAvgM method (server-side momentum) lives in a file next to the experiment file, as a user's would;
it declares its options in ``defaults`` like the built-ins, so a typo in one gets the same did-you-mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedevents.cli import build_experiment, main
from fedevents.engine import read_events

FEDAVGM = '''
import torch

from fedevents.federated import Method
from fedevents.federated.fedavg import weighted_mean
from fedevents.federated.methods import ServerState


class FedAvgM(Method):
    """FedAvg with server momentum: v = beta * v + (w - mean); w = w - server_lr * v."""

    name = "fedavgm"
    defaults = {"beta": 0.9, "server_lr": 1.0}

    def aggregate(self, server, uploads):
        mean = weighted_mean(uploads)
        velocity = server.extras.get("velocity") or {k: torch.zeros_like(v, dtype=torch.float32)
                                                     for k, v in mean.items() if v.is_floating_point()}
        model = {}
        for key, value in mean.items():
            if key not in velocity:
                model[key] = value
                continue
            velocity[key] = self.options["beta"] * velocity[key] + (server.model[key] - value)
            model[key] = server.model[key] - self.options["server_lr"] * velocity[key]
        return ServerState(model, {**server.extras, "velocity": velocity})
'''

EXPERIMENT = """\
exp_name: momentum
exp_method: fedavgm_method:FedAvgM
method_opts: {beta: 0.5, server_lr: 1.5}
exp_opts: {comm_rounds: 2}
optimizer_opts: {name: torch.optim:SGD}
model_opts: {hidden: [8]}
task_opts: {synthetic: {samples_per_client: 32, test_size: 16}}
clients: {count: 2, tasks: [synth]}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "fedavgm_method.py").write_text(FEDAVGM)
    return tmp_path


def run(folder: Path, monkeypatch: pytest.MonkeyPatch, text: str, *args: str) -> int:
    (folder / "exp.yaml").write_text(text)
    monkeypatch.chdir(folder)
    return main(["run", "exp.yaml", *args])


def test_a_method_in_a_file_next_to_the_config_runs_from_the_cli(
        folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    text = EXPERIMENT.replace("optimizer_opts: {name: torch.optim:SGD}\n", "")
    assert run(folder, monkeypatch, text) == 0, capsys.readouterr().err
    (record,) = (p for p in (folder / "logs").glob("momentum-*.json") if not p.name.endswith(".trace.json"))
    data = json.loads(record.read_text())
    assert data["config"]["exp_method"] == "fedavgm_method:FedAvgM"
    assert data["config"]["method_opts"] == {"beta": 0.5, "server_lr": 1.5}
    # Round 1 starts from the same model as FedAvg; round 2 from a step 1.5 times FedAvg's (v starts at 0).
    assert run(folder, monkeypatch, text.replace("fedavgm_method:FedAvgM", "fedavg").replace(
        "method_opts: {beta: 0.5, server_lr: 1.5}\n", "").replace("momentum", "plain")) == 0
    (plain,) = (p for p in (folder / "logs").glob("plain-*.json") if not p.name.endswith(".trace.json"))
    fedavg = json.loads(plain.read_text())
    for client in ("client-0", "client-1"):
        assert data["data"][client]["1"]["synth"]["tr_loss"] == fedavg["data"][client]["1"]["synth"]["tr_loss"]
        assert data["data"][client]["2"]["synth"]["tr_loss"] != fedavg["data"][client]["2"]["synth"]["tr_loss"]


def test_a_typo_in_a_plugin_option_gets_a_did_you_mean(
        folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    text = EXPERIMENT.replace("{beta: 0.5,", "{betta: 0.5,").replace("optimizer_opts: {name: torch.optim:SGD}\n", "")
    assert run(folder, monkeypatch, text) == 2
    assert capsys.readouterr().err == "fedevents: error: exp.yaml: method_opts.betta: unknown key; did you mean 'beta'?\n"


@pytest.mark.parametrize(("change", "message"), [
    (("fedavgm_method:FedAvgM", "fedavgm_method:Missing"),
     "exp.yaml: exp_method: expected module 'fedavgm_method' to define 'Missing', found no such attribute"),
    (("fedavgm_method:FedAvgM", "no_such_module:FedAvgM"),
     "exp.yaml: exp_method: expected an importable module, found 'no_such_module' (ModuleNotFoundError: "
     "No module named 'no_such_module')"),
    (("fedavgm_method:FedAvgM", "json:dumps"),
     "exp.yaml: exp_method: expected a subclass of fedevents.federated.Method, found json:dumps (function)"),
    (("{name: torch.optim:SGD}", "{name: json:JSONDecoder}"),
     "exp.yaml: optimizer_opts.name: expected a subclass of torch.optim.Optimizer, found json:JSONDecoder (type)"),
])
def test_a_bad_plugin_is_refused_in_one_line(folder: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str], change: tuple[str, str],
                                             message: str) -> None:
    assert run(folder, monkeypatch, EXPERIMENT.replace(*change)) == 2
    assert capsys.readouterr().err == f"fedevents: error: {message}\n"


def test_build_experiment_takes_a_mapping(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)
    exp = build_experiment({"exp_name": "api", "exp_method": "fedavg", "exp_opts": {"comm_rounds": 1},
                            "model_opts": {"hidden": [8]},
                            "task_opts": {"synthetic": {"samples_per_client": 16, "test_size": 8}},
                            "clients": {"count": 2, "tasks": ["synth"]}}, console=None)
    exp.run()
    assert exp.config.source == "<mapping>"
    record = json.loads(exp.paths.record.read_text())
    assert record["config"]["exp_name"] == "api" and set(record["data"]) == {"client-0", "client-1"}


def test_a_bad_mapping_is_named_as_a_mapping() -> None:
    from fedevents.engine.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        build_experiment({"exp_name": "api", "exp_method": "fedavgg", "clients": {"count": 1, "tasks": ["t"]}})
    assert str(info.value).startswith("<mapping>: exp_method: expected one of baseline, ")
    assert str(info.value).endswith("did you mean 'fedavg'?")


SCALED_LOSS = '''
import torch
from torch.nn import functional as F


class ScaledCE(torch.nn.Module):
    """Cross-entropy times a factor; a user's loss sees logits, features and targets."""

    defaults = {"scale": 1.0}

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, logits, features, targets):
        return self.scale * F.cross_entropy(logits, targets)
'''

LOSS_EXPERIMENT = """\
exp_name: NAME
exp_method: fedavg
exp_opts: {comm_rounds: 2}
criterion_opts: CRITERION
model_opts: {hidden: [8]}
task_opts: {synthetic: {samples_per_client: 32, test_size: 16}}
clients: {count: 2, tasks: [synth]}
"""


def test_a_loss_in_a_file_next_to_the_config_trains_like_the_built_in_it_matches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "scaled_loss.py").write_text(SCALED_LOSS)
    user = LOSS_EXPERIMENT.replace("NAME", "user").replace("CRITERION", "{name: scaled_loss:ScaledCE, scale: 1.0}")
    plain = LOSS_EXPERIMENT.replace("NAME", "plain").replace("CRITERION", "{name: cross_entropy}")
    assert run(tmp_path, monkeypatch, user) == 0, capsys.readouterr().err
    assert run(tmp_path, monkeypatch, plain) == 0, capsys.readouterr().err
    user_data, plain_data = (
        json.loads(next(p for p in (tmp_path / "logs").glob(f"{n}-*.json") if not p.name.endswith(".trace.json"))
                   .read_text()) for n in ("user", "plain"))
    assert user_data["config"]["criterion_opts"] == {"name": "scaled_loss:ScaledCE", "scale": 1.0, "weight": 1.0}
    for rnd in ("1", "2"):
        assert user_data["data"]["client-0"][rnd]["synth"]["tr_loss"] == plain_data["data"]["client-0"][rnd]["synth"]["tr_loss"]


def test_a_typo_in_a_user_loss_option_gets_a_did_you_mean(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "scaled_loss.py").write_text(SCALED_LOSS)
    text = LOSS_EXPERIMENT.replace("NAME", "typo").replace("CRITERION", "[{name: scaled_loss:ScaledCE, scal: 2.0}]")
    assert run(tmp_path, monkeypatch, text) == 2
    assert capsys.readouterr().err == ("fedevents: error: exp.yaml: criterion_opts[0].scal: unknown key; "
                                       "did you mean 'scale'?\n")


TINY_NET = '''
from torch import nn


class TinyNet(nn.Module):
    """One linear layer over the flattened sample."""

    defaults = {"bias": True}

    def __init__(self, input_shape, num_classes, bias=True):
        super().__init__()
        size = 1
        for s in input_shape:
            size *= s
        self.flat, self.linear = nn.Flatten(), nn.Linear(size, num_classes, bias=bias)

    def forward(self, x):
        return self.linear(self.flat(x))


class NeedsDepth(TinyNet):
    """Refuses to be built, as a user's model with a bad option would."""

    defaults = {"depth": 1}

    def __init__(self, input_shape, num_classes, depth=1):
        raise ValueError(f"depth {depth} is not supported")


class TakesClasses(TinyNet):
    defaults = {"num_classes": 4}
'''

COUNTS = '''
import torch


class Counts:
    """Client k holds k + 1 samples per task, all of class k % 2: features are (k, task index)."""

    defaults = {"scale": 1.0}
    input_shape = (2,)
    num_classes = 2

    def __init__(self, *, seed, clients, tasks, datasets_dir, scale=1.0):
        self.clients, self.tasks, self.scale = list(clients), list(tasks), scale

    def train(self, client, task):
        k, t = self.clients.index(client), self.tasks.index(task)
        x = torch.tensor([[k * self.scale, float(t)]] * (k + 1))
        return x, torch.full((k + 1,), k % 2, dtype=torch.long)

    def test(self, client, task):
        return self.train(client, task)


class NoTest:
    def train(self, client, task):
        return None


class BadLabels(Counts):
    def test(self, client, task):
        x, y = self.train(client, task)
        return x, y + 5


class Failing(Counts):
    def __init__(self, **given):
        raise OSError("no files under the data folder")
'''

DATA_EXPERIMENT = """\
exp_name: NAME
exp_method: fedavg
exp_opts: {comm_rounds: 1}
model_opts: {name: tiny_net:TinyNet}
task_opts: {dataset: counts:Counts, dataset_opts: {scale: 0.5}}
clients: {count: 3, tasks: [a]}
"""


@pytest.fixture
def data_folder(tmp_path: Path) -> Path:
    (tmp_path / "tiny_net.py").write_text(TINY_NET)
    (tmp_path / "counts.py").write_text(COUNTS)
    (tmp_path / "broken.py").write_text("import no_such_dependency\n")
    return tmp_path


def test_a_user_model_on_a_user_data_set_trains_on_its_samples(
        data_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(data_folder, monkeypatch, DATA_EXPERIMENT.replace("NAME", "counted")) == 0, capsys.readouterr().err
    (events,) = (data_folder / "logs").glob("counted-*.events.jsonl")
    done = [e for e in read_events(events) if e["event"] == "TrainDone"]
    assert sorted((e["client"], e["samples"]) for e in done) == [("client-0", 1), ("client-1", 2), ("client-2", 3)]
    (record,) = (p for p in (data_folder / "logs").glob("counted-*.json") if not p.name.endswith(".trace.json"))
    config = json.loads(record.read_text())["config"]
    assert config["model_opts"] == {"name": "tiny_net:TinyNet", "bias": True}
    assert config["task_opts"]["dataset_opts"] == {"scale": 0.5}


def test_a_dry_run_checks_user_models_and_data_sets(
        data_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(data_folder, monkeypatch, DATA_EXPERIMENT.replace("NAME", "planned"), "--dry-run") == 0
    broken = DATA_EXPERIMENT.replace("NAME", "planned").replace("tiny_net:TinyNet}", "tiny_net:NeedsDepth, depth: 3}")
    assert run(data_folder, monkeypatch, broken, "--dry-run") == 2
    assert capsys.readouterr().err.endswith(
        "exp.yaml: model_opts.name: expected tiny_net:NeedsDepth(input_shape=[2], num_classes=2, ...) to build a "
        "model, found ValueError: depth 3 is not supported\n")


@pytest.mark.parametrize(("change", "message"), [
    (("{scale: 0.5}", "{scal: 0.5}"), "task_opts.dataset_opts.scal: unknown key; did you mean 'scale'?"),
    (("tiny_net:TinyNet}", "tiny_net:TinyNet, bais: false}"), "model_opts.bais: unknown key; did you mean 'bias'?"),
    (("tiny_net:TinyNet", "json:dumps"),
     "model_opts.name: expected a subclass of torch.nn.Module, found json:dumps (function)"),
    (("tiny_net:TinyNet", "tiny_net:TakesClasses"),
     "model_opts.name: expected a model whose defaults leave out input_shape, num_classes (the data set gives "
     "them), found tiny_net:TakesClasses (type)"),
    (("counts:Counts", "counts:Missing"),
     "task_opts.dataset: expected module 'counts' to define 'Missing', found no such attribute"),
    (("counts:Counts", "broken:Counts"),
     "task_opts.dataset: expected an importable module, found 'broken' (ModuleNotFoundError: No module named "
     "'no_such_dependency')"),
    (("counts:Counts", "counts:NoTest"),
     "task_opts.dataset: expected a class with train(client, task) and test(client, task) methods, found "
     "counts:NoTest (type)"),
    (("counts:Counts, dataset_opts: {scale: 0.5}", "synthetic, dataset_opts: {scale: 0.5}"),
     "task_opts.dataset_opts.scale: unknown key; known keys for synthetic: none"),
    (("counts:Counts", "counts:Failing"),
     "task_opts.dataset: expected counts:Failing(seed=..., clients=..., tasks=..., datasets_dir=..., ...) to build "
     "a data set, found OSError: no files under the data folder"),
    (("{comm_rounds: 1}", "{comm_rounds: 1, val_model: global}"),
     "task_opts.dataset: expected counts:Counts to define global_test(task) for exp_opts.val_model global, "
     "found none"),
])
def test_a_bad_user_model_or_data_set_is_refused_in_one_line(
        data_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        change: tuple[str, str], message: str) -> None:
    assert run(data_folder, monkeypatch, DATA_EXPERIMENT.replace("NAME", "bad").replace(*change)) == 2
    assert capsys.readouterr().err == f"fedevents: error: exp.yaml: {message}\n"


def test_a_data_set_giving_labels_out_of_range_fails_the_client_naming_the_call(
        data_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    text = DATA_EXPERIMENT.replace("NAME", "labels").replace("counts:Counts", "counts:BadLabels")
    assert run(data_folder, monkeypatch, text) == 1
    assert ("ValueError: task_opts.dataset: expected counts:BadLabels.test('client-0', 'a') to give labels 0-1, "
            "found 5-5") in capsys.readouterr().err
