from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedevents.federated import SyntheticSpec, client_data, label_proportions
from fedevents.federated import synthetic

SPEC = SyntheticSpec(
    num_classes=10, input_shape=(32,), samples_per_client=200, label_skew=0.5, test_size=100, noise=1.0
)


def test_the_same_seed_task_and_client_give_identical_tensors() -> None:
    first = client_data(SPEC, seed=0, task="t0", client="c1")
    synthetic._client_data.cache_clear()  # regenerate rather than read the cached copy
    second = client_data(SPEC, seed=0, task="t0", client="c1")
    assert first is not second
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert first.proportions == second.proportions


def test_another_seed_gives_other_data() -> None:
    a = client_data(SPEC, seed=0, task="t0", client="c1")
    b = client_data(SPEC, seed=1, task="t0", client="c1")
    assert not torch.equal(a.x_train, b.x_train)


def test_shapes_and_dtypes_follow_the_spec() -> None:
    data = client_data(SPEC, seed=0, task="t0", client="c1")
    assert data.x_train.shape == (200, 32) and data.x_train.dtype == torch.float32
    assert data.y_train.shape == (200,) and data.y_train.dtype == torch.int64
    assert data.x_test.shape == (100, 32) and data.y_test.shape == (100,)
    assert 0 <= int(data.y_train.min()) and int(data.y_train.max()) < 10
    images = client_data(replace(SPEC, input_shape=(1, 12, 12)), seed=0, task="t0", client="c1")
    assert images.x_train.shape == (200, 1, 12, 12) and images.x_test.shape == (100, 1, 12, 12)


def test_clients_get_different_label_distributions() -> None:
    shares = {label_proportions(SPEC, seed=0, task="t0", client=f"c{i}") for i in range(10)}
    assert len(shares) == 10
    first = label_proportions(SPEC, seed=0, task="t0", client="c0")
    assert sum(first) == pytest.approx(1.0)
    assert client_data(SPEC, seed=0, task="t0", client="c0").proportions == first


def test_a_small_label_skew_concentrates_each_client_on_few_classes() -> None:
    skewed = replace(SPEC, label_skew=0.05)
    tops = [max(label_proportions(skewed, seed=0, task="t0", client=f"c{i}")) for i in range(20)]
    assert sum(tops) / len(tops) > 0.7
    assert sorted(tops)[len(tops) // 2] > 0.5  # the median client gives most of its data to one class
    assert min(tops) > 0.3  # against 0.1 for a uniform split
    data = client_data(skewed, seed=0, task="t0", client="c0")
    assert torch.bincount(data.y_train, minlength=10).max().item() > 100


def test_a_large_label_skew_is_close_to_uniform() -> None:
    even = replace(SPEC, label_skew=1000.0)
    tops = [max(label_proportions(even, seed=0, task="t0", client=f"c{i}")) for i in range(20)]
    assert max(tops) < 0.15


def test_the_test_split_follows_the_clients_own_label_distribution() -> None:
    big_test = replace(SPEC, test_size=4000)
    data = client_data(big_test, seed=0, task="t0", client="c3")
    observed = torch.bincount(data.y_test, minlength=10).double() / 4000
    assert torch.allclose(observed, torch.tensor(data.proportions, dtype=torch.float64), atol=0.03)


def _nearest_centroid_accuracy(train: synthetic.ClientData, test: synthetic.ClientData) -> float:
    centroids = torch.stack([train.x_train[train.y_train == c].mean(0) for c in range(10)])
    predicted = torch.cdist(test.x_test, centroids).argmin(1)
    return (predicted == test.y_test).double().mean().item()


def test_clients_of_one_task_share_its_classes_and_tasks_differ() -> None:
    """Class means learnt on one client classify another client of the same task, not one of another task."""
    even = replace(SPEC, label_skew=1000.0, samples_per_client=2000, test_size=1000)
    a = client_data(even, seed=0, task="t0", client="a")
    same_task = client_data(even, seed=0, task="t0", client="b")
    other_task = client_data(even, seed=0, task="t1", client="b")
    assert _nearest_centroid_accuracy(a, same_task) > 0.4
    assert _nearest_centroid_accuracy(a, other_task) < 0.2


def test_a_repeated_request_is_served_from_the_cache() -> None:
    """Generating a client's data happens once; its cost is a benchmark's business, not a test's."""
    first = client_data(SPEC, seed=5, task="t0", client="cached")
    assert client_data(SPEC, seed=5, task="t0", client="cached") is first


def test_the_cache_stays_bounded_however_many_clients_ask() -> None:
    for i in range(400):
        client_data(SPEC, seed=6, task="t0", client=f"many-{i}")
    assert synthetic._client_data.cache_info().currsize <= 256


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("label_skew", 0, "task_opts.synthetic.label_skew: expected a number > 0, found 0"),
        ("noise", -1.0, "task_opts.synthetic.noise: expected a number >= 0, found -1.0"),
        ("num_classes", 1, "task_opts.synthetic.num_classes: expected an int >= 2, found 1"),
        ("input_shape", [0, 3],
         "task_opts.synthetic.input_shape: expected a non-empty list of positive ints, found [0, 3]"),
    ],
)
def test_a_bad_spec_value_is_named(key: str, value: object, message: str) -> None:
    opts = {"num_classes": 10, "input_shape": [32], "samples_per_client": 200, "label_skew": 0.5,
            "test_size": 100, "noise": 1.0, key: value}
    with pytest.raises(ValueError) as info:
        SyntheticSpec.from_dict(opts)
    assert str(info.value) == message


def test_a_spec_from_a_config_dict_is_hashable_and_equal_to_one_built_directly() -> None:
    opts = {"num_classes": 10, "input_shape": [32], "samples_per_client": 200, "label_skew": 0.5,
            "test_size": 100, "noise": 1.0}
    assert SyntheticSpec.from_dict(opts) == SPEC
    assert hash(SyntheticSpec.from_dict(opts)) == hash(SPEC)
