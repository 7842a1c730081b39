"""``optimizer_opts.keep_state``: whether a client's optimizer state (Adam's moments, its lr) outlives a round."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedevents.federated import Federation
from fedevents.federated.seeds import generator

ROUNDS = (1, 2)


def _adam(fed_config: dict[str, Any], keep_state: bool) -> dict[str, Any]:
    fed_config["optimizer_opts"] = {"name": "adam", "lr": 0.01, "weight_decay": 0.0, "keep_state": keep_state}
    fed_config["task_opts"]["train_epochs"] = 2
    return fed_config


def _federated(config: dict[str, Any]) -> Federation:
    """Client ``a`` trained in rounds 1 and 2, each round from the (never aggregated) global model."""
    fed = Federation(config, seed=5)
    for rnd in ROUNDS:
        fed.train(client="a", task="t0", round=rnd, device="cpu", state="incremental")
    return fed


def _hand_loop(fed: Federation, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The same two rounds written out by hand, with a new Adam for each round (FedSTIL's rule)."""
    model = fed.worker.model(torch.device("cpu"))
    x, y = fed.worker.tasks.train_inputs("a", "t0")
    for rnd in ROUNDS:
        model.load_state_dict(fed.server_state())
        adam = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.0)
        shuffle = generator(5, rnd, "a", "t0", "shuffle")
        model.train()
        for _ in range(config["task_opts"]["train_epochs"]):
            for batch in torch.randperm(y.shape[0], generator=shuffle).split(config["task_opts"]["batch_size"]):
                adam.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                adam.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.usefixtures("quiet_logs")
def test_without_kept_state_two_rounds_equal_a_loop_that_rebuilds_adam_each_round(fed_config: dict[str, Any]) -> None:
    config = _adam(fed_config, keep_state=False)
    fed = _federated(config)
    stored = fed.store.get("a")
    assert stored.optimizer == {}  # no moments to store
    assert _equal(stored.model, _hand_loop(Federation(config, seed=5), config))


@pytest.mark.usefixtures("quiet_logs")
def test_kept_state_carries_adams_moments_into_the_next_round(fed_config: dict[str, Any]) -> None:
    config = _adam(fed_config, keep_state=True)
    fed = _federated(config)
    stored = fed.store.get("a")
    assert len(stored.optimizer["state"]) == 6  # exp_avg and exp_avg_sq for each parameter tensor
    assert int(stored.optimizer["state"][0]["step"]) == 2 * 2 * 7  # 2 rounds x 2 epochs x 7 batches of 32
    assert not _equal(stored.model, _hand_loop(Federation(config, seed=5), config))


@pytest.mark.usefixtures("quiet_logs")
def test_without_kept_state_the_schedule_runs_on_while_each_round_starts_at_the_configured_lr(
    fed_config: dict[str, Any]
) -> None:
    config = _adam(fed_config, keep_state=False)
    config["scheduler_opts"] = {"name": "step_lr", "step_size": 3, "gamma": 0.5}
    fed = _federated(config)
    assert fed.store.get("a").scheduler["last_epoch"] == 4
    assert fed.store.get("a").scheduler["_last_lr"] == [0.01 * 0.5]  # epoch 3 decayed the lr of round 2
