from __future__ import annotations

import math

import pytest
import torch

from fedevents.federated.criteria import LabelSmoothingCrossEntropy, TripletLoss, build_reid_criterion

# Four samples on a line, identities 0, 0, 1, 1 at 0, 1, 3, 7. Hardest positive / nearest negative per anchor:
#   x=0: d_ap = 1 (to 1), d_an = 3 (to 3)      x=3: d_ap = 4 (to 7), d_an = 2 (to 1)
#   x=1: d_ap = 1 (to 0), d_an = 2 (to 3)      x=7: d_ap = 4 (to 3), d_an = 6 (to 1)
LINE = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
PAIRS = torch.tensor([0, 0, 1, 1])


def test_uniform_logits_cost_log_2_whatever_the_smoothing() -> None:
    # Both -log p are log 2, so (1 - 0.1) * log 2 + 0.1 * log 2 = log 2.
    loss = LabelSmoothingCrossEntropy(2, 0.1)(torch.zeros(1, 2), torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_label_smoothing_mixes_the_target_term_and_the_mean_over_classes() -> None:
    # p = (1/4, 3/4), target 1, eps = 0.2: 0.8 * -log(3/4) + 0.2 * (-log(1/4) - log(3/4)) / 2.
    logits = torch.tensor([[0.0, math.log(3)]])
    expected = 0.8 * -math.log(0.75) + 0.2 * (-math.log(0.25) - math.log(0.75)) / 2
    loss = LabelSmoothingCrossEntropy(2, 0.2)(logits, torch.tensor([1]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_agrees_with_torch_on_a_batch() -> None:
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    ours = LabelSmoothingCrossEntropy(5, 0.1)(logits, targets)
    assert torch.allclose(ours, torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, targets))


def test_label_smoothing_refuses_logits_for_another_class_count() -> None:
    with pytest.raises(ValueError, match="expected logits for 3 classes, found 2"):
        LabelSmoothingCrossEntropy(3, 0.1)(torch.zeros(1, 2), torch.tensor([0]))


def test_batch_hard_triplet_takes_the_farthest_positive_and_nearest_negative() -> None:
    # relu(1 - 3 + 0.3) + relu(1 - 2 + 0.3) + relu(4 - 2 + 0.3) + relu(4 - 6 + 0.3) = 0 + 0 + 2.3 + 0; / 4
    loss = TripletLoss(0.3)(LINE, PAIRS)
    assert loss.item() == pytest.approx(2.3 / 4, rel=1e-6)


def test_a_zero_margin_means_the_soft_margin() -> None:
    # softplus(d_ap - d_an) = log(1 + e^(d_ap - d_an)) for differences -2, -1, 2, -2.
    expected = sum(math.log1p(math.exp(d)) for d in (-2, -1, 2, -2)) / 4
    assert TripletLoss(0.0)(LINE, PAIRS).item() == pytest.approx(expected, rel=1e-6)


def test_anchors_without_a_positive_are_left_out_of_the_mean() -> None:
    # Identities 0, 0, 1, 2: only x=0 and x=1 have a positive. margin 2.5:
    # relu(1 - 3 + 2.5) = 0.5 and relu(1 - 2 + 2.5) = 1.5, mean over 2 anchors = 1.0 (not 2.0 / 4).
    loss = TripletLoss(2.5)(LINE, torch.tensor([0, 0, 1, 2]))
    assert loss.item() == pytest.approx(1.0, rel=1e-6)


def test_a_batch_with_no_usable_anchor_gives_a_zero_that_backpropagates() -> None:
    features = LINE.clone().requires_grad_(True)
    loss = TripletLoss(0.3)(features, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(features.grad, torch.zeros_like(LINE))


def test_identical_features_give_finite_gradients() -> None:
    features = torch.ones(4, 8, requires_grad=True)
    TripletLoss(0.3)(features, PAIRS).backward()
    assert torch.isfinite(features.grad).all()


def test_the_triplet_gradient_pulls_the_far_positive_in_and_pushes_the_near_negative_out() -> None:
    features = LINE.clone().requires_grad_(True)
    TripletLoss(0.3)(features, PAIRS).backward()
    # Only the anchor x=3 is active: loss = ((x_7 - x_3) - (x_3 - x_1) + 0.3) / 4, so the gradient is
    # +1/4 on x_1, -2/4 on x_3, +1/4 on x_7; a descent step moves x_1 away from x_3 and x_7 towards it.
    assert features.grad.flatten().tolist() == pytest.approx([0.0, 0.25, -0.5, 0.25], abs=1e-5)


def test_a_list_of_terms_is_a_weighted_sum() -> None:
    criterion = build_reid_criterion(
        [{"name": "cross_entropy", "epsilon": 0.1}, {"name": "triplet", "margin": 0.3, "weight": 2.0}]
    )
    # Uniform logits cost log 2 (see above); the triplet term on LINE is 2.3 / 4, counted twice.
    loss = criterion(torch.zeros(4, 2), LINE, PAIRS)
    assert loss.item() == pytest.approx(math.log(2) + 2.0 * 2.3 / 4, rel=1e-6)


def test_a_single_mapping_is_one_term() -> None:
    criterion = build_reid_criterion({"name": "triplet", "margin": 0.3})
    assert criterion(torch.zeros(4, 2), LINE, PAIRS).item() == pytest.approx(2.3 / 4, rel=1e-6)


def test_the_class_count_given_is_checked_against_the_logits() -> None:
    criterion = build_reid_criterion({"name": "cross_entropy"}, num_classes=3)
    with pytest.raises(ValueError, match="expected logits for 3 classes, found 2"):
        criterion(torch.zeros(4, 2), LINE, PAIRS)


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"name": "arcface"}, "criterion_opts.name: expected one of cross_entropy, triplet, triplet_loss, found 'arcface'"),
        (
            [{"name": "triplet", "margin": 0.3}, {"name": "cross_entropy", "weight": -1}],
            "criterion_opts[1].weight: expected a number >= 0, found -1",
        ),
        ([{"name": "triplet", "margin": "0.3"}], "criterion_opts[0].margin: expected a number >= 0, found '0.3'"),
        ({"name": "cross_entropy", "epsilon": 1.5}, "criterion_opts.epsilon: expected a number in [0, 1], found 1.5"),
        ([], "criterion_opts: expected a mapping or a non-empty list of them, found []"),
        (["triplet"], "criterion_opts[0]: expected a mapping with a name, found 'triplet'"),
    ],
)
def test_bad_criterion_options_are_named_in_one_line(opts: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        build_reid_criterion(opts)  # type: ignore[arg-type]
    assert str(info.value) == message


def _weighted(distances: tuple[float, ...], sign: float) -> float:
    weights = [math.exp(sign * d) for d in distances]
    return sum(w * d for w, d in zip(weights, distances)) / sum(weights)


def test_without_hard_mining_distances_are_softmax_weighted_means() -> None:
    # On LINE each anchor has one positive (d_ap as above) and two negatives, nearer ones weighing more.
    d_an = [_weighted((3, 7), -1), _weighted((2, 6), -1), _weighted((3, 2), -1), _weighted((7, 6), -1)]
    expected = sum(max(0.0, ap - an + 0.3) for ap, an in zip((1, 1, 4, 4), d_an)) / 4
    loss = TripletLoss(0.3, hard_mining=False)(LINE, PAIRS)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_norm_feat_compares_directions_only() -> None:
    # Normalised, 1, 3 and 7 are one point (1) and 0 stays 0: per anchor relu(d_ap - d_an + 0.3) is
    # 0.3 (x=0: 1 - 1), 1.3 (x=1: 1 - 0), 0.3 (x=3: 0 - 0) and 0.3 (x=7: 0 - 0).
    loss = TripletLoss(0.3, norm_feat=True)(LINE, PAIRS)
    assert loss.item() == pytest.approx((0.3 + 1.3 + 0.3 + 0.3) / 4, abs=1e-4)


@pytest.mark.parametrize("name", ["triplet", "triplet_loss"])
def test_a_triplet_without_a_margin_is_refused_by_both_names(name: str) -> None:
    with pytest.raises(ValueError) as info:
        build_reid_criterion([{"name": "cross_entropy"}, {"name": name}])
    assert str(info.value) == (f"criterion_opts[1].margin: expected a number >= 0 for {name} (0 for the soft margin), "
                               f"found none")


def test_fedstil_names_and_options_build_the_same_loss() -> None:
    criterion = build_reid_criterion({"name": "triplet_loss", "margin": 0.3, "hard_mining": True, "norm_feat": False})
    assert criterion(torch.zeros(4, 2), LINE, PAIRS).item() == pytest.approx(2.3 / 4, rel=1e-6)
