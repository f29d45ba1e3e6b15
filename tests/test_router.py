"""Routing maths of TimeExpertRouter (eq. 5-6) and TopKRouter (eq. 3-4), single process."""

import pytest
import torch
import torch.nn.functional as F

from megatron_timeexpert.moe.router import RouterConfig, TimeExpertRouter, TopKRouter
from megatron_timeexpert.moe.types import RouterOutput, TokenType


def _router(**kw) -> TimeExpertRouter:
    hidden = kw.pop("hidden", 8)
    torch.manual_seed(kw.pop("seed", 0))
    cfg = RouterConfig(**{"num_experts": 4, "z_loss_coeff": 0.0, "aux_loss_coeff": 0.0, "expert_norm_coeff": 0.0, **kw})
    return cfg.build(hidden)


def _tokens(t=16, h=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, h, generator=g), torch.randint(0, 4, (t,), generator=g)


def test_build_picks_the_router_type_and_output_is_the_contract():
    assert isinstance(RouterConfig().build(8), TimeExpertRouter)
    r = RouterConfig(router_type="topk").build(8)
    assert isinstance(r, TopKRouter)
    x, tt = _tokens()
    out = r(x, tt)
    assert isinstance(out, RouterOutput)
    assert out.probs.shape == (16, 8) and out.routing_map.dtype == torch.bool
    assert set(out.losses) == {"aux", "z"} and torch.equal(out.token_type, tt)


def test_cosine_scores():
    r = _router()
    x, _ = _tokens()
    expected = F.cosine_similarity(x.unsqueeze(1), r.weight.detach().unsqueeze(0), dim=-1)
    torch.testing.assert_close(r.scores(x), expected)
    # scale invariance of eq. 5
    torch.testing.assert_close(r.scores(3.0 * x), expected)


def test_ste_gradient_matches_hand_computation():
    alpha = 0.5
    r = _router(num_experts=2, hidden=2, alpha=alpha, weighting="sum")
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        r.threshold.copy_(torch.tensor([0.2, -0.3]))
        r.records.type_rate[TokenType.TEXT] = torch.tensor([0.6, 0.1])
    x = torch.tensor([[2.0, 1.0], [0.0, -1.0]])
    tt = torch.tensor([TokenType.TEXT, TokenType.VISUAL])
    c = torch.tensor([[1.0, -2.0], [0.5, 3.0]])  # upstream dL/dprobs
    out = r.train()(x, tt)  # training: empty tokens get zero output (no fallback)
    (out.probs * c).sum().backward()

    # by hand: d = sig(a) - sig(G), a = (cos + alpha A) / (1 + alpha); dL/dd = c (straight-through)
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    g = torch.tensor([0.2, -0.3])
    a_t = torch.tensor([[0.6, 0.1], [0.0, 0.0]])
    xn, wn = x / x.norm(dim=1, keepdim=True), w / w.norm(dim=1, keepdim=True)
    s = xn @ wn.t()
    a = (s + alpha * a_t) / (1 + alpha)
    d = torch.sigmoid(a) - torch.sigmoid(g)
    assert torch.equal(out.routing_map, d > 0)
    assert torch.equal(out.probs.detach(), (d > 0).float())
    dsig_a = torch.sigmoid(a) * (1 - torch.sigmoid(a))
    grad_g = -(c * (torch.sigmoid(g) * (1 - torch.sigmoid(g)))).sum(0)
    grad_w = torch.zeros(2, 2)
    for t in range(2):
        for e in range(2):
            # d cos(x, w) / d w = x / (|x||w|) - cos * w / |w|^2
            dcos = xn[t] / w[e].norm() - s[t, e] * w[e] / w[e].norm() ** 2
            grad_w[e] += c[t, e] * dsig_a[t, e] / (1 + alpha) * dcos
    torch.testing.assert_close(r.threshold.grad, grad_g)
    torch.testing.assert_close(r.weight.grad, grad_w)


def test_k_zero_and_k_max():
    x, tt = _tokens()
    r = _router()
    with torch.no_grad():
        r.threshold.fill_(50.0)  # sigmoid(G) ~ 1 > sigmoid(a) for any cosine: nothing fires
    out = r.train()(x, tt)
    assert not out.routing_map.any() and torch.equal(out.probs, torch.zeros_like(out.probs))
    assert out.metrics["k_mean"] == 0.0 and out.metrics["frac_k0"] == 1.0
    with torch.no_grad():
        r.threshold.fill_(-50.0)  # everything fires
    out = r(x, tt)
    assert out.routing_map.all()
    torch.testing.assert_close(out.probs.detach(), torch.full((16, 4), 0.25))
    assert out.metrics["k_mean"] == 4.0 and out.metrics["k_mean/score"] == 4.0 and out.metrics["frac_k0"] == 0.0


@pytest.mark.parametrize("policy", ["zero", "top1"])
def test_inactive_experts_never_fire_even_with_huge_scores(policy):
    r = _router(num_initial_experts=2, empty_token_policy=policy)
    x, tt = _tokens()
    with torch.no_grad():
        r.weight[2:] = x[:2]  # perfectly aligned with tokens 0 and 1
        r.threshold[2:] = -50.0  # and thresholds that any token beats
        r.threshold[:2] = 50.0  # active experts fire nothing: every token is empty
    out = r.train()(x, tt)
    assert not out.routing_map[:, 2:].any()
    assert torch.equal(out.probs[:, 2:], torch.zeros(16, 2))
    if policy == "top1":
        assert out.routing_map[:, :2].sum(1).eq(1).all()
    (out.probs.sum() + out.routing_map.sum()).backward()
    assert r.weight.grad[2:].abs().sum() == 0 and r.threshold.grad[2:].abs().sum() == 0


def test_empty_token_policy_zero_and_top1():
    x, tt = _tokens()
    with torch.no_grad():
        thr = torch.tensor([0.3, 0.25, 0.35, 0.3])  # some tokens fire, some do not
    outs = {}
    for policy in ("zero", "top1"):
        r = _router(empty_token_policy=policy, eval_empty_token_policy="zero")
        with torch.no_grad():
            r.weight.copy_(torch.nn.functional.normalize(x[:4], dim=1))
            r.threshold.copy_(thr)
        outs[policy] = (r.train()(x, tt), r)
    zero, _ = outs["zero"]
    top1, r1 = outs["top1"]
    empty = ~zero.routing_map.any(1)
    assert empty.any() and (~empty).any(), "the example must have both kinds of tokens"
    assert torch.equal(zero.probs[empty], torch.zeros_like(zero.probs[empty]))
    # top1: each empty token gets exactly its best expert with weight 1, the others are unchanged
    d = torch.sigmoid(r1.scores(x) / (1 + r1.config.alpha)) - torch.sigmoid(thr)
    best = d.argmax(1)
    assert torch.equal(top1.routing_map[empty], F.one_hot(best[empty], 4).bool())
    assert torch.equal(top1.probs.detach()[empty], F.one_hot(best[empty], 4).float())
    assert torch.equal(top1.probs[~empty], zero.probs[~empty])
    # the metric counts the token's own gate, before the fallback
    assert top1.metrics["frac_k0"] == zero.metrics["frac_k0"] == pytest.approx(empty.float().mean().item())
    # eval mode uses eval_empty_token_policy ("zero" here)
    assert not r1.eval()(x, tt).routing_map[empty].any()


def test_default_policies_zero_in_training_top1_in_eval():
    cfg = RouterConfig()
    assert (cfg.empty_token_policy, cfg.eval_empty_token_policy, cfg.weighting) == ("zero", "top1", "uniform")


@pytest.mark.parametrize("weighting", ["uniform", "gate", "sum"])
def test_weighting_rules(weighting):
    x, tt = _tokens(64)
    r = _router(weighting=weighting, threshold_init=0.05, alpha=0.0)
    out = r.train()(x, tt)
    probs, rmap = out.probs.detach(), out.routing_map
    k = rmap.sum(1).float()
    assert (k == 0).any() and (k >= 2).any(), "the example must have varied k"
    assert torch.equal(probs[~rmap], torch.zeros_like(probs[~rmap]))  # exactly zero off the map
    assert (probs[rmap] > 0).all()
    rows = probs.sum(1)
    if weighting == "sum":
        torch.testing.assert_close(rows, k)
    else:
        torch.testing.assert_close(rows, (k > 0).float())
    if weighting == "uniform":
        torch.testing.assert_close(probs, rmap.float() / k.clamp(min=1).unsqueeze(1))
    if weighting == "gate":
        d = torch.sigmoid(r.scores(x)) - torch.sigmoid(r.threshold.detach())
        dpos = torch.where(rmap, d, 0.0)
        torch.testing.assert_close(probs, dpos / dpos.sum(1, keepdim=True).clamp(min=1e-30))
    # the router trains through probs: W_g and G get a gradient
    (probs.new_tensor(1.0) * (out.probs * torch.randn_like(probs)).sum()).backward()
    assert r.weight.grad.abs().sum() > 0 and r.threshold.grad.abs().sum() > 0


def test_task_activation_rate_changes_routing():
    x, _ = _tokens(1)
    r = _router(alpha=10.0, eval_empty_token_policy="zero")
    with torch.no_grad():
        r.weight.copy_(torch.eye(4, 8))
        r.threshold.fill_(0.5)
        r.records.type_rate[TokenType.SCORE] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    vis = r.eval()(x, torch.tensor([TokenType.VISUAL])).routing_map
    score = r(x, torch.tensor([TokenType.SCORE])).routing_map
    assert score[0, 0] and not vis[0, 0]  # (cos + 10) / 11 > 0.5 only with A = 1


def test_at_takes_one_ema_step_per_finish_step_and_eval_records_nothing():
    """Training forwards only accumulate: A_t is constant within a step (both forwards of a step route
    with the same A_t), finish_step applies one EMA step from the step's combined counts, and eval
    forwards record nothing."""
    x, tt = _tokens(32)
    r = _router(rate_decay=0.9)
    out1 = r.train()(x, tt)
    assert r.records.type_rate.abs().sum() == 0  # not before finish_step
    r.finish_step()
    rate1 = r.records.type_rate.clone()
    for t in range(4):  # first observation of a type: its batch rate
        sel = tt == t
        torch.testing.assert_close(rate1[t], out1.routing_map[sel].float().mean(0))
    # a step of two forwards (microbatches): both route with rate1, one EMA step from their union
    out2a = r(x[:10], tt[:10])
    assert torch.equal(r.records.type_rate, rate1)
    out2b = r(x[10:], tt[10:])
    assert torch.equal(r.records.type_rate, rate1)
    r.finish_step()
    map2 = torch.cat([out2a.routing_map, out2b.routing_map])
    with torch.no_grad():  # the same routing as one forward over all tokens with rate1
        ref = _router(rate_decay=0.9)
        ref.records.type_rate.copy_(rate1)
        assert torch.equal(ref.train()(x, tt).routing_map, map2)
    for t in range(4):
        sel = tt == t
        torch.testing.assert_close(r.records.type_rate[t], 0.9 * rate1[t] + 0.1 * map2[sel].float().mean(0))
    assert r.records.step.item() == 2
    before = r.records.state_dict()
    r.eval()(x, tt)
    r.finish_step()
    assert r.records.step.item() == 3  # finish_step counts the step even when it saw no tokens
    for k, v in r.records.state_dict().items():
        if k != "step":
            assert torch.equal(v, before[k]), k


def test_activate_and_deactivate():
    x, tt = _tokens()
    r = _router(num_initial_experts=3)
    assert r.active.tolist() == [True, True, True, False]
    r.activate(3, x[0], threshold=-50.0)
    assert r.active[3] and r.threshold[3].item() == -50.0 and torch.equal(r.weight[3].detach(), x[0])
    out = r.train()(x, tt)
    assert out.routing_map[:, 3].all()
    r.deactivate(3)
    assert not r(x, tt).routing_map[:, 3].any()
    r.deactivate(1)
    r.deactivate(2)
    with pytest.raises(ValueError, match="at least 1"):
        r.deactivate(0)
    with pytest.raises(ValueError, match="out of range"):
        r.activate(4, x[0])


def test_state_dict_holds_active_mask_and_records():
    r = _router(num_initial_experts=2)
    x, tt = _tokens()
    r.train()(x, tt)
    r.finish_step()
    assert r.records.type_rate.abs().sum() > 0
    sd = r.state_dict()
    assert {"weight", "threshold", "active", "records.type_rate", "records.total_counts"} <= set(sd)
    r2 = _router(seed=5)
    r2.load_state_dict(sd)
    assert torch.equal(r2.active, r.active) and torch.equal(r2.records.type_rate, r.records.type_rate)


def test_topk_matches_direct_softmax_topk_and_switch_loss():
    x, tt = _tokens(32)
    torch.manual_seed(0)
    cfg = RouterConfig(router_type="topk", num_experts=6, num_initial_experts=5, topk=2, aux_loss_coeff=0.5)
    r = cfg.build(8)
    with torch.no_grad():
        r.weight[5] = 100 * x.mean(0)  # inactive, would win every token
    out = r.train()(x, tt)
    logits = x @ r.weight.detach()[:5].t()
    sm = torch.softmax(logits, dim=-1)
    vals, idx = sm.topk(2, dim=-1)
    expected = torch.zeros(32, 6).scatter(1, idx, vals / vals.sum(1, keepdim=True))
    torch.testing.assert_close(out.probs.detach(), expected)
    assert torch.equal(out.routing_map, expected > 0)
    f = out.routing_map[:, :5].float().sum(0) / (32 * 2)
    switch = 5 * (f * sm.mean(0)).sum()
    torch.testing.assert_close(out.losses["aux"].detach(), 0.5 * switch)
    z = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(out.losses["z"].detach(), 1e-3 * z)
    assert out.metrics["k_mean"] == 2.0
    with pytest.raises(ValueError, match="at least 2"):
        for e in range(4):
            r.deactivate(e)


def test_losses_are_scaled_and_reach_the_router():
    x, tt = _tokens(64)
    r = RouterConfig(aux_loss_coeff=2.0, expert_norm_coeff=0.5, z_loss_coeff=0.25, num_experts=4).build(8)
    r.train()(x, tt)  # a history for A_t
    r.finish_step()
    out = r(x, tt)
    m = out.metrics
    torch.testing.assert_close(
        out.losses["aux"].item(), 2.0 * m["aux/concentration"] + 0.5 * m["aux/expert_norm"], rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(out.losses["z"].item(), 0.25 * m["z_raw"], rtol=1e-5, atol=1e-7)
    assert m["aux/concentration"] > 0
    (out.losses["aux"] + out.losses["z"]).backward()
    assert r.weight.grad.abs().sum() > 0 and r.threshold.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "field,value",
    [
        ("router_type", "switch"),
        ("num_experts", 0),
        ("num_initial_experts", 9),
        ("alpha", -1.0),
        ("threshold_init", float("nan")),
        ("rate_decay", 1.0),
        ("token_types", ("visual", "audio")),
        ("empty_token_policy", "drop"),
        ("eval_empty_token_policy", "top2"),
        ("weighting", "softmax"),
        ("aux_loss_coeff", -0.1),
        ("expert_norm_coeff", -1.0),
        ("z_loss_coeff", -1.0),
        ("topk", 0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"RouterConfig\.{field}=") as err:
        RouterConfig(**{field: value})
    assert repr(value) in str(err.value)


def test_topk_larger_than_active_set_is_rejected():
    with pytest.raises(ValueError, match="RouterConfig.topk=3"):
        RouterConfig(router_type="topk", num_experts=4, num_initial_experts=2, topk=3)


@pytest.mark.parametrize("router_type", ["timeexpert", "topk"])
def test_empty_batch_and_bf16_input(router_type):
    r = RouterConfig(router_type=router_type, num_experts=4).build(8).train()
    out = r(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long))
    assert out.probs.shape == (0, 4) and out.routing_map.shape == (0, 4)
    assert all(torch.isfinite(v) for v in out.losses.values())
    x, tt = _tokens()
    ref = r.eval()(x, tt)
    low = r(x.bfloat16(), tt)
    assert low.probs.dtype == torch.float32 and low.routing_map.shape == ref.routing_map.shape


def test_router_moves_like_any_module():
    """``.to()`` / ``.double()`` reach the router's parameters and its records' buffers (a method of
    the records once shadowed ``nn.Module._apply`` and made both raise)."""
    from megatron_timeexpert.moe.router import RouterConfig

    router = RouterConfig(num_experts=4).build(8).double()
    assert router.weight.dtype == torch.float64
    assert all(b.dtype in (torch.float64, torch.bool, torch.long, torch.int64) for b in router.buffers())
    router.to("cpu")
