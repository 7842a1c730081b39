"""exp_opts.legacy: FedSTIL's runner's behaviour where fedevents' fixes change results (docs/fedstil.md).

Each test pins one behaviour with numbers worked out by hand from FEDSTIL.md's description of the runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedevents.federated.backbones import build_reid_model
from fedevents.federated.federation import Federation
from fedevents.federated.methods import LocalRound, ModelOutput, build_method
from fedevents.federated.methods.adaptive import adaptive_layers
from fedevents.federated.reid_data import load_image_set
from fedevents.federated.reid_metrics import reid_scores
from fedevents.federated.seeds import generator
from fedevents.federated.synth_reid import generate_synth_reid
from fedevents.federated.tasks import ReidTasks
from fedevents.federated.training import EarlyStop, train_local

def _runner_map(positives: list[int]) -> float:
    """reid_scores' fedstil-runner mAP of one query whose matches sit at the given 1-based ranks (of 5)."""
    gallery = torch.arange(6, dtype=torch.float32)[1:, None]
    pids = [1 if rank in positives else 2 for rank in range(1, 6)]
    cams = [-1] * 5
    return reid_scores(torch.zeros(1, 1), [1], [-1], gallery, pids, cams, ranks=(1,), map_mode="fedstil-runner")["map"]


def test_the_runner_map_is_its_trapezoid_over_the_first_match_only() -> None:
    # FEDSTIL.md B18: 1 when the first match is at rank 1 (true AP 0.7 here); at rank 2 -> 1 / (2 * 2).
    assert _runner_map([1, 4, 5]) == 1.0
    assert _runner_map([2, 3]) == 0.25
    assert _runner_map([4]) == 0.125


def test_early_stop_counts_epochs_without_improvement_as_the_runner_did() -> None:
    stop = EarlyStop(3)
    # best (1.0, .5); worse loss; lower accuracy; worse again -> the third epoch without improvement stops
    assert [stop.ends(1.0, 0.5), stop.ends(1.2, 0.5), stop.ends(0.9, 0.25), stop.ends(1.5, 0.0)] == \
        [False, False, False, True]
    assert stop.counted == 3
    # an epoch that lowers the loss and keeps the accuracy resets the count
    stop = EarlyStop(2)
    assert [stop.ends(1.0, 0.5), stop.ends(1.1, 0.5), stop.ends(0.9, 0.5), stop.ends(1.0, 0.5)] == \
        [False, False, False, False]


def test_a_round_stopped_early_counts_only_its_counted_epochs_and_reports_the_last_one() -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    # Per epoch (one batch of 4): a loss, and how many of the 4 logits pick the right class.
    script = iter([(1.0, 2), (1.2, 2), (0.9, 1), (1.5, 0), (0.1, 4)])
    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)

    def batch_loss(xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, right = next(script)
        logits = torch.tensor([[1.0, 0.0]] * right + [[0.0, 1.0]] * (4 - right))
        return model(xb).sum() * 0 + loss, logits

    scores = train_local(model, optimizer, None, None, x, y, epochs=5, batch_size=4, shuffle=torch.Generator(),
                         batch_loss=batch_loss, patience=3)
    # Epoch 4 stops the round: it ran (the runner logged it) but is not in train_cnt; epoch 5 never runs.
    assert (scores.samples, scores.loss, scores.acc) == (12, 1.5, 0.0)
    assert next(script) == (0.1, 4)


def _fed(config: dict[str, Any], legacy: bool) -> Federation:
    config = {**config, "exp_opts": {"legacy": legacy},
              "optimizer_opts": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
              "scheduler_opts": {"name": "step_lr", "step_size": 2, "gamma": 0.1},
              "task_opts": {**config["task_opts"], "train_epochs": 3}}
    return Federation(config, seed=0)


@pytest.mark.parametrize(("legacy", "lrs"), [(False, [0.01, 0.0001]), (True, [0.01, 0.001])])
def test_under_legacy_each_round_restarts_the_learning_rate_while_step_lr_keeps_counting(
        fed_config: dict[str, Any], quiet_logs: None, legacy: bool, lrs: list[float]) -> None:
    fed = _fed(fed_config, legacy)
    seen = []
    for r in (1, 2):
        fed.train(client="a", task="t0", round=r, device="cpu", state="integrated" if r == 1 else "incremental")
        seen.append(fed.store.get("a").optimizer["param_groups"][0]["lr"])
    # StepLR decays after the client's epochs 2, 4 and 6. Round 1 (epochs 1-3) leaves 0.01. Round 2 goes on
    # from 0.01 and leaves 0.0001; the runner restarts it at 0.1, so it leaves 0.001.
    assert seen == pytest.approx(lrs)


@pytest.mark.parametrize(("legacy", "epochs_counted"), [(False, 1), (True, 3)])
def test_under_legacy_the_upload_weighs_the_samples_of_every_counted_epoch(
        fed_config: dict[str, Any], quiet_logs: None, legacy: bool, epochs_counted: int) -> None:
    fed = _fed(fed_config, legacy)
    result = fed.train(client="a", task="t0", round=1, device="cpu", state="integrated")
    # The runner's train_cnt: the data set times the 3 epochs run (none stopped early here); the training
    # event still names the data set's size.
    assert fed.upload(client="a", round=1).samples == epochs_counted * result.samples
    assert result.samples == fed.store.get("a").samples // epochs_counted


def test_under_legacy_a_method_whose_optimizer_the_runner_rebuilt_every_epoch_has_no_schedule() -> None:
    assert build_method("fedavg").runner_schedules_lr
    assert not any(build_method(name).runner_schedules_lr for name in ("icarl", "fedweit", "fedstil", "fedstil-atten"))


def _round(model: nn.Module, payload: dict, previous: dict) -> LocalRound:
    return LocalRound(client="c", task="t", round=2, device=torch.device("cpu"), model=model, payload=payload,
                      memory={}, previous_model=previous, previous_task="t",
                      task_data=lambda task: (torch.zeros(1, 1), torch.zeros(1, dtype=torch.long)),
                      forward=lambda x: ModelOutput(model(x), model(x)))


@pytest.mark.parametrize(("legacy", "expected"), [(False, 1.0), (True, 2.25)])
def test_under_legacy_fedprox_anchors_to_the_clients_own_last_weights(legacy: bool, expected: float) -> None:
    method = build_method("fedprox", {"mu": 0.5}, legacy=legacy)
    model = nn.Linear(1, 1, bias=False)
    rnd = _round(model, {"model": {"weight": torch.tensor([[1.0]])}}, {"weight": torch.tensor([[6.0]])})
    method.start(rnd)
    with torch.no_grad():
        model.weight.fill_(3.0)
    zero = torch.tensor(0.0)
    # mu/2 * (3 - anchor)^2: the received global 1 -> 0.25 * 4; the runner's own last weights 6 (B9) -> 0.25 * 9
    loss = method.batch_loss(rnd, torch.zeros(1, 1), torch.zeros(1), ModelOutput(zero, zero), zero)
    assert loss.item() == expected


@pytest.mark.parametrize(("legacy", "expected"), [(False, 2.0 * 5.0), (True, 0.0)])
def test_under_legacy_fedweits_approximation_loss_is_zero_as_the_runners_was(legacy: bool, expected: float) -> None:
    method = build_method("fedweit", {"lambda_l1": 0.0, "lambda_l2": 2.0, "kb_cnt": 1}, legacy=legacy)
    model = method.prepare(nn.Sequential(nn.Linear(2, 1, bias=False)))
    (_, layer), = adaptive_layers(model)
    with torch.no_grad():
        layer.sw.copy_(torch.tensor([[1.0, 2.0]]))
        layer.mask.fill_(1.0)
        layer.aw.zero_()
    rnd = _round(model, {}, {})
    # theta = [1, 2] against a previous task's [0, 0]: lambda_l2 * ||theta - 0||^2 = 2 * 5 (B14: the runner's 0)
    rnd.scratch["approx"] = [(layer, torch.zeros(1, 2))]
    zero = torch.tensor(0.0)
    assert method.batch_loss(rnd, torch.zeros(1, 2), torch.zeros(1), ModelOutput(zero, zero), zero).item() == expected


def test_under_legacy_fedstil_trains_its_anchors_under_the_same_state_names() -> None:
    fixed = build_method("fedstil").prepare(nn.Sequential(nn.Linear(3, 2)))
    runner = build_method("fedstil", legacy=True).prepare(nn.Sequential(nn.Linear(3, 2)))
    # The runner's state holds the anchors it trains; the fixed ones are rebuilt, so a runner's state loads into
    # a fixed layer too.
    assert sorted(runner.state_dict()) == sorted([*fixed.state_dict(), "0.a0", "0.A0"])
    fixed.load_state_dict(runner.state_dict())
    trained = {name for name, p in runner.named_parameters() if p.requires_grad}
    assert trained == {"0.bias", "0.A", "0.a0", "0.A0"}
    assert {name for name, p in fixed.named_parameters() if p.requires_grad} == {"0.bias", "0.A"}
    # The L1 pull moves the anchors too: after a step of A away from A0, the drift's gradient reaches A0.
    (_, layer), = adaptive_layers(runner)
    with torch.no_grad():
        layer.A.add_(1.0)
    layer.drift().backward()
    assert torch.equal(layer.A0.grad, -torch.ones_like(layer.A0))


def test_under_legacy_reid_scoring_ranks_pre_neck_features_by_cosine_with_no_camera_rule(tmp_path: Path) -> None:
    generate_synth_reid(tmp_path, clients=1, tasks=1, ids_per_task=4, images_per_id=4, cameras=2, img_size=(32, 16))
    opts = {"augment_opts": {"level": "none", "img_size": [32, 16], "norm_mean": [0.5] * 3, "norm_std": [0.25] * 3},
            "map_mode": "fedstil-runner"}
    task = "client-0-task-0"
    model = build_reid_model({"name": "resnet18", "num_classes": 8, "width": 4}, generator=generator(0, "legacy"))
    runner = ReidTasks(opts, str(tmp_path), [task], 8, legacy=True)
    _, scores = runner.score(model, "client-0", task, torch.device("cpu"))
    # By hand: the pooled feature before the BN neck, cosine distance, every camera unknown (no junk).
    sets = [load_image_set(runner.tasks[task], split, runner.augment_opts, cache=None, decoder=runner.decoder)
            for split in ("query", "gallery")]
    model.eval()
    with torch.no_grad():
        query, gallery = (model.pool(model.base(runner.augment_opts.normalise(s.pixels))).flatten(1) for s in sets)
    unknown = [[-1] * len(s.pids) for s in sets]
    expected = reid_scores(query, sets[0].pids, unknown[0], gallery, sets[1].pids, unknown[1],
                           map_mode="fedstil-runner", metric="cosine")
    assert scores == {f"val_{key}": value for key, value in expected.items()}
    # fedevents' own scoring differs here: the camera rule leaves each query one fewer match.
    _, own = ReidTasks({**opts, "map_mode": "standard"}, str(tmp_path), [task], 8).score(model, "client-0", task,
                                                                                          torch.device("cpu"))
    assert own != scores
