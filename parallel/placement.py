"""Expert placement: which physical slot on which expert-parallel rank hosts each LOGICAL expert.

DESIGN contract 2. An expert-parallel (EP) group of ``ep_size`` ranks owns ``E_max = ep_size *
slots_per_rank`` physical slots, fixed at construction. Physical slot ``p`` lives on EP rank
``p // slots_per_rank`` at local slot ``p % slots_per_rank``; a rank's expert weights are fixed-shape
tensors over its ``slots_per_rank`` local slots. The placement map is a bijection

    logical expert id e  ->  physical slot p = logical_to_physical[e]

held as a (persistent, checkpointed) buffer that must be IDENTICAL on every rank: every rank routes
with it, so a disagreement would send tokens to the wrong experts. Nothing here communicates; the
planner / migration code that computes a new map from globally reduced statistics installs it on
every rank with :meth:`ExpertPlacement.set_map` (contents change, shapes never do).

This module knows ranks and slots, not gating: it never looks at router probabilities. No caller may
assume the default contiguous map (``p == e``); always go through the map.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertPlacement(nn.Module):
    """The logical -> (EP rank, local slot) map of one MoE layer, as a buffer.

    Args:
        ep_size: number of ranks in the expert-parallel group.
        slots_per_rank: physical expert slots per EP rank.
        logical_to_physical: optional initial map ``[E_max]`` (a permutation of ``0..E_max-1``);
            default contiguous (logical ``e`` on rank ``e // slots_per_rank``, slot ``e % slots_per_rank``).

    Buffers:
        logical_to_physical: ``[E_max]`` long, persistent (saved in checkpoints).
    """

    def __init__(self, ep_size: int, slots_per_rank: int, logical_to_physical: torch.Tensor | None = None):
        super().__init__()
        if ep_size < 1 or slots_per_rank < 1:
            raise ValueError(f"ep_size and slots_per_rank must be >= 1, got {ep_size}, {slots_per_rank}")
        self.ep_size = ep_size
        self.slots_per_rank = slots_per_rank
        if logical_to_physical is None:
            logical_to_physical = torch.arange(self.num_slots)
        self.register_buffer("logical_to_physical", torch.empty(self.num_slots, dtype=torch.long))
        self.set_map(logical_to_physical)

    @property
    def num_slots(self) -> int:
        """E_max: physical slots in the whole EP group (= number of logical expert ids)."""
        return self.ep_size * self.slots_per_rank

    @staticmethod
    def check_map(mapping: torch.Tensor, num_slots: int) -> None:
        """Raise ``ValueError`` unless ``mapping`` is a permutation of ``0..num_slots-1``."""
        if mapping.shape != (num_slots,):
            raise ValueError(f"placement map must have shape [{num_slots}], got {tuple(mapping.shape)}")
        if not torch.equal(torch.sort(mapping.long().cpu()).values, torch.arange(num_slots)):
            raise ValueError(f"placement map must be a permutation of 0..{num_slots - 1}, got {mapping.tolist()}")

    def set_map(self, logical_to_physical: torch.Tensor) -> None:
        """Install a new map in place (shape unchanged). Every rank must install the same map."""
        self.check_map(logical_to_physical, self.num_slots)
        with torch.no_grad():
            self.logical_to_physical.copy_(logical_to_physical.to(self.logical_to_physical.device))

    def physical_to_logical(self) -> torch.Tensor:
        """``[E_max]`` long: the logical expert hosted by each physical slot (inverse permutation)."""
        inv = torch.empty_like(self.logical_to_physical)
        inv[self.logical_to_physical] = torch.arange(self.num_slots, device=inv.device)
        return inv

    def expert_rank(self) -> torch.Tensor:
        """``[E_max]`` long: the EP rank hosting each logical expert."""
        return torch.div(self.logical_to_physical, self.slots_per_rank, rounding_mode="floor")

    def expert_slot(self) -> torch.Tensor:
        """``[E_max]`` long: the local slot (on its rank) of each logical expert."""
        return self.logical_to_physical % self.slots_per_rank

    def local_experts(self, ep_rank: int) -> list[int]:
        """Logical ids hosted on ``ep_rank``, in local slot order (entry ``s`` lives in slot ``s``)."""
        inv = self.physical_to_logical()
        start = ep_rank * self.slots_per_rank
        return inv[start : start + self.slots_per_rank].tolist()

    def to_physical(self, per_logical: torch.Tensor) -> torch.Tensor:
        """Reorder the last dim of ``per_logical [..., E_max]`` into physical slot order.

        The result is viewable as ``[..., ep_size, slots_per_rank]``: entry ``[..., r, s]`` belongs to
        the logical expert on rank ``r``, slot ``s``. Differentiable (an index_select).
        """
        return per_logical.index_select(-1, self.physical_to_logical())

    def extra_repr(self) -> str:
        return f"ep_size={self.ep_size}, slots_per_rank={self.slots_per_rank}"
