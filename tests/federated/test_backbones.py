from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedevents.federated.backbones import REID_MODELS, ReidNet, build_reid_model, empty_reid_model
from fedevents.federated.seeds import generator


def _opts(name: str = "resnet18", **extra: object) -> dict[str, object]:
    return {"name": name, "num_classes": 5, "width": 16, **extra}


def _images(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 32, generator=generator(0, "images"))


@pytest.mark.parametrize(("name", "dim"), [("resnet18", 128), ("resnet34", 128), ("resnet50", 512)])
def test_train_mode_gives_logits_and_the_pooled_feature_eval_mode_the_embedding(name: str, dim: int) -> None:
    model = build_reid_model(_opts(name), generator=generator(0, "init"))
    logits, feature = model.train()(_images())
    assert logits.shape == (4, 5)
    assert feature.shape == (4, dim)
    assert model.eval()(_images()).shape == (4, dim)


@pytest.mark.parametrize(
    ("name", "count"),
    [("resnet18", 11_176_512), ("resnet50", 23_508_032), ("resnet101", 42_500_160), ("resnet152", 58_143_808)],
)
def test_the_trunk_at_width_64_has_the_standard_resnet_size_without_its_imagenet_head(name: str, count: int) -> None:
    # The familiar totals 11,689,512, 25,557,032, 44,549,160 and 60,192,808 include a 1000-way head of 513,000
    # (resnet18) or 2,049,000 (the others).
    model = empty_reid_model({"name": name, "num_classes": 751}, device="meta")
    assert sum(p.numel() for p in model.base.parameters()) == count
    assert model.feature_dim == (512 if name == "resnet18" else 2048)


def test_the_stage_depths_are_the_standard_ones() -> None:
    depths = {}
    for name in (n for n in REID_MODELS if n.startswith("resnet")):
        base = empty_reid_model(_opts(name), device="meta").base
        depths[name] = [len(getattr(base, f"layer{i}")) for i in range(1, 5)]
    assert depths == {
        "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3], "resnet50": [3, 4, 6, 3],
        "resnet101": [3, 4, 23, 3], "resnet152": [3, 8, 36, 3],
    }


@pytest.mark.parametrize(("last_stride", "size"), [(1, (4, 2)), (2, (2, 1))])
def test_last_stride_1_keeps_the_final_map_at_a_sixteenth(last_stride: int, size: tuple[int, int]) -> None:
    model = build_reid_model(_opts(last_stride=last_stride), generator=generator(0, "init"))
    assert model.base(_images()).shape[2:] == size


def test_the_bnneck_sits_between_feature_and_classifier_with_a_frozen_shift() -> None:
    model = build_reid_model(_opts(neck="bnneck"), generator=generator(0, "init")).eval()
    x = _images()
    pooled = model.base(x).mean(dim=(2, 3))
    assert torch.allclose(model(x), model.bottleneck(pooled), atol=1e-6)
    assert model.classifier.bias is None
    assert not model.bottleneck.bias.requires_grad
    assert model.bottleneck.weight.requires_grad


def test_without_a_neck_the_embedding_is_the_pooled_feature() -> None:
    model = build_reid_model(_opts(neck="no"), generator=generator(0, "init")).eval()
    x = _images()
    assert model.bottleneck is None
    assert model.classifier.bias is not None
    assert torch.allclose(model(x), model.base(x).mean(dim=(2, 3)), atol=1e-6)


def test_the_same_seed_gives_the_same_weights_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    a = build_reid_model(_opts("resnet50"), generator=generator(1, "init"))
    assert torch.equal(torch.rand(3), expected_draw)
    b = build_reid_model(_opts("resnet50"), generator=generator(1, "init"))
    c = build_reid_model(_opts("resnet50"), generator=generator(2, "init"))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(a.base.conv1.weight, c.base.conv1.weight)


def test_initialisation_is_kaiming_normal_constant_bn_and_a_tiny_classifier() -> None:
    model = build_reid_model(_opts("resnet50", num_classes=751), generator=generator(0, "init"))
    conv = model.base.layer4[0].conv2  # 128 -> 128, 3x3: fan-out 1152
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 1152), rel=0.01)
    assert conv.weight.mean().item() == pytest.approx(0.0, abs=6e-4)  # 5 standard errors of 147,456 draws
    assert model.classifier.weight.std().item() == pytest.approx(0.001, rel=0.01)
    bn = model.base.layer1[0].bn3  # the 1x1 expansion: 16 * 4 channels
    assert torch.equal(bn.weight, torch.ones(16 * 4)) and torch.equal(bn.bias, torch.zeros(16 * 4))
    assert torch.equal(bn.running_var, torch.ones(16 * 4)) and int(bn.num_batches_tracked) == 0


def test_fine_tuning_leaves_only_the_named_submodules_trainable() -> None:
    model = build_reid_model(
        _opts(fine_tuning=["base.layer4", "classifier"]), generator=generator(0, "init")
    ).train()
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base.layer4", "classifier.weight"}
    logits, _ = model(_images())
    logits.sum().backward()
    assert model.base.conv1.weight.grad is None and model.bottleneck.weight.grad is None
    assert model.base.layer4[1].conv2.weight.grad is not None


def test_no_fine_tuning_leaves_everything_but_the_neck_shift_trainable() -> None:
    model = build_reid_model(_opts(fine_tuning=[]), generator=generator(0, "init"))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["bottleneck.bias"]


def test_a_fine_tuning_path_that_names_nothing_is_named() -> None:
    with pytest.raises(ValueError) as info:
        build_reid_model(_opts(fine_tuning=["classifier", "base.layer9"]))
    assert str(info.value) == (
        "model_opts.fine_tuning[1]: expected a submodule path of resnet18 such as base.layer4 or classifier, "
        "found 'base.layer9'"
    )


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (
            {"name": "resnet200", "num_classes": 5},
            f"model_opts.name: expected one of {', '.join(REID_MODELS)}, found 'resnet200'",
        ),
        (_opts(last_stride=3), "model_opts.last_stride: expected 1 or 2, found 3"),
        (_opts(last_stride=1.0), "model_opts.last_stride: expected 1 or 2, found 1.0"),
        (_opts(name=["resnet18"]), f"model_opts.name: expected one of {', '.join(REID_MODELS)}, found ['resnet18']"),
        (_opts(neck="bn"), "model_opts.neck: expected one of bnneck, no, found 'bn'"),
        ({"name": "resnet18", "num_classes": 0}, "model_opts.num_classes: expected an int >= 1, found 0"),
        ({"name": "resnet18"}, "model_opts.num_classes: expected an int >= 1, found None"),
        (_opts(width=True), "model_opts.width: expected an int >= 1, found True"),
        (
            _opts("swin_transformer_tiny", width=48),
            "model_opts.width: expected a multiple of 32 for a Swin trunk, found 48 (for swin_transformer_tiny)",
        ),
        (
            _opts(fine_tuning="classifier"),
            "model_opts.fine_tuning: expected a list of submodule paths, found 'classifier'",
        ),
    ],
)
def test_bad_options_are_named_in_one_line(opts: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        build_reid_model(opts)
    assert str(info.value) == message


def test_a_whole_model_file_restores_every_weight(tmp_path: Path) -> None:
    source = build_reid_model(_opts(), generator=generator(1, "init"))
    torch.save(source.state_dict(), tmp_path / "reid.pt")
    loaded = build_reid_model(_opts(pretrained=str(tmp_path / "reid.pt")), generator=generator(2, "init"))
    assert all(torch.equal(source.state_dict()[k], v) for k, v in loaded.state_dict().items())


def test_a_trunk_file_with_an_imagenet_head_loads_into_base_only(tmp_path: Path) -> None:
    trunk = build_reid_model(_opts(), generator=generator(1, "init")).base.state_dict()
    trunk |= {"fc.weight": torch.zeros(1000, 128), "fc.bias": torch.zeros(1000)}
    torch.save(trunk, tmp_path / "imagenet.pth")
    fresh = build_reid_model(_opts(), generator=generator(2, "init"))
    loaded = build_reid_model(_opts(pretrained=str(tmp_path / "imagenet.pth")), generator=generator(2, "init"))
    assert torch.equal(loaded.base.layer3[1].conv1.weight, trunk["layer3.1.conv1.weight"])
    assert torch.equal(loaded.classifier.weight, fresh.classifier.weight)


def test_a_file_that_does_not_fit_is_named_with_the_keys_at_fault(tmp_path: Path) -> None:
    trunk = build_reid_model(_opts(), generator=generator(1, "init")).base.state_dict()
    del trunk["conv1.weight"]
    trunk["layer5.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pt"
    torch.save(trunk, path)
    with pytest.raises(ValueError) as info:
        build_reid_model(_opts(pretrained=str(path)))
    assert str(info.value) == (
        f"model_opts.pretrained: {path} does not fit the model: missing 1 (conv1.weight), unexpected 1 (layer5.weight)"
    )


def test_a_file_for_another_width_is_named_with_the_first_shape_at_fault(tmp_path: Path) -> None:
    torch.save(build_reid_model(_opts(width=8)).base.state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(ValueError) as info:
        build_reid_model(_opts(pretrained=str(tmp_path / "narrow.pt")))
    assert str(info.value) == (
        f"model_opts.pretrained: {tmp_path / 'narrow.pt'}: "
        "conv1.weight expected shape [16, 3, 7, 7], found [8, 3, 7, 7]"
    )


def test_a_missing_or_unreadable_weights_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        build_reid_model(_opts(pretrained=str(tmp_path / "absent.pt")))
    assert str(info.value) == (
        f"model_opts.pretrained: expected a local weights file, found no file at {tmp_path / 'absent.pt'}"
    )
    (tmp_path / "text.pt").write_text("not weights")
    with pytest.raises(ValueError) as info:
        build_reid_model(_opts(pretrained=str(tmp_path / "text.pt")))
    assert str(info.value) == (
        f"model_opts.pretrained: cannot read {tmp_path / 'text.pt'} as a weights file: "
        "it is not a plain state dict of tensors"
    )


def test_empty_model_checks_options_and_builds_on_the_device_given() -> None:
    model = empty_reid_model(_opts("resnet34", fine_tuning=["classifier"]), device="meta")
    assert isinstance(model, ReidNet)
    assert model.base.conv1.weight.is_meta
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.weight"]


def test_a_width_16_resnet50_takes_a_training_step_on_a_batch_of_32() -> None:
    """The CPU demo's shape: 32 images of 3x64x32 go forward and backward and every trainable weight moves.

    Its speed is measured by benchmarks, not asserted here.
    """
    model = build_reid_model(_opts("resnet50", num_classes=100), generator=generator(0, "init")).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits, feature = model(_images(32))
    assert logits.shape == (32, 100) and feature.shape == (32, model.feature_dim)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(32) % 100) + feature.pow(2).mean()
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    frozen_bias = {"bottleneck.bias"}  # BNNeck's bias never trains
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert set(moved) == {name for name, p in model.named_parameters() if p.requires_grad} - frozen_bias
