"""Continual-learning summaries of one client's validation scores over rounds (plain Python, no torch).

``scores`` maps a round to the scores of the tasks validated in that round, ``{round: {task: score}}``;
``tasks`` is the client's task list in training order. A round need not score every task. Summaries that
average over no task at all give None rather than a made-up 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "accuracy_matrix",
    "accuracy_on_round",
    "average_accuracy",
    "backward_transfer",
    "forgetting_fedstil",
    "forgetting_max_final",
]

Scores = Mapping[int, Mapping[str, float]]


def accuracy_matrix(scores: Scores, tasks: Sequence[str]) -> tuple[list[int], list[list[float | None]]]:
    """Lay the scores out as rounds (ascending) by tasks (in ``tasks`` order), None where a task has no score."""
    _check_tasks(scores, tasks)
    rounds = sorted(scores)
    return rounds, [[scores[r].get(t) for t in tasks] for r in rounds]


def average_accuracy(
    scores: Scores,
    tasks: Sequence[str],
    round: int | None = None,
    *,
    task_start: Mapping[str, int] | None = None,
) -> float | None:
    """Give the mean score at ``round`` (default: the last round) over the tasks seen by then.

    With ``task_start`` (the round each task's training began), a task is seen at ``round`` when its training
    had started by then (``task_start[task] <= round``), and each seen task must have a score in that round.
    Without it, the seen tasks are those of ``tasks`` scored in that round.
    """
    _check_tasks(scores, tasks)
    if not scores:
        return None
    at = max(scores) if round is None else round
    if at not in scores:
        raise ValueError(f"round: expected one of the scored rounds {sorted(scores)}, found {at!r}")
    row = scores[at]
    if task_start is None:
        seen = [t for t in tasks if t in row]
    else:
        seen = [t for t in tasks if t in task_start and task_start[t] <= at]
        unscored = [t for t in seen if t not in row]
        if unscored:
            raise ValueError(f"round {at}: expected a score for every task started by then, missing {unscored}")
    return _mean([row[t] for t in seen])


def forgetting_fedstil(scores: Scores, tasks: Sequence[str], round: int | None = None) -> float | None:
    """Give one client's forgetting as FedSTIL's ``forgetting_on_round`` measures it, up to ``round``.

    ``round`` defaults to the last scored round; rounds after it are ignored. For each task, its peak is
    the best score over the rounds up to ``round`` and the peak round the *first* round reaching it (the
    peak may come before the task is trained). Every later round up to ``round`` that scores the task gives
    a sample, peak minus that score (negative when it is higher, never clipped). The samples of all the
    client's tasks are pooled and averaged, so a task scored in more rounds weighs more. A client with no
    sample gives None; FedSTIL's total is the mean over the clients that have a value.

    FedSTIL raises KeyError where a round in (peak round, ``round``] has no record for the client; here
    that round gives no sample.
    """
    _check_tasks(scores, tasks)
    if not scores:
        return None
    last = max(scores) if round is None else round
    upto = [r for r in sorted(scores) if r <= last]
    samples = []
    for task in tasks:
        series = [(r, scores[r][task]) for r in upto if task in scores[r]]
        if not series:
            continue
        peak_round, peak = series[0]
        for r, value in series[1:]:
            if value > peak:  # strictly greater: the first round reaching the peak keeps it
                peak_round, peak = r, value
        samples += [peak - value for r, value in series if r > peak_round]
    return _mean(samples)


def accuracy_on_round(scores: Scores, round: int | None = None) -> float | None:
    """Give one client's accuracy as FedSTIL's ``accuracy_on_round`` does: its mean over the tasks scored at ``round``.

    ``round`` defaults to the last scored round. Every task scored that round counts, trained yet or not,
    since FedSTIL validates each client's whole stream. A client not scored that round gives None (FedSTIL
    raises KeyError); FedSTIL's total is the mean over the clients that have a value.
    """
    if not scores:
        return None
    at = max(scores) if round is None else round
    return _mean(list(scores.get(at, {}).values()))


def forgetting_max_final(scores: Scores, tasks: Sequence[str]) -> float | None:
    """Give the standard forgetting: per task, its best earlier score minus its final score, averaged.

    A task's final score is its score in the last round that scores it; its earlier scores are those of the
    rounds before. The last trained task (the last of ``tasks`` with any score) is left out, as are tasks
    scored in only one round.
    """
    _check_tasks(scores, tasks)
    scored = [t for t in tasks if _series(scores, t)]
    per_task = []
    for task in scored[:-1]:
        *earlier, final = _series(scores, task)
        if earlier:
            per_task.append(max(earlier) - final)
    return _mean(per_task)


def backward_transfer(scores: Scores, tasks: Sequence[str], task_end: Mapping[str, int]) -> float | None:
    """Give BWT: over every task but the last of ``tasks``, its final score minus its score when it ended.

    The final score is the one in the last round of ``scores``; ``task_end`` gives the last round each task
    was trained in, and the score that round is the one right after its training. Positive BWT means later
    tasks helped earlier ones; negative means they were forgotten.
    """
    _check_tasks(scores, tasks)
    if not scores:
        return None
    final = max(scores)
    deltas = []
    for task in tasks[:-1]:
        if task not in task_end:
            raise ValueError(f"task_end: expected the round task {task!r} ended, found none")
        ended = task_end[task]
        for at in (ended, final):
            if task not in scores.get(at, {}):
                raise ValueError(f"scores: expected a score for task {task!r} in round {at}, found none")
        deltas.append(scores[final][task] - scores[ended][task])
    return _mean(deltas)


def _series(scores: Scores, task: str) -> list[float]:
    return [scores[r][task] for r in sorted(scores) if task in scores[r]]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _check_tasks(scores: Scores, tasks: Sequence[str]) -> None:
    known = set(tasks)
    for at in sorted(scores):
        strangers = sorted(set(scores[at]) - known)
        if strangers:
            raise ValueError(f"scores[{at}]: expected tasks among {list(tasks)}, found {strangers[0]!r}")
