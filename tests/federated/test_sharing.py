"""Frozen weights held once: a client's stored state and the global model share the tensors they hold alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedevents.engine.config import load_experiment
from fedevents.federated import Federation, Upload, weighted_mean
from fedevents.federated.sharing import bitwise_equal, share_equal
from fedevents.federated.synth_reid import generate_synth_reid


def test_bitwise_equality_tells_negative_zero_and_nan_apart_as_their_bits_do() -> None:
    assert bitwise_equal(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("nan")]))
    assert not bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not bitwise_equal(torch.tensor([1.0]), torch.tensor([1.0], dtype=torch.float64))
    assert not bitwise_equal(torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 2.0]]))
    assert bitwise_equal(torch.tensor([3, 4]), torch.tensor([3, 4]))


def test_a_tensor_equal_to_a_bases_is_replaced_by_the_bases_and_the_others_are_kept() -> None:
    base = {"frozen": torch.tensor([1.0, 2.0]), "trained": torch.tensor([0.0])}
    mine = {"frozen": torch.tensor([1.0, 2.0]), "trained": torch.tensor([5.0]), "own": torch.tensor([7.0])}
    shared = share_equal(mine, None, base)
    assert shared["frozen"] is base["frozen"]
    assert shared["trained"] is mine["trained"] and shared["own"] is mine["own"]


def test_the_mean_of_one_shared_tensor_is_that_tensor_and_other_means_are_computed() -> None:
    frozen = torch.tensor([0.1, -3.0])
    uploads = {name: Upload({"frozen": frozen, "w": torch.tensor([value])}, samples=n)
               for name, value, n in (("a", 1.0, 1), ("b", 4.0, 2))}
    mean = weighted_mean(uploads)
    assert mean["frozen"] is frozen
    assert torch.equal(mean["w"], torch.tensor([3.0]))
    # Equal values in separate tensors are averaged as before: nothing says they stay equal.
    copies = {name: Upload({"frozen": frozen.clone()}, samples=n) for name, n in (("a", 1), ("b", 2))}
    assert weighted_mean(copies)["frozen"] is not frozen


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reid")
    generate_synth_reid(out, clients=2, tasks=1, ids_per_task=4, images_per_id=4, cameras=2, img_size=(32, 16),
                        sustain_rounds=1, seed=3)
    return out


def test_fine_tuned_clients_store_the_frozen_trunk_once_with_the_global_model(dataset: Path) -> None:
    overrides = ["model_opts.width=8", "task_opts.batch_size=8", "model_opts.fine_tuning=[base.layer4, classifier]"]
    fed = Federation(dict(load_experiment(dataset / "experiment.yaml", overrides=overrides).data), seed=0)
    clients = ["client-0", "client-1"]
    for rnd in (1, 2):
        for client in clients:
            fed.train(client=client, task=f"{client}-task-0", round=rnd, device="cpu", state="incremental")
            fed.upload(client=client, round=rnd)
        fed.aggregate(round=rnd, clients=clients)
    server = fed.server_state()
    states = [fed.store.get(client).model for client in clients]
    for key in ("base.conv1.weight", "base.layer3.1.conv2.weight"):
        assert all(state[key] is server[key] for state in states)
    # What trained is each client's own, and the global model's is their mean.
    assert states[0]["base.layer4.0.conv1.weight"] is not states[1]["base.layer4.0.conv1.weight"]
    assert not any(state["base.layer4.0.conv1.weight"] is server["base.layer4.0.conv1.weight"] for state in states)
    # BatchNorm's running statistics move in training even where the weights are frozen: they stay per client.
    assert not bitwise_equal(states[0]["base.bn1.running_mean"], states[1]["base.bn1.running_mean"])

