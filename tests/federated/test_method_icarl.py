"""iCaRL: herding order, the exemplar budget over task switches, and distillation paired sample by sample."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fedevents.federated.methods import REGISTRY, LocalRound, ModelOutput
from fedevents.federated.methods.icarl import ICaRL, distillation, herding

# Three tasks of two classes each, three samples per class; the samples differ so exemplars can be told apart.
DATA = {
    "t0": (torch.tensor([[1.0, 0.0], [2.0, 0.5], [3.0, -1.0], [0.0, 1.0], [0.5, 2.0], [-1.0, 3.0]]),
           torch.tensor([0, 0, 0, 1, 1, 1])),
    "t1": (torch.tensor([[-1.0, 0.0], [-2.0, 0.5], [-3.0, -1.0], [0.0, -1.0], [0.5, -2.0], [-1.0, -3.0]]),
           torch.tensor([2, 2, 2, 3, 3, 3])),
    "t2": (torch.tensor([[4.0, 4.0], [5.0, 5.0]]), torch.tensor([0, 1])),
}


def _linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    model = nn.Linear(2, len(bias))
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight))
        model.bias.copy_(torch.tensor(bias))
    return model


PREVIOUS = _linear([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], [0.0, 0.0, 0.0, 0.0])
PAYLOAD = _linear([[0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [1.0, 1.0]], [0.1, 0.2, 0.3, 0.4])


def _round(task: str, previous_task: str | None, memory: dict[str, Any] | None = None) -> LocalRound:
    model = nn.Linear(2, 4)
    return LocalRound(
        client="c1", task=task, round=5, device=torch.device("cpu"), model=model,
        payload={"model": PAYLOAD.state_dict()}, memory={} if memory is None else memory,
        previous_model=None if previous_task is None else PREVIOUS.state_dict(), previous_task=previous_task,
        task_data=lambda name: DATA[name], forward=lambda x: ModelOutput(model(x), model(x)),
    )


def test_herding_keeps_the_running_mean_nearest_the_class_mean() -> None:
    features = torch.tensor([[0.0], [1.0], [2.0], [6.0]])  # mean 2.25
    # k=1: |f - 2.25| is least for 2 (index 2).  k=2: (2 + f) / 2 nearest 2.25 wants f = 2.5: 1 -> 1.5
    # (0.75 off), 0 -> 1 (1.25), 6 -> 4 (1.75): index 1.  k=3: (3 + f) / 3 wants f = 3.75: 0 -> 1 (1.25 off),
    # 6 -> 3 (0.75 off): index 3, where the nearest-to-the-mean order would take 0 (index 0) next.
    assert herding(features, 3).tolist() == [2, 1, 3]
    assert herding(features, 9).tolist() == [2, 1, 3, 0]  # never more than there are


def test_the_exemplar_budget_holds_over_two_task_switches() -> None:
    method = ICaRL({"memory_size": 5})
    first = _round("t1", "t0")
    method.start(first)
    # 2 classes seen: 5 // 2 = 2 exemplars each, 4 in all; all from t0 and herded with the previous model.
    ex_x, ex_y = first.memory["exemplar_x"], first.memory["exemplar_y"]
    assert ex_y.tolist() == [0, 0, 1, 1] and first.memory["old_classes"] == [0, 1]
    for c in (0, 1):
        x_c = DATA["t0"][0][DATA["t0"][1] == c]
        chosen = herding(nn.functional.normalize(PREVIOUS(x_c).detach(), dim=1), 2)
        assert torch.equal(ex_x[ex_y == c], x_c[chosen])
    x, y = method.training_data(first, *DATA["t1"])
    assert torch.equal(x, torch.cat([DATA["t1"][0], ex_x])) and torch.equal(y, torch.cat([DATA["t1"][1], ex_y]))

    second = _round("t2", "t1", memory=dict(first.memory))
    method.start(second)
    # 4 classes seen: 5 // 4 = 1 each, 4 in all; classes 0 and 1 keep the first exemplar herding chose.
    ex_x2, ex_y2 = second.memory["exemplar_x"], second.memory["exemplar_y"]
    assert ex_y2.tolist() == [0, 1, 2, 3] and second.memory["old_classes"] == [0, 1, 2, 3]
    assert torch.equal(ex_x2[:2], torch.stack([ex_x[ex_y == 0][0], ex_x[ex_y == 1][0]]))
    assert torch.equal(first.memory["exemplar_y"], ex_y)  # the earlier memory is not edited in place


def test_the_old_model_is_the_previous_one_and_the_payload_is_loaded() -> None:
    rnd = _round("t1", "t0")
    ICaRL().start(rnd)
    old = rnd.scratch["old_model"]
    assert torch.equal(old.weight, PREVIOUS.weight) and not old.weight.requires_grad
    assert torch.equal(rnd.model.weight, PAYLOAD.weight)


def test_distillation_pairs_each_sample_with_its_own_old_logits() -> None:
    method = ICaRL({"distill_weight": 0.5, "temperature": 2.0})
    rnd = _round("t1", "t0")
    method.start(rnd)
    xb = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    yb = torch.tensor([2, 3])
    out = rnd.forward(xb)
    loss = method.batch_loss(rnd, xb, yb, out, torch.tensor(1.0))

    def kd(z: torch.Tensor, z_old: torch.Tensor) -> torch.Tensor:
        # T^2 * mean_n sum_c p_old[n, c] * (log p_old[n, c] - log p[n, c]), p = softmax(z[:, old classes] / T)
        log_p_old = torch.log_softmax(z_old[:, :2] / 2.0, dim=1)
        log_p = torch.log_softmax(z[:, :2] / 2.0, dim=1)
        return 4.0 * (log_p_old.exp() * (log_p_old - log_p)).sum(1).mean()

    z = PAYLOAD(xb).detach()
    right = 1.0 + 0.5 * kd(z, PREVIOUS(xb).detach())
    wrong = 1.0 + 0.5 * kd(z, PREVIOUS(xb.flip(0)).detach())  # old logits of the other sample
    assert loss.item() == pytest.approx(right.item(), abs=1e-6)
    assert abs(right.item() - wrong.item()) > 0.1
    # Old logits (1, 0) and (0, 3) on classes 0, 1; new (0.6, 0.7) and (1.6, -1.3). At T = 2 the rows' KLs
    # are about 0.0367 and 0.9212, so right = 1 + 0.5 * 4 * (0.0367 + 0.9212) / 2, about 1.9579; swapping
    # the old rows gives KLs 0.2025 and 0.0953, so wrong is about 1.2978.
    assert right.item() == pytest.approx(1.9579, abs=1e-3) and wrong.item() == pytest.approx(1.2978, abs=1e-3)


def test_distillation_is_zero_for_equal_logits_and_absent_before_a_switch() -> None:
    z = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    assert distillation(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    method = ICaRL()
    rnd = _round("t0", None)
    method.start(rnd)
    x, y = method.training_data(rnd, *DATA["t0"])
    assert x is DATA["t0"][0] and y is DATA["t0"][1]
    loss = torch.tensor(1.0)
    assert method.batch_loss(rnd, x, y, rnd.forward(x), loss) is loss


def test_options_and_registry() -> None:
    method = ICaRL()
    assert REGISTRY["icarl"] is ICaRL
    assert (method.memory_size, method.distill_weight, method.temperature) == (200, 1.0, 2.0)
    with pytest.raises(ValueError, match=r"^method_opts.memory_size: expected a whole number >= 0 for icarl, "
                                         r"found 2.5$"):
        ICaRL({"memory_size": 2.5})
