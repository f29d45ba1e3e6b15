"""Charades-STA style moment retrieval: R@1 at IoU {0.3, 0.5, 0.7} and mIoU (see docs/EVAL.md).

The top-1 window of a query is the FIRST window of its prediction (predictions are ranked lists;
scores, if any, are not used to re-rank). The IoU is TRACE's ``eval_tvg.py`` one:
``max(0, min(e1, e2) - max(s1, s2)) / (max(e1, e2) - min(s1, s2))`` (the denominator is the hull,
which equals the union whenever the windows overlap), with 0 for a zero-length hull. Windows are
not clipped to the video. Every ground-truth query counts: a query with no prediction (or an
empty one) scores IoU 0, and all averages are over the number of ground-truth queries.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from megatron_timeexpert.eval.io import MomentPrediction, MomentQuery

R1_THRESHOLDS = (0.3, 0.5, 0.7)


def hull_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Temporal IoU of two ``(start, end)`` windows with the hull as the denominator (0 when it is empty)."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    hull = max(a[1], b[1]) - min(a[0], b[0])
    return inter / hull if hull > 0 else 0.0


@dataclass
class Matched:
    """Ground-truth queries paired with their predictions."""

    predictions: list[MomentPrediction | None]
    """One entry per ground-truth query (same order); None where no prediction was given."""
    missing: int = 0
    """Ground-truth queries without a prediction (scored as empty predictions)."""
    unmatched: list[str] = field(default_factory=list)
    """``file:line`` of predictions that match no ground-truth query (ignored)."""


def match_predictions(gt: list[MomentQuery], preds: list[MomentPrediction]) -> Matched:
    """Pair each ground-truth query with a prediction: by ``qid`` when the prediction has one, else by
    ``(vid, query)`` (whitespace-stripped). Several ground-truth queries with the same ``(vid, query)``
    take the predictions with that key in file order. A second prediction for the same query is an
    unmatched (ignored) prediction."""
    by_qid = {q.qid: i for i, q in enumerate(gt)}
    by_text: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, q in enumerate(gt):
        by_text[(q.vid, q.query.strip())].append(i)
    out: list[MomentPrediction | None] = [None] * len(gt)
    unmatched = []
    for p in preds:
        target = None
        if p.qid is not None:
            target = by_qid.get(p.qid)
            if target is not None and out[target] is not None:
                target = None
        elif p.vid is not None and p.query is not None:
            target = next((i for i in by_text.get((p.vid, p.query.strip()), []) if out[i] is None), None)
        if target is None:
            unmatched.append(p.where)
        else:
            out[target] = p
    return Matched(out, sum(p is None for p in out), unmatched)


def top1_ious(gt: list[MomentQuery], matched: Matched) -> list[float]:
    """IoU of each query's top-1 window with its (first) ground-truth window; 0 without a prediction."""
    ious = []
    for q, p in zip(gt, matched.predictions):
        if p is None or not p.windows:
            ious.append(0.0)
        else:
            ious.append(hull_iou(p.windows[0][:2], q.windows[0]))
    return ious


def charades_metrics(gt: list[MomentQuery], preds: list[MomentPrediction]) -> dict[str, float]:
    """R@1 at IoU 0.3/0.5/0.7 (percent, IoU >= threshold) and mIoU (percent) over all ground-truth queries."""
    if not gt:
        raise ValueError("charades_metrics: no ground-truth query")
    matched = match_predictions(gt, preds)
    ious = top1_ious(gt, matched)
    n = len(gt)
    out = {f"R1@{t}": 100.0 * sum(v >= t for v in ious) / n for t in R1_THRESHOLDS}
    out["mIoU"] = 100.0 * sum(ious) / n
    out["num_queries"] = float(n)
    out["num_missing_predictions"] = float(matched.missing)
    out["num_empty_predictions"] = float(sum(p is not None and not p.windows for p in matched.predictions))
    out["num_unmatched_predictions"] = float(len(matched.unmatched))
    return out


def event_indices(gt: list[MomentQuery]) -> list[int]:
    """Each query's event index in its video: the rank of its (first) window's start among the distinct
    ground-truth windows of the same video (0 = the video's first event)."""
    starts: dict[str, list[float]] = defaultdict(list)
    for q in gt:
        starts[q.vid].append(q.windows[0][0])
    ranked = {vid: sorted(set(v)) for vid, v in starts.items()}
    return [ranked[q.vid].index(q.windows[0][0]) for q in gt]


def charades_by_event_index(gt: list[MomentQuery], preds: list[MomentPrediction]) -> dict[str, dict[str, float]]:
    """R@1 and mIoU (percent) separately for the queries about a video's FIRST event and about its LATER
    events (:func:`event_indices`): a model that answers "near the start" scores well on the first and
    near zero on the later ones. ``{"first": {...}, "later": {...}}``, each with ``num_queries``."""
    ious = top1_ious(gt, match_predictions(gt, preds))
    out = {}
    for name, keep in (("first", lambda i: i == 0), ("later", lambda i: i > 0)):
        sel = [v for v, i in zip(ious, event_indices(gt)) if keep(i)]
        n = len(sel)
        row = {f"R1@{t}": (100.0 * sum(v >= t for v in sel) / n if n else float("nan")) for t in R1_THRESHOLDS}
        row["mIoU"] = 100.0 * sum(sel) / n if n else float("nan")
        row["num_queries"] = float(n)
        out[name] = row
    return out


def distinct_top_windows(preds: list[MomentPrediction]) -> int:
    """How many different top-1 windows the predictions hold (a predictor that ignores the query gives 1)."""
    return len({tuple(p.windows[0][:2]) for p in preds if p.windows})
