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
inside a ``ChainedOptimizer`` or not) and its distributed optimizer (``training.distributed_optimizer``).
The distributed optimizer keeps each expert weight's fp32 main copy (bf16; under fp32 the main copy
IS the model weight, a view of it, and moves with it) and Adam moments as flat shards, one
contiguous element range of the weight per expert-data-parallel rank; a shard's range cuts across
slots. :func:`install_placement` therefore gathers each such state tensor to its full ``[slots, ...]``
shape (one ``all_reduce`` of the zero-padded shards over the expert-data-parallel group per tensor),
moves its rows with the weights, and every rank takes its range back. That costs the gather on top
of the exchange; a range-aware exchange could move only the rows' pieces (not done).

Communication: one ``all_to_all_single`` over the layer's EP group per call (parallel/migration.py);
with the distributed optimizer also one ``all_reduce`` per sharded state tensor over the
expert-data-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.migration import MigrationStats, migrate_slots


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def is_distributed(sub) -> bool:
    return type(sub).__name__ == "DistributedOptimizer"


def _main_param(sub, param: torch.Tensor) -> torch.Tensor:
    """The tensor plain optimizer ``sub``'s inner torch optimizer updates for model parameter ``param``."""
    for model_group, main_group in zip(
        getattr(sub, "float16_groups", []), getattr(sub, "fp32_from_float16_groups", [])
    ):
        for model_p, main_p in zip(model_group, main_group):
            if model_p is param:
                return main_p
    return param


@dataclass
class ShardedSlotState:
    """One slot-keyed state tensor of the distributed optimizer for one model parameter, on this rank."""

    kind: str
    """``exp_avg``, ``exp_avg_sq`` or ``param`` (the fp32 main copy of a bf16 weight)."""
    shard: torch.Tensor | None
    """This rank's flat shard (None: this rank holds no element of the parameter)."""
    start: int
    end: int
    """The shard's element range in the flattened parameter."""
    group: dist.ProcessGroup
    """The distributed optimizer's (expert-)data-parallel group."""
    numel: int
    """Elements of the whole parameter."""
    device: torch.device


def distributed_part(optimizer, param: torch.Tensor):
    """The DistributedOptimizer part of megatron's ``optimizer`` whose buffers hold ``param``, or None."""
    for sub in _sub_optimizers(optimizer):
        # model_param_gbuf_map holds only the parameters with a shard on this rank; the buffers hold all.
        if is_distributed(sub) and any(param in buf.param_index_map for buf in sub.buffers):
            return sub
    return None


def shard_of(sub, param: torch.Tensor) -> tuple[dict[str, torch.Tensor], int, int] | None:
    """``({kind: flat shard}, start, end)`` of ``param`` in DistributedOptimizer ``sub`` on this rank
    (kinds: ``param`` = the main copy, plus the Adam state that exists), or None without a shard."""
    if param not in sub.model_param_group_index_map:
        return None
    rng = sub._get_model_param_range_map(param)["param"]
    group_index, group_order = sub.model_param_group_index_map[param]
    main = sub.optimizer.param_groups[group_index]["params"][group_order]
    # .get: the inner optimizer's state is a defaultdict; indexing it would insert an empty entry that
    # megatron's state_dict() then rejects (no "step") before the first step.
    tensors = {"param": main, **sub.optimizer.state.get(main, {})}
    flat = {k: v for k, v in tensors.items() if torch.is_tensor(v) and v.numel() == rng.end - rng.start}
    return flat, int(rng.start), int(rng.end)


def sharded_slot_states(layer, optimizer) -> list[ShardedSlotState]:
    """The distributed optimizer's state keyed to ``layer``'s slots, in the same order on every rank
    (empty under the plain optimizers). No communication."""
    out: list[ShardedSlotState] = []
    for param in layer.experts.parameters():
        sub = distributed_part(optimizer, param)
        if sub is None:
            continue
        found = shard_of(sub, param)
        flat, start, end = found if found is not None else ({}, 0, 0)
        kinds = ["exp_avg", "exp_avg_sq"]
        if param.dtype != torch.float32:
            kinds.append("param")  # bf16: a separate fp32 main copy (fp32: a view of the weight itself)
        for kind in kinds:
            state = ShardedSlotState(
                kind, flat.get(kind), start, end, sub.data_parallel_group, param.numel(), param.device
            )
            out.append(state)
    return out


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
            if is_distributed(sub):
                continue  # flat shards: see sharded_slot_states / install_placement
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
    """Bytes that move with one expert of ``layer``: one slot row of every slot-keyed tensor (with
    the distributed optimizer, its gathered fp32 state tensors count whole rows too)."""
    spr = layer.placement.slots_per_rank
    local = sum(t[0].numel() * t.element_size() for t in slot_tensors(layer, optimizer))
    return local + sum(4 * st.numel // spr for st in sharded_slot_states(layer, optimizer))


def gather_full(st: ShardedSlotState) -> torch.Tensor:
    """The whole flat fp32 tensor of a sharded state on every rank of its group: each rank writes its
    range into zeros, one ``all_reduce(SUM)`` (the ranges partition the parameter)."""
    full = torch.zeros(st.numel, dtype=torch.float32, device=st.device)
    if st.shard is not None:
        full[st.start : st.end].copy_(st.shard.reshape(-1))
    if dist.is_initialized() and dist.get_world_size(st.group) > 1:
        dist.all_reduce(full, group=st.group)
    return full


def install_placement(layer, optimizer, new_map: torch.Tensor) -> MigrationStats:
    """Move ``layer``'s experts (weights and optimizer state) to ``new_map`` and install it.

    Collective over the layer's EP group (and, with the distributed optimizer, its
    expert-data-parallel group); every rank of the stage must call it with the same map."""
    spr = layer.placement.slots_per_rank
    tensors = slot_tensors(layer, optimizer)
    gathered = []
    for st in sharded_slot_states(layer, optimizer):
        gathered.append((st, gather_full(st)))
    tensors += [full.view(spr, -1) for _, full in gathered]
    stats = migrate_slots(layer.placement.logical_to_physical, new_map, tensors, spr, layer.ep_group)
    with torch.no_grad():
        for st, full in gathered:
            if st.shard is not None:
                st.shard.view(-1).copy_(full[st.start : st.end])
    layer.placement.set_map(new_map)
    return stats
