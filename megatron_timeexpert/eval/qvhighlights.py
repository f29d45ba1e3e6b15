"""QVHighlights moment retrieval and highlight detection, as moment_detr's ``standalone_eval/eval.py``.

Moment retrieval (per query, then the mean over queries):

- MR-mAP: ActivityNet-style detection AP at IoU 0.5:0.05:0.95 on the FIRST 10 windows of
  ``pred_relevant_windows`` (file order), which are then sorted by score (stable: equal scores
  keep file order). Each prediction takes the unmatched ground-truth window of highest IoU
  (equal IoUs: the later window first, as the reference's reversed argsort) if that IoU is >= the
  threshold, else it is a false positive. AP is VOC-2011 all-point interpolated (NOT 11-point):
  ``sum over recall steps of (r_i - r_{i-1}) * max precision at recall >= r_i``. All ground-truth
  windows count (no ``max_gt_windows``).
- MR-R1: the FIRST window in file order (not the highest scored) against the ground-truth window
  it overlaps most; hit when IoU >= threshold.
- Length buckets short (0, 10], middle (10, 30], long (30, 150] seconds keep only the ground-truth
  windows of that length and the queries that have one; ``full`` keeps everything.

Highlight detection (per query and annotator, then the mean):

- The video has ``int(duration / 2)`` clips; clips outside ``relevant_clip_ids`` score 0; a clip is
  positive for an annotator when that annotator's score >= 2 (Fair), 3 (Good) or 4 (VeryGood).
- HL-mAP: the predicted scores are cut or zero-padded to the clip count; AP as sklearn's
  ``precision_recall_curve`` + moment_detr's ``get_ap``: equal scores form ONE threshold; AP is
  the unweighted mean, over the thresholds that add positives, of the interpolated precision
  (max precision at that recall or more). All-negative truth gives 0, all-positive 1.
- HIT@1: the first clip with the highest predicted score; a hit when any annotator marks it
  positive; a clip index past the video is a miss.

Differences (documented in docs/EVAL.md): a query without a prediction, or with an empty one,
scores 0 everywhere and stays in every mean (the reference rejects missing qids, crashes on empty
window lists in MR-R1 and drops them from MR-mAP); IoU with an empty union is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_timeexpert.eval.io import EvalInputError, MomentPrediction, MomentQuery

MAP_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
"""IoU thresholds of MR-mAP and MR-R1: 0.5, 0.55, ..., 0.95."""
MAX_PRED_WINDOWS = 10
"""moment_detr's ``max_pred_windows``: only the first 10 predicted windows count for MR-mAP."""
LENGTH_RANGES = {"short": (0.0, 10.0), "middle": (10.0, 30.0), "long": (30.0, 150.0), "full": (0.0, 150.0)}
"""Ground-truth window length buckets ``(min, max]`` in seconds; ``full`` is not filtered."""
SALIENCY_LEVELS = {"Fair": 2, "Good": 3, "VeryGood": 4}
"""Minimum annotator score (0..4) for a positive clip."""
CLIP_LENGTH = 2.0
"""Seconds per QVHighlights clip."""


def union_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Temporal IoU ``inter / (len_a + len_b - inter)``; 0 when the union is empty."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def voc_interpolated_ap(precision: Sequence[float], recall: Sequence[float]) -> float:
    """VOC-2011 all-point interpolated AP of a precision/recall curve in ranking order."""
    mprec = [0.0, *precision, 0.0]
    mrec = [0.0, *recall, 1.0]
    for i in range(len(mprec) - 2, -1, -1):
        mprec[i] = max(mprec[i], mprec[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mprec[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def detection_ap(
    gt: Sequence[tuple[float, float]], pred: Sequence[tuple[float, float, float]], thresholds=MAP_THRESHOLDS
) -> list[float]:
    """AP of one query's scored windows ``pred`` against its windows ``gt`` at each IoU threshold."""
    if not pred:
        return [0.0] * len(thresholds)
    order = sorted(pred, key=lambda w: -w[2])  # stable: equal scores keep their order
    out = []
    for thr in thresholds:
        taken = [False] * len(gt)
        tp = []
        for w in order:
            ious = [union_iou(w, g) for g in gt]
            hit = False
            # Highest IoU first; equal IoUs: the later window first (reversed ascending stable sort).
            for j in sorted(range(len(gt)), key=lambda k: ious[k])[::-1]:
                if ious[j] < thr:
                    break
                if taken[j]:
                    continue
                taken[j] = hit = True
                break
            tp.append(hit)
        prec, rec, n_tp = [], [], 0
        for k, hit in enumerate(tp, start=1):
            n_tp += hit
            prec.append(n_tp / k)
            rec.append(n_tp / len(gt))
        out.append(voc_interpolated_ap(prec, rec))
    return out


def ranking_ap(y_true: Sequence[int], y_score: Sequence[float]) -> float:
    """moment_detr's ``get_ap`` (sklearn ``precision_recall_curve``, interpolated, one point per recall step)."""
    if not y_true or all(v == y_true[0] for v in y_true):
        return float(bool(y_true) and y_true[0] == 1)
    order = sorted(range(len(y_score)), key=lambda i: -y_score[i])
    points = []  # (precision, tp) at the end of each group of equal scores, in decreasing score order
    tp = fp = 0
    for rank, i in enumerate(order):
        tp += y_true[i]
        fp += 1 - y_true[i]
        if rank + 1 == len(order) or y_score[order[rank + 1]] != y_score[i]:
            points.append((tp / (tp + fp), tp))
    vals, prev_tp = [], 0
    for k, (_, tp_k) in enumerate(points):
        if tp_k != prev_tp:  # recall changes here
            vals.append(max(p for p, _ in points[k:]))
        prev_tp = tp_k
    return sum(vals) / len(vals)


def _windows_with_scores(p: MomentPrediction) -> list[tuple[float, float, float]]:
    out = []
    for i, (s, e, score) in enumerate(p.windows):
        if score is None:
            raise EvalInputError(
                f"{p.where}: pred_relevant_windows[{i}] has no score (QVHighlights needs [s, e, score])"
            )
        out.append((s, e, score))
    return out


def _in_range(gt: list[MomentQuery], name: str) -> list[tuple[int, list[tuple[float, float]]]]:
    """(index, kept windows) of the queries that have a ground-truth window in the bucket."""
    lo, hi = LENGTH_RANGES[name]
    if name == "full":
        return [(i, list(q.windows)) for i, q in enumerate(gt)]
    out = []
    for i, q in enumerate(gt):
        kept = [w for w in q.windows if lo < w[1] - w[0] <= hi]
        if kept:
            out.append((i, kept))
    return out


def moment_retrieval(gt: list[MomentQuery], preds: list[MomentPrediction | None]) -> dict[str, float | None]:
    """MR-mAP per bucket (average and per threshold for ``full``) and MR-R1 (percent)."""
    out: dict[str, float | None] = {}
    scored = [None if p is None else _windows_with_scores(p) for p in preds]
    for name in LENGTH_RANGES:
        queries = _in_range(gt, name)
        if not queries:
            out[f"MR-{name}-mAP"] = None
            continue
        aps = [detection_ap(w, (scored[i] or [])[:MAX_PRED_WINDOWS]) for i, w in queries]
        per_thr = [sum(a[t] for a in aps) / len(aps) for t in range(len(MAP_THRESHOLDS))]
        out[f"MR-{name}-mAP"] = 100.0 * sum(per_thr) / len(per_thr)
        if name == "full":
            for thr, v in zip(MAP_THRESHOLDS, per_thr):
                out[f"MR-full-mAP@{thr}"] = 100.0 * v
            best = []
            for i, w in queries:
                top = (scored[i] or [None])[0]
                best.append(0.0 if top is None else max(union_iou(top, g) for g in w))
            for thr in MAP_THRESHOLDS:
                out[f"MR-full-R1@{thr}"] = 100.0 * sum(v >= thr for v in best) / len(best)
    return out


def _gt_clip_scores(q: MomentQuery) -> list[list[float]]:
    num_clips = int(q.duration / CLIP_LENGTH)
    full = [[0.0, 0.0, 0.0] for _ in range(num_clips)]
    for c, sc in zip(q.relevant_clip_ids, q.saliency_scores):
        full[c] = [float(v) for v in sc]
    return full


def highlight_detection(gt: list[MomentQuery], preds: list[MomentPrediction | None]) -> dict[str, float]:
    """HL-mAP and HL-Hit1 (percent) at each saliency level."""
    out = {}
    full = [_gt_clip_scores(q) for q in gt]
    for level, min_score in SALIENCY_LEVELS.items():
        aps, hits = [], []
        for clips, p in zip(full, preds):
            binary = [[int(v >= min_score) for v in c] for c in clips]
            scores = None if p is None else p.saliency
            if not scores:
                aps.extend([0.0] * 3)
                hits.append(0.0)
                continue
            top = max(range(len(scores)), key=lambda i: (scores[i], -i))
            hits.append(float(max(binary[top])) if top < len(binary) else 0.0)
            y_score = (list(scores) + [0.0] * len(binary))[: len(binary)]
            for a in range(3):
                aps.append(ranking_ap([b[a] for b in binary], y_score))
        out[f"HL-min-{level}-mAP"] = 100.0 * sum(aps) / len(aps)
        out[f"HL-min-{level}-Hit1"] = 100.0 * sum(hits) / len(hits)
    return out


def qvhighlights_metrics(gt: list[MomentQuery], preds: list[MomentPrediction]) -> dict[str, float | None]:
    """All QVHighlights metrics over the ground-truth queries (matched to predictions by qid)."""
    if not gt:
        raise ValueError("qvhighlights_metrics: no ground-truth query")
    by_qid: dict[str, MomentPrediction] = {}
    unmatched = 0
    gt_qids = {q.qid for q in gt}
    for p in preds:
        if p.qid is None:
            raise EvalInputError(f"{p.where}: QVHighlights predictions need a 'qid'")
        if p.qid not in gt_qids or p.qid in by_qid:
            unmatched += 1
            continue
        by_qid[p.qid] = p
    matched = [by_qid.get(q.qid) for q in gt]
    out: dict[str, float | None] = {}
    if any(p is not None and p.windows for p in matched):
        out.update(moment_retrieval(gt, matched))
    has_hl = all(q.relevant_clip_ids is not None for q in gt)
    if has_hl and any(p is not None and p.saliency is not None for p in matched):
        out.update(highlight_detection(gt, matched))
    out["num_queries"] = float(len(gt))
    out["num_missing_predictions"] = float(sum(p is None for p in matched))
    out["num_unmatched_predictions"] = float(unmatched)
    return out


__all__ = [
    "LENGTH_RANGES",
    "MAP_THRESHOLDS",
    "MAX_PRED_WINDOWS",
    "SALIENCY_LEVELS",
    "detection_ap",
    "highlight_detection",
    "moment_retrieval",
    "qvhighlights_metrics",
    "ranking_ap",
    "union_iou",
    "voc_interpolated_ap",
]
