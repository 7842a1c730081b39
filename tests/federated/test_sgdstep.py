"""The written-out SGD step computes exactly what torch.optim.SGD.step() computes, and steps aside otherwise."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedevents.federated.sgdstep import step_of
from fedevents.federated.training import build_optimizer

VARIANTS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "dampening": 0.3},
    {"momentum": 0.9, "nesterov": True},
    {"weight_decay": 0.01},
    {"momentum": 0.5, "weight_decay": 0.01, "maximize": True},
]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, step, steps: int = 5) -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x, y = torch.randn(8, 12, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        step()


def _groups(model: nn.Module, options: dict) -> list[dict]:
    """Two groups with their own learning rates; the last bias gets no gradient."""
    first, second = model[0], model[2]
    second.bias.requires_grad_(False)
    return [{"params": list(first.parameters()), "lr": 0.1},
            {"params": list(second.parameters()), "lr": 0.03, **options}]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: ",".join(o) or "plain")
def test_same_weights_and_state_as_torch(options):
    torch_model, our_model = _model(), _model()
    torch_opt = torch.optim.SGD(_groups(torch_model, options), lr=0.05, **options)
    our_opt = torch.optim.SGD(_groups(our_model, options), lr=0.05, **options)
    ours = step_of(our_opt)
    assert ours != our_opt.step, "a plain SGD on the CPU should take the written-out step"
    _train(torch_model, torch_opt, torch_opt.step)
    _train(our_model, our_opt, ours)
    for (name, a), b in zip(torch_model.state_dict().items(), our_model.state_dict().values()):
        assert torch.equal(a, b), name
    torch_state, our_state = torch_opt.state_dict()["state"], our_opt.state_dict()["state"]
    assert torch_state.keys() == our_state.keys()
    for key in torch_state:
        for name, value in torch_state[key].items():
            assert torch.equal(value, our_state[key][name]), (key, name)
    # The state it leaves is torch's own: torch's step continues from it to the same weights.
    _train(torch_model, torch_opt, torch_opt.step, steps=2)
    _train(our_model, our_opt, our_opt.step, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(torch_model.parameters(), our_model.parameters()))


def test_built_optimizer_takes_the_written_out_step():
    model = _model()
    optimizer = build_optimizer({"name": "sgd", "lr": 0.05, "momentum": 0.9}, model.parameters())
    assert step_of(optimizer) != optimizer.step


def test_hooks_and_schedulers_keep_torchs_step():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append(1))
    step = step_of(optimizer)
    assert step == optimizer.step
    _train(model, optimizer, step, steps=2)
    assert seen == [1, 1]
    handle.remove()

    global_handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(2))
    try:
        assert step_of(optimizer) == optimizer.step
    finally:
        global_handle.remove()

    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)  # wraps the instance's step to count its calls
    assert step_of(optimizer) == optimizer.step


def test_other_optimizers_and_options_keep_their_step():
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    assert step_of(adam) == adam.step
    foreach = torch.optim.SGD(model.parameters(), lr=0.01, foreach=True)
    assert step_of(foreach) == foreach.step

    class MySGD(torch.optim.SGD):
        pass

    mine = MySGD(model.parameters(), lr=0.01)
    assert step_of(mine) == mine.step


USERS_WRAPPER = """
import functools, sys
import torch
from fedevents.federated.sgdstep import step_of
from fedevents.federated.training import build_optimizer
model = torch.nn.Linear(4, 2)
# Built as a run builds it: in a process that has not imported dynamo, the class's step is now
# fedevents' lazy-dynamo wrapper.
optimizer = build_optimizer({"name": "sgd", "lr": 0.05}, model.parameters())
assert "torch._dynamo" not in sys.modules
original, calls = torch.optim.SGD.step, []

def counted(self, *args, **kwargs):
    calls.append(1)
    return original(self, *args, **kwargs)

torch.optim.SGD.step = functools.wraps(original)(counted)
step = step_of(optimizer)
for _ in range(3):
    model(torch.ones(1, 4)).sum().backward()
    step()
print(len(calls))
"""


def test_a_users_wrapper_around_sgd_step_is_called():
    # A fresh process: once anything has imported dynamo (this one may have), the class keeps torch's wrapper.
    done = subprocess.run([sys.executable, "-c", USERS_WRAPPER], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3"]


def test_tensor_learning_rate_steps_as_torch_does():
    torch_model, our_model = _model(), _model()
    torch_opt = torch.optim.SGD(torch_model.parameters(), lr=0.05)
    our_opt = torch.optim.SGD(our_model.parameters(), lr=0.05)
    ours = step_of(our_opt)
    for opt in (torch_opt, our_opt):
        opt.param_groups[0]["lr"] = torch.tensor(0.02)
    _train(torch_model, torch_opt, torch_opt.step)
    _train(our_model, our_opt, ours)
    assert all(torch.equal(a, b) for a, b in zip(torch_model.parameters(), our_model.parameters()))


def test_profiler_sees_the_optimizer_step():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    step = step_of(optimizer)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _train(model, optimizer, step, steps=1)
    assert any("Optimizer.step" in e.name for e in prof.events())
