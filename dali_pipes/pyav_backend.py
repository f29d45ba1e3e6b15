"""The CPU fallback decoder: PyAV (FFmpeg's libavcodec), for every codec, H.264 included.

Decodes the frames of one video in presentation order and keeps the requested ones, each with the
presentation time the decoder reports for it.
"""

from __future__ import annotations

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


def decode_frames(info: VideoInfo, indices: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[len(indices), H, W, 3]`` RGB frames and their presentation times (seconds).

    ``indices`` index ``info.pts`` (presentation order) and may repeat or come unsorted.
    """
    import av

    wanted = np.unique(indices)
    last = int(wanted[-1])
    got: dict[int, tuple[np.ndarray, float]] = {}
    i = 0
    try:
        with av.open(info.path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = threads
            start = stream.start_time or 0
            want = set(wanted.tolist())
            for frame in container.decode(stream):
                if i in want:
                    t = float((frame.pts - start) * stream.time_base) if frame.pts is not None else float(info.pts[i])
                    got[i] = (frame.to_ndarray(format="rgb24"), t)
                i += 1
                if i > last:
                    break
    except av.error.FFmpegError as exc:
        raise errors.VideoError(info.path, errors.TRUNCATED, f"decode error at frame {i}: {exc}") from None
    if i <= last:
        raise errors.VideoError(info.path, errors.TRUNCATED, f"decoded {i} frames, needed frame {last}")
    frames = np.stack([got[int(k)][0] for k in indices])
    times = np.asarray([got[int(k)][1] for k in indices], dtype=np.float64)
    return frames, times
