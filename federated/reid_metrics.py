"""Re-identification scores: CMC rank-k and mAP, ranked in torch on the features' device.

Gallery entries of the query's person seen by the query's own camera are "junk" and removed before ranking
(the Market-1501 protocol), when both camera ids are known (>= 0). A query with no correct match left is
skipped, in CMC and mAP alike.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.nn import functional as F

__all__ = ["MAP_MODES", "METRICS", "reid_scores"]

MAP_MODES = ("true", "first-match", "fedstil-runner")
METRICS = ("euclidean", "cosine")

# Queries are ranked in chunks so the [queries, gallery] index tensors stay near this many entries.
_CHUNK_ENTRIES = 1 << 22


def reid_scores(
    query_feats: torch.Tensor,
    query_pids: Any,
    query_camids: Any,
    gallery_feats: torch.Tensor,
    gallery_pids: Any,
    gallery_camids: Any,
    *,
    ranks: Sequence[int] = (1, 3, 5, 10),
    map_mode: str = "true",
    metric: str = "euclidean",
) -> dict[str, float]:
    """Score a retrieval: ``{"rank_<k>": CMC at k for each k in ranks, "map": mean average precision}``.

    All values are fractions in [0, 1]. Ids may be tensors or sequences of ints. ``metric`` is the distance
    ranked by: ``"euclidean"`` or ``"cosine"`` (1 - cosine similarity). Ties keep gallery order.

    ``map_mode="true"`` is the mean over queries of the average precision over every correct match: with the
    k-th correct match at rank r_k, AP = mean_k(k / r_k). ``map_mode="first-match"`` counts only the first
    correct match (AP = 1 / its rank), which is what an older runner reported as mAP; use it only to compare
    with numbers published from that runner, as it overstates mAP whenever a person has several matches.
    ``map_mode="fedstil-runner"`` is FedSTIL's runner's value exactly: its trapezoid AP taken over the first
    correct match only, 1 at rank 1 and 1 / (2 * rank) below.

    A rank beyond the gallery's size is the fraction of scored queries with any match, i.e. 1.0.
    Raises ``ValueError`` when shapes disagree or when no query has a correct match left.
    """
    _check_options(ranks, map_mode, metric)
    device = query_feats.device
    qp, qc, gp, gc = (
        _ids(ids, device, name)
        for ids, name in (
            (query_pids, "query_pids"),
            (query_camids, "query_camids"),
            (gallery_pids, "gallery_pids"),
            (gallery_camids, "gallery_camids"),
        )
    )
    _check_shapes(query_feats, qp, qc, gallery_feats, gp, gc)
    gallery_feats = gallery_feats.to(device)
    chunk = max(1, _CHUNK_ENTRIES // gallery_feats.shape[0])
    firsts, aps = [], []
    for start in range(0, query_feats.shape[0], chunk):
        stop = start + chunk
        dist = _distances(query_feats[start:stop], gallery_feats, metric)
        first, ap = _rank_chunk(dist, qp[start:stop], qc[start:stop], gp, gc, map_mode)
        firsts.append(first)
        aps.append(ap)
    return _summarise(torch.cat(firsts), torch.cat(aps), ranks)


def _distances(query: torch.Tensor, gallery: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        return 1.0 - F.normalize(query.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T
    return torch.cdist(query.float(), gallery.float())


def _rank_chunk(
    dist: torch.Tensor, qp: torch.Tensor, qc: torch.Tensor, gp: torch.Tensor, gc: torch.Tensor, map_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each query's rank of its first correct match (0 for none) and its AP, junk removed."""
    order = torch.argsort(dist, dim=1, stable=True)
    same_pid = gp[order] == qp[:, None]
    ranked_cams = gc[order]
    known = (qc[:, None] >= 0) & (ranked_cams >= 0)
    junk = same_pid & known & (ranked_cams == qc[:, None])
    kept = ~junk
    good = same_pid & kept
    # Each kept entry's 1-based rank once junk is taken out; junk entries get a rank they never use.
    position = torch.cumsum(kept, dim=1)
    big = position.shape[1] + 1
    first = torch.where(good, position, big).min(dim=1).values
    first = torch.where(first == big, 0, first)
    if map_mode == "first-match":
        ap = torch.where(first > 0, 1.0 / first.clamp(min=1).double(), 0.0)
        return first, ap
    if map_mode == "fedstil-runner":
        # The runner's trapezoid AP looped over one "positive" (FEDSTIL.md B18): 1 at rank 1, else 1 / (2 rank).
        ap = torch.where(first == 1, 1.0, 0.5 / first.clamp(min=1).double())
        return first, torch.where(first > 0, ap, 0.0)
    hits = torch.cumsum(good, dim=1)
    precision = torch.where(good, hits.double() / position.clamp(min=1).double(), 0.0)
    ap = precision.sum(dim=1) / hits[:, -1].clamp(min=1).double()
    return first, ap


def _summarise(first: torch.Tensor, ap: torch.Tensor, ranks: Sequence[int]) -> dict[str, float]:
    scored = first > 0
    count = int(scored.sum())
    if count == 0:
        raise ValueError(
            f"reid_scores: expected at least one query with a correct match in the gallery, found none of "
            f"{first.numel()} (after removing same-person same-camera entries)"
        )
    first = first[scored]
    scores = {f"rank_{k}": float((first <= k).sum()) / count for k in ranks}
    scores["map"] = float(ap[scored].sum()) / count
    return scores


def _ids(ids: Any, device: torch.device, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(ids, device=device)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer ids, found dtype {tensor.dtype}")
    return tensor.to(torch.int64)


def _check_options(ranks: Sequence[int], map_mode: str, metric: str) -> None:
    if map_mode not in MAP_MODES:
        raise ValueError(f"map_mode: expected one of {', '.join(MAP_MODES)}, found {map_mode!r}")
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, found {metric!r}")
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ranks):
        raise ValueError(f"ranks: expected ints >= 1, found {tuple(ranks)!r}")


def _check_shapes(
    qf: torch.Tensor, qp: torch.Tensor, qc: torch.Tensor, gf: torch.Tensor, gp: torch.Tensor, gc: torch.Tensor
) -> None:
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"features: expected [queries, dim] and [gallery, dim] with one dim, "
            f"found {tuple(qf.shape)} and {tuple(gf.shape)}"
        )
    if qf.shape[0] == 0 or gf.shape[0] == 0:
        raise ValueError(
            f"features: expected at least one query and one gallery entry, "
            f"found {qf.shape[0]} queries and {gf.shape[0]} gallery entries"
        )
    for role, feats, pids, cams in (("query", qf, qp, qc), ("gallery", gf, gp, gc)):
        if pids.shape != (feats.shape[0],) or cams.shape != (feats.shape[0],):
            raise ValueError(
                f"{role} ids: expected {feats.shape[0]} person and camera ids (one per feature row), "
                f"found shapes {tuple(pids.shape)} and {tuple(cams.shape)}"
            )
