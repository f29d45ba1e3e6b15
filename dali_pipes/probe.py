"""Open a video, check it is usable, and list its frames' presentation times without decoding.

:func:`probe` demuxes the video stream once (packets only, no pixel decoding), which is cheap, and
returns a :class:`VideoInfo`: codec, size, the sorted presentation times of every frame (seconds
from the stream start) and the duration. Every problem becomes a :class:`~dali_pipes.errors.VideoError`
with a reason code, so callers can count bad files by reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dali_pipes import errors

#: Codecs (FFmpeg names) the decoders here accept; anything else is ``unsupported_codec``.
SUPPORTED_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mjpeg", "mpeg4"})
#: A stream whose frames end this much (seconds, and this fraction) before its header's duration is truncated.
TRUNCATION_SLACK_S = 0.5
TRUNCATION_SLACK_FRAC = 0.1


@dataclass(frozen=True)
class VideoInfo:
    """What one video file holds, from its container (no pixels decoded)."""

    path: str
    """The file."""
    codec: str
    """FFmpeg codec name of the video stream (``h264``, ``vp9``, ...)."""
    width: int
    """Frame width in pixels."""
    height: int
    """Frame height in pixels."""
    pts: np.ndarray
    """Presentation time (seconds from the stream's start) of every frame, sorted: index i is frame i."""
    duration: float
    """Seconds covered by the frames: last presentation time plus one frame interval."""
    header_duration: float | None
    """Duration the container header claims (None if it states none)."""

    @property
    def num_frames(self) -> int:
        return len(self.pts)


def check_file(path: str | Path) -> None:
    """Raise ``missing_file`` / ``empty_file`` before any decoder library sees the path."""
    if not os.path.exists(path):
        raise errors.VideoError(path, errors.MISSING)
    if os.path.getsize(path) == 0:
        raise errors.VideoError(path, errors.EMPTY)


def probe(path: str | Path, supported_codecs: frozenset[str] = SUPPORTED_CODECS) -> VideoInfo:
    """Demux ``path`` and describe its video stream; raise :class:`VideoError` if it is unusable."""
    import av

    path = str(path)
    check_file(path)
    try:
        container = av.open(path)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        if _has_container_signature(path):
            # A valid start but no usable index: an MP4 cut before its moov box, a Matroska cut in its header.
            raise errors.VideoError(
                path, errors.TRUNCATED, f"container starts fine but cannot be opened: {exc}"
            ) from None
        raise errors.VideoError(path, errors.CORRUPT, f"cannot open container: {exc}") from None
    with container:
        if not container.streams.video:
            raise errors.VideoError(path, errors.NO_VIDEO, f"streams: {[s.type for s in container.streams]}")
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        if codec not in supported_codecs:
            raise errors.VideoError(
                path, errors.UNSUPPORTED_CODEC, f"codec {codec!r}, accepted: {sorted(supported_codecs)}"
            )
        tb = stream.time_base
        start = stream.start_time or 0
        raw: list[int] = []
        missing_pts = False
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue  # the flush packet at the end
                if packet.pts is None:
                    missing_pts = True
                else:
                    raw.append(packet.pts)
        except av.error.FFmpegError as exc:
            if not raw:
                raise errors.VideoError(path, errors.CORRUPT, f"no packet readable: {exc}") from None
            raise errors.VideoError(path, errors.TRUNCATED, f"read error after {len(raw)} packets: {exc}") from None
        header = None
        if stream.duration:
            header = float(stream.duration * tb)
        elif container.duration:
            header = container.duration / 1_000_000
        rate = stream.average_rate or stream.guessed_rate
        width, height = stream.codec_context.width, stream.codec_context.height
    if missing_pts or not raw:
        pts = _decoded_pts(path)  # packets without times (some AVI/raw streams): the decoder's own times
    else:
        pts = (np.sort(np.asarray(raw, dtype=np.int64)) - start) * float(tb)
    if len(pts) == 0:
        raise errors.VideoError(path, errors.NO_FRAMES)
    frame_dt = float(1 / rate) if rate else (float(np.median(np.diff(pts))) if len(pts) > 1 else 0.0)
    duration = float(pts[-1] + frame_dt)
    if header is not None and duration < header - max(TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRAC * header):
        raise errors.VideoError(
            path, errors.TRUNCATED, f"frames cover {duration:.2f}s of the {header:.2f}s in the header"
        )
    return VideoInfo(path, codec, width, height, pts, duration, header)


def _has_container_signature(path: str) -> bool:
    """True if the file begins like an MP4/MOV (``ftyp`` box) or Matroska/WebM (EBML magic)."""
    with open(path, "rb") as f:
        head = f.read(12)
    return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3"


def _decoded_pts(path: str) -> np.ndarray:
    """Presentation times by decoding every frame: the slow path for streams whose packets carry none."""
    import av

    times: list[float] = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.time is not None:
                    times.append(frame.time)
    except av.error.FFmpegError as exc:
        if not times:
            raise errors.VideoError(path, errors.CORRUPT, f"no frame decodable: {exc}") from None
        raise errors.VideoError(path, errors.TRUNCATED, f"decode error after {len(times)} frames: {exc}") from None
    return np.asarray(times, dtype=np.float64) - (times[0] if times else 0.0)
