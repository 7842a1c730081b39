"""LiveProgress: the live block's round, phases, slots, epochs and ETA; ClientWork reports epochs to it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from fedevents.engine.events import ClientDispatched, ClientFailed, RoundFinished, RoundStarted, TrainStarted
from fedevents.handlers import ClientWork
from fedevents.handlers.progress import LiveProgress

from .conftest import T0

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def screen(progress: LiveProgress) -> list[str]:
    """The block as a 100-column terminal shows it, without colours."""
    console = Console(file=io.StringIO(), width=100, color_system=None)
    console.print(progress.render())
    return [line.rstrip() for line in console.file.getvalue().splitlines()]


@pytest.fixture
def progress(bus):
    clock = Clock()
    progress = LiveProgress(io.StringIO(), clock=clock)
    progress.clock = clock  # type: ignore[attr-defined]
    progress.subscribe(bus)
    yield progress
    progress.close()


async def test_mid_round_the_block_shows_phase_counts_slots_and_epochs(progress, run) -> None:
    await run.start(rounds=4)
    await run.emit(RoundStarted, 0.25, round=1)
    await run.emit(ClientDispatched, 0.25, round=1, client="c0", task="t0", state="integrated")
    await run.emit(ClientDispatched, 0.25, round=1, client="c1", task="t0", state="integrated")
    await run.emit(TrainStarted, 0.5, round=1, client="c0", task="t0", device="cpu", slot=1, waited_s=0.25)
    progress.epoch("c0", "cpu", 1, 2, 5)  # from the training thread
    progress.clock.now = T0 + 75
    lines = screen(progress)
    assert lines[0].startswith("demo  round 1/4")
    assert lines[0].endswith("elapsed 0:01:15  ETA -")
    assert lines[1:] == [
        "  train    0/2 clients done",
        "  cpu slot 0     idle",
        "  cpu slot 1     training c0 on t0  epoch 2/5",
        "  cuda:0 slot 0  idle",
        "  cuda:0 slot 1  idle",
    ]


async def test_after_a_round_the_eta_is_the_mean_round_time_times_the_rounds_left(progress, run) -> None:
    """Round 1 takes 10 s by the display's clock and 3 of 4 rounds are left: ETA 30 s."""
    await run.start(rounds=4)
    progress.clock.now = T0 + 5
    await run.emit(RoundStarted, 0.25, round=1)
    progress.clock.now = T0 + 15
    await run.emit(RoundFinished, 4.5, round=1, trained=2, failed=0, validated=1, seconds=10.0)
    assert screen(progress)[0].endswith("elapsed 0:00:15  ETA 0:00:30")


async def test_finished_phases_are_counted_per_client(progress, run) -> None:
    await run.start(rounds=2)
    await run.round_one()
    lines = screen(progress)
    assert lines[1:3] == ["  train    2/2 clients done", "  validate 1/1 clients done"]
    assert all(line.endswith("idle") for line in lines[3:])


def test_a_run_reports_every_local_epoch_of_every_training(tmp_path: Path) -> None:
    from fedevents.cli import build_experiment

    exp = build_experiment(ROOT / "configs/demo.yaml", console=None, sinks=False, overrides=[
        f"logs_dir={tmp_path}", f"checkpoints_dir={tmp_path / 'ck'}", "exp_opts.comm_rounds=2",
        "task_opts.train_epochs=3", "task_opts.synthetic.samples_per_client=32"])
    notes: list[tuple[str, int, int]] = []
    exp.component(ClientWork).on_epoch(lambda client, device, slot, done, total: notes.append((client, done, total)))
    exp.run()
    assert len(notes) == 2 * 5 * 3  # 2 rounds x 5 online clients x 3 epochs
    by_client: dict[str, list[int]] = {}
    for client, done, total in notes:
        assert total == 3
        by_client.setdefault(client, []).append(done)
    assert all(done == [1, 2, 3] * (len(done) // 3) for done in by_client.values())


async def test_a_failed_client_counts_as_done_and_frees_its_slot(progress, run) -> None:
    await run.start(rounds=2)
    await run.emit(RoundStarted, 0.25, round=1)
    await run.emit(ClientDispatched, 0.25, round=1, client="c0", task="t0", state="integrated")
    await run.emit(TrainStarted, 0.5, round=1, client="c0", task="t0", device="cuda:0", slot=0, waited_s=0.0)
    await run.emit(ClientFailed, 1.0, round=1, client="c0", task="t0", phase="train", error_type="ValueError",
                   error="bad batch", traceback="")
    lines = screen(progress)
    assert lines[1] == "  train    1/1 clients done, 1 failed"
    assert "  cuda:0 slot 0  idle" in lines


async def test_clients_that_keep_their_scores_count_as_validated(progress, run) -> None:
    from fedevents.engine.events import ValReused

    await run.start(rounds=2)
    await run.round_one()
    await run.emit(RoundStarted, 5.0, round=2)
    await run.emit(ValReused, 5.0, round=2, clients=("c1", "c2"), scored_in=(0, 0), scores=({}, {}))
    assert "  validate 2/2 clients done" in screen(progress)
