"""A ReID task source over the FedSTIL layout: labels per task, metrics, and a small federated run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedevents.engine.config import load_experiment
from fedevents.federated import Federation
from fedevents.federated.synth_reid import generate_synth_reid
from fedevents.federated.tasks import ReidTasks


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reid")
    generate_synth_reid(out, clients=2, tasks=2, ids_per_task=6, images_per_id=4, cameras=2, img_size=(32, 16),
                        sustain_rounds=1, seed=3)
    return out


def config(dataset: Path, **changes) -> dict:
    path = dataset / "experiment.yaml"
    cfg = load_experiment(path, overrides=["model_opts.width=8", "task_opts.batch_size=8",
                                           *[f"{k}={v}" for k, v in changes.items()]])
    return dict(cfg.data)


def test_each_task_gets_its_own_label_range(dataset: Path) -> None:
    data = config(dataset)
    tasks = ReidTasks(data["task_opts"], str(dataset), ["client-1-task-0", "client-0-task-0", "client-0-task-1"],
                      num_classes=data["model_opts"]["num_classes"])
    ranges = []
    for name in ("client-0-task-0", "client-0-task-1", "client-1-task-0"):
        _, labels = tasks.train_data("client-0", name)
        ranges.append((int(labels.min()), int(labels.max())))
    # tasks in name order, 3 training identities each: labels 0-2, 3-5, 6-8
    assert ranges == [(0, 2), (3, 5), (6, 8)]
    with pytest.raises(ValueError, match=r"model_opts.num_classes = 5, but the tasks under .* have 9 training "
                                         r"identities; expected at least 9"):
        ReidTasks(data["task_opts"], str(dataset), ["client-0-task-0", "client-0-task-1", "client-1-task-0"], 5)


def test_a_reid_federation_trains_and_scores_rank_k_and_map(dataset: Path) -> None:
    data = config(dataset)
    fed = Federation(data, seed=0)
    result = fed.train(client="client-0", task="client-0-task-0", round=1, device="cpu", state="integrated")
    assert set(result.metrics) == {"tr_acc", "tr_loss"} and result.samples > 0
    fed.upload(client="client-0", round=1)
    fed.aggregate(round=1, clients=["client-0"])
    scores = fed.validate(client="client-0", tasks=["client-0-task-0", "client-0-task-1"], round=1, device="cpu")
    for task in ("client-0-task-0", "client-0-task-1"):
        metrics = scores[task].metrics
        assert set(metrics) == {"val_rank_1", "val_rank_3", "val_rank_5", "val_rank_10", "val_map"}
        assert 0.0 <= metrics["val_rank_1"] <= metrics["val_rank_3"] <= metrics["val_rank_10"] <= 1.0


def test_map_mode_changes_only_the_map(dataset: Path) -> None:
    standard = Federation(config(dataset), seed=0)
    first = Federation(config(dataset, **{"task_opts.map_mode": "first-match"}), seed=0)
    a = standard.validate(client="client-1", tasks=["client-1-task-0"], round=0, device="cpu")["client-1-task-0"]
    b = first.validate(client="client-1", tasks=["client-1-task-0"], round=0, device="cpu")["client-1-task-0"]
    # first-match counts only each query's first correct match; CMC is the same under both modes
    assert {k: v for k, v in a.metrics.items() if k != "val_map"} == {k: v for k, v in b.metrics.items() if k != "val_map"}
    assert 0.0 < a.metrics["val_map"] <= 1.0 and 0.0 < b.metrics["val_map"] <= 1.0


@pytest.mark.parametrize("level", ["strong", "none"])
def test_training_on_stored_pixels_gives_the_bits_of_training_on_the_normalised_split(dataset: Path, level: str) -> None:
    """Splits are kept as 8-bit pixels and normalised per batch; the weights trained must not change by a bit."""
    import torch

    from fedevents.federated.backbones import build_reid_model
    from fedevents.federated.reid_data import augment
    from fedevents.federated.seeds import generator
    from fedevents.federated.training import train_local

    data = config(dataset, **{"task_opts.augment_opts.level": level})
    tasks = ReidTasks(data["task_opts"], str(dataset), ["client-0-task-0"], num_classes=data["model_opts"]["num_classes"])
    pixels, labels = tasks.train_inputs("client-0", "client-0-task-0")
    images, same_labels = tasks.train_data("client-0", "client-0-task-0")
    assert pixels.dtype == torch.uint8 and images.dtype == torch.float32 and torch.equal(labels, same_labels)
    assert images.nbytes == 4 * pixels.nbytes

    def trained(x: torch.Tensor, prepare) -> dict[str, torch.Tensor]:
        model = build_reid_model(data["model_opts"], generator=generator(0, "init"))
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        def batch_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits, _ = model(xb)
            return torch.nn.functional.cross_entropy(logits, yb), logits

        train_local(model, optimizer, None, None, x, labels, epochs=1, batch_size=8, shuffle=generator(0, "shuffle"),
                    batch_loss=batch_loss, augment=prepare, augment_generator=generator(0, "augment"))
        return model.state_dict()

    whole = trained(images, None if level == "none" else (lambda xb, gen: augment(xb, level, generator=gen)))
    compact = trained(pixels, tasks.augment)
    assert all(torch.equal(whole[k], v) for k, v in compact.items())


def test_decoding_in_worker_processes_trains_the_same_model(dataset: Path) -> None:
    """task_opts.loader_opts.num_workers moves decoding to worker processes; the round must not change by a bit."""
    from fedevents.federated.reid_data import IMAGE_CACHE

    results = {}
    for workers in (0, 2):
        data = config(dataset)
        data["task_opts"] = {**data["task_opts"],
                             "loader_opts": {"num_workers": workers, "multiprocessing_context": "fork"}}
        IMAGE_CACHE.clear()  # decode afresh, not from the other run's cache
        fed = Federation(data, seed=0)
        assert fed.worker.tasks.decoder.opts.num_workers == workers
        result = fed.train(client="client-0", task="client-0-task-0", round=1, device="cpu", state="integrated")
        results[workers] = (result.metrics, fed.store.get("client-0").model)
    assert results[0][0] == results[2][0]
    assert all(torch.equal(results[0][1][k], v) for k, v in results[2][1].items())
