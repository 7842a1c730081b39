from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedevents.federated.backbones import build_reid_model, empty_reid_model
from fedevents.federated.seeds import generator

# A Swin-tiny layout at a third of the width keeps each forward pass around a second on a CPU.
NARROW = {"name": "swin_transformer_tiny", "num_classes": 6, "width": 32}


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 32, generator=generator(0, "swin images"))


@pytest.mark.parametrize(
    ("name", "count", "dim"),
    [
        # The published totals (28,288,354; 49,606,258; 87,768,224; 196,532,476) less the 1000-way head.
        ("swin_transformer_tiny", 27_519_354, 768),
        ("swin_transformer_small", 48_837_258, 768),
        ("swin_transformer_base", 86_743_224, 1024),
        ("swin_transformer_large", 194_995_476, 1536),
    ],
)
def test_each_swin_variant_has_the_published_size_without_its_imagenet_head(name: str, count: int, dim: int) -> None:
    model = empty_reid_model({"name": name, "num_classes": 751}, device="meta")
    assert sum(p.numel() for p in model.base.parameters()) == count
    assert model.feature_dim == dim
    assert [len(stage.blocks) for stage in model.base.layers] == ([2, 2, 6, 2] if name.endswith("tiny") else [2, 2, 18, 2])


def test_train_mode_gives_logits_and_the_feature_eval_mode_the_embedding() -> None:
    model = build_reid_model(NARROW, generator=generator(0, "init"))
    logits, feature = model.train()(_images())
    assert logits.shape == (2, 6) and feature.shape == (2, 256)
    embedding = model.eval()(_images())
    assert embedding.shape == (2, 256)
    pooled = model.base(_images()).mean(dim=(2, 3))
    assert torch.allclose(embedding, model.bottleneck(pooled), atol=1e-6)


def test_any_input_size_is_resized_to_224_inside_the_network() -> None:
    model = build_reid_model(NARROW, generator=generator(0, "init")).eval()
    x = _images()
    resized = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    assert model.base(x).shape == (2, 256, 7, 7)
    assert torch.equal(model(x), model(resized))


def test_last_stride_is_ignored_by_a_swin_trunk() -> None:
    one = build_reid_model({**NARROW, "last_stride": 1}, generator=generator(0, "init")).eval()
    two = build_reid_model({**NARROW, "last_stride": 2}, generator=generator(0, "init")).eval()
    assert torch.equal(one(_images()), two(_images()))


def test_fine_tuning_the_last_stage_freezes_the_rest_and_a_step_reaches_only_it() -> None:
    model = build_reid_model(
        {**NARROW, "fine_tuning": ["base.layers.3", "classifier"]}, generator=generator(0, "init")
    ).train()
    trainable = {".".join(n.split(".")[:3]) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"base.layers.3", "classifier.weight"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits, _ = model(_images())
    F.cross_entropy(logits, torch.tensor([0, 5])).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("base.layers.3.", "classifier.")) for n in changed)
    assert model.base.patch_embed.proj.weight.grad is None


def test_the_swin_recipe_initialises_weights_from_the_generator() -> None:
    a = build_reid_model(NARROW, generator=generator(1, "init"))
    b = build_reid_model(NARROW, generator=generator(1, "init"))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    qkv = a.base.layers[2].blocks[0].attn.qkv
    assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert qkv.weight.abs().max().item() <= 2.0  # truncated at +-2
    assert torch.equal(qkv.bias, torch.zeros_like(qkv.bias))
    norm = a.base.norm
    assert torch.equal(norm.weight, torch.ones(256)) and torch.equal(norm.bias, torch.zeros(256))


def test_a_release_format_file_loads_into_base_without_its_head_and_index_buffers(tmp_path: Path) -> None:
    trunk = build_reid_model(NARROW, generator=generator(1, "init")).base.state_dict()
    release = dict(trunk)
    release["head.weight"] = torch.zeros(1000, 256)
    release["head.bias"] = torch.zeros(1000)
    release["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    release["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    torch.save({"model": release}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    loaded = build_reid_model(
        {**NARROW, "pretrained": str(tmp_path / "swin_tiny_patch4_window7_224.pth")}, generator=generator(2, "init")
    )
    assert all(torch.equal(loaded.base.state_dict()[k], v) for k, v in trunk.items())
    assert "layers.0.blocks.1.attn_mask" not in loaded.base.state_dict()


def test_a_resnet_file_does_not_fit_a_swin_trunk(tmp_path: Path) -> None:
    torch.save(build_reid_model({"name": "resnet18", "num_classes": 6, "width": 8}).base.state_dict(), tmp_path / "r.pt")
    with pytest.raises(ValueError, match=r"^model_opts.pretrained: .*r.pt does not fit the model: missing \d+ "):
        build_reid_model({**NARROW, "pretrained": str(tmp_path / "r.pt")})


def test_a_swin_scored_in_inference_mode_can_train_afterwards() -> None:
    """Regression: the cached relative-position index made under inference mode could not be saved for backward."""
    model = build_reid_model(NARROW, generator=generator(0, "init"))
    with torch.inference_mode():
        model.eval()(_images())
    logits, _ = model.train()(_images())
    logits.sum().backward()
    assert model.base.layers[0].blocks[0].attn.relative_position_bias_table.grad is not None
