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
Pure functions of their inputs; no torch.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence

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
    (start, end) = _most_common([(float(s), float(e)) for s, e in train_windows])[0]
    out = []
    for q in queries:
        duration = q.duration if q.duration is not None else durations[q.vid]
        s, e = min(start, duration), min(end, duration)
        clips = int(math.ceil(duration / 2))
        window = [s, max(e, s + 0.1), 1.0]
        out.append(
            {
                "qid": q.qid,
                "vid": q.vid,
                "query": q.query,
                "pred_windows": [window],
                "pred_relevant_windows": [window],
                "pred_saliency_scores": [float(2 * c < e and 2 * c + 2 > s) for c in range(clips)],
            }
        )
    return out


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
