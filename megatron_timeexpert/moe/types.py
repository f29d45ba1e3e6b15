"""The router contract (DESIGN.md contract 1), shared by every router and the MoE layer.

A router maps ``hidden [T, H]`` (T tokens on this rank, flattened from ``[s, b, h]`` in that
order) plus ``token_type [T]`` to a :class:`RouterOutput` over LOGICAL expert ids ``0..E_max-1``.
A token may fire 0..E_max experts; inactive logical ids never fire. No communication happens in
the forward of a router except the reduction of routing statistics, which it documents itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch


class TokenType(IntEnum):
    """Task type of a token (TimeExpert routes by it). Values index per-type statistics."""

    VISUAL = 0
    TEXT = 1
    TIME = 2
    SCORE = 3


NUM_TOKEN_TYPES = len(TokenType)


@dataclass
class RouterOutput:
    """What a router hands to the MoE layer.

    probs: ``[T, E_max]`` float weights of the fired experts (exactly 0 where not fired); the layer
        computes ``y_t = sum_e probs[t, e] * expert_e(x_t)``. Gradients to the router flow through it.
    routing_map: ``[T, E_max]`` bool, which logical experts each token fires.
    token_type: ``[T]`` long, a :class:`TokenType` per token.
    losses: name -> scalar loss tensor, already multiplied by its coefficient (added to the
        training loss by the layer; reported per layer in the metrics).
    metrics: name -> detached scalar for logging (e.g. mean experts per token by type).
    """

    probs: torch.Tensor
    routing_map: torch.Tensor
    token_type: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
