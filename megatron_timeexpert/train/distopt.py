"""megatron's DistributedOptimizer in our checkpoints (``training.distributed_optimizer=true``).

Two things the checkpoint code needs beyond megatron's defaults (megatron-core 0.16.1):

- :func:`checkpoint_metadata`: the format of the optimizer state. 'fully_reshardable' stores each
  parameter's fp32 main weight and Adam moments in the parameter's own shape under its global
  name, so a checkpoint loads at any (TP, PP, EP, DP) layout. megatron's default,
  'fully_sharded_model_space', writes flattened ShardedTensors, which 0.16.1's own save rejects
  ("ShardedTensor.flattened_range is not supported"); 'dp_reshardable' reshards only along data
  parallelism. ``mem_efficient``: the data-parallel shards are gathered to DP rank 0 over megatron's
  gloo data-parallel group; the other path all-gathers CUDA copies (``Tensor.cuda()``), impossible
  on CPU. Collective over each data-parallel group at save.
- :func:`ensure_state`: a DistributedOptimizer that has not stepped yet cannot describe its state
  with torch's Adam (no transformer-engine or apex): ``state_dict()`` reads the step from the
  per-parameter Adam state and asserts there is exactly one, so neither a load into a fresh
  optimizer nor a save before the first step (``training.train_steps=0``) works. We give every
  shard the state a fresh torch Adam creates on its first step (step 0, zero moments): saving it
  is saving a fresh optimizer, and a load overwrites all of it. No communication; the weights are
  not touched.
"""

from __future__ import annotations

from typing import Any

import torch


def checkpoint_metadata() -> dict[str, Any]:
    """``metadata`` for ``optimizer.sharded_state_dict`` (the plain optimizers ignore it)."""
    return {"distrib_optim_sharding_type": "fully_reshardable", "distrib_optim_fully_reshardable_mem_efficient": True}


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [p for p in parts if isinstance(p, DistributedOptimizer)]


@torch.no_grad()
def ensure_state(optimizer) -> None:
    """Give each DistributedOptimizer inside ``optimizer`` that has no Adam state yet a fresh one
    (step 0, zero moments per main-weight shard), so that megatron can build its state dict."""
    for dist_opt in _distributed_optimizers(optimizer):
        inner = dist_opt.optimizer
        if len(inner.state) > 0 or not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
