"""FedSTIL's relevance of other clients to one client, from the KL divergence between their task tokens.

A task token is a client's mean prototype of one round. For client ``c`` with latest token ``t`` and every
other client ``j`` with token history ``H_j`` (oldest first):

    d_j = 1e-8 + sum_k KL(softmax(H_j[-1 - k * step]) || softmax(t)) / decay ** k      (k = 0: newest)
    r_j = 1 / d_j,   r_c = mean_j r_j,   r <- r / sum(r),   w = softmax(r)  over (others..., c)

The personalised weight sent to ``c`` is ``sum_i w_i theta_i``. With no other client (one client, or the only
one with tokens) ``c`` gets weight 1 on its own weights; the original divides by zero there.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch.nn import functional as F

__all__ = ["distance", "relevance_weights"]


def distance(history: Sequence[torch.Tensor], token: torch.Tensor, *, step: int, decay: float) -> torch.Tensor:
    """``d_j``: the decayed sum of KL divergences from every ``step``-th token of ``history`` (newest first)."""
    log_q = F.log_softmax(token.double().flatten(), dim=0)
    total = torch.zeros((), dtype=torch.float64)
    for k, past in enumerate(list(history)[::-step]):
        log_p = F.log_softmax(past.double().flatten(), dim=0)
        # KL(p || q) summed over the token's entries: F.kl_div takes log q as input and log p as target.
        kl = F.kl_div(log_q, log_p, reduction="sum", log_target=True)
        total = total + kl / decay**k
    return total + 1e-8


def relevance_weights(
    own: torch.Tensor, others: Mapping[str, Sequence[torch.Tensor]], *, step: int, decay: float
) -> torch.Tensor:
    """The dispatch weights over ``(*others in their order, own)`` (float64, summing to 1)."""
    if not others:
        return torch.ones(1, dtype=torch.float64)
    r = torch.stack([1.0 / distance(history, own, step=step, decay=decay) for history in others.values()])
    r = torch.cat([r, r.mean().reshape(1)])
    return torch.softmax(r / r.sum(), dim=0)
