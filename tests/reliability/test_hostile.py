"""Hostile input: bad files, flags, checkpoints and disks, each handed to `fedevents run` as a user would.

Every case runs in a project folder that already holds an earlier finished run (record, logs, trace and
checkpoints). Bad input must end with one line `fedevents: error: <where>: <expected, found>`, exit status
2, no traceback, and the project byte for byte as it was. A failure after the run started (a full disk)
exits 1 with one clear last line and leaves every earlier file intact. The bad experiment files are real
files in hostile/, one per case; checkpoints and disks are damaged here, in tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import traceback
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pytest
import torch

from fedevents.cli import main
from fedevents.handlers.checkpoint import load_checkpoint

HOSTILE = Path(__file__).with_name("hostile")

#: The earlier run every case finds in its project folder; relative dirs, so the folder can be copied.
EARLIER = """\
exp_name: hostile
exp_method: fedavg
exp_opts: {comm_rounds: 2}
model_opts: {hidden: [16]}
task_opts: {synthetic: {samples_per_client: 32, test_size: 16}}
clients: {count: 3, tasks: [synth]}
"""

#: Continue the earlier, finished run for two more rounds: the usual reason to resume a finished run.
RESUME = ("experiment.yaml", "--resume", "--set", "exp_opts.comm_rounds=4")


# --- the earlier run and the project folder -------------------------------------------------------------


@pytest.fixture(scope="session")
def earlier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder with one finished run of experiment.yaml under logs/ and ckpts/."""
    folder = tmp_path_factory.mktemp("earlier")
    (folder / "experiment.yaml").write_text(EARLIER)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        assert main(["run", "experiment.yaml"]) == 0
    assert len(list((folder / "logs").iterdir())) == 4  # record, log, events, trace
    # A finished run keeps its last checkpoint only: all that --resume to extend it needs.
    assert sorted(p.name for p in checkpoint_dir(folder).iterdir()) == ["lock", "packs", "round-000002.pt"]
    return folder


@pytest.fixture
def project(earlier: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    shutil.copytree(earlier, folder)
    return folder


def checkpoint_dir(project: Path) -> Path:
    (run,) = (project / "ckpts").iterdir()
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def place(project: Path, args: tuple[str, ...]) -> None:
    """Copy the hostile files that ``args`` name into the project, where the user would keep them."""
    for arg in args:
        if (HOSTILE / arg).is_file():
            shutil.copy(HOSTILE / arg, project / arg)


# --- running fedevents -----------------------------------------------------------------------------------


def run_here(project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
             *args: str) -> tuple[int, str]:
    """`fedevents run ARGS` in this process, from the project folder: the exit status and stderr a shell sees."""
    monkeypatch.chdir(project)
    capsys.readouterr()
    try:
        status = main(["run", *args])
    except SystemExit as exit_:  # argparse exits by itself
        status = exit_.code
    except Exception:
        traceback.print_exc()  # what the interpreter prints for an uncaught exception; it then exits 1
        status = 1
    return status, capsys.readouterr().err


#: `python -m fedevents.cli` with a cap on the memory it may allocate (the first argument, in bytes).
CAPPED = ("import resource, runpy, sys; cap = int(sys.argv.pop(1)); "
          "resource.setrlimit(resource.RLIMIT_DATA, (cap, cap)); "
          "runpy.run_module('fedevents.cli', run_name='__main__', alter_sys=True)")


def run_process(project: Path, *args: str, max_data_bytes: int | None = None) -> tuple[int, str]:
    """`fedevents run ARGS` as a real process started in the project folder."""
    python = [sys.executable, "-c", CAPPED, str(max_data_bytes)] if max_data_bytes else [sys.executable, "-m",
                                                                                        "fedevents.cli"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([*python, "run", *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=180)
    return done.returncode, done.stderr


def last_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    return lines[-1] if lines else ""


def assert_error_line(status: int, stderr: str, expected_status: int, where: str, fragments: tuple[str, ...]) -> str:
    """The run ended with ``expected_status`` and a last line naming ``where`` and every fragment."""
    assert "Traceback" not in stderr, stderr
    assert status == expected_status, stderr
    line = last_line(stderr)
    assert line.startswith("fedevents: error: "), stderr
    assert line.isprintable(), repr(line)  # no terminal escapes, no raw NUL
    assert where in line, line
    for fragment in fragments:
        assert fragment in line, line
    return line


def assert_refused(status: int, stderr: str, before: dict[str, bytes], project: Path, where: str,
                   fragments: tuple[str, ...]) -> None:
    """Refused before starting: exit 2, a single line on stderr, and not one byte written."""
    line = assert_error_line(status, stderr, 2, where, fragments)
    assert stderr.strip() == line, stderr
    assert snapshot(project) == before


# --- bad experiment files ------------------------------------------------------------------------------

ITEM = "a name of letters, digits, '.', '_' or '-' (at most 128, not starting with '.' or '-')"

#: hostile/<name>.yaml -> what the message must say after the file name.
REFUSED_FILES: dict[str, str] = {
    "unclosed_bracket": "expected valid YAML, found expected ',' or ']', but got '<stream end>' at line 5, column 1",
    "tab_indentation": "expected valid YAML, found character '\\t' that cannot start any token "
                       "at line 5, column 1",
    "garbage": "expected valid YAML, found character '@' that cannot start any token at line 1, column 1",
    "utf16": "expected a readable UTF-8 YAML file, found UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff",
    "python_tag": "expected valid YAML, found could not determine a constructor for the tag "
                  "'tag:yaml.org,2002:python/object/apply:os.system' at line 2, column 11",
    "python_name_tag": "expected valid YAML, found could not determine a constructor for the tag "
                       "'tag:yaml.org,2002:python/name:os.system' at line 4, column 12",
    "top_level_list": "expected a mapping of keys at the top level, found a list",
    "empty": f"exp_name: missing; expected {ITEM}",
    "string_count": "clients.count: expected an integer >= 1, found '3' (string)",
    "bool_parallel": "parallel: expected an integer >= 1, found True (boolean)",
    "list_where_mapping": "exp_opts: expected a mapping, found ['comm_rounds', 2] (list)",
    "float_rounds": "exp_opts.comm_rounds: expected an integer >= 1, found 2.5 (number)",
    "unknown_top_key": "exp_nmae: unknown key; did you mean 'exp_name'?",
    "unknown_exp_opts_key": "exp_opts.comm_round: unknown key; did you mean 'comm_rounds'?",
    "unknown_deep_key": "task_opts.synthetic.sample_per_client: unknown key; did you mean 'samples_per_client'?",
    "unknown_client_key": "clients[1].task: unknown key; did you mean 'tasks'?",
    "unknown_handler_key": "handlers[0].kwarg: unknown key; did you mean 'kwargs'?",
    "online_over_clients": "exp_opts.online_clients = 5, but only 3 clients are defined",
    "min_over_online": "exp_opts.min_clients = 3, but only 2 clients train per round",
    "zero_rounds": "exp_opts.comm_rounds: expected an integer >= 1, found 0 (integer)",
    "negative_val_interval": "exp_opts.val_interval: expected an integer >= 1, found -1 (integer)",
    "zero_parallel": "parallel: expected an integer >= 1, found 0 (integer)",
    "missing_datasets_dir": "datasets_dir: expected an existing directory, found no directory at 'no-such-data'",
    "client_name_slash": f"clients[0].client_name: expected {ITEM}, found 'a/b' (string)",
    "client_name_dotdot": f"clients[0].client_name: expected {ITEM}, found 'a..b' (string)",
    "client_name_nul": f"clients[0].client_name: expected {ITEM}, found 'a\\x00b' (string)",
    "task_name_traversal": f"clients.tasks[0]: expected {ITEM}, found '../synth' (string)",
    "exp_name_traversal": f"exp_name: expected {ITEM}, found '../escape' (string)",
    "duplicate_client_names": "clients: client_name 'a' is defined twice; expected unique names",
    "empty_clients": "clients: expected a list of at least 1 items, each a mapping, found [] (list)",
    "bad_device_name": "device[0]: expected 'cpu', 'cuda' or 'cuda:N', found 'gpu0'",
    "unavailable_device": "device 'cuda:7': ",
    "handler_missing_module": "handlers[0]: could not import 'no_such_handlers_module': "
                              "ModuleNotFoundError: No module named 'no_such_handlers_module'",
    "handler_missing_attribute": "handlers[0]: module 'json' has no attribute 'NoSuchHandler'",
    "logs_dir_is_a_file": "logs_dir: expected a writable directory, found 'experiment.yaml' is a file",
    "logs_dir_under_a_file": "logs_dir: expected a writable directory, found 'experiment.yaml/logs', which is "
                             "under a file (experiment.yaml)",
    "checkpoints_dir_under_a_file": "checkpoints_dir: expected a writable directory, found 'experiment.yaml/ckpts', "
                                    "which is under a file (experiment.yaml)",
    "defaults_not_mapping": "defaults: expected a mapping, found",
    "recursive_alias": "expected a finite document, found an alias that contains itself",
    "deep_nesting": "expected at most 64 levels of nested mappings and lists, found more at line 4, column 72",
    "huge_integer": "expected an integer of at most 4,300 digits, found one of 4,301 digits at line 4, column 14",
    "model_too_large": "model_opts: expected a model that fits in this machine's",
    "input_too_large": "task_opts.synthetic: expected inputs that fit in this machine's",
    "checkpoints_dir_in_proc": "checkpoints_dir: expected a writable directory, found '/proc/fedevents-ckpts', and "
                               "/proc is not writable",
    "unknown_server_key": "server.nonsense: unknown key; known keys for the fedavg server: server_name",
    "unknown_loader_key": "task_opts.loader_opts.num_worker: unknown key; did you mean 'num_workers'?",
    "two_batch_sizes": "task_opts.loader_opts.batch_size = 32, but task_opts.batch_size = 16; expected one batch "
                       "size (give it once)",
    "option_given_twice": "model_opts.lambda_l2 gives fedprox's option mu = 2.0, but method_opts.mu gave 0.1; "
                          "expected one value",
    "method_option_of_another_method": "model_opts.lambda_penalty: unknown key; known keys for model mlp or method "
                                       "fedavg: hidden, name",
    "triplet_without_margin": "criterion_opts[1].margin: expected a number >= 0 for triplet_loss (0 for the soft "
                              "margin), found none",
}

#: Cases that show a bug today; each test asserts the correct behaviour and is expected to fail until fixed.
BUGS: dict[str, str] = {}  # every bug this corpus found has been fixed; add new ones here


def params(names: Iterable[str]) -> list:
    """pytest params for ``names``, each known bug marked as a strict xfail."""
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=BUGS[n])) if n in BUGS else n
            for n in names]


@pytest.mark.parametrize("name", params(REFUSED_FILES))
def test_a_bad_experiment_file_is_refused_in_one_line_and_writes_nothing(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str) -> None:
    if name == "unavailable_device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    place(project, (f"{name}.yaml",))
    before = snapshot(project)
    status, stderr = run_here(project, monkeypatch, capsys, f"{name}.yaml")
    assert_refused(status, stderr, before, project, f"fedevents: error: {name}.yaml: ", (REFUSED_FILES[name],))


def test_every_hostile_file_has_a_case() -> None:
    own_tests = {"alias_bomb", "huge_client_count"}
    assert {p.stem for p in HOSTILE.iterdir()} == set(REFUSED_FILES) | own_tests


def test_an_alias_bomb_is_refused_without_expanding_it(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    place(project, ("alias_bomb.yaml",))
    before = snapshot(project)
    tracemalloc.start()
    try:
        status, stderr = run_here(project, monkeypatch, capsys, "alias_bomb.yaml")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_refused(status, stderr, before, project, "fedevents: error: alias_bomb.yaml: ",
                   ("expected at most 1,000,000 values once aliases are expanded",))
    assert peak < 3 << 20  # the half million strings are never spelled out (that takes over 5 MB)


@pytest.mark.parametrize("name", ["model_too_large", "input_too_large", "unknown_server_key", "triplet_without_margin"])
def test_a_dry_run_refuses_what_a_real_run_refuses(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str) -> None:
    place(project, (f"{name}.yaml",))
    before = snapshot(project)
    status, stderr = run_here(project, monkeypatch, capsys, f"{name}.yaml", "--dry-run")
    assert_refused(status, stderr, before, project, f"fedevents: error: {name}.yaml: ", (REFUSED_FILES[name],))


#: Odd but valid YAML, accepted: merge keys that a mapping's own key overrides, and a number that PyYAML
#: reads as a string ('1e-3' has no dot).
ACCEPTED = """\
exp_name: odd
exp_method: fedavg
exp_opts: {comm_rounds: 1}
optimizer_opts: {name: sgd, lr: 1e-3}
model_opts: {hidden: [16]}
task_opts: {synthetic: {samples_per_client: 32, test_size: 16}}
clients:
  - &one {client_name: a, tasks: [synth]}
  - {<<: *one, client_name: b}
  - {<<: *one, client_name: c}
"""


def test_merge_keys_and_numbers_without_a_dot_are_accepted(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "odd.yaml").write_text(ACCEPTED)
    status, stderr = run_here(project, monkeypatch, capsys, "odd.yaml")
    assert status == 0, stderr
    (record,) = (p for p in (project / "logs").glob("odd-*.json") if not p.name.endswith(".trace.json"))
    config = json.loads(record.read_text())["config"]
    assert config["optimizer_opts"]["lr"] == 0.001
    assert config["clients"] == [{"client_name": n, "tasks": ["synth"], "model_ckpt_name": None} for n in "abc"]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_as_the_config_is_refused_without_waiting(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    target = "/dev/zero" if kind == "device" else str(project / "pipe.yaml")
    if kind == "fifo":
        os.mkfifo(target)  # opening it would block until a writer came
    before = snapshot(project)
    status, stderr = run_here(project, monkeypatch, capsys, target)
    found = "a device" if kind == "device" else "a FIFO"
    assert_error_line(status, stderr, 2, f"fedevents: error: {target}: ", (f"expected an experiment file, found {found}",))
    assert snapshot(project) == before


EXITING_HANDLER = '''
class Exits:
    """Raises SystemExit(3) from its constructor, its subscribe or its close, as `where` says."""
    def __init__(self, where):
        self.where = where
        if where == "init":
            raise SystemExit(3)
    def subscribe(self, bus):
        if self.where == "subscribe":
            raise SystemExit(3)
        return []
    def close(self):
        if self.where == "close":
            raise SystemExit(3)
'''


@pytest.mark.parametrize(("where", "message"), [
    ("init", "handlers[0]: exiting:Exits(**{'where': 'init'}) failed: SystemExit: 3"),
    ("subscribe", "handlers[0]: Exits.subscribe(bus) failed: SystemExit: 3"),
])
def test_a_handler_exiting_while_it_is_built_is_refused_in_one_line(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], where: str,
        message: str) -> None:
    """Regression: the process exited with the handler's status 3 and not a line."""
    (project / "exiting.py").write_text(EXITING_HANDLER)
    handler = f'{{target: "exiting:Exits", kwargs: {{where: {where}}}}}'
    (project / "exits.yaml").write_text(f"{EARLIER}handlers: [{handler}]\n")
    before = snapshot(project)
    status, stderr = run_here(project, monkeypatch, capsys, "exits.yaml")
    assert_refused(status, stderr, before, project, "fedevents: error: exits.yaml: ", (message,))


def test_a_handler_exiting_in_its_close_fails_the_run_in_one_line(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (project / "exiting.py").write_text(EXITING_HANDLER)
    (project / "exits.yaml").write_text(f'{EARLIER}handlers: [{{target: "exiting:Exits", kwargs: {{where: close}}}}]\n')
    status, stderr = run_here(project, monkeypatch, capsys, "exits.yaml")
    assert_error_line(status, stderr, 1, "fedevents: error: ", ("closing the run failed: SystemExit: 3",))


def test_a_file_of_very_many_values_is_refused_in_the_first_pass(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: a 6 MB flow list (3 million values, well under the 16 MiB cap) held PyYAML's pure-Python
    loader for over a minute before any message."""
    (project / "many.yaml").write_text(EARLIER + "notes: [" + ",".join(["x"] * 100_001) + "]\n")
    before = snapshot(project)
    status, stderr = run_here(project, monkeypatch, capsys, "many.yaml")
    assert_refused(status, stderr, before, project, "fedevents: error: many.yaml: ",
                   ("expected at most 100,000 values, mappings and lists, found more by line 7",))


def test_deep_nesting_in_a_set_is_refused_in_one_short_line(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(project)
    status, stderr = run_here(project, monkeypatch, capsys, "experiment.yaml", "--set", "server=" + "[" * 500 + "]" * 500)
    line = assert_error_line(status, stderr, 2, "fedevents: error: --set server=[[[", (
        "...: expected at most 64 levels of nested mappings and lists, found more at line 1, column 65",))
    assert len(line) < 200
    assert snapshot(project) == before


# --- bad flags and file arguments ----------------------------------------------------------------------

#: case -> (arguments after `fedevents run`, what the one line must name first, what it must say).
REFUSED_FLAGS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "missing_experiment_file": (("no-such.yaml",), "no-such.yaml: ",
                                ("expected an experiment file, found no such file",)),
    "directory_as_experiment_file": (("logs",), "logs: ", ("expected an experiment file, found a directory",)),
    "second_experiment_bad": (("experiment.yaml", "zero_rounds.yaml"), "zero_rounds.yaml: ",
                              ("exp_opts.comm_rounds: expected an integer >= 1, found 0 (integer)",)),
    "common_file_a_list": (("experiment.yaml", "--common", "top_level_list.yaml"), "top_level_list.yaml: ",
                           ("expected a mapping of keys at the top level, found a list",)),
    "set_without_equals": (("experiment.yaml", "--set", "exp_opts.comm_rounds"), "--set exp_opts.comm_rounds: ",
                           ("expected key.path=value, found no '='",)),
    "set_unparsable_value": (("experiment.yaml", "--set", "exp_opts.comm_rounds=[1,"),
                             "--set exp_opts.comm_rounds=[1,: ",
                             ("expected a YAML value after '=', found '[1,' (expected the node content, but found "
                              "'<stream end>' at line 1, column 4)",)),
    "set_wrong_type": (("experiment.yaml", "--set", "exp_opts.comm_rounds=two"), "--set exp_opts.comm_rounds: ",
                       ("exp_opts.comm_rounds: expected an integer >= 1, found 'two' (string)",)),
    "set_python_tag": (("experiment.yaml", "--set", "exp_name=!!python/object/apply:os.system [touch pwned]"),
                       "--set exp_name=!!python/object/apply:os.system [touch pwned]: ",
                       ("could not determine a constructor for the tag "
                        "'tag:yaml.org,2002:python/object/apply:os.system'",)),
    "set_index_out_of_range": (("experiment.yaml", "--set", "model_opts.hidden.3=8"), "--set model_opts.hidden.3: ",
                               ("expected a list index below 1, found '3'",)),
    "parallel_flag_zero": (("experiment.yaml", "--parallel", "0"), "--parallel: ",
                           ("parallel: expected an integer >= 1, found 0 (integer)",)),
    "parallel_flag_not_a_number": (("experiment.yaml", "--parallel", "two"), "--parallel", ("'two'",)),
    "set_control_characters": (("experiment.yaml", "--set", "exp_nam\x1b[31me=a\nb"), "--set exp_nam\\x1b[31me: ",
                               ("exp_nam\\x1b[31me: unknown key; did you mean 'exp_name'?",)),
    "flag_control_characters": (("experiment.yaml", "--bogus\x1bx"), "fedevents: ",
                                ("unrecognized arguments: --bogus\\x1bx",)),
    "device_flag_bad_name": (("experiment.yaml", "--device", "gpu0"), "--device: ",
                             ("device[0]: expected 'cpu', 'cuda' or 'cuda:N', found 'gpu0'",)),
}


@pytest.mark.parametrize("name", params(REFUSED_FLAGS))
def test_a_bad_flag_or_file_argument_is_refused_in_one_line_and_writes_nothing(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str) -> None:
    args, where, fragments = REFUSED_FLAGS[name]
    place(project, args)
    before = snapshot(project)
    status, stderr = run_here(project, monkeypatch, capsys, *args)
    assert_refused(status, stderr, before, project, where, fragments)


# --- checkpoints and disks: real processes, and a few resumes in this process ------------------------------

UNSAFE_MODULE = '''
from pathlib import Path


def build(marker):
    """What unpickling the checkpoint would call: leaves a marker, so the test sees it happened."""
    Path(marker).write_text("constructed")
    return Boom(marker)


class Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (build, (self.marker,))
'''

DISK_FULL_MODULE = '''
import errno
import hashlib
import io
from pathlib import Path

import fedevents.handlers.checkpoint as checkpoint


class DiskFull:
    """Makes the checkpoint of `round` hit a full disk after half of its bytes are written.

    First it notes the digest of every checkpoint already in the folder, to show that none was touched.
    """

    def __init__(self, round, digests):
        real = checkpoint.torch

        class Torch:
            def __getattr__(self, name):
                return getattr(real, name)

            def save(self, obj, f, *args, **kwargs):
                if obj.get("round") != round:
                    return real.save(obj, f, *args, **kwargs)
                folder = Path(getattr(f, "name", f)).parent
                Path(digests).write_text("".join(
                    f"{p.name} {hashlib.sha256(p.read_bytes()).hexdigest()}\\n"
                    for p in sorted(folder.glob("round-*.pt"))))
                whole = io.BytesIO()
                real.save(obj, whole)
                f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

        checkpoint.torch = Torch()

    def subscribe(self, bus):
        return []
'''


def _resave(path: Path, change: Callable[[dict], None], to: Path | None = None) -> Path:
    """Load a real checkpoint, change its plain data and save it (to ``to``, else in place)."""
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, to or path)
    return to or path


def _truncated(project: Path) -> Path:
    path = checkpoint_dir(project) / "round-000002.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _tampered(project: Path) -> Path:
    path = checkpoint_dir(project) / "round-000002.pt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))
    return path


def _emptied(project: Path) -> Path:
    path = checkpoint_dir(project) / "round-000002.pt"
    path.write_bytes(b"")
    return path


def _not_a_checkpoint(project: Path) -> Path:
    path = checkpoint_dir(project) / "round-000002.pt"
    path.write_text("these are not the weights you are looking for\n")
    return path


def _foreign_torch_file(project: Path) -> Path:
    path = checkpoint_dir(project) / "round-000002.pt"
    torch.save({"format": "someone-elses-trainer", "weights": torch.zeros(4)}, path)
    return path


def _future_version(project: Path) -> Path:
    return _resave(checkpoint_dir(project) / "round-000002.pt", lambda d: d.update(version=99))


def _unsafe_object(project: Path) -> Path:
    (project / "unsafe_payload.py").write_text(UNSAFE_MODULE)
    sys.path.insert(0, str(project))
    try:
        import unsafe_payload

        boom = unsafe_payload.Boom(str(project / "constructed.txt"))
        return _resave(checkpoint_dir(project) / "round-000002.pt", lambda d: d.update(x=boom))
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("unsafe_payload", None)


def _other_config(project: Path) -> None:
    def another_experiment(data: dict) -> None:
        data["config"]["model_opts"]["hidden"] = [32]
        data["config"]["random_seed"] = 5

    _resave(checkpoint_dir(project) / "round-000002.pt", another_experiment)


def _other_name(project: Path) -> Path:
    def renamed(data: dict) -> None:
        data.update(exp_name="other", run_id="other-20260101-000000-abcdef")
        data["config"]["exp_name"] = "other"

    folder = checkpoint_dir(project)
    return _resave(folder / "round-000002.pt", renamed, to=folder / "round-000003.pt")


@dataclass(frozen=True)
class Resume:
    """A damaged or foreign checkpoint met by `fedevents run experiment.yaml --resume ...`."""

    plant: Callable[[Path], Path | None]  # returns the checkpoint file the message must name, if it is one file
    fragments: tuple[str, ...]
    args: tuple[str, ...] = ()
    here: bool = False  # resumed in the test's own process: quicker, for the cases beyond the first few


REFUSED_RESUMES: dict[str, Resume] = {
    "truncated": Resume(_truncated, ("expected a fedevents checkpoint (a torch zip archive), found a file that is not one, or is cut short",)),
    "tampered": Resume(_tampered, ("expected an intact checkpoint, found", "damaged (its checksum does not match)")),
    "emptied": Resume(_emptied, ("expected a fedevents checkpoint (a torch zip archive), found a file that is not one, or is cut short",), here=True),
    "not_a_checkpoint": Resume(_not_a_checkpoint, ("expected a fedevents checkpoint (a torch zip archive), found a file that is not one, or is cut short",),
                               here=True),
    "foreign_torch_file": Resume(_foreign_torch_file, ("expected a fedevents checkpoint, found another file",),
                                 here=True),
    "future_version": Resume(_future_version, ("expected format version 5, found 99",), here=True),
    "unsafe_object": Resume(_unsafe_object, ("refused", "unsafe_payload.build")),
    "changed_lr": Resume(lambda project: None, ("optimizer_opts.lr differs from the checkpoint",),
                         ("--set", "optimizer_opts.lr=0.1")),
    "other_config": Resume(_other_config, ("model_opts.hidden, random_seed differ from the checkpoint",)),
    "other_name_in_run_folder": Resume(_other_name, ("expected experiment 'hostile', found 'other'",)),
}


@dataclass(frozen=True)
class Outcome:
    project: Path
    before: dict[str, bytes]  # the project just before fedevents ran
    status: int
    stderr: str
    where: str = ""


def _resume_case(project: Path, case: Resume) -> tuple[tuple[str, ...], str]:
    planted = case.plant(project)
    if planted is not None:
        return (*RESUME, *case.args), f"fedevents: error: checkpoint {planted.relative_to(project)}: "
    run_id = checkpoint_dir(project).name
    where = f"fedevents: error: experiment.yaml: cannot resume run {run_id} with a changed config: "
    return (*RESUME, *case.args), where


def _disk_full_case(project: Path) -> tuple[tuple[str, ...], str]:
    (project / "diskfull.py").write_text(DISK_FULL_MODULE)
    handler = '{target: "diskfull:DiskFull", kwargs: {round: 2, digests: digests.txt}}'
    (project / "disk_full.yaml").write_text(f"{EARLIER}handlers: [{handler}]\n")
    return ("disk_full.yaml",), ""


def _huge_count_case(project: Path) -> tuple[tuple[str, ...], str]:
    place(project, ("huge_client_count.yaml",))
    return ("huge_client_count.yaml",), ""


@pytest.fixture(scope="module")
def outcomes(earlier: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every real-process case, each in its own copy of the project; run side by side, they are independent."""
    cases: dict[str, Callable[[Path], tuple[tuple[str, ...], str]]] = {
        name: (lambda project, case=case: _resume_case(project, case))
        for name, case in REFUSED_RESUMES.items() if not case.here}
    cases.update(disk_full=_disk_full_case, huge_client_count=_huge_count_case)
    prepared = {}
    for name, prepare in cases.items():
        project = tmp_path_factory.mktemp(name) / "project"
        shutil.copytree(earlier, project)
        args, where = prepare(project)
        prepared[name] = (project, snapshot(project), args, where)

    def run(name: str) -> Outcome:
        project, before, args, where = prepared[name]
        # Enough for a real run here; listing 1e23 client names would take far more.
        limit = 768 << 20 if name == "huge_client_count" else None
        status, stderr = run_process(project, *args, max_data_bytes=limit)
        return Outcome(project, before, status, stderr, where)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(prepared, pool.map(run, prepared)))


@pytest.mark.parametrize("name", params(n for n, case in REFUSED_RESUMES.items() if not case.here))
def test_resuming_from_a_bad_checkpoint_is_refused_in_one_line_and_touches_nothing(
        outcomes: dict[str, Outcome], name: str) -> None:
    out = outcomes[name]
    assert_refused(out.status, out.stderr, out.before, out.project, out.where, REFUSED_RESUMES[name].fragments)


@pytest.mark.parametrize("name", params(n for n, case in REFUSED_RESUMES.items() if case.here))
def test_resuming_here_from_a_bad_checkpoint_is_refused_in_one_line_and_touches_nothing(
        project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str) -> None:
    args, where = _resume_case(project, REFUSED_RESUMES[name])
    before = snapshot(project)
    status, stderr = run_here(project, monkeypatch, capsys, *args)
    assert_refused(status, stderr, before, project, where, REFUSED_RESUMES[name].fragments)


def test_an_unsafe_checkpoint_object_is_never_built(outcomes: dict[str, Outcome]) -> None:
    out = outcomes["unsafe_object"]
    assert "Traceback" not in out.stderr and out.status == 2, out.stderr
    assert out.where in last_line(out.stderr) and "refused" in last_line(out.stderr), out.stderr
    assert not (out.project / "constructed.txt").exists()


def _new_run_checkpoints(out: Outcome) -> Path:
    """The checkpoint folder of the run that hit the full disk: the one the earlier run did not have."""
    earlier = {Path(name).parts[1] for name in out.before if name.startswith("ckpts/")}
    (folder,) = [p for p in (out.project / "ckpts").iterdir() if p.name not in earlier]
    return folder


def test_a_disk_that_fills_while_checkpointing_fails_the_run_and_keeps_what_was_saved(
        outcomes: dict[str, Outcome]) -> None:
    out = outcomes["disk_full"]
    assert_error_line(out.status, out.stderr, 1, "round 2", ("No space left on device",))
    after = snapshot(out.project)
    assert {k: after.get(k) for k in out.before} == out.before  # the earlier run's files, byte for byte

    folder = _new_run_checkpoints(out)
    assert sorted(p.name for p in folder.iterdir()) == ["lock", "packs", "round-000000.pt", "round-000001.pt"]
    assert [name for name in after if name.endswith(".tmp")] == []
    digests = dict(line.split() for line in (out.project / "digests.txt").read_text().splitlines())
    assert hashlib.sha256((folder / "round-000001.pt").read_bytes()).hexdigest() == digests["round-000001.pt"]
    assert load_checkpoint(folder / "round-000001.pt").round == 1

    (record,) = [p for p in (out.project / "logs").glob(f"{folder.name}.json")]
    data = json.loads(record.read_text())
    assert data["status"] == "failed" and "No space left on device" in data["error"]


def test_the_disk_full_line_names_the_checkpoint_being_written(outcomes: dict[str, Outcome]) -> None:
    out = outcomes["disk_full"]
    folder = _new_run_checkpoints(out)
    assert_error_line(out.status, out.stderr, 1, str((folder / "round-000002.pt").relative_to(out.project)),
                      ("round 2", "No space left on device"))


def test_a_huge_client_count_is_refused_or_run_without_listing_every_client(outcomes: dict[str, Outcome]) -> None:
    out = outcomes["huge_client_count"]
    assert "Traceback" not in out.stderr and out.status in (0, 2), out.stderr
    if out.status == 2:
        assert_error_line(out.status, out.stderr, 2, "huge_client_count.yaml: clients.count", ())
