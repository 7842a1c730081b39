"""How the ``fedevents`` command ends: at once after its last event, with exit handlers run and output flushed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ["run", str(ROOT / "configs/demo.yaml"), "--logs-dir", "logs", "--quiet", "--set", "exp_opts.comm_rounds=1",
       "--set", "task_opts.synthetic.samples_per_client=64"]

# The command as its console script runs it (main() without arguments), with a plugin's exit handler and a
# file it never closed, a line left unflushed on stdout, and (asked) a worker thread that is still busy
# (non-daemon) when the command ends.
SCRIPT = """
import atexit, sys, threading
from fedevents.cli import main
atexit.register(lambda: print("exit handler ran", flush=True))
leaked = open("leaked.txt", "w")  # a plugin's file, written and never closed
leaked.write("kept")
if sys.argv[1] == "busy-thread":
    # Busy until the main thread has finished, as a worker that outlives the command's last line.
    threading.Thread(target=lambda: (threading.main_thread().join(60), print("thread finished"))).start()
sys.argv = ["fedevents", *sys.argv[2:]]
print("unflushed line", end="")
main()
print("never printed: main() ends the process")
"""


def _command(tmp_path: Path, mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "cmd.py").write_text(SCRIPT)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "cmd.py", mode, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_command_ends_with_its_status_after_exit_handlers_and_flushed_output(tmp_path: Path) -> None:
    run = _command(tmp_path, "plain", *RUN)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "unflushed lineexit handler ran\n"
    assert (tmp_path / "leaked.txt").read_text() == "kept"
    [path] = [p for p in (tmp_path / "logs").glob("demo-*.json") if not p.name.endswith(".trace.json")]
    record = json.loads(path.read_text())
    assert record["status"] == "finished"
    assert "experiment demo finished" in run.stderr


def test_a_bad_config_still_exits_2_through_the_same_path(tmp_path: Path) -> None:
    run = _command(tmp_path, "plain", "run", str(tmp_path / "missing.yaml"))
    assert run.returncode == 2 and run.stdout == "unflushed lineexit handler ran\n"
    assert run.stderr.startswith("fedevents: error: ") and len(run.stderr.splitlines()) == 1


def test_a_live_non_daemon_thread_is_waited_for_as_by_an_ordinary_exit(tmp_path: Path) -> None:
    run = _command(tmp_path, "busy-thread", *RUN)
    assert run.returncode == 0, run.stderr
    # As Python's own exit: the thread is joined first, then the exit handlers run.
    assert run.stdout.splitlines() == ["unflushed linethread finished", "exit handler ran"]


def test_a_profiler_around_the_command_still_gets_to_write_its_stats(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "cProfile", "-o", "run.prof", "-m", "fedevents.cli", *RUN],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run.prof").stat().st_size > 0


def test_flushing_files_at_the_end_never_reads_an_objects_class(tmp_path: Path) -> None:
    """Every live object is looked at by its own type only: an object whose ``__class__`` is a property (a
    deprecated torch object warns there) is not asked, and an open file still gets what was written to it."""
    from fedevents.cli.main import _flush_open_files

    class Watched:
        asked = 0

        @property  # type: ignore[misc]
        def __class__(self) -> type:
            Watched.asked += 1
            raise AssertionError("__class__ read")

    watched = Watched()
    with open(tmp_path / "open.txt", "w") as file:
        file.write("kept")
        _flush_open_files()
        assert (tmp_path / "open.txt").read_text() == "kept"
    assert Watched.asked == 0 and watched is not None
