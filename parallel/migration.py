"""Moving experts between expert-parallel ranks: every tensor keyed to a slot moves with it.

    moved = migrate_slots(old_map, new_map, slot_tensors, slots_per_rank, ep_group)

DESIGN contracts 2, 4 and 6. An EP group of ``ep_size`` ranks holds ``E = ep_size * slots_per_rank``
physical slots; logical expert ``e`` lives in physical slot ``map[e]`` (rank ``map[e] //
slots_per_rank``, local slot ``map[e] % slots_per_rank``). Installing a new map means moving, for
every expert whose slot changes, the rows of EVERY tensor keyed to slots on this rank: the expert
weights and everything an optimizer keeps for them (both Adam moments, an fp32 master copy, a
per-slot step, ...). The caller lists those tensors (``slot_tensors``, each ``[slots_per_rank, ...]``
on this rank, any dtype, contiguous); shapes never change, rows are overwritten in place, so
megatron's gradient buffers and optimizer parameter groups stay valid.

Communication: ONE ``all_to_all_single`` over ``ep_group`` per call (one call per layer), of raw
bytes: every rank sends, to each other rank, the rows of the experts that move there, all tensors
of a slot packed into one row, in logical-id order (every rank knows both maps, so receivers know
where each row goes). Experts that change slot within a rank are copied locally; experts that keep
their slot cost nothing. Bytes sent per moved expert = the bytes of its rows in all slot tensors,
no more. Every rank of ``ep_group`` must call this with the same maps at the same point.
No knowledge of gating or of the model: ranks, slots and bytes only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class MigrationStats:
    """What one :func:`migrate_slots` call did on this rank."""

    moved_experts: int
    """Experts whose physical slot changed (the same number on every rank)."""
    remote_experts: int
    """Of those, experts that changed EP rank."""
    bytes_sent: int
    """Bytes this rank sent to other ranks."""
    bytes_received: int
    """Bytes this rank received."""
    bytes_per_expert: int
    """Bytes of one expert's rows over all slot tensors (weights + optimizer state)."""


def _check(old_map: torch.Tensor, new_map: torch.Tensor, num_slots: int) -> None:
    for name, m in (("old_map", old_map), ("new_map", new_map)):
        if m.shape != (num_slots,) or not torch.equal(torch.sort(m.cpu()).values, torch.arange(num_slots)):
            raise ValueError(f"{name} must be a permutation of 0..{num_slots - 1}, got {m.tolist()}")


def _row_widths(slot_tensors: list[torch.Tensor], slots: int) -> list[int]:
    """Bytes of one slot's row of each tensor."""
    widths = []
    for t in slot_tensors:
        if t.shape[0] != slots:
            raise ValueError(f"slot tensor of shape {tuple(t.shape)} does not have {slots} slots on dim 0")
        widths.append(t[0].numel() * t.element_size())
    return widths


def _pack(slot_tensors: list[torch.Tensor], slots: int, rows: list[int]) -> torch.Tensor:
    """``[len(rows), bytes]`` uint8 on the CPU: the given local slots' rows of all tensors, side by
    side (a copy of only the slots that move)."""
    if not rows:
        return torch.zeros(0, sum(_row_widths(slot_tensors, slots)), dtype=torch.uint8)
    parts = []
    for t in slot_tensors:
        picked = t.detach()[torch.tensor(rows, device=t.device)].contiguous()
        b = picked.reshape(len(rows), -1).view(torch.uint8).reshape(len(rows), -1)
        parts.append(b.cpu() if b.device.type != "cpu" else b)
    return torch.cat(parts, dim=1)


def _unpack_into(slot_tensors: list[torch.Tensor], slot: int, row: torch.Tensor, widths: list[int]) -> None:
    offset = 0
    with torch.no_grad():
        for t, w in zip(slot_tensors, widths):
            src = row[offset : offset + w].clone().view(t.dtype).reshape(t.shape[1:])  # clone: aligned storage
            t[slot].copy_(src.to(t.device))
            offset += w


def migrate_slots(
    old_map: torch.Tensor,
    new_map: torch.Tensor,
    slot_tensors: list[torch.Tensor],
    slots_per_rank: int,
    ep_group: dist.ProcessGroup | None,
) -> MigrationStats:
    """Rewrite this rank's rows of ``slot_tensors`` so that slot contents follow ``new_map`` (module docstring)."""
    ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
    me = 0 if ep_group is None else dist.get_rank(ep_group)
    num_slots = ep_size * slots_per_rank
    old_map, new_map = old_map.cpu().long(), new_map.cpu().long()
    _check(old_map, new_map, num_slots)
    widths = _row_widths(slot_tensors, slots_per_rank)
    row_bytes = sum(widths)
    sends: list[list[int]] = [[] for _ in range(ep_size)]  # local source slots, per destination rank
    recvs: list[list[int]] = [[] for _ in range(ep_size)]  # local destination slots, per source rank
    local: list[tuple[int, int]] = []
    moved = remote = 0
    for e in range(num_slots):  # logical-id order: senders and receivers agree on the row order
        src, dst = int(old_map[e]), int(new_map[e])
        if src == dst:
            continue
        moved += 1
        src_rank, src_slot = divmod(src, slots_per_rank)
        dst_rank, dst_slot = divmod(dst, slots_per_rank)
        remote += src_rank != dst_rank
        if src_rank == me and dst_rank == me:
            local.append((src_slot, dst_slot))
        elif src_rank == me:
            sends[dst_rank].append(src_slot)
        elif dst_rank == me:
            recvs[src_rank].append(dst_slot)
    send_rows = [s for per_rank in sends for s in per_rank]
    # One copy of every row that leaves its slot (sent or moved locally), taken before any row is
    # overwritten; rows that stay are never copied.
    packed = _pack(slot_tensors, slots_per_rank, send_rows + [s for s, _ in local])
    send_buf = packed[: len(send_rows)].reshape(-1)
    recv_counts = [len(r) * row_bytes for r in recvs]
    recv_buf = packed.new_empty(sum(recv_counts))
    if ep_size > 1:
        dist.all_to_all_single(
            recv_buf,
            send_buf,
            output_split_sizes=recv_counts,
            input_split_sizes=[len(s) * row_bytes for s in sends],
            group=ep_group,
        )
    received = recv_buf.reshape(-1, row_bytes) if row_bytes else recv_buf.reshape(0, 0)
    for i, dst_slot in enumerate(s for per_rank in recvs for s in per_rank):
        _unpack_into(slot_tensors, dst_slot, received[i], widths)
    for i, (_, dst_slot) in enumerate(local):
        _unpack_into(slot_tensors, dst_slot, packed[len(send_rows) + i], widths)
    return MigrationStats(
        moved_experts=moved,
        remote_experts=remote,
        bytes_sent=len(send_rows) * row_bytes,
        bytes_received=sum(recv_counts),
        bytes_per_expert=row_bytes,
    )
