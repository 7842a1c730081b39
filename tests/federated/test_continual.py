from __future__ import annotations

import pytest

from fedevents.federated.continual import (
    accuracy_matrix,
    accuracy_on_round,
    average_accuracy,
    backward_transfer,
    forgetting_fedstil,
    forgetting_max_final,
)

TASKS = ["a", "b", "c"]
# One client, three tasks started in rounds 0, 2 and 4; each round scores the tasks seen so far.
SCORES = {
    0: {"a": 50.0},
    1: {"a": 80.0},
    2: {"a": 60.0, "b": 40.0},
    3: {"a": 70.0, "b": 90.0},
    4: {"a": 50.0, "b": 75.0, "c": 55.0},
}
START = {"a": 0, "b": 2, "c": 4}


def test_the_accuracy_matrix_is_rounds_by_tasks_with_gaps_as_none() -> None:
    rounds, matrix = accuracy_matrix(SCORES, TASKS)
    assert rounds == [0, 1, 2, 3, 4]
    assert matrix == [
        [50.0, None, None],
        [80.0, None, None],
        [60.0, 40.0, None],
        [70.0, 90.0, None],
        [50.0, 75.0, 55.0],
    ]


def test_rounds_come_out_in_order_whatever_order_they_went_in() -> None:
    rounds, matrix = accuracy_matrix({3: {"a": 1.0}, 1: {"a": 2.0}}, ["a"])
    assert (rounds, matrix) == ([1, 3], [[2.0], [1.0]])


def test_average_accuracy_is_over_the_tasks_scored_in_the_last_round_by_default() -> None:
    # (50 + 75 + 55) / 3 = 60
    assert average_accuracy(SCORES, TASKS) == 60.0


def test_average_accuracy_at_an_earlier_round() -> None:
    # round 2: (60 + 40) / 2 = 50
    assert average_accuracy(SCORES, TASKS, 2) == 50.0


def test_with_task_starts_the_seen_tasks_are_those_started_by_the_round() -> None:
    # round 3, started a (0) and b (2): (70 + 90) / 2 = 80. A score for c in round 3 would not count.
    scores = {**SCORES, 3: {"a": 70.0, "b": 90.0, "c": 10.0}}
    assert average_accuracy(scores, TASKS, 3, task_start=START) == 80.0


def test_a_started_task_without_a_score_is_named() -> None:
    with pytest.raises(ValueError) as info:
        average_accuracy(SCORES, TASKS, 3, task_start={"a": 0, "b": 2, "c": 3})
    assert str(info.value) == "round 3: expected a score for every task started by then, missing ['c']"


def test_average_accuracy_at_an_unscored_round_is_named() -> None:
    with pytest.raises(ValueError) as info:
        average_accuracy(SCORES, TASKS, 7)
    assert str(info.value) == "round: expected one of the scored rounds [0, 1, 2, 3, 4], found 7"


def test_fedstil_forgetting_pools_the_falls_below_each_tasks_peak_over_all_tasks() -> None:
    # a: 50 80 60 70 50 -> peak 80 (round 1); samples 80-60, 80-70, 80-50 = 20, 10, 30
    # b: 40 90 75       -> peak 90 (round 3); sample 90-75 = 15
    # c: 55             -> no later round, no sample
    # pooled: (20 + 10 + 30 + 15) / 4 = 18.75 (a mean of task means would give 17.5)
    assert forgetting_fedstil(SCORES, TASKS) == 18.75


def test_fedstil_forgetting_takes_the_best_score_not_the_first_local_peak() -> None:
    # 50 80 60 90 70: the peak is 90 (round 3); one later round: 90 - 70 = 20
    scores = {r: {"a": v} for r, v in enumerate([50.0, 80.0, 60.0, 90.0, 70.0])}
    assert forgetting_fedstil(scores, ["a"]) == 20.0


def test_fedstil_forgetting_counts_from_the_first_round_reaching_the_peak() -> None:
    # 50 50 40: the peak 50 is first reached in round 0; samples 50-50, 50-40 = 0, 10; mean 5
    scores = {0: {"a": 50.0}, 1: {"a": 50.0}, 2: {"a": 40.0}}
    assert forgetting_fedstil(scores, ["a"]) == 5.0


def test_fedstil_forgetting_ignores_rounds_after_the_one_asked_for() -> None:
    # Up to round 3: a: 50 80 60 70 -> 20, 10;  b: 40 90 -> none. (20 + 10) / 2 = 15
    assert forgetting_fedstil(SCORES, TASKS, 3) == 15.0


def test_fedstil_accuracy_on_round_is_the_mean_over_the_tasks_scored_that_round() -> None:
    # round 4: (50 + 75 + 55) / 3 = 60;  round 2: (60 + 40) / 2 = 50;  round 9 scores nothing
    assert accuracy_on_round(SCORES) == 60.0
    assert accuracy_on_round(SCORES, 2) == 50.0
    assert accuracy_on_round(SCORES, 9) is None


def test_fedstil_forgetting_of_scores_that_never_fall_is_undefined() -> None:
    assert forgetting_fedstil({0: {"a": 1.0}, 1: {"a": 2.0}}, ["a"]) is None


def test_max_final_forgetting_leaves_out_the_last_trained_task() -> None:
    # a: max(50, 80, 60, 70) - 50 = 30;  b: max(40, 90) - 75 = 15;  c is the last trained task.
    # (30 + 15) / 2 = 22.5
    assert forgetting_max_final(SCORES, TASKS) == 22.5


def test_max_final_forgetting_counts_the_last_task_scored_as_the_last_trained() -> None:
    # Only a and b scored so far: b is the last trained; a: max(50, 80, 60) - 70 = 10
    scores = {r: SCORES[r] for r in (0, 1, 2, 3)}
    assert forgetting_max_final(scores, TASKS) == 10.0


def test_backward_transfer_compares_the_final_round_with_the_end_of_each_tasks_training() -> None:
    # a ended in round 2: 50 - 60 = -10;  b ended in round 3: 75 - 90 = -15;  c is the last task.
    # (-10 + -15) / 2 = -12.5
    assert backward_transfer(SCORES, TASKS, {"a": 2, "b": 3, "c": 4}) == -12.5


def test_backward_transfer_needs_the_end_of_every_earlier_task() -> None:
    with pytest.raises(ValueError) as info:
        backward_transfer(SCORES, TASKS, {"a": 2})
    assert str(info.value) == "task_end: expected the round task 'b' ended, found none"


def test_backward_transfer_needs_a_score_where_a_task_ended() -> None:
    with pytest.raises(ValueError) as info:
        backward_transfer(SCORES, TASKS, {"a": 2, "b": 1})
    assert str(info.value) == "scores: expected a score for task 'b' in round 1, found none"


def test_a_score_for_a_task_not_in_the_list_is_named() -> None:
    with pytest.raises(ValueError) as info:
        accuracy_matrix({0: {"a": 1.0, "z": 2.0}}, ["a"])
    assert str(info.value) == "scores[0]: expected tasks among ['a'], found 'z'"


def test_no_scores_give_no_summary() -> None:
    assert average_accuracy({}, TASKS) is None
    assert forgetting_fedstil({}, TASKS) is None
    assert forgetting_max_final({}, TASKS) is None
    assert backward_transfer({}, TASKS, {}) is None
