"""Optimizers that import nothing of torch._dynamo until something compiles, with unchanged arithmetic.

Each check runs in a fresh interpreter: whether ``torch._dynamo`` is imported is a property of the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

# Two optimizers (SGD with momentum, Adam) and a scheduler trained for 8 steps, a state_dict round trip, then
# 8 more steps after `torch._dynamo` is imported; the weights after each half are saved to argv[1].
TRAIN = """
import sys
import torch

def train(build, steps):
    torch.manual_seed(0)
    models, optimizers = [], []
    for name in ("sgd", "adam"):
        model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
        models.append(model)
        optimizers.append(build(name, model))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(steps):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.load_state_dict(optimizer.state_dict())
    return [p.detach().clone() for model in models for p in model.parameters()]

if sys.argv[2] == "fedevents":
    from fedevents.federated.training import build_optimizer
    def build(name, model):
        opts = {"name": name, "momentum": 0.9} if name == "sgd" else {"name": name}
        return build_optimizer(opts, model.parameters())
else:
    def build(name, model):
        cls = torch.optim.SGD if name == "sgd" else torch.optim.Adam
        return cls(model.parameters(), lr=0.05, momentum=0.9) if name == "sgd" else cls(model.parameters(), lr=0.05)

before = train(build, 8)
print("dynamo before:", "torch._dynamo" in sys.modules)
import torch._dynamo
after = train(build, 8)
from torch.optim import Optimizer
cached = type(getattr(Optimizer.add_param_group.__wrapped__, "__dynamo_disable")).__name__
print("after import, add_param_group calls:", "dynamo" if cached != "_UntilDynamo" else cached)
torch.save({"before": before, "after": after}, sys.argv[1])
"""


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_run_of_the_demo_imports_neither_torch_dynamo_nor_sympy(tmp_path: Path) -> None:
    """Issue 12: the first optimizer imported torch._dynamo (1.5 s of start-up, and a slower exit), the
    meta-device model sympy (0.5 s), and the ReID data module Pillow (20 ms) for runs that read no image."""
    code = ("import sys\nfrom fedevents.cli.main import main\n"
            f"status = main(['run', {str(ROOT / 'configs/demo.yaml')!r}, '--logs-dir', 'logs', '--quiet',"
            " '--set', 'exp_opts.comm_rounds=2', '--set', 'task_opts.synthetic.samples_per_client=64'])\n"
            "print(status, [m for m in ('torch._dynamo', 'sympy', 'PIL') if m in sys.modules])\n")
    run = _python("-c", code, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "0 []"


def test_optimizers_step_exactly_as_torchs_own_before_and_after_dynamo_is_imported(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    ours = _python(str(script), str(tmp_path / "ours.pt"), "fedevents", cwd=tmp_path)
    plain = _python(str(script), str(tmp_path / "plain.pt"), "torch", cwd=tmp_path)
    assert ours.returncode == 0 and plain.returncode == 0, ours.stderr + plain.stderr
    assert ours.stdout.splitlines() == ["dynamo before: False", "after import, add_param_group calls: dynamo"]
    assert plain.stdout.splitlines() == ["dynamo before: True", "after import, add_param_group calls: dynamo"]
    mine, theirs = torch.load(tmp_path / "ours.pt"), torch.load(tmp_path / "plain.pt")
    for half in ("before", "after"):
        assert len(mine[half]) == len(theirs[half]) == 8
        assert all(torch.equal(a, b) for a, b in zip(mine[half], theirs[half])), half


def _sgd_step(optimizer_opts: dict | None = None) -> torch.optim.Optimizer:
    from fedevents.federated.training import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(optimizer_opts or {"name": "sgd", "lr": 0.1}, model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    return optimizer


def test_step_hooks_run_on_every_step_as_torch_runs_them() -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    calls = []
    optimizer = _sgd_step()
    mine = [optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre")),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))]
    every = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
             register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
    try:
        optimizer.step()
    finally:
        for handle in mine + every:
            handle.remove()
    optimizer.step()  # hooks removed: nothing more is called
    assert calls == ["global pre", "pre", "post", "global post"]


def test_a_profiler_still_sees_each_optimizer_step_under_torchs_label() -> None:
    optimizer = _sgd_step()
    optimizer.step()  # outside the profiler: no range is opened, nothing fails
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        optimizer.step()
        optimizer.step()
    names = [event.name for event in prof.events()]
    assert names.count("Optimizer.step#SGD.step") == 2
