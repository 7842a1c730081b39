from __future__ import annotations

import math

import pytest
import torch

from fedevents.federated import MODELS, build_model, empty_model, generator


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_mlp_maps_inputs_to_class_scores() -> None:
    model = build_model({"name": "mlp", "hidden": [64, 64]}, [32], 10)
    assert model(torch.zeros(4, 32)).shape == (4, 10)
    assert _count(model) == (32 * 64 + 64) + (64 * 64 + 64) + (64 * 10 + 10)


def test_the_mlp_flattens_image_inputs() -> None:
    model = build_model({"name": "mlp", "hidden": [8]}, [1, 12, 12], 3)
    assert model(torch.zeros(2, 1, 12, 12)).shape == (2, 3)


def test_the_cnn_maps_images_to_class_scores() -> None:
    model = build_model({"name": "cnn", "channels": [16, 32]}, [1, 12, 12], 10)
    assert model(torch.zeros(2, 1, 12, 12)).shape == (2, 10)
    assert _count(model) == (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 10 + 10)


def test_the_cnn_takes_more_blocks_than_the_image_has_halvings() -> None:
    model = build_model({"name": "cnn", "channels": [4, 4, 4, 4, 4, 4]}, [3, 8, 8], 5)
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 5)


def test_an_unknown_model_name_is_named() -> None:
    assert MODELS == ("cnn", "mlp")
    with pytest.raises(ValueError) as info:
        build_model({"name": "resnet"}, [32], 10)
    assert str(info.value) == "model_opts.name: expected one of cnn, mlp, found 'resnet'"


def test_the_cnn_refuses_vector_inputs() -> None:
    with pytest.raises(ValueError) as info:
        build_model({"name": "cnn", "channels": [8]}, [32], 10)
    assert str(info.value) == "model_opts.name = 'cnn': expected input_shape [C, H, W], found [32]"


def test_bad_layer_sizes_are_named() -> None:
    with pytest.raises(ValueError, match=r"model_opts.hidden: expected a list of positive ints, found \[64, 0\]"):
        build_model({"name": "mlp", "hidden": [64, 0]}, [32], 10)


def test_the_same_generator_seed_gives_the_same_weights_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    a = build_model({"name": "mlp", "hidden": [16]}, [8], 4, generator=generator(1, "init"))
    assert torch.equal(torch.rand(3), expected_draw)
    b = build_model({"name": "mlp", "hidden": [16]}, [8], 4, generator=generator(1, "init"))
    c = build_model({"name": "mlp", "hidden": [16]}, [8], 4, generator=generator(2, "init"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.state_dict()["1.weight"], c.state_dict()["1.weight"])


def test_initial_weights_lie_in_pytorchs_default_range() -> None:
    model = build_model({"name": "mlp", "hidden": [64]}, [32], 10, generator=generator(0, "init"))
    first, last = model[1], model[3]
    assert first.weight.abs().max() <= 1 / math.sqrt(32)
    assert first.weight.std().item() == pytest.approx(1 / math.sqrt(32 * 3), rel=0.1)  # std of U(-b, b)
    assert last.bias.abs().max() <= 1 / math.sqrt(64)


def test_an_empty_model_has_the_shapes_to_load_a_state_into() -> None:
    source = build_model({"name": "cnn", "channels": [4]}, [1, 6, 6], 3)
    target = empty_model({"name": "cnn", "channels": [4]}, [1, 6, 6], 3, device="cpu")
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(target(x), source(x))
