"""The trainer's side of expert migration: which tensors are keyed to an MoE layer's slots, and
installing a new placement map with all of them moved (parallel/migration.py does the exchange).

    stats = install_placement(layer, optimizer, new_map)     # every rank of the stage, same new_map

For each expert weight tensor of the layer (``experts.w1``, ``experts.w2``, ``[slots, ...]``), the
slot-keyed tensors are the weight itself and what megatron's optimizer keeps for it: the fp32 main
copy (``training.precision=bf16``) and every optimizer-state tensor with a slot axis (Adam's
``exp_avg`` and ``exp_avg_sq``), plus every buffer of ``experts`` with a slot axis: the per-slot Adam
step base ``experts.slot_step_base`` (train/slot_adam.py). Adam's own ``step`` is one scalar per
parameter tensor, shared by all its slots (the same on every EP rank): it does not move; each
slot's own step is that minus its base, which moves with the slot.
megatron's gradient buffers are not moved: migration runs between optimizer steps, after which
they are zeroed before the next backward.

Supported: megatron's plain optimizers (fp32 ``FP32Optimizer``, bf16 ``Float16OptimizerWithFloat16Params``,
inside a ``ChainedOptimizer`` or not). The distributed optimizer keeps slot state in flat shards of
its buffers; moving those is not implemented yet and raises ``NotImplementedError`` naming it.

Communication: one ``all_to_all_single`` over the layer's EP group per call (parallel/migration.py).
"""

from __future__ import annotations

import torch

from parallel.migration import MigrationStats, migrate_slots


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _main_param(sub, param: torch.Tensor) -> torch.Tensor:
    """The tensor ``sub``'s inner torch optimizer updates for model parameter ``param``."""
    if type(sub).__name__ == "DistributedOptimizer":
        raise NotImplementedError(
            "moving experts under training.distributed_optimizer=true is not implemented yet: its slot "
            "state lives in flat shards of the optimizer's buffers"
        )
    for model_group, main_group in zip(
        getattr(sub, "float16_groups", []), getattr(sub, "fp32_from_float16_groups", [])
    ):
        for model_p, main_p in zip(model_group, main_group):
            if model_p is param:
                return main_p
    return param


def slot_tensors(layer, optimizer) -> list[torch.Tensor]:
    """Every tensor keyed to ``layer``'s expert slots on this rank (module docstring), slot axis first."""
    slots = layer.placement.slots_per_rank
    out: list[torch.Tensor] = []
    for param in layer.experts.parameters():
        out.append(param.data)
        for sub in _sub_optimizers(optimizer):
            inner = getattr(sub, "optimizer", None)
            if inner is None:
                continue
            main = _main_param(sub, param)
            owned = any(main is p for group in inner.param_groups for p in group["params"])
            if not owned:
                continue
            if main is not param:
                out.append(main.data)
            for value in inner.state.get(main, {}).values():
                if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == slots:
                    out.append(value)
    out += [b for b in layer.experts.buffers() if b.dim() >= 1 and b.shape[0] == slots]
    return out


def slot_row_bytes(layer, optimizer) -> int:
    """Bytes that move with one expert of ``layer``: one slot row of every slot-keyed tensor."""
    return sum(t[0].numel() * t.element_size() for t in slot_tensors(layer, optimizer))


def install_placement(layer, optimizer, new_map: torch.Tensor) -> MigrationStats:
    """Move ``layer``'s experts (weights and optimizer state) to ``new_map`` and install it.

    Collective over the layer's EP group; every rank of the stage must call it with the same map."""
    stats = migrate_slots(
        layer.placement.logical_to_physical,
        new_map,
        slot_tensors(layer, optimizer),
        layer.placement.slots_per_rank,
        layer.ep_group,
    )
    layer.placement.set_map(new_map)
    return stats
