"""TimeExpert's vision side: SigLIP ViT -> slot compression (8 tokens per frame) -> projector.

    tower = VisionTower(VisionConfig(out_hidden=512))          # tiny random ViT (CPU-fast default)
    tower = VisionTower(VisionConfig(pretrained="/ckpt/siglip", out_hidden=512))   # real weights
    tokens = tower(frames)        # frames [N, 3, H, W] float in [0, 1] or [N, H, W, 3] uint8
                                  # -> tokens [N, num_slots, out_hidden], row n from frame n only

Frames are FLAT: the caller folds batch and time (``[B*F, ...]``) and unfolds the result; row ``n``
of the output is a function of frame ``n`` alone (no batch statistics), and the slots of a frame are
in slot order, so the decoder's 8 VISUAL positions of frame ``f`` take ``tokens[f]`` in order.

Preprocessing (:meth:`VisionTower.preprocess`, as SigLIP's image processor does it): uint8 frames
are scaled by 1/255; frames are resized (bicubic, antialiased, aspect ratio NOT kept, like SigLIP's
``size x size`` resize) to ``image_size`` and normalised with SigLIP's mean = std = 0.5 per channel
(pixels in [-1, 1]). With ``prenormalized=True`` the frames are taken as already resized and
normalised (e.g. by ``dali_pipes`` with ``TransformConfig(size=image_size, mean=(0.5,)*3,
std=(0.5,)*3)``) and only their size is checked.

The ViT is ``transformers.SiglipVisionModel``: with ``pretrained`` it is loaded from that LOCAL
folder (``local_files_only``, no network, fp32, the architecture from the folder's config; the
attention-pooling head is dropped because the tower uses the patch features), otherwise it is built
randomly from the sizes here. All parameters are fp32 and initialised from torch's RNG (the trainer
seeds it identically on every rank); under ``torch.autocast`` the matmuls run in the autocast dtype
and the output has that dtype. Freezing is the trainer's business, not this module's. No
communication.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_timeexpert.model.slot_compression import SlotCompression

log = logging.getLogger(__name__)

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass
class VisionConfig:
    """The vision encoder (YAML section ``model.vision``)."""

    pretrained: str | None = None
    """Local folder holding a SigLIP vision (or full SigLIP) checkpoint saved with ``save_pretrained``;
    its config fixes the ViT's sizes and the size fields below are ignored. None: random init."""
    image_size: int = 64
    """Side of the square input the random ViT takes (pixels); a multiple of ``patch_size``."""
    patch_size: int = 16
    """Side of a ViT patch (pixels) of the random ViT."""
    hidden_size: int = 64
    """Width of the random ViT (and of its patch features, which the slots pool)."""
    num_layers: int = 2
    """Transformer layers of the random ViT."""
    num_heads: int = 4
    """Attention heads of the random ViT (``hidden_size`` must be divisible by it)."""
    intermediate_size: int = 128
    """MLP hidden width of the random ViT."""
    num_slots: int = 8
    """Visual tokens per frame after slot compression (the token contract fixes 8)."""
    slot_iters: int = 3
    """Slot-attention rounds (competitive pooling steps) per frame."""
    out_hidden: int = 64
    """Width of the output tokens: the decoder's hidden size."""
    prenormalized: bool = False
    """Float frames arrive already resized to ``image_size`` and normalised with SigLIP's mean/std
    (the tower then only checks their size); False: float frames are RGB in [0, 1]."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (``name=value: rule``)."""

        def bad(name: str, rule: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r}: {rule}")

        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            bad("pretrained", "must be a folder path or null")
        for name in (
            "image_size",
            "patch_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "num_slots",
            "slot_iters",
            "out_hidden",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be a positive integer")
        if self.image_size % self.patch_size:
            bad("image_size", f"must be a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            bad("hidden_size", f"must be divisible by num_heads={self.num_heads}")


def build_vit(cfg: VisionConfig) -> nn.Module:
    """The SigLIP ViT without its pooling head: loaded from ``cfg.pretrained`` or randomly initialised."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if cfg.pretrained is None:
        vcfg = SiglipVisionConfig(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size,
            vision_use_head=False,
        )
        vit = SiglipVisionModel(vcfg).float()
        log.info(
            "vision: random init SigLIP ViT (image %d, patch %d, width %d, %d layers, %d heads, mlp %d)",
            vcfg.image_size,
            vcfg.patch_size,
            vcfg.hidden_size,
            vcfg.num_hidden_layers,
            vcfg.num_attention_heads,
            vcfg.intermediate_size,
        )
        return vit
    path = cfg.pretrained
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model.vision.pretrained={path!r}: no such folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"model.vision.pretrained={path!r}: no config.json in the folder (not a save_pretrained folder)"
        )
    try:
        vit, info = SiglipVisionModel.from_pretrained(
            path, local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise OSError(f"model.vision.pretrained={path!r}: cannot load a SigLIP vision model: {e}") from e
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("head."))
    if missing:
        raise ValueError(
            f"model.vision.pretrained={path!r}: the checkpoint lacks {len(missing)} ViT weights "
            f"(e.g. {', '.join(missing[:3])}); they would be random"
        )
    if getattr(vit, "use_head", False):  # the tower pools with slots; an unused head would get no gradients
        del vit.head
        vit.use_head = False
        vit.config.vision_use_head = False
    c = vit.config
    log.info(
        "vision: pretrained SigLIP ViT from %s (image %d, patch %d, width %d, %d layers, %d heads, mlp %d)",
        path,
        c.image_size,
        c.patch_size,
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.intermediate_size,
    )
    return vit


class VisionTower(nn.Module):
    """Frames ``[N, 3, H, W]`` float / ``[N, H, W, 3]`` uint8 -> ``[N, num_slots, out_hidden]``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vit = build_vit(cfg)
        c = self.vit.config
        self.image_size = int(c.image_size)
        """Input side the ViT takes (from the pretrained folder when there is one)."""
        self.feature_dim = int(c.hidden_size)
        """Width of the patch features (the ViT's width)."""
        self.slots = SlotCompression(self.feature_dim, num_slots=cfg.num_slots, iters=cfg.slot_iters)
        self.norm_out = nn.LayerNorm(self.feature_dim)
        self.projector = nn.Sequential(
            nn.Linear(self.feature_dim, cfg.out_hidden), nn.GELU(), nn.Linear(cfg.out_hidden, cfg.out_hidden)
        )
        self.register_buffer("pixel_mean", torch.tensor(SIGLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(SIGLIP_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, H, W, 3]`` or float ``[N, 3, H, W]`` -> fp32 ``[N, 3, S, S]`` normalised pixels."""
        if frames.dim() != 4:
            raise ValueError(
                f"vision: frames must be [N, 3, H, W] float or [N, H, W, 3] uint8, got {tuple(frames.shape)}"
            )
        if frames.dtype == torch.uint8:
            if frames.shape[-1] != 3:
                raise ValueError(f"vision: uint8 frames must be [N, H, W, 3] RGB, got {tuple(frames.shape)}")
            x = frames.permute(0, 3, 1, 2).float().div(255.0)
        elif frames.is_floating_point():
            if frames.shape[1] != 3:
                raise ValueError(f"vision: float frames must be [N, 3, H, W] RGB, got {tuple(frames.shape)}")
            x = frames.float()
            if self.cfg.prenormalized:
                if tuple(x.shape[2:]) != (self.image_size, self.image_size):
                    raise ValueError(
                        f"vision: prenormalized frames must be {self.image_size}x{self.image_size}, "
                        f"got {tuple(frames.shape)}"
                    )
                return x
        else:
            raise ValueError(f"vision: frames must be uint8 or float, got {frames.dtype}")
        s = self.image_size
        if tuple(x.shape[2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)
        return (x - self.pixel_mean) / self.pixel_std

    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[N, 3, S, S]`` -> the ViT's last hidden state ``[N, patches, feature_dim]``."""
        return self.vit(pixel_values=pixels).last_hidden_state

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        feats = self.patch_features(self.preprocess(frames))
        return self.projector(self.norm_out(self.slots(feats)))
