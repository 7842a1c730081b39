"""Same config and seed, same record: whatever parallel, the number of devices, the backend or thread timing."""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from fedevents.cli import build_experiment

ROOT = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, name: str, *, backend: str = "asyncio", **sets) -> dict:
    overrides = {"exp_opts.comm_rounds": 4, "exp_opts.val_interval": 2, "exp_opts.online_clients": 6,
                 "task_opts.synthetic.samples_per_client": 64, "task_opts.synthetic.test_size": 32,
                 "logs_dir": str(tmp_path / name), "checkpoints_dir": str(tmp_path / name / "ckpts"), **sets}
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=[f"{k}={v}" for k, v in overrides.items()],
                           console=None)
    anyio.run(exp.run_async, backend=backend)
    return json.loads(exp.paths.record.read_text())


def test_parallel_1_2_and_4_give_identical_records(tmp_path: Path) -> None:
    records = {p: run(tmp_path, f"p{p}", parallel=p) for p in (1, 2, 4)}
    assert records[1]["data"] == records[2]["data"] == records[4]["data"]
    some = records[1]["data"]["client-0"]
    assert {"tr_acc", "tr_loss"} <= next(iter(v for r, v in some.items() if r != "0"))["synth"].keys()


def test_backend_and_thread_timing_do_not_change_the_record(tmp_path: Path) -> None:
    base = run(tmp_path, "asyncio", parallel=2)
    assert run(tmp_path, "trio", backend="trio", parallel=3)["data"] == base["data"]


def test_a_different_seed_gives_a_different_record(tmp_path: Path) -> None:
    assert run(tmp_path, "a", random_seed=1)["data"] != run(tmp_path, "b", random_seed=2)["data"]


def test_fedstil_gives_the_same_record_on_one_slot_and_on_three(tmp_path: Path) -> None:
    """FedSTIL traces its network with FX, which patches torch for the whole process while it runs: traced
    beside another slot's training, runs on several slots failed ("module is not installed as a submodule")."""
    records = {p: run(tmp_path, f"fedstil-p{p}", parallel=p, exp_method="fedstil") for p in (1, 3)}
    assert records[1]["status"] == records[3]["status"] == "finished"
    assert records[1]["data"] == records[3]["data"]


def test_fedstil_traces_its_network_once_per_worker_before_any_job() -> None:
    from fedevents.engine.config import load_experiments
    from fedevents.federated.worker import Worker

    (config,) = load_experiments([ROOT / "configs/demo.yaml"], overrides=["exp_method=fedstil"])
    worker = Worker(config.data, config.seed)
    network = worker._method._network
    assert network is not None and any(node.op == "call_module" for node in network.nodes)
