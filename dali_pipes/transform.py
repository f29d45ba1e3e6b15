"""Resize, centre-crop and normalise frames for the vision encoder (the torch version).

The DALI pipelines do the same steps on the device with DALI operators (see ``dali_backend``);
this module is the reference used by the CPU fallback decoders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# CLIP's image statistics, the default for ViT-style video encoders.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TransformConfig:
    """Geometry and normalisation of the frames handed to the model."""

    size: int = 224
    """Output frames are ``size x size``: the shorter side is resized to ``size``, then centre-cropped."""
    mean: tuple[float, float, float] = field(default=CLIP_MEAN)
    """Per-channel mean (RGB, on the 0..1 scale) subtracted after scaling pixels to 0..1."""
    std: tuple[float, float, float] = field(default=CLIP_STD)
    """Per-channel standard deviation (RGB, 0..1 scale) divided by after subtracting the mean."""

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"TransformConfig.size: must be >= 1, got {self.size}")


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to ``size`` keeping the aspect ratio."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def apply_transform(frames: np.ndarray | torch.Tensor, cfg: TransformConfig) -> torch.Tensor:
    """uint8 frames ``[N, H, W, 3]`` -> float32 ``[N, 3, size, size]``, resized, cropped, normalised."""
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).float().div_(255.0)
    h, w = resized_shape(x.shape[2], x.shape[3], cfg.size)
    if (h, w) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (h - cfg.size) // 2, (w - cfg.size) // 2
    x = x[:, :, top : top + cfg.size, left : left + cfg.size]
    mean = torch.tensor(cfg.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def rotate(frames: torch.Tensor, rotation: int, channels_first: bool) -> torch.Tensor:
    """Turn frames by their display rotation (degrees anticlockwise, a multiple of 90) so they come
    out as a player shows them; ``[N, H, W, C]`` or, with ``channels_first``, ``[N, C, H, W]``."""
    k = (rotation // 90) % 4
    if k == 0:
        return frames
    return torch.rot90(frames, k, dims=(2, 3) if channels_first else (1, 2)).contiguous()
