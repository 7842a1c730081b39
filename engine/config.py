"""Loading experiments in the FedSTIL format: common file, ``defaults`` merged deeply, ``--set`` overrides.

Precedence, lowest first: built-in defaults < ``common.yaml`` top-level keys and its ``defaults`` block <
the experiment file < ``--set key.path=value``. Mappings merge key by key at every depth; any other value
(a list included) replaces the one below it. YAML is read with the safe loader only, so a config can
never construct Python objects.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from .errors import ConfigError
from .vocabulary import Vocabulary
from .yamlsafe import YamlProblem, load_yaml
from .components import check_components
from .schema import (
    AnyMapping,
    Bool,
    Field,
    Float,
    Int,
    ListOf,
    OneOf,
    Section,
    SpecError,
    Str,
    describe,
)

__all__ = ["ExperimentConfig", "ClientSet", "load_experiments", "load_experiment", "load_mapping", "parse_override",
           "COMMON_KEYS", "EXECUTORS", "OUTPUTS", "PRECISIONS"]

#: Keys a common file holds at its top level (besides ``defaults``).
COMMON_KEYS = ("datasets_dir", "checkpoints_dir", "logs_dir", "parallel", "device", "executor", "ray")
#: Where client work runs (docs/executors.md); fedevents.handlers.executors holds one class per name.
EXECUTORS = ("process", "ray", "thread")
#: ``exp_opts.precision``: float32 throughout, or each model's forward passes in bfloat16
#: (fedevents.federated.precision).
PRECISIONS = ("fp32", "bf16")
#: The files a run may write besides its record (``outputs:``); ``.gz`` writes that stream gzip-compressed.
OUTPUTS = ("events", "events.gz", "log", "log.gz", "trace")
DEVICE_NAME = re.compile(r"^(cpu|cuda|cuda:\d+)$")
#: Most bytes an experiment file may have; a real one has a few kilobytes.
MAX_FILE_BYTES = 16 << 20


def _schema() -> Section:
    name = Str(safe_name=True)
    client = Section({"client_name": Field(name), "tasks": Field(ListOf(name, min_len=1)),
                      "model_ckpt_name": Field(Str(safe_name=True, nullable=True), None)})
    compact = Section(
        {
            "count": Field(Int(min=1)),
            "tasks": Field(ListOf(name, min_len=1)),
            "prefix": Field(Str(safe_name=True), "client-"),
        }
    )
    named = Section({"name": Field(Str())}, open=True)
    handler = OneOf(
        [
            (lambda v: isinstance(v, str), Str()),
            (lambda v: isinstance(v, dict), Section({"target": Field(Str()), "kwargs": Field(AnyMapping(), {})})),
        ],
        "'module:Name' or a mapping with target and kwargs",
    )
    return Section(
        {
            "exp_name": Field(name),
            "exp_method": Field(Str(nullable=True), None),
            "group": Field(Str(nullable=True), None),
            "random_seed": Field(Int(min=0), 0),
            "datasets_dir": Field(Str(nullable=True), None),
            "checkpoints_dir": Field(Str(), "ckpts"),
            "logs_dir": Field(Str(), "logs"),
            "parallel": Field(Int(min=1), 1),
            "device": Field(ListOf(Str(), min_len=1, scalar_ok=True), ["cpu"]),
            "executor": Field(Str(choices=EXECUTORS), "thread"),
            "ray": Field(
                Section(
                    {
                        "address": Field(Str(), "local"),
                        "num_cpus": Field(Int(min=1), None),
                        "object_store_mb": Field(Int(min=64), None),
                        "tmpdir": Field(Str(nullable=True), None),
                        "timeout_s": Field(Float(positive=True), 120.0),
                        "stop_grace_s": Field(Float(positive=True), 10.0),
                    }
                ),
                {},
            ),
            "exp_opts": Field(
                Section(
                    {
                        "comm_rounds": Field(Int(min=1), 10),
                        "val_interval": Field(Int(min=1), 1),
                        "online_clients": Field(Int(min=1), None),
                        "val_clients": Field(Str(choices=("all", "online")), "all"),
                        "val_model": Field(Str(choices=("both", "global", "local")), "local"),
                        "val_reuse": Field(Bool(), True),
                        "failure_policy": Field(Str(choices=("fail", "tolerate")), "fail"),
                        "min_clients": Field(Int(min=1), 1),
                        "client_timeout_s": Field(Float(positive=True), None),
                        "handler_timeout_s": Field(Float(positive=True), 300.0),
                        "checkpoint_interval": Field(Int(min=1), 1),
                        "checkpoint_keep": Field(Int(min=1), 2),
                        "clients_in_memory": Field(Int(min=1), 256),
                        "torch_threads": Field(Int(min=1), 1),
                        "precision": Field(Str(choices=PRECISIONS), "fp32"),
                        # FedSTIL's runner's behaviour where fedevents' fixes change results (docs/fedstil.md).
                        "legacy": Field(Bool(), False),
                    }
                ),
                {},
            ),
            # The options of the model, the optimizer, the scheduler and the criteria are declared by the
            # components themselves (see vocabulary.py); components.py checks them once the names are known.
            "model_opts": Field(Section({"name": Field(Str(), "mlp")}, open=True), {}),
            "optimizer_opts": Field(Section({"name": Field(Str(), "sgd"), "keep_state": Field(Bool(), None)},
                                            open=True), {}),
            "scheduler_opts": Field(Section({"name": Field(Str(), "none")}, open=True), {}),
            "criterion_opts": Field(
                OneOf(
                    [(lambda v: isinstance(v, dict) or v is None, named),
                     (lambda v: isinstance(v, list), ListOf(named, min_len=1))],
                    "a criterion mapping (name, ...) or a list of them",
                ),
                {"name": "cross_entropy"},
            ),
            "task_opts": Field(
                Section(
                    {
                        "dataset": Field(Str(nullable=True), None),
                        # A user data set's options, declared by the data set (components.py checks them).
                        "dataset_opts": Field(AnyMapping(), {}),
                        # None: "standard", or "fedstil-runner" under exp_opts.legacy (see _legacy_defaults).
                        "map_mode": Field(Str(choices=("standard", "first-match", "fedstil-runner"), nullable=True),
                                          None),
                        "augment_opts": Field(
                            Section(
                                {
                                    "level": Field(Str(choices=("default", "none", "strong")), "default"),
                                    "img_size": Field(ListOf(Int(min=1), min_len=2, max_len=2), [256, 128]),
                                    "norm_mean": Field(ListOf(Float(), min_len=3, max_len=3), [0.485, 0.456, 0.406]),
                                    "norm_std": Field(ListOf(Float(positive=True), min_len=3, max_len=3),
                                                      [0.229, 0.224, 0.225]),
                                }
                            ),
                            {},
                        ),
                        "sustain_rounds": Field(Int(min=1), 1),
                        "train_epochs": Field(Int(min=1), 1),
                        "batch_size": Field(Int(min=1), None),
                        "loader_opts": Field(
                            Section(
                                {
                                    "batch_size": Field(Int(min=1), None),
                                    "num_workers": Field(Int(min=0), 0),
                                    "pin_memory": Field(Bool(), False),
                                    "persistent_workers": Field(Bool(), False),
                                    "multiprocessing_context": Field(
                                        Str(choices=("fork", "forkserver", "spawn"), nullable=True), None),
                                }
                            ),
                            {},
                        ),
                        "synthetic": Field(
                            Section(
                                {
                                    "num_classes": Field(Int(min=2), 10),
                                    "input_shape": Field(ListOf(Int(min=1), min_len=1, max_len=3), [32]),
                                    "samples_per_client": Field(Int(min=1), 200),
                                    "label_skew": Field(Float(positive=True), 0.5),
                                    "test_size": Field(Int(min=1), 100),
                                    "global_test_size": Field(Int(min=1), 1000),
                                    "noise": Field(Float(min=0.0), 1.0),
                                }
                            ),
                            {},
                        ),
                        # Image data sets read from datasets_dir (docs/datasets.md).
                        "image": Field(
                            Section(
                                {
                                    "partition": Field(AnyMapping(), {"name": "iid"}),
                                    "classes_per_task": Field(Int(min=1), None),
                                    "task_names": Field(ListOf(Str(safe_name=True), min_len=1), None),
                                    "test": Field(Str(choices=("client", "pooled")), "pooled"),
                                    "test_fraction": Field(Float(positive=True, below=1.0), 0.2),
                                }
                            ),
                            {},
                        ),
                    }
                ),
                {},
            ),
            "method_opts": Field(AnyMapping(), {}),
            "server": Field(AnyMapping(), {}),
            "clients": Field(
                OneOf(
                    [(lambda v: isinstance(v, list), ListOf(client, min_len=1)), (lambda v: isinstance(v, dict), compact)],
                    "a list of clients (client_name, tasks) or a mapping with count and tasks",
                )
            ),
            "handlers": Field(ListOf(handler), []),
            "outputs": Field(ListOf(Str(choices=OUTPUTS)), ["log", "events", "trace"]),
            "dry_run_opts": Field(
                Section(
                    {
                        "train_s_per_batch": Field(Float(min=0.0), 0.002),
                        "val_s_per_batch": Field(Float(min=0.0), 0.001),
                    }
                ),
                {},
            ),
        }
    )


class NumberedNames(Sequence[str]):
    """``prefix`` + a zero-padded index for every index below ``count``, made when asked for, never stored."""

    def __init__(self, prefix: str, count: int) -> None:
        self.prefix, self.count, self.width = prefix, count, len(str(count - 1))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(index)
        return f"{self.prefix}{index:0{self.width}d}"


#: Most clients a compact ``clients: {count: N}`` may define; sampling needs len() to fit a machine word.
MAX_CLIENTS = 1_000_000_000


@dataclass(frozen=True)
class ClientSet:
    """Client names and their task streams; a compact ``count`` form shares one stream and costs no list."""

    names: Sequence[str]
    _tasks: Mapping[str, tuple[str, ...]] | tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def tasks(self, client: str) -> tuple[str, ...]:
        if isinstance(self._tasks, tuple):
            return self._tasks
        return self._tasks[client]

    def all_tasks(self) -> tuple[str, ...]:
        """Every task some client learns, each once, in the order they first appear."""
        streams = [self._tasks] if isinstance(self._tasks, tuple) else self._tasks.values()
        return tuple(dict.fromkeys(task for stream in streams for task in stream))

    @classmethod
    def from_config(cls, clients: Any) -> "ClientSet":
        if isinstance(clients, dict):
            if clients["count"] > MAX_CLIENTS:
                raise SpecError("clients.count", f"expected at most {MAX_CLIENTS:,} clients, found {clients['count']:,}")
            return cls(NumberedNames(clients["prefix"], clients["count"]), tuple(clients["tasks"]))
        names = tuple(c["client_name"] for c in clients)
        return cls(names, {c["client_name"]: tuple(c["tasks"]) for c in clients})


@dataclass(frozen=True)
class ExperimentConfig:
    """One validated experiment: the merged dict (as recorded) and the values the engine reads."""

    source: str
    data: Mapping[str, Any]
    clients: ClientSet
    #: The folder user plugins (``"module:Name"``) next to the config are imported from.
    config_dir: Path | None = None

    @property
    def exp_name(self) -> str:
        return self.data["exp_name"]

    @property
    def method(self) -> str:
        return self.data["exp_method"]

    @property
    def seed(self) -> int:
        return self.data["random_seed"]

    @property
    def rounds(self) -> int:
        return self.data["exp_opts"]["comm_rounds"]

    @property
    def val_interval(self) -> int:
        return self.data["exp_opts"]["val_interval"]

    @property
    def online_clients(self) -> int:
        return self.data["exp_opts"]["online_clients"]

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self.data["device"])

    @property
    def parallel(self) -> int:
        return self.data["parallel"]

    @property
    def executor(self) -> str:
        return self.data["executor"]

    @property
    def logs_dir(self) -> Path:
        return Path(self.data["logs_dir"])

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.data["checkpoints_dir"])

    @property
    def sustain_rounds(self) -> int:
        return self.data["task_opts"]["sustain_rounds"]


def parse_override(text: str, label: str | None = None) -> tuple[list[str], Any]:
    """Split ``key.path=value`` into its path and its value, read as a YAML scalar or flow collection."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    where = label or f"--set {text if len(text) <= 80 else text[:77] + '...'}"
    if not sep or not all(parts):
        raise ConfigError(f"{where}: expected key.path=value, found no '=' or an empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except YamlProblem as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: expected a YAML value after '=', found {raw!r} ({_yaml_problem(exc)})") from None
    return parts, value


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file that must hold a mapping, read with the safe loader."""
    p = Path(path)
    try:
        _check_regular_file(p)
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: expected an experiment file, found no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: expected an experiment file, found a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: expected a readable UTF-8 YAML file, found {type(exc).__name__}: {exc}") from None
    try:
        data = load_yaml(text)
    except YamlProblem as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: expected valid YAML, found {_yaml_problem(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of keys at the top level, found a {type(data).__name__}")
    return data


def _check_regular_file(p: Path) -> None:
    """Refuse, before opening, what is not a plain file of sane size: opening a FIFO blocks until someone
    writes to it, and a device such as /dev/zero never ends."""
    info = p.stat()
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(p)
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device"
        raise ConfigError(f"{p}: expected an experiment file, found {kind}")
    if info.st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{p}: expected an experiment file of at most {MAX_FILE_BYTES >> 20} MiB, "
                          f"found {info.st_size:,} bytes")


def load_experiments(
    paths: Sequence[str | os.PathLike[str]],
    *,
    common: str | os.PathLike[str] | None = None,
    overrides: Iterable[str | tuple[str, str]] = (),
    vocabulary: Vocabulary | None = None,
) -> list[ExperimentConfig]:
    """Every experiment file merged onto the common file, overridden and validated, before anything runs.

    An override is ``"key.path=value"`` or ``(label, "key.path=value")``, the label naming where it came
    from in messages (a flag such as ``--device``). ``vocabulary`` holds the names of methods, models,
    data sets, criteria, optimizers and schedulers and their options; without one, any name is accepted
    with any options (the engine alone knows none).
    """
    if not paths:
        raise ConfigError("expected at least one experiment file, found none")
    base: dict[str, Any] = {}
    if common is not None:
        base = _common_layer(read_yaml(common), str(common))
    parsed = [_labelled(o) for o in overrides]
    vocab = vocabulary or Vocabulary()
    return [_load_one(Path(p), read_yaml(p), base, parsed, vocab, str(common) if common else None) for p in paths]


def load_mapping(
    data: Mapping[str, Any],
    *,
    source: str = "<mapping>",
    config_dir: str | os.PathLike[str] | None = None,
    overrides: Iterable[str | tuple[str, str]] = (),
    vocabulary: Vocabulary | None = None,
) -> ExperimentConfig:
    """An experiment given as a mapping (the Python API), validated exactly as a file would be.

    ``source`` names it in messages; user plugins are imported from ``config_dir`` (default: the
    current folder).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, found a {type(data).__name__}")
    base = _common_layer(dict(data), source) if "defaults" in data else {}
    own = {k: v for k, v in data.items() if k != "defaults"} if base else dict(data)
    folder = Path(config_dir) if config_dir is not None else Path.cwd()
    parsed = [_labelled(o) for o in overrides]
    return _load_one(folder / source, own, base, parsed, vocabulary or Vocabulary(), None, source=source)


def _labelled(override: str | tuple[str, str]) -> tuple[list[str], Any, str]:
    label, text = override if isinstance(override, tuple) else (None, override)
    parts, value = parse_override(text, label)
    return parts, value, label or f"--set {'.'.join(parts)}"


def load_experiment(path: str | os.PathLike[str], **kwargs: Any) -> ExperimentConfig:
    return load_experiments([path], **kwargs)[0]


def _common_layer(common: dict[str, Any], where: str) -> dict[str, Any]:
    defaults = common.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{where}: defaults: expected a mapping, found {describe(defaults)}")
    layer = dict(defaults)
    for key, value in common.items():
        if key != "defaults":
            layer[key] = value
    return layer


def _load_one(
    path: Path,
    experiment: dict[str, Any],
    base: dict[str, Any],
    overrides: list[tuple[list[str], Any, str]],
    vocabulary: Vocabulary,
    common_name: str | None,
    *,
    source: str | None = None,
) -> ExperimentConfig:
    own = _common_layer(experiment, str(path)) if "defaults" in experiment else experiment
    merged = deep_merge(base, own)
    for parts, value, _ in overrides:
        _set_path(merged, parts, value, path)
    try:
        data = _schema().check(merged, "")
        clients = ClientSet.from_config(data["clients"])
        _cross_check(data, clients)
        check_components(data, vocabulary, path.parent)
    except SpecError as exc:
        where = _origin(exc.path, experiment, overrides, common_name, Path(source) if source else path)
        text = exc.message if exc.message.startswith(exc.path) else f"{exc.path}: {exc.message}"
        raise ConfigError(f"{where}: {text}") from None
    if data["exp_opts"]["online_clients"] is None:
        data["exp_opts"]["online_clients"] = len(clients)
    return ExperimentConfig(source=source or str(path), data=data, clients=clients, config_dir=path.parent)


def _cross_check(data: dict[str, Any], clients: ClientSet) -> None:
    """Checks across keys; each raises SpecError at the key a user would change."""
    if not isinstance(data["clients"], dict):
        seen: set[str] = set()
        for name in clients.names:
            if name in seen:
                raise SpecError("clients", f"client_name {name!r} is defined twice; expected unique names")
            seen.add(name)
    online = data["exp_opts"]["online_clients"]
    if online is not None and online > len(clients):
        raise SpecError("exp_opts.online_clients",
                        f"exp_opts.online_clients = {online}, but only {len(clients)} clients are defined")
    least = data["exp_opts"]["min_clients"]
    if least > (online or len(clients)):
        raise SpecError("exp_opts.min_clients",
                        f"exp_opts.min_clients = {least}, but only {online or len(clients)} clients train per round")
    stems = [name.removesuffix(".gz") for name in data["outputs"]]
    twice = next((stem for stem in stems if stems.count(stem) > 1), None)
    if twice is not None:
        both = [name for name in data["outputs"] if name.removesuffix(".gz") == twice]
        raise SpecError("outputs", f"expected {twice} at most once, found {', '.join(both)}")
    for i, device in enumerate(data["device"]):
        if not DEVICE_NAME.match(device):
            raise SpecError(f"device[{i}]", f"expected 'cpu', 'cuda' or 'cuda:N', found {device!r}")
    if len(set(data["device"])) != len(data["device"]):
        raise SpecError("device", f"expected distinct devices, found {data['device']}")
    ddir = data["datasets_dir"]
    if ddir is not None and not Path(ddir).is_dir():
        raise SpecError("datasets_dir", f"expected an existing directory, found no directory at {ddir!r}")
    for key in ("logs_dir", "checkpoints_dir"):
        problem = _not_creatable(Path(data[key]))
        if problem:
            raise SpecError(key, f"expected a writable directory, found {problem}")
    _one_batch_size(data["task_opts"])
    _legacy_defaults(data)


def _legacy_defaults(data: dict[str, Any]) -> None:
    """Settings ``exp_opts.legacy`` changes where the file leaves them unsaid: the FedSTIL runner's mAP and
    torch's StepLR ``gamma`` of 0.1 (fedevents' own default is 0.5). A value the file gives wins."""
    legacy = data["exp_opts"]["legacy"]
    if data["task_opts"]["map_mode"] is None:
        data["task_opts"]["map_mode"] = "fedstil-runner" if legacy else "standard"
    scheduler = data["scheduler_opts"]
    if legacy and scheduler.get("name") == "step_lr" and "gamma" not in scheduler:
        scheduler["gamma"] = 0.1


def _one_batch_size(opts: dict[str, Any]) -> None:
    """``task_opts.batch_size`` and FedSTIL's ``task_opts.loader_opts.batch_size`` are one setting; the
    validated config carries it once, as ``task_opts.batch_size``."""
    plain, loader = opts["batch_size"], opts["loader_opts"].pop("batch_size")
    if plain is not None and loader is not None and plain != loader:
        raise SpecError("task_opts.loader_opts.batch_size",
                        f"task_opts.loader_opts.batch_size = {loader}, but task_opts.batch_size = {plain}; "
                        f"expected one batch size (give it once)")
    opts["batch_size"] = loader if loader is not None else plain if plain is not None else 32


def _not_creatable(folder: Path) -> str | None:
    """Why ``folder`` could not be used or made (nothing is created here), or None."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            return None
        probe = probe.parent
    if not probe.is_dir():
        return f"{str(folder)!r}, which is under a file ({probe})" if probe != folder else f"{str(folder)!r} is a file"
    if not os.access(probe, os.W_OK | os.X_OK) or not _can_make_a_folder_in(probe):
        return f"{str(folder)!r}, and {probe} is not writable"
    return None


def _can_make_a_folder_in(folder: Path) -> bool:
    # os.access trusts permission bits, which root bypasses; /proc and read-only mounts refuse anyway.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedevents-probe-", dir=folder))
    except OSError:
        return False
    return True


def deep_merge(lower: Mapping[str, Any], upper: Mapping[str, Any]) -> dict[str, Any]:
    """``upper`` over ``lower``: mappings merge key by key at every depth, anything else replaces."""
    out = dict(lower)
    for key, value in upper.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_path(target: dict[str, Any], parts: list[str], value: Any, path: Path) -> None:
    node: Any = target
    for depth, part in enumerate(parts[:-1]):
        key: Any = int(part) if isinstance(node, list) and part.isdigit() else part
        if isinstance(node, dict):
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {'.'.join(parts)}: {where} is not a mapping or list index in {path}")
    last: Any = parts[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError(f"--set {'.'.join(parts)}: expected a list index below {len(node)}, found {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def _origin(
    key_path: str,
    experiment: Mapping[str, Any],
    overrides: list[tuple[list[str], Any, str]],
    common_name: str | None,
    path: Path,
) -> str:
    """The file, flag or ``--set`` a key path came from, for the front of an error message (last one wins)."""
    dotted = re.sub(r"\[(\d+)\]", r".\1", key_path)
    for parts, _, label in reversed(overrides):
        joined = ".".join(parts)
        if dotted == joined or dotted.startswith(joined + "."):
            return label
    if common_name is None or _has_path(experiment, dotted.split(".")):
        return str(path)
    return f"{path} (with {common_name})"


def _has_path(node: Any, parts: list[str]) -> bool:
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, dict) and isinstance(node.get("defaults"), dict) and part in node["defaults"]:
            node = node["defaults"][part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    problem = problem[len("found "):] if problem.startswith("found ") else problem
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)
