"""Class-incremental splits: task k holds classes [k*c, (k+1)*c), under the names a config gives."""

from __future__ import annotations

import pytest
import torch

from fedevents.federated.datasets.streams import class_incremental, in_classes, single_task


def test_split_mnist_is_five_tasks_of_two_classes() -> None:
    assert class_incremental(10, 2) == {
        "task_0": (0, 1), "task_1": (2, 3), "task_2": (4, 5), "task_3": (6, 7), "task_4": (8, 9),
    }


def test_the_last_task_holds_the_remainder_and_names_are_kept() -> None:
    assert class_incremental(10, 4, ["a", "b", "c"]) == {"a": (0, 1, 2, 3), "b": (4, 5, 6, 7), "c": (8, 9)}


@pytest.mark.parametrize("per_task, names, message", [
    (0, None, r"task_opts.image.classes_per_task: expected an int from 1 to 10, found 0"),
    (11, None, r"task_opts.image.classes_per_task: expected an int from 1 to 10, found 11"),
    (5, ["a"], r"task_opts.image.task_names: expected 2 distinct names \(one per task of 5 classes\), found \['a'\]"),
    (5, ["a", "a"], r"task_opts.image.task_names: expected 2 distinct names .*found \['a', 'a'\]"),
])
def test_bad_splits_are_one_line_errors(per_task: int, names: list[str] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        class_incremental(10, per_task, names)


def test_single_task_names_every_class() -> None:
    assert single_task(3, ["x", "y"]) == {"x": (0, 1, 2), "y": (0, 1, 2)}


def test_in_classes_keeps_order() -> None:
    assert in_classes(torch.tensor([3, 0, 2, 3, 1]), (3, 1)).tolist() == [0, 3, 4]
