"""FedWeIT: the composed weight and its thresholds, the seeded knowledge base, and the approximation loss
against the previous task's weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedevents.federated.fedavg import Upload
from fedevents.federated.methods import LocalRound, ModelOutput, ServerState
from fedevents.federated.methods.adaptive import WeitLayer
from fedevents.federated.methods.fedweit import FedWeIT, draw_knowledge_base
from fedevents.federated.seeds import generator


def _linear(weight: list[list[float]]) -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


def _composed() -> WeitLayer:
    layer = WeitLayer(_linear([[1.0, 2.0], [3.0, 4.0]]), kb_cnt=2, l1_threshold=0.3, mask_threshold=0.2)
    with torch.no_grad():
        layer.mask.copy_(torch.tensor([0.1, 0.6]))
        layer.aw.copy_(torch.tensor([[0.25, -0.5], [0.35, 0.0]]))
        layer.aw_kb.copy_(torch.stack([torch.ones(2, 2), torch.eye(2)], dim=-1))
        layer.atten.copy_(torch.tensor([0.5, 2.0]))
    return layer


def test_a_fresh_layer_composes_its_weight_back() -> None:
    layer = WeitLayer(_linear([[1.0, 2.0], [3.0, 4.0]]), kb_cnt=2, l1_threshold=0.3, mask_threshold=0.2)
    # mask 0.5 per output unit, aw = (1 - 0.5) * sw, atten 0: theta = 0.5 sw + 0.5 sw
    assert layer.mask.tolist() == [0.5, 0.5] and layer.theta().tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert {name for name, p in layer.named_parameters()} == {"mask", "aw", "atten"}


def test_the_composed_weight_applies_both_thresholds() -> None:
    layer = _composed()
    # mask 0.1 <= 0.2 drops row 0's shared part; aw 0.25 <= 0.3 is dropped, 0.35 and -0.5 kept; the knowledge
    # base adds 0.5 * ones + 2 * I. Row 0: [0, -0.5] + [2.5, 0.5]; row 1: 0.6 * [3, 4] + [0.35, 0] + [0.5, 2.5].
    assert torch.allclose(layer.theta(), torch.tensor([[2.5, 0.0], [2.65, 4.9]]))
    assert layer.sparsity().item() == pytest.approx(0.25 + 0.5 + 0.35 + 0.1 + 0.6)
    method = FedWeIT({"lambda_l1": 0.3, "lambda_mask": 0.2, "kb_cnt": 2})
    state = {f"0.{key}": value for key, value in layer.state_dict().items()}
    upload = method.upload(state, 5, {})
    assert torch.allclose(upload.extras["theta"]["0"], layer.theta().detach())
    assert torch.equal(upload.extras["aw"]["0"], torch.tensor([[0.0, -0.5], [0.35, 0.0]]))


def test_the_knowledge_base_is_drawn_from_the_seed_and_round_alone() -> None:
    aws = {name: {"l": torch.full((2,), float(i))} for i, name in enumerate(["a", "b", "c", "d"])}
    first = draw_knowledge_base(aws, 2, generator(3, 7, "kb"))
    reordered = draw_knowledge_base(dict(reversed(list(aws.items()))), 2, generator(3, 7, "kb"))
    assert first["l"].shape == (2, 2) and torch.equal(first["l"], reordered["l"])
    slots = first["l"][0].tolist()
    assert len(set(slots)) == 2 and set(slots) <= {0.0, 1.0, 2.0, 3.0}
    draws = {tuple(draw_knowledge_base(aws, 2, generator(3, r, "kb"))["l"][0].tolist()) for r in range(10)}
    assert len(draws) > 1  # the round changes the draw


def _server(method: FedWeIT) -> ServerState:
    model = nn.Sequential(_linear([[1.0, 0.0], [0.0, 1.0]]))
    return ServerState(method.prepare(model).state_dict(), round=4)


def test_aggregation_averages_theta_into_sw_and_waits_for_kb_cnt_clients() -> None:
    method = FedWeIT({"kb_cnt": 2})
    method.seed = 11

    def upload(value: float, samples: int) -> Upload:
        return Upload({}, samples, {"theta": {"0": torch.full((2, 2), value)}, "aw": {"0": torch.full((2, 2), -value)}})

    one = method.aggregate(_server(method), {"a": upload(1.0, 1)})
    assert torch.equal(one.model["0.sw"], torch.ones(2, 2)) and "kb" not in one.extras
    two = method.aggregate(ServerState(one.model, one.extras, round=5), {"b": upload(4.0, 3)})
    assert torch.equal(two.model["0.sw"], torch.full((2, 2), 4.0))  # this round's uploads only
    expected = draw_knowledge_base(two.extras["aw"], 2, generator(11, 5, "kb"))
    assert torch.equal(two.extras["kb"]["0"], expected["0"])
    payload = method.payload(two, "a", "incremental")
    assert set(payload) == {"sw", "kb"} and torch.equal(payload["sw"]["0"], two.model["0.sw"])


def test_a_task_switch_keeps_the_previous_weights_for_the_approximation_loss() -> None:
    """Regression (B14): the original compared the model with itself, so the term was always 0."""
    method = FedWeIT({"kb_cnt": 1, "lambda_l1": 0.0, "lambda_l2": 0.5})
    model = method.prepare(nn.Sequential(_linear([[1.0, 0.0], [0.0, 1.0]])))
    previous = {k: v.clone() for k, v in model.state_dict().items()}
    rnd = LocalRound(client="c", task="t1", round=3, device=torch.device("cpu"), model=model,
                     payload={"sw": {"0": torch.tensor([[2.0, 0.0], [0.0, 4.0]])}, "kb": {}}, memory={},
                     previous_model=previous, previous_task="t0", task_data=lambda name: (None, None),
                     forward=lambda x: ModelOutput(model(x), model(x)))
    method.start(rnd)
    assert rnd.memory["previous_theta"]["0"].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    # New sw, mask 0.5 kept, aw = 0.5 * sw, atten 0: theta = sw = diag(2, 4), previous diag(1, 1).
    assert model[0].aw.tolist() == [[1.0, 0.0], [0.0, 2.0]] and model[0].atten.tolist() == [0.0]
    loss = method.batch_loss(rnd, torch.ones(1, 2), torch.zeros(1), ModelOutput(torch.ones(1), torch.ones(1)),
                             torch.tensor(1.0))
    assert loss.item() == pytest.approx(1.0 + 0.5 * (1.0 + 9.0))
