"""Layer norm for the torch (no apex, no transformer-engine) path that works with sequence parallel.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel=True``. A norm is correct under
sequence parallelism as long as its parameters' gradients are summed over the tensor-parallel
group after backward: megatron's ``finalize_model_grads`` does that for every parameter tagged
``sequence_parallel = True``. This module builds the torch norm and sets that tag. No
communication of its own.
"""

from __future__ import annotations

import torch


class SequenceParallelTorchNorm:
    """Factory with megatron's norm signature returning ``torch.nn.LayerNorm`` / ``RMSNorm``."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"model.normalization={config.normalization!r}: use 'LayerNorm' or 'RMSNorm'")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm
