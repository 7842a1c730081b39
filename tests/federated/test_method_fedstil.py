"""FedSTIL's defining arithmetic: the adaptive layer and its L1 drift, the network after the head, the
exemplar budget and herding, and the relevance-weighted dispatch (hand-computed weights, one client)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from fedevents.federated.backbones import build_reid_model
from fedevents.federated.fedavg import Upload
from fedevents.federated.methods import REGISTRY, LocalRound, ModelOutput, ServerState
from fedevents.federated.methods.adaptive import AdaptiveLayer
from fedevents.federated.methods.fedstil import FedSTIL
from fedevents.federated.methods.prototypes import budgets, herd_exemplars, prototypes, split_tail
from fedevents.federated.methods.relevance import relevance_weights
from fedevents.federated.predictions import Prediction, predict

ROOT = Path(__file__).resolve().parents[2]


def _linear() -> nn.Linear:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    return layer


def test_the_registry_knows_the_three_methods_by_their_original_names() -> None:
    assert {"fedstil", "fedstil-atten", "fedweit"} <= set(REGISTRY)
    assert set(FedSTIL.defaults) == {"lambda_l1", "lambda_k", "atten_default", "distance_calculate_step",
                                     "distance_calculate_decay"}


def test_an_adaptive_layer_starts_at_the_global_weight_and_composes_a_times_g_plus_a() -> None:
    layer = AdaptiveLayer(_linear(), 0.75)
    g = _linear().weight.detach()
    assert torch.equal(layer.G, g) and torch.equal(layer.A, 0.25 * g) and torch.equal(layer.theta(), g)
    # Only A and the bias train; G, a and both anchors are buffers (never optimised), and the anchors, which
    # are rebuilt from a and G, are left out of the state dict.
    assert {name for name, p in layer.named_parameters() if p.requires_grad} == {"A", "bias"}
    assert set(layer.state_dict()) == {"G", "a", "A", "bias"}
    with torch.no_grad():
        layer.a.copy_(torch.tensor([1.0, 0.5, 0.0]))
        layer.A.zero_()
    # theta = a * G along the last axis: [[1, 1, 0], [4, 2.5, 0]]; x = 1s gives 2 + 0.5 and 6.5 - 0.5.
    assert layer.theta().tolist() == [[1.0, 1.0, 0.0], [4.0, 2.5, 0.0]]
    assert layer(torch.ones(1, 3)).tolist() == [[2.5, 6.0]]
    # |0.75 - 1| + |0.75 - 0.5| + |0.75 - 0| = 1.25, plus ||0.25 G||_1 = 0.25 * 21 = 5.25
    assert layer.drift().item() == pytest.approx(6.5)


def test_the_drift_term_weighs_lambda_l1_and_only_a_gets_its_gradient() -> None:
    method = FedSTIL({"lambda_l1": 0.1, "atten_default": 0.75})
    model = method.prepare(nn.Sequential(_linear()))
    with torch.no_grad():
        model[0].A.add_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -2.0]]))
    rnd = LocalRound(client="c", task="t", round=1, device=torch.device("cpu"), model=model, payload={},
                     memory={}, previous_model=None, previous_task=None, task_data=lambda name: (None, None),
                     forward=lambda x: ModelOutput(model(x), model(x)))
    loss = method.batch_loss(rnd, torch.ones(1, 3), torch.zeros(1), ModelOutput(torch.ones(1), torch.ones(1)),
                             torch.tensor(1.0))
    assert loss.item() == pytest.approx(1.0 + 0.1 * 3.0)
    loss.backward()
    # d/dA of 0.1 * |A0 - A| is 0.1 * sign(A - A0), and 0 where A is still at its anchor
    assert torch.allclose(model[0].A.grad, torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, -0.1]]))
    assert model[0].G.grad is None and model[0].A0.grad is None


def _trained_layer() -> AdaptiveLayer:
    """A conv layer as a client leaves it after a round: G from a dispatch, A moved away from its anchor."""
    gen = torch.Generator().manual_seed(3)
    layer = AdaptiveLayer(nn.Conv2d(4, 6, 3, bias=False), 0.8)
    layer.reset(torch.randn(6, 4, 3, 3, generator=gen) * 0.05)
    with torch.no_grad():
        layer.A.add_(torch.randn(6, 4, 3, 3, generator=gen) * 1e-3)
    return layer


def _bits(tensor: torch.Tensor) -> list[int]:
    return tensor.contiguous().view(torch.int32).reshape(-1).tolist()


def test_loading_a_state_rebuilds_the_anchors_bit_for_bit_as_the_round_set_them() -> None:
    trained = _trained_layer()
    fresh = AdaptiveLayer(nn.Conv2d(4, 6, 3, bias=False), 0.8)
    fresh.load_state_dict(trained.state_dict())
    assert _bits(fresh.A0) == _bits(trained.A0) and _bits(fresh.a0) == _bits(trained.a0)
    assert torch.equal(fresh.drift(), trained.drift())


def test_a_state_that_stores_the_anchors_still_loads_and_gives_the_same_layer() -> None:
    """Checkpoints of format 4 stored a0 and A0 in every FedSTIL model state."""
    trained = _trained_layer()
    old = {**trained.state_dict(), "a0": trained.a0.clone(), "A0": trained.A0.clone()}
    fresh = AdaptiveLayer(nn.Conv2d(4, 6, 3, bias=False), 0.8)
    fresh.load_state_dict(old)
    assert all(_bits(fresh.state_dict()[n]) == _bits(trained.state_dict()[n]) for n in ("G", "a", "A"))
    assert _bits(fresh.A0) == _bits(trained.A0)
    method = FedSTIL()
    assert set(method.upgrade({f"l.{n}": t for n, t in old.items()})) == {"l.G", "l.a", "l.A"}


def test_trainable_anchors_stay_in_the_state_under_legacy() -> None:
    layer = AdaptiveLayer(_linear(), 0.75, trainable_anchors=True)
    assert set(layer.state_dict()) == {"G", "a", "A", "a0", "A0", "bias"}
    method = FedSTIL()
    method.legacy = True
    assert set(method.upgrade({f"l.{n}": t for n, t in layer.state_dict().items()})) == {
        "l.G", "l.a", "l.A", "l.a0", "l.A0", "l.bias"}


def test_an_adaptive_conv_keeps_the_convs_call_and_weighs_the_kernel_width() -> None:
    conv = nn.Conv2d(2, 3, (3, 2), stride=2, padding=1, dilation=1, bias=True)
    x = torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(0))
    layer = AdaptiveLayer(conv, 0.5)
    assert layer.a.shape == (2,)  # one attention value per kernel column, as the original
    assert torch.allclose(layer(x), conv(x), atol=1e-6)
    with torch.no_grad():
        layer.a.copy_(torch.tensor([1.0, 0.0]))
        layer.A.zero_()
    expected = conv.weight.detach().clone()
    expected[..., 1] = 0
    assert torch.equal(layer.theta(), expected)


def test_surgery_replaces_only_layers_that_train_entirely() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    FedSTIL({"atten_default": 0.9}).prepare(model)
    assert type(model[0]) is nn.Linear and isinstance(model[2], AdaptiveLayer)


def test_the_tail_on_prototypes_computes_what_the_network_computes_on_images() -> None:
    opts = {"name": "resnet18", "num_classes": 5, "width": 4, "fine_tuning": ["base.layer4", "classifier"]}
    model = FedSTIL().prepare(build_reid_model(opts, generator=torch.Generator().manual_seed(1)))
    head, tail = split_tail(model)
    # The first module that trains as a whole: layer4, whose input is layer3's output.
    assert head == "base.layer4"
    x = torch.randn(6, 3, 32, 16, generator=torch.Generator().manual_seed(2))
    protos = prototypes(model, head, x)
    assert protos.shape == (6, 16, 2, 1)  # layer3's output: 4 * 4 channels at 1/16 of the image
    # Prototypes come from eval mode (the frozen BatchNorms use their running statistics), so compare there.
    model.eval()
    tail.eval()
    with torch.no_grad():
        embedding = model(x)
        tail_logits, tail_feature = tail(protos)
        # layer4.0's first conv reads the prototypes too: every use of the head's input is rewired
        assert torch.allclose(model.bottleneck(tail_feature), embedding, atol=1e-5)
        assert torch.allclose(tail_logits, model.classifier(embedding), atol=1e-6)


def test_the_exemplar_budget_is_ceil_or_floor_of_lambda_k_over_the_identities_seen() -> None:
    assert budgets([7, 3, 5], 10) == {3: 4, 5: 3, 7: 3}
    assert budgets([1, 2], 0) == {1: 0, 2: 0} and budgets([], 10) == {}
    for ids, total in (([1, 2, 3], 8), (list(range(7)), 18000), ([4], 3)):
        per_id = budgets(ids, total)
        assert sum(per_id.values()) == total and max(per_id.values()) == math.ceil(total / len(ids))


def test_herding_keeps_old_prefixes_and_herds_current_identities_into_float16() -> None:
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0], [0.0, 3.0]])
    ids = torch.tensor([1, 1, 1, 2, 2])
    stored = (torch.tensor([[9.0, 9.0], [8.0, 8.0], [7.0, 7.0]], dtype=torch.float16),
              torch.tensor([0, 0, 0], dtype=torch.int32))
    x, y = herd_exemplars(nn.Identity(), (protos, ids), stored, [0, 1, 2], 5)
    # budgets {0: 2, 1: 2, 2: 1}. Id 1, normalised: the diagonal is nearest the mean, then [1, 0] (a tie with
    # [0, 1], broken by index). Id 2: [1, 0] and [0, 1] tie, the first wins. Id 0 keeps its first two.
    assert y.tolist() == [0, 0, 1, 1, 2] and x.dtype == torch.float16 and y.dtype == torch.int32
    assert x.tolist() == [[9.0, 9.0], [8.0, 8.0], [1.0, 1.0], [1.0, 0.0], [3.0, 0.0]]


def test_dispatch_weights_follow_kl_with_stride_and_decay() -> None:
    own = torch.tensor([0.0, 0.0])  # softmax (1/2, 1/2)
    far = torch.tensor([0.0, math.log(3.0)])  # softmax (1/4, 3/4): KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812
    # y's history, oldest first; with stride 2 only the newest (k = 0, KL 0) and the oldest (k = 1, KL / 0.5)
    # count, so d_y = 2 d_x. r = (1/d_x, 1/(2 d_x), mean) normalises to (4/9, 2/9, 3/9) whatever d_x is.
    others = {"x": [far], "y": [far, torch.tensor([5.0, -5.0]), own]}
    weights = relevance_weights(own, others, step=2, decay=0.5)
    softmax = [math.exp(v) for v in (4 / 9, 2 / 9, 3 / 9)]
    assert weights.tolist() == pytest.approx([v / sum(softmax) for v in softmax], abs=1e-7)
    assert weights.tolist() == pytest.approx([0.370978, 0.297056, 0.331966], abs=1e-6)

    method = FedSTIL({"distance_calculate_step": 2, "distance_calculate_decay": 0.5})
    server = ServerState({}, {"theta": {"c": {"l": torch.tensor([3.0])}, "x": {"l": torch.tensor([1.0])},
                                        "y": {"l": torch.tensor([2.0])}},
                              "tokens": {"c": [far, own], **others}})
    mix = method.payload(server, "c", "incremental")["global"]["l"]
    assert mix.item() == pytest.approx(0.370978 * 1 + 0.297056 * 2 + 0.331966 * 3, abs=1e-5)


def test_a_single_client_gets_its_own_weights_back_without_dividing_by_zero() -> None:
    """Regression (B13): with no other client's tokens the original divided by zero."""
    assert relevance_weights(torch.tensor([1.0, 2.0]), {}, step=10, decay=0.8).tolist() == [1.0]
    method = FedSTIL()
    server = ServerState({"l.G": torch.zeros(2), "l.a": torch.full((2,), 0.8), "l.A": torch.zeros(2),
                          "l.a0": torch.full((2,), 0.8), "l.A0": torch.zeros(2)})
    theta = torch.tensor([0.25, -1.5])
    server = method.aggregate(server, {"c": Upload({}, 4, {"theta": {"l": theta}, "token": torch.ones(3)})})
    assert torch.equal(server.model["l.G"], theta) and torch.allclose(server.model["l.A"], 0.2 * theta)
    assert torch.equal(method.payload(server, "c", "incremental")["global"]["l"], theta)


def test_a_swin_splits_at_its_trainable_last_stage_and_the_tail_computes_what_the_network_does() -> None:
    """Regression: FX could not trace a Swin trunk (it branched on the input's shape), so fedstil-swin failed."""
    opts = {"name": "swin_transformer_tiny", "num_classes": 5, "width": 32,
            "fine_tuning": ["base.layers.3", "classifier"]}
    model = FedSTIL().prepare(build_reid_model(opts, generator=torch.Generator().manual_seed(1)))
    head, tail = split_tail(model)
    # The stage's first LayerNorm trains and runs before its first adaptive layer: it belongs to the tail.
    assert head == "base.layers.3"
    x = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(2))
    protos = prototypes(model, head, x)
    assert protos.shape == (2, 7, 7, 256)  # what the last stage reads: 224 / 32 patches a side, 8 * 32 channels
    model.eval()
    tail.eval()
    with torch.no_grad():
        _, tail_feature = tail(protos)
        assert torch.allclose(model.bottleneck(tail_feature), model(x), atol=1e-5)


def test_the_global_a_is_exactly_what_fedstil_predicts_it_by_and_each_theta_is_based_on_g() -> None:
    """A checkpoint stores the global A as its XOR with (1 - a) G: after aggregation that XOR is all zeros."""
    method = FedSTIL({"atten_default": 0.9})
    layer = AdaptiveLayer(nn.Linear(64, 16), 0.9)
    server = ServerState({f"l.{name}": t for name, t in layer.state_dict().items()})
    gen = torch.Generator().manual_seed(4)
    uploads = {c: Upload({}, 3 + i, {"theta": {"l": torch.randn(16, 64, generator=gen)}, "token": torch.ones(2)})
               for i, c in enumerate(("a", "b"))}
    server = method.aggregate(server, uploads)
    predictions = method.server_predictions(server)
    assert predictions == {
        ("model", "l.A"): Prediction("complement-scaled", (("model", "l.a"), ("model", "l.G"))),
        ("extras", "theta", "a", "l"): Prediction("same", (("model", "l.G"),)),
        ("extras", "theta", "b", "l"): Prediction("same", (("model", "l.G"),)),
    }
    rule = predictions[("model", "l.A")]
    predicted = predict(rule.rule, [server.model[source[1]] for source in rule.sources])
    assert _bits(predicted) == _bits(server.model["l.A"])


BRANCHY = '''
import math
from torch import nn

class Branchy(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc = nn.Linear(math.prod(input_shape), num_classes)

    def forward(self, x):
        x = x.flatten(1)
        if x.sum() > 0:  # a branch on the data: FX cannot follow it
            x = -x
        return self.fc(x)
'''


def test_a_network_fx_cannot_trace_is_refused_before_the_run_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from fedevents.cli import main

    (tmp_path / "branchy.py").write_text(BRANCHY)
    data = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    data.update(exp_method="fedstil", model_opts={"name": "branchy:Branchy"})
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--dry-run"]):
        assert main(["run", "exp.yaml", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fedevents: error: exp.yaml: fedstil: expected a model FX can trace") and "\n" not in err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpts").exists()
