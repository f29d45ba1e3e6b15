"""VariableKDispatcher on gloo: uneven splits, empty ranks, k = 0 tokens, autograd both ways.

With identity "experts" (each received row returns ``sum of its local weights * x``), dispatch +
combine must give ``y_t = (sum_e probs[t, e]) * x_t`` for every token, whatever the placement.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.dispatch import VariableKDispatcher, all_to_all
from parallel.placement import ExpertPlacement
from parallel.testing import run_distributed

H, SLOTS = 4, 2


def _dispatch_identity(tokens_per_rank: list[int]) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    e_max = world * SLOTS
    g = torch.Generator().manual_seed(100 + rank)
    t = tokens_per_rank[rank]
    x = torch.randn(t, H, generator=g, dtype=torch.float64, requires_grad=True)
    routing = torch.rand(t, e_max, generator=g) > 0.6
    if t:
        routing[0] = False  # a k = 0 token
    # Nobody routes to the experts of the last rank: it receives nothing.
    placement = ExpertPlacement(world, SLOTS, torch.arange(e_max).flip(0))  # reversed map
    for e in range(e_max):
        if placement.expert_rank()[e] == world - 1:
            routing[:, e] = False
    probs_leaf = torch.rand(t, e_max, generator=g, dtype=torch.float64, requires_grad=True)
    probs = probs_leaf * routing
    disp = VariableKDispatcher(placement, dist.group.WORLD)
    plan = disp.plan(routing)
    got, nbytes = disp.dispatch(x, probs, routing, plan)
    partial = got.hidden * (got.weights * got.mask).sum(1, keepdim=True)
    y = disp.combine(partial, plan, nbytes)
    gout = torch.randn(t, H, generator=g, dtype=torch.float64)
    (y * gout).sum().backward()
    expect = probs.detach().sum(1, keepdim=True) * x.detach()
    return {
        "y_err": (y.detach() - expect).abs().max().item() if t else 0.0,
        "dx_err": (x.grad - probs.detach().sum(1, keepdim=True) * gout).abs().max().item() if t else 0.0,
        "dp_err": (probs_leaf.grad - routing * (x.detach() * gout).sum(1, keepdim=True)).abs().max().item()
        if t
        else 0.0,
        "recv_rows": sum(plan.recv_splits),
        "sent_rows": sum(plan.send_splits),
        "max_k": int(routing.sum(1).max()) if t else 0,
        "bytes": vars(nbytes),
    }


def test_identity_experts_roundtrip_with_empty_ranks():
    tokens = [5, 0, 7]  # rank 1 has no tokens at all; rank 2 hosts experts nobody picks
    res = run_distributed(_dispatch_identity, 3, args=(tokens,), timeout=120)
    for r in res:
        assert r["y_err"] < 1e-12 and r["dx_err"] < 1e-12 and r["dp_err"] < 1e-12, r
    assert res[1]["sent_rows"] == 0
    assert res[2]["recv_rows"] == 0 and res[2]["bytes"]["dispatch_received"] == 0
    assert res[0]["recv_rows"] > 0 and max(r["max_k"] for r in res) > 1
    assert sum(r["bytes"]["dispatch_sent"] for r in res) == sum(r["bytes"]["dispatch_received"] for r in res)


def _uneven_a2a() -> list:
    rank, world = dist.get_rank(), dist.get_world_size()
    send = [(rank + j) % 3 for j in range(world)]  # includes zero splits
    recv = [(j + rank) % 3 for j in range(world)]
    x = torch.arange(sum(send), dtype=torch.float64).unsqueeze(1).repeat(1, 2) + 100 * rank
    x.requires_grad_()
    y = all_to_all(x, send, recv, dist.group.WORLD)
    (y * (torch.arange(y.shape[0]).unsqueeze(1) + 1)).sum().backward()
    return [y[:, 0].tolist(), x.grad[:, 0].tolist()]


def test_uneven_all_to_all_and_its_backward():
    res = run_distributed(_uneven_a2a, 3, timeout=120)
    for rank, (y, _) in enumerate(res):
        expect = []
        for src in range(3):
            send = [(src + j) % 3 for j in range(3)]
            start = sum(send[:rank])
            expect += [100 * src + start + i for i in range(send[rank])]
        assert y == expect
    # Backward returns to each source row the weight (position + 1) its row had at the destination.
    for src, (_, grad) in enumerate(res):
        send = [(src + j) % 3 for j in range(3)]
        expect = []
        for dst in range(3):
            recv = [(j + dst) % 3 for j in range(3)]
            offset = sum(recv[:src])
            expect += [offset + i + 1 for i in range(send[dst])]
        assert grad == expect
