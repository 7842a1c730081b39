"""Task switches: the moment a client starts a new task is when continual methods consolidate the old one."""

from __future__ import annotations

from .base import LocalRound

__all__ = ["finished_task"]


def finished_task(rnd: LocalRound) -> str | None:
    """The task the client has just finished when this round starts a different one; None otherwise.

    A client that trained before always has its previous model stored, so a switch without one is a broken
    contract, not a first round.
    """
    if rnd.previous_task is None or rnd.previous_task == rnd.task:
        return None
    if rnd.previous_model is None:
        raise ValueError(
            f"client {rnd.client!r}, round {rnd.round}: expected its previous model on moving from task "
            f"{rnd.previous_task!r} to {rnd.task!r}, found none"
        )
    return rnd.previous_task
