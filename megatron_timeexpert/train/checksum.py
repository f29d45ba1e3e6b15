"""Layout-independent checksums of a run's whole state: every parameter, buffer and optimizer-state
tensor, by its GLOBAL name (the key megatron's distributed checkpoint stores it under).

    sums = state_checksums(trainer.models, trainer.optimizer)   # collective over all ranks
    # {"decoder.layers.mlp.experts.w1": Checksum(...), "optimizer.state.exp_avg.decoder...": ...}

Each global tensor gets two numbers: ``weighted`` = sum over its elements of ``w(i) * x_i``, with a
fixed pseudo-random weight ``w(i)`` in [1, 2) of the element's flat index ``i`` in the GLOBAL tensor,
and ``abs_sum`` = sum of ``|x_i|``. Every rank adds up the elements of the shards it holds as the main
replica (megatron's ``replica_id`` all zeros), and one ``all_gather_object`` sums them per name, so
the numbers do not depend on how the tensor is sharded or replicated: two runs at different
(TP, PP, EP) layouts that reach the same state give the same checksums up to floating-point
reordering, and a permutation of elements, a scaled slice or a missing shard changes them.
``weighted`` is what compares; ``abs_sum`` sets the tolerance scale (a weighted sum near zero by
cancellation has no relative precision of its own).

Expert slots are checkpointed by PHYSICAL slot (with the placement map beside them, see
moe/spec.py); their checksums index the slot axis by the LOGICAL expert each slot hosts (the
inverse of that layer's map), so two runs that hold the same experts in different slots, or on
different ranks, agree. The map itself is checksummed as stored.

Communication: one ``all_gather_object`` over the default group (every rank must call it). Used by the
invariance tests to compare runs far more sharply than losses do: Adam's update is invariant to the
scale of a parameter's gradient, so a doubled gradient barely moves a loss but doubles that
parameter's first moment.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_timeexpert.train import checkpoint as ckpt

_CHAINED = re.compile(r"^chained_\d+\.")


@dataclass(frozen=True)
class Checksum:
    """Two sums of one global tensor (module docstring)."""

    weighted: float
    abs_sum: float
    numel: int

    def close_to(self, other: Checksum, rtol: float) -> bool:
        """Equal within ``rtol`` of the tensor's absolute sum (and the same number of elements)."""
        scale = max(self.abs_sum, other.abs_sum, 1e-30)
        return self.numel == other.numel and abs(self.weighted - other.weighted) <= rtol * scale


def _weights(flat_index: torch.Tensor) -> torch.Tensor:
    """Pseudo-random weights in [1, 2) of global flat indices (float64, deterministic)."""
    return 1.0 + ((flat_index * 40503 + 7) % 65521).to(torch.float64) / 65521.0


def _global_flat_index(st, slot_to_logical: torch.Tensor | None = None) -> torch.Tensor:
    """Global row-major flat index of every element of a ShardedTensor's local data; with
    ``slot_to_logical`` the first non-prepended axis (expert slots) is indexed by logical expert."""
    gshape = st.global_shape
    offsets = st.global_offset
    k = st.prepend_axis_num
    # Index along each global axis of the local block (prepended axes hold one position each).
    axes = [torch.tensor([offsets[a]]) for a in range(k)]
    axes += [torch.arange(n) + offsets[k + a] for a, n in enumerate(st.local_shape)]
    if slot_to_logical is not None:
        axes[k] = slot_to_logical[axes[k]]
    flat = torch.zeros([len(a) for a in axes], dtype=torch.int64)
    stride = 1
    for a in reversed(range(len(gshape))):
        shape = [1] * len(gshape)
        shape[a] = len(axes[a])
        flat = flat + axes[a].view(shape) * stride
        stride *= gshape[a]
    return flat.reshape(-1)


def _walk(obj: Any, out: list) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(obj, ShardedTensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v, out)


def _expert_slot_maps(models: list[torch.nn.Module]) -> dict[int, torch.Tensor]:
    """Global layer index (0-based) -> physical slot -> logical expert, for this rank's MoE layers."""
    out = {}
    for model in models:
        for m in model.modules():
            placement = getattr(m, "placement", None)
            if placement is not None and hasattr(m, "experts") and hasattr(m, "layer_number"):
                out[m.layer_number - 1] = placement.physical_to_logical().cpu()
    return out


def _is_expert_slot_tensor(key: str) -> bool:
    """Weights, their optimizer state and every buffer of ``experts`` (the per-slot Adam step base)."""
    return ".mlp.experts." in key or key.startswith("mlp.experts.")


def local_partial_sums(
    state: dict[str, Any], expert_maps: dict[int, torch.Tensor] | None = None
) -> dict[str, list[float]]:
    """This rank's ``[weighted, abs_sum, numel]`` per global name, over its main-replica shards
    (``expert_maps``: global layer index -> slot -> logical expert, for the expert slot tensors)."""
    from megatron.core.dist_checkpointing.mapping import is_main_replica

    tensors: list = []
    _walk(state, tensors)
    out: dict[str, list[float]] = {}
    for st in tensors:
        if st.data is None or not is_main_replica(st.replica_id):
            continue
        x = st.data.detach().to("cpu", torch.float64).reshape(-1)
        slot_map = None
        if expert_maps and _is_expert_slot_tensor(st.key) and st.prepend_axis_num >= 1:
            slot_map = expert_maps.get(st.global_offset[0])
        w = _weights(_global_flat_index(st, slot_map))
        acc = out.setdefault(st.key, [0.0, 0.0, 0])
        acc[0] += float((w * x).sum())
        acc[1] += float(x.abs().sum())
        acc[2] += x.numel()
    return out


def state_checksums(models: list[torch.nn.Module], optimizer=None) -> dict[str, Checksum]:
    """Checksums of every model tensor and (with ``optimizer``) every optimizer-state tensor, by
    global name, identical on every rank. Collective (one all_gather_object over all ranks)."""
    model_sd = ckpt.model_sharded_state(models)
    state: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        state["optimizer"] = ckpt.optimizer_sharded_state(optimizer, model_sd)
    local: dict[str, list[float]] = {}
    for key, acc in local_partial_sums(state, _expert_slot_maps(models)).items():
        # megatron prefixes the keys of a ChainedOptimizer's parts ("chained_1.optimizer..."), and how
        # many parts there are depends on the layout (dense and expert-parallel params split or not).
        local[_CHAINED.sub("", key)] = acc
    gathered: list[dict[str, list[float]]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    total: dict[str, list[float]] = {}
    for part in gathered:
        for key, (ws, ab, n) in part.items():
            acc = total.setdefault(key, [0.0, 0.0, 0])
            acc[0] += ws
            acc[1] += ab
            acc[2] += n
    return {k: Checksum(v[0], v[1], int(v[2])) for k, v in sorted(total.items())}


def compare_checksums(got: dict[str, Checksum], want: dict[str, Checksum], rtol: float) -> list[str]:
    """Names whose checksums differ (or exist in one run only), with both values; empty if all match."""
    bad = []
    for key in sorted(set(got) | set(want)):
        a, b = got.get(key), want.get(key)
        if a is None or b is None:
            bad.append(f"{key}: only in {'the reference' if a is None else 'this run'}")
        elif not a.close_to(b, rtol) or not (math.isfinite(a.weighted) and math.isfinite(b.weighted)):
            bad.append(f"{key}: {a.weighted!r} != {b.weighted!r} (abs sum {b.abs_sum:.6g}, numel {b.numel})")
    return bad
