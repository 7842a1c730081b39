"""Checkpoint writes: client tensors stored as compressed differences (bit-exact), written while the next
round trains, one at a time, a failed write reported at the next round's end."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

import fedevents.handlers.checkpoint as checkpoint_module
from fedevents.engine.errors import RunFailed
from fedevents.engine.events import CheckpointSaved, ExperimentFinished
from fedevents.handlers.checkpoint import load_checkpoint
from fedevents.handlers.tensorcodec import CODEC, decode, encode

from .test_checkpoint import checkpointer, pack_bytes, save

pytestmark = pytest.mark.anyio

WAIT_S = 10  # no wait in these tests may hang


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[tensor.element_size()])


def _trained(base: torch.Tensor, seed: int) -> torch.Tensor:
    """``base`` after a small update, as one local round of fine-tuning leaves a weight."""
    return base + 1e-3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_tensor_decodes_to_the_very_bits_it_was_encoded_from(dtype: torch.dtype) -> None:
    base = torch.randn(64, 100, generator=torch.Generator().manual_seed(1)).to(dtype)
    tensor = _trained(base.float(), 2).to(dtype)
    tensor[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 0.0]).to(dtype)
    for against in (base, None):
        done = encode(tensor, against)
        assert done is not None
        data, info = done
        assert info == {"codec": CODEC, "dtype": str(dtype).removeprefix("torch."), "shape": [64, 100]}
        assert data.dtype == torch.uint8 and data.numel() < tensor.numel() * tensor.element_size()
        assert torch.equal(_bits(decode(data, info, against)), _bits(tensor))


def test_a_difference_from_the_global_weight_takes_fewer_bytes_than_the_weight_alone() -> None:
    base = torch.randn(256, 256, generator=torch.Generator().manual_seed(3))
    tensor = _trained(base, 4)
    against, alone = encode(tensor, base), encode(tensor)
    assert against is not None and alone is not None
    assert against[0].numel() < 0.8 * alone[0].numel()


def test_what_does_not_pay_is_left_as_it_is() -> None:
    noise = torch.randint(0, 2**31 - 1, (4096,), dtype=torch.int32, generator=torch.Generator().manual_seed(5))
    assert encode((noise & 0x3FFFFFFF).view(torch.float32)) is None  # random bits: nothing to gain
    assert encode(torch.zeros(100)) is None  # too small to be worth a frame
    assert encode(torch.zeros(4096, dtype=torch.int64)) is None  # not floating point


def test_data_that_does_not_fit_its_description_is_refused() -> None:
    data, info = encode(torch.zeros(2048))
    with pytest.raises(ValueError, match=r"expected 16384 bytes for a float32 tensor of shape \[4096\], found 8192"):
        decode(data, {**info, "shape": [4096]})
    with pytest.raises(ValueError, match="expected zstd data"):
        decode(torch.zeros(10, dtype=torch.uint8), info)
    with pytest.raises(ValueError, match="expected a base of dtype float32 and shape"):
        decode(data, info, torch.zeros(3))


async def test_client_weights_are_stored_against_the_global_ones_and_load_bit_exact(tmp_path: Path) -> None:
    ck, fed, context = checkpointer(tmp_path)
    fed.train("a", 1.0)
    fed.clients["a"]["model"]["backbone"] = _trained(fed.server["backbone"], 6)
    await save(ck, context, 0)
    loaded = load_checkpoint(ck.directory / "round-000000.pt")
    state = loaded.federation
    client_key = next(k for k, t in loaded.tensors.items() if t is state["clients"]["a"]["model"]["backbone"])
    server_key = next(k for k, t in loaded.tensors.items() if t is state["server"]["model"]["backbone"])
    assert loaded.encoded[client_key]["base"] == server_key
    assert "base" not in loaded.encoded[server_key]
    assert torch.equal(_bits(loaded.federation["clients"]["a"]["model"]["backbone"]),
                       _bits(fed.clients["a"]["model"]["backbone"]))
    assert torch.equal(_bits(loaded.federation["server"]["model"]["backbone"]), _bits(fed.server["backbone"]))
    # Two float32 copies of the backbone would be 2 MiB; the client's difference costs much less than one.
    assert pack_bytes(ck, 0) < 1.6 * (1 << 20)


async def test_a_base_outlives_the_global_model_it_came_from(tmp_path: Path) -> None:
    ck, fed, context = checkpointer(tmp_path, keep=1)
    fed.train("a", 1.0)
    fed.clients["a"]["model"]["backbone"] = trained = _trained(fed.server["backbone"], 7)
    await save(ck, context, 0)
    fed.server["backbone"] = _trained(fed.server["backbone"], 8)  # a new global model; a did not train
    await save(ck, context, 1)
    await save(ck, context, 2)
    loaded = load_checkpoint(ck.directory / "round-000002.pt")
    assert torch.equal(_bits(loaded.federation["clients"]["a"]["model"]["backbone"]), _bits(trained))
    assert sorted(p.name for p in ck.directory.glob("round-*.pt")) == ["round-000002.pt"]


class HeldWrites:
    """Holds every manifest write in its thread until ``release``; tells when one is waiting."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.waiting, self.go = threading.Event(), threading.Event()
        real = checkpoint_module.write_atomic

        def held(path: Path, write: Any) -> None:
            if Path(path).name.startswith("round-"):
                self.waiting.set()
                assert self.go.wait(WAIT_S)
            real(path, write)

        monkeypatch.setattr(checkpoint_module, "write_atomic", held)

    def release(self) -> None:
        self.go.set()


async def test_a_checkpoint_is_written_while_the_next_round_runs_and_announced_at_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck, fed, context = checkpointer(tmp_path)
    saved: list[int] = []
    ck.bus.subscribe(CheckpointSaved, lambda ev: saved.append(ev.round))
    held = HeldWrites(monkeypatch)
    fed.train("a", 1.0)
    with anyio.fail_after(WAIT_S):
        await ck.save(context.make(checkpoint_module.RoundFinished, round=0, trained=0, failed=0, validated=0,
                                   seconds=0.0))
    # The round's end returned while its checkpoint is still being written.
    assert await anyio.to_thread.run_sync(held.waiting.wait, WAIT_S)
    assert not (ck.directory / "round-000000.pt").exists() and saved == []
    fed.train("a", 2.0)  # the next round trains meanwhile: a new state, the old one untouched
    done = anyio.Event()

    async def next_round_end() -> None:
        await ck.save(context.make(checkpoint_module.RoundFinished, round=1, trained=0, failed=0, validated=0,
                                   seconds=0.0))
        done.set()

    with anyio.fail_after(WAIT_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(next_round_end)
            await anyio.sleep(0.2)
            assert not done.is_set()  # the next round's end waits for the write in progress
            held.release()
        await ck.flush()
    assert saved == [0, 1]
    assert load_checkpoint(ck.directory / "round-000000.pt").federation["clients"]["a"]["rounds_trained"] == 1
    assert load_checkpoint(ck.directory / "round-000001.pt").federation["clients"]["a"]["rounds_trained"] == 2


async def test_the_run_waits_for_the_write_in_progress_before_its_last_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck, fed, context = checkpointer(tmp_path)
    ck.subscribe(ck.bus)
    held = HeldWrites(monkeypatch)
    fed.train("a", 1.0)
    await ck.save(context.make(checkpoint_module.RoundFinished, round=0, trained=0, failed=0, validated=0,
                               seconds=0.0))
    assert context.settle == [ck.flush]
    threading.Timer(0.2, held.release).start()
    with anyio.fail_after(WAIT_S):
        for settle in context.settle:
            await settle()
    assert (ck.directory / "round-000000.pt").exists()
    await ck._finished(context.make(ExperimentFinished, rounds=1, seconds=1.0))


async def test_a_write_that_fails_in_the_background_fails_the_next_round_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck, fed, context = checkpointer(tmp_path)
    fed.train("a", 1.0)
    await save(ck, context, 0)
    real = checkpoint_module.write_atomic

    def full(path: Path, write: Any) -> None:
        if Path(path).name == "round-000001.pt":
            raise OSError(28, "No space left on device")
        real(path, write)

    monkeypatch.setattr(checkpoint_module, "write_atomic", full)
    fed.train("a", 2.0)
    await ck.save(context.make(checkpoint_module.RoundFinished, round=1, trained=0, failed=0, validated=0,
                               seconds=0.0))
    with pytest.raises(RunFailed, match=r"could not write the checkpoint of round 1, .*round-000001.pt: No space "
                                        r"left on device; the previous checkpoint is untouched"):
        with anyio.fail_after(WAIT_S):
            await ck.save(context.make(checkpoint_module.RoundFinished, round=2, trained=0, failed=0,
                                       validated=0, seconds=0.0))
    assert sorted(p.name for p in ck.directory.glob("round-*.pt")) == ["round-000000.pt"]
    assert load_checkpoint(ck.directory / "round-000000.pt").federation["clients"]["a"]["rounds_trained"] == 1


async def test_a_tensor_changed_in_place_while_being_written_fails_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck, fed, context = checkpointer(tmp_path)
    fed.train("a", 1.0)
    gate = threading.Event()
    real = checkpoint_module.Checkpointer._stored

    def late(self: Any, *args: Any) -> Any:
        assert gate.wait(WAIT_S)
        return real(self, *args)

    monkeypatch.setattr(checkpoint_module.Checkpointer, "_stored", late)
    await ck.save(context.make(checkpoint_module.RoundFinished, round=0, trained=0, failed=0, validated=0,
                               seconds=0.0))
    fed.clients["a"]["model"]["head"].add_(1)  # a state that breaks the rule: changed in place
    gate.set()
    with pytest.raises(RunFailed, match="a tensor of its state was changed in place while it was written"):
        with anyio.fail_after(WAIT_S):
            await ck.flush()
    assert not (ck.directory / "round-000000.pt").exists()


@pytest.mark.parametrize("keep_state", [False, True])
async def test_a_checkpoint_holds_optimizer_moments_only_when_the_state_is_kept(tmp_path: Path,
                                                                                keep_state: bool) -> None:
    from fedevents.federated import Federation

    ck, _, context = checkpointer(tmp_path)
    config = {**ck.config.data, "optimizer_opts": {"name": "adam", "lr": 0.01, "weight_decay": 0.0,
                                                   "keep_state": keep_state}}
    ck.federation = Federation(config, seed=0)
    for rnd in (1, 2):
        ck.federation.train(client="client-0", task="synth", round=rnd, device="cpu", state="incremental")
    await save(ck, context, 2)
    optimizer = load_checkpoint(ck.directory / "round-000002.pt").federation["clients"]["client-0"]["optimizer"]
    if keep_state:
        assert sorted(optimizer["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    else:
        assert optimizer == {}
