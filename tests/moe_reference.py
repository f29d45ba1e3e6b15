"""Plain single-process MoE reference and a tiny test router, written as simply as possible.

The reference loops over tokens and experts in Python with the same router and expert weights the
layer uses (indexed by LOGICAL expert id), so any disagreement points at dispatch, placement,
combine or gradient plumbing in the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_timeexpert.moe.types import RouterOutput, TokenType


class TinyRouter(nn.Module):
    """A deterministic variable-k router for tests (obeys the router contract).

    ``logits = x @ gate``; expert e fires when ``sigmoid(logit) > threshold`` and ``allowed[e]``, or
    when ``always[e]``. With ``type_rules``: VISUAL tokens fire nothing (k = 0) and TIME tokens fire
    every allowed expert (k = E). ``probs = sigmoid(logits)`` where fired, exactly 0 elsewhere.
    Loss ``z`` = ``z_coef * sum_t logsumexp(logits_t)^2`` (a SUM over tokens, so the losses of disjoint
    token shards add up to the loss of the whole batch and gradients can be compared exactly).
    """

    def __init__(self, hidden: int, num_experts: int, threshold: float = 0.5, z_coef: float = 0.01):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(hidden, num_experts) * 0.5)
        self.threshold = threshold
        self.z_coef = z_coef
        self.register_buffer("allowed", torch.ones(num_experts, dtype=torch.bool))
        self.register_buffer("always", torch.zeros(num_experts, dtype=torch.bool))
        self.type_rules = True

    def forward(self, x: torch.Tensor, token_type: torch.Tensor) -> RouterOutput:
        logits = x @ self.gate.to(x.dtype)
        p = torch.sigmoid(logits)
        fired = ((p > self.threshold) & self.allowed) | self.always
        if self.type_rules:
            fired = torch.where((token_type == TokenType.VISUAL)[:, None], torch.zeros_like(fired), fired)
            fired = torch.where((token_type == TokenType.TIME)[:, None], self.allowed.expand_as(fired), fired)
        probs = torch.where(fired, p, torch.zeros_like(p))
        z = self.z_coef * (torch.logsumexp(logits, dim=-1) ** 2).sum()
        k = fired.sum(dim=1).double().mean().item() if fired.numel() else 0.0
        return RouterOutput(probs=probs, routing_map=fired, token_type=token_type, losses={"z": z}, metrics={"k": k})


def reference_expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """One expert MLP on one token ``x [H]`` (gelu, or gelu-GLU)."""
    h = x @ w1
    if gated:
        a, b = h.chunk(2)
        h = F.gelu(a) * b
    else:
        h = F.gelu(h)
    return h @ w2


def reference_moe(
    x: torch.Tensor, token_type: torch.Tensor, router: nn.Module, w1: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, RouterOutput]:
    """``y_t = sum_e probs[t, e] * expert_e(x_t)`` over fired e, by loops. ``w1 [E, H, F]``, ``w2 [E, F, H]``
    indexed by logical expert id. Returns ``(y [T, H], router output)``."""
    r = router(x, token_type)
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for e in range(w1.shape[0]):
            if r.routing_map[t, e]:
                y = y + r.probs[t, e] * reference_expert(x[t], w1[e], w2[e])
        rows.append(y)
    return torch.stack(rows), r
