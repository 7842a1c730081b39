"""Loading experiments in the FedSTIL format: common file, ``defaults`` merged deeply, ``--set`` overrides.

Precedence, lowest first: built-in defaults < ``common.yaml`` top-level keys and its ``defaults`` block <
the experiment file < ``--set key.path=value``. Mappings merge key by key at every depth; any other value
(a list included) replaces the one below it. YAML is read with the safe loader only, so a config can
never construct Python objects.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from .errors import ConfigError
from .yamlsafe import YamlProblem, load_yaml
from .schema import (
    AnyMapping,
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

__all__ = ["ExperimentConfig", "ClientSet", "load_experiments", "load_experiment", "parse_override", "COMMON_KEYS",
           "EXECUTORS"]

#: Keys a common file holds at its top level (besides ``defaults``).
COMMON_KEYS = ("datasets_dir", "checkpoints_dir", "logs_dir", "parallel", "device", "executor", "ray")
METHODS = ("fedavg",)
#: Model names by task kind; tests check they match fedevents.federated's builders.
MODELS = (
    "cnn", "mlp", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "swin_transformer_tiny", "swin_transformer_small", "swin_transformer_base", "swin_transformer_large",
)
#: Where client work runs (docs/executors.md); fedevents.handlers.executors holds one class per name.
EXECUTORS = ("process", "ray", "thread")
DEVICE_NAME = re.compile(r"^(cpu|cuda|cuda:\d+)$")


def _schema(methods: Sequence[str]) -> Section:
    name = Str(safe_name=True)
    client = Section({"client_name": Field(name), "tasks": Field(ListOf(name, min_len=1))})
    compact = Section(
        {
            "count": Field(Int(min=1)),
            "tasks": Field(ListOf(name, min_len=1)),
            "prefix": Field(Str(safe_name=True), "client-"),
        }
    )
    criterion = Section(
        {
            "name": Field(Str(choices=("cross_entropy", "triplet"))),
            "epsilon": Field(Float(min=0.0, below=1.0), 0.0),
            "margin": Field(Float(min=0.0), 0.3),
            "weight": Field(Float(positive=True), 1.0),
            "num_classes": Field(Int(min=1), None),
        }
    )
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
            "exp_method": Field(Str(choices=tuple(methods))),
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
                        "failure_policy": Field(Str(choices=("fail", "tolerate")), "fail"),
                        "min_clients": Field(Int(min=1), 1),
                        "client_timeout_s": Field(Float(positive=True), None),
                        "checkpoint_interval": Field(Int(min=1), 1),
                        "checkpoint_keep": Field(Int(min=1), 2),
                        "clients_in_memory": Field(Int(min=1), 256),
                        "torch_threads": Field(Int(min=1), 1),
                    }
                ),
                {},
            ),
            "model_opts": Field(
                Section(
                    {
                        "name": Field(Str(choices=MODELS), "mlp"),
                        "hidden": Field(ListOf(Int(min=1)), [64, 64]),
                        "channels": Field(ListOf(Int(min=1), min_len=1), [16, 32]),
                        "num_classes": Field(Int(min=1), None),
                        "last_stride": Field(Int(min=1), 1),
                        "neck": Field(Str(choices=("bnneck", "no")), "bnneck"),
                        "fine_tuning": Field(ListOf(Str()), []),
                        "pretrained": Field(Str(nullable=True), None),
                        "width": Field(Int(min=1), 64),
                    }
                ),
                {},
            ),
            "optimizer_opts": Field(
                Section(
                    {
                        "name": Field(Str(choices=("adam", "sgd")), "sgd"),
                        "lr": Field(Float(positive=True), 0.05),
                        "momentum": Field(Float(min=0.0), 0.0),
                        "weight_decay": Field(Float(min=0.0), 0.0),
                    }
                ),
                {},
            ),
            "scheduler_opts": Field(
                Section(
                    {
                        "name": Field(Str(choices=("cosine", "none", "step_lr")), "none"),
                        "step_size": Field(Int(min=1), 10),
                        "gamma": Field(Float(positive=True), 0.5),
                        "t_max": Field(Int(min=1), 10),
                    }
                ),
                {},
            ),
            "criterion_opts": Field(
                OneOf(
                    [(lambda v: isinstance(v, dict) or v is None, criterion),
                     (lambda v: isinstance(v, list), ListOf(criterion, min_len=1))],
                    "a criterion mapping (name, ...) or a list of them",
                ),
                {"name": "cross_entropy"},
            ),
            "task_opts": Field(
                Section(
                    {
                        "dataset": Field(Str(choices=("reid", "synthetic")), "synthetic"),
                        "map_mode": Field(Str(choices=("standard", "first-match")), "standard"),
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
                        "batch_size": Field(Int(min=1), 32),
                        "synthetic": Field(
                            Section(
                                {
                                    "num_classes": Field(Int(min=2), 10),
                                    "input_shape": Field(ListOf(Int(min=1), min_len=1, max_len=3), [32]),
                                    "samples_per_client": Field(Int(min=1), 200),
                                    "label_skew": Field(Float(positive=True), 0.5),
                                    "test_size": Field(Int(min=1), 100),
                                    "noise": Field(Float(min=0.0), 1.0),
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
    where = label or f"--set {text}"
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


def load_experiments(
    paths: Sequence[str | os.PathLike[str]],
    *,
    common: str | os.PathLike[str] | None = None,
    overrides: Iterable[str | tuple[str, str]] = (),
    methods: Sequence[str] = METHODS,
) -> list[ExperimentConfig]:
    """Every experiment file merged onto the common file, overridden and validated, before anything runs.

    An override is ``"key.path=value"`` or ``(label, "key.path=value")``, the label naming where it came
    from in messages (a flag such as ``--device``).
    """
    if not paths:
        raise ConfigError("expected at least one experiment file, found none")
    base: dict[str, Any] = {}
    if common is not None:
        base = _common_layer(read_yaml(common), str(common))
    parsed = [_labelled(o) for o in overrides]
    return [_load_one(Path(p), base, parsed, methods, str(common) if common else None) for p in paths]


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
    base: dict[str, Any],
    overrides: list[tuple[list[str], Any, str]],
    methods: Sequence[str],
    common_name: str | None,
) -> ExperimentConfig:
    experiment = read_yaml(path)
    own = _common_layer(experiment, str(path)) if "defaults" in experiment else experiment
    merged = deep_merge(base, own)
    for parts, value, _ in overrides:
        _set_path(merged, parts, value, path)
    try:
        data = _schema(methods).check(merged, "")
        clients = ClientSet.from_config(data["clients"])
        _cross_check(data, clients)
    except SpecError as exc:
        where = _origin(exc.path, experiment, overrides, common_name, path)
        text = exc.message if exc.message.startswith(exc.path) else f"{exc.path}: {exc.message}"
        raise ConfigError(f"{where}: {text}") from None
    if data["exp_opts"]["online_clients"] is None:
        data["exp_opts"]["online_clients"] = len(clients)
    return ExperimentConfig(source=str(path), data=data, clients=clients)


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
    if data["task_opts"]["dataset"] == "reid":
        if ddir is None:
            raise SpecError("datasets_dir", "expected the folder of the ReID tasks for task_opts.dataset reid, found none")
        if data["model_opts"]["num_classes"] is None:
            raise SpecError("model_opts.num_classes",
                            "expected the number of training identities for task_opts.dataset reid, found none")


def _not_creatable(folder: Path) -> str | None:
    """Why ``folder`` could not be used or made (nothing is created here), or None."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            return None
        probe = probe.parent
    if not probe.is_dir():
        return f"{str(folder)!r}, which is under a file ({probe})" if probe != folder else f"{str(folder)!r} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{str(folder)!r}, and {probe} is not writable"
    return None


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
