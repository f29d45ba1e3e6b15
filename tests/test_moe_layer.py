"""TimeExpertMoELayer against the plain loop reference (tests/moe_reference.py), for EP in {1, 2, 4}
and TP in {1, 2} (sequence parallel), through megatron-core's parallel_state groups on gloo.

Each multi-process run builds all layouts of one world size in one spawn (start-up dominates).
Run: ``pytest tests/test_moe_layer.py -q``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from megatron_timeexpert.moe.layer import MoELayerConfig, TimeExpertMoELayer
from megatron_timeexpert.moe.types import TokenType
from parallel.testing import run_distributed
from tests.moe_reference import TinyRouter, reference_moe

H, F, E = 16, 32, 8
S, B = 4, 2  # full sequence length, micro-batch per data-parallel rank
TOL = 1e-10  # float64 throughout


def _config(tp: int):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=H,
        num_attention_heads=2,
        ffn_hidden_size=F,
        tensor_model_parallel_size=tp,
        sequence_parallel=tp > 1,
    )


def _router_config(kind: str):
    """The production routers with loss coefficients 0: their losses are means over the local tokens,
    so only with zero coefficients do the sharded gradients equal the single-process ones."""
    from megatron_timeexpert.moe.router import RouterConfig

    return RouterConfig(router_type=kind, num_experts=E, aux_loss_coeff=0.0, expert_norm_coeff=0.0, z_loss_coeff=0.0)


def _problem(dp: int, scenario: str, ep: int, seed: int = 0, router_kind: str = "tiny"):
    """Global inputs (identical on every rank): tokens, types, output-gradient weights, experts, map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, dp * B, H, generator=g, dtype=torch.float64)
    tt = torch.randint(0, 4, (S, dp * B), generator=g)
    gout = torch.randn(S, dp * B, H, generator=g, dtype=torch.float64)
    w1 = torch.randn(E, H, F, generator=g, dtype=torch.float64) * 0.3
    w2 = torch.randn(E, F, H, generator=g, dtype=torch.float64) * 0.3
    perm = torch.randperm(E, generator=g)  # non-contiguous placement: nobody may assume p == e
    torch.manual_seed(seed)
    router = TinyRouter(H, E).double() if router_kind == "tiny" else _router_config(router_kind).build(H)
    if scenario == "hot":
        # Only the experts placed on EP rank 0 may fire, and one of them fires for every token:
        # one expert receives every token; with EP > 1 the other ranks receive nothing.
        slots = E // ep
        on_rank0 = [e for e in range(E) if perm[e].item() < slots]
        router.type_rules = False
        router.allowed.zero_()
        router.allowed[on_rank0] = True
        router.always[on_rank0[0]] = True
    return x, tt, gout, w1, w2, perm, router


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def _build_layer(tp: int, router: torch.nn.Module, router_kind: str, groups: dict) -> TimeExpertMoELayer:
    """The layer under test: built directly with our tiny router, or through the megatron spec (the
    way TransformerLayer builds it) with a production router carrying the reference router's weights."""
    if router_kind == "tiny":
        moe = MoELayerConfig(num_experts=E, reduce_metrics=False)
        return TimeExpertMoELayer(_config(tp), copy.deepcopy(router), moe, **groups).double()
    from megatron.core.transformer.spec_utils import build_module

    from megatron_timeexpert.moe.spec import get_timeexpert_moe_spec

    layer = build_module(get_timeexpert_moe_spec(_router_config(router_kind), reduce_metrics=False), config=_config(tp))
    layer.router.load_state_dict(router.state_dict())
    for p in layer.experts.parameters():
        assert p.allreduce is False
    for p in layer.router.parameters():
        assert getattr(p, "sequence_parallel", False) is (tp > 1)
    # Only the experts go to float64; the router keeps the dtype of the reference's router.
    layer.experts.double()
    return layer


def _layer_vs_reference(tp: int, ep: int, scenario: str, router_kind: str = "tiny") -> dict:
    """One layout on the current ranks: errors vs the reference, byte counts, metrics."""
    from megatron.core import parallel_state as ps

    world = dist.get_world_size() if dist.is_initialized() else 1
    dp = world // tp
    if dist.is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=1
        )
        groups = dict(
            ep_group=ps.get_expert_model_parallel_group(),
            tp_group=ps.get_tensor_model_parallel_group(),
            stats_group=ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
        )
        dp_rank, tp_rank = ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank()
        edp_group = ps.get_expert_data_parallel_group()
    else:
        groups, dp_rank, tp_rank, edp_group = {}, 0, 0, None
    try:
        x, tt, gout, w1, w2, perm, router = _problem(dp, scenario, ep, router_kind=router_kind)

        # Reference over ALL tokens of all ranks.
        ref_router = copy.deepcopy(router)
        x_ref, w1_ref, w2_ref = (t.clone().requires_grad_() for t in (x, w1, w2))
        y_ref, r_ref = reference_moe(x_ref.reshape(-1, H), tt.reshape(-1), ref_router, w1_ref, w2_ref)
        loss_ref = (y_ref * gout.reshape(-1, H)).sum() + sum(r_ref.losses.values())
        loss_ref.backward()

        # The layer on this rank's shard: DP slice of the batch, TP chunk of the sequence.
        layer = _build_layer(tp, router, router_kind, groups)
        layer.placement.set_map(perm)
        local = layer.placement.local_experts(layer.ep_rank)
        with torch.no_grad():
            for slot, logical in enumerate(local):
                layer.experts.w1[slot].copy_(w1[logical])
                layer.experts.w2[slot].copy_(w2[logical])
        s_l = S // tp
        seq, bat = slice(tp_rank * s_l, (tp_rank + 1) * s_l), slice(dp_rank * B, (dp_rank + 1) * B)
        x_loc = x[seq, bat].clone().requires_grad_()
        out, bias = layer(x_loc, token_type=tt[:, bat].t())
        (out * gout[seq, bat]).sum().backward()
        metrics = layer.pop_metrics()

        y_ref3 = y_ref.detach().view(S, dp * B, H)
        router_grads = torch.cat([p.grad.flatten() for p in layer.router.parameters()])
        ref_router_grads = torch.cat([p.grad.flatten() for p in ref_router.parameters()])
        w1g, w2g = layer.experts.w1.grad.clone(), layer.experts.w2.grad.clone()
        if dist.is_initialized():
            dist.all_reduce(router_grads)  # what DDP (+ the TP all-reduce of sequence_parallel params) sums
            dist.all_reduce(w1g, group=edp_group)  # DDP over the expert-data-parallel group
            dist.all_reduce(w2g, group=edp_group)
        errs = {
            "out": _max_err(out.detach(), y_ref3[seq, bat]),
            "dx": _max_err(x_loc.grad, x_ref.grad[seq, bat]),
            "router": _max_err(router_grads, ref_router_grads),
            "w1": max(_max_err(w1g[s], w1_ref.grad[e]) for s, e in enumerate(local)),
            "w2": max(_max_err(w2g[s], w2_ref.grad[e]) for s, e in enumerate(local)),
        }
        # Deduplicated lower bound of the dispatch payload: distinct REMOTE ranks per local token.
        fired = r_ref.routing_map.view(S, dp * B, E)[seq, bat].reshape(-1, E)
        host = layer.placement.expert_rank()
        distinct_remote = [len({host[e].item() for e in row.nonzero().flatten()} - {layer.ep_rank}) for row in fired]
        k_local = fired.sum(1)
        # Routing records (production routers): the forward reduced nothing, finish_step (the trainer
        # calls it after the optimizer step) folds in every rank's tokens of the stage at once.
        records = None
        if router_kind != "tiny":
            nt = layer.router.records.num_types
            pending_before = layer.router.records.pending.clone()
            untouched = layer.router.records.step.item() == 0 and layer.router.records.total_counts.sum() == 0
            layer.finish_step()
            ref_router.finish_step()
            rec, ref_rec = layer.router.records.state_dict(), ref_router.records.state_dict()
            records = {
                "untouched_in_forward": bool(untouched),
                "pending_local_tokens": pending_before[E * nt : E * nt + nt].sum().item(),  # type_tokens part
                "state": {k: v.numpy() for k, v in rec.items()},
                "equal_ref": all(
                    torch.allclose(v.double(), ref_rec[k].double(), rtol=1e-12, atol=1e-12)
                    if "unrouted_sum" in k  # float64 sums of a different grouping: equal to rounding
                    else torch.equal(v, ref_rec[k])
                    for k, v in rec.items()
                ),
                "ref_step": ref_rec["step"].item(),
                "ref_tokens": ref_rec["total_type_tokens"].sum().item(),
            }
        # A second forward with statistics reduced over all ranks of the stage (with autograd on: a
        # training forward under no_grad is the first pass of a recomputed region and is not counted).
        layer.moe.reduce_metrics = True
        layer(x_loc.detach(), token_type=tt[:, bat].t())
        reduced = layer.pop_metrics()
        return {
            "errs": errs,
            "bias": bias,
            "bytes": {k[6:]: v for k, v in metrics.items() if k.startswith("bytes/")},
            "lower_bound": sum(distinct_remote) * H * 8,
            "k0": int((k_local == 0).sum()),
            "kE": int((k_local == E).sum()),
            "ep_rank": layer.ep_rank,
            "tokens_per_expert": [reduced[f"tokens_per_expert/{e}"] for e in range(E)],
            "ref_tokens_per_expert": r_ref.routing_map.sum(0).tolist(),
            "loss_z": reduced["loss/z"] if router_kind == "tiny" else 0.0,
            "ref_loss_z": r_ref.losses["z"].item() / world if router_kind == "tiny" else 0.0,
            "k_mean": reduced["experts_per_token/ALL"],
            "ref_k_mean": r_ref.routing_map.sum(1).double().mean().item(),
            "records": records,
            "local_tokens": x_loc.shape[0] * x_loc.shape[1],
        }
    finally:
        if dist.is_initialized():
            ps.destroy_model_parallel()


LAYOUTS = {2: [(1, 2), (2, 1)], 4: [(1, 4), (2, 2), (2, 4)]}
SCENARIOS = ["mixed", "hot"]
# The production routers (megatron_timeexpert/moe/router.py), built through the megatron spec.
PRODUCTION = {2: [(1, 2, "timeexpert")], 4: [(2, 2, "timeexpert"), (2, 4, "topk")]}


def _all_layouts(world: int) -> dict:
    out = {(tp, ep, sc): _layer_vs_reference(tp, ep, sc) for tp, ep in LAYOUTS[world] for sc in SCENARIOS}
    for tp, ep, kind in PRODUCTION[world]:
        out[(tp, ep, kind)] = _layer_vs_reference(tp, ep, "mixed", router_kind=kind)
    return out


@pytest.fixture(scope="module")
def results() -> dict:
    out = {(1, 1, sc): [_layer_vs_reference(1, 1, sc)] for sc in SCENARIOS}
    for world in LAYOUTS:
        per_rank = run_distributed(_all_layouts, world, args=(world,), timeout=240)
        for key in per_rank[0]:
            out[key] = [r[key] for r in per_rank]
    return out


@pytest.mark.parametrize("tp,ep,kind", [case for world in PRODUCTION for case in PRODUCTION[world]])
def test_production_router_records_after_finish_step(results, tp, ep, kind):
    """The layer's forward leaves the routing records untouched (only this rank's tokens pending);
    after layer.finish_step() every rank of the stage holds the same records, equal to those of the
    single-process router over all tokens."""
    rows = results[(tp, ep, kind)]
    for rank, r in enumerate(rows):
        rec = r["records"]
        assert rec["untouched_in_forward"], f"rank {rank}: the forward changed the records"
        assert rec["pending_local_tokens"] == r["local_tokens"], f"rank {rank}: pending is not its own tokens"
        assert rec["equal_ref"], f"rank {rank}: records differ from the single-process ones"
        assert rec["ref_step"] == 1 and rec["ref_tokens"] == S * B * len(rows) // tp
        for k, v in rec["state"].items():
            assert (v == rows[0]["records"]["state"][k]).all(), f"rank {rank} differs from rank 0 in {k}"


@pytest.mark.parametrize("tp,ep,kind", [case for world in PRODUCTION for case in PRODUCTION[world]])
def test_production_router_through_spec_matches_reference(results, tp, ep, kind):
    # Production routers compute in float32, so the tolerance is float32's.
    for rank, r in enumerate(results[(tp, ep, kind)]):
        assert r["bias"] is None
        for name, err in r["errs"].items():
            assert err < 1e-5, f"rank {rank}: {name} differs from the reference by {err}"
        assert r["bytes"]["dispatch_sent"] == r["lower_bound"]
    assert sum(r["lower_bound"] for r in results[(tp, ep, kind)]) > 0


CASES = [(1, 1)] + [layout for world in LAYOUTS for layout in LAYOUTS[world]]


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("tp,ep", CASES)
def test_matches_reference(results, tp, ep, scenario):
    for rank, r in enumerate(results[(tp, ep, scenario)]):
        assert r["bias"] is None
        for name, err in r["errs"].items():
            assert err < TOL, f"rank {rank}: {name} differs from the reference by {err}"


@pytest.mark.parametrize("tp,ep", CASES)
def test_edge_cases_are_exercised(results, tp, ep):
    mixed = results[(tp, ep, "mixed")]
    assert sum(r["k0"] for r in mixed) > 0, "no token fired zero experts"
    assert sum(r["kE"] for r in mixed) > 0, "no token fired every expert"
    hot = results[(tp, ep, "hot")]
    tokens = S * B * len(hot) // tp
    assert max(hot[0]["ref_tokens_per_expert"]) == tokens, "no expert received every token"
    if ep > 1:
        starved = [r for r in hot if r["ep_rank"] != 0]
        assert starved and all(r["bytes"]["dispatch_received"] == 0 for r in starved)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("tp,ep", CASES)
def test_dispatch_bytes_equal_dedup_lower_bound(results, tp, ep, scenario):
    for r in results[(tp, ep, scenario)]:
        assert r["bytes"]["dispatch_sent"] == r["lower_bound"]
    rows = results[(tp, ep, scenario)]
    # What one rank sends, others receive; combine mirrors dispatch.
    assert sum(r["bytes"]["dispatch_sent"] for r in rows) == sum(r["bytes"]["dispatch_received"] for r in rows)
    for r in rows:
        assert r["bytes"]["combine_sent"] == r["bytes"]["dispatch_received"]
        assert r["bytes"]["combine_received"] == r["bytes"]["dispatch_sent"]


@pytest.mark.parametrize("tp,ep", CASES)
def test_reduced_metrics_are_global(results, tp, ep):
    for r in results[(tp, ep, "mixed")]:
        assert r["tokens_per_expert"] == pytest.approx(r["ref_tokens_per_expert"])
        assert r["loss_z"] == pytest.approx(r["ref_loss_z"])
        assert r["k_mean"] == pytest.approx(r["ref_k_mean"])


def test_token_types_default_to_text_and_losses_reach_the_graph():
    torch.manual_seed(0)
    router = TinyRouter(H, E).double()
    layer = TimeExpertMoELayer(_config(1), router, MoELayerConfig(num_experts=E)).double()
    x = torch.randn(3, 2, H, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x)
    # Only the aux loss reaches the router when the output gradient is zero.
    (out * 0).sum().backward()
    ref_router = copy.deepcopy(router)
    ref_router.gate.grad = None
    r = ref_router(x.detach().reshape(-1, H), torch.full((6,), int(TokenType.TEXT)))
    r.losses["z"].backward()
    assert torch.allclose(layer.router.gate.grad, ref_router.gate.grad)
    assert layer.router.gate.grad.abs().sum() > 0
    # Scale applies.
    layer.zero_grad()
    layer.set_aux_loss_scale(0.5)
    out, _ = layer(x)
    (out * 0).sum().backward()
    assert torch.allclose(layer.router.gate.grad, 0.5 * ref_router.gate.grad)
    m = layer.pop_metrics()
    assert m["forwards"] == 2 and m["experts_per_token/VISUAL"] == 0.0
    assert set(m) >= {"time_ms/route", "time_ms/dispatch", "time_ms/experts", "time_ms/combine", "loss/z"}
