"""EWC: the empirical Fisher of the finished task at the previous weights, accumulated, and lambda/2 * F * offset^2."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fedevents.federated.methods import REGISTRY, LocalRound, ModelOutput, build_method
from fedevents.federated.methods.ewc import EWC
from fedevents.federated.methods.importance import fisher_diagonal

# Finished task t0: four samples; with equal logits for both classes p = (1/2, 1/2) for every sample.
X0 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, 0.0]])
Y0 = torch.tensor([0, 1, 0, 1])
# The new task t1, which must not be what the Fisher is measured on.
X1 = torch.tensor([[5.0, 5.0], [-3.0, 1.0]])
Y1 = torch.tensor([1, 1])

# At W = 0, b = 0: d log p_y / d b_k = [k == y] - 1/2 = +-1/2, so F_b = mean of 1/4 = 1/4;
# d log p_y / d W_kj = ([k == y] - 1/2) x_j, so F_W[k, j] = mean(x_j^2) / 4:
# mean x_0^2 = (1 + 0 + 1 + 4) / 4 = 1.5 -> 0.375;  mean x_1^2 = (0 + 4 + 1 + 0) / 4 = 1.25 -> 0.3125.
FISHER = {"weight": torch.tensor([[0.375, 0.3125], [0.375, 0.3125]]), "bias": torch.tensor([0.25, 0.25])}


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight))
        model.bias.copy_(torch.tensor(bias))
    return model


def _round(model: nn.Module, payload_model: nn.Module, *, memory: dict[str, Any] | None = None,
           previous: nn.Module | None = None, previous_task: str | None = None) -> LocalRound:
    data = {"t0": (X0, Y0), "t1": (X1, Y1)}
    return LocalRound(
        client="c1", task="t1", round=2, device=torch.device("cpu"), model=model,
        payload={"model": payload_model.state_dict()}, memory={} if memory is None else memory,
        previous_model=None if previous is None else previous.state_dict(), previous_task=previous_task,
        task_data=lambda task: data[task], forward=lambda x: ModelOutput(model(x), model(x)),
    )


def test_the_fisher_is_the_mean_of_per_sample_squared_gradients() -> None:
    model = _linear([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    fisher = fisher_diagonal(model, lambda x: ModelOutput(model(x), model(x)), X0, Y0)
    assert list(fisher) == ["weight", "bias"]
    for name in FISHER:
        torch.testing.assert_close(fisher[name], FISHER[name], rtol=0, atol=1e-7)
    # The squared mean gradient would give 0 for the bias (the +-1/2 cancel over balanced labels).


def test_the_fisher_at_non_zero_weights_matches_the_softmax_formula() -> None:
    weight, bias = [[0.5, -1.0], [2.0, 0.25]], [0.1, -0.3]
    model = _linear(weight, bias)
    fisher = fisher_diagonal(model, lambda x: ModelOutput(model(x), model(x)), X0, Y0)
    # Per sample n: g_b = onehot(y_n) - softmax(W x_n + b), g_W = g_b x_n^T; F = mean of the squares.
    p = torch.softmax(X0 @ torch.tensor(weight).T + torch.tensor(bias), dim=1)
    g_b = nn.functional.one_hot(Y0, 2).float() - p
    g_w = g_b[:, :, None] * X0[:, None, :]
    torch.testing.assert_close(fisher["bias"], g_b.pow(2).mean(0))
    torch.testing.assert_close(fisher["weight"], g_w.pow(2).mean(0))


def test_the_batch_form_is_the_mean_over_batches_of_size_times_squared_mean_gradient() -> None:
    weight, bias = [[0.5, -1.0], [2.0, 0.25]], [0.1, -0.3]
    model = _linear(weight, bias)
    # 150 samples: batches of 64, 64 and 22 (importance.BATCH), so the sizes differ.
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(150, 2, generator=gen), torch.randint(0, 2, (150,), generator=gen)
    fisher = fisher_diagonal(model, lambda v: ModelOutput(model(v), model(v)), x, y, form="batch")
    p = torch.softmax(x @ torch.tensor(weight).T + torch.tensor(bias), dim=1)
    g_b = nn.functional.one_hot(y, 2).float() - p
    g_w = g_b[:, :, None] * x[:, None, :]
    want_b, want_w = torch.zeros(2), torch.zeros(2, 2)
    for start, stop in ((0, 64), (64, 128), (128, 150)):
        want_b += (stop - start) * g_b[start:stop].mean(0).pow(2)
        want_w += (stop - start) * g_w[start:stop].mean(0).pow(2)
    torch.testing.assert_close(fisher["bias"], want_b / 3)
    torch.testing.assert_close(fisher["weight"], want_w / 3)
    # At W = 0 over balanced labels the batch form of the bias is 0 where the per-sample one is 1/4.
    zero = _linear([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    batch = fisher_diagonal(zero, lambda v: ModelOutput(zero(v), zero(v)), X0, Y0, form="batch")
    torch.testing.assert_close(batch["bias"], torch.zeros(2), rtol=0, atol=1e-7)


def test_the_batch_form_leaves_the_model_and_its_batchnorm_statistics_as_they_were() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fisher = fisher_diagonal(model, lambda v: ModelOutput(model(v), model(v)), X0, Y0, form="batch")
    assert not model.training and set(fisher) == {name for name, _ in model.named_parameters()}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(bool(f.abs().sum() > 0) for f in fisher.values())


def test_a_task_switch_consolidates_the_finished_task_before_loading_the_payload() -> None:
    method = EWC({"lambda": 100.0})
    previous = _linear([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    payload = _linear([[1.0, 2.0], [3.0, 4.0]], [1.0, -1.0])
    model = _linear([[9.0, 9.0], [9.0, 9.0]], [9.0, 9.0])
    rnd = _round(model, payload, previous=previous, previous_task="t0")
    method.start(rnd)
    for name in FISHER:
        torch.testing.assert_close(rnd.memory["importance"][name], FISHER[name], rtol=0, atol=1e-7)
        assert torch.equal(rnd.memory["anchor"][name], previous.state_dict()[name])
    assert torch.equal(model.weight, payload.weight) and torch.equal(model.bias, payload.bias)
    # lambda/2 * sum F (w - w*)^2 with w* = 0 and lambda = 100:
    # 50 * (0.375*1 + 0.3125*4 + 0.375*9 + 0.3125*16 + 0.25*1 + 0.25*1) = 50 * 10.5 = 525.
    penalised = method.batch_loss(rnd, X1, Y1, rnd.forward(X1), torch.tensor(2.0))
    assert penalised.item() == pytest.approx(2.0 + 525.0, abs=1e-4)


def test_importances_add_up_over_task_switches_and_the_anchor_moves() -> None:
    method = EWC({"lambda": 1.0})
    previous = _linear([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    first = _round(nn.Linear(2, 2), previous, previous=previous, previous_task="t0")
    method.start(first)
    # The second finished task has the same data and weights (up to equal rows), so it adds the same F.
    moved = _linear([[1.0, 2.0], [1.0, 2.0]], [3.0, 3.0])
    second = _round(nn.Linear(2, 2), moved, memory=dict(first.memory), previous=moved, previous_task="t0")
    method.start(second)
    for name in FISHER:
        torch.testing.assert_close(second.memory["importance"][name], 2 * FISHER[name], rtol=0, atol=1e-7)
        assert torch.equal(second.memory["anchor"][name], moved.state_dict()[name])
    # The first round's memory is untouched (a round that is never committed must leave it as it was).
    torch.testing.assert_close(first.memory["importance"]["bias"], FISHER["bias"], rtol=0, atol=1e-7)


def test_no_penalty_before_a_first_consolidation() -> None:
    method = EWC()
    payload = _linear([[1.0, 2.0], [3.0, 4.0]], [1.0, -1.0])
    for rnd in (_round(nn.Linear(2, 2), payload),  # a new client
                _round(nn.Linear(2, 2), payload, previous=payload, previous_task="t1")):  # same task again
        method.start(rnd)
        loss = torch.tensor(0.5)
        assert method.batch_loss(rnd, X1, Y1, rnd.forward(X1), loss) is loss
        assert rnd.memory == {}


def test_options_and_registry() -> None:
    assert REGISTRY["ewc"] is EWC and build_method("ewc").strength == 10.0
    assert EWC({"fisher_batches": 3}).fisher_batches == 3 and EWC().fisher_batches is None
    with pytest.raises(ValueError, match=r"^method_opts.fisher_batches: expected null or a whole number >= 1 "
                                         r"for ewc, found 0$"):
        EWC({"fisher_batches": 0})
    with pytest.raises(ValueError, match=r"^method_opts.lambda: expected a number >= 0 for ewc, found -1$"):
        EWC({"lambda": -1})
    assert EWC().fisher == "per_sample" and EWC({"fisher": "batch"}).fisher == "batch"
    with pytest.raises(ValueError, match=r"^method_opts.fisher: expected one of per_sample, batch for ewc, "
                                         r"found 'mean'$"):
        EWC({"fisher": "mean"})
