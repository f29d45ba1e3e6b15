"""Why a video could not be used: one exception type carrying the file and a short reason code.

Every decoder backend raises :class:`VideoError` (never a backend-specific exception) so the data
set above can count bad videos by reason and keep going, or stop, as its policy says.
"""

from __future__ import annotations

from pathlib import Path

#: The file does not exist.
MISSING = "missing_file"
#: The file exists but has zero bytes.
EMPTY = "empty_file"
#: The container cannot be opened or parsed (garbage bytes), or the decoder rejects a packet mid-stream.
CORRUPT = "corrupt_file"
#: The container opens but its stream ends early: fewer frames than its header promises, or a read error mid-way.
TRUNCATED = "truncated_file"
#: The container holds no video stream at all (audio only, data only).
NO_VIDEO = "no_video_stream"
#: The video codec is not one this project decodes (see ``SUPPORTED_CODECS``).
UNSUPPORTED_CODEC = "unsupported_codec"
#: Decoding produced no frame at all.
NO_FRAMES = "no_frames"
#: Decoding one sample took longer than its deadline (a hang, or a pathological file).
TIMEOUT = "decode_timeout"

REASONS = (MISSING, EMPTY, CORRUPT, TRUNCATED, NO_VIDEO, UNSUPPORTED_CODEC, NO_FRAMES, TIMEOUT)


class VideoError(Exception):
    """A video file that cannot be decoded; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.path}: {reason}" + (f" ({detail})" if detail else ""))
