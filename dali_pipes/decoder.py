"""The one video-reading interface: pick a decoder backend at run time, sample frames, transform.

``VideoDecoder(DecoderConfig(...)).read(path)`` returns a :class:`DecodedClip` (frames plus the
presentation time of each) whatever backend did the work:

* ``dali-mixed`` - DALI with NVDEC, when CUDA and DALI are present (H.264, HEVC, VP9, AV1, ...);
* ``dali-cpu``   - DALI's CPU decoder, when DALI is present and the codec is VP8, VP9 or MJPEG;
* ``pyav``       - PyAV, the fallback for everything else (H.264 on CPU, no DALI installed).

The choice is made per codec the first time it is seen and logged once, e.g.
``decoder backend for h264: pyav (fallback: DALI CPU decoder cannot decode h264)``.
If a DALI decode fails on a file that probed fine, the file is retried with PyAV (logged as a warning).

Guard (``backend="auto"``): DALI is trusted for a kind of file - (codec, container, edit list or
not, start offset or not) - only after it decoded the first file of that kind exactly like PyAV:
the same pictures at the first, middle and last shown frame, and an error one frame past the end (so
it counts the same frames). On any disagreement that kind goes to PyAV and a warning says why.

Every backend returns frames as a player shows them (the display rotation applied) with times in
seconds from the first shown frame (see :mod:`dali_pipes.probe`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dali_pipes import dali_backend, errors, pyav_backend
from dali_pipes.probe import SUPPORTED_CODECS, VideoInfo, probe
from dali_pipes.sampling import SamplingConfig, select_frames
from dali_pipes.transform import TransformConfig, apply_transform, rotate

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
    verify_dali: bool = True
    """With ``backend="auto"``, cross-check DALI against PyAV on the first file of each kind (see module docstring)."""
    verify_tolerance: float = 12.0
    """Largest mean absolute difference (0..255 grey levels) between a DALI and a PyAV frame that still agrees."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"DecoderConfig.backend: {self.backend!r} is not one of {BACKENDS}")


@dataclass
class DecodedClip:
    """Frames of one video and the presentation time of every frame."""

    path: str
    """The video file."""
    frames: torch.Tensor
    """float32 ``[N, 3, S, S]`` after the transform, or uint8 ``[N, H, W, 3]`` without one; upright (as shown)."""
    timestamps: torch.Tensor
    """float64 ``[N]``: the presentation time of each frame, seconds from the first shown frame."""
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
        self._kinds: dict[tuple, str] = {}  # cross-checked kinds of file -> backend
        self._lock = threading.Lock()
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

    def _dali_decoder(self, backend: str, raw: bool = False) -> dali_backend.DaliDecoder:
        key = f"{backend}:raw" if raw else backend
        with self._lock:
            if key not in self._dali:
                self._dali[key] = dali_backend.DaliDecoder(
                    backend[5:], None if raw else self.cfg.transform, self.cfg.device_id, num_threads=self.cfg.threads
                )
            return self._dali[key]

    def _checked(self, backend: str, info: VideoInfo) -> str:
        """``backend`` if DALI agreed with PyAV on the first file of this kind, else ``pyav`` (logged once)."""
        kind = (info.codec, info.container, info.edit_list, info.start_pts != 0)
        with self._lock:
            known = self._kinds.get(kind)
        if known is not None:
            return known
        problem = self._cross_check(backend, info)
        what = f"{info.codec} in {info.container}" + (" with an edit list" if info.edit_list else "")
        what += " with a start offset" if info.start_pts != 0 else ""
        if problem is None:
            log.info("decoder backend for %s: %s (agrees with pyav on %s)", what, backend, info.path)
            verdict = backend
        else:
            log.warning("decoder backend for %s: pyav (fallback: %s disagrees with pyav on %s: %s)",
                        what, backend, info.path, problem)  # fmt: skip
            verdict = "pyav"
        with self._lock:
            self._kinds[kind] = verdict
        return verdict

    def _cross_check(self, backend: str, info: VideoInfo) -> str | None:
        """None if DALI decodes ``info`` like PyAV (same pictures, same frame count), else what differs."""
        n = info.num_frames
        idx = np.unique(np.array([0, n // 2, n - 1], dtype=np.int64))
        dali = self._dali_decoder(backend, raw=True)
        try:
            got = dali.run(info, idx)
        except errors.VideoError as exc:
            return f"it failed on frames {idx.tolist()}: {exc.detail}"
        try:
            dali.run(info, np.array([n]))
            return f"it decodes a frame past the {n} frames shown (it counts frames the player never shows)"
        except errors.VideoError:
            pass  # as it should: frame n does not exist
        ref, _ = pyav_backend.decode_frames(info, idx, threads=self.cfg.threads)
        got = got.cpu().numpy()
        if got.shape != ref.shape:
            return f"frames of shape {got.shape[1:]} instead of {ref.shape[1:]}"
        diff = np.abs(got.astype(np.float32) - ref.astype(np.float32)).mean(axis=(1, 2, 3))
        worst = int(np.argmax(diff))
        if diff[worst] > self.cfg.verify_tolerance:
            return f"frame {int(idx[worst])} differs by {diff[worst]:.1f} grey levels on average"
        return None

    def probe(self, path: str) -> VideoInfo:
        """Container facts and frame times of ``path`` (raises :class:`~dali_pipes.errors.VideoError`)."""
        return probe(path, SUPPORTED_CODECS)

    def read(
        self,
        path: str,
        timestamps: Sequence[float] | None = None,
        info: VideoInfo | None = None,
        deadline: float | None = None,
    ) -> DecodedClip:
        """Decode the sampled frames of ``path``; ``timestamps`` are the wanted times in ``timestamps`` mode.

        ``deadline`` (a ``time.monotonic()`` value) ends a PyAV decode that runs past it with
        ``decode_timeout``; DALI runs inside one C++ call, so the loader enforces its deadline there.
        """
        info = info or self.probe(path)
        indices = select_frames(self.cfg.sampling, info.pts, info.duration, timestamps)
        backend = self.backend_for(info.codec, info.path)
        if backend.startswith("dali") and self.cfg.backend == "auto" and self.cfg.verify_dali:
            backend = self._checked(backend, info)
        if backend.startswith("dali"):
            try:
                frames, times = self._dali_decoder(backend).decode(info, indices)
                frames = rotate(frames, info.rotation, channels_first=self.cfg.transform is not None)
                return self._clip(info, frames, times, backend)
            except errors.VideoError as exc:
                log.warning("%s failed on %s (%s); retrying with pyav", backend, path, exc.detail)
        frames_np, times = pyav_backend.decode_frames(
            info, indices, threads=self.cfg.threads, seek_threshold_s=self.cfg.seek_threshold_s, deadline=deadline
        )
        frames = rotate(torch.from_numpy(frames_np), info.rotation, channels_first=False)
        if self.cfg.transform:
            frames = apply_transform(frames, self.cfg.transform)
        return self._clip(info, frames, times, "pyav")

    @staticmethod
    def _clip(info: VideoInfo, frames: torch.Tensor, times: np.ndarray, backend: str) -> DecodedClip:
        ts = torch.as_tensor(np.asarray(times, dtype=np.float64))
        return DecodedClip(info.path, frames, ts, info.duration, backend, info.codec)
