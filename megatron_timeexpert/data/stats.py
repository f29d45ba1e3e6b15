"""Bad-input accounting and the skip-vs-fail policy shared by the readers, the data set and the loader.

Every bad input goes through :meth:`BadInputs.report`: under ``policy="skip"`` it is counted (with
the file, the line or key, and the reason) and the caller drops it; under ``policy="fail"`` it
raises :class:`DataError` naming the file, line and field. :meth:`BadInputs.summary` returns flat
counters for the trainer's metrics.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)

POLICIES = ("skip", "fail")

# Reasons found in annotation files (video-file reasons come from dali_pipes.errors).
MALFORMED_JSON = "malformed_json"
MALFORMED_LINE = "malformed_line"
MISSING_FIELD = "missing_field"
NON_UTF8 = "non_utf8"
NAN_TIME = "nan_time"
START_AFTER_END = "start_after_end"
TIME_BEYOND_DURATION = "time_beyond_duration"
UNKNOWN_VIDEO = "unknown_video"
VIDEO_SHORTER = "video_shorter_than_annotation"
#: A decoder failed in a way no other reason covers (the exception type and text are in the detail).
DECODE_ERROR = "decode_error"
#: Not a skip: an end time a little (<= tolerance) beyond the duration, clamped to it.
CLAMPED_TIME = "clamped_time"


class DataError(ValueError):
    """Bad data the user must fix (or any bad input under ``policy='fail'``); names file, line and field."""


@dataclass(frozen=True)
class BadInput:
    """One recorded bad input."""

    reason: str
    file: str
    where: str
    detail: str

    def __str__(self) -> str:
        loc = f"{self.file}:{self.where}" if self.where else self.file
        return f"{loc}: {self.reason}" + (f": {self.detail}" if self.detail else "")


class BadInputs:
    """Counts of skipped inputs by reason, plus the first ``keep`` of them in full. Thread-safe."""

    def __init__(self, policy: str = "skip", keep: int = 200) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: {policy!r} is not one of {POLICIES}")
        self.policy = policy
        self.keep = keep
        self.counts: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()
        self.examples: list[BadInput] = []
        self.good = 0
        self._lock = threading.Lock()

    def report(self, reason: str, file: str, where: str | int = "", detail: str = "") -> None:
        """Record a bad input (skip policy) or raise :class:`DataError` (fail policy)."""
        bad = BadInput(reason, str(file), str(where), detail)
        if self.policy == "fail":
            raise DataError(str(bad))
        with self._lock:
            first = self.counts[reason] == 0
            self.counts[reason] += 1
            if len(self.examples) < self.keep:
                self.examples.append(bad)
        (log.warning if first else log.debug)("skipped bad input: %s", bad)

    def note(self, reason: str, file: str, where: str | int = "", detail: str = "") -> None:
        """Count a repaired (not skipped) input, e.g. a clamped end time; never raises."""
        with self._lock:
            self.notes[reason] += 1
        log.debug("repaired input: %s", BadInput(reason, str(file), str(where), detail))

    def add_good(self, n: int = 1) -> None:
        with self._lock:
            self.good += n

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, int]:
        """Flat metrics: ``good``, ``bad/total``, ``bad/<reason>`` and ``repaired/<reason>``."""
        with self._lock:
            out = {"good": self.good, "bad/total": sum(self.counts.values())}
            out.update({f"bad/{k}": v for k, v in sorted(self.counts.items())})
            out.update({f"repaired/{k}": v for k, v in sorted(self.notes.items())})
        return out

    def by_reason(self, reason: str) -> list[BadInput]:
        """The recorded examples with this reason."""
        return [b for b in self.examples if b.reason == reason]
