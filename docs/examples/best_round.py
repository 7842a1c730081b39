"""An example fedevents handler: remember the round with the best mean validation accuracy.

Used from YAML (see with_handler.yaml next to this file):

    handlers:
      - target: best_round:BestRound
        kwargs: {out: logs/best_round.json}

or from Python: ``experiment.bus.subscribe(BestRound.events, BestRound("best.json"))``.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedevents.engine import ExperimentFinished, RoundFinished, ValDone


class BestRound:
    """Collects val_acc per round and writes the best round to ``out`` when the experiment finishes."""

    events = (ValDone, RoundFinished, ExperimentFinished)

    def __init__(self, out: str, metric: str = "val_acc") -> None:
        self.out = Path(out)
        self.metric = metric
        self._scores: list[float] = []
        self.per_round: dict[int, float] = {}

    def __call__(self, event) -> None:
        if isinstance(event, ValDone) and self.metric in event.metrics:
            self._scores.append(event.metrics[self.metric])
        elif isinstance(event, RoundFinished) and self._scores:
            self.per_round[event.round] = sum(self._scores) / len(self._scores)
            self._scores.clear()
        elif isinstance(event, ExperimentFinished):
            best = max(self.per_round, key=self.per_round.__getitem__)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps({"round": best, self.metric: self.per_round[best],
                                            "per_round": self.per_round}, indent=2))
