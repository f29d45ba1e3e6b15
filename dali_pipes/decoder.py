"""The one video-reading interface: pick a decoder backend at run time, sample frames, transform.

``VideoDecoder(DecoderConfig(...)).read(path)`` returns a :class:`DecodedClip` (frames plus the
presentation time of each) whatever backend did the work:

* ``dali-mixed`` - DALI with NVDEC, when CUDA and DALI are present (H.264, HEVC, VP9, AV1, ...);
* ``dali-cpu``   - DALI's CPU decoder, when DALI is present and the codec is VP8, VP9 or MJPEG;
* ``pyav``       - PyAV, the fallback for everything else (H.264 on CPU, no DALI installed).

The choice is made per codec the first time it is seen and logged once, e.g.
``decoder backend for h264: pyav (fallback: DALI CPU decoder cannot decode h264)``.
If a DALI decode fails on a file that probed fine, the file is retried with PyAV (logged as a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dali_pipes import dali_backend, errors, pyav_backend
from dali_pipes.probe import SUPPORTED_CODECS, VideoInfo, probe
from dali_pipes.sampling import SamplingConfig, select_frames
from dali_pipes.transform import TransformConfig, apply_transform

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali-mixed", "dali-cpu", "pyav")


@dataclass
class DecoderConfig:
    """Which backend decodes, which frames come back and how they are transformed."""

    backend: str = "auto"
    """``auto`` (best available per codec), or force ``dali-mixed``, ``dali-cpu`` or ``pyav``."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Which frames of each video are returned."""
    transform: TransformConfig | None = field(default_factory=TransformConfig)
    """Resize/crop/normalise for the vision encoder; None returns raw uint8 RGB frames ``[N,H,W,3]``."""
    device_id: int = 0
    """CUDA device for ``dali-mixed``."""
    threads: int = 1
    """Decoder threads per video (PyAV) or per pipeline (DALI)."""
    seek_threshold_s: float = 2.0
    """PyAV seeks (to the keyframe before) when the next wanted frame is further ahead than this."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"DecoderConfig.backend: {self.backend!r} is not one of {BACKENDS}")


@dataclass
class DecodedClip:
    """Frames of one video and the presentation time of every frame."""

    path: str
    """The video file."""
    frames: torch.Tensor
    """float32 ``[N, 3, S, S]`` after the transform, or uint8 ``[N, H, W, 3]`` without one."""
    timestamps: torch.Tensor
    """float64 ``[N]``: the presentation time (seconds from the video start) of each frame."""
    duration: float
    """Seconds covered by the video's frames."""
    backend: str
    """The backend that decoded it (``dali-mixed``, ``dali-cpu``, ``pyav``)."""
    codec: str
    """FFmpeg name of the video codec."""


class VideoDecoder:
    """Reads videos through the best backend available for each codec (see the module docstring)."""

    def __init__(self, cfg: DecoderConfig | None = None) -> None:
        self.cfg = cfg or DecoderConfig()
        self._dali_version = dali_backend.version()
        self._cuda = torch.cuda.is_available()
        self._dali: dict[str, dali_backend.DaliDecoder] = {}
        self._chosen: dict[str, str] = {}
        self._check_forced_backend()

    def _check_forced_backend(self) -> None:
        b = self.cfg.backend
        if b.startswith("dali") and self._dali_version is None:
            raise RuntimeError(
                f"DecoderConfig.backend={b!r} but NVIDIA DALI is not installed (pip install nvidia-dali-cuda120)"
            )
        if b == "dali-mixed" and not self._cuda:
            raise RuntimeError("DecoderConfig.backend='dali-mixed' needs a CUDA GPU; this machine has none")
        if b == "pyav" and not pyav_backend.available():
            raise RuntimeError("DecoderConfig.backend='pyav' but PyAV is not installed (pip install av)")

    def backend_for(self, codec: str, path: str = "") -> str:
        """The backend that decodes ``codec`` here; decided (and logged) once per codec."""
        if codec in self._chosen:
            return self._chosen[codec]
        b = self.cfg.backend
        if b == "auto":
            b, why = self._auto(codec)
        else:
            why = "forced by DecoderConfig.backend"
            if b.startswith("dali") and codec not in dali_backend.codecs_for(b[5:]):
                raise errors.VideoError(path, errors.UNSUPPORTED_CODEC, f"{b} cannot decode {codec}")
        log.info("decoder backend for %s: %s (%s)", codec, b, why)
        self._chosen[codec] = b
        return b

    def _auto(self, codec: str) -> tuple[str, str]:
        if self._dali_version is None:
            return "pyav", "fallback: NVIDIA DALI not installed"
        if self._cuda and codec in dali_backend.MIXED_CODECS:
            return "dali-mixed", f"DALI {self._dali_version} NVDEC on cuda:{self.cfg.device_id}"
        if codec in dali_backend.CPU_CODECS:
            why = "no CUDA" if not self._cuda else f"NVDEC path does not take {codec}"
            return "dali-cpu", f"DALI {self._dali_version} CPU decoder; {why}"
        return "pyav", f"fallback: DALI CPU decoder cannot decode {codec}" + ("" if self._cuda else " and no CUDA")

    def _dali_decoder(self, backend: str) -> dali_backend.DaliDecoder:
        if backend not in self._dali:
            device = backend[5:]
            self._dali[backend] = dali_backend.DaliDecoder(
                device, self.cfg.transform, self.cfg.device_id, num_threads=self.cfg.threads
            )
        return self._dali[backend]

    def probe(self, path: str) -> VideoInfo:
        """Container facts and frame times of ``path`` (raises :class:`~dali_pipes.errors.VideoError`)."""
        return probe(path, SUPPORTED_CODECS)

    def read(self, path: str, timestamps: Sequence[float] | None = None, info: VideoInfo | None = None) -> DecodedClip:
        """Decode the sampled frames of ``path``; ``timestamps`` are the wanted times in ``timestamps`` mode."""
        info = info or self.probe(path)
        indices = select_frames(self.cfg.sampling, info.pts, info.duration, timestamps)
        backend = self.backend_for(info.codec, info.path)
        if backend.startswith("dali"):
            try:
                frames, times = self._dali_decoder(backend).decode(info, indices)
                return self._clip(info, frames, times, backend)
            except errors.VideoError as exc:
                log.warning("%s failed on %s (%s); retrying with pyav", backend, path, exc.detail)
        frames_np, times = pyav_backend.decode_frames(
            info, indices, threads=self.cfg.threads, seek_threshold_s=self.cfg.seek_threshold_s
        )
        frames = apply_transform(frames_np, self.cfg.transform) if self.cfg.transform else torch.from_numpy(frames_np)
        return self._clip(info, frames, times, "pyav")

    @staticmethod
    def _clip(info: VideoInfo, frames: torch.Tensor, times: np.ndarray, backend: str) -> DecodedClip:
        ts = torch.as_tensor(np.asarray(times, dtype=np.float64))
        return DecodedClip(info.path, frames, ts, info.duration, backend, info.codec)
