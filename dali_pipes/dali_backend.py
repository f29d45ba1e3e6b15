"""NVIDIA DALI decoding: ``mixed`` (NVDEC on the GPU) and ``cpu`` (libavcodec inside DALI).

One small pipeline per thread (DALI pipelines are not thread-safe) takes the encoded file bytes
and the indices of the frames wanted, decodes them with ``fn.decoders.video`` and, when a
:class:`~dali_pipes.transform.TransformConfig` is given, resizes the shorter side, centre-crops and
normalises on the same device. Frame indices are in presentation order, so the timestamp of each
returned frame is the probe's time of that frame (``VideoInfo.pts``, seconds from the first shown
frame). That holds only where DALI counts the same frames as the probe; :mod:`dali_pipes.decoder`
checks it per kind of file before trusting DALI (it does not, for instance, on MP4 edit lists).

DALI's CPU decoder handles VP8, VP9 and MJPEG only; the mixed (GPU) decoder adds H.264, HEVC,
AV1 and MPEG-4. :mod:`dali_pipes.decoder` routes each codec to a backend that can decode it.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from dali_pipes import errors
from dali_pipes.probe import VideoInfo
from dali_pipes.transform import TransformConfig

CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
MIXED_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "av1", "mjpeg", "mpeg4"})


def version() -> str | None:
    """DALI's version string, or None when DALI does not import (it is optional)."""
    try:
        import nvidia.dali as dali
    except Exception:  # noqa: BLE001 - a broken install (missing CUDA libs) counts as absent
        return None
    return dali.__version__


def codecs_for(device: str) -> frozenset[str]:
    """Codecs DALI decodes on ``device`` (``cpu`` or ``mixed``)."""
    return CPU_CODECS if device == "cpu" else MIXED_CODECS


class DaliDecoder:
    """Decode chosen frames of one video at a time with a DALI pipeline on ``device``."""

    def __init__(
        self, device: str, transform: TransformConfig | None, device_id: int = 0, num_threads: int = 1
    ) -> None:
        if device not in ("cpu", "mixed"):
            raise ValueError(f"DaliDecoder.device: {device!r} is not 'cpu' or 'mixed'")
        self.device = device
        self.transform = transform
        self.device_id = device_id
        self.num_threads = num_threads
        self._local = threading.local()

    @property
    def name(self) -> str:
        return f"dali-{self.device}"

    def _pipeline(self):
        pipe = getattr(self._local, "pipe", None)
        if pipe is None:
            pipe = self._build()
            self._local.pipe = pipe
        return pipe

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        t = self.transform
        device_id = self.device_id if self.device == "mixed" else None

        @pipeline_def(batch_size=1, num_threads=self.num_threads, device_id=device_id, prefetch_queue_depth=1)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            frames_idx = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            # pad_mode="none": an index past the end is an error, never a silently black frame.
            video = fn.decoders.video(encoded, device=self.device, frames=frames_idx, pad_mode="none")
            if t is None:
                return video
            video = fn.resize(video, resize_shorter=t.size, antialias=True)
            return fn.crop_mirror_normalize(
                video,
                crop=(t.size, t.size),
                mean=[255.0 * m for m in t.mean],
                std=[255.0 * s for s in t.std],
                output_layout="FCHW",
                dtype=types.FLOAT,
            )

        p = pipe()
        p.build()
        return p

    def decode(self, info: VideoInfo, indices: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Frames (uint8 ``[N,H,W,3]`` without a transform, float ``[N,3,S,S]`` with one) and their times.

        Frames come in stored orientation (the caller applies the display rotation); an index outside
        the shown frames is an error here, whatever DALI would return for it.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= info.num_frames):
            raise errors.VideoError(
                info.path, errors.CORRUPT, f"{self.name}: frame {int(indices.max())} of {info.num_frames} requested"
            )
        return self.run(info, indices), info.pts[indices]

    def run(self, info: VideoInfo, indices: np.ndarray) -> torch.Tensor:
        """DALI's frames at ``indices`` as DALI counts them (no check against the probe's frame list)."""
        pipe = self._pipeline()
        data = np.fromfile(info.path, dtype=np.uint8)
        try:
            pipe.feed_input("encoded", [data])
            pipe.feed_input("frames", [np.asarray(indices, dtype=np.int32)])
            (out,) = pipe.run()
        except RuntimeError as exc:
            self._local.pipe = None  # a failed pipeline is not reused
            raise errors.VideoError(
                info.path, errors.CORRUPT, f"{self.name}: {' '.join(str(exc).split())[:300]}"
            ) from None
        if self.device == "mixed":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tensor = out.as_tensor()
            dtype = torch.uint8 if self.transform is None else torch.float32
            frames = torch.empty(tensor.shape()[1:], dtype=dtype, device=f"cuda:{self.device_id}")
            feed_ndarray(out[0], frames, cuda_stream=torch.cuda.current_stream(self.device_id))
        else:
            frames = torch.from_numpy(np.array(out.at(0)))
        return frames
