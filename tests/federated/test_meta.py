"""materialise: a meta-device model given real storage, exactly as ``to_empty`` would give it."""

from __future__ import annotations

import torch
from torch import nn

from fedevents.federated.meta import materialise


def _meta_model() -> nn.Module:
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 2))
    model[0].weight.requires_grad_(False)
    return model


def _layout(model: nn.Module) -> list[tuple]:
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return [(name, t.device.type, t.dtype, tuple(t.shape), t.stride(), t.requires_grad, type(t).__name__)
            for name, t in tensors]


def test_materialise_gives_the_same_tensors_as_to_empty() -> None:
    ours, torchs = materialise(_meta_model(), "cpu"), _meta_model().to_empty(device="cpu")
    assert _layout(ours) == _layout(torchs)
    assert _layout(ours)[0] == ("0.weight", "cpu", torch.float32, (4, 3, 3, 3), (27, 9, 3, 1), False, "Parameter")
    assert ours[1].num_batches_tracked.dtype == torch.long


def test_a_model_for_the_meta_device_stays_as_it_is() -> None:
    model = _meta_model()
    assert materialise(model, "meta") is model and model[3].weight.is_meta
