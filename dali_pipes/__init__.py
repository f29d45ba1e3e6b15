"""Video decoding for the data path: DALI pipelines (GPU ``mixed`` and CPU), the PyAV fallback,
frame sampling at presentation timestamps, and the frame transform. Knows videos, not ranks;
never imports ``megatron_timeexpert``.
"""

from dali_pipes.decoder import DecodedClip, DecoderConfig, VideoDecoder
from dali_pipes.errors import VideoError
from dali_pipes.probe import VideoInfo, probe
from dali_pipes.sampling import SamplingConfig
from dali_pipes.transform import TransformConfig

__all__ = [
    "DecodedClip",
    "DecoderConfig",
    "SamplingConfig",
    "TransformConfig",
    "VideoDecoder",
    "VideoError",
    "VideoInfo",
    "probe",
]
