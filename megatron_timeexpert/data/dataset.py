"""Turn annotation samples into frames: decode each sample's video, check it against its annotation.

:meth:`VTGDataset.get` returns a :class:`FrameSample` (frames, the presentation time of every
frame, task, text, target events) or None when the video is unusable: missing, zero-byte,
corrupt, truncated, of an unsupported codec, or shorter than its annotation says. Every None is
reported to :class:`~.stats.BadInputs` with the video, the annotation line and the reason (or
raises under the fail policy). Probe results are cached per video (bounded LRU), so a video shared
by many samples is demuxed once.

Formats without a duration (Charades-STA) are checked against the decoded video: an end past the
video's last frame is clamped to the video's duration and counted as ``repaired/clamped_time`` (the
official Charades-STA files have thousands of ends up to ~1.5 s past the video, and the standard
loaders clamp them); only an event that starts after the video ends is skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dali_pipes import VideoDecoder, VideoError, VideoInfo
from megatron_timeexpert.data import stats as S
from megatron_timeexpert.data.stats import BadInputs, DataError
from megatron_timeexpert.data.types import Event, Task, VTGSample

log = logging.getLogger(__name__)


@dataclass
class FrameSample:
    """What the model consumes for one sample: frames with their timestamps, task and text."""

    sample: VTGSample
    """The annotation sample (ids, source line, answer text)."""
    frames: torch.Tensor
    """``[N, 3, S, S]`` float frames (or uint8 ``[N, H, W, 3]`` when the decoder has no transform)."""
    timestamps: torch.Tensor
    """float64 ``[N]``: presentation time in seconds of each frame."""
    duration: float
    """Duration of the decoded video in seconds."""
    backend: str
    """Decoder backend that produced the frames."""

    @property
    def task(self) -> Task:
        return self.sample.task

    @property
    def text(self) -> str:
        return self.sample.query

    @property
    def events(self) -> tuple[Event, ...]:
        return self.sample.events


class VTGDataset:
    """Random access to decoded samples; bad videos are skipped-and-counted (None) or raise."""

    def __init__(
        self,
        samples: Sequence[VTGSample],
        decoder: VideoDecoder,
        bad: BadInputs,
        time_tolerance: float = 0.5,
        probe_cache_size: int = 4096,
    ) -> None:
        self.samples = list(samples)
        self.decoder = decoder
        self.bad = bad
        self.time_tolerance = time_tolerance
        self.probe_cache_size = probe_cache_size
        # Probe results by path, least recently used first (a VideoInfo holds every frame time, so bounded).
        self._probed: OrderedDict[str, VideoInfo | VideoError] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.samples)

    def _info(self, path: str) -> VideoInfo:
        with self._lock:
            cached = self._probed.get(path)
            if cached is not None:
                self._probed.move_to_end(path)
        if cached is None:
            try:
                cached = self.decoder.probe(path)
            except VideoError as exc:
                cached = exc
            with self._lock:
                self._probed[path] = cached
                while len(self._probed) > self.probe_cache_size:
                    self._probed.popitem(last=False)
        if isinstance(cached, VideoError):
            raise cached
        return cached

    def get(self, index: int, deadline: float | None = None) -> FrameSample | None:
        """Decode sample ``index``; None (reported) when its video is unusable.

        ``deadline`` (a ``time.monotonic()`` value) is passed to the decoder, which gives up with
        ``decode_timeout`` where it can (PyAV); the loader enforces it everywhere else.
        """
        sample = self.samples[index]
        try:
            info = self._info(sample.video)
            sample = self._check_times(sample, info.duration)
            if sample is None:
                return None
            clip = self.decoder.read(sample.video, info=info, deadline=deadline)
        except VideoError as exc:
            detail = "; ".join(x for x in (exc.detail, f"annotation {sample.source}") if x)
            self.bad.report(exc.reason, exc.path or sample.video, "", detail)
            return None
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - an unforeseen decoder failure on one file must not end the run
            log.warning("unexpected %s decoding %s", type(exc).__name__, sample.video, exc_info=True)
            self.bad.report(
                S.DECODE_ERROR, sample.video, "", f"{type(exc).__name__}: {exc}; annotation {sample.source}"
            )
            return None
        self.bad.add_good(sample.sample_id)
        return FrameSample(sample, clip.frames, clip.timestamps, clip.duration, clip.backend)

    def _check_times(self, sample: VTGSample, video_duration: float) -> VTGSample | None:
        """The sample if its times fit the video; with ends clamped where the format has no duration; else None."""
        if sample.duration is None:
            if any(ev.start > video_duration for ev in sample.events):
                late = max(ev.start for ev in sample.events)
                self.bad.report(
                    S.VIDEO_SHORTER, sample.video, "",
                    f"video lasts {video_duration:.2f}s, annotation {sample.source} starts an event at {late:.2f}s",
                )  # fmt: skip
                return None
            if any(ev.end > video_duration for ev in sample.events):
                events = tuple(dataclasses.replace(ev, end=min(ev.end, video_duration)) for ev in sample.events)
                self.bad.note(
                    S.CLAMPED_TIME, sample.source, "", f"event ends clamped to the video's {video_duration:.2f}s"
                )
                return dataclasses.replace(sample, events=events)
            return sample
        claimed = max([sample.duration] + [ev.end for ev in sample.events])
        if claimed > video_duration + self.time_tolerance:
            self.bad.report(
                S.VIDEO_SHORTER, sample.video, "",
                f"video lasts {video_duration:.2f}s, annotation {sample.source} needs {claimed:.2f}s",
            )  # fmt: skip
            return None
        return sample
