"""FedSTIL, FedSTIL-atten and FedWeIT run end to end through ``Federation`` on a tiny synthetic ReID set:
the same numbers on every run, and the same numbers after resuming from ``state_dict()``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch

from fedevents.engine.config import load_experiment
from fedevents.federated import Federation

from two_task_play import differences, play

OPTIONS = {
    "fedstil": {"lambda_k": 6, "atten_default": 0.9, "distance_calculate_step": 1},
    "fedstil-atten": {"lambda_k": 6, "atten_default": 0.0, "bank_size": 2},
    "fedweit": {"kb_cnt": 2, "lambda_l1": 1e-4, "lambda_l2": 1e-2},
}


def config(dataset: Path, method: str) -> dict[str, Any]:
    cfg = dict(load_experiment(dataset / "experiment.yaml", overrides=["model_opts.width=4"]).data)
    cfg["exp_method"] = method
    cfg["method_opts"] = OPTIONS[method]
    cfg["model_opts"] = {**cfg["model_opts"], "fine_tuning": ["base.layer4", "classifier"]}
    cfg["task_opts"] = {**cfg["task_opts"], "batch_size": 8, "train_epochs": 1}
    return cfg


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_a_run_is_deterministic_and_resumes_identically(
        two_task_reid: Path, method: str, quiet_logs: None) -> None:
    whole = Federation(config(two_task_reid, method), seed=7)
    metrics = play(whole, range(1, 4))
    assert all(value == value for m in metrics for value in m.values())  # no NaN anywhere
    assert metrics[-1]["val_rank_1"] > 0.0

    # A second run of the first two rounds repeats the first run's numbers exactly ...
    first = Federation(config(two_task_reid, method), seed=7)
    assert play(first, range(1, 3))[:4] == metrics[:4]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # a checkpoint holds only what weights_only loading accepts
    buffer.seek(0)
    resumed = Federation(config(two_task_reid, method), seed=7)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    # ... and a run resumed from its checkpoint ends exactly where the uninterrupted one did.
    assert play(resumed, range(3, 4)) == metrics[4:]
    assert differences(resumed.state_dict(), whole.state_dict()) == []


def _with_anchors(model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model`` as checkpoints of format 4 stored it: every adaptive layer's anchors a0 = a, A0 = (1 - a) G."""
    out = dict(model)
    for key in [k for k in model if k.endswith(".G") and f"{k[:-2]}.a" in model]:
        layer = key[:-2]
        out[f"{layer}.a0"] = model[f"{layer}.a"].clone()
        out[f"{layer}.A0"] = (1 - model[f"{layer}.a"]) * model[key]
    return out


def test_a_fedstil_state_that_stores_the_anchors_resumes_identically(two_task_reid: Path, quiet_logs: None) -> None:
    """Checkpoints of format 4 stored the anchors in every FedSTIL model state; fedevents rebuilds them now."""
    whole = Federation(config(two_task_reid, "fedstil"), seed=7)
    metrics = play(whole, range(1, 4))
    first = Federation(config(two_task_reid, "fedstil"), seed=7)
    play(first, range(1, 3))
    state = first.state_dict()
    state["server"] = {**state["server"], "model": _with_anchors(state["server"]["model"])}
    state["clients"] = {key: {**fields, "model": _with_anchors(fields["model"])}
                        for key, fields in state["clients"].items()}
    resumed = Federation(config(two_task_reid, "fedstil"), seed=7)
    resumed.load_state_dict(state)
    assert not any(name.endswith((".a0", ".A0")) for name in resumed.server_state())
    assert play(resumed, range(3, 4)) == metrics[4:]
    assert differences(resumed.state_dict(), whole.state_dict()) == []


def test_fedstil_trains_only_what_its_layers_leave_trainable(two_task_reid: Path, quiet_logs: None) -> None:
    fed = Federation(config(two_task_reid, "fedstil"), seed=7)
    initial = {k: v.clone() for k, v in fed.server_state().items()}
    play(fed, range(1, 2))
    model = fed.store.get("client-0").model
    # layer4's first conv is adaptive: G and a as dispatched, A trained away from its anchor (1 - a) G, which
    # is rebuilt when needed rather than stored
    name = "base.layer4.0.conv1"
    assert torch.equal(model[f"{name}.G"], initial[f"{name}.G"])
    assert torch.all(model[f"{name}.a"] == 0.9) and f"{name}.a0" not in model and f"{name}.A0" not in model
    assert not torch.allclose(model[f"{name}.A"], 0.1 * initial[f"{name}.G"])
    # the frozen trunk before layer4 is an ordinary, untouched conv
    assert torch.equal(model["base.layer3.0.conv1.weight"], initial["base.layer3.0.conv1.weight"])
    memory = fed.store.get("client-0").memory
    assert memory["exemplar_x"].dtype == torch.float16 and len(memory["exemplar_y"]) <= 6
