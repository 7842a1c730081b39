"""Stable seeds, so every random draw is named by what it is for rather than by when it happens.

All randomness in ``fedevents.federated`` comes from ``(seed, round, client, purpose)`` through
``derive_seed``; results therefore do not depend on thread timing or on the order in which clients train.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "generator"]

_MASK_63 = (1 << 63) - 1


def _encode(part: int | str) -> bytes:
    # A type tag and a length prefix keep ("ab", "c") and ("a", "bc"), or 1 and "1", apart.
    if isinstance(part, bool) or not isinstance(part, (int, str)):
        raise TypeError(f"derive_seed: expected int or str parts, found {type(part).__name__} {part!r}")
    tag, body = (b"i", str(part).encode()) if isinstance(part, int) else (b"s", part.encode("utf-8"))
    return tag + len(body).to_bytes(4, "big") + body


def derive_seed(seed: int, *parts: int | str) -> int:
    """Derive a 63-bit seed from a base seed and the parts naming one use of randomness.

    The value is a blake2b digest, so it is the same in every process and on every platform
    (Python's ``hash()`` is salted per process and must never be used for this).
    """
    digest = hashlib.blake2b(digest_size=8)
    for part in (seed, *parts):
        digest.update(_encode(part))
    return int.from_bytes(digest.digest(), "big") & _MASK_63


def generator(seed: int, *parts: int | str) -> torch.Generator:
    """Give a CPU ``torch.Generator`` seeded with ``derive_seed(seed, *parts)``."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *parts))
    return gen
