"""Generated events -> the prediction records the public evaluators read (eval/io.py writers).

Pure functions of parsed events (data/events.py :class:`~megatron_timeexpert.data.events.Event`):

- moment retrieval (Charades-STA, QVHighlights windows): one window per event, ``[start, end,
  score]`` with start/end = the event's first and second time (sorted; an event with one time gives
  ``[t, t]``) and score = its first score (1.0 when it has none), ranked by score (highest first),
  ties in generation order;
- highlight detection (QVHighlights saliency): one score per 2 s clip ``i`` (``[2i, 2i + 2]``) of
  the video from the events' ``(time, score)`` pairs, a time belonging to clip ``floor(t / 2)``
  (the training targets put clip CENTRES ``2i + 1``, docs/EVENTS.md); a clip with several pairs
  takes their maximum, a clip without any gets 0.0;
- dense captioning: ``{"timestamp": [start, end], "caption"}`` per event, in generation order.

A malformed generation is written as an empty prediction (no window, all-zero saliency, no event)
by the caller; these functions only see well-formed events.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from megatron_timeexpert.data.events import Event

CLIP_LENGTH = 2.0
"""QVHighlights clip length in seconds."""


def event_window(ev: Event) -> tuple[float, float]:
    """``(start, end)`` of an event: its first two times, sorted (one time: ``(t, t)``)."""
    a = ev.times[0]
    b = ev.times[1] if len(ev.times) > 1 else a
    return (min(a, b), max(a, b))


def moment_windows(events: Sequence[Event], default_score: float = 1.0) -> list[list[float]]:
    """``[[start, end, score], ...]`` ranked by score (highest first), ties in generation order."""
    rows = []
    for k, ev in enumerate(events):
        s, e = event_window(ev)
        score = ev.scores[0] if ev.scores else default_score
        rows.append((-score, k, [s, e, score]))
    return [r[2] for r in sorted(rows, key=lambda r: (r[0], r[1]))]


def num_clips(duration: float, clip_length: float = CLIP_LENGTH) -> int:
    """Clips of ``clip_length`` seconds covering a video of ``duration`` seconds (the last may be cut)."""
    if not math.isfinite(duration) or duration <= 0:
        return 0
    return max(1, math.ceil(duration / clip_length - 1e-9))


def saliency_per_clip(events: Sequence[Event], duration: float, clip_length: float = CLIP_LENGTH) -> list[float]:
    """One saliency score per clip of the video (see the module docstring); pairs beyond the video are ignored."""
    out = [0.0] * num_clips(duration, clip_length)
    seen = [False] * len(out)
    for ev in events:
        for t, s in zip(ev.times, ev.scores):
            i = int(math.floor(t / clip_length))
            if 0 <= i < len(out):
                out[i] = s if not seen[i] else max(out[i], s)
                seen[i] = True
    return out


def dense_events(events: Sequence[Event]) -> list[dict]:
    """``[{"timestamp": [start, end], "caption": str}, ...]`` in generation order."""
    return [{"timestamp": list(event_window(ev)), "caption": ev.caption} for ev in events]
