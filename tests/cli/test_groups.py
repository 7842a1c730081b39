"""Seeds and sweeps: one run per combination, a shared group id, failures counted and not contagious."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedevents.cli.groups import Variant, expand, split_values
from fedevents.engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_seeds_and_sweeps_expand_to_their_product_in_the_order_given() -> None:
    variants = expand([0, 1], ["optimizer_opts.lr=0.1,0.01"])
    assert [v.suffix for v in variants] == ["seed0-lr0.1", "seed0-lr0.01", "seed1-lr0.1", "seed1-lr0.01"]
    assert variants[1] == Variant("seed0-lr0.01", (("--seeds", "random_seed=0"),
                                                   ("--sweep optimizer_opts.lr", "optimizer_opts.lr=0.01")))
    assert expand(None, []) == []


def test_sweep_values_keep_commas_inside_lists_and_names_stay_safe() -> None:
    assert split_values("[64, 64],[128],'a,b'") == ["[64, 64]", "[128]", "'a,b'"]
    (first, second) = expand(None, ["model_opts.hidden=[64, 64],[128]"])
    assert (first.suffix, second.suffix) == ("hidden_64_64_", "hidden_128_")


@pytest.mark.parametrize(("seeds", "sweeps", "message"), [
    ([1, 1], [], "--seeds: expected distinct seeds, found [1, 1]"),
    (None, ["optimizer_opts.lr"], "--sweep optimizer_opts.lr: expected KEY.PATH=VALUE,VALUE,..., found no '=' or no values"),
    (None, ["optimizer_opts.lr=0.1,0.1"], "--sweep optimizer_opts.lr: expected distinct values, found ['0.1', '0.1']"),
])
def test_bad_seeds_and_sweeps_are_one_line_errors(seeds, sweeps, message) -> None:
    with pytest.raises(ConfigError) as info:
        expand(seeds, sweeps)
    assert str(info.value) == message


def test_a_failing_run_does_not_stop_its_group_and_the_last_line_counts_the_failures(tmp_path: Path) -> None:
    (tmp_path / "explode.py").write_text(
        "from fedevents.engine import ClientDispatched, ExperimentStarted\n"
        "class Explode:\n"
        "    seed = None\n"
        "    def subscribe(self, bus):\n"
        "        def started(ev):\n"
        "            self.seed = ev.seed\n"
        "        async def boom(ev):\n"
        "            if self.seed == 1:\n"
        "                raise RuntimeError('seed 1 fails')\n"
        "        return [bus.subscribe(ExperimentStarted, started), bus.subscribe(ClientDispatched, boom, work=True)]\n"
    )
    data = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    data.update(logs_dir=str(tmp_path / "logs"), checkpoints_dir=str(tmp_path / "ckpts"), handlers=["explode:Explode"])
    data["exp_opts"].update(comm_rounds=2)
    data["task_opts"]["synthetic"].update(samples_per_client=32, test_size=16)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    run = subprocess.run([sys.executable, "-m", "fedevents.cli", "run", str(tmp_path / "exp.yaml"), "--seeds", "0", "1", "2"],
                         cwd=tmp_path, env=dict(os.environ, PYTHONWARNINGS="ignore"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1, run.stderr
    records = {}
    for path in (tmp_path / "logs").glob("*.json"):
        if not path.name.endswith(".trace.json"):
            record = json.loads(path.read_text())
            records[record["config"]["exp_name"]] = record
    assert sorted(records) == ["demo-seed0", "demo-seed1", "demo-seed2"]
    assert {name: r["status"] for name, r in records.items()} == {
        "demo-seed0": "finished", "demo-seed1": "failed", "demo-seed2": "finished"}
    assert [r["config"]["random_seed"] for _, r in sorted(records.items())] == [0, 1, 2]
    groups = {r["config"]["group"] for r in records.values()}
    assert len(groups) == 1
    assert run.stderr.strip().splitlines()[-1] == f"fedevents: group {groups.pop()}: 3 runs, 1 failed: demo-seed1"
