"""The collector around the command's runs (cli/collector.py): paused while building, blind to what was built
while an experiment runs, and handed back as it was found."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest

from fedevents.cli import main
from fedevents.cli.collector import collector_paused, frozen_heap

ROOT = Path(__file__).resolve().parents[2]


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


@pytest.fixture(autouse=True)
def collector_as_found():
    enabled, frozen = gc.isenabled(), gc.get_freeze_count()
    yield
    assert gc.isenabled() == enabled and gc.get_freeze_count() == frozen
    gc.enable() if enabled else gc.disable()


def test_paused_turns_the_collector_off_and_back_on_even_after_an_error() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), collector_paused():
        assert not gc.isenabled()
        raise RuntimeError
    assert gc.isenabled()


def test_paused_leaves_a_collector_that_was_off_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_then_freeze_freezes_what_the_block_made_before_the_collector_comes_back() -> None:
    """Regression: turned back on first, the collector at once walked the ~230,000 objects of torch's import
    (90 ms) in one young-generation collection, only to keep them all."""
    gc.enable()
    young = []
    gc.callbacks.append(lambda phase, info: young.append(gc.get_count()[0]) if phase == "start" else None)
    try:
        with collector_paused(then_freeze=True) as paused:
            made = [[i] for i in range(50_000)]
        assert gc.isenabled() and paused.froze and gc.get_freeze_count() >= len(made)
        more = [[i] for i in range(2_000)]  # enough to trigger collections of what comes after
        assert young and max(young) < 10_000
    finally:
        gc.callbacks.pop()
    paused.thaw()
    assert gc.get_freeze_count() == 0 and not paused.froze
    del made, more


def test_then_freeze_freezes_nothing_after_an_error_or_for_a_collector_that_was_off() -> None:
    gc.enable()
    with pytest.raises(RuntimeError), collector_paused(then_freeze=True) as paused:
        raise RuntimeError
    assert not paused.froze and gc.get_freeze_count() == 0 and gc.isenabled()
    gc.disable()
    try:
        with collector_paused(then_freeze=True) as paused:
            pass
        assert not paused.froze and gc.get_freeze_count() == 0 and not gc.isenabled()
    finally:
        gc.enable()


def test_what_lives_at_the_start_is_frozen_inside_and_given_back_after() -> None:
    gc.enable()
    before = Node()
    gone = weakref.ref(before)
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        del before
        gc.collect()
        assert gone() is not None  # frozen: no collection inside can free it
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert gone() is None  # handed back: the next collection frees it


def test_collect_first_frees_an_earlier_experiments_garbage_before_freezing() -> None:
    gc.enable()
    left = weakref.ref(Node())  # garbage already: a cycle nothing refers to
    with frozen_heap(collect_first=True):
        assert left() is None


def test_a_collector_that_is_off_is_not_frozen_either() -> None:
    gc.disable()
    try:
        with frozen_heap():
            assert gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_a_command_run_in_this_process_leaves_the_collector_as_it_found_it(tmp_path: Path) -> None:
    gc.enable()
    seen = []
    gc.callbacks.append(lambda phase, info: seen.append(gc.get_freeze_count()) if phase == "start" else None)
    try:
        status = main(["run", str(ROOT / "configs/demo.yaml"), "--logs-dir", str(tmp_path / "logs"), "--quiet",
                       "--set", "exp_opts.comm_rounds=2", "--set", "checkpoints_dir=" + str(tmp_path / "ck")])
    finally:
        gc.callbacks.pop()
    assert status == 0
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert seen and max(seen) > 0  # the run's collections happened with the built objects frozen
