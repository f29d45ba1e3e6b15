"""Chance and prior baselines for the VTG metrics: what a predictor that never looks at the video scores.

    preds = random_moment_predictions(gt_queries, durations, seed)      # charades / qvhighlights
    preds = random_dense_predictions(gt_videos, captions, seed)        # dense captioning
    preds = prior_moment_predictions(gt_queries, train_windows)        # the training set's most common window
    preds = prior_dense_predictions(gt_videos, train_videos)           # its most common spans and caption

Each baseline draws, per query or video, windows uniformly at random inside the video (start and
end: two uniform draws in ``[0, duration]``, sorted), with random scores; dense captioning draws as
many windows as the video has ground-truth events (an oracle count, which favours the baseline)
and gives each a caption drawn from the training captions. Highlight detection draws a uniform
saliency score per 2 s clip. The expected chance level is the mean metric over several seeds
(``timeexpert`` main job: 5).

The prior baselines answer a harder question: how much does a predictor score that knows the
training set's statistics but not the video? Moment retrieval: every query gets the most frequent
training window (ties: the earliest), clipped to the video, and saliency 1 on the clips it covers;
dense captioning: every video gets the ``n`` most frequent training spans (``n`` = its number of
ground-truth events, as above) with the most frequent training caption. A model that only learned
where events usually are matches this baseline; grounding shows as a margin over it.

The best constant answer is the strongest predictor that ignores the query and the video: one window,
chosen on the TRAINING set (a 0.5 s grid of every ``start < end`` up to the longest training video) to
maximise R1@0.5 of the training queries (ties: mIoU, then the earliest), each window clipped to its
video (:func:`best_constant_window`); dense captioning: ``n`` windows picked greedily, each the one
that matches (IoU >= 0.5) the most training events not matched yet (:func:`best_constant_spans`), with
the most frequent training caption. It is what a model that learned "where to answer" but not "what
the query is about" could reach at best, so a model grounds when it beats this clearly.
Pure functions of their inputs; no torch.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from megatron_timeexpert.eval.io import DenseVideo, MomentQuery


def _window(rng: random.Random, duration: float) -> tuple[float, float]:
    a, b = sorted((rng.uniform(0.0, duration), rng.uniform(0.0, duration)))
    return round(a, 1), round(max(b, a + 0.1), 1)


def random_moment_predictions(
    queries: Sequence[MomentQuery], durations: Mapping[str, float], seed: int, windows: int = 5
) -> list[dict]:
    """One prediction per query: ``windows`` random ranked windows with random scores, and (when the
    query has a duration or a known video duration) one uniform saliency score per 2 s clip."""
    rng = random.Random(seed)
    out = []
    for q in queries:
        duration = q.duration if q.duration is not None else durations[q.vid]
        ws = sorted(((*_window(rng, duration), rng.random()) for _ in range(windows)), key=lambda w: -w[2])
        clips = int(math.ceil(duration / 2))
        out.append(
            {
                "qid": q.qid,
                "vid": q.vid,
                "query": q.query,
                "pred_windows": [list(w) for w in ws],
                "pred_relevant_windows": [list(w) for w in ws],
                "pred_saliency_scores": [rng.random() for _ in range(clips)],
            }
        )
    return out


def random_dense_predictions(videos: Sequence[DenseVideo], captions: Sequence[str], seed: int) -> dict:
    """Per video, as many random windows as it has ground-truth events, each with a random caption."""
    rng = random.Random(seed)
    out = {}
    for v in videos:
        duration = v.duration if v.duration is not None else max(e for _, e in v.segments)
        events = [_window(rng, duration) for _ in v.segments]
        out[v.vid] = [{"timestamp": list(w), "caption": rng.choice(list(captions))} for w in sorted(events)]
    return out


def _most_common(items: Sequence, n: int = 1) -> list:
    """The ``n`` most frequent items, ties broken by the smallest item (deterministic)."""
    counts = Counter(items)
    return sorted(counts, key=lambda x: (-counts[x], x))[:n]


def prior_moment_predictions(
    queries: Sequence[MomentQuery], durations: Mapping[str, float], train_windows: Sequence[tuple[float, float]]
) -> list[dict]:
    """Every query: the most frequent training window, clipped to the video; saliency 1 on its clips."""
    window = _most_common([(float(s), float(e)) for s, e in train_windows])[0]
    return constant_moment_predictions(queries, durations, window)


def prior_dense_predictions(videos: Sequence[DenseVideo], train_videos: Sequence[DenseVideo]) -> dict:
    """Every video: its number of ground-truth events of the most frequent training spans, each with
    the most frequent training caption."""
    spans = [(float(s), float(e)) for v in train_videos for s, e in v.segments]
    caption = _most_common([c for v in train_videos for c in v.captions])[0]
    out = {}
    for v in videos:
        chosen = sorted(_most_common(spans, len(v.segments)))
        out[v.vid] = [{"timestamp": [s, e], "caption": caption} for s, e in chosen]
    return out


# ---- the best constant answer ------------------------------------------------------------------------


def _grid(max_end: float, step: float) -> np.ndarray:
    """Every ``(start, end)`` with ``0 <= start < end <= max_end`` on a ``step`` grid: ``[n, 2]``."""
    pts = np.arange(0.0, max_end + step / 2, step)
    s, e = np.meshgrid(pts, pts, indexing="ij")
    keep = e > s
    return np.stack([s[keep], e[keep]], axis=1)


def _iou_matrix(windows: np.ndarray, gt: np.ndarray, durations: np.ndarray) -> np.ndarray:
    """Hull IoU (eval/moment.py) of every window clipped to each query's video ``[n_windows, n_queries]``."""
    s = np.minimum(windows[:, None, 0], durations[None, :])
    e = np.maximum(np.minimum(windows[:, None, 1], durations[None, :]), s + 0.1)
    inter = np.clip(np.minimum(e, gt[None, :, 1]) - np.maximum(s, gt[None, :, 0]), 0.0, None)
    hull = np.maximum(e, gt[None, :, 1]) - np.minimum(s, gt[None, :, 0])
    return np.where(hull > 0, inter / np.where(hull > 0, hull, 1.0), 0.0)


def best_constant_window(
    train_queries: Sequence[MomentQuery], durations: Mapping[str, float], step: float = 0.5
) -> tuple[float, float]:
    """The one window that scores the highest R1@0.5 over ``train_queries`` (ties: mIoU, then the earliest
    start and end), each query's copy clipped to its video (``durations`` by video id, or the query's own)."""
    if not train_queries:
        raise ValueError("best_constant_window: no training query")
    gt = np.array([q.windows[0] for q in train_queries], dtype=np.float64)
    dur = np.array([q.duration if q.duration is not None else durations[q.vid] for q in train_queries])
    windows = _grid(float(dur.max()), step)
    ious = _iou_matrix(windows, gt, dur)
    r1 = (ious >= 0.5).mean(axis=1)
    miou = ious.mean(axis=1)
    order = np.lexsort((windows[:, 1], windows[:, 0], -miou, -r1))  # last key sorts first
    best = windows[order[0]]
    return float(best[0]), float(best[1])


def constant_moment_predictions(
    queries: Sequence[MomentQuery], durations: Mapping[str, float], window: tuple[float, float]
) -> list[dict]:
    """Every query: ``window`` clipped to its video, saliency 1 on the 2 s clips it covers (as the prior)."""
    out = []
    for q in queries:
        duration = q.duration if q.duration is not None else durations[q.vid]
        s, e = min(window[0], duration), min(window[1], duration)
        w = [s, max(e, s + 0.1), 1.0]
        out.append(
            {
                "qid": q.qid,
                "vid": q.vid,
                "query": q.query,
                "pred_windows": [w],
                "pred_relevant_windows": [w],
                "pred_saliency_scores": [
                    float(2 * c < e and 2 * c + 2 > s) for c in range(int(math.ceil(duration / 2)))
                ],
            }
        )
    return out


def best_constant_spans(train_videos: Sequence[DenseVideo], n: int = 3, step: float = 0.5) -> list[tuple[float, float]]:
    """``n`` windows picked greedily on the training videos: each time the window matching (IoU >= 0.5) the
    most training events no earlier pick matched (ties: the larger summed IoU over them, then the
    earliest); windows clipped to each video."""
    events = [(v, seg) for v in train_videos for seg in v.segments]
    if not events:
        raise ValueError("best_constant_spans: no training event")
    gt = np.array([seg for _, seg in events], dtype=np.float64)
    dur = np.array([v.duration if v.duration is not None else max(e for _, e in v.segments) for v, _ in events])
    windows = _grid(float(dur.max()), step)
    ious = _iou_matrix(windows, gt, dur)
    hit = ious >= 0.5
    free = np.ones(len(events), dtype=bool)
    picks: list[tuple[float, float]] = []
    for _ in range(n):
        gain = (hit & free[None, :]).sum(axis=1)
        quality = np.where(hit & free[None, :], ious, 0.0).sum(axis=1)
        k = int(np.lexsort((windows[:, 1], windows[:, 0], -quality, -gain))[0])
        picks.append((float(windows[k, 0]), float(windows[k, 1])))
        free &= ~hit[k]
    return picks


def constant_dense_predictions(
    videos: Sequence[DenseVideo], spans: Sequence[tuple[float, float]], caption: str
) -> dict:
    """Every video: the first ``len(its ground-truth events)`` of ``spans`` (clipped to it), each with
    ``caption``, in time order."""
    out = {}
    for v in videos:
        duration = v.duration if v.duration is not None else max(e for _, e in v.segments)
        chosen = [
            (min(s, duration), max(min(e, duration), min(s, duration) + 0.1)) for s, e in spans[: len(v.segments)]
        ]
        out[v.vid] = [{"timestamp": [s, e], "caption": caption} for s, e in sorted(chosen)]
    return out


def most_common_caption(train_videos: Sequence[DenseVideo]) -> str:
    """The most frequent training caption (ties: the smallest)."""
    return _most_common([c for v in train_videos for c in v.captions])[0]
