"""iCaRL's training side in a federation: herded exemplars replayed with each new task, and distillation
from the model the client finished its last task with. The server half is FedAvg's.

When a client starts a new task it first, with its previous model, herds exemplars of the finished task's
classes and shrinks the other classes' sets, so that each class seen keeps ``memory_size // classes`` of
them. That model, frozen, is the "old model" for the whole new task: every batch adds

    distill_weight * T^2 * mean over the batch of KL(softmax(z_old / T) || softmax(z / T))

with ``z_old`` the old model's logits on the same batch and ``z`` the current logits, both restricted to the
classes seen before the new task. Scoring stays the network's classifier (no nearest-mean-of-exemplars).

Exemplars are kept in the task's stored form (a ReID task's 8-bit pixels, a quarter of the bytes of the
normalised images) and normalised a batch at a time like the task's own samples. Exemplars that an older
checkpoint holds as normalised float images are turned back into the pixels they came from, exactly.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch
from torch.nn import functional as F

from .base import LocalRound, Method, ModelOutput, ServerState, every_entry, no_entry, option
from .counts import count_option
from .importance import BATCH
from .switch import finished_task

__all__ = ["ICaRL", "herding"]


class ICaRL(Method):
    """FedAvg plus exemplar replay (herding, at most ``memory_size`` per client) and logit distillation."""

    name = "icarl"
    runner_schedules_lr = False  # FedSTIL's runner rebuilt its optimizer's groups every epoch
    defaults = {"memory_size": 200, "distill_weight": 1.0, "temperature": 2.0}
    # FedSTIL's k is the exemplar budget; its n_classes (first classifier size) and examplar_batch_size
    # (never read) have no counterpart: a fedevents classifier has its full size from the start.
    aliases = {"k": ("memory_size", 1.0), "n_classes": None, "examplar_batch_size": None}
    stored_inputs = True

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self.memory_size = count_option(self.options, "memory_size", method=self.name)
        self.distill_weight = option(self.options, "distill_weight", 1.0, method=self.name)
        self.temperature = option(self.options, "temperature", 2.0, method=self.name, minimum=1e-6)

    def replaced_on_dispatch(self, server: ServerState, *, switching: bool) -> Callable[[str], bool]:
        """Every entry, as FedAvg, except at a task switch: ``remember`` reads the stored model first."""
        return no_entry if switching else every_entry

    def start(self, rnd: LocalRound) -> None:
        finished = finished_task(rnd)
        if finished is not None:
            self.remember(rnd, finished)
        super().start(rnd)
        memory = rnd.memory
        if "old_model" in memory:
            old = copy.deepcopy(rnd.model)
            old.load_state_dict(memory["old_model"])
            # Train mode, as the current model runs: a ReID net gives logits only in train mode.
            rnd.scratch["old_model"] = old.train().requires_grad_(False)
            rnd.scratch["old_classes"] = torch.tensor(memory["old_classes"], dtype=torch.long, device=rnd.device)

    def remember(self, rnd: LocalRound, finished: str) -> None:
        """Herd ``finished``'s exemplars, shrink the other classes' sets, and keep the previous model."""
        assert rnd.previous_model is not None  # finished_task checked it
        rnd.model.load_state_dict(rnd.previous_model)
        x, y = rnd.task_inputs(finished)
        old_x, old_y = self.exemplars(rnd, x, y)
        classes = sorted(set(old_y.tolist()) | set(y.tolist()))
        per_class = self.memory_size // len(classes) if classes else 0
        new_classes = set(y.tolist())
        kept_x, kept_y = [], []
        for c in classes:
            cx = old_x[old_y == c]  # in herding order, so a prefix is the best smaller set
            if c in new_classes and per_class:
                # A class seen before and again now is herded afresh from its old exemplars and new samples.
                cx = torch.cat([x[y == c], cx])
                cx = cx[herding(F.normalize(_features(rnd, cx), dim=1), per_class)]
            kept_x.append(cx[:per_class])
            kept_y.append(torch.full((kept_x[-1].shape[0],), c, dtype=y.dtype, device=y.device))
        # New tensors, never edits in place: rnd.memory is a shallow copy of the stored memory.
        rnd.memory["exemplar_x"] = torch.cat(kept_x) if kept_x else x[:0]
        rnd.memory["exemplar_y"] = torch.cat(kept_y) if kept_y else y[:0]
        rnd.memory["old_model"] = {name: t.detach().clone() for name, t in rnd.previous_model.items()}
        rnd.memory["old_classes"] = classes

    def exemplars(self, rnd: LocalRound, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored exemplars in the form of the task's samples ``x`` and labels ``y`` (none: empty)."""
        ex_x, ex_y = rnd.memory.get("exemplar_x", x[:0]).to(x.device), rnd.memory.get("exemplar_y", y[:0])
        if x.dtype == torch.uint8 and ex_x.is_floating_point():
            # Kept as float images before exemplars were stored as pixels: turned back once, exactly.
            ex_x = rnd.memory["exemplar_x"] = stored_pixels(ex_x, rnd.model_input, client=rnd.client)
        return ex_x.to(x.dtype), ex_y.to(y.device, y.dtype)

    def training_data(self, rnd: LocalRound, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ex_x, ex_y = self.exemplars(rnd, x, y)
        if not len(ex_y):
            return x, y
        return torch.cat([x, ex_x]), torch.cat([y, ex_y])

    def batch_loss(self, rnd: LocalRound, xb: torch.Tensor, yb: torch.Tensor, out: ModelOutput,
                   loss: torch.Tensor) -> torch.Tensor:
        old = rnd.scratch.get("old_model")
        if old is None:
            return loss  # no task finished yet
        classes = rnd.scratch["old_classes"]
        with torch.no_grad():
            # The old model runs on this very batch, so each old logit row belongs to the same sample.
            old_logits = _logits(old(xb))[:, classes]
        return loss + self.distill_weight * distillation(out.logits[:, classes], old_logits, self.temperature)


def distillation(logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * the batch mean of KL(softmax(old / T) || softmax(logits / T)), row n against row n."""
    old_log_p = torch.log_softmax(old_logits / temperature, dim=1)
    log_p = torch.log_softmax(logits / temperature, dim=1)
    kl = (old_log_p.exp() * (old_log_p - log_p)).sum(1)
    return temperature ** 2 * kl.mean()


def herding(features: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of ``count`` rows of ``features`` chosen by herding, in the order chosen.

    Step k takes the row, among those not yet taken, that brings the mean of the k taken rows nearest to the
    mean of all rows (ties go to the lowest index). Normalise the features first for iCaRL's herding.
    """
    target = features.mean(0)
    taken = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    running = torch.zeros_like(target)
    order = []
    for k in range(1, min(count, features.shape[0]) + 1):
        distance = (target - (running + features) / k).pow(2).sum(1)
        distance[taken] = torch.inf
        pick = int(distance.argmin())
        order.append(pick)
        taken[pick] = True
        running = running + features[pick]
    return torch.tensor(order, dtype=torch.long, device=features.device)


def _features(rnd: LocalRound, x: torch.Tensor) -> torch.Tensor:
    """``rnd.model``'s features of ``x`` in eval mode (a ReID net's retrieval embedding), without gradients."""
    model = rnd.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([rnd.forward_inputs(xb).features for xb in x.split(BATCH)])
    finally:
        model.train(was_training)


def stored_pixels(images: torch.Tensor, model_input: Callable[[torch.Tensor], torch.Tensor], *,
                  client: str) -> torch.Tensor:
    """The 8-bit images whose ``model_input`` is exactly ``images``, or a one-line ValueError.

    ``model_input`` maps each pixel on its own and increasingly (normalisation), so the model input of every
    level at every position is a sorted table per position, and each value is looked up in its own.
    """
    shape = images.shape[1:]
    levels = torch.arange(256, device=images.device).to(torch.uint8)
    table = model_input(levels.view(256, *[1] * len(shape)).expand(256, *shape).contiguous())
    if table.dtype != images.dtype or table.shape[1:] != shape:
        raise ValueError(f"icarl: client {client!r} has exemplars stored as {images.dtype} images, which the "
                         f"task's 8-bit samples do not become ({table.dtype} {list(table.shape[1:])})")
    table = table.flatten(1).T.contiguous()  # [positions, 256]
    values = images.flatten(1).T.contiguous()  # [positions, exemplars]
    found = torch.searchsorted(table, values).clamp_(max=255)
    if not torch.equal(table.gather(1, found), values):
        raise ValueError(f"icarl: client {client!r} has exemplars stored as float images that no 8-bit image "
                         f"normalises to under this experiment's task_opts.augment_opts; resume with the "
                         f"augment_opts the checkpoint was written with")
    return found.T.reshape(images.shape).to(torch.uint8)


def _logits(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
