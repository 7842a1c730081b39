"""Footprint of a FedSTIL experiment: wall time, peak RSS of the process tree and checkpoint bytes.

    python benchmarks/bench_fedstil_footprint.py [--methods fedavg,fedstil] [--repeat 1] [--out FILE.json]
                                                 [--original CHECKOUT --shims DIR] [--baseline DIR]

The experiment of FedSTIL's footprint table (FEDSTIL.md section 8): 3 clients x 2 tasks, a full-width resnet18
at 64x32, 3 rounds with all clients online, validation every round, the FedSTIL defaults otherwise
(``fine_tuning: [base.layer4, classifier]``, label-smoothed cross-entropy, Adam 1e-3, one local epoch of
batches of 32, ``parallel: 1`` on the CPU, the optimizer emptied after every round as the original's is).
The data is written by ``fedevents data synth-reid`` in the FedSTIL layout: 40 identities per task (20 train,
20 query/gallery), 8 images each, 1,920 images in all.

fedevents runs it through ``fedevents run``, each method in a process of its own. With ``--original``, the
original runner (a checkout of its repository) runs the same experiment, from FedSTIL-format files written
here, next to it: ``python main.py --experiments configs/<method>.yaml`` in a scratch folder that links the
checkout's code, with ``--shims`` on PYTHONPATH (the stand-ins FEDSTIL.md section 8 lists: torchvision's
ImageFolder and transforms, offline ImageNet-shaped weights, ``torch.load(weights_only=False)``, ``np.in1d``).

With ``--baseline DIR``, an earlier fedevents runs the same experiment too, each of its runs right before the
installed one's: ``DIR`` holds its source laid out as the ``fedevents`` namespace (``DIR/fedevents/engine``, ...,
e.g. ``git archive <commit> cli engine federated handlers | tar -x -C DIR/fedevents``) and goes first on
PYTHONPATH, so before/after figures come from one run of this script, side by side.

Measured per run: wall time and CPU time (user + system, the command and the descendants it waited for) of
the command; peak RSS of the process tree (the command and all its
descendants, summed, sampled every 50 ms from /proc); bytes and files under the checkpoint folder at the end.
A method that the installed fedevents does not know is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402
from _process import run_sampled  # noqa: E402

CLIENTS, TASKS, IDS, PER_ID, SIZE, SUSTAIN = 3, 2, 40, 8, (64, 32), 2
ROUNDS = 3
NUM_CLASSES = 241  # the original uses person ids as class indices; synth-reid's run from 1 to 240
def measure(command: list[str], cwd: Path, env: dict[str, str], checkpoints: Path, log: Path) -> dict:
    """Run ``command``; give its wall time, the peak RSS of its process tree and what it checkpointed."""
    done = run_sampled(command, log, cwd=cwd, env=env, tail=2000)
    files = [p for p in checkpoints.rglob("*") if p.is_file()] if checkpoints.exists() else []
    # CPU seconds of the command and the descendants it waited for: on a shared machine wall time alone
    # measures the neighbours too.
    return {"wall_s": done.wall_s, "cpu_s": done.cpu_s, "peak_rss_mib": done.peak_rss / 2**20,
            "checkpoint_bytes": sum(p.stat().st_size for p in files), "checkpoint_files": len(files)}


def experiment_opts() -> dict:
    """The settings both runners get, in fedevents' keys."""
    return {
        "exp_opts": {"comm_rounds": ROUNDS, "val_interval": 1, "online_clients": CLIENTS},
        "model_opts": {"name": "resnet18", "num_classes": NUM_CLASSES, "last_stride": 1, "neck": "bnneck",
                       "fine_tuning": ["base.layer4", "classifier"]},
        "criterion_opts": [{"name": "cross_entropy", "epsilon": 0.1}],
        "optimizer_opts": {"name": "adam", "lr": 1.0e-3, "weight_decay": 1.0e-5},
        "scheduler_opts": {"name": "step_lr", "step_size": 5},
        "task_opts.train_epochs": 1,
        "task_opts.batch_size": 32,
        "task_opts.sustain_rounds": SUSTAIN,
    }


def run_fedevents(method: str, data: Path, work: Path, threads: int | None, source: Path | None = None) -> dict:
    # YAML, not JSON: the CLI reads values as YAML 1.1, where JSON's 1e-05 is a string.
    sets = [f"--set={key}={_flow(value)}" for key, value in experiment_opts().items()]
    # The original empties its optimizer after every round, as fedevents does for FedSTIL-format files; the
    # generated experiment file names its data set, so it says so here.
    sets.append("--set=optimizer_opts.keep_state=false")
    if threads is not None:
        sets.append(f"--set=exp_opts.torch_threads={threads}")
    # A new optimizer each round, as the original runner does and FedSTIL files say by default (the data
    # set's own experiment file is not one): Adam's moments kept would be checkpointed, the original has none.
    sets.append("--set=optimizer_opts.keep_state=false")
    folder = work / f"fedevents-{method}"
    folder.mkdir()
    command = [sys.executable, "-m", "fedevents.cli", "run", str(data / "experiment.yaml"), f"--set=exp_method={method}",
               f"--set=checkpoints_dir={folder / 'ckpts'}", f"--logs-dir={folder / 'logs'}", "--device=cpu",
               "--parallel=1", *sets]
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [env.get("PYTHONPATH")])])
    return measure(command, folder, env, folder / "ckpts", folder / "run.log")


def _flow(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("\n...\n").strip()


def run_original(method: str, data: Path, work: Path, checkout: Path, shims: Path, threads: int | None) -> dict:
    folder = work / f"original-{method}"
    (folder / "configs").mkdir(parents=True)
    for entry in checkout.iterdir():
        if entry.name not in ("configs", "ckpts", "logs", ".git"):
            (folder / entry.name).symlink_to(entry)
    (folder / "configs" / "common.yaml").write_text(yaml.safe_dump(_original_common(data)))
    (folder / "configs" / f"{method}.yaml").write_text(yaml.safe_dump(_original_experiment(method)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shims), *sys.path[1:]])}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)  # torch's intra-op pool at start
    command = [sys.executable, "main.py", "--experiments", f"configs/{method}.yaml"]
    return measure(command, folder, env, folder / "ckpts", folder / "run.log")


def _original_common(data: Path) -> dict:
    opts = experiment_opts()
    return {
        "datasets_dir": f"{data}/", "checkpoints_dir": "./ckpts/", "logs_dir": "./logs/", "parallel": 1,
        "device": ["cpu"],
        "defaults": {
            "random_seed": 123, "exp_opts": opts["exp_opts"], "model_opts": opts["model_opts"],
            "criterion_opts": {"name": "cross_entropy", "num_classes": NUM_CLASSES, "epsilon": 0.1},
            "optimizer_opts": opts["optimizer_opts"], "scheduler_opts": opts["scheduler_opts"],
            "task_opts": {
                "sustain_rounds": SUSTAIN, "train_epochs": 1,
                "augment_opts": {"level": "default", "img_size": list(SIZE), "norm_mean": [0.485, 0.456, 0.406],
                                 "norm_std": [0.229, 0.224, 0.225]},
                # The shipped context with no workers crashes the original (B1); none is given here.
                "loader_opts": {"batch_size": 32, "num_workers": 0, "pin_memory": False, "persistent_workers": False,
                                "multiprocessing_context": None},
            },
        },
    }


def _original_experiment(method: str) -> dict:
    clients = [{"client_name": f"client-{c}", "tasks": [f"client-{c}-task-{t}" for t in range(TASKS)]}
               for c in range(CLIENTS)]
    return {"exp_name": method, "exp_method": method, "server": {"server_name": "server"}, "clients": clients}


def known_methods() -> tuple[str, ...]:
    from fedevents.federated import METHODS

    return tuple(METHODS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="fedavg,fedstil")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--original", type=Path, default=None, help="a checkout of the original runner")
    parser.add_argument("--shims", type=Path, default=None, help="folder of stand-ins put on its PYTHONPATH")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an earlier fedevents' source, as DIR/fedevents/<package>, run beside this one")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both runners (default: each its own, fedevents 1, the original all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if (args.original is None) != (args.shims is None):
        parser.error("--original and --shims go together")
    results: dict = {"machine": describe(), "date": time.strftime("%Y-%m-%d"), "threads": args.threads, "runs": []}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = work / "data"
        subprocess.run([sys.executable, "-m", "fedevents.cli", "data", "synth-reid", str(data), f"--clients={CLIENTS}",
                        f"--tasks={TASKS}", f"--ids-per-task={IDS}", f"--images-per-id={PER_ID}",
                        "--img-size", str(SIZE[0]), str(SIZE[1]), f"--sustain-rounds={SUSTAIN}"],
                       check=True, capture_output=True)
        print(f"load average before: {os.getloadavg()}", flush=True)
        for method in args.methods.split(","):
            for attempt in range(args.repeat):
                runners = [("fedevents", lambda m, w: run_fedevents(m, data, w, args.threads))]
                if args.baseline is not None:
                    runners.insert(0, ("fedevents-baseline",
                                       lambda m, w: run_fedevents(m, data, w, args.threads, args.baseline)))
                if args.original is not None:
                    runners.append(
                        ("original", lambda m, w: run_original(m, data, w, args.original, args.shims, args.threads)))
                for runner, run in runners:
                    if runner.startswith("fedevents") and method not in known_methods():
                        row = {"runner": runner, "method": method, "skipped": "not in fedevents.federated.METHODS"}
                    else:
                        attempt_dir = work / f"{runner}-{method}-{attempt}"
                        attempt_dir.mkdir()
                        row = {"runner": runner, "method": method, **run(method, attempt_dir)}
                    row["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
