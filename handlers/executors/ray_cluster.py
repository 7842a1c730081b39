"""The Ray side of the ``ray`` executor: one connection per process, and the devices a cluster's nodes have.

A process holds at most one Ray connection, so every ``RayExecutor`` of a process shares it (several
experiments built by one command): the first opens it, the last one closed ends it. ``ray.address: local``
starts a private Ray that ends with the connection; ``auto`` or ``HOST:PORT`` joins a running cluster and
only disconnects from it. A process that was connected before fedevents came keeps its connection.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fedevents.engine.errors import ConfigError, DeviceError

__all__ = ["Place", "connect", "disconnect", "import_ray", "places"]

_ADDRESS = re.compile(r"(local|auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5})")
_CUDA = re.compile(r"cuda(?::(\d+))?")
#: Keys that size a private Ray; a joined cluster was sized by whoever started it.
_LOCAL_ONLY = ("num_cpus", "object_store_mb", "tmpdir")


def import_ray(where: str) -> Any:
    """The ``ray`` module, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"{where}: executor ray: expected the ray package (pip install 'fedevents[ray]'), "
                          f"found it not installed") from None
    return ray


@dataclass
class _Session:
    address: str
    users: int
    #: False when the process was connected before fedevents: then fedevents never disconnects it.
    ours: bool


_lock = threading.Lock()
_session: _Session | None = None


def connect(opts: Mapping[str, Any], where: str) -> None:
    """Connect this process to the cluster ``opts`` (the config's ``ray:`` section) names, or share the
    connection an earlier executor of this process opened to the same address."""
    global _session
    check_options(opts, where)
    ray = import_ray(where)
    address = opts["address"]
    with _lock:
        if _session is not None:
            if _session.address != address:
                raise ConfigError(f"{where}.address: expected {_session.address!r} like the other experiments "
                                  f"of this run (a process joins one Ray cluster), found {address!r}")
            _session.users += 1
            return
        if ray.is_initialized():
            _session = _Session(address, 1, ours=False)
            return
        _probe(opts, where)
        try:
            ray.init(**init_kwargs(opts))
        except ConnectionError as exc:
            raise DeviceError(f"{where}.address: expected a running Ray cluster at {address!r}, found none "
                              f"({exc})") from None
        _session = _Session(address, 1, ours=True)


def disconnect() -> None:
    """Give up this executor's share of the connection; the last share ends it (and a private Ray with it)."""
    global _session
    import ray

    with _lock:
        if _session is None:
            return
        _session.users -= 1
        if _session.users > 0:
            return
        ours, _session = _session.ours, None
    if ours:
        ray.shutdown()


def _probe(opts: Mapping[str, Any], where: str) -> None:
    """Refuse a cluster address nothing answers at, within ``ray.timeout_s``: ``ray.init`` would wait on it
    without end."""
    address = opts["address"]
    if address == "local":
        return
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

            address = canonicalize_bootstrap_address("auto") or ""
        except Exception:  # no cluster recorded on this machine: ray.init says so at once
            return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=opts["timeout_s"]).close()
    except (OSError, ValueError) as exc:
        raise DeviceError(f"{where}.address: expected a running Ray cluster at {opts['address']!r}"
                          f"{'' if address == opts['address'] else f' ({address})'}, found nothing answering "
                          f"there ({exc})") from None


def check_options(opts: Mapping[str, Any], where: str) -> None:
    """``ray.address`` is ``local``, ``auto`` or ``HOST:PORT``; sizes are given only for a private Ray."""
    address = opts["address"]
    if not _ADDRESS.fullmatch(address):
        raise ConfigError(f"{where}.address: expected 'local', 'auto' or 'HOST:PORT', found {address!r}")
    if address != "local":
        for key in _LOCAL_ONLY:
            if opts.get(key) is not None:
                raise ConfigError(f"{where}.{key}: expected only with ray.address: local (a running cluster "
                                  f"keeps the sizes it was started with), found {opts[key]!r} with address "
                                  f"{address!r}")


def init_kwargs(opts: Mapping[str, Any]) -> dict[str, Any]:
    """``ray.init``'s arguments for ``opts``: ``address="local"`` always starts a new Ray, never one that
    another program left running on the machine."""
    # Workers' own output stays in the session's log files: the driver's console is the run's summary.
    kwargs: dict[str, Any] = dict(address=opts["address"], logging_level=logging.WARNING,
                                  include_dashboard=False, log_to_driver=False)
    if opts["address"] == "local":
        if opts.get("num_cpus") is not None:
            kwargs["num_cpus"] = opts["num_cpus"]
        if opts.get("object_store_mb") is not None:
            kwargs["object_store_memory"] = opts["object_store_mb"] * 2**20
        if opts.get("tmpdir") is not None:
            kwargs["_temp_dir"] = opts["tmpdir"]
    return kwargs


@dataclass(frozen=True)
class Place:
    """One device of one node: ``name`` is its device name in the pool and in events."""

    name: str
    node_id: str
    node_ip: str
    #: The configured device (``cpu`` or ``cuda:N``) this place is.
    device: str
    #: CPUs the node has (the actors of its ``cpu`` slots share them).
    cpus: int

    @property
    def local(self) -> str:
        """The device as torch names it inside the actor: Ray shows a GPU actor only its own GPU."""
        return "cpu" if self.device == "cpu" else "cuda:0"


def places(nodes: Sequence[Mapping[str, Any]], devices: Sequence[str], where: str) -> list[Place]:
    """The configured ``devices`` on every alive node of ``nodes`` (``ray.nodes()``), in a stable order.

    With one node, a place is named like the device (``cpu``, ``cuda:0``); with several, ``<node-ip>/<device>``
    (``<node-ip>-<node-id prefix>/<device>`` when nodes share an address, as on a test cluster).
    """
    alive = sorted((n for n in nodes if n.get("Alive")), key=lambda n: (n["NodeManagerAddress"], n["NodeID"]))
    wanted = [_canonical(d, where) for d in devices]
    labels = _node_labels(alive)
    found: list[Place] = []
    for device in wanted:
        here = [n for n in alive if device in _devices_of(n)]
        if not here:
            have = sorted({d for n in alive for d in _devices_of(n)}) or ["nothing"]
            raise DeviceError(f"{where}: device {device!r}: expected a device some node of the Ray cluster has "
                              f"({', '.join(have)} on {len(alive)} alive node(s)), found none")
        for node in here:
            name = device if len(alive) == 1 else f"{labels[node['NodeID']]}/{device}"
            found.append(Place(name, node["NodeID"], node["NodeManagerAddress"], device,
                               int(node["Resources"].get("CPU", 0))))
    return found


def _canonical(device: str, where: str) -> str:
    if device == "cpu":
        return device
    match = _CUDA.fullmatch(device)
    if match is None:
        raise DeviceError(f"{where}: device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    return f"cuda:{match.group(1) or 0}"


def _devices_of(node: Mapping[str, Any]) -> list[str]:
    resources = node["Resources"]
    cpu = ["cpu"] if resources.get("CPU", 0) >= 1 else []
    return cpu + [f"cuda:{i}" for i in range(int(resources.get("GPU", 0)))]


def _node_labels(nodes: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    ips = [n["NodeManagerAddress"] for n in nodes]
    return {n["NodeID"]: n["NodeManagerAddress"] if ips.count(n["NodeManagerAddress"]) == 1
            else f"{n['NodeManagerAddress']}-{n['NodeID'][:8]}" for n in nodes}
