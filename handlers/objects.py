"""Tensors stored once for checkpoints, however many states hold them.

Every client's model holds the same frozen backbone as the global model, and a client that did not train
since the last checkpoint holds exactly what it held then. A checkpoint therefore splits its state into a
skeleton (plain data, each tensor replaced by ``{"@tensor": <key>}``) and the tensors by key; equal tensors
get equal keys, and only tensors whose key no kept checkpoint has stored yet are written.

A tensor seen before keeps its key without being read: the states fedevents keeps are never changed in
place (the tensor's version counter guards that). A new tensor is compared with the known tensors of the
same dtype, shape and a 16-element sample, and gets the key of the one it equals, or a new key. Reading a
few elements instead of hashing every byte matters: a freshly trained layer matches nothing, and hashing
hundreds of MB per checkpoint would cost seconds.
"""

from __future__ import annotations

import uuid
import weakref
from typing import Any, Mapping

import torch

__all__ = ["REF", "TensorKeys", "join", "references", "split"]

#: The key of a tensor reference in a checkpoint's skeleton.
REF = "@tensor"
_SAMPLE = 16


class TensorKeys:
    """Keys for tensors: equal tensors (alive at the same time) share a key, and a known tensor is never read."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[weakref.ref[torch.Tensor], int, str]] = {}
        self._by_probe: dict[tuple[Any, ...], list[tuple[weakref.ref[torch.Tensor], int, str]]] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def key(self, tensor: torch.Tensor) -> str:
        """Give ``tensor``'s key: its own if seen before, else that of an equal known tensor, else a new one."""
        hit = self._by_id.get(id(tensor))
        if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
            return hit[2]
        probe = _probe(tensor)
        for ref, version, key in self._by_probe.get(probe, ()):
            other = ref()
            if other is not None and other._version == version and torch.equal(other, tensor):
                self.remember(tensor, key, probe=probe)
                return key
        key = uuid.uuid4().hex
        self.remember(tensor, key, probe=probe)
        return key

    def remember(self, tensor: torch.Tensor, key: str, *, probe: tuple[Any, ...] | None = None) -> None:
        """Record that ``tensor`` is stored under ``key`` (it was just written or loaded under it)."""
        ident, by_id, by_probe = id(tensor), self._by_id, self._by_probe
        probe = _probe(tensor) if probe is None else probe

        def forget(ref: weakref.ref[torch.Tensor]) -> None:
            # Only this tensor's entries: another tensor may have been given the same id since.
            if ident in by_id and by_id[ident][0] is ref:
                del by_id[ident]
            same = [entry for entry in by_probe.get(probe, ()) if entry[0] is not ref]
            if same:
                by_probe[probe] = same
            else:
                by_probe.pop(probe, None)

        ref = weakref.ref(tensor, forget)
        by_id[ident] = (ref, tensor._version, key)
        by_probe.setdefault(probe, []).append((ref, tensor._version, key))


def _probe(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Dtype, shape and the bytes of a few evenly spread elements: equal tensors have equal probes."""
    flat = tensor.detach().reshape(-1)
    count = flat.numel()
    if count > _SAMPLE:
        flat = flat[torch.linspace(0, count - 1, _SAMPLE).long()]
    return (str(tensor.dtype), tuple(tensor.shape), flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())


def split(value: Any, keys: TensorKeys, tensors: dict[str, torch.Tensor]) -> Any:
    """Give ``value`` with every tensor replaced by a reference to its key; put the tensors in ``tensors``."""
    if isinstance(value, torch.Tensor):
        key = keys.key(value)
        tensors.setdefault(key, value)
        return {REF: key}
    if isinstance(value, dict):
        return {k: split(item, keys, tensors) for k, item in value.items()}
    if isinstance(value, list):
        return [split(item, keys, tensors) for item in value]
    if isinstance(value, tuple):
        return tuple(split(item, keys, tensors) for item in value)
    return value


def join(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Undo ``split``: every reference replaced by its tensor (a missing key raises KeyError)."""
    if isinstance(value, dict):
        if len(value) == 1 and REF in value:
            return tensors[value[REF]]
        return {key: join(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [join(item, tensors) for item in value]
    if isinstance(value, tuple):
        return tuple(join(item, tensors) for item in value)
    return value


def references(value: Any) -> set[str]:
    """Give the keys of every tensor reference in a skeleton made by ``split``."""
    if isinstance(value, dict):
        if len(value) == 1 and REF in value:
            return {value[REF]}
        return set().union(*(references(item) for item in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(references(item) for item in value)) if value else set()
    return set()
