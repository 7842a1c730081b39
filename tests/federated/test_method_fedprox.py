"""FedProx: the proximal term pulls toward the global model the client received, with gradient mu*(w - w_global)."""

from __future__ import annotations

import torch
from torch import nn

from fedevents.federated.methods import LocalRound, ModelOutput, build_method


def local_round(model: nn.Module, payload: dict) -> LocalRound:
    return LocalRound(client="c", task="t", round=1, device=torch.device("cpu"), model=model, payload=payload,
                      memory={}, previous_model={"weight": torch.tensor([[9.0]])}, previous_task="t",
                      task_data=lambda task: (torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)),
                      forward=lambda x: ModelOutput(model(x), model(x)))


def test_proximal_term_value_and_gradient_are_anchored_to_the_received_global_model() -> None:
    method = build_method("fedprox", {"mu": 0.5})
    model = nn.Linear(1, 1, bias=False)
    rnd = local_round(model, {"model": {"weight": torch.tensor([[1.0]])}})
    method.start(rnd)  # loads w = 1 (the global model), never the client's old w = 9
    with torch.no_grad():
        model.weight.fill_(3.0)  # local training moved w to 3
    base = torch.tensor(0.0, requires_grad=True)
    loss = method.batch_loss(rnd, torch.zeros(1, 1), torch.zeros(1), ModelOutput(base, base), base)
    # mu/2 * (3 - 1)^2 = 0.25 * 4 = 1.0
    assert loss.item() == 1.0
    loss.backward()
    # d/dw mu/2 (w - 1)^2 = mu (w - 1) = 0.5 * 2 = 1.0
    assert model.weight.grad.item() == 1.0


def test_mu_zero_is_fedavg_and_a_bad_mu_is_refused() -> None:
    import pytest

    method = build_method("fedprox", {"mu": 0.0})
    model = nn.Linear(1, 1, bias=False)
    rnd = local_round(model, {"model": {"weight": torch.tensor([[1.0]])}})
    method.start(rnd)
    base = torch.tensor(2.5)
    assert method.batch_loss(rnd, torch.zeros(1, 1), torch.zeros(1), ModelOutput(base, base), base).item() == 2.5
    with pytest.raises(ValueError, match=r"method_opts.mu: expected a number >= 0 for fedprox, found -1"):
        build_method("fedprox", {"mu": -1})


def test_baseline_keeps_each_client_on_its_own_model_and_sends_nothing() -> None:
    from fedevents.federated.methods import ServerState

    method = build_method("baseline")
    server = ServerState({"weight": torch.tensor([[1.0]])})
    assert method.payload(server, "c", "integrated") == {"model": server.model}
    assert method.payload(server, "c", "incremental") == {}
    model = nn.Linear(1, 1, bias=False)
    method.start(local_round(model, {}))  # a known client resumes its own weights (9), not the server's
    assert model.weight.item() == 9.0
    upload = method.upload({"weight": torch.tensor([[9.0]])}, 10, {})
    assert upload.state == {} and upload.samples == 10
    assert method.aggregate(server, {"c": upload}) is server
