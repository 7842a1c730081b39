from __future__ import annotations

import pytest
import torch

from fedevents.federated import check_device


def test_cpu_is_always_there() -> None:
    check_device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_on_a_machine_without_it() -> None:
    with pytest.raises(ValueError) as info:
        check_device("cuda:0")
    assert str(info.value) == "device 'cuda:0': CUDA is not available on this machine"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_past_the_last_gpu_is_refused() -> None:
    count = torch.cuda.device_count()
    check_device(f"cuda:{count - 1}")
    with pytest.raises(ValueError, match=f"expected a device this machine has .*found {count} CUDA devices"):
        check_device(f"cuda:{count}")


@pytest.mark.parametrize("name", ["tpu", "gpu:0", "cuda:", "cuda:x", "CPU", "cuda:0:1", ""])
def test_names_that_are_no_device_are_refused(name: str) -> None:
    with pytest.raises(ValueError) as info:
        check_device(name)
    assert str(info.value) == f"device {name!r}: expected 'cpu', 'cuda' or 'cuda:N'"


def test_a_name_that_is_no_string_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        check_device(0)  # type: ignore[arg-type]
