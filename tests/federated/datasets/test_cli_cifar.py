"""The researcher's path: FedAvg on CIFAR-10-format files, Dirichlet 0.1 over 100 clients, the global model's
accuracy over 3 seeds, reported with bands — all through the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml


def fedevents(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedevents.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", MPLBACKEND="Agg"), timeout=600)


def test_fedavg_on_cifar10_files_over_three_seeds_reports_the_global_model_with_bands(tmp_path: Path, write_cifar10) -> None:
    folder = write_cifar10(per_batch=400, test=100)
    experiment = {
        "exp_name": "cifar", "exp_method": "fedavg", "datasets_dir": str(folder),
        "logs_dir": str(tmp_path / "logs"), "checkpoints_dir": str(tmp_path / "ckpts"),
        "exp_opts": {"comm_rounds": 3, "val_interval": 1, "online_clients": 10, "val_model": "global"},
        "model_opts": {"name": "cnn", "channels": [8]},
        "optimizer_opts": {"name": "sgd", "lr": 0.05},
        "task_opts": {"dataset": "cifar10", "train_epochs": 1, "batch_size": 16,
                      "image": {"partition": {"name": "dirichlet", "alpha": 0.1}}},
        "clients": {"count": 100, "tasks": ["all"]},
    }
    (tmp_path / "cifar.yaml").write_text(yaml.safe_dump(experiment))
    run = fedevents("run", "cifar.yaml", "--seeds", "0", "1", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith(": 3 runs, 0 failed")
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "logs").glob("cifar-seed*.json"))
               if not p.name.endswith(".trace.json")]
    assert [r["config"]["random_seed"] for r in records] == [0, 1, 2]
    for record in records:
        assert list(record["global"]) == ["0", "1", "2", "3"]
        assert all(0.0 <= scores["all"]["val_acc"] <= 1.0 for scores in record["global"].values())
        assert not any("val_acc" in m for c in record["data"].values() for r in c.values() for m in r.values())
    report = fedevents("report", "logs", "--out", "report", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert "report.md" in written and any("seeds" in name for name in written), written
