from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from fedevents.federated import ClientState, ClientStore


def _state(i: int) -> ClientState:
    g = torch.Generator().manual_seed(i)
    return ClientState(
        model={"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g), "n": torch.tensor(i)},
        optimizer={"state": {0: {"momentum_buffer": torch.randn(3, 4, generator=g)}},
                   "param_groups": [{"lr": 0.05 * i, "params": [0]}]},
        scheduler={"last_epoch": i, "base_lrs": [0.05]},
        rounds_trained=i,
        samples=100 + i,
    )


def _assert_same(a: ClientState, b: ClientState) -> None:
    assert a.model.keys() == b.model.keys()
    assert all(torch.equal(a.model[k], b.model[k]) and a.model[k].dtype == b.model[k].dtype for k in a.model)
    assert torch.equal(a.optimizer["state"][0]["momentum_buffer"], b.optimizer["state"][0]["momentum_buffer"])
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    assert (a.scheduler, a.rounds_trained, a.samples) == (b.scheduler, b.rounds_trained, b.samples)


def test_clients_that_never_trained_cost_nothing() -> None:
    store = ClientStore()
    names = [f"client-{i}" for i in range(100_000)]
    assert not any(store.known(name) for name in names)
    assert store.get(names[-1]) is None
    assert len(store) == 0
    assert store.nbytes_in_memory() == 0


def test_memory_is_counted_for_states_kept_in_memory() -> None:
    store = ClientStore()
    store.put("a", _state(1))
    assert store.nbytes_in_memory() == (12 + 4 + 12) * 4 + 8
    assert len(store) == 1 and store.known("a") and "a" in store


def test_spilled_states_round_trip_exactly(tmp_path: Path) -> None:
    store = ClientStore(max_in_memory=2, spill_dir=tmp_path)
    for i in range(5):
        store.put(f"c{i}", _state(i))
    assert len(store) == 5
    assert len(list(tmp_path.glob("*.pt"))) == 3
    assert store.nbytes_in_memory() == 2 * ((12 + 4 + 12) * 4 + 8)
    for i in range(5):
        _assert_same(store.get(f"c{i}"), _state(i))
    assert len(store) == 5
    assert len(list(tmp_path.glob("*.pt"))) == 3  # each state sits in exactly one place


def test_putting_a_spilled_client_replaces_its_file(tmp_path: Path) -> None:
    store = ClientStore(max_in_memory=1, spill_dir=tmp_path)
    store.put("a", _state(1))
    store.put("b", _state(2))
    store.put("a", _state(3))  # "a" was on disk; now in memory, "b" goes to disk
    _assert_same(store.get("a"), _state(3))
    assert len(store) == 2
    assert len(list(tmp_path.glob("*.pt"))) == 1


def test_without_a_spill_dir_every_state_stays_in_memory() -> None:
    store = ClientStore(max_in_memory=1, spill_dir=None)
    for i in range(4):
        store.put(f"c{i}", _state(i))
    assert store.nbytes_in_memory() == 4 * ((12 + 4 + 12) * 4 + 8)


def test_client_names_need_not_be_file_names(tmp_path: Path) -> None:
    store = ClientStore(max_in_memory=1, spill_dir=tmp_path)
    store.put("../../etc/passwd", _state(1))
    store.put("a/b c:*", _state(2))
    _assert_same(store.get("../../etc/passwd"), _state(1))
    assert all(p.parent == tmp_path for p in tmp_path.iterdir())


def test_threads_storing_and_reading_different_clients_see_their_own_states(tmp_path: Path) -> None:
    store = ClientStore(max_in_memory=3, spill_dir=tmp_path)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(offset, offset + 20):
                store.put(f"c{i}", _state(i))
                _assert_same(store.get(f"c{i}"), _state(i))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 100,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store) == 120
    for k in range(6):
        _assert_same(store.get(f"c{k * 100 + 7}"), _state(k * 100 + 7))


def test_max_in_memory_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="max_in_memory expected an int >= 1, found 0"):
        ClientStore(max_in_memory=0)
