"""FedSTIL's model checkpoint names: a client naming a model keeps one across its tasks; baseline without a
name keeps one per task and scores each task with that task's model (the ``sm`` and ``mm`` baselines)."""

from __future__ import annotations

from typing import Any

import torch

from fedevents.federated import Federation


def trained_on_two_tasks(fed_config: dict[str, Any], client: dict[str, Any], method: str = "baseline"):
    fed_config.update(exp_method=method, clients=[client])
    fed_config["model_opts"]["hidden"] = [8]
    fed = Federation(fed_config, seed=0)
    fed.train(client="a", task="t0", round=1, device="cpu", state="integrated")
    after_t0 = fed.store.get("a").model
    fed.train(client="a", task="t1", round=2, device="cpu", state="incremental")
    after_t1 = fed.store.get("a").model
    job = fed.val_job(client="a", tasks=["t0", "t1", "t2"], round=2, device="cpu")
    return fed, job, after_t0, after_t1


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_baseline_without_a_name_scores_each_task_with_its_own_model(fed_config: dict[str, Any]) -> None:
    fed, job, after_t0, after_t1 = trained_on_two_tasks(fed_config, {"client_name": "a", "tasks": ["t0", "t1", "t2"]})
    assert job.models is not None and not same(after_t0, after_t1)
    assert same(job.models["t0"], after_t0) and same(job.models["t1"], after_t1)
    assert same(job.models["t2"], after_t1)  # a task not reached yet: the client's latest model
    # Each task loads its own model, so a task scores the same alone or after others.
    results = fed.worker.validate(job)
    alone = fed.worker.validate(fed.val_job(client="a", tasks=["t0"], round=2, device="cpu"))
    assert results["t0"] == alone["t0"]


def test_a_named_model_is_one_model_across_tasks(fed_config: dict[str, Any]) -> None:
    client = {"client_name": "a", "tasks": ["t0", "t1"], "model_ckpt_name": "a-model"}
    _, job, _, after_t1 = trained_on_two_tasks(fed_config, client)
    assert job.models is None and same(job.model, after_t1)


def test_methods_with_one_model_per_client_ignore_the_name(fed_config: dict[str, Any]) -> None:
    _, job, _, after_t1 = trained_on_two_tasks(fed_config, {"client_name": "a", "tasks": ["t0", "t1"]}, "fedavg")
    assert job.models is None and same(job.model, after_t1)
