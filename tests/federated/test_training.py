from __future__ import annotations

import math

import pytest
import torch
from structlog.testing import capture_logs

from fedevents.federated import build_model, generator
from fedevents.federated.training import (
    build_criterion,
    build_optimizer,
    build_scheduler,
    evaluate,
    train_local,
)


def _setup(scheduler_opts: dict | None = None):
    model = build_model({"name": "mlp", "hidden": [8]}, [4], 3, generator=generator(0, "init"))
    optimizer = build_optimizer({"name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0}, model.parameters())
    scheduler = build_scheduler(scheduler_opts or {"name": "none"}, optimizer)
    x = torch.randn(10, 4, generator=generator(0, "x"))
    y = torch.arange(10) % 3
    return model, optimizer, scheduler, x, y


def test_sgd_and_adam_take_their_options() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, params)
    adam = build_optimizer({"name": "adam", "lr": 0.001, "weight_decay": 0.0}, params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["weight_decay"] == 0.01
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 0.001


@pytest.mark.parametrize(
    ("build", "opts", "message"),
    [
        (lambda o: build_optimizer(o, [torch.nn.Parameter(torch.zeros(1))]), {"name": "rmsprop", "lr": 0.1},
         "optimizer_opts.name: expected one of adam, sgd, found 'rmsprop'"),
        (lambda o: build_scheduler(o, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)),
         {"name": "plateau"}, "scheduler_opts.name: expected one of cosine, none, step_lr, found 'plateau'"),
        (build_criterion, {"name": "mse"}, "criterion_opts.name: expected one of cross_entropy, found 'mse'"),
    ],
)
def test_unknown_names_are_named(build, opts: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build(opts)
    assert str(info.value) == message


def test_epsilon_is_label_smoothing() -> None:
    assert build_criterion({"name": "cross_entropy", "epsilon": 0.1}).label_smoothing == 0.1


def test_step_lr_steps_once_per_local_epoch() -> None:
    model, optimizer, scheduler, x, y = _setup({"name": "step_lr", "step_size": 1, "gamma": 0.5})
    train_local(model, optimizer, scheduler, build_criterion({"name": "cross_entropy"}), x, y,
                epochs=3, batch_size=4, shuffle=generator(0, "shuffle"))
    assert optimizer.param_groups[0]["lr"] == 0.05 * 0.5**3


def test_cosine_reaches_zero_after_t_max_epochs() -> None:
    model, optimizer, scheduler, x, y = _setup({"name": "cosine", "t_max": 2})
    train_local(model, optimizer, scheduler, build_criterion({"name": "cross_entropy"}), x, y,
                epochs=2, batch_size=4, shuffle=generator(0, "shuffle"))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_training_reports_over_all_samples_seen_and_logs_each_epoch() -> None:
    model, optimizer, scheduler, x, y = _setup()
    with capture_logs() as logs:
        scores = train_local(model, optimizer, scheduler, build_criterion({"name": "cross_entropy"}), x, y,
                             epochs=3, batch_size=4, shuffle=generator(0, "shuffle"))
    assert scores.samples == 30
    assert 0.0 <= scores.acc <= 1.0 and scores.loss > 0.0
    assert [(e["event"], e["epoch"], e["log_level"]) for e in logs] == [("epoch finished", i, "info") for i in range(3)]
    assert all(set(e) == {"event", "epoch", "loss", "acc", "log_level"} for e in logs)
    assert sum(e["loss"] for e in logs) / 3 == pytest.approx(scores.loss)


def test_training_changes_the_weights_and_leaves_no_gradients_behind() -> None:
    model, optimizer, scheduler, x, y = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    train_local(model, optimizer, scheduler, build_criterion({"name": "cross_entropy"}), x, y,
                epochs=1, batch_size=4, shuffle=generator(0, "shuffle"))
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_an_optimizer_with_its_own_zero_grad_has_it_called_after_training() -> None:
    model, _, _, x, y = _setup()
    calls = []

    class Counted(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(set_to_none)
            super().zero_grad(set_to_none)

    train_local(model, Counted(model.parameters(), lr=0.1), None, build_criterion({"name": "cross_entropy"}), x, y,
                epochs=1, batch_size=4, shuffle=generator(0, "shuffle"))
    assert calls == [True]
    assert all(p.grad is None for p in model.parameters())


def test_the_same_shuffle_seed_gives_the_same_weights() -> None:
    results = []
    for _ in range(2):
        model, optimizer, scheduler, x, y = _setup()
        train_local(model, optimizer, scheduler, build_criterion({"name": "cross_entropy"}), x, y,
                    epochs=2, batch_size=3, shuffle=generator(0, "shuffle"))
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_evaluate_scores_in_eval_mode_without_gradients() -> None:
    model = torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    scores = evaluate(model, torch.randn(4, 2), torch.tensor([0, 1, 1, 1]))
    # Equal logits: loss ln 2 per sample; argmax of a tie is class 0, right for one sample in four.
    assert scores.samples == 4
    assert scores.loss == pytest.approx(math.log(2))
    assert scores.acc == 0.25
    assert not model.training
    assert model.weight.grad is None


class _Subclassed(torch.nn.CrossEntropyLoss):
    """A user's subclass: its own forward must be called, not ``F.cross_entropy``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(logits, target)


def _trained(criterion: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    model, optimizer, scheduler, x, y = _setup()
    scores = train_local(model, optimizer, scheduler, criterion, x, y, epochs=2, batch_size=3,
                         shuffle=generator(0, "shuffle"))
    return scores.loss, model.state_dict()


def _by_module_call(criterion: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    # A forward hook that changes nothing keeps train_local on the module's own __call__ path.
    handle = criterion.register_forward_hook(lambda module, args, out: None)
    try:
        return _trained(criterion)
    finally:
        handle.remove()


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"weight": torch.tensor([1.0, 2.0, 0.5])},
                                     {"ignore_index": 1}])
def test_a_plain_cross_entropy_trains_to_the_bits_of_calling_the_module(options: dict) -> None:
    direct_loss, direct = _trained(torch.nn.CrossEntropyLoss(**options))
    module_loss, via_module = _by_module_call(torch.nn.CrossEntropyLoss(**options))
    # ignore_index can leave a batch with nothing to score (NaN, as the module gives): compare bit for bit.
    torch.testing.assert_close(torch.tensor(direct_loss), torch.tensor(module_loss), rtol=0, atol=0, equal_nan=True)
    for name in direct:
        torch.testing.assert_close(direct[name], via_module[name], rtol=0, atol=0, equal_nan=True)


def test_a_criterion_with_hooks_or_a_subclass_is_called_as_it_is() -> None:
    calls = []
    plain = torch.nn.CrossEntropyLoss()
    plain.register_forward_hook(lambda module, args, out: calls.append(out.item()))
    _trained(plain)
    assert len(calls) == 8  # 2 epochs x ceil(10 / 3) batches
    doubled_loss, _ = _trained(_Subclassed())
    plain_loss, _ = _trained(torch.nn.CrossEntropyLoss())
    assert doubled_loss == pytest.approx(2.0 * plain_loss, rel=0.2)
    assert doubled_loss > 1.5 * plain_loss
