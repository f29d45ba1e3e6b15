"""Open a video, check it is usable, and list the presentation times of the frames it shows.

:func:`probe` demuxes the video stream once (packets only; pixels are decoded only until the first
frame comes out) and returns a :class:`VideoInfo`: codec, size, display rotation, the sorted
presentation times of every *shown* frame and the duration. Every problem becomes a
:class:`~dali_pipes.errors.VideoError` with a reason code, so callers can count bad files by reason.

The time convention (one for every backend; see docs/DATA.md): a frame's time is its presentation
time in seconds **from the first shown frame**, which is therefore at 0. "Shown" means what a player
shows: packets an MP4 edit list discards (the pre-roll of an ``ffmpeg -ss ... -c copy`` cut) are not
frames of the video, a Matroska/WebM start offset is not a gap before the first frame, and frames
before the first decodable keyframe (a file cut mid-GOP) are never shown. The first shown frame is
found by decoding: its presentation time is the time origin (``VideoInfo.start_pts``), and every
backend subtracts it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
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
    """What one video file holds, from its container (no pixels decoded beyond the first frame)."""

    path: str
    """The file."""
    codec: str
    """FFmpeg codec name of the video stream (``h264``, ``vp9``, ``av1``, ...), not the decoder's name."""
    width: int
    """Stored frame width in pixels (before the display rotation)."""
    height: int
    """Stored frame height in pixels (before the display rotation)."""
    pts: np.ndarray
    """Presentation time (seconds from the first shown frame) of every shown frame, sorted: index i is frame i."""
    duration: float
    """Seconds covered by the frames: last presentation time plus one frame interval."""
    header_duration: float | None
    """Duration the container header claims, from the first shown frame (None if it states none)."""
    start_pts: int = 0
    """Presentation time of the first shown frame, in ``time_base`` units of the stream (the time origin)."""
    time_base: Fraction = Fraction(1, 1)
    """Time base of the stream's timestamps."""
    rotation: int = 0
    """Display rotation, degrees anticlockwise (0, 90, 180, 270), from the container's display matrix."""
    container: str = ""
    """FFmpeg demuxer name (``mov,mp4,m4a,3gp,3g2,mj2``, ``matroska,webm``, ``avi``, ...)."""
    edit_list: bool = False
    """True when the container discards packets (an MP4 edit list): decoded frames that are never shown."""

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    @property
    def start_time(self) -> float:
        """Stream time (seconds) of the first shown frame: non-zero with start offsets and mid-GOP starts."""
        return float(self.start_pts * self.time_base)

    @property
    def display_width(self) -> int:
        """Width of the frames as shown (after the display rotation)."""
        return self.height if self.rotation in (90, 270) else self.width

    @property
    def display_height(self) -> int:
        """Height of the frames as shown (after the display rotation)."""
        return self.width if self.rotation in (90, 270) else self.height


def check_file(path: str | Path) -> None:
    """Raise ``missing_file`` / ``empty_file`` before any decoder library sees the path."""
    if not os.path.exists(path):
        raise errors.VideoError(path, errors.MISSING)
    if os.path.getsize(path) == 0:
        raise errors.VideoError(path, errors.EMPTY)


def quarter_turns(rotation: float | None) -> int:
    """A display rotation in degrees (any sign) as a multiple of 90 in ``0, 90, 180, 270``."""
    return int(round((rotation or 0) / 90.0)) % 4 * 90


def codec_name(stream) -> str:
    """The codec's FFmpeg name (``av1``), not the decoder's (``libdav1d``)."""
    codec = stream.codec_context.codec
    return getattr(codec, "canonical_name", None) or codec.name


def probe(path: str | Path, supported_codecs: frozenset[str] = SUPPORTED_CODECS) -> VideoInfo:
    """Demux ``path`` and describe the frames it shows; raise :class:`VideoError` if it is unusable."""
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
        codec = codec_name(stream)
        if codec not in supported_codecs:
            raise errors.VideoError(
                path, errors.UNSUPPORTED_CODEC, f"codec {codec!r}, accepted: {sorted(supported_codecs)}"
            )
        tb = stream.time_base
        raw: list[int] = []
        missing_pts = discarded = False
        first: tuple[int | None, int] | None = None  # (pts, rotation) of the first frame the decoder shows
        try:
            for packet in container.demux(stream):
                if first is None:
                    first = _first_frame(packet)  # the empty packet at the end flushes the decoder
                if packet.size == 0:
                    continue
                if packet.is_discard:
                    discarded = True  # pre-roll an edit list cuts away: decoded, never shown
                elif packet.pts is None:
                    missing_pts = True
                else:
                    raw.append(packet.pts)
        except av.error.FFmpegError as exc:
            if not raw:
                raise errors.VideoError(path, errors.CORRUPT, f"no packet readable: {exc}") from None
            raise errors.VideoError(path, errors.TRUNCATED, f"read error after {len(raw)} packets: {exc}") from None
        header_end = _header_end(container, stream)
        rate = stream.average_rate or stream.guessed_rate
        width, height = stream.codec_context.width, stream.codec_context.height
        fmt = container.format.name
    first_pts, rotation = first if first is not None else (None, 0)
    by_decoding = missing_pts or not raw or (first is not None and first_pts is None)
    if by_decoding:
        pts, start_pts = _decoded_pts(path)  # packets without times (some AVI/raw streams): the decoder's own
    else:
        # Without a decodable frame the coverage check below still tells a truncated file from a corrupt one.
        start_pts = first_pts if first_pts is not None else int(min(raw))
        # Frames before the first shown one (a mid-GOP start) are never shown.
        shown = np.sort(np.asarray(raw, dtype=np.int64))
        pts = (shown[shown >= start_pts] - start_pts) * float(tb)
    if len(pts) == 0:
        raise errors.VideoError(path, errors.NO_FRAMES)
    frame_dt = float(1 / rate) if rate else (float(np.median(np.diff(pts))) if len(pts) > 1 else 0.0)
    duration = float(pts[-1] + frame_dt)
    start_s = float(start_pts * tb)
    header = None if header_end is None else header_end - start_s
    if header is not None and duration < header - max(TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRAC * header):
        raise errors.VideoError(
            path, errors.TRUNCATED, f"frames cover {duration:.2f}s of the {header:.2f}s in the header"
        )
    if first is None and not by_decoding:
        raise errors.VideoError(path, errors.CORRUPT, f"none of its {len(raw)} packets decodes to a frame")
    return VideoInfo(
        path, codec, width, height, pts, duration, header, start_pts, Fraction(tb), rotation, fmt, discarded
    )


def _first_frame(packet) -> tuple[int | None, int] | None:
    """Feed one packet to the stream's decoder; (pts, display rotation) of the first frame out, if any."""
    import av

    try:
        for frame in packet.decode():
            return frame.pts, quarter_turns(getattr(frame, "rotation", 0))
    except av.error.FFmpegError:
        return None  # a damaged packet: the next ones may decode (the decoders say so later if not)
    return None


def _header_end(container, stream) -> float | None:
    """Stream time (seconds) at which the header says the video ends, or None.

    A stream duration counts from the stream's start time; a container duration (Matroska/WebM
    segment duration) is the end timestamp itself. Compared with the end of the shown frames in the
    same stream time, a start offset can never look like a truncation.
    """
    tb = stream.time_base
    if stream.duration:
        return float(((stream.start_time or 0) + stream.duration) * tb)
    if container.duration:
        return container.duration / 1_000_000
    return None


def _has_container_signature(path: str) -> bool:
    """True if the file begins like an MP4/MOV (``ftyp`` box) or Matroska/WebM (EBML magic)."""
    with open(path, "rb") as f:
        head = f.read(12)
    return head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3"


def _decoded_pts(path: str) -> tuple[np.ndarray, int]:
    """Presentation times (from the first shown frame) by decoding every frame, and the first frame's
    pts: the slow path for streams whose packets carry no times."""
    import av

    raw: list[int] = []
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                if frame.pts is not None:
                    raw.append(frame.pts)
            tb = float(stream.time_base)
    except av.error.FFmpegError as exc:
        if not raw:
            raise errors.VideoError(path, errors.CORRUPT, f"no frame decodable: {exc}") from None
        raise errors.VideoError(path, errors.TRUNCATED, f"decode error after {len(raw)} frames: {exc}") from None
    if not raw:
        return np.zeros(0), 0
    return (np.asarray(raw, dtype=np.int64) - raw[0]) * tb, raw[0]
