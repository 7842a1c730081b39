"""MAS: Omega = mean |d ||f(x)||^2 / dw| over the finished task's training samples; lambda * Omega * offset^2."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedevents.federated.methods import REGISTRY, LocalRound, ModelOutput
from fedevents.federated.methods.mas import MAS

# The finished task's training samples, and a held-out (query) set of the same task that must not be used.
X_TRAIN = torch.tensor([[1.0, 0.0], [0.0, -2.0], [-1.0, 1.0], [2.0, 0.0]])
X_QUERY = torch.tensor([[3.0, 1.0], [1.0, 1.0]])
Y = torch.tensor([0, 1, 0, 1])


def _expected(x: torch.Tensor) -> dict[str, torch.Tensor]:
    # With W = I and b = 0, f(x) = x and ||f||^2 = sum_k f_k^2, so per sample
    # d/dW_kj = 2 f_k x_j = 2 x_k x_j and d/db_k = 2 x_k; Omega = mean of their absolute values.
    return {"weight": 2 * (x[:, :, None] * x[:, None, :]).abs().mean(0), "bias": 2 * x.abs().mean(0)}


def _identity() -> nn.Linear:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    return model


def _round(model: nn.Module, payload: dict[str, torch.Tensor], previous: nn.Module | None) -> LocalRound:
    data = {"t0": (X_TRAIN, Y), "t1": (torch.ones(2, 2), torch.zeros(2, dtype=torch.long))}
    return LocalRound(
        client="c1", task="t1", round=3, device=torch.device("cpu"), model=model, payload={"model": payload},
        memory={}, previous_model=None if previous is None else previous.state_dict(),
        previous_task=None if previous is None else "t0",
        task_data=lambda task: data[task], forward=lambda x: ModelOutput(model(x), model(x)),
    )


def test_importances_come_from_the_training_samples_not_the_query_set() -> None:
    model = nn.Linear(2, 2)
    rnd = _round(model, _identity().state_dict(), previous=_identity())
    MAS().start(rnd)
    # Training set: |x0 x0| = (1, 0, 1, 4) -> mean 1.5 -> 3;  |x0 x1| = (0, 0, 1, 0) -> 0.25 -> 0.5;
    # |x1 x1| = (0, 4, 1, 0) -> 1.25 -> 2.5;  |x0| -> mean 1 -> 2;  |x1| -> mean 0.75 -> 1.5.
    train = {"weight": torch.tensor([[3.0, 0.5], [0.5, 2.5]]), "bias": torch.tensor([2.0, 1.5])}
    torch.testing.assert_close(_expected(X_TRAIN), train)
    query = _expected(X_QUERY)  # weight [[10, 4], [4, 2]], bias [4, 2]
    for name in train:
        torch.testing.assert_close(rnd.memory["importance"][name], train[name], rtol=0, atol=1e-6)
        assert not torch.allclose(rnd.memory["importance"][name], query[name])


def test_the_absolute_value_is_taken_per_sample() -> None:
    rnd = _round(nn.Linear(2, 2), _identity().state_dict(), previous=_identity())
    MAS().start(rnd)
    # Without |.| per sample the bias would get 2 * |mean x| = 2 * (0.5, 0.25) = (1, 0.5), not (2, 1.5).
    torch.testing.assert_close(rnd.memory["importance"]["bias"], torch.tensor([2.0, 1.5]), rtol=0, atol=1e-6)


def test_the_penalty_is_lambda_times_omega_times_the_squared_offset() -> None:
    model = nn.Linear(2, 2)
    payload = {"weight": torch.tensor([[2.0, 0.0], [0.0, 1.0]]), "bias": torch.tensor([0.0, 1.0])}
    rnd = _round(model, payload, previous=_identity())
    method = MAS({"lambda": 2.0})
    method.start(rnd)
    assert torch.equal(model.weight, payload["weight"])  # the payload is loaded after consolidation
    # Offsets from the anchor (I, 0): W_00 by 1 and b_1 by 1, so 2 * (3 * 1 + 1.5 * 1) = 9.
    loss = method.batch_loss(rnd, torch.ones(1, 2), torch.zeros(1, dtype=torch.long),
                             rnd.forward(torch.ones(1, 2)), torch.tensor(0.0))
    assert loss.item() == pytest.approx(9.0, abs=1e-5)


def test_no_penalty_for_a_client_that_has_not_switched_task() -> None:
    rnd = _round(nn.Linear(2, 2), _identity().state_dict(), previous=None)
    method = MAS()
    method.start(rnd)
    loss = torch.tensor(1.0)
    assert method.batch_loss(rnd, torch.ones(1, 2), torch.zeros(1, dtype=torch.long),
                             rnd.forward(torch.ones(1, 2)), loss) is loss
    assert REGISTRY["mas"] is MAS and method.strength == 1.0
