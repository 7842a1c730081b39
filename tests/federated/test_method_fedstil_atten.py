"""FedSTIL-atten: the bank layer's weight and drift, and a bank of fixed size filled by the latest uploaders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedevents.federated.fedavg import Upload
from fedevents.federated.methods import ServerState
from fedevents.federated.methods.adaptive import BankLayer
from fedevents.federated.methods.fedstil_atten import FedSTILAtten


def _linear() -> nn.Linear:
    layer = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -4.0]]))
    return layer


def test_a_bank_layer_mixes_its_slots_by_a_trainable_attention() -> None:
    layer = BankLayer(_linear(), atten_default=0.25, slots=3)
    # slot 0 holds the weight, the others zeros; A = (1 - 0.25) * weight, so theta starts at the weight
    assert layer.G[..., 0].tolist() == [[2.0, -4.0]] and not layer.G[..., 1:].any()
    assert layer.theta().tolist() == [[2.0, -4.0]]
    assert {name for name, p in layer.named_parameters() if p.requires_grad} == {"alpha", "A"}
    with torch.no_grad():
        layer.G[..., 1] = torch.tensor([[1.0, 1.0]])
        layer.alpha.copy_(torch.tensor([0.5, 2.0, 7.0]))
        layer.A.zero_()
    # 0.5 * [2, -4] + 2 * [1, 1] + 7 * 0
    assert layer.theta().tolist() == [[3.0, 0.0]]
    # |0.25 - 0.5| + |0.25 - 2| + |0.25 - 7| = 8.75, plus ||A0||_1 = 0.75 * 6
    assert layer.drift().item() == pytest.approx(8.75 + 4.5)
    layer.reset(torch.ones(1, 2, 3))
    # a new round: the bank and alpha restart, A (zero now) stays and becomes the anchor
    assert layer.alpha.tolist() == [0.25] * 3 and layer.theta().tolist() == [[0.75, 0.75]]
    assert layer.drift().item() == 0.0


def test_the_bank_holds_the_latest_uploaders_weights_in_fixed_size() -> None:
    method = FedSTILAtten({"bank_size": 2, "atten_default": 0.0})
    model = method.prepare(nn.Sequential(_linear()))
    server = ServerState(model.state_dict(), round=1)

    def upload(value: float) -> Upload:
        return Upload({}, 1, {"theta": {"0": torch.full((1, 2), value)}, "token": torch.zeros(2)})

    server = method.aggregate(server, {"c": upload(3.0)})
    assert server.model["0.G"].tolist() == [[[3.0, 0.0], [3.0, 0.0]]]  # one uploader, one slot used
    server = method.aggregate(ServerState(server.model, server.extras, round=2), {"a": upload(1.0), "b": upload(2.0)})
    # round 2's uploaders by name fill the two slots; c (round 1) drops out; the shape never changes
    assert server.model["0.G"].tolist() == [[[1.0, 2.0], [1.0, 2.0]]]
    assert torch.equal(method.payload(server, "c", "incremental")["global"]["0"], server.model["0.G"])
    assert method.thetas(model.state_dict())["0"].tolist() == [[2.0, -4.0]]
