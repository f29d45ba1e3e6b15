"""Slot-based token compression: a frame's patch features -> ``num_slots`` tokens (slot attention).

TimeExpert compresses each frame's 128-256 ViT tokens to 8 visual tokens with slot-based token
compression (its ref. [15], VTG-LLM). This module is that pooling, written as slot attention
(Locatello et al. 2020): ``num_slots`` slots start from LEARNED initial vectors (one per slot, no
sampling noise, so the output is a deterministic function of the frame), and for ``iters`` rounds

1. every patch distributes one unit of attention over the slots (softmax over the SLOT axis, so the
   slots compete for patches),
2. each slot takes the attention-weighted mean of the patch values,
3. a GRU cell updates the slot from that mean, then a residual MLP refines it.

The result is a set function of the patches (permuting the patches of a frame leaves its slots
unchanged up to float rounding). Each frame is pooled independently: row ``n`` of the output
depends only on row ``n`` of the input. The attention normalisation runs in fp32 under autocast.
No communication; parameters are plain fp32 ``nn.Parameter``s initialised from torch's RNG.
"""

from __future__ import annotations

import torch
from torch import nn


class SlotCompression(nn.Module):
    """``[N, P, dim]`` patch features -> ``[N, num_slots, dim]`` slot tokens (see module docstring)."""

    def __init__(self, dim: int, num_slots: int = 8, iters: int = 3, mlp_hidden: int | None = None, eps: float = 1e-8):
        super().__init__()
        if dim < 1 or num_slots < 1 or iters < 1:
            raise ValueError(f"SlotCompression: dim={dim}, num_slots={num_slots}, iters={iters} must all be >= 1")
        self.dim = dim
        self.num_slots = num_slots
        self.iters = iters
        self.eps = eps
        self.scale = dim**-0.5
        # Learned initial slots (distinct vectors break the symmetry between slots without noise).
        self.slot_init = nn.Parameter(torch.randn(num_slots, dim))
        self.norm_inputs = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        hidden = mlp_hidden or 2 * dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attention(self, slots: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Per-patch softmax over slots, renormalised per slot over patches: ``[N, S, P]`` fp32 weights."""
        q = self.to_q(self.norm_slots(slots))
        with torch.autocast(device_type=keys.device.type, enabled=False):
            logits = torch.einsum("nsd,npd->nsp", q.float(), keys.float()) * self.scale
            attn = logits.softmax(dim=1) + self.eps  # slots compete for each patch
            return attn / attn.sum(dim=-1, keepdim=True)  # weighted mean over patches

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 3 or feats.shape[-1] != self.dim:
            raise ValueError(f"SlotCompression: expected [N, P, {self.dim}] patch features, got {tuple(feats.shape)}")
        n = feats.shape[0]
        x = self.norm_inputs(feats)
        k, v = self.to_k(x), self.to_v(x)
        slots = self.slot_init.unsqueeze(0).expand(n, -1, -1)
        for _ in range(self.iters):
            w = self.attention(slots, k)
            updates = torch.einsum("nsp,npd->nsd", w, v.float())  # autocast may run this in bf16
            # GRUCell needs one dtype for input and state: the update's.
            flat = self.gru(updates.reshape(-1, self.dim), slots.reshape(-1, self.dim).to(updates.dtype))
            slots = flat.view(n, self.num_slots, self.dim)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots
