"""CPU time of the Fisher diagonal in its two forms (``method_opts.fisher``) on the FedSTIL footprint model.

    python benchmarks/bench_fisher.py [--samples 128] [--threads 1] [--repeat 2]

A full-width resnet18 ReID net at 64x32 with FedSTIL's defaults (``last_stride: 1``, BNNeck, ``fine_tuning:
[base.layer4, classifier]``), the model EWC and FedCurv measure after training in bench_fedstil_footprint.py;
``--samples`` random inputs with random labels among 241 identities. Each form runs ``--repeat`` times,
interleaved; the table gives each run's CPU seconds of the process and seconds per sample.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe  # noqa: E402

from fedevents.federated.backbones import build_reid_model  # noqa: E402
from fedevents.federated.methods.importance import FISHER_FORMS, fisher_diagonal  # noqa: E402
from fedevents.federated.worker import model_output  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_reid_model({"name": "resnet18", "num_classes": 241, "last_stride": 1, "neck": "bnneck",
                              "fine_tuning": ["base.layer4", "classifier"]},
                             generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.samples, 3, 64, 32, generator=gen)
    y = torch.randint(0, 241, (args.samples,), generator=gen)
    print(describe())
    print(f"| form | run | CPU s | CPU s per sample |\n|---|---:|---:|---:|")
    for run in range(args.repeat):
        for form in FISHER_FORMS:
            start = time.process_time()
            fisher_diagonal(model, lambda v: model_output(model(v)), x, y, form=form)
            spent = time.process_time() - start
            print(f"| {form} | {run + 1} | {spent:.2f} | {spent / args.samples:.4f} |", flush=True)


if __name__ == "__main__":
    main()
