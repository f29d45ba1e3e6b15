"""The TimeExpert router's losses and their gradients against values computed by hand from the
cosine scores, the thresholds G and the task activation rates A_t (plain Python floats, no torch
in the expected values), and the losses at TP = 2 against the single-rank router.

What these catch (each was shown to pass the earlier, weaker tests): a concentration loss without
its straight-through gradient (G gets no gradient from it), a z-loss on the logits instead of the
threshold margins, an expert-norm term over inactive rows, A_t rows read for the wrong token type,
and router losses computed per TP chunk instead of per microbatch.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_timeexpert.moe.router import RouterConfig
from parallel.testing import run_distributed

W = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
G = [0.1, -0.2, 0.3]
A = [[0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.0, 0.0, 0.0], [0.3, 0.3, 0.4]]  # VISUAL, TEXT, TIME, SCORE
X = [[1.0, 0.2], [0.3, 1.0], [-1.0, 0.5], [0.5, 0.5]]
TYPES = [0, 1, 1, 3]
ALPHA = 0.5
NORM_COEFF = 0.1


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _cos(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _router(active=(True, True, True), aux=1.0, z=1.0):
    cfg = RouterConfig(
        router_type="timeexpert",
        num_experts=3,
        alpha=ALPHA,
        aux_loss_coeff=aux,
        expert_norm_coeff=NORM_COEFF,
        z_loss_coeff=z,
    )
    router = cfg.build(hidden_size=2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor(W))
        router.threshold.copy_(torch.tensor(G))
        router.records.type_rate.copy_(torch.tensor(A))
        router.active.copy_(torch.tensor(active))
    return router


def _hand(active=(True, True, True)):
    """Expected values: logits, fired map, concentration, norm, z, and dL/dG of conc and of z."""
    act = [e for e in range(3) if active[e]]
    logit = [[(_cos(x, W[e]) + ALPHA * A[t][e]) / (1 + ALPHA) for e in range(3)] for x, t in zip(X, TYPES)]
    d = [[_sig(lg[e]) - _sig(G[e]) for e in range(3)] for lg in logit]
    fired = [[d[i][e] > 0 and active[e] for e in range(3)] for i in range(len(X))]
    # concentration: per type present, its share of the tokens times sum_e (A/sumA - N/sumN)^2
    conc, dconc_dn = 0.0, {}
    for t in sorted(set(TYPES)):
        rows = [i for i, ti in enumerate(TYPES) if ti == t]
        n = {e: sum(fired[i][e] for i in rows) for e in act}
        a = {e: A[t][e] for e in act}
        sn, sa = sum(n.values()), sum(a.values())
        if sn == 0 or sa == 0:
            continue
        w = len(rows) / len(X)
        p = {e: a[e] / sa for e in act}
        q = {e: n[e] / sn for e in act}
        conc += w * sum((p[e] - q[e]) ** 2 for e in act)
        cross = sum((q[j] - p[j]) * q[j] for j in act)
        dconc_dn[t] = {e: w * 2 / sn * ((q[e] - p[e]) - cross) for e in act}
    # straight-through: dN/dd = 1 for every token of the type, dd/dG = -sigmoid'(G)
    dconc_dg = [0.0] * 3
    for t in TYPES:
        for e, g in dconc_dn.get(t, {}).items():
            dconc_dg[e] += -g * _sig(G[e]) * (1 - _sig(G[e]))
    norm = sum(sum(v * v for v in W[e]) for e in act)
    margins = [[logit[i][e] - G[e] for e in act] for i in range(len(X))]
    lse = [math.log(sum(math.exp(m) for m in row)) for row in margins]
    z = sum(v * v for v in lse) / len(X)
    dz_dg = [0.0] * 3
    for i in range(len(X)):
        soft = [math.exp(m - lse[i]) for m in margins[i]]
        for j, e in enumerate(act):
            dz_dg[e] += 2 * lse[i] * soft[j] * -1 / len(X)
    return dict(logit=logit, fired=fired, conc=conc, norm=norm, z=z, dconc_dg=dconc_dg, dz_dg=dz_dg)


def _forward(router):
    x = torch.tensor(X)
    return router(x, torch.tensor(TYPES))


@pytest.mark.parametrize("active", [(True, True, True), (True, False, True)], ids=["all-active", "one-inactive"])
def test_timeexpert_losses_by_hand(active):
    want = _hand(active)
    out = _forward(_router(active))
    assert out.routing_map.tolist() == want["fired"], "the gate reads the wrong A_t row or threshold"
    assert out.metrics["aux/concentration"] == pytest.approx(want["conc"], rel=1e-5, abs=1e-7)
    assert out.metrics["aux/expert_norm"] == pytest.approx(want["norm"], rel=1e-6)
    assert out.metrics["z_raw"] == pytest.approx(want["z"], rel=1e-5)
    assert out.losses["aux"].item() == pytest.approx(want["conc"] + NORM_COEFF * want["norm"], rel=1e-5)
    assert out.losses["z"].item() == pytest.approx(want["z"], rel=1e-5)
    assert want["conc"] > 1e-3, "the case must exercise the concentration term"


def test_timeexpert_loss_gradients_by_hand():
    """dG of the concentration term (its straight-through gradient), of the z-loss on the margins,
    and dW of the expert-norm term over active rows only."""
    want = _hand()
    router = _router(z=0.0)
    _forward(router).losses["aux"].backward()
    got = router.threshold.grad.tolist()
    assert got == pytest.approx(want["dconc_dg"], rel=1e-4, abs=1e-7)
    assert max(abs(v) for v in want["dconc_dg"]) > 1e-3, "the case must give G a gradient"

    router = _router(aux=0.0)
    _forward(router).losses["z"].backward()
    assert router.threshold.grad.tolist() == pytest.approx(want["dz_dg"], rel=1e-4, abs=1e-7)

    router = _router(active=(True, False, True), aux=0.0, z=0.0)
    out = _forward(router)
    out.losses["aux"].backward()
    expected = [[2 * NORM_COEFF * v * (e != 1) for v in W[e]] for e in range(3)]
    assert torch.allclose(router.weight.grad, torch.tensor(expected), rtol=1e-5, atol=1e-8), router.weight.grad


# --- TP = 2: the losses of the whole microbatch, gradients that add up to the single-rank ones -----


def _tp2_router_losses() -> dict:
    import torch.distributed as dist

    torch.manual_seed(0)
    x = torch.randn(12, 8)
    types = torch.tensor([0, 1, 2, 3, 1, 1, 0, 0, 2, 3, 3, 1])
    out = {}
    for kind in ("timeexpert", "topk"):
        cfg = RouterConfig(router_type=kind, num_experts=4, aux_loss_coeff=1.0, z_loss_coeff=1.0, expert_norm_coeff=0.5)
        torch.manual_seed(1)
        ref = cfg.build(hidden_size=8)
        with torch.no_grad():
            ref.records.type_rate.copy_(torch.rand(4, 4))
        sharded = cfg.build(hidden_size=8, tp_group=dist.group.WORLD)
        sharded.load_state_dict(ref.state_dict())
        r_out = ref(x, types)
        (r_out.losses["aux"] + r_out.losses["z"]).backward()
        rank = dist.get_rank()
        chunk = slice(rank * 6, (rank + 1) * 6)  # this TP rank's half of the sequence
        s_out = sharded(x[chunk], types[chunk])
        (s_out.losses["aux"] + s_out.losses["z"]).backward()
        grads = torch.cat([p.grad.flatten() for p in sharded.parameters()])
        dist.all_reduce(grads)  # megatron sums sequence-parallel router grads over the TP group
        ref_grads = torch.cat([p.grad.flatten() for p in ref.parameters()])
        out[kind] = {
            "aux": (s_out.losses["aux"].item(), r_out.losses["aux"].item()),
            "z": (s_out.losses["z"].item(), r_out.losses["z"].item()),
            "grad_err": (grads - ref_grads).abs().max().item(),
            "grad_scale": ref_grads.abs().max().item(),
        }
    return out


def test_router_losses_at_tp2_equal_the_single_rank_ones():
    """Each TP rank routes half of a microbatch's tokens; the losses (the same on both ranks) and the
    TP-summed gradients equal those of one router over all tokens."""
    for rank_out in run_distributed(_tp2_router_losses, 2, timeout=60):
        for kind, r in rank_out.items():
            for name in ("aux", "z"):
                got, want = r[name]
                assert got == pytest.approx(want, rel=1e-5), (kind, name, got, want)
            assert r["grad_err"] <= 1e-5 * r["grad_scale"], (kind, r)
