"""Engine overhead: the demo's FedAvg run through fedevents versus a hand-written loop doing the same work.

    python benchmarks/bench_overhead.py [--repeats 5] [--rounds 12]

The hand loop is what a researcher writes without a framework: one process, one thread, a for-loop over
rounds and the sampled clients, calling the very same training, validation and averaging code
(``fedevents.federated.Federation``) in order. The fedevents run adds the event bus, the default sinks
(structlog JSONL, JSON record, events JSONL + Perfetto trace), the device pool and worker threads. Both
runs must end with a bit-identical global model, or the benchmark stops: the ratio compares equal work.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import structlog
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.cli import build_experiment  # noqa: E402
from fedevents.engine import load_experiment  # noqa: E402
from fedevents.engine.runner import sample_seed, task_index  # noqa: E402
from fedevents.federated import Federation  # noqa: E402
from fedevents.handlers import ClientWork  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def hand_loop(cfg) -> tuple[float, dict]:
    """The same experiment as a plain loop: sample, train + upload, validate when due, average."""
    data = cfg.data
    began = time.perf_counter()
    fed = Federation(data, seed=cfg.seed, max_in_memory=data["exp_opts"]["clients_in_memory"])
    names, seen = cfg.clients.names, {}
    everyone = lambda rnd: [fed.validate(client=c, tasks=cfg.clients.tasks(c), round=rnd, device="cpu") for c in names]
    everyone(0)
    for rnd in range(1, cfg.rounds + 1):
        picked = sorted(random.Random(sample_seed(cfg.seed, rnd)).sample(range(len(names)), cfg.online_clients))
        online = [names[i] for i in picked]
        for client in online:
            tasks = cfg.clients.tasks(client)
            task = tasks[task_index(seen.get(client, 0), cfg.sustain_rounds, len(tasks))]
            fed.train(client=client, task=task, round=rnd, device="cpu",
                      state="incremental" if client in seen else "integrated")
            seen[client] = seen.get(client, 0) + 1
            fed.upload(client=client, round=rnd)
        if rnd % cfg.val_interval == 0 or rnd == cfg.rounds:
            everyone(rnd)
        fed.aggregate(round=rnd, clients=online)
    return time.perf_counter() - began, fed.server_state()


def fedevents_run(overrides: list[str], logs: Path) -> tuple[float, dict]:
    began = time.perf_counter()
    exp = build_experiment(ROOT / "configs/demo.yaml", overrides=[*overrides, f"logs_dir={logs}"], console=None)
    exp.run()
    return time.perf_counter() - began, exp.component(ClientWork).federation.server_state()


def main() -> None:
    # Neither run may print per-epoch lines: fedevents sends them to its file sink, the hand loop nowhere.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    print(f"machine: {describe()}")
    rows = []
    # The demo's clients train for ~8 ms each; the larger scenario gives each client ~16x the data and a
    # wider model, which is closer to real local training, to show how the fixed per-client cost amortises.
    larger = ["task_opts.synthetic.samples_per_client=2048", "model_opts.hidden=[256,256]"]
    for label, parallel, extra in (("demo", 1, []), ("demo", 2, []), ("larger clients", 1, larger),
                                   ("larger clients", 2, larger)):
        overrides = [f"parallel={parallel}", f"exp_opts.comm_rounds={args.rounds}", *extra]
        cfg = load_experiment(ROOT / "configs/demo.yaml", overrides=overrides)
        hand, ours = [], []
        for i in range(args.repeats + 1):  # the first pair warms caches and is dropped
            with tempfile.TemporaryDirectory() as tmp:
                t_ours, state_ours = fedevents_run(overrides, Path(tmp))
            threads = cfg.data["exp_opts"]["torch_threads"]  # the hand loop gets the same torch threads
            torch.set_num_threads(threads)
            t_hand, state_hand = hand_loop(cfg)
            if any(not torch.equal(state_ours[k], state_hand[k]) for k in state_hand):
                raise SystemExit("the two runs did not compute the same global model; the comparison is void")
            if i:
                hand.append(t_hand)
                ours.append(t_ours)
        h, o = statistics.median(hand), statistics.median(ours)
        rows.append((label, parallel, threads, h, o))
    print(f"demo config, {args.rounds} rounds, median of {args.repeats}; final global models bit-identical\n")
    print("| scenario | parallel | torch threads | hand loop (s) | fedevents (s) | fedevents / hand |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, parallel, threads, h, o in rows:
        print(f"| {label} | {parallel} | {threads} | {h:.3f} | {o:.3f} | {o / h:.3f} |")


if __name__ == "__main__":
    main()
