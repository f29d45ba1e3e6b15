"""Variable-k all-to-all token dispatcher: one copy of a token per destination EP rank.

Who owns what: every rank of the expert-parallel (EP) group owns its own tokens (the ``T`` rows of
its ``hidden [T, H]``) and the experts in its local slots (see :mod:`parallel.placement`). A token
may fire 0..E_max experts. Dispatch sends each token ONCE to each EP rank that hosts at least one of
its experts (not once per expert), together with the token's weights for that rank's local slots
and a mask of which local slots it fired. The receiving rank runs every local expert the token
chose and sums their weighted outputs; combine sends ONE partial sum per (token, rank) back to the
token's rank, where the partial sums are added.

Communication, all on the EP group (``G = ep_size`` ranks; ``N_send``/``N_recv`` = rows this rank
sends/receives; a token that stays on its own rank is copied locally by the collective):

1. :meth:`VariableKDispatcher.plan`: ``all_to_all_single`` of an int64 tensor ``[G]`` (one count
   per peer: 8 bytes to each rank), then ``.tolist()`` (one host sync) to get the split sizes.
2. :meth:`VariableKDispatcher.dispatch`: ``all_to_all_single`` with input splits ``send_splits`` and
   output splits ``recv_splits`` of ``[N, H + 2 * slots_per_rank]`` rows (hidden, weights, mask as
   0/1 packed into one payload) when hidden and weights share a dtype; otherwise two calls, one for
   ``[N, H]`` hidden and one for ``[N, 2 * slots_per_rank]`` weights+mask in the weights' dtype.
   Backward: the same collective(s) with the splits swapped.
3. :meth:`VariableKDispatcher.combine`: ``all_to_all_single`` of ``[N_recv, H]`` partial sums with
   the splits swapped (``recv_splits`` in, ``send_splits`` out); backward swaps them back.

So a training step moves, per rank and layer, ``2 x`` (forward + backward) the hidden rows of the
deduplicated lower bound ``sum_t |remote ranks hosting t's experts| * H * elem_size``, plus
``2 * slots_per_rank`` weight/mask values per row and ``G`` counts.

gloo on CPU (torch 2.13): ``dist.all_to_all_single`` with uneven splits works when the split sizes
are Python lists of ints (tensor split sizes are rejected by the gloo binding), and zero-sized
splits and zero-row tensors work, so no padding or all_gather fallback is needed: this module always
passes lists. There is no autograd for ``dist.all_to_all_single`` outside the deprecated
``torch.distributed.nn``, so :class:`_AllToAllSingle` implements it.

Every rank of the group must call plan, dispatch and combine the same number of times, also a rank
with no tokens or no fired experts (its splits are zero; it still enters each collective). In
backward, every rank's outputs must require grad alike (they do in training), or the ranks that
skip the backward collective leave the others waiting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.placement import ExpertPlacement


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


class _AllToAllSingle(torch.autograd.Function):
    """``all_to_all_single`` on dim 0 with Python-list split sizes; backward swaps the splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group):  # noqa: D102
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _a2a(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return _a2a(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def _a2a(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all of the rows of ``x`` (identity on a group of one).

    ``send_splits[r]`` consecutive rows go to rank ``r``; ``recv_splits[r]`` rows arrive from rank
    ``r``, stacked in rank order. Collective: one ``all_to_all_single`` on ``group`` in forward and
    one in backward.
    """
    if _group_size(group) == 1:
        return x
    return _AllToAllSingle.apply(x, list(send_splits), list(recv_splits), group)


def exchange_counts(send_counts: torch.Tensor, group) -> list[int]:
    """Tell every peer how many rows it will receive from us; return what we receive from each.

    Collective: one ``all_to_all_single`` of ``[G]`` int64 on ``group`` (8 bytes per peer), then a
    host sync (``tolist``) because split sizes must be known on the host.
    """
    if _group_size(group) == 1:
        return send_counts.tolist()
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts.contiguous(), group=group)
    return recv.tolist()


@dataclass
class DispatchPlan:
    """Which local token goes to which EP rank, and the split sizes of the exchange.

    Built by :meth:`VariableKDispatcher.plan` (after its count exchange); consumed by dispatch and
    combine of the same forward.
    """

    send_token_index: torch.Tensor
    """``[N_send]`` long: local token ids in send order (grouped by destination rank, ascending)."""
    send_dest: torch.Tensor
    """``[N_send]`` long: destination EP rank of each sent row."""
    send_splits: list[int]
    """Rows sent to each EP rank (``[G]``, includes the local copy at index ``ep_rank``)."""
    recv_splits: list[int]
    """Rows received from each EP rank (``[G]``)."""
    num_tokens: int
    """T, the number of local tokens (rows of the combine output)."""
    ep_rank: int
    """This rank's index in the EP group."""

    @property
    def remote_rows_sent(self) -> int:
        """Rows that leave this rank (the local copy excluded)."""
        return sum(self.send_splits) - self.send_splits[self.ep_rank]

    @property
    def remote_rows_received(self) -> int:
        """Rows that arrive from other ranks."""
        return sum(self.recv_splits) - self.recv_splits[self.ep_rank]


@dataclass
class DispatchedTokens:
    """What an EP rank receives: one row per (token, this rank), from any source rank."""

    hidden: torch.Tensor
    """``[N_recv, H]`` token activations."""
    weights: torch.Tensor
    """``[N_recv, slots_per_rank]`` router weight of each local slot (0 where not fired)."""
    mask: torch.Tensor
    """``[N_recv, slots_per_rank]`` bool, which local slots the token fired."""


@dataclass
class CommBytes:
    """Bytes this rank moved over the EP group in one forward (local copies excluded)."""

    dispatch_sent: int = 0
    """Hidden-state payload sent by dispatch (the deduplicated lower bound when exact)."""
    dispatch_received: int = 0
    """Hidden-state payload received by dispatch."""
    meta_sent: int = 0
    """Weights + mask values sent alongside the hidden states, plus the split counts."""
    meta_received: int = 0
    """Weights + mask values and split counts received."""
    combine_sent: int = 0
    """Partial sums sent back by combine."""
    combine_received: int = 0
    """Partial sums received by combine."""


class VariableKDispatcher:
    """Dispatch/combine for variable-k routing over an EP group, driven by an :class:`ExpertPlacement`.

    Args:
        placement: the logical -> (rank, slot) map (identical on every rank); read at each call, so
            installing a new map takes effect at the next forward.
        group: the expert-parallel process group (``None``: a single rank, no communication).
    """

    def __init__(self, placement: ExpertPlacement, group: dist.ProcessGroup | None):
        self.placement = placement
        self.group = group
        if _group_size(group) != placement.ep_size:
            raise ValueError(f"EP group has {_group_size(group)} ranks but placement has ep_size={placement.ep_size}")
        self.ep_rank = _group_rank(group)

    def _physical(self, per_logical: torch.Tensor) -> torch.Tensor:
        t = per_logical.shape[0]
        return self.placement.to_physical(per_logical).view(t, self.placement.ep_size, self.placement.slots_per_rank)

    def plan(self, routing_map: torch.Tensor) -> DispatchPlan:
        """Decide destinations from ``routing_map [T, E_max]`` and exchange counts (collective 1)."""
        hits = self._physical(routing_map.bool()).any(dim=-1)  # [T, G]: token t needs rank r
        dest, token = hits.t().nonzero(as_tuple=True)  # row-major: grouped by rank, tokens ascending
        send_counts = hits.sum(dim=0, dtype=torch.long)
        recv_splits = exchange_counts(send_counts, self.group)
        return DispatchPlan(
            send_token_index=token,
            send_dest=dest,
            send_splits=send_counts.tolist(),
            recv_splits=recv_splits,
            num_tokens=routing_map.shape[0],
            ep_rank=self.ep_rank,
        )

    def dispatch(
        self, hidden: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor, plan: DispatchPlan
    ) -> tuple[DispatchedTokens, CommBytes]:
        """Send each token once to each rank hosting one of its experts (collective 2).

        ``hidden [T, H]``, ``probs`` and ``routing_map`` ``[T, E_max]`` over logical ids. Returns the
        rows this rank received and the bytes moved. Differentiable w.r.t. ``hidden`` and ``probs``.
        """
        slots = self.placement.slots_per_rank
        idx, dest = plan.send_token_index, plan.send_dest
        x = hidden.index_select(0, idx)
        w = self._physical(probs)[idx, dest]  # [N_send, slots]
        m = self._physical(routing_map.bool())[idx, dest]
        h = hidden.shape[1]
        rows_out, rows_in = plan.remote_rows_sent, plan.remote_rows_received
        count_bytes = 8 * (len(plan.send_splits) - 1) if self.group is not None else 0
        if hidden.dtype == probs.dtype:
            payload = torch.cat([x, w, m.to(w.dtype)], dim=1)
            got = all_to_all(payload, plan.send_splits, plan.recv_splits, self.group)
            x_r, w_r, m_r = got.split([h, slots, slots], dim=1)
        else:
            x_r = all_to_all(x, plan.send_splits, plan.recv_splits, self.group)
            meta = all_to_all(torch.cat([w, m.to(w.dtype)], dim=1), plan.send_splits, plan.recv_splits, self.group)
            w_r, m_r = meta.split([slots, slots], dim=1)
        nbytes = CommBytes(
            dispatch_sent=rows_out * h * hidden.element_size(),
            dispatch_received=rows_in * h * hidden.element_size(),
            meta_sent=rows_out * 2 * slots * probs.element_size() + count_bytes,
            meta_received=rows_in * 2 * slots * probs.element_size() + count_bytes,
        )
        return DispatchedTokens(hidden=x_r, weights=w_r, mask=m_r > 0.5), nbytes

    def combine(self, partial: torch.Tensor, plan: DispatchPlan, nbytes: CommBytes | None = None) -> torch.Tensor:
        """Return each received row's partial sum to its token's rank and add them (collective 3).

        ``partial [N_recv, H]`` in received order -> ``[T, H]`` local output (rows of tokens that
        fired no expert are 0). Differentiable. Fills ``nbytes.combine_*`` when given.
        """
        back = all_to_all(partial, plan.recv_splits, plan.send_splits, self.group)
        if nbytes is not None:
            row = partial.shape[1] * partial.element_size()
            nbytes.combine_sent = plan.remote_rows_received * row
            nbytes.combine_received = plan.remote_rows_sent * row
        out = back.new_zeros((plan.num_tokens, back.shape[1]))
        return out.index_add(0, plan.send_token_index, back)
