"""How a video's slot tokens enter the decoder: standardised per slot over the video, plus the frame's time.

    ft = FrameTokens(FrameTokensConfig(standardize=True, time_embedding=True), hidden=64, init_std=0.02)
    visual = ft(tokens, frame_times)   # tokens [b, F, S, h] (vision tower), times [b, F] s -> [b, F*S, h]

Two optional steps between the vision tower and the decoder's VISUAL positions (our additions to the
paper's recipe, both switchable; docs/MODEL.md "Grounding"):

1. ``standardize``: for each sample and slot ``s``, the tokens of its ``F`` frames lose their mean over
   the frames (the part every frame of the video shares: background, the slot's own bias) and are divided
   by their root-mean-square over frames and channels, then multiplied by a learned gain that starts at
   the text embeddings' init std. What is left is what makes frame ``f`` differ from the video's other
   frames, at the scale of a text embedding. Without it the tower's tokens are ~50x a text embedding and
   98% shared by every frame (a random ViT's features of a grey background), and training the slots
   against a decoder that cannot yet use them collapses the rest (cosine 1.0000 between frames with and
   without the event). The denominator has a floor, ``eps`` times the tokens' own mean square, so a video
   whose frames are all alike gives (near) zero tokens instead of amplified noise. Needs ``F >= 2``.
2. ``time_embedding``: the frame's presentation time ``t`` (seconds) as sines and cosines of fixed periods
   (:data:`PERIODS`, 0.2 s to 10,000 s in 1-2-5 steps: the decimal digits of ``t`` are phases of the
   periods 1, 10, 100 ...) through a learned linear map to the hidden size, added to each of the frame's
   slot tokens. A response position that attends to the right frame then reads its time in one hop.

Row ``(b, f, s)`` of the output depends only on sample ``b`` (its frames and times): no batch statistics,
so the result does not depend on the micro-batch size or the layout. Parameters are fp32 and replicated
(the module sits with the vision tower on the first pipeline stage, NOT tagged ``sequence_parallel``:
their gradients are complete on every TP rank, see model/video_llm.py). No communication.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PERIODS: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 10000.0)
"""Periods (seconds) of the frame-time features (a sine and a cosine each)."""


@dataclass
class FrameTokensConfig:
    """Visual tokens on their way into the decoder (YAML section ``model.frame_tokens``)."""

    standardize: bool = False
    """Per sample and slot: subtract the mean over the video's frames, divide by the RMS over frames and
    channels, multiply by a learned gain (init: ``model.init_method_std``, the text embeddings' scale)."""
    time_embedding: bool = False
    """Add a learned linear map of each frame's time features (sines/cosines of :data:`PERIODS`) to its
    slot tokens."""
    eps: float = 1e-6
    """Floor of the standardisation's denominator, relative to the tokens' own mean square (a video whose
    frames are all alike becomes zeros, not amplified noise)."""

    def validate(self) -> None:
        if not (isinstance(self.eps, (int, float)) and 0.0 < self.eps < 1.0):
            raise ValueError(f"eps={self.eps!r}: must be in (0, 1)")

    @property
    def enabled(self) -> bool:
        return self.standardize or self.time_embedding


def time_features(times: Tensor) -> Tensor:
    """``[..., F]`` seconds -> ``[..., F, 2 * len(PERIODS)]`` fp32 sines and cosines (module docstring)."""
    periods = torch.tensor(PERIODS, dtype=torch.float64, device=times.device)
    phase = (2 * math.pi) * times.double().unsqueeze(-1) / periods
    return torch.cat([phase.sin(), phase.cos()], dim=-1).float()


class FrameTokens(nn.Module):
    """``tokens [b, F, S, h]``, ``times [b, F]`` -> ``[b, F * S, h]`` (frame-major, slot order)."""

    def __init__(self, cfg: FrameTokensConfig, hidden: int, init_std: float):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        if cfg.standardize:
            self.gain = nn.Parameter(torch.tensor(float(init_std)))
        if cfg.time_embedding:
            self.time_proj = nn.Linear(2 * len(PERIODS), hidden, bias=False)
            # Each period contributes sin^2 + cos^2 = 1 to the input's squared norm: this std gives output
            # entries of RMS init_std, the text embeddings' scale.
            nn.init.normal_(self.time_proj.weight, std=init_std / math.sqrt(len(PERIODS)))

    def standardize(self, tokens: Tensor) -> Tensor:
        """The standardisation alone (module docstring, step 1), fp32 ``[b, F, S, h]``."""
        x = tokens.double() if tokens.dtype == torch.float64 else tokens.float()  # at least fp32
        if x.shape[1] < 2:
            raise ValueError(
                f"FrameTokens: standardize needs at least 2 frames per video, got {x.shape[1]} "
                "(set data.num_frames >= 2 or model.frame_tokens.standardize=false)"
            )
        centred = x - x.mean(dim=1, keepdim=True)
        ms = centred.pow(2).mean(dim=(1, 3), keepdim=True)
        floor = self.cfg.eps * x.pow(2).mean(dim=(1, 3), keepdim=True)
        return centred * torch.rsqrt(ms + floor + 1e-30) * self.gain

    def forward(self, tokens: Tensor, times: Tensor | None) -> Tensor:
        if tokens.dim() != 4:
            raise ValueError(f"FrameTokens: tokens must be [b, F, S, h], got {tuple(tokens.shape)}")
        b, f, s, h = tokens.shape
        x = self.standardize(tokens) if self.cfg.standardize else tokens
        if self.cfg.time_embedding:
            if times is None or tuple(times.shape) != (b, f):
                got = None if times is None else tuple(times.shape)
                raise ValueError(f"FrameTokens: time_embedding needs frame times [b={b}, F={f}], got {got}")
            w = self.time_proj.weight
            x = x.to(torch.promote_types(x.dtype, w.dtype)) + self.time_proj(
                time_features(times).to(w.dtype)
            ).unsqueeze(2)
        return x.reshape(b, f * s, h)
