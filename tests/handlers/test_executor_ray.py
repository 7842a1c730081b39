"""The Ray executor on a two-node cluster on this machine, on a private local Ray, and through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from fedevents.cli import build_experiment  # noqa: E402
from fedevents.engine import read_events  # noqa: E402
from fedevents.engine.errors import ConfigError, DeviceError, Interrupted, RunFailed  # noqa: E402
from fedevents.engine.events import ClientFailed, ExperimentFinished, TrainDone, TrainStarted  # noqa: E402
from fedevents.engine.testing import EventRecorder  # noqa: E402
from fedevents.handlers.executors.ray_cluster import check_options, places  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs/demo.yaml"
# Ray rewrites 127.0.0.1 to the machine's external address; 127.0.0.2 keeps every node on loopback.
NODE = dict(num_cpus=1, node_ip_address="127.0.0.2", object_store_memory=80 * 2**20)
# A dead node is noticed within about a second instead of the default fifteen.
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
               "health_check_failure_threshold": 2}


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A temp dir with a short path: Ray's socket paths under it must stay within 107 bytes."""
    tmp = tempfile.mkdtemp(prefix="fe-ray-", dir="/tmp")
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two Ray nodes of one CPU each on 127.0.0.2, with a short temp dir (socket paths are capped); started
    once for this file, and stopped after it so that the rest of the suite has the cores back."""
    tmp = tempfile.mkdtemp(prefix="fe-ray-", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    cluster = Cluster(initialize_head=True, head_node_args=dict(NODE, _system_config=FAST_HEALTH))
    try:
        cluster.add_node(**NODE)
        cluster.wait_for_nodes(timeout=60)
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved


def small(tmp_path: Path, **extra: Any) -> list[str]:
    sets = {"exp_opts.comm_rounds": 3, "exp_opts.val_interval": 2, "task_opts.synthetic.samples_per_client": 48,
            "task_opts.synthetic.test_size": 24, "logs_dir": str(tmp_path / "logs"),
            "checkpoints_dir": str(tmp_path / "ckpts"), **extra}
    return [f"{k}={v}" for k, v in sets.items()]


def run(tmp_path: Path, **extra: Any) -> tuple[dict, list]:
    """Run the shrunk demo in-process; its record and every event."""
    exp = build_experiment(DEMO, overrides=small(tmp_path, **extra), console=None)
    events = EventRecorder(exp.bus)
    exp.run(handle_signals=False)
    return json.loads(exp.paths.record.read_text()), events.events


@pytest.mark.slow  # Ray nodes and actors started and stopped: run by CI (`make test-slow`), not by `make test`
def test_two_node_record_equals_the_thread_executors_to_the_last_digit(cluster: Cluster, tmp_path: Path) -> None:
    on_ray, events = run(tmp_path / "ray", executor="ray", parallel=1, **{"ray.address": cluster.address})
    on_thread, _ = run(tmp_path / "thread")
    assert on_ray["data"] == on_thread["data"]
    assert on_ray["comm"] == on_thread["comm"]
    # Both nodes share 127.0.0.2, so a device is named by address and node id; both nodes trained.
    names = {f"127.0.0.2-{node.node_id[:8]}/cpu" for node in cluster.list_all_nodes()}
    assert {e.device for e in events if isinstance(e, TrainDone)} == names
    assert not ray.is_initialized()  # the driver disconnected; the cluster it joined runs on
    assert cluster.remaining_processes_alive()


TWO_LAYER = '''
import math
from torch import nn

class TwoLayer(nn.Module):
    defaults = {"hidden": 16}
    def __init__(self, input_shape, num_classes, hidden=16):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)
    def forward(self, x):
        return self.head(self.body(x))
'''


def test_a_model_in_a_file_next_to_the_config_runs_on_ray_actors(cluster: Cluster, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "ray_two_layer.py").write_text(TWO_LAYER)
    (folder / "exp.yaml").write_text(DEMO.read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the actors find the module by the config's folder, not the working one
    # (before the test that kills a node: a run started just after it may still see that node)
    monkeypatch.delitem(sys.modules, "ray_two_layer", raising=False)
    model = {"model_opts.name": "ray_two_layer:TwoLayer", "model_opts.hidden": 8}
    overrides = small(tmp_path / "ray", executor="ray", parallel=1, **{"ray.address": cluster.address}, **model)
    exp = build_experiment(folder / "exp.yaml", overrides=overrides, console=None)
    exp.run(handle_signals=False)
    on_ray = json.loads(exp.paths.record.read_text())
    on_thread, _ = run(tmp_path / "thread", **model)
    assert on_ray["status"] == "finished"
    assert on_ray["data"] == on_thread["data"]


@pytest.mark.slow  # Ray nodes and actors started and stopped: run by CI (`make test-slow`), not by `make test`
def test_a_node_killed_mid_round_fails_its_clients_and_the_run_finishes(cluster: Cluster, tmp_path: Path) -> None:
    doomed = cluster.add_node(**NODE)
    cluster.wait_for_nodes(timeout=60)
    name = f"127.0.0.2-{doomed.node_id[:8]}/cpu"
    # Clients' own validation only: the global model's is one job, and on the dead node it would fail the run.
    exp = build_experiment(DEMO, overrides=small(tmp_path, executor="ray", parallel=1, **{
        "ray.address": cluster.address, "exp_opts.failure_policy": "tolerate", "exp_opts.val_model": "local"}),
        console=None)
    assert name in exp.pool.devices and len(exp.pool.devices) == 3
    events = EventRecorder(exp.bus)

    def kill(ev: TrainStarted) -> None:
        if ev.round == 2 and ev.device == name and doomed in cluster.worker_nodes:
            cluster.remove_node(doomed)

    exp.bus.subscribe(TrainStarted, kill)
    exp.run(handle_signals=False)
    failed = [e for e in events.events if isinstance(e, ClientFailed)]
    started_on = {(e.round, e.client): e.device for e in events.events if isinstance(e, TrainStarted)}
    assert failed and all(started_on[(e.round, e.client)] == name for e in failed if e.phase == "train")
    assert {e.error_type for e in failed} == {"WorkerLost"}
    assert isinstance(events.events[-1], ExperimentFinished)
    record = json.loads(exp.paths.record.read_text())
    assert record["status"] == "finished" and record["last_round"] == 3


def test_a_timed_out_job_is_ended_by_killing_its_actor_after_the_grace(cluster: Cluster, tmp_path: Path) -> None:
    # Each client's training would take many minutes; the run must end within seconds all the same.
    exp = build_experiment(DEMO, overrides=small(tmp_path, executor="ray", parallel=1, **{
        "ray.address": cluster.address, "ray.stop_grace_s": 1.0, "exp_opts.client_timeout_s": 1.0,
        "exp_opts.comm_rounds": 1, "exp_opts.failure_policy": "tolerate", "clients.count": 2,
        "exp_opts.online_clients": 2, "task_opts.train_epochs": 100000}), console=None)
    events = EventRecorder(exp.bus)
    with pytest.raises(RunFailed):
        exp.run(handle_signals=False)
    failed = [e for e in events.events if isinstance(e, ClientFailed) and e.phase == "train"]
    assert sorted((e.client, e.error_type) for e in failed) == [(c, "ClientTimeout") for c in exp.config.clients.names]
    assert not ray.is_initialized()


def test_a_device_no_node_has_is_refused_before_the_run(cluster: Cluster, tmp_path: Path) -> None:
    with pytest.raises(DeviceError) as caught:
        build_experiment(DEMO, overrides=small(tmp_path, executor="ray", device="['cpu', 'cuda:3']",
                                               **{"ray.address": cluster.address}), console=None)
    assert str(caught.value) == (f"{DEMO}: device: device 'cuda:3': expected a device some node of the Ray cluster "
                                 f"has (cpu on 2 alive node(s)), found none")
    assert not ray.is_initialized()
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow  # Ray nodes and actors started and stopped: run by CI (`make test-slow`), not by `make test`
def test_cli_runs_the_demo_on_a_private_ray_and_leaves_no_ray_process(cluster: Cluster, tmp_path: Path,
                                                                      short_tmp: str) -> None:
    tmp = short_tmp
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "fedevents.cli", "run", str(DEMO), "--executor", "ray", "--logs-dir", "logs",
         *[a for kv in small(tmp_path, parallel=1, **{"ray.tmpdir": tmp, "ray.num_cpus": 1}) for a in ("--set", kv)]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "experiment demo finished" in done.stderr
    (events_file,) = (tmp_path / "logs").glob("*.events.jsonl")
    devices = {e.get("device") for e in read_events(events_file)} - {None}
    assert devices == {"cpu"}  # its own one-node Ray, not the test cluster that also runs on this machine
    assert survivors(processes_under(tmp)) == set()
    assert cluster.remaining_processes_alive()


def test_ctrl_c_stops_a_private_ray_run_and_leaves_no_ray_process(tmp_path: Path, short_tmp: str) -> None:
    tmp = short_tmp
    exp = build_experiment(DEMO, overrides=small(tmp_path, executor="ray", parallel=1, **{"ray.tmpdir": tmp}), console=None)
    alive_during: list[int] = []
    titles: list[str] = []

    def interrupt(ev: TrainStarted) -> None:
        if ev.round == 2 and not alive_during:
            alive_during.extend(processes_under(tmp))
            titles.extend(_title(pid) for pid in alive_during)
            os.kill(os.getpid(), signal.SIGINT)

    exp.bus.subscribe(TrainStarted, interrupt)
    with pytest.raises(Interrupted, match="interrupted by SIGINT in round 2"):
        exp.run()
    assert any(t.startswith("ray::_Host") for t in titles)  # the private Ray and its actor ran ...
    assert survivors(set(alive_during)) == set()  # ... and nothing of it outlives the run
    assert not ray.is_initialized()


def processes_under(folder: str) -> set[int]:
    """Ids of the processes whose command line names ``folder`` (a Ray's daemons do), with their descendants
    (the workers, whose titles Ray rewrites)."""
    parents: dict[int, int] = {}
    named: set[int] = set()
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            stat = (entry / "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                continue  # a zombie has ended; only its parent has not read its status yet
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            if folder in (entry / "cmdline").read_bytes().decode(errors="replace"):
                named.add(int(entry.name))
        except OSError:
            continue
    found, grew = set(named), True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        found |= more
        grew = bool(more)
    return found


def survivors(pids: set[int], within_s: float = 10.0) -> set[int]:
    """Those of ``pids`` still running after up to ``within_s`` (workers exit shortly after their raylet)."""
    deadline = time.monotonic() + within_s
    while True:
        alive = {pid for pid in pids if _running(pid)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def node(ip: str, node_id: str, cpus: int = 2, gpus: int = 0, alive: bool = True) -> dict:
    """A node as ``ray.nodes()`` describes it."""
    resources = {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}
    return {"NodeID": node_id, "NodeManagerAddress": ip, "Alive": alive, "Resources": resources}


def test_device_names_are_plain_on_one_node_and_carry_the_node_on_several() -> None:
    one = places([node("10.0.0.5", "aa" * 28, gpus=2)], ["cuda:1", "cpu"], "x.yaml: device")
    assert [(p.name, p.device, p.local) for p in one] == [("cuda:1", "cuda:1", "cuda:0"), ("cpu", "cpu", "cpu")]
    nodes = [node("10.0.0.6", "bb" * 28, gpus=1), node("10.0.0.5", "cc" * 28, gpus=1),
             node("10.0.0.7", "dd" * 28, gpus=4, alive=False)]
    assert [p.name for p in places(nodes, ["cuda"], "x.yaml: device")] == ["10.0.0.5/cuda:0", "10.0.0.6/cuda:0"]
    shared = [node("127.0.0.2", "ee" * 28), node("127.0.0.2", "ff" * 28)]
    assert [p.name for p in places(shared, ["cpu"], "x.yaml: device")] == ["127.0.0.2-eeeeeeee/cpu",
                                                                           "127.0.0.2-ffffffff/cpu"]


@pytest.mark.parametrize(("opts", "message"), [
    ({"address": "my cluster"}, "x.yaml: ray.address: expected 'local', 'auto' or 'HOST:PORT', found 'my cluster'"),
    ({"address": "auto", "num_cpus": 4}, "x.yaml: ray.num_cpus: expected only with ray.address: local (a running "
                                         "cluster keeps the sizes it was started with), found 4 with address 'auto'"),
])
def test_bad_ray_options_are_one_line(opts: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_options(opts, "x.yaml: ray")
    assert str(caught.value) == message


def test_an_address_nothing_answers_at_is_refused_at_once(tmp_path: Path) -> None:
    with pytest.raises(DeviceError) as caught:
        build_experiment(DEMO, overrides=small(tmp_path, executor="ray", **{"ray.address": "127.0.0.3:1"}),
                         console=None)
    assert str(caught.value) == (f"{DEMO}: ray.address: expected a running Ray cluster at '127.0.0.3:1', found "
                                 f"nothing answering there ([Errno 111] Connection refused)")
    assert not ray.is_initialized()

