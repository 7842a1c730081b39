"""The hand-written federated loop of the side-by-side benchmark: one process, no framework.

    python benchmarks/handloop.py PRESET MARKS_FILE [--quick]

Per round, per sampled client: load the global weights, train, collect the weights; average them weighted by
samples; evaluate the global model on the held-out set (also once before round 1). It writes its marks to
MARKS_FILE when it is done (one per line: ``train WALL 0`` when the first training starts, ``round R WALL ACC``
when round R's evaluation ended, ``steps N`` in all, ``end WALL``), in the format flower_sim.py writes, so
that bench_vs_loop.py reads the same moments from every contender.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from workload import (  # noqa: E402
    PRESETS, QUICK, Preset, average, build_model, client_data, evaluate, sample_clients, shuffling, test_data, train)


def run(preset: Preset) -> list[str]:
    """Run the whole experiment; give its marks."""
    x_test, y_test = test_data(preset)
    server, client = build_model(preset, seed=preset.seed), build_model(preset)
    marks = [f"round 0 {time.time()} {evaluate(server, x_test, y_test)}"]
    steps = 0
    for round_ in range(1, preset.rounds + 1):
        states, weights = [], []
        for c in sample_clients(preset, round_):
            x, y = client_data(preset, c)
            client.load_state_dict(server.state_dict())
            if not steps:
                marks.append(f"train {time.time()} 0")
            steps += train(client, preset, x, y, shuffling(preset, round_, c))
            states.append({k: v.clone() for k, v in client.state_dict().items()})
            weights.append(y.numel())
        server.load_state_dict(average(states, weights))
        marks.append(f"round {round_} {time.time()} {evaluate(server, x_test, y_test)}")
    return [*marks, f"steps {steps}"]


def main() -> None:
    name, marks_file = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    marks = run((QUICK if "--quick" in sys.argv[3:] else PRESETS)[name])
    marks_file.write_text("\n".join([*marks, f"end {time.time()}"]) + "\n")


if __name__ == "__main__":
    main()
