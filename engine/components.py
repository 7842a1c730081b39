"""Checking the parts of a config that name components: the method, model, data set, criteria, optimizer, scheduler.

Each component declares its options (see ``vocabulary.py``), so a typo in a user plugin's option gets the
same did-you-mean as a built-in's. FedSTIL files put a method's options in ``model_opts`` and ``server``;
they are the method's options exactly as ``method_opts`` holds them, and the validated config carries
them in ``method_opts`` only (under the method's own names), so there is one source of truth.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, Mapping

from .schema import SpecError, Str, describe
from .vocabulary import Plugin, Vocabulary, option_spec

__all__ = ["check_components", "infer_dataset"]

#: ``server`` keys the engine reads itself; any other must be an option of the method.
SERVER_KEYS = {"server_name": "server"}
_SERVER_NAME = Str(safe_name=True)
#: Keys of a component's section that fedevents reads itself, never handed to the component.
ENGINE_OPTIONS = {"optimizer_opts": {"name", "keep_state"}, "scheduler_opts": {"name"}}


def check_components(data: dict[str, Any], vocabulary: Vocabulary, config_dir: Path | None) -> None:
    """Check and normalise every component-naming section of ``data`` in place; SpecError at the key to fix."""
    if data["exp_method"] is None:
        names = " or ".join(filter(None, [", ".join(vocabulary.names("methods")), "'package.module:Name'"]))
        raise SpecError("exp_method", f"missing; expected one of {names}")
    method = _describe(vocabulary, "methods", data["exp_method"], "exp_method", config_dir)
    model = _describe(vocabulary, "models", data["model_opts"]["name"], "model_opts.name", config_dir)
    _method_options(data, method, model)
    if model is not None:
        data["model_opts"] = _options(data["model_opts"], model, "model_opts", extra={"name"})
    fedstil_format = _dataset(data, vocabulary, model, config_dir)
    for key, kind in (("optimizer_opts", "optimizers"), ("scheduler_opts", "schedulers")):
        plugin = _describe(vocabulary, kind, data[key]["name"], f"{key}.name", config_dir)
        if plugin is not None:
            data[key] = _options(data[key], plugin, key, extra=ENGINE_OPTIONS[key])
    if data["optimizer_opts"].get("keep_state") is None:
        # FedSTIL's runner empties the optimizer after each round; its files, and exp_opts.legacy, keep that.
        data["optimizer_opts"]["keep_state"] = not (fedstil_format or data["exp_opts"].get("legacy"))
    criteria = data["criterion_opts"]
    if isinstance(criteria, list):
        data["criterion_opts"] = [_criterion(c, vocabulary, f"criterion_opts[{i}]", config_dir)
                                  for i, c in enumerate(criteria)]
    else:
        data["criterion_opts"] = _criterion(criteria, vocabulary, "criterion_opts", config_dir)


def _describe(vocabulary: Vocabulary, kind: str, name: str, where: str, config_dir: Path | None) -> Plugin | None:
    try:
        return vocabulary.describe(kind, name, config_dir)
    except ValueError as exc:
        raise SpecError(where, str(exc)) from None


def _criterion(opts: dict[str, Any], vocabulary: Vocabulary, where: str, config_dir: Path | None) -> dict[str, Any]:
    plugin = _describe(vocabulary, "criteria", opts["name"], f"{where}.name", config_dir)
    return opts if plugin is None else _options(opts, plugin, where, extra={"name"})


def _options(given: Mapping[str, Any], plugin: Plugin, where: str, *, extra: set[str] = frozenset()) -> dict[str, Any]:
    """``given`` checked against ``plugin``'s options, its defaults filled in (keys in ``extra`` kept as given)."""
    out = {key: given[key] for key in extra if key in given}
    for key, value in given.items():
        if key in extra:
            continue
        if key not in plugin.options:
            raise _unknown(f"{where}.{key}", key, plugin.options, plugin.name)
        out[key] = option_spec(plugin.options[key]).check(value, f"{where}.{key}")
    for key, default in plugin.options.items():
        out.setdefault(key, default)
    return out


def _unknown(where: str, key: str, known: Iterable[str], owner: str) -> SpecError:
    names = sorted(known)
    hint = difflib.get_close_matches(key, names, n=1)
    extra = f"; did you mean {hint[0]!r}?" if hint else f"; known keys for {owner}: {', '.join(names) or 'none'}"
    return SpecError(where, f"unknown key{extra}")


# --- the method's options, from method_opts, model_opts and server ------------------------------------


def _method_options(data: dict[str, Any], method: Plugin | None, model: Plugin | None) -> None:
    """Gather the method's options from all three places into ``method_opts``; refuse conflicts and strays."""
    server = dict(data["server"])
    name = server.pop("server_name", SERVER_KEYS["server_name"])
    data["server"] = {"server_name": _SERVER_NAME.check(name, "server.server_name")}
    if method is None:
        return
    found: dict[str, tuple[str, Any]] = {}
    for key, value in data["method_opts"].items():
        _take(found, method, "method_opts", key, value)
    model_keys = set(model.options) | {"name"} if model is not None else None
    for key in [k for k in data["model_opts"] if model_keys is not None and k not in model_keys]:
        value = data["model_opts"].pop(key)
        if not _is_method_key(method, key):
            raise _unknown(f"model_opts.{key}", key, (model_keys or set()) | _method_keys(method),
                           f"model {model.name if model else '?'} or method {method.name}")
        _take(found, method, "model_opts", key, value)
    for key, value in server.items():
        if not _is_method_key(method, key):
            raise _unknown(f"server.{key}", key, set(SERVER_KEYS) | _method_keys(method), f"the {method.name} server")
        _take(found, method, "server", key, value)
    data["method_opts"] = {key: value for key, (_, value) in found.items()}


def _method_keys(method: Plugin) -> set[str]:
    return set(method.options) | set(method.aliases)


def _is_method_key(method: Plugin, key: str) -> bool:
    return key in method.options or key in method.aliases


def _take(found: dict[str, tuple[str, Any]], method: Plugin, section: str, key: str, value: Any) -> None:
    """Record option ``key`` (given in ``section``) under the method's own name; same option twice must agree."""
    where = f"{section}.{key}"
    if key in method.aliases:
        target = method.aliases[key]
        if target is None:
            return  # read by the original, never used: accepted, no effect (docs/config.md)
        option, factor = target
        value = option_spec(1.0).check(value, where) * factor
        default = method.options.get(option)
        if isinstance(default, int) and not isinstance(default, bool) and float(value).is_integer():
            value = int(value)
    elif key in method.options:
        option = key
        value = option_spec(method.options[key]).check(value, where)
    else:
        raise _unknown(where, key, _method_keys(method), method.name)
    if option in found and found[option][1] != value:
        first, earlier = found[option]
        raise SpecError(where, f"{where} gives {method.name}'s option {option} = {value!r}, but {first} gave "
                               f"{earlier!r}; expected one value")
    found.setdefault(option, (where, value))


# --- the data set: given, or inferred from the model and the folders -------------------------------------


def _dataset(data: dict[str, Any], vocabulary: Vocabulary, model: Plugin | None, config_dir: Path | None) -> bool:
    """Check or infer ``task_opts.dataset``; tell whether the experiment is a FedSTIL-format one (a ReID
    data set inferred from its task folders, as FedSTIL files never name one)."""
    opts = data["task_opts"]
    inferred = opts["dataset"] is None
    if inferred:
        opts["dataset"] = infer_dataset(data, model)
    dataset = _describe(vocabulary, "datasets", opts["dataset"], "task_opts.dataset", config_dir)
    if dataset is None:
        return False
    opts["dataset_opts"] = _options(opts["dataset_opts"], dataset, "task_opts.dataset_opts")
    if "reid" in dataset.tags and data["datasets_dir"] is None:
        raise SpecError("datasets_dir", f"expected the folder of the ReID tasks for task_opts.dataset "
                                        f"{opts['dataset']}, found none")
    if model is not None and dataset.tags and not dataset.tags & model.tags:
        fits = ", ".join(n for n in vocabulary.names("models") if _model_tags(vocabulary, n) & dataset.tags)
        raise SpecError("model_opts.name", f"expected one of {fits} for task_opts.dataset {opts['dataset']}, "
                                           f"found {describe(model.name)}")
    if "reid" in dataset.tags:
        if data["model_opts"].get("num_classes") is None:
            raise SpecError("model_opts.num_classes", f"expected the number of training identities for "
                                                      f"task_opts.dataset {opts['dataset']}, found none")
    return inferred and "reid" in dataset.tags


def _model_tags(vocabulary: Vocabulary, name: str) -> frozenset[str]:
    plugin = vocabulary.describe("models", name, None)
    return plugin.tags if plugin is not None else frozenset()


def infer_dataset(data: Mapping[str, Any], model: Plugin | None) -> str:
    """The data set a config without ``task_opts.dataset`` means (the rule docs/config.md states).

    A ReID backbone whose tasks are all folders under ``datasets_dir`` with a ``train`` split (the FedSTIL
    layout) means ``reid``; any other model means ``synthetic``. A ReID backbone without such folders is
    an error naming the first task that is missing, since no other data set fits it.
    """
    if model is None or "reid" not in model.tags:
        return "synthetic"
    root = data["datasets_dir"]
    if root is None:
        raise SpecError("datasets_dir", f"expected the folder of the ReID tasks for model {model.name} "
                                        f"(task_opts.dataset not given), found none")
    clients = data["clients"]
    tasks = clients["tasks"] if isinstance(clients, dict) else [t for c in clients for t in c["tasks"]]
    for task in dict.fromkeys(tasks):
        if not (Path(root) / task / "train").is_dir():
            raise SpecError("task_opts.dataset", f"expected task folders <datasets_dir>/<task>/train for ReID "
                                                 f"model {model.name}, found no {Path(root) / task / 'train'} "
                                                 f"(or name the data set in task_opts.dataset)")
    return "reid"
