"""Bad-input accounting and the skip-vs-fail policy shared by the readers, the data set and the loader.

Every bad input goes through :meth:`BadInputs.report`: under ``policy="skip"`` it is counted (with
the file, the line or key, and the reason) and the caller drops it; under ``policy="fail"`` it
raises :class:`DataError` naming the file, line and field. :meth:`BadInputs.summary` returns flat
counters for the trainer's metrics.

Counters count inputs, not visits: a bad video met again in the next epoch (or by another sample of
the same line) is not counted again under ``bad/<reason>``; ``skipped`` counts every time a sample
was dropped (visits). ``read`` counts samples the annotation readers accepted, ``good`` the distinct
samples that decoded.
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
#: Decoding one sample passed the loader's deadline (the file is named; the worker was replaced).
DECODE_TIMEOUT = "decode_timeout"
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
    """Counts of bad inputs by reason (each input once), plus the first ``keep`` of them in full. Thread-safe."""

    def __init__(self, policy: str = "skip", keep: int = 200) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: {policy!r} is not one of {POLICIES}")
        self.policy = policy
        self.keep = keep
        self.counts: Counter[str] = Counter()
        """Distinct bad inputs (reason, file, line or key) by reason."""
        self.notes: Counter[str] = Counter()
        """Distinct repaired inputs by reason."""
        self.examples: list[BadInput] = []
        self.skipped = 0
        """Every skip, revisits included."""
        self.read = 0
        """Samples the annotation readers accepted."""
        self._seen: set[tuple[str, str, str]] = set()
        self._noted: set[tuple[str, str, str]] = set()
        self._good: set[str] = set()
        self._lock = threading.Lock()

    def report(self, reason: str, file: str, where: str | int = "", detail: str = "") -> None:
        """Record a bad input (skip policy) or raise :class:`DataError` (fail policy)."""
        bad = BadInput(reason, str(file), str(where), detail)
        if self.policy == "fail":
            raise DataError(str(bad))
        key = (reason, bad.file, bad.where)
        with self._lock:
            self.skipped += 1
            new = key not in self._seen
            if new:
                self._seen.add(key)
                first = self.counts[reason] == 0
                self.counts[reason] += 1
                if len(self.examples) < self.keep:
                    self.examples.append(bad)
        if new:
            (log.warning if first else log.debug)("skipped bad input: %s", bad)

    def note(self, reason: str, file: str, where: str | int = "", detail: str = "") -> None:
        """Count a repaired (not skipped) input, e.g. a clamped end time; never raises."""
        key = (reason, str(file), str(where))
        with self._lock:
            if key in self._noted:
                return
            self._noted.add(key)
            self.notes[reason] += 1
        log.debug("repaired input: %s", BadInput(reason, str(file), str(where), detail))

    def add_read(self, n: int = 1) -> None:
        """Count samples an annotation reader accepted."""
        with self._lock:
            self.read += n

    def add_good(self, sample_id: str) -> None:
        """Count a sample that decoded (each sample once, however often it is visited)."""
        with self._lock:
            self._good.add(sample_id)

    @property
    def good(self) -> int:
        """Distinct samples that decoded."""
        return len(self._good)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, int]:
        """Flat metrics: ``read``, ``good``, ``skipped``, ``bad/total``, ``bad/<reason>`` and ``repaired/<reason>``."""
        with self._lock:
            out = {"read": self.read, "good": len(self._good), "skipped": self.skipped}
            out["bad/total"] = sum(self.counts.values())
            out.update({f"bad/{k}": v for k, v in sorted(self.counts.items())})
            out.update({f"repaired/{k}": v for k, v in sorted(self.notes.items())})
        return out

    def by_reason(self, reason: str) -> list[BadInput]:
        """The recorded examples with this reason."""
        return [b for b in self.examples if b.reason == reason]
