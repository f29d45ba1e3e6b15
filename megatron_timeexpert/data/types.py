"""The one internal sample type every annotation reader produces, and the VTG task names."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Task(str, Enum):
    """The video temporal grounding tasks."""

    MOMENT_RETRIEVAL = "moment_retrieval"
    """Find the time span(s) a text query describes."""
    HIGHLIGHT_DETECTION = "highlight_detection"
    """Score how well each (2-second) clip matches a query."""
    DENSE_CAPTIONING = "dense_captioning"
    """Find all events of a video and caption each."""


@dataclass(frozen=True)
class Event:
    """A target event: a time span with an optional saliency score and caption."""

    start: float
    """Start, seconds from the video start."""
    end: float
    """End, seconds (>= start)."""
    saliency: float | None = None
    """Highlight score of the span (e.g. mean of QVHighlights' 3 annotators, 0..4), if any."""
    caption: str | None = None
    """What happens in the span (dense captioning), if any."""


@dataclass(frozen=True)
class VTGSample:
    """One training example, as read from an annotation file (no pixels yet)."""

    sample_id: str
    """Unique id within its data set (e.g. ``qvhighlights:17:mr``)."""
    video: str
    """Path of the video file."""
    duration: float | None
    """Video duration in seconds from the annotation; None where the format has none (Charades-STA)."""
    task: Task
    """Which VTG task this sample trains."""
    query: str
    """The text query (moment retrieval, highlights) or instruction (dense captioning, instruction data)."""
    events: tuple[Event, ...]
    """The target events, sorted by start."""
    source: str
    """``file:line`` (or ``file:key``) of the annotation it came from, for error messages."""
    dataset: str = ""
    """Reader that produced it (``charades_sta``, ``qvhighlights``, ``youcook2``, ``activitynet``, ``instruction``)."""
    answer: str | None = None
    """Target text of instruction-format samples (the assistant turn), if any."""
