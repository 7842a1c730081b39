"""Loading FedSTIL-format configs: deep merge, overrides, and one clear line for each kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedevents.cli.builder import VOCABULARY
from fedevents.engine import config
from fedevents.engine.errors import ConfigError


def load_experiments(paths, **kwargs):
    """The loader as the CLI calls it: with the registries of fedevents.federated."""
    return config.load_experiments(paths, vocabulary=VOCABULARY, **kwargs)


def load_experiment(path, **kwargs):
    return load_experiments([path], **kwargs)[0]

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"exp_name": "t", "exp_method": "fedavg", "clients": [{"client_name": "a", "tasks": ["x"]},
                                                                 {"client_name": "b", "tasks": ["x"]}]}


def write(tmp_path: Path, data: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: dict, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_experiment(write(tmp_path, data), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_common_defaults_merge_deeply_under_the_experiment() -> None:
    cfg = load_experiment(ROOT / "configs/fedavg.yaml", common=ROOT / "configs/common.yaml")
    assert cfg.rounds == 6  # set by the experiment
    assert cfg.val_interval == 5 and cfg.online_clients == 3  # kept from defaults
    assert cfg.data["model_opts"]["name"] == "mlp" and cfg.data["model_opts"]["hidden"] == [128]
    assert "channels" not in cfg.data["model_opts"]  # an option of cnn, not of the mlp chosen
    assert cfg.data["optimizer_opts"]["momentum"] == 0.9
    assert cfg.seed == 123 and cfg.parallel == 2 and cfg.devices == ("cpu",)
    assert cfg.clients.names == tuple(f"client-{i}" for i in range(5))


def test_set_overrides_any_key_and_reads_values_as_yaml(tmp_path: Path) -> None:
    cfg = load_experiment(write(tmp_path, MINIMAL), overrides=[
        "exp_opts.comm_rounds=3", "optimizer_opts.lr=0.5", "device=[cpu]", "clients.1.tasks=[y, z]"])
    assert cfg.rounds == 3
    assert cfg.data["optimizer_opts"]["lr"] == 0.5
    assert cfg.clients.tasks("b") == ("y", "z")


def test_demo_is_self_contained_and_compact_clients_expand_to_names() -> None:
    cfg = load_experiment(ROOT / "configs/demo.yaml")
    assert cfg.clients.names[0] == "client-0" and cfg.clients.names[-1] == "client-9"
    assert cfg.clients.tasks("client-3") == ("synth",)


def test_a_hundred_thousand_clients_from_the_compact_form(tmp_path: Path) -> None:
    data = dict(MINIMAL, clients={"count": 100_000, "tasks": ["x"], "prefix": "edge-"})
    cfg = load_experiment(write(tmp_path, data))
    assert len(cfg.clients) == 100_000
    assert cfg.clients.names[0] == "edge-00000" and cfg.clients.names[-1] == "edge-99999"
    assert cfg.online_clients == 100_000  # defaults to every client


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"exp_method": "fedavgg"}, "exp_method: expected one of baseline, ewc, fedavg, fedcurv, fedprox, fedstil, fedstil-atten, fedweit, icarl, mas or 'package.module:Name', "
                                   "found 'fedavgg' (string); did you mean 'fedavg'?"),
        ({"exp_opts": {"comm_round": 3}}, "exp_opts.comm_round: unknown key; did you mean 'comm_rounds'?"),
        ({"exp_opts": {"comm_rounds": "ten"}}, "exp_opts.comm_rounds: expected an integer >= 1, found 'ten' (string)"),
        ({"exp_opts": {"comm_rounds": 0}}, "exp_opts.comm_rounds: expected an integer >= 1, found 0 (integer)"),
        ({"exp_opts": {"online_clients": -1}}, "exp_opts.online_clients: expected an integer >= 1, found -1 (integer)"),
        ({"exp_opts": {"online_clients": 7}}, "exp_opts.online_clients = 7, but only 2 clients are defined"),
        ({"parallel": True}, "parallel: expected an integer >= 1, found True (boolean)"),
        ({"optimizer_opts": {"lr": "fast"}}, "optimizer_opts.lr: expected a number, found 'fast' (string)"),
        ({"clients": [{"client_name": "a", "tasks": ["x"]}, {"client_name": "a", "tasks": ["x"]}]},
         "clients: client_name 'a' is defined twice; expected unique names"),
        ({"clients": [{"client_name": "../etc", "tasks": ["x"]}]}, "clients[0].client_name: expected a name of letters"),
        ({"clients": [{"client_name": "a/b", "tasks": ["x"]}]}, "clients[0].client_name: expected a name of letters"),
        ({"clients": [{"client_name": "a\x00b", "tasks": ["x"]}]}, "clients[0].client_name: expected a name of letters"),
        ({"clients": [{"client_name": "a", "tasks": []}]}, "clients[0].tasks: expected a list of at least 1 items"),
        ({"clients": {"count": 0, "tasks": ["x"]}}, "clients.count: expected an integer >= 1, found 0 (integer)"),
        ({"clients": "many"}, "clients: expected a list of clients (client_name, tasks) or a mapping with count and tasks"),
        ({"device": ["gpu0"]}, "device[0]: expected 'cpu', 'cuda' or 'cuda:N', found 'gpu0'"),
        ({"datasets_dir": "/no/such/dir"}, "datasets_dir: expected an existing directory, found no directory at '/no/such/dir'"),
        ({"exp_name": "my run"}, "exp_name: expected a name of letters"),
        ({"task_opts": {"synthetic": {"input_shape": [1, 2, 3, 4]}}}, "task_opts.synthetic.input_shape: expected a list of 1 to 3 items"),
        ({"task_opts": {"dataset": "reid"}}, "datasets_dir: expected the folder of the ReID tasks for task_opts.dataset reid, found none"),
        ({"criterion_opts": [{"name": "triplet", "margn": 0.3}]}, "criterion_opts[0].margn: unknown key; did you mean 'margin'?"),
        ({"criterion_opts": []}, "criterion_opts: expected a list of at least 1 items"),
        ({"task_opts": {"map_mode": "first_match"}}, "task_opts.map_mode: expected one of fedstil-runner, first-match, standard, found 'first_match' (string); did you mean 'first-match'?"),
    ],
)
def test_bad_values_give_one_line_naming_file_and_key(tmp_path: Path, change: dict, expected: str) -> None:
    message = error_of(tmp_path, {**MINIMAL, **change})
    assert message.startswith(str(tmp_path / "exp.yaml") + ": ")
    assert expected in message


def test_missing_required_key(tmp_path: Path) -> None:
    data = dict(MINIMAL)
    del data["exp_method"]
    assert error_of(tmp_path, data).endswith("exp_method: missing; expected one of baseline, ewc, fedavg, fedcurv, "
                                             "fedprox, fedstil, fedstil-atten, fedweit, icarl, mas or "
                                             "'package.module:Name'")


def test_error_from_an_override_names_the_override(tmp_path: Path) -> None:
    msg = error_of(tmp_path, MINIMAL, overrides=["exp_opts.val_interval=-2"])
    assert msg == "--set exp_opts.val_interval: exp_opts.val_interval: expected an integer >= 1, found -2 (integer)"


def test_error_from_common_defaults_names_both_files(tmp_path: Path) -> None:
    common = write(tmp_path, {"defaults": {"exp_opts": {"val_interval": "often"}}}, "common.yaml")
    msg = error_of(tmp_path, MINIMAL, common=common)
    assert msg.startswith(f"{tmp_path / 'exp.yaml'} (with {common}): exp_opts.val_interval: expected an integer")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("exp_name: [unclosed", "expected valid YAML, found"),
        ("- a\n- b\n", "expected a mapping of keys at the top level, found a list"),
        ("!!python/object/apply:os.system ['echo pwned']", "expected valid YAML, found could not determine a constructor"),
        ("exp_name: t\n\texp_method: fedavg\n", "expected valid YAML, found"),
    ],
)
def test_malformed_yaml_and_python_tags_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_experiment(path)


def test_missing_file_and_bad_override_syntax(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: expected an experiment file, found no such file"):
        load_experiment(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="--set comm_rounds: expected key.path=value"):
        load_experiment(write(tmp_path, MINIMAL), overrides=["comm_rounds"])


def test_every_file_is_validated_before_any_is_returned(tmp_path: Path) -> None:
    good = write(tmp_path, MINIMAL, "good.yaml")
    bad = write(tmp_path, {**MINIMAL, "parallel": 0}, "bad.yaml")
    with pytest.raises(ConfigError, match="bad.yaml: parallel"):
        load_experiments([good, bad])


def test_model_names_are_what_federated_can_build() -> None:
    from fedevents.federated import MODELS as SMALL, REID_MODELS

    assert sorted(VOCABULARY.names("models")) == sorted(SMALL + REID_MODELS)


def test_reid_needs_the_number_of_identities(tmp_path: Path) -> None:
    data = {**MINIMAL, "datasets_dir": str(tmp_path), "task_opts": {"dataset": "reid"}, "model_opts": {"name": "resnet18"}}
    assert error_of(tmp_path, data).endswith("model_opts.num_classes: expected the number of training identities "
                                             "for task_opts.dataset reid, found none")


def test_a_criterion_list_keeps_its_order_and_fills_defaults(tmp_path: Path) -> None:
    data = {**MINIMAL, "criterion_opts": [{"name": "cross_entropy", "epsilon": 0.1}, {"name": "triplet", "margin": 0.3}]}
    cfg = load_experiment(write(tmp_path, data))
    assert [c["name"] for c in cfg.data["criterion_opts"]] == ["cross_entropy", "triplet"]
    assert cfg.data["criterion_opts"][1] == {"name": "triplet", "margin": 0.3, "hard_mining": True, "norm_feat": False,
                                            "weight": 1.0}
    assert cfg.data["criterion_opts"][0]["epsilon"] == 0.1


@pytest.mark.parametrize(("method", "fedstil_keys", "method_opts"), [
    ("ewc", {"lambda_penalty": 50}, {"lambda": 100.0}),  # FedSTIL's penalty has no 1/2
    ("mas", {"lambda_penalty": 0.01}, {"lambda": 0.01}),
    ("fedcurv", {"lambda_penalty": 50}, {"lambda": 50.0}),
    ("fedprox", {"lambda_l2": 1e-5}, {"mu": 2e-5}),
    ("icarl", {"k": 12000, "n_classes": 10, "examplar_batch_size": 64}, {"memory_size": 12000}),
])
def test_fedstil_method_keys_in_model_opts_become_the_methods_options(
        tmp_path: Path, method: str, fedstil_keys: dict, method_opts: dict) -> None:
    cfg = load_experiment(write(tmp_path, {**MINIMAL, "exp_method": method, "model_opts": {"hidden": [8], **fedstil_keys}}))
    assert cfg.data["method_opts"] == method_opts
    assert cfg.data["model_opts"] == {"name": "mlp", "hidden": [8]}  # one source of truth: method_opts


def test_the_same_option_in_method_opts_and_model_opts_must_agree(tmp_path: Path) -> None:
    same = {**MINIMAL, "exp_method": "fedprox", "method_opts": {"mu": 0.2}, "model_opts": {"lambda_l2": 0.1}}
    assert load_experiment(write(tmp_path, same)).data["method_opts"] == {"mu": 0.2}
    differ = {**same, "method_opts": {"mu": 0.3}}
    assert error_of(tmp_path, differ).endswith("exp.yaml: model_opts.lambda_l2 gives fedprox's option "
                                               "mu = 0.2, but method_opts.mu gave 0.3; expected one value")


def test_loader_opts_are_always_in_the_validated_config(tmp_path: Path) -> None:
    cfg = load_experiment(write(tmp_path, {**MINIMAL, "task_opts": {"batch_size": 16}}))
    assert cfg.data["task_opts"]["batch_size"] == 16  # the one place the batch size is kept
    assert cfg.data["task_opts"]["loader_opts"] == {"num_workers": 0, "pin_memory": False,
                                                    "persistent_workers": False, "multiprocessing_context": None}
    shipped = {"batch_size": 64, "num_workers": 0, "pin_memory": False, "persistent_workers": False,
               "multiprocessing_context": "spawn"}
    cfg = load_experiment(write(tmp_path, {**MINIMAL, "task_opts": {"loader_opts": shipped}}))
    assert cfg.data["task_opts"]["batch_size"] == 64
    assert cfg.data["task_opts"]["loader_opts"] == {k: v for k, v in shipped.items() if k != "batch_size"}


def test_a_reid_backbone_over_fedstil_task_folders_means_reid(tmp_path: Path) -> None:
    for task in ("x", "y"):
        (tmp_path / "data" / task / "train").mkdir(parents=True)
    data = {**MINIMAL, "datasets_dir": str(tmp_path / "data"), "model_opts": {"name": "resnet18", "num_classes": 4},
            "clients": [{"client_name": "a", "tasks": ["x", "y"]}]}
    assert load_experiment(write(tmp_path, data)).data["task_opts"]["dataset"] == "reid"
    data["clients"] = [{"client_name": "a", "tasks": ["x", "z"]}]
    assert error_of(tmp_path, data).endswith(
        f"task_opts.dataset: expected task folders <datasets_dir>/<task>/train for ReID model resnet18, found no "
        f"{tmp_path / 'data' / 'z' / 'train'} (or name the data set in task_opts.dataset)")
    small = {**MINIMAL, "datasets_dir": str(tmp_path / "data")}
    assert load_experiment(write(tmp_path, small)).data["task_opts"]["dataset"] == "synthetic"


def test_a_server_key_nothing_reads_is_refused(tmp_path: Path) -> None:
    assert error_of(tmp_path, {**MINIMAL, "server": {"server_nam": "s"}}).endswith(
        "server.server_nam: unknown key; did you mean 'server_name'?")


def test_optimizer_state_is_kept_across_rounds_except_in_fedstil_files(tmp_path: Path) -> None:
    """FedSTIL's runner empties the optimizer each round: its files (a ReID data set inferred) keep that."""
    assert load_experiment(write(tmp_path, MINIMAL)).data["optimizer_opts"] == {
        "name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "keep_state": True}
    for task in ("x", "y"):
        (tmp_path / "data" / task / "train").mkdir(parents=True)
    reid = {**MINIMAL, "datasets_dir": str(tmp_path / "data"), "model_opts": {"name": "resnet18", "num_classes": 4},
            "clients": [{"client_name": "a", "tasks": ["x", "y"]}]}
    assert load_experiment(write(tmp_path, reid)).data["optimizer_opts"]["keep_state"] is False
    named = {**reid, "task_opts": {"dataset": "reid"}}
    assert load_experiment(write(tmp_path, named)).data["optimizer_opts"]["keep_state"] is True
    legacy = {**MINIMAL, "exp_opts": {"legacy": True}}
    assert load_experiment(write(tmp_path, legacy)).data["optimizer_opts"]["keep_state"] is False
    kept = {**reid, "optimizer_opts": {"name": "adam", "keep_state": True}}
    assert load_experiment(write(tmp_path, kept)).data["optimizer_opts"]["keep_state"] is True
    assert error_of(tmp_path, {**MINIMAL, "optimizer_opts": {"keep_state": "no"}}).endswith(
        "optimizer_opts.keep_state: expected true or false, found 'no' (string)")


@pytest.mark.parametrize(
    ("given", "map_mode", "gamma"),
    [
        ({}, "standard", 0.5),
        ({"exp_opts": {"legacy": True}}, "fedstil-runner", 0.1),
        # What the file says wins over what legacy implies.
        ({"exp_opts": {"legacy": True}, "task_opts": {"map_mode": "standard"},
          "scheduler_opts": {"name": "step_lr", "gamma": 0.5}}, "standard", 0.5),
    ],
)
def test_legacy_implies_the_runners_map_and_step_lr_gamma_where_the_file_is_silent(
        tmp_path: Path, given: dict, map_mode: str, gamma: float) -> None:
    data = {**MINIMAL, "scheduler_opts": {"name": "step_lr"}, **given}
    cfg = load_experiment(write(tmp_path, data))
    assert cfg.data["task_opts"]["map_mode"] == map_mode
    assert cfg.data["scheduler_opts"]["gamma"] == gamma
