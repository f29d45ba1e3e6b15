"""Which frames of a video to return: uniformly over it, at a given fps, or at given timestamps.

Selection works on the decoder's presentation times (``pts`` in seconds, sorted), never on guesses
from a frame index, so the timestamp returned with every frame is the time that frame is shown.
For each target time the frame with the nearest presentation time is chosen (ties go to the
earlier frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MODES = ("uniform", "fps", "timestamps")


@dataclass
class SamplingConfig:
    """How frames are picked from each video."""

    mode: str = "uniform"
    """``uniform`` (``num_frames`` frames at the centres of equal segments), ``fps`` (one frame every
    ``1/fps`` seconds from 0) or ``timestamps`` (the nearest frame to each time passed per call)."""
    num_frames: int = 8
    """Frames per sample in ``uniform`` mode; the cap on frames in ``fps`` mode (0 = no cap)."""
    fps: float = 1.0
    """Sampling rate for ``fps`` mode, in frames per second."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"SamplingConfig.mode: {self.mode!r} is not one of {MODES}")
        if self.mode == "uniform" and self.num_frames < 1:
            raise ValueError(f"SamplingConfig.num_frames: must be >= 1 in uniform mode, got {self.num_frames}")
        if self.mode == "fps" and not self.fps > 0:
            raise ValueError(f"SamplingConfig.fps: must be > 0, got {self.fps}")


def target_times(cfg: SamplingConfig, duration: float, timestamps: Sequence[float] | None = None) -> np.ndarray:
    """The times (seconds) at which frames are wanted, before snapping to real frames."""
    if cfg.mode == "timestamps":
        if timestamps is None or len(timestamps) == 0:
            raise ValueError("SamplingConfig.mode='timestamps' needs a non-empty list of timestamps per call")
        return np.asarray(timestamps, dtype=np.float64)
    if cfg.mode == "uniform":
        n = cfg.num_frames
        return (np.arange(n, dtype=np.float64) + 0.5) * (duration / n)
    times = np.arange(0.0, duration, 1.0 / cfg.fps, dtype=np.float64)
    if cfg.num_frames and len(times) > cfg.num_frames:
        keep = np.linspace(0, len(times) - 1, cfg.num_frames).round().astype(np.int64)
        times = times[keep]
    return times if len(times) else np.zeros(1)


def nearest_frames(pts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Index into sorted ``pts`` of the frame nearest to each of ``times`` (earlier frame on a tie)."""
    if len(pts) == 0:
        raise ValueError("nearest_frames: the video has no frames")
    right = np.searchsorted(pts, times, side="left").clip(0, len(pts) - 1)
    left = (right - 1).clip(0, len(pts) - 1)
    pick_left = np.abs(times - pts[left]) <= np.abs(pts[right] - times)
    return np.where(pick_left, left, right).astype(np.int64)


def select_frames(
    cfg: SamplingConfig, pts: np.ndarray, duration: float, timestamps: Sequence[float] | None = None
) -> np.ndarray:
    """Indices (into presentation order) of the frames to return for one video."""
    return nearest_frames(np.asarray(pts, dtype=np.float64), target_times(cfg, duration, timestamps))
