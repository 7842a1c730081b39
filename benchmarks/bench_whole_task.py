"""Methods that look at a whole task, at Market-1501 size: peak RSS and seconds per local round, two code versions.

    python benchmarks/bench_whole_task.py --before DIR [--data DIR] [--methods fedstil,icarl,ewc]
                                          [--width 8] [--out FILE.json]

FedSTIL computes prototypes of its whole task, iCaRL herds exemplars of the task it finished, EWC measures
importances on it. This runs one client through two Market-sized tasks (the task of
``bench_reid_data.py``, 12,936 train images of 751 people at 128x64, and a second one of the same size):
round 1 trains on the first, round 2 switches to the second, so iCaRL and EWC then go over the whole first
task. Each (method, version) runs in a fresh process, the versions one after the other per method, so they
share the machine's load; ``--before`` is a checkout of the code to compare with (e.g. ``git worktree add``
of an older commit), imported in place of this one.

The model is a resnet18 at ``--width`` (64 is the standard width; the default 8 keeps a round to minutes on a
CPU) fine-tuning ``base.layer4`` and the classifier, as FedSTIL's experiment files do; one epoch of batches
of 64, augmentation ``none``, 1 torch thread; FedSTIL's exemplar budgets (``lambda_k`` 18000, iCaRL's
``memory_size`` 12000). Peak RSS is the process's ``ru_maxrss``; it includes the two
decoded 8-bit train splits (303 MiB each), which both versions hold. EWC's per-sample Fisher over the
whole first task is the slow part of its round 2: over 20 minutes on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402
from bench_reid_data import TASK, write_task  # noqa: E402

SECOND = f"{TASK}-b"
#: The exemplar budgets of FedSTIL's experiment files (its ``lambda_k`` and iCaRL's ``k``).
OPTIONS = {"fedstil": "{lambda_k: 18000}", "icarl": "{memory_size: 12000}"}
PACKAGES = ("engine", "federated", "handlers", "cli")


def write_tasks(root: Path) -> None:
    """The Market-sized task and a second one under another name (the same files, decoded on their own)."""
    write_task(root)
    if not (root / SECOND).exists():
        (root / SECOND).symlink_to(root / TASK, target_is_directory=True)


def experiment(root: Path, method: str, width: int) -> str:
    return f"""\
exp_name: whole-task
exp_method: {method}
method_opts: {OPTIONS.get(method, "{}")}
datasets_dir: {root}
random_seed: 1
exp_opts: {{comm_rounds: 2, val_interval: 1, online_clients: 1}}
model_opts: {{name: resnet18, last_stride: 1, neck: bnneck, num_classes: 1502, width: {width},
              fine_tuning: [base.layer4, classifier]}}
criterion_opts: [{{name: cross_entropy, epsilon: 0.1}}]
optimizer_opts: {{name: adam, lr: 0.00035, weight_decay: 0.0005}}
scheduler_opts: {{name: step_lr, step_size: 20, gamma: 0.5}}
task_opts:
  dataset: reid
  sustain_rounds: 1
  train_epochs: 1
  batch_size: 64
  augment_opts: {{level: none, img_size: [128, 64]}}
clients:
- client_name: c
  tasks: [{TASK}, {SECOND}]
"""


def child(root: Path, method: str, width: int) -> dict:
    """Two local rounds of ``method`` in this process (the version on sys.path): seconds each, peak RSS."""
    import torch

    torch.set_num_threads(1)
    from fedevents.engine.config import load_experiment
    from fedevents.federated import Federation

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "experiment.yaml"
        path.write_text(experiment(root, method, width))
        config = dict(load_experiment(path).data)
    fed = Federation(config, seed=1)
    seconds = []
    for rnd, task in ((1, TASK), (2, SECOND)):
        start = time.perf_counter()
        fed.train(client="c", task=task, round=rnd, device="cpu", state="integrated" if rnd == 1 else "incremental")
        seconds.append(time.perf_counter() - start)
        fed.upload(client="c", round=rnd)
        fed.aggregate(round=rnd, clients=["c"])
    exemplars = fed.store.get("c").memory.get("exemplar_x")
    return {"round_s": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "exemplars_mib": 0.0 if exemplars is None else exemplars.nbytes / 2**20}


def shim(checkout: Path, into: Path) -> Path:
    """A folder that imports ``checkout``'s subpackages as ``fedevents.*``, ahead of the installed ones."""
    package = into / "fedevents"
    package.mkdir(parents=True)
    (package / "__init__.py").touch()
    for name in PACKAGES:
        (package / name).symlink_to(checkout.resolve() / name, target_is_directory=True)
    return into


def run(version: str, pythonpath: str | None, root: Path, method: str, width: int) -> dict:
    env = {**os.environ, "MKL_CBWR": "AUTO,STRICT", "OMP_NUM_THREADS": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, __file__, "--child", method, "--data", str(root), "--width", str(width)],
                         env=env, capture_output=True, text=True, check=True)
    return {"method": method, "version": version, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--methods", default="fedstil,icarl,ewc")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.data, args.child, args.width)))
        return
    if args.before is None:
        parser.error("--before: expected a checkout of the code to compare with")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data if args.data is not None else Path(scratch) / "data"
        root.mkdir(parents=True, exist_ok=True)
        write_tasks(root)
        before = str(shim(args.before, Path(scratch) / "before"))
        results = {"machine": describe(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "load_start": os.getloadavg(), "width": args.width, "runs": []}
        for method in args.methods.split(","):
            for version, path in (("before", before), ("after", None)):
                results["runs"].append(run(version, path, root, method, args.width))
                print(json.dumps(results["runs"][-1]), flush=True)
        results["load_end"] = os.getloadavg()
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
