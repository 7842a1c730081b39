"""Flower's simulation running the side-by-side workload (needs ``pip install 'fedevents[bench]'``).

    python benchmarks/flower_sim.py PRESET MARKS_FILE [--quick] [--actors 2]

A ServerApp with Flower's FedAvg (``fraction_train`` = per_round / clients, no federated evaluation, the
global model evaluated by ``evaluate_fn`` before round 1 and after each round) and a ClientApp whose
training is workload.train, the hand-written loop's own; Ray backend, one CPU per actor, ``--actors`` CPUs.
Marks as handloop.py writes them: each training appends ``train WALL STEPS`` (the clients run in Ray's
actor processes), the server ``round R WALL ACC`` and ``end WALL``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from workload import (  # noqa: E402
    PRESETS, QUICK, Preset, build_model, client_data, evaluate, shuffling, test_data, train)

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

# The actors import this module afresh: the preset and the marks file reach them through the environment.
_PRESET_ENV, _MARKS_ENV = "FEDEVENTS_BENCH_PRESET", "FEDEVENTS_BENCH_MARKS"


def _preset() -> Preset:
    name = os.environ[_PRESET_ENV]
    quick = name.startswith("quick:")
    return (QUICK if quick else PRESETS)[name.removeprefix("quick:")]


def _mark(line: str) -> None:
    with open(os.environ[_MARKS_ENV], "a") as f:
        f.write(line + "\n")


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    preset = _preset()
    model = build_model(preset)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    client = int(context.node_config["partition-id"])
    x, y = client_data(preset, client)
    began = time.time()
    steps = train(model, preset, x, y, shuffling(preset, int(msg.content["config"]["server-round"]), client))
    _mark(f"train {began} {steps}")
    metrics = MetricRecord({"num-examples": y.numel()})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    torch.set_num_threads(1)
    preset = _preset()
    x_test, y_test = test_data(preset)
    model = build_model(preset, seed=preset.seed)

    def evaluate_global(round_: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        acc = evaluate(model, x_test, y_test)
        _mark(f"round {round_} {time.time()} {acc}")
        return MetricRecord({"accuracy": acc})

    strategy = FedAvg(fraction_train=preset.per_round / preset.clients, fraction_evaluate=0.0,
                      min_train_nodes=preset.per_round, min_available_nodes=preset.clients)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=preset.rounds,
                   evaluate_fn=evaluate_global)
    _mark(f"end {time.time()}")


def main() -> None:
    name, marks = sys.argv[1], Path(sys.argv[2]).resolve()
    actors = int(sys.argv[sys.argv.index("--actors") + 1]) if "--actors" in sys.argv else 2
    quick = "--quick" in sys.argv[3:]
    os.environ[_PRESET_ENV] = f"quick:{name}" if quick else name
    os.environ[_MARKS_ENV] = str(marks)
    # Ray's workers find this folder's modules through PYTHONPATH, which they inherit.
    here = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    torch.set_num_threads(1)
    preset = (QUICK if quick else PRESETS)[name]
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=preset.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": actors}})


if __name__ == "__main__":
    main()
