"""CMC and mAP pinned on hand-ranked galleries: 1-D features at 0 and gallery entries at 1, 2, 3, ...

With the query at 0 and gallery entry i at i + 1, the distance ranking is the gallery order, so each expected
value below can be checked by eye.
"""

from __future__ import annotations

import pytest
import torch

from fedevents.federated.reid_metrics import reid_scores


def _line(count: int) -> torch.Tensor:
    """Gallery features 1, 2, ..., count on a line, so rank r is gallery entry r - 1."""
    return torch.arange(1, count + 1, dtype=torch.float32).view(-1, 1)


def _queries(count: int) -> torch.Tensor:
    return torch.zeros(count, 1)


def _score(query_pids, query_cams, gallery_pids, gallery_cams, **options) -> dict[str, float]:
    return reid_scores(
        _queries(len(query_pids)),
        query_pids,
        query_cams,
        _line(len(gallery_pids)),
        gallery_pids,
        gallery_cams,
        **options,
    )


# Person 1 sits at ranks 1 and 3, person 2 at ranks 2 and 4; every gallery entry is seen by camera 2.
GALLERY_PIDS = [1, 2, 1, 2, 3]
GALLERY_CAMS = [2, 2, 2, 2, 2]


def test_true_ap_averages_precision_over_every_correct_match() -> None:
    first = _score([1], [1], GALLERY_PIDS, GALLERY_CAMS)
    assert first["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # 0.8333...
    second = _score([2], [1], GALLERY_PIDS, GALLERY_CAMS)
    assert second["map"] == pytest.approx((1 / 2 + 2 / 4) / 2)  # 0.5


def test_first_match_ap_counts_only_the_first_correct_match() -> None:
    assert _score([1], [1], GALLERY_PIDS, GALLERY_CAMS, map_mode="first-match")["map"] == pytest.approx(1.0)
    assert _score([2], [1], GALLERY_PIDS, GALLERY_CAMS, map_mode="first-match")["map"] == pytest.approx(0.5)


def test_scores_average_over_queries() -> None:
    scores = _score([1, 2], [1, 1], GALLERY_PIDS, GALLERY_CAMS)
    assert scores == pytest.approx(
        {"rank_1": 0.5, "rank_3": 1.0, "rank_5": 1.0, "rank_10": 1.0, "map": ((1 + 2 / 3) / 2 + 0.5) / 2}
    )
    first_match = _score([1, 2], [1, 1], GALLERY_PIDS, GALLERY_CAMS, map_mode="first-match")
    assert first_match["map"] == pytest.approx((1.0 + 0.5) / 2)
    assert first_match["rank_1"] == scores["rank_1"]  # CMC does not depend on the mAP definition


def test_cmc_counts_a_query_from_the_rank_of_its_first_match_on() -> None:
    # Person 3 first appears at rank 5.
    scores = _score([3], [1], GALLERY_PIDS, GALLERY_CAMS, ranks=(1, 4, 5, 6))
    assert scores == {"rank_1": 0.0, "rank_4": 0.0, "rank_5": 1.0, "rank_6": 1.0, "map": 0.2}


def test_a_same_person_same_camera_entry_is_junk_and_leaves_the_ranking() -> None:
    # Without the rule person 1 would match at ranks 1 and 3; the rank-1 entry is seen by the query's own
    # camera, so it goes, and the remaining match moves from rank 3 to rank 2.
    pids, cams = [1, 2, 1, 3], [1, 2, 2, 2]
    scores = _score([1], [1], pids, cams)
    assert scores == {"rank_1": 0.0, "rank_3": 1.0, "rank_5": 1.0, "rank_10": 1.0, "map": 0.5}
    assert _score([1], [1], pids, cams, map_mode="first-match")["map"] == 0.5


def test_the_junk_rule_applies_only_to_the_querys_own_person() -> None:
    # Person 2 at rank 1 shares the query's camera but is another person: it stays and pushes the match down.
    scores = _score([1], [1], [2, 1], [1, 2])
    assert scores["rank_1"] == 0.0 and scores["map"] == 0.5


def test_unknown_cameras_remove_nothing() -> None:
    pids = [1, 2, 1, 3]
    assert _score([1], [-1], pids, [1, 2, 2, 2])["map"] == pytest.approx((1 + 2 / 3) / 2)
    assert _score([1], [1], pids, [-1, 2, 2, 2])["map"] == pytest.approx((1 + 2 / 3) / 2)


def test_a_query_with_no_valid_match_is_skipped_in_cmc_and_map() -> None:
    # Query 2's only match is junk; the score is query 1's alone.
    scores = _score([1, 2], [1, 1], [1, 2, 3], [2, 1, 2])
    assert scores == {"rank_1": 1.0, "rank_3": 1.0, "rank_5": 1.0, "rank_10": 1.0, "map": 1.0}


def test_no_query_with_a_valid_match_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected at least one query with a correct match.*found none of 2"):
        _score([4, 2], [1, 1], [1, 2, 3], [2, 1, 2])


def test_ranks_beyond_a_small_gallery_count_every_scored_query() -> None:
    scores = _score([1, 3], [1, 1], [2, 3, 1], [2, 2, 2])
    assert scores["rank_1"] == 0.0
    assert scores["rank_3"] == 1.0 and scores["rank_10"] == 1.0
    assert scores["map"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_cosine_ranks_by_angle_not_length() -> None:
    query = torch.tensor([[1.0, 0.0]])
    # Entry 0 is close in space but at 90 degrees; entry 1 is far but in the query's direction.
    gallery = torch.tensor([[0.0, 1.0], [10.0, 0.5]])
    args = (query, [1], [1], gallery, [2, 1], [2, 2])
    assert reid_scores(*args, metric="cosine")["rank_1"] == 1.0
    assert reid_scores(*args, metric="euclidean")["rank_1"] == 0.0


def test_ties_keep_gallery_order() -> None:
    scores = reid_scores(torch.zeros(1, 1), [1], [1], torch.ones(3, 1), [2, 1, 1], [2, 2, 2])
    assert scores["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def _reference(qf, qp, qc, gf, gp, gc, ranks, first_match):
    """A per-query loop written straight from the definitions, to check the vectorised code against."""
    hits = {k: 0 for k in ranks}
    aps = []
    for i in range(len(qp)):
        order = torch.argsort(torch.cdist(qf[i : i + 1], gf)[0], stable=True).tolist()
        kept = [j for j in order if not (gp[j] == qp[i] and gc[j] == qc[i] and qc[i] >= 0 and gc[j] >= 0)]
        match_ranks = [r + 1 for r, j in enumerate(kept) if gp[j] == qp[i]]
        if not match_ranks:
            continue
        for k in ranks:
            hits[k] += match_ranks[0] <= k
        if first_match:
            aps.append(1 / match_ranks[0])
        else:
            aps.append(sum((n + 1) / r for n, r in enumerate(match_ranks)) / len(match_ranks))
    scores = {f"rank_{k}": hits[k] / len(aps) for k in ranks}
    scores["map"] = sum(aps) / len(aps)
    return scores


@pytest.mark.parametrize("map_mode", ["true", "first-match"])
def test_random_retrievals_agree_with_a_loop_over_queries(map_mode: str) -> None:
    gen = torch.Generator().manual_seed(3)
    qf, gf = torch.randn(40, 8, generator=gen), torch.randn(120, 8, generator=gen)
    qp, gp = torch.randint(0, 12, (40,), generator=gen), torch.randint(0, 12, (120,), generator=gen)
    qc, gc = torch.randint(-1, 3, (40,), generator=gen), torch.randint(-1, 3, (120,), generator=gen)
    ranks = (1, 2, 5, 10, 200)
    expected = _reference(qf, qp.tolist(), qc.tolist(), gf, gp.tolist(), gc.tolist(), ranks, map_mode != "true")
    assert reid_scores(qf, qp, qc, gf, gp, gc, ranks=ranks, map_mode=map_mode) == pytest.approx(expected)


def test_chunks_of_queries_give_the_same_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedevents.federated import reid_metrics

    gen = torch.Generator().manual_seed(4)
    query = (torch.randn(30, 4, generator=gen), torch.randint(0, 5, (30,), generator=gen), torch.zeros(30).long())
    gallery = (torch.randn(50, 4, generator=gen), torch.randint(0, 5, (50,), generator=gen), torch.ones(50).long())
    args = (*query, *gallery)
    whole = reid_scores(*args)
    monkeypatch.setattr(reid_metrics, "_CHUNK_ENTRIES", 7 * 50)  # 7 queries per chunk
    assert reid_scores(*args) == pytest.approx(whole)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"map_mode": "first"}, ValueError, "map_mode: expected one of true, first-match, fedstil-runner, found 'first'"),
        ({"metric": "l1"}, ValueError, "metric: expected one of euclidean, cosine, found 'l1'"),
        ({"ranks": (0, 5)}, ValueError, r"ranks: expected ints >= 1, found \(0, 5\)"),
    ],
)
def test_bad_options_are_named(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _score([1], [1], [1], [2], **options)


def test_mismatched_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"gallery ids: expected 2 person and camera ids .* found shapes \(3,\)"):
        reid_scores(torch.zeros(1, 1), [1], [1], torch.zeros(2, 1), [1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match=r"found \(1, 2\) and \(2, 3\)"):
        reid_scores(torch.zeros(1, 2), [1], [1], torch.zeros(2, 3), [1, 2], [1, 2])
    with pytest.raises(TypeError, match="query_pids: expected integer ids, found dtype torch.float32"):
        reid_scores(torch.zeros(1, 1), torch.tensor([1.0]), [1], torch.zeros(2, 1), [1, 2], [1, 2])
