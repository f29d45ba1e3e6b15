"""The experts of one EP rank: fixed-shape weights over its physical slots (DESIGN contract 2).

``w1 [slots, H, F]`` (``[slots, H, 2F]`` with a gated linear unit) and ``w2 [slots, F, H]`` hold
the experts in this rank's ``slots_per_rank`` slots; which logical expert sits in a slot is the
placement map's business, never assumed here. Shapes never change, so gradient buffers and
optimizer state keep their shape when experts are added, pruned or migrated.

No communication. Expert tensor parallelism is 1: each expert is whole on one rank. The weights are
marked ``allreduce = False`` so megatron-core's DistributedDataParallel puts them in its
expert-parallel buffers and reduces their gradients over the expert-data-parallel group
(``parallel_state.get_expert_data_parallel_group()``) instead of the full data-parallel group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ExpertsConfig:
    """Shapes and activation of the experts on one rank."""

    hidden_size: int
    """H, the model width."""
    ffn_hidden_size: int
    """F, each expert's inner width."""
    slots_per_rank: int
    """Physical expert slots on this rank."""
    gated_linear_unit: bool = False
    """SwiGLU-style ``act(x W_a) * (x W_b)`` when True (w1 is then ``[slots, H, 2F]``)."""
    activation: Callable[[torch.Tensor], torch.Tensor] = F.gelu
    """Element-wise activation (megatron's ``config.activation_func``)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of w1 and w2."""
    params_dtype: torch.dtype = torch.float32
    """dtype of the expert weights."""


def mark_expert_parallel(param: torch.Tensor) -> None:
    """Give a slot tensor the attributes megatron-core gives its own expert weights.

    - ``allreduce = False``: ``DistributedDataParallel`` puts it in the expert-parallel buffers,
      reduced over the expert-data-parallel group, and ``get_megatron_optimizer`` puts it in the
      expert optimizer, whose gradient norm is reduced over the expert model-parallel group;
    - ``tensor_model_parallel = True`` (``partition_dim`` 0, stride 1, as megatron's expert linears
      carry with expert-TP = 1): each rank's slots are distinct tensors, not copies held by every
      TP rank. Without it megatron's norm filter (``param_is_not_tensor_parallel_duplicate``) counts
      the slots only on dense-TP rank 0, so at TP > 1 the global gradient norm misses the experts of
      every other TP rank and clipping scales by a wrong factor.
    """
    param.allreduce = False
    param.tensor_model_parallel = True
    param.partition_dim = 0
    param.partition_stride = 1


class SlotExperts(nn.Module):
    """All experts of one EP rank; computes every local expert each received token fired.

    ``forward(x [N, H], weights [N, slots], mask [N, slots]) -> [N, H]`` returns, per row,
    ``sum_{s: mask[n, s]} weights[n, s] * expert_s(x[n])``. Every slot runs, also on zero rows, so
    every weight always gets a (possibly zero) gradient and DDP buckets always complete.

    Buffer ``slot_step_base [slots]`` (int64, persistent): each slot's per-slot Adam step base
    (train/slot_adam.py); every buffer with a slot axis is keyed to the slot like the weights.
    """

    def __init__(self, config: ExpertsConfig):
        super().__init__()
        self.config = config
        fc1_out = config.ffn_hidden_size * (2 if config.gated_linear_unit else 1)
        shape1 = (config.slots_per_rank, config.hidden_size, fc1_out)
        shape2 = (config.slots_per_rank, config.ffn_hidden_size, config.hidden_size)
        self.w1 = nn.Parameter(torch.empty(shape1, dtype=config.params_dtype))
        self.w2 = nn.Parameter(torch.empty(shape2, dtype=config.params_dtype))
        for p in (self.w1, self.w2):
            mark_expert_parallel(p)
        # Per-slot Adam step base (train/slot_adam.py): slot s's own optimizer step is the weights'
        # step minus this; 0 = as old as the weights. Keyed to the slot: checkpointed by physical
        # slot and moved with it like the weights.
        self.register_buffer("slot_step_base", torch.zeros(config.slots_per_rank, dtype=torch.long))

    @torch.no_grad()
    def init_slot(self, slot: int, seed: int) -> None:
        """(Re)initialise one slot from its own generator, so init does not depend on the layout."""
        gen = torch.Generator().manual_seed(seed)
        for p in (self.w1, self.w2):
            p[slot].copy_(torch.randn(p.shape[1:], generator=gen, dtype=torch.float32) * self.config.init_std)

    def expert(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's MLP on rows ``x [n, H]``."""
        h = x @ self.w1[slot]
        if self.config.gated_linear_unit:
            a, b = h.chunk(2, dim=-1)
            h = self.config.activation(a) * b
        else:
            h = self.config.activation(h)
        return h @ self.w2[slot]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # One gather of all (row, slot) pairs in slot order, one GEMM pair per slot on its contiguous
        # chunk, one weighted scatter-add back to rows (no per-slot copies of the output).
        slot_of, row_of = mask.t().nonzero(as_tuple=True)  # grouped by slot, rows ascending
        counts = mask.sum(dim=0).tolist()
        xs = x.index_select(0, row_of).split(counts)
        y = torch.cat([self.expert(slot, chunk) for slot, chunk in enumerate(xs)])
        w = weights[row_of, slot_of].to(y.dtype).unsqueeze(1)
        return x.new_zeros(x.shape).index_add(0, row_of, y * w)
