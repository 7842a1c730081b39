from __future__ import annotations

import pytest
import torch
from structlog.testing import capture_logs

from fedevents.federated import AggregateResult, FedAvgClient, FedAvgServer, Upload, weighted_mean


def _upload(value: float, samples: int, count: int = 0) -> Upload:
    return Upload(state={"w": torch.tensor([value, -value]), "n": torch.tensor(count)}, samples=samples)


def test_the_mean_is_weighted_by_samples() -> None:
    mean = weighted_mean({"a": _upload(1.0, 1), "b": _upload(4.0, 2)})
    assert torch.equal(mean["w"], torch.tensor([3.0, -3.0]))
    assert mean["w"].dtype == torch.float32


def test_integer_buffers_come_from_the_upload_with_most_samples() -> None:
    mean = weighted_mean({"a": _upload(1.0, 1, count=5), "b": _upload(4.0, 2, count=7), "c": _upload(0.0, 2, count=9)})
    assert mean["n"].item() == 7 and mean["n"].dtype == torch.int64  # b and c tie at 2; b comes first by name


def test_no_uploads_or_no_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected at least one upload"):
        weighted_mean({})
    with pytest.raises(ValueError, match="expected uploads with samples > 0, found 0"):
        weighted_mean({"a": _upload(1.0, 0)})


def test_the_server_averages_this_rounds_uploads_into_the_global_state() -> None:
    server = FedAvgServer({"w": torch.zeros(2), "n": torch.tensor(0)})
    server.receive("a", 1, _upload(1.0, 1))
    server.receive("b", 1, _upload(4.0, 2))
    result = server.aggregate(1, ["a", "b"])
    assert result == AggregateResult(clients=("a", "b"), samples=3)
    assert torch.equal(server.state["w"], torch.tensor([3.0, -3.0]))


def test_an_upload_from_an_earlier_round_is_not_in_this_rounds_mean() -> None:
    server = FedAvgServer({"w": torch.zeros(2), "n": torch.tensor(0)})
    server.receive("stale", 1, _upload(100.0, 50))
    server.receive("a", 2, _upload(1.0, 1))
    server.receive("b", 2, _upload(4.0, 2))
    with capture_logs() as logs:
        result = server.aggregate(2, ["a", "b", "stale"])
    assert result == AggregateResult(clients=("a", "b"), samples=3)
    assert torch.equal(server.state["w"], torch.tensor([3.0, -3.0]))
    assert logs == [{"event": "clients without an upload skipped", "round": 2, "clients": ["stale"],
                     "log_level": "warning"}]


def test_uploads_of_unlisted_clients_are_left_out() -> None:
    server = FedAvgServer({"w": torch.zeros(2), "n": torch.tensor(0)})
    server.receive("a", 1, _upload(1.0, 1))
    server.receive("late", 1, _upload(100.0, 1))
    assert server.aggregate(1, ["a"]) == AggregateResult(clients=("a",), samples=1)
    assert torch.equal(server.state["w"], torch.tensor([1.0, -1.0]))


def test_aggregation_clears_the_inbox_up_to_its_round() -> None:
    server = FedAvgServer({"w": torch.zeros(2), "n": torch.tensor(0)})
    server.receive("a", 1, _upload(9.0, 1))
    server.receive("a", 2, _upload(1.0, 1))
    server.receive("a", 3, _upload(5.0, 1))
    server.aggregate(2, ["a"])
    assert server.pending(1) == () and server.pending(2) == ()
    assert server.pending(3) == ("a",)
    assert server.aggregate(2, ["a"]) == AggregateResult(clients=(), samples=0)
    assert torch.equal(server.state["w"], torch.tensor([1.0, -1.0]))  # nothing to average: unchanged


def test_the_mean_does_not_depend_on_upload_order() -> None:
    g = torch.Generator().manual_seed(0)
    uploads = {f"c{i}": Upload({"w": torch.randn(1000, generator=g)}, samples=i + 1) for i in range(7)}
    forward, backward = FedAvgServer({"w": torch.zeros(1000)}), FedAvgServer({"w": torch.zeros(1000)})
    for name in uploads:
        forward.receive(name, 1, uploads[name])
    for name in reversed(list(uploads)):
        backward.receive(name, 1, uploads[name])
    forward.aggregate(1, list(uploads))
    backward.aggregate(1, list(reversed(list(uploads))))
    assert torch.equal(forward.state["w"], backward.state["w"])


def test_an_upload_missing_a_key_of_the_global_model_is_refused() -> None:
    server = FedAvgServer({"w": torch.zeros(2), "n": torch.tensor(0)})
    message = r"round 1: upload from 'a' expected the global model's keys, found \['n'\] missing"
    with pytest.raises(ValueError, match=message):
        server.receive("a", 1, Upload({"w": torch.zeros(2)}, samples=1))


def test_dispatch_hands_out_the_global_state_for_either_join_state() -> None:
    server = FedAvgServer({"w": torch.ones(2)})
    for state in ("integrated", "incremental"):
        assert torch.equal(server.dispatch("a", state)["model"]["w"], torch.ones(2))
    with pytest.raises(ValueError, match="expected state in"):
        server.dispatch("a", "joined")


def test_the_client_half_loads_the_payload_and_packs_its_state() -> None:
    model = torch.nn.Linear(2, 1)
    payload = {"weight": torch.full((1, 2), 0.5), "bias": torch.zeros(1)}
    client = FedAvgClient()
    client.receive(model, payload)
    assert torch.equal(model.weight.detach(), payload["weight"])
    upload = client.upload(model.state_dict(), samples=12)
    assert upload.samples == 12 and set(upload.state) == {"weight", "bias"}
