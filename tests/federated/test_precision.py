"""Mixed precision: ``exp_opts.precision: bf16`` runs each model's forward passes in bfloat16 and nothing else."""

from __future__ import annotations

import copy
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from fedevents.cli.builder import check_devices
from fedevents.engine.config import load_experiments
from fedevents.engine.errors import DeviceError
from fedevents.federated import Federation, build_reid_model, check_precision, generator
from fedevents.federated.precision import as_float32, forward_precision
from fedevents.federated.synth_reid import generate_synth_reid
from fedevents.federated.tasks import ReidTasks

CPU = torch.device("cpu")


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def test_under_bf16_the_layers_compute_in_bfloat16_and_the_outputs_come_back_in_float32() -> None:
    model = _mlp()
    seen = []
    model[0].register_forward_hook(lambda _, args, out: seen.append(out.dtype))
    x = torch.randn(4, 8)
    with forward_precision(model, CPU, "bf16"):
        out = model(x)
    assert seen == [torch.bfloat16]
    assert out.dtype == torch.float32
    assert not torch.equal(out, model(x))  # the same call in float32 gives other bits
    assert seen[-1] == torch.float32 and "forward" not in vars(model)


def test_gradients_and_weights_stay_float32_under_bf16() -> None:
    model = _mlp()
    with forward_precision(model, CPU, "bf16"):
        model(torch.randn(4, 8)).sum().backward()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}


def test_fp32_leaves_the_model_alone() -> None:
    model = _mlp()
    x = torch.randn(4, 8)
    expected = model(x)
    with forward_precision(model, CPU, "fp32"):
        assert "forward" not in vars(model)
        assert torch.equal(model(x), expected)


def test_a_forward_that_raises_leaves_autocast_off_and_the_block_leaves_no_hook() -> None:
    model = _mlp()
    model[2].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with forward_precision(model, CPU, "bf16"):
        with pytest.raises(RuntimeError, match="boom"):
            model(torch.randn(2, 8))
        assert not torch.is_autocast_enabled("cpu")  # the next operation of the round runs as written
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_a_copy_made_in_the_block_runs_its_own_weights_cast_the_same_way() -> None:
    """Regression: replacing ``model.forward`` made a deep copy (iCaRL's previous model) call the original's."""
    model = _mlp()
    x = torch.randn(4, 8)
    with forward_precision(model, CPU, "bf16"):
        old = copy.deepcopy(model)
        with torch.no_grad():
            for p in old.parameters():
                p.zero_()
        out = old(x)
        assert out.dtype == torch.float32 and not out.any()
        assert model(x).any()


def test_as_float32_casts_reduced_precision_floats_only_and_keeps_containers() -> None:
    Pair = namedtuple("Pair", "logits features")
    half, wide, ints = torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.long)
    out = as_float32({"a": [half, (wide, ints)], "b": Pair(half, torch.ones(1, dtype=torch.float16)), "c": 3})
    assert out["a"][0].dtype == torch.float32
    assert out["a"][1][0].dtype == torch.float64 and out["a"][1][1].dtype == torch.long
    assert isinstance(out["b"], Pair) and {t.dtype for t in out["b"]} == {torch.float32}
    assert out["c"] == 3


def test_check_precision_accepts_the_cpu_and_refuses_a_gpu_without_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    check_precision("bf16", "cpu")
    check_precision("fp32", "cpu")
    asked = []

    def capability(index: int) -> tuple[int, int]:
        asked.append(index)
        return (7, 0) if index == 1 else (8, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    check_precision("fp32", "cuda:1")  # float32 runs anywhere: nothing to ask
    assert asked == []
    check_precision("bf16", "cuda")
    with pytest.raises(ValueError) as info:
        check_precision("bf16", "cuda:1")
    assert str(info.value) == ("exp_opts.precision bf16: expected a device with bfloat16 arithmetic (the CPU, or "
                               "CUDA compute capability 8.0 or newer), found cuda:1 with 7.0")
    assert asked == [0, 1]
    with pytest.raises(ValueError, match=r"expected one of fp32, bf16, found 'fp16'"):
        check_precision("fp16", "cpu")


def _federation(tmp_path: Path, precision: str) -> Federation:
    data = {"exp_name": "bf", "exp_method": "fedavg", "logs_dir": str(tmp_path / "logs"),
            "checkpoints_dir": str(tmp_path / "ckpts"), "exp_opts": {"precision": precision},
            "model_opts": {"name": "mlp", "hidden": [32]}, "optimizer_opts": {"name": "sgd", "lr": 0.1},
            "clients": {"count": 2, "tasks": ["synth"]},
            "task_opts": {"dataset": "synthetic", "batch_size": 16, "synthetic": {"samples_per_client": 48}}}
    tmp_path.mkdir()
    path = tmp_path / f"{precision}.yaml"
    path.write_text(yaml.safe_dump(data))
    (config,) = load_experiments([path])
    return Federation(config.data, seed=config.seed)


def _train_and_score(federation: Federation) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, float]]:
    result = federation.train(client="client-0", task="synth", round=1, device="cpu", state="integrated")
    (scored,) = federation.validate(client="client-0", tasks=["synth"], round=1, device="cpu").values()
    return federation.store.get("client-0").model, result.metrics, scored.metrics


def test_a_client_trained_under_bf16_stores_float32_weights_that_differ_from_float32_training(tmp_path: Path) -> None:
    state, metrics, scores = _train_and_score(_federation(tmp_path / "a", "bf16"))
    again, metrics_again, scores_again = _train_and_score(_federation(tmp_path / "b", "bf16"))
    plain, plain_metrics, _ = _train_and_score(_federation(tmp_path / "c", "fp32"))
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert all(torch.equal(state[k], again[k]) for k in state)  # deterministic, as float32 is
    assert (metrics, scores) == (metrics_again, scores_again)
    assert any(not torch.equal(state[k], plain[k]) for k in state)
    assert metrics != plain_metrics
    assert all(isinstance(v, float) for v in (*metrics.values(), *scores.values()))


@pytest.mark.parametrize("legacy", [False, True])
def test_reid_features_under_bf16_are_float32_and_close_to_float32s(tmp_path: Path, legacy: bool) -> None:
    generate_synth_reid(tmp_path, clients=1, tasks=1, ids_per_task=4, images_per_id=4, cameras=2, img_size=(32, 16))
    opts = {"augment_opts": {"level": "none", "img_size": [32, 16], "norm_mean": [0.5] * 3, "norm_std": [0.25] * 3}}
    task = "client-0-task-0"
    model = build_reid_model({"name": "resnet18", "num_classes": 8, "width": 4}, generator=generator(0, "bf16"))
    tasks = ReidTasks(opts, str(tmp_path), [task], 8, legacy=legacy)
    pixels = torch.randint(0, 256, (6, 3, 32, 16), dtype=torch.uint8)
    plain = tasks._features(model, pixels, CPU)
    with forward_precision(model, CPU, "bf16"):
        cast = tasks._features(model, pixels, CPU)
    assert plain.dtype == cast.dtype == torch.float32 and cast.shape == plain.shape
    assert not torch.equal(cast, plain)
    torch.testing.assert_close(cast, plain, rtol=0.1, atol=0.1)


def test_a_run_asking_bf16_of_a_gpu_without_it_is_refused_before_anything_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fedevents.cli.builder as builder

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"exp_name": "bf", "exp_method": "fedavg", "device": ["cuda:0"],
                                    "exp_opts": {"precision": "bf16"}, "clients": {"count": 2, "tasks": ["t"]},
                                    "task_opts": {"dataset": "synthetic"}}))
    (config,) = load_experiments([path])
    monkeypatch.setattr(builder, "check_device", lambda name: None)  # a GPU that is there, and a Turing one
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    with pytest.raises(DeviceError) as info:
        check_devices(config)
    assert str(info.value) == (f"{path}: exp_opts.precision bf16: expected a device with bfloat16 arithmetic (the "
                               f"CPU, or CUDA compute capability 8.0 or newer), found cuda:0 with 7.5")


def test_a_methods_own_forward_runs_cast_and_gives_a_float32_model_output() -> None:
    """FedSTIL trains the network after its head through a forward of its own, not the model's."""
    from fedevents.federated.methods import ModelOutput
    from fedevents.federated.precision import precision_call

    layer = nn.Linear(8, 3)
    inside = []

    def tail(x: torch.Tensor) -> ModelOutput:
        out = layer(x)
        inside.append(out.dtype)
        return ModelOutput(out, out)

    assert precision_call(tail, CPU, "fp32") is tail
    out = precision_call(tail, CPU, "bf16")(torch.randn(2, 8))
    assert inside == [torch.bfloat16]
    assert isinstance(out, ModelOutput) and out.logits.dtype == out.features.dtype == torch.float32


@pytest.fixture(scope="module")
def two_task_reid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth-reid")
    generate_synth_reid(root, clients=2, tasks=2, ids_per_task=6, images_per_id=4, cameras=2, img_size=(32, 16))
    return root


@pytest.mark.slow  # every method, two runs each as whole processes: run by CI (`make test-slow`)
@pytest.mark.parametrize("method", ["baseline", "ewc", "fedavg", "fedcurv", "fedprox", "fedstil", "fedstil-atten",
                                    "fedweit", "icarl", "mas"])
def test_every_method_trains_and_scores_under_bf16(two_task_reid: Path, tmp_path: Path, method: str) -> None:
    import json
    import math
    import os
    import subprocess
    import sys

    records = {}
    for precision in ("bf16", "fp32"):
        run = subprocess.run(
            [sys.executable, "-m", "fedevents.cli", "run", str(two_task_reid / "experiment.yaml"), "--quiet",
             "--set", f"exp_method={method}", "--set", "model_opts.width=4", "--set", f"exp_opts.precision={precision}",
             "--logs-dir", str(tmp_path / precision), "--set", f"checkpoints_dir={tmp_path / 'ck' / precision}"],
            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        assert run.returncode == 0, run.stderr
        (record,) = [p for p in (tmp_path / precision).glob("*.json") if ".trace" not in p.name]
        records[precision] = json.loads(record.read_text())["data"]
    values = [v for c in records["bf16"].values() for r in c.values() for m in r.values() for v in m.values()
              if isinstance(v, float)]
    assert values and all(math.isfinite(v) for v in values)
    assert records["bf16"] != records["fp32"]  # the precision reached this method's training or scoring
