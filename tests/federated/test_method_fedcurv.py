"""FedCurv: zero U, V before any aggregation; U = sum u_j, V = sum v_j; the penalty without the own terms."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fedevents.federated.fedavg import Upload
from fedevents.federated.methods import REGISTRY, LocalRound, ModelOutput, ServerState
from fedevents.federated.methods.fedcurv import FedCurv

X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [2.0, 0.0]])
Y = torch.tensor([0, 1, 0, 1])


def _state(weight: list[list[float]], bias: list[float]) -> dict[str, torch.Tensor]:
    return {"weight": torch.tensor(weight), "bias": torch.tensor(bias)}


def _round(model: nn.Module, payload: dict[str, Any], memory: dict[str, Any] | None = None) -> LocalRound:
    return LocalRound(
        client="c1", task="t0", round=4, device=torch.device("cpu"), model=model, payload=payload,
        memory={} if memory is None else memory, previous_model=None, previous_task=None,
        task_data=lambda task: (X, Y), forward=lambda x: ModelOutput(model(x), model(x)),
    )


def test_the_first_payload_has_zero_u_and_v_for_every_parameter_in_order() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    server = ServerState(model.state_dict())
    payload = FedCurv().payload(server, "c1", "integrated")
    names = [name for name, _ in model.named_parameters()]
    assert list(payload["u"]) == list(payload["v"]) == names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    for name, p in model.named_parameters():
        for key in ("u", "v"):
            assert payload[key][name].shape == p.shape and not payload[key][name].any()
    assert payload["model"] is server.model and payload["clients"] == []


def test_a_new_client_adds_nothing_to_its_loss_from_the_first_payload() -> None:
    model = nn.Linear(2, 2)
    method = FedCurv()
    rnd = _round(model, method.payload(ServerState(_state([[1.0, 2.0], [3.0, 4.0]], [5.0, 6.0])), "c1", "integrated"))
    method.start(rnd)
    loss = method.batch_loss(rnd, X, Y, rnd.forward(X), torch.tensor(0.75))
    assert loss.item() == 0.75


def test_the_server_sums_u_and_v_over_this_rounds_uploads() -> None:
    method = FedCurv()
    a = Upload(state=_state([[1.0, 1.0], [1.0, 1.0]], [0.0, 0.0]), samples=1,
               extras={"u": _state([[1.0, 2.0], [3.0, 4.0]], [0.5, 0.5]),
                       "v": _state([[1.0, 0.0], [0.0, 1.0]], [1.0, 2.0])})
    b = Upload(state=_state([[4.0, 4.0], [4.0, 4.0]], [3.0, 3.0]), samples=2,
               extras={"u": _state([[10.0, 20.0], [30.0, 40.0]], [1.5, 0.0]),
                       "v": _state([[0.0, 2.0], [2.0, 0.0]], [-1.0, 0.0])})
    old = ServerState(_state([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0]), {"u": "stale", "v": "stale", "clients": ["z"]})
    server = method.aggregate(old, {"b": b, "a": a})
    # U = u_a + u_b, V = v_a + v_b; the model is FedAvg's (1*1 + 2*4) / 3 = 3, (1*0 + 2*3) / 3 = 2.
    assert torch.equal(server.extras["u"]["weight"], torch.tensor([[11.0, 22.0], [33.0, 44.0]]))
    assert torch.equal(server.extras["u"]["bias"], torch.tensor([2.0, 0.5]))
    assert torch.equal(server.extras["v"]["weight"], torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    assert torch.equal(server.extras["v"]["bias"], torch.tensor([0.0, 2.0]))
    assert server.extras["clients"] == ["a", "b"]
    assert torch.equal(server.model["weight"], torch.full((2, 2), 3.0))
    assert torch.equal(server.model["bias"], torch.full((2,), 2.0))
    payload = method.payload(server, "a", "incremental")
    assert payload["u"] is server.extras["u"] and payload["v"] is server.extras["v"]


def test_an_upload_without_u_and_v_is_named() -> None:
    bare = Upload(state=_state([[1.0, 1.0], [1.0, 1.0]], [0.0, 0.0]), samples=1)
    with pytest.raises(ValueError, match=r"^fedcurv: upload from 'a' expected extras u and v, found none$"):
        FedCurv().aggregate(ServerState(bare.state), {"a": bare})


PAYLOAD = {
    "model": _state([[1.0, 2.0], [0.0, -1.0]], [1.0, 0.0]),
    "u": _state([[3.0, 3.0], [3.0, 3.0]], [2.0, 2.0]),
    "v": _state([[2.0, 0.0], [0.0, 2.0]], [1.0, 1.0]),
    "clients": ["c1", "c2"],
}
OWN = {"u": _state([[1.0, 1.0], [1.0, 1.0]], [1.0, 1.0]), "v": _state([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])}


def test_the_penalty_takes_out_the_clients_own_u_and_v() -> None:
    method = FedCurv({"lambda": 2.0})
    rnd = _round(nn.Linear(2, 2), PAYLOAD, memory=dict(OWN))
    method.start(rnd)
    # U - u = [[2, 2], [2, 2]], [1, 1];  V - v = [[1, 0], [0, 1]], [1, 1];  w = [[1, 2], [0, -1]], [1, 0].
    # sum w^2 (U - u) = 2*(1 + 4 + 0 + 1) + (1 + 0) = 13;  sum 2 w (V - v) = 2*(1 + 0 + 0 - 1) + 2*(1 + 0) = 2.
    # lambda * (13 - 2) = 22.
    loss = method.batch_loss(rnd, X, Y, rnd.forward(X), torch.tensor(0.0))
    assert loss.item() == pytest.approx(22.0, abs=1e-5)


def test_a_client_whose_upload_is_not_in_the_sums_takes_nothing_out() -> None:
    method = FedCurv({"lambda": 2.0})
    rnd = _round(nn.Linear(2, 2), {**PAYLOAD, "clients": ["c2"]}, memory=dict(OWN))
    method.start(rnd)
    # sum w^2 U = 3*(1 + 4 + 0 + 1) + 2*(1 + 0) = 20;  sum 2 w V = 2*(2 + 0 + 0 - 2) + 2*(1 + 0) = 2;  2 * 18 = 36.
    loss = method.batch_loss(rnd, X, Y, rnd.forward(X), torch.tensor(0.0))
    assert loss.item() == pytest.approx(36.0, abs=1e-5)


def test_finish_measures_u_at_the_trained_weights_and_uploads_u_and_v() -> None:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [1.0, 2.0]]))  # equal rows: p = (1/2, 1/2) for every x
        model.bias.copy_(torch.tensor([0.5, 0.5]))
    method = FedCurv()
    rnd = _round(model, PAYLOAD)
    method.finish(rnd)
    # As in EWC's test: u_b = 1/4, u_W[k, j] = mean(x_j^2) / 4 = (1.5 / 4, 1.25 / 4); v = u * w.
    u = _state([[0.375, 0.3125], [0.375, 0.3125]], [0.25, 0.25])
    v = _state([[0.375, 0.625], [0.375, 0.625]], [0.125, 0.125])
    for name in u:
        torch.testing.assert_close(rnd.memory["u"][name], u[name], rtol=0, atol=1e-7)
        torch.testing.assert_close(rnd.memory["v"][name], v[name], rtol=0, atol=1e-7)
    upload = method.upload(model.state_dict(), 4, rnd.memory)
    assert upload.samples == 4 and upload.extras == {"u": rnd.memory["u"], "v": rnd.memory["v"]}
    assert REGISTRY["fedcurv"] is FedCurv and method.strength == 1.0


def test_measuring_u_leaves_the_trained_state_as_it_was() -> None:
    """The Fisher pass runs in train mode; BatchNorm statistics it updates must not reach the upload."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    rnd = _round(model, PAYLOAD)
    FedCurv().finish(rnd)
    assert list(rnd.memory["u"]) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert all(torch.equal(model.state_dict()[name], before[name]) for name in before)
    assert not model.training


def test_fisher_batch_measures_u_in_fedstils_form() -> None:
    """``fisher: batch``: u is the batch's size times its squared mean gradient (one batch of four here)."""
    weight, bias = [[0.5, -1.0], [2.0, 0.25]], [0.1, -0.3]
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight))
        model.bias.copy_(torch.tensor(bias))
    rnd = _round(model, PAYLOAD)
    FedCurv({"fisher": "batch"}).finish(rnd)
    g_b = nn.functional.one_hot(Y, 2).float() - torch.softmax(X @ torch.tensor(weight).T + torch.tensor(bias), dim=1)
    g_w = g_b[:, :, None] * X[:, None, :]
    torch.testing.assert_close(rnd.memory["u"]["bias"], 4 * g_b.mean(0).pow(2))
    torch.testing.assert_close(rnd.memory["u"]["weight"], 4 * g_w.mean(0).pow(2))
    torch.testing.assert_close(rnd.memory["v"]["weight"], rnd.memory["u"]["weight"] * torch.tensor(weight))
    with pytest.raises(ValueError, match=r"^method_opts.fisher: expected one of per_sample, batch for fedcurv"):
        FedCurv({"fisher": None})
