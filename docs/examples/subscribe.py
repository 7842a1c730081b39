"""Subscribing a handler from Python before running an experiment.

    python docs/examples/subscribe.py
"""

from __future__ import annotations

from fedevents.cli import build_experiment
from fedevents.engine import TrainDone


def main() -> None:
    exp = build_experiment("configs/demo.yaml", overrides=["exp_opts.comm_rounds=3"])

    @exp.bus.on(TrainDone)
    def show(event: TrainDone) -> None:
        print(f"round {event.round} {event.client}: tr_acc={event.metrics['tr_acc']:.3f} on {event.device}")

    exp.run()


if __name__ == "__main__":
    main()
