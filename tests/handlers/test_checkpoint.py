"""Checkpoint bytes: shared tensors stored once, unchanged client states never written again, exact reloads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fedevents.engine.bus import EventBus
from fedevents.engine.config import load_experiments
from fedevents.engine.context import RunContext
from fedevents.engine.events import ExperimentFinished, RoundFinished
from fedevents.engine.runner import online_clients
from fedevents.federated.predictions import Prediction, complement_scaled
from fedevents.handlers.checkpoint import Checkpointer, load_checkpoint
from fedevents.handlers.objects import TensorKeys

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
FROZEN = 1 << 20  # bytes of the "backbone" every state shares


class FakeFederation:
    """A server and clients whose states hold a shared frozen tensor and a small trained head each."""

    def __init__(self) -> None:
        backbone = torch.randn(FROZEN // 4, generator=torch.Generator().manual_seed(0))
        self.server = {"backbone": backbone, "head": torch.zeros(16)}
        self.clients: dict[str, dict[str, Any]] = {}

    def train(self, client: str, value: float) -> None:
        # A fresh copy of the backbone, as a worker's state_dict() clone gives: equal content, another tensor.
        self.clients[client] = {"model": {"backbone": self.server["backbone"].clone(),
                                          "head": torch.full((16,), value)},
                                "optimizer": {"state": {0: {"step": torch.tensor(value)}},
                                              "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]},
                                "rounds_trained": int(value)}

    def state_dict(self) -> dict[str, Any]:
        return {"server": {"model": dict(self.server), "extras": {}}, "clients": dict(self.clients)}


def checkpointer(tmp_path: Path, keep: int = 2) -> tuple[Checkpointer, FakeFederation, RunContext]:
    data = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    data.update(logs_dir=str(tmp_path / "logs"), checkpoints_dir=str(tmp_path / "ckpts"))
    data["exp_opts"].update(comm_rounds=5, checkpoint_keep=keep)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    (config,) = load_experiments([path])
    context = RunContext("demo-20260101-000000-abcdef", "demo")
    federation = FakeFederation()
    return Checkpointer(config, federation, EventBus(), context), federation, context


async def save(ck: Checkpointer, context: RunContext, rnd: int) -> None:
    """Take round ``rnd``'s checkpoint and wait until it is written."""
    await ck.save(context.make(RoundFinished, round=rnd, trained=0, failed=0, validated=0, seconds=0.0))
    await ck.flush()


def pack_bytes(ck: Checkpointer, rnd: int) -> int:
    path = ck.directory / "packs" / f"{rnd:06d}.pt"
    return path.stat().st_size if path.exists() else 0


async def test_a_frozen_backbone_held_by_every_client_is_stored_once(tmp_path: Path) -> None:
    ck, fed, context = checkpointer(tmp_path)
    await save(ck, context, 0)
    alone = pack_bytes(ck, 0)  # the server's backbone (compressed a little: its exponents repeat) and head
    assert 0.75 * FROZEN < alone < FROZEN
    for index, client in enumerate(["a", "b", "c"]):
        fed.train(client, float(index + 1))
    (tmp_path / "again").mkdir()
    again, _, context = checkpointer(tmp_path / "again")
    again.federation = fed
    await save(again, context, 0)
    # Four copies of the backbone (server and three clients) would be four times as much.
    assert alone < pack_bytes(again, 0) < alone + 64 * 1024


async def test_only_what_changed_since_the_last_checkpoint_is_written(tmp_path: Path) -> None:
    ck, fed, context = checkpointer(tmp_path)
    fed.train("a", 1.0)
    fed.train("b", 2.0)
    await save(ck, context, 0)
    fed.train("b", 3.0)  # a did not train: its state is the same objects as before
    await save(ck, context, 1)
    loaded = load_checkpoint(ck.directory / "round-000001.pt")
    assert pack_bytes(ck, 1) < 64 * 1024
    new = [loaded.tensors[d] for d, pack in loaded.objects.items() if pack == "000001.pt"]
    assert sorted(t.tolist() if t.dim() else [t.item()] for t in new) == [[3.0], [3.0] * 16]
    # Nothing changed: the checkpoint is a manifest alone.
    await save(ck, context, 2)
    assert pack_bytes(ck, 2) == 0


async def test_a_checkpoint_loads_back_exactly_with_its_plain_data(tmp_path: Path) -> None:
    ck, fed, context = checkpointer(tmp_path)
    fed.train("a", 1.0)
    await save(ck, context, 0)
    fed.train("a", 2.0)
    await save(ck, context, 1)
    state = load_checkpoint(ck.directory / "round-000001.pt").federation
    assert torch.equal(state["server"]["model"]["backbone"], fed.server["backbone"])
    assert torch.equal(state["clients"]["a"]["model"]["head"], torch.full((16,), 2.0))
    assert state["clients"]["a"]["optimizer"]["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.99)}]
    assert state["clients"]["a"]["rounds_trained"] == 2


async def test_old_packs_go_with_their_checkpoints_and_a_finished_run_keeps_one(tmp_path: Path) -> None:
    ck, fed, context = checkpointer(tmp_path, keep=2)
    for rnd in range(4):
        fed.train("a", float(rnd + 1))
        await save(ck, context, rnd)
    names = sorted(p.name for p in ck.directory.glob("round-*.pt"))
    assert names == ["round-000002.pt", "round-000003.pt"]
    # Round 0's pack holds the backbone both kept checkpoints use; round 1's only a replaced head.
    assert sorted(p.name for p in (ck.directory / "packs").iterdir()) == ["000000.pt", "000002.pt", "000003.pt"]
    await ck._finished(context.make(ExperimentFinished, rounds=4, seconds=1.0))
    assert sorted(p.name for p in ck.directory.glob("round-*.pt")) == ["round-000003.pt"]
    assert sorted(p.name for p in (ck.directory / "packs").iterdir()) == ["000000.pt", "000003.pt"]
    assert load_checkpoint(ck.directory / "round-000003.pt").round == 3


def test_equal_tensors_share_a_key_and_a_changed_one_gets_another() -> None:
    keys = TensorKeys()
    t = torch.arange(100.0)
    first = keys.key(t)
    assert keys.key(t.clone()) == first  # equal contents, another tensor
    assert keys.key(torch.arange(100.0) + 1) != first
    almost = t.clone()
    almost[1] = -1.0  # not among the sampled elements: equality is still checked in full
    assert keys.key(almost) != first
    t.add_(1)  # changed in place: the version counter moves, so it is looked at again
    assert keys.key(t) != first


async def test_a_spilled_client_that_did_not_train_is_not_read_back(tmp_path: Path, monkeypatch) -> None:
    from fedevents.federated.store import ClientState, ClientStore

    class StoreFederation:
        def __init__(self) -> None:
            self.store = ClientStore(max_in_memory=1, spill_dir=tmp_path / "spill")
            self.server = {"w": torch.zeros(4)}

        def put(self, client: str, value: float) -> None:
            self.store.put(client, ClientState(model={"w": torch.full((4,), value)}, optimizer={}, scheduler=None,
                                               rounds_trained=1, samples=8))

        def state_dict(self, *, clients=None) -> dict[str, Any]:
            return {"server": {"model": dict(self.server), "extras": {}}, "clients": self.store.export(clients)}

    ck, _, context = checkpointer(tmp_path)
    fed = ck.federation = StoreFederation()
    fed.put("a", 1.0)
    fed.put("b", 2.0)  # a is spilled to disk now
    await save(ck, context, 0)
    exported: list = []
    real = ClientStore.export
    monkeypatch.setattr(ClientStore, "export", lambda self, clients=None: exported.append(clients) or real(self, clients))
    fed.put("b", 3.0)
    await save(ck, context, 1)
    assert exported == [["b"]]
    state = load_checkpoint(ck.directory / "round-000001.pt").federation
    assert {c: s["model"]["w"].tolist() for c, s in state["clients"].items()} == {"a": [1.0] * 4, "b": [3.0] * 4}


async def test_a_few_small_tensors_do_not_keep_a_pack_of_dead_weights(tmp_path: Path) -> None:
    """Regression: a step counter still in use kept a 259 MiB pack of replaced weights on disk."""
    ck, fed, context = checkpointer(tmp_path, keep=1)
    await save(ck, context, 0)
    step = torch.tensor(1.0)
    random = torch.Generator().manual_seed(1)
    fed.clients["a"] = {"model": {"w": torch.randn(FROZEN // 4, generator=random)}, "optimizer": {"step": step}}
    await save(ck, context, 1)
    fed.clients["a"] = {"model": {"w": torch.randn(FROZEN // 4, generator=random)}, "optimizer": {"step": step}}
    await save(ck, context, 2)
    assert sorted(p.name for p in (ck.directory / "packs").iterdir()) == ["000000.pt", "000002.pt"]
    state = load_checkpoint(ck.directory / "round-000002.pt").federation
    assert torch.equal(state["clients"]["a"]["optimizer"]["step"], step)


async def test_entries_left_out_for_a_dispatch_load_as_the_global_models_and_a_wrong_list_is_refused(
        tmp_path: Path) -> None:
    from fedevents.engine.errors import CheckpointError

    ck, fed, context = checkpointer(tmp_path)
    fed.train("a", 1.0)
    await save(ck, context, 0)
    path = ck.directory / "round-000000.pt"
    manifest = torch.load(path, weights_only=True)
    # As a checkpoint whose next round dispatches to "a" writes it: the head left out of a's model.
    del manifest["federation"]["clients"]["a"]["model"]["head"]
    manifest["dispatched"] = {"a": ["head"]}
    torch.save(manifest, path)
    state = load_checkpoint(path).federation
    assert list(state["clients"]["a"]["model"]) == ["backbone", "head"]
    assert state["clients"]["a"]["model"]["head"] is state["server"]["model"]["head"]

    manifest["dispatched"] = {"a": ["neck"]}
    torch.save(manifest, path)
    with pytest.raises(CheckpointError, match=r"expected client state 'a' and the global model to hold the "
                                              r"entries left out for its dispatch, found them missing"):
        load_checkpoint(path)


def idle_run(tmp_path: Path, val_model: str) -> tuple[Checkpointer, Any, RunContext]:
    """A checkpointer over a real FedAvg federation (4 clients, demo's MLP, 32 samples each)."""
    from fedevents.federated.federation import Federation

    data = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    data.update(logs_dir=str(tmp_path / "logs"), checkpoints_dir=str(tmp_path / "ckpts"),
                clients={"count": 4, "tasks": ["synth"]})
    data["exp_opts"].update(comm_rounds=5, online_clients=2, val_model=val_model)
    data["task_opts"]["synthetic"].update(samples_per_client=32, test_size=8)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    (config,) = load_experiments([path])
    federation = Federation(config.data, seed=config.seed)
    context = RunContext("demo-20260101-000000-abcdef", "demo")
    return Checkpointer(config, federation, EventBus(), context), federation, context


def train(ck: Checkpointer, federation: Any, rnd: int, *clients: str) -> None:
    for client in clients:
        federation.train(client=client, task="synth", round=rnd, device="cpu",
                         state="incremental" if ck.participations.get(client) else "integrated")
        ck.participations[client] = ck.participations.get(client, 0) + 1


async def test_a_client_left_out_earlier_is_carried_without_being_exported_again(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """Under val_model global nothing reads a stored model before its client's next dispatch: every trained
    client's model is left out, and one that did not train since is not exported for the next checkpoint."""
    from fedevents.federated.store import ClientStore

    ck, fed, context = idle_run(tmp_path, "global")
    train(ck, fed, 1, "client-0", "client-1")
    await save(ck, context, 1)
    exported: list = []
    real = ClientStore.export
    monkeypatch.setattr(ClientStore, "export", lambda self, clients=None: exported.append(clients) or real(self, clients))
    train(ck, fed, 2, "client-2")
    await save(ck, context, 2)
    assert exported == [["client-2"]]
    every = sorted(fed.server_state())
    manifest = torch.load(ck.directory / "round-000002.pt", weights_only=True)
    assert manifest["dispatched"] == {"client-0": every, "client-1": every, "client-2": every}
    loaded = load_checkpoint(ck.directory / "round-000002.pt").federation
    glob = loaded["server"]["model"]
    for client in ("client-0", "client-1", "client-2"):
        model = loaded["clients"][client]["model"]
        assert list(model) == list(glob) and all(model[name] is glob[name] for name in glob)
        # What the model does not hold is kept: the momentum buffers and the counters.
        assert loaded["clients"][client]["optimizer"]["state"]
        assert loaded["clients"][client]["rounds_trained"] == 1


async def test_a_client_that_sits_out_and_is_scored_keeps_its_model(tmp_path: Path) -> None:
    """Under val_model both a client that sits out the next round is scored with its stored model."""
    ck, fed, context = idle_run(tmp_path, "both")
    train(ck, fed, 1, "client-0", "client-1", "client-2", "client-3")
    await save(ck, context, 1)
    manifest = torch.load(ck.directory / "round-000001.pt", weights_only=True)
    # Only the clients round 2 samples lose what their dispatch replaces.
    assert set(manifest["dispatched"]) == set(online_clients(ck.config, 2))
    loaded = load_checkpoint(ck.directory / "round-000001.pt").federation
    for client, state in fed.store.export().items():
        model = loaded["clients"][client]["model"]
        assert all(torch.equal(model[name], state["model"][name]) for name in state["model"]) == (
            client not in manifest["dispatched"])


class PredictingFederation(FakeFederation):
    """A server whose adaptive layer's ``A`` is ``(1 - a) G`` and whose extras hold a client's ``theta`` close
    to ``G``, as FedSTIL's are, with the predictions FedSTIL declares for them."""

    def __init__(self, predictions: dict[tuple[str, ...], Prediction] | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        g = torch.randn(256, 64, generator=gen) * 0.05
        a = torch.full((64,), 0.8)
        self.server.update({"l.G": g, "l.a": a, "l.A": complement_scaled(a, g)})
        self.theta = {"c": {"l": g + torch.randn(256, 64, generator=gen) * 1e-4}}
        self._predictions = predictions if predictions is not None else {
            ("server", "model", "l.A"): Prediction("complement-scaled", (("server", "model", "l.a"),
                                                                         ("server", "model", "l.G"))),
            ("server", "extras", "theta", "c", "l"): Prediction("same", (("server", "model", "l.G"),)),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "server": {"model": dict(self.server), "extras": {"theta": self.theta}}}

    def predictions(self) -> dict[tuple[str, ...], Prediction]:
        return self._predictions


def _bits(tensor: torch.Tensor) -> list[int]:
    return tensor.contiguous().view(torch.int32).reshape(-1).tolist()


def _encoded_bytes(ck: Checkpointer, rnd: int, key: str) -> int:
    stored = torch.load(ck.directory / "packs" / f"{rnd:06d}.pt", weights_only=True)
    return stored[key].numel() * stored[key].element_size()


async def test_tensors_a_method_predicts_are_stored_as_their_difference_and_load_bit_for_bit(tmp_path: Path) -> None:
    ck, _, context = checkpointer(tmp_path)
    fed = ck.federation = PredictingFederation()
    await save(ck, context, 0)
    manifest = torch.load(ck.directory / "round-000000.pt", weights_only=True)
    server = manifest["federation"]["server"]
    a_key, g_key = server["model"]["l.A"]["@tensor"], server["model"]["l.G"]["@tensor"]
    theta_key = server["extras"]["theta"]["c"]["l"]["@tensor"]
    assert manifest["encoded"][a_key]["derived"] == {"rule": "complement-scaled",
                                                     "from": [server["model"]["l.a"]["@tensor"], g_key]}
    assert manifest["encoded"][theta_key]["base"] == g_key
    # A equals its prediction: its 64 KiB are all-zero byte planes once XORed. theta keeps only its low bits.
    assert _encoded_bytes(ck, 0, a_key) < 200
    assert _encoded_bytes(ck, 0, theta_key) < 0.75 * _encoded_bytes(ck, 0, g_key)
    state = load_checkpoint(ck.directory / "round-000000.pt").federation["server"]
    for name in ("l.G", "l.a", "l.A"):
        assert _bits(state["model"][name]) == _bits(fed.server[name])
    assert _bits(state["extras"]["theta"]["c"]["l"]) == _bits(fed.theta["c"]["l"])


async def test_a_prediction_that_would_need_the_tensor_itself_is_dropped(tmp_path: Path) -> None:
    ck, _, context = checkpointer(tmp_path)
    looped = {("server", "model", "l.A"): Prediction("complement-scaled", (("server", "model", "l.a"),
                                                                         ("server", "model", "l.A")))}
    fed = ck.federation = PredictingFederation(looped)
    await save(ck, context, 0)
    manifest = torch.load(ck.directory / "round-000000.pt", weights_only=True)
    a_key = manifest["federation"]["server"]["model"]["l.A"]["@tensor"]
    assert "derived" not in manifest["encoded"].get(a_key, {})
    state = load_checkpoint(ck.directory / "round-000000.pt").federation["server"]
    assert _bits(state["model"]["l.A"]) == _bits(fed.server["l.A"])


async def test_a_prediction_rule_this_fedevents_does_not_know_is_refused_in_one_line(tmp_path: Path) -> None:
    from fedevents.engine.errors import CheckpointError

    ck, _, context = checkpointer(tmp_path)
    ck.federation = PredictingFederation()
    await save(ck, context, 0)
    path = ck.directory / "round-000000.pt"
    manifest = torch.load(path, weights_only=True)
    a_key = manifest["federation"]["server"]["model"]["l.A"]["@tensor"]
    manifest["encoded"][a_key]["derived"]["rule"] = "cubed"
    torch.save(manifest, path)
    with pytest.raises(CheckpointError, match=r"expected tensor \w+ to decode, found: expected a prediction rule "
                                              r"in \['complement-scaled', 'same'\], found 'cubed'$"):
        load_checkpoint(path)


async def test_the_last_checkpoint_leaves_no_pack_that_is_mostly_dead(tmp_path: Path) -> None:
    ck, fed, context = checkpointer(tmp_path, keep=1)
    random = torch.Generator().manual_seed(2)
    x = torch.randn(FROZEN // 4, generator=random)
    for rnd in (0, 1, 2, 5):  # comm_rounds is 5: round 5 is the run's last checkpoint
        fed.clients["a"] = {"model": {"x": x, "y": torch.randn(FROZEN // 4, generator=random)}}
        await save(ck, context, rnd)
        packs = sorted(p.name for p in (ck.directory / "packs").iterdir())
        if rnd == 2:
            # Mid-run, round 0's pack stays for the backbone and x, two thirds of it (y of round 0 is dead).
            assert packs == ["000000.pt", "000002.pt"]
    # The last checkpoint moved them into its own pack: what stays on disk is what it holds.
    assert packs == ["000005.pt"]
    state = load_checkpoint(ck.directory / "round-000005.pt").federation
    assert _bits(state["clients"]["a"]["model"]["x"]) == _bits(x)


def test_a_checkpoint_from_before_a_key_existed_resumes_with_the_key_at_its_old_behaviour(tmp_path: Path) -> None:
    """exp_opts.precision came after checkpoints did: a checkpoint whose config lacks it was trained in fp32,
    so a resume in fp32 is the same run and one in bf16 is not."""
    from fedevents.engine.errors import CheckpointError
    from fedevents.engine.events import json_safe
    from fedevents.handlers.checkpoint import ADDED_KEYS, Checkpoint, check_resumable

    assert ADDED_KEYS["exp_opts.precision"] == "fp32"
    path = tmp_path / "exp.yaml"
    path.write_text((ROOT / "configs/demo.yaml").read_text())
    (config,) = load_experiments([path])
    older = json_safe(config.data)
    del older["exp_opts"]["precision"]
    checkpoint = Checkpoint(tmp_path / "round-000003.pt", "demo-20260101-000000-abcdef", 3, older, {}, {})
    check_resumable(checkpoint, config)
    (bf16,) = load_experiments([path], overrides=["exp_opts.precision=bf16"])
    with pytest.raises(CheckpointError, match=r"changed config: exp_opts.precision differs from the checkpoint"):
        check_resumable(checkpoint, bf16)
