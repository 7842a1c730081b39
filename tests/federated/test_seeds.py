from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fedevents.federated import derive_seed, generator


def test_derive_seed_is_pinned() -> None:
    assert derive_seed(0, "a") == 8861040733919665253
    assert derive_seed(42, 3, "client-7", "shuffle") == 8875352769738918623


def test_derive_seed_is_the_same_in_another_process_with_another_hash_salt() -> None:
    code = "from fedevents.federated import derive_seed; print(derive_seed(42, 3, 'client-7', 'shuffle'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    command = [sys.executable, "-W", "ignore", "-c", code]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "8875352769738918623"


def test_different_parts_give_different_seeds() -> None:
    seeds = {
        derive_seed(1),
        derive_seed(2),
        derive_seed(1, "a"),
        derive_seed(1, "a", "b"),
        derive_seed(1, "ab"),
        derive_seed(1, "b", "a"),
        derive_seed(1, 1),
        derive_seed(1, "1"),
    }
    assert len(seeds) == 8


def test_seeds_fit_in_63_bits() -> None:
    assert all(0 <= derive_seed(7, i) < 2**63 for i in range(1000))


def test_parts_other_than_int_or_str_are_refused() -> None:
    with pytest.raises(TypeError, match="expected int or str parts, found float 1.5"):
        derive_seed(0, 1.5)  # type: ignore[arg-type]


def test_generator_draws_the_same_numbers_for_the_same_parts() -> None:
    a = torch.rand(5, generator=generator(3, "x", 1))
    b = torch.rand(5, generator=generator(3, "x", 1))
    c = torch.rand(5, generator=generator(3, "x", 2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
