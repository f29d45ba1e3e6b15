"""The CPU fallback decoder: PyAV (FFmpeg's libavcodec), for every codec, H.264 included.

Decodes the requested frames of one video, each with its presentation time measured from the first
shown frame (``VideoInfo.start_pts``, see :mod:`dali_pipes.probe`). Frames are identified by that
time (matched to ``VideoInfo.pts``), not by counting, so seeking is safe: when the next wanted frame
lies more than ``seek_threshold_s`` ahead of the decoder's position, the decoder seeks to the
keyframe before it instead of decoding everything in between (long videos, few frames).

Every loop here is bounded: a seek that lands after its target (no usable index) restarts the file
from the beginning at most once, a frame that never comes is reported as missing, and an optional
``deadline`` (``time.monotonic()`` value) ends a decode that takes too long with ``decode_timeout``.
"""

from __future__ import annotations

import time

import numpy as np

from dali_pipes import errors
from dali_pipes.probe import VideoInfo

NAME = "pyav"


def available() -> bool:
    """True when PyAV imports."""
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def _restart(container, stream, seek_to: int | None):
    """A fresh frame iterator, after seeking to the keyframe at or before ``seek_to`` (None: the start)."""
    if seek_to is None:
        container.seek(0, stream=stream, backward=True)
    else:
        container.seek(seek_to, stream=stream, backward=True, any_frame=False)
    return iter(container.decode(stream))


def decode_frames(
    info: VideoInfo,
    indices: np.ndarray,
    threads: int = 1,
    seek_threshold_s: float = 2.0,
    deadline: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[len(indices), H, W, 3]`` RGB frames (stored orientation) and their times (seconds).

    ``indices`` index ``info.pts`` (presentation order) and may repeat or come unsorted.
    """
    import av

    wanted = [int(k) for k in np.unique(indices)]
    wanted_set = set(wanted)
    got: dict[int, tuple[np.ndarray, float]] = {}
    pts = info.pts
    tol = 0.5 * float(np.min(np.diff(pts))) if len(pts) > 1 else 1e-3
    start, tb = info.start_pts, info.time_base
    position = -np.inf  # time of the last decoded frame
    try:
        with av.open(info.path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            frames = iter(container.decode(stream))
            may_seek, restarted = True, False
            for target in wanted:
                if target in got:
                    continue
                t_target = float(pts[target])
                if may_seek and t_target - position > seek_threshold_s and t_target > seek_threshold_s:
                    frames = _restart(container, stream, int(round(t_target / float(tb))) + start)
                    position = -np.inf
                while True:
                    if deadline is not None and time.monotonic() > deadline:
                        raise errors.VideoError(
                            info.path, errors.TIMEOUT, f"deadline passed with {len(got)} of {len(wanted)} frames"
                        )
                    frame = next(frames, None)
                    if frame is None:
                        break  # end of the stream: whatever is still missing is reported below
                    t = float((frame.pts - start) * tb) if frame.pts is not None else position + tol
                    if position == -np.inf and t > t_target + tol:
                        if restarted:
                            break  # even from the start the target never comes: reported as missing
                        # The seek overshot (no usable index): decode this file from the start instead, once.
                        may_seek, restarted = False, True
                        frames = _restart(container, stream, None)
                        continue
                    position = t
                    k = int(np.clip(np.searchsorted(pts, t - tol), 0, len(pts) - 1))
                    if abs(pts[k] - t) <= tol and k in wanted_set and k not in got:
                        # Scaled to the stream's declared size: a resolution change mid-stream cannot break stacking.
                        rgb = frame.to_ndarray(format="rgb24", width=info.width, height=info.height)
                        got[k] = (rgb, t)
                    if t >= t_target - tol:
                        break
    except av.error.FFmpegError as exc:
        where = f"after {position:.2f}s" if np.isfinite(position) else "at the start or right after a seek"
        raise errors.VideoError(info.path, errors.CORRUPT, f"decode error {where}: {exc}") from None
    missing = [k for k in wanted if k not in got]
    if missing:
        raise errors.VideoError(
            info.path, errors.TRUNCATED, f"{len(missing)} frames never decoded (first at {pts[missing[0]]:.3f}s)"
        )
    frames_out = np.stack([got[int(k)][0] for k in indices])
    times = np.asarray([got[int(k)][1] for k in indices], dtype=np.float64)
    return frames_out, times
