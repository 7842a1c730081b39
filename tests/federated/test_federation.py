from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from fedevents.federated import METHODS, AggregateResult, Federation, TrainResult, UploadResult

MLP_PARAMS = (32 * 64 + 64) + (64 * 64 + 64) + (64 * 10 + 10)


def _train(fed: Federation, client: str, round: int = 1, task: str = "t0") -> TrainResult:
    return fed.train(client=client, task=task, round=round, device="cpu", state="incremental")


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _round(fed: Federation, clients: list[str], round: int) -> None:
    for client in clients:
        _train(fed, client, round)
        fed.upload(client=client, round=round)
    fed.aggregate(round=round, clients=clients)


def _mean_val_acc(fed: Federation, clients: list[str], round: int) -> float:
    scores = [fed.validate(client=c, tasks=["t0"], round=round, device="cpu")["t0"] for c in clients]
    return sum(s.metrics["val_acc"] for s in scores) / len(scores)


def test_a_round_reports_samples_metrics_and_bytes(fed_config: dict[str, Any]) -> None:
    fed = Federation(fed_config, seed=0)
    result = _train(fed, "a")
    assert result.samples == 200 and set(result.metrics) == {"tr_acc", "tr_loss"}
    assert fed.upload(client="a", round=1) == UploadResult(samples=200, nbytes=MLP_PARAMS * 4)
    assert fed.aggregate(round=1, clients=["a"]) == AggregateResult(clients=("a",), samples=200)
    (val,) = fed.validate(client="a", tasks=["t0"], round=1, device="cpu").values()
    assert val.samples == 100 and set(val.metrics) == {"val_acc", "val_loss"}


def test_training_logs_one_line_per_epoch(fed_config: dict[str, Any]) -> None:
    fed_config["task_opts"]["train_epochs"] = 3
    fed = Federation(fed_config, seed=0)
    with capture_logs() as logs:
        _train(fed, "a")
    assert [e["epoch"] for e in logs if e["event"] == "epoch finished"] == [0, 1, 2]


def test_the_same_seed_trains_a_client_to_bit_identical_weights(fed_config: dict[str, Any], quiet_logs: None) -> None:
    first, second = Federation(fed_config, seed=3), Federation(fed_config, seed=3)
    assert _same_state(first.server_state(), second.server_state())
    assert _train(first, "a") == _train(second, "a")
    assert _same_state(first.store.get("a").model, second.store.get("a").model)
    assert not _same_state(Federation(fed_config, seed=4).server_state(), first.server_state())


def test_the_order_in_which_clients_train_does_not_matter(fed_config: dict[str, Any], quiet_logs: None) -> None:
    ab, ba = Federation(fed_config, seed=0), Federation(fed_config, seed=0)
    _train(ab, "a"), _train(ab, "b")
    _train(ba, "b"), _train(ba, "a")
    for client in ("a", "b"):
        assert _same_state(ab.store.get(client).model, ba.store.get(client).model)
    for fed, order in ((ab, ["a", "b"]), (ba, ["b", "a"])):
        for client in order:
            fed.upload(client=client, round=1)
        fed.aggregate(round=1, clients=order)
    assert _same_state(ab.server_state(), ba.server_state())


def test_clients_trained_in_threads_match_clients_trained_one_by_one(
    fed_config: dict[str, Any], quiet_logs: None
) -> None:
    clients = [f"c{i}" for i in range(6)]
    serial, threaded = Federation(fed_config, seed=0), Federation(fed_config, seed=0)
    for round in (1, 2):
        _round(serial, clients, round)
        with ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(lambda c: (_train(threaded, c, round), threaded.upload(client=c, round=round)), clients))
        threaded.aggregate(round=round, clients=clients)
    assert _same_state(serial.server_state(), threaded.server_state())


def test_fedavg_learns_the_synthetic_task(fed_config: dict[str, Any], quiet_logs: None) -> None:
    fed = Federation(fed_config, seed=0)
    clients = [f"c{i}" for i in range(6)]
    before = _mean_val_acc(fed, clients, 0)
    for round in range(1, 11):
        _round(fed, clients, round)
    after = _mean_val_acc(fed, clients, 10)
    assert before < 0.2  # chance is 0.1
    assert after > 0.1 + 0.25
    assert after - before > 0.25


def test_validating_a_client_that_never_trained_uses_the_global_model_and_stores_nothing(
    fed_config: dict[str, Any], quiet_logs: None
) -> None:
    fed = Federation(fed_config, seed=0)
    _round(fed, ["a", "b"], 1)
    stranger = fed.validate(client="stranger", tasks=["t0", "t1"], round=1, device="cpu")
    assert set(stranger) == {"t0", "t1"}
    assert len(fed.store) == 2 and not fed.store.known("stranger")
    # The same global weights loaded into a trained client's place give the same score on the same data.
    twin = Federation(fed_config, seed=0)
    _round(twin, ["a", "b"], 1)
    assert twin.validate(client="stranger", tasks=["t0"], round=1, device="cpu")["t0"] == stranger["t0"]


def test_a_trained_client_is_scored_with_its_own_weights(fed_config: dict[str, Any], quiet_logs: None) -> None:
    fed = Federation(fed_config, seed=0)
    before = fed.validate(client="a", tasks=["t0"], round=0, device="cpu")["t0"]
    _train(fed, "a")
    after = fed.validate(client="a", tasks=["t0"], round=1, device="cpu")["t0"]
    assert after != before


def test_many_untrained_clients_cost_no_state(fed_config: dict[str, Any]) -> None:
    fed = Federation(fed_config, seed=0)
    for i in range(300):
        fed.validate(client=f"c{i}", tasks=["t0"], round=0, device="cpu")
    assert len(fed.store) == 0 and fed.store.nbytes_in_memory() == 0


def test_uploading_a_client_that_never_trained_is_an_error(fed_config: dict[str, Any]) -> None:
    fed = Federation(fed_config, seed=0)
    with pytest.raises(LookupError) as info:
        fed.upload(client="ghost", round=2)
    assert str(info.value) == "upload of 'ghost' in round 2: expected a client that has trained, found none"


def test_spilling_client_states_to_disk_changes_no_result(
    fed_config: dict[str, Any], tmp_path: Path, quiet_logs: None
) -> None:
    clients = [f"c{i}" for i in range(5)]
    in_memory = Federation(fed_config, seed=0)
    spilling = Federation(fed_config, seed=0, spill_dir=str(tmp_path), max_in_memory=2)
    for round in (1, 2):
        _round(in_memory, clients, round)
        _round(spilling, clients, round)
    assert len(list(tmp_path.glob("*.pt"))) == 3
    assert _same_state(in_memory.server_state(), spilling.server_state())
    for client in clients:
        assert spilling.store.get(client).rounds_trained == 2


def test_optimizer_and_scheduler_state_carry_over_between_rounds(fed_config: dict[str, Any], quiet_logs: None) -> None:
    fed_config["optimizer_opts"].update(momentum=0.9)
    fed_config["scheduler_opts"].update(name="step_lr", step_size=1, gamma=0.5)
    fed = Federation(fed_config, seed=0)
    for round in (1, 2, 3):
        _train(fed, "a", round)
    stored = fed.store.get("a")
    assert stored.optimizer["param_groups"][0]["lr"] == 0.05 * 0.5**3
    assert stored.scheduler["last_epoch"] == 3
    assert len(stored.optimizer["state"]) == 6  # a momentum buffer per parameter tensor


def test_the_stored_state_is_not_changed_by_later_training(fed_config: dict[str, Any], quiet_logs: None) -> None:
    fed_config["optimizer_opts"].update(momentum=0.9)
    fed = Federation(fed_config, seed=0)
    _train(fed, "a", 1)
    first = fed.store.get("a")
    snapshot = {k: v.clone() for k, v in first.model.items()}
    buffer = first.optimizer["state"][0]["momentum_buffer"].clone()
    _train(fed, "a", 2)
    _train(fed, "b", 2)  # same thread, same reused model
    assert _same_state(first.model, snapshot)
    assert torch.equal(first.optimizer["state"][0]["momentum_buffer"], buffer)


def test_adam_and_label_smoothing_train(fed_config: dict[str, Any], quiet_logs: None) -> None:
    fed_config["optimizer_opts"] = {"name": "adam", "lr": 0.01, "weight_decay": 0.0}
    fed_config["criterion_opts"]["epsilon"] = 0.1
    fed = Federation(fed_config, seed=0)
    _train(fed, "a", 1)
    _train(fed, "a", 2)
    assert fed.store.get("a").optimizer["state"][0]["step"].item() == 14  # 7 batches of 32 in 200, twice


def test_a_cnn_trains_on_image_tasks(fed_config: dict[str, Any], quiet_logs: None) -> None:
    fed_config["model_opts"] = {"name": "cnn", "channels": [8, 16]}
    fed_config["task_opts"]["synthetic"]["input_shape"] = [1, 12, 12]
    fed = Federation(fed_config, seed=0)
    _round(fed, ["a", "b"], 1)
    assert 0.0 <= fed.validate(client="a", tasks=["t0"], round=1, device="cpu")["t0"].metrics["val_acc"] <= 1.0


def test_an_unknown_method_is_named(fed_config: dict[str, Any]) -> None:
    assert {"baseline", "fedavg", "fedprox"} <= set(METHODS)
    fed_config["exp_method"] = "fedsgd"
    with pytest.raises(ValueError) as info:
        Federation(fed_config, seed=0)
    assert str(info.value) == f"exp_method: expected one of {', '.join(METHODS)}, found 'fedsgd'"


def test_a_bad_option_is_reported_when_the_federation_is_built(fed_config: dict[str, Any]) -> None:
    fed_config["scheduler_opts"]["name"] = "plateau"
    with pytest.raises(ValueError, match="scheduler_opts.name: expected one of"):
        Federation(fed_config, seed=0)


def test_a_client_with_nothing_stored_joins_as_new_even_when_called_incremental(fed_config: dict[str, Any]) -> None:
    """Regression: under the tolerate policy a client whose first training failed comes back "incremental"
    with no stored state; baseline then had no model to start from (KeyError on an empty payload)."""
    fed_config["exp_method"] = "baseline"
    fed = Federation(fed_config, seed=0)
    result = fed.train(client="a", task="t0", round=2, device="cpu", state="incremental")
    assert result.samples > 0 and fed.store.get("a").rounds_trained == 1


def test_the_drivers_torch_work_runs_with_the_configured_threads_in_any_thread(
    fed_config: dict[str, Any], quiet_logs: None
) -> None:
    """Regression: aggregation ran in a fresh worker thread with torch's default (machine-sized) thread
    count, so under load a resumed or repeated run could differ from the reference in the last bits."""
    fed = Federation({**fed_config, "exp_opts": {"torch_threads": 1}}, seed=3)
    seen: list[int] = []
    real = fed._server.aggregate

    def aggregate(round: int, clients: Any) -> AggregateResult:
        seen.append(torch.get_num_threads())
        return real(round, clients)

    fed._server.aggregate = aggregate  # type: ignore[method-assign]

    for client in ("a", "b"):
        _train(fed, client, 1)
        fed.upload(client=client, round=1)

    def in_a_fresh_thread() -> None:
        torch.set_num_threads(2)  # what a new worker thread may start with
        fed.aggregate(round=1, clients=["a", "b"])

    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(in_a_fresh_thread).result(timeout=120)
    assert seen == [1]


@pytest.mark.parametrize(("values", "dtype", "finite"), [
    ([1.0, -2.0, 3.5], torch.float32, True),
    ([], torch.float32, True),
    ([1.0, float("nan"), 2.0], torch.float32, False),
    ([1.0, float("inf")], torch.float32, False),
    ([float("-inf"), 1.0], torch.float64, False),
    ([float("inf"), float("-inf")], torch.float32, False),  # their sum is a NaN
    ([3e38, 3e38, -1.0], torch.float32, True),  # the sum overflows, every element is finite
    ([60000.0, 60000.0], torch.float16, True),
    ([60000.0, float("nan")], torch.bfloat16, False),
])
def test_all_finite_answers_as_isfinite_does(values: list[float], dtype: torch.dtype, finite: bool) -> None:
    """Regression: the divergence check ran isfinite over every weight, as long as a small client's training."""
    from fedevents.federated.federation import all_finite

    tensor = torch.tensor(values, dtype=dtype)
    assert all_finite(tensor) is finite is bool(torch.isfinite(tensor).all())
    assert all_finite(tensor.reshape(-1, 1).expand(-1, 3)) is finite  # strided, not contiguous
