"""Adding and pruning experts (TimeExpert eq. 7-8): the decision from hand-made records, the
cross-rank consistency check (gloo), and the training loop at EP=1 and EP=4 with data on which no
token fires an initial expert (moe/dynamics.py, train/expert_dynamics.py)."""

from __future__ import annotations

import math
import types

import pytest
import torch

from megatron_timeexpert.moe.dynamics import (
    ExpertDecision,
    ExpertDynamicsConfig,
    added_expert_seed,
    apply_expert_changes,
    check_decision_consistent,
    decide_expert_changes,
)
from megatron_timeexpert.moe.router import RouterConfig
from megatron_timeexpert.moe.types import TokenType
from parallel.testing import run_distributed

H, E = 8, 4
VIS, TXT = int(TokenType.VISUAL), int(TokenType.TEXT)


def _router(kind: str = "timeexpert", initial: int = 2, topk: int = 1):
    torch.manual_seed(0)
    return RouterConfig(router_type=kind, num_experts=E, num_initial_experts=initial, topk=topk).build(H)


def _record(router, fired: list[list[int]], token_type: list[int], hidden: torch.Tensor) -> None:
    """One step of hand-made routing: ``fired[i]`` lists the experts token i fired."""
    f = torch.zeros(len(fired), E, dtype=torch.bool)
    for i, experts in enumerate(fired):
        f[i, experts] = True
    router.records.accumulate(f, torch.tensor(token_type), hidden)
    router.records.finish_step()


def _cfg(**kw) -> ExpertDynamicsConfig:
    base = dict(enabled=True, window_steps=1, decision_interval=1, warmup_steps=0, add_threshold=0.5, tau_min=0.1)
    return ExpertDynamicsConfig(**{**base, **kw})


def _hidden(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the decision: pure logic on hand-made records ---------------------------------------------


def test_add_when_a_type_goes_unrouted_with_the_gate_of_eq7():
    router = _router()
    x = _hidden(6)
    # visual tokens 0-2 fire nothing (3/3 unrouted); text tokens 3-5 fire expert 0 or 1
    _record(router, [[], [], [], [0], [1], [0, 1]], [VIS, VIS, VIS, TXT, TXT, TXT], x)
    d = decide_expert_changes(router, _cfg(tau_min=0.0), layer_number=3, step=7)
    assert [e for e, _ in d.added] == [2]  # the lowest free id
    mean = x[:3].mean(0)
    torch.testing.assert_close(d.added[0][1], mean / mean.norm(), rtol=0, atol=1e-15)
    assert d.pruned == [] and d.skipped == []
    # applied: the router's row is R_S/||R_S|| and its threshold 0 (eq. 7), and it is active
    router.threshold.data.fill_(3.0)
    layer = types.SimpleNamespace(router=router, placement=None, ep_rank=0, experts=None)
    layer.placement = types.SimpleNamespace(logical_to_physical=torch.arange(E), slots_per_rank=E)
    layer.experts = types.SimpleNamespace(init_slot=lambda slot, seed: seeds.append((slot, seed)))
    seeds: list = []
    added = apply_expert_changes(layer, d, _cfg())
    assert added == [(2, 2)] and seeds == [(2, added_expert_seed(1234, 3, 2, 7))]
    assert bool(router.active[2]) and float(router.threshold[2].detach()) == 0.0
    torch.testing.assert_close(router.weight[2].double(), mean / mean.norm(), rtol=0, atol=1e-7)


def test_no_add_below_the_threshold_and_the_fraction_is_per_type():
    router = _router()
    # 1 of 4 visual tokens unrouted (0.25), all text routed: below 0.5 for every type
    _record(router, [[], [0], [1], [0], [0], [1]], [VIS, VIS, VIS, VIS, TXT, TXT], _hidden(6))
    assert decide_expert_changes(router, _cfg(tau_min=0.0), 1, 1).added == []
    # 1 of 1 text token unrouted (1.0) while 8 visual tokens are routed: the text fraction decides
    router = _router()
    _record(router, [[0]] * 8 + [[]], [VIS] * 8 + [TXT], _hidden(9))
    assert [e for e, _ in decide_expert_changes(router, _cfg(tau_min=0.0), 1, 1).added] == [2]


def test_prune_below_tau_min_never_the_last_expert():
    router = _router(initial=3)
    # expert 0 fires for 9 of 10 tokens, expert 1 for 1, expert 2 never: rates 0.9, 0.1, 0.0
    fired = [[0, 1]] + [[0]] * 8 + [[]]
    _record(router, fired, [TXT] * 10, _hidden(10))
    d = decide_expert_changes(router, _cfg(tau_min=0.2, add_threshold=0.99), 1, 2)
    assert d.pruned == [1, 2] and d.added == []
    # only expert 0 fires nothing: still it stays (never the last one); expert 1 is the lower rate
    router = _router(initial=2)
    _record(router, [[]] * 4, [TXT] * 4, _hidden(4))
    d = decide_expert_changes(router, _cfg(tau_min=0.2, max_added_per_decision=0), 1, 1)
    assert d.pruned == [0] and any("kept" in s and "[1]" in s for s in d.skipped)
    apply_expert_changes(types.SimpleNamespace(router=router), d, _cfg())
    assert router.active.tolist() == [False, True, False, False]
    _record(router, [[]] * 4, [TXT] * 4, _hidden(4))
    router.records.reset_window()
    _record(router, [[]] * 4, [TXT] * 4, _hidden(4))
    d = decide_expert_changes(router, _cfg(tau_min=0.2, max_added_per_decision=0), 1, 3)
    assert d.pruned == [] and any("kept" in s for s in d.skipped)


def test_topk_router_never_pruned_below_k():
    router = _router(kind="topk", initial=4, topk=2)
    _record(router, [[0, 1]] * 5, [TXT] * 5, _hidden(5))  # experts 2 and 3 never fire, 0 and 1 always
    d = decide_expert_changes(router, _cfg(tau_min=2.0), 1, 1)  # every rate (<= 1) is below tau_min
    assert len(d.pruned) == 2 and d.pruned == [2, 3]


def test_nan_in_R_S_is_skipped_and_reported():
    router = _router()
    x = _hidden(4)
    x[1, 3] = float("nan")  # a NaN token that fired nothing reaches R_S
    _record(router, [[], [], [], [1]], [VIS] * 4, x)
    d = decide_expert_changes(router, _cfg(tau_min=0.0), 2, 5)
    assert d.added == [] and len(d.skipped) == 1 and "not finite" in d.skipped[0]
    assert math.isfinite(d.checksum())


def test_max_added_per_decision_and_no_free_id():
    router = _router(initial=2)
    _record(router, [[]] * 4, [VIS] * 4, _hidden(4))
    d = decide_expert_changes(router, _cfg(tau_min=0.0, max_added_per_decision=0), 1, 1)
    assert d.added == [] and "adds are off" in d.skipped[0]
    full = _router(initial=E)
    _record(full, [[]] * 4, [VIS] * 4, _hidden(4))
    d = decide_expert_changes(full, _cfg(tau_min=0.0), 1, 1)
    assert d.added == [] and "no free expert id" in d.skipped[0]
    with pytest.raises(ValueError, match="max_added_per_decision=2"):
        _cfg(max_added_per_decision=2)
    with pytest.raises(ValueError, match="decision_interval=3"):
        _cfg(window_steps=2, decision_interval=3)


def test_schedule_and_seeds_and_checksum():
    cfg = _cfg(window_steps=2, decision_interval=4, warmup_steps=4)
    assert [s for s in range(1, 13) if cfg.decides_at(s)] == [8, 12]
    assert [s for s in range(1, 9) if cfg.window_ends_at(s)] == [2, 4, 6, 8]
    seeds = {added_expert_seed(1234, layer, e, step) for layer in (1, 2) for e in range(E) for step in (1, 2, 3)}
    assert len(seeds) == 2 * E * 3 and min(seeds) > 1234 + 1009 * 10 + E  # never a first-init seed
    gate = torch.ones(H, dtype=torch.float64) / math.sqrt(H)
    a = ExpertDecision(1, 4, added=[(2, gate)], pruned=[0])
    assert a.checksum() == ExpertDecision(1, 4, added=[(2, gate.clone())], pruned=[0]).checksum()
    assert a.checksum() != ExpertDecision(1, 4, added=[(3, gate)], pruned=[0]).checksum()
    assert a.checksum() != ExpertDecision(1, 4, added=[(2, gate)], pruned=[1]).checksum()
    other = gate.clone()
    other[0] += 1e-12
    assert a.checksum() != ExpertDecision(1, 4, added=[(2, other)], pruned=[0]).checksum()


def test_fresh_slot_state_zeroes_only_that_slots_adam_rows():
    from megatron_timeexpert.train.slot_adam import fresh_router_row, fresh_slot_state

    w1 = torch.nn.Parameter(torch.randn(2, 3, 4))
    w2 = torch.nn.Parameter(torch.randn(2, 4, 3))
    router = _router()
    adam = torch.optim.Adam([w1, w2, router.weight, router.threshold])
    for p in (w1, w2, router.weight, router.threshold):
        p.grad = torch.randn_like(p)
    adam.step()
    opt = types.SimpleNamespace(optimizer=adam)  # the megatron wrapper's view: .optimizer is the torch one
    base = torch.zeros(2, dtype=torch.long)  # the per-slot Adam step base (train/slot_adam.py)
    layer = types.SimpleNamespace(experts=types.SimpleNamespace(parameters=lambda: [w1, w2], slot_step_base=base))
    fresh_slot_state(layer, opt, 1)
    fresh_router_row(router, opt, 2)
    assert base.tolist() == [0, 1] and router.row_step_base.tolist() == [0, 0, 1] + [0] * (E - 3)
    for p in (w1, w2):
        for key in ("exp_avg", "exp_avg_sq"):
            assert adam.state[p][key][1].abs().sum() == 0 and adam.state[p][key][0].abs().sum() > 0
    for p in (router.weight, router.threshold):
        for key in ("exp_avg", "exp_avg_sq"):
            rows = adam.state[p][key]
            assert rows[2].abs().sum() == 0 and rows[0].abs().sum() > 0


# --- consistency across ranks (gloo) ---------------------------------------------------------------


def _decide_on_rank(same_records: bool) -> str:
    import torch.distributed as dist

    rank = dist.get_rank()
    router = _router()  # records without a group: each rank keeps its own, as a bug would
    seed = 1 if same_records else 1 + rank
    _record(router, [[]] * 3 + [[0]], [VIS] * 4, _hidden(4, seed))
    d = decide_expert_changes(router, _cfg(tau_min=0.0), layer_number=3, step=6)
    try:
        check_decision_consistent(d, dist.group.WORLD)
    except RuntimeError as e:
        return str(e)
    return "ok"


def test_consistency_check_names_the_layer_when_ranks_disagree():
    assert run_distributed(_decide_on_rank, 2, args=(True,), timeout=60) == ["ok", "ok"]
    msgs = run_distributed(_decide_on_rank, 2, args=(False,), timeout=60)
    for m in msgs:
        assert "ranks disagree" in m and "layer 3" in m and "step 6" in m


# --- the training loop ---------------------------------------------------------------------------

# threshold_init 5: sigmoid(G) = 0.993 is out of reach of sigmoid((s + alpha A) / (1 + alpha)) <= 0.75,
# so no token fires an initial expert (every type, visual included, fires nothing). The added
# expert gets G = 0 (eq. 7) and fires for tokens with a positive score against R_S.
LOOP = (
    "model.num_layers=2",
    "model.seq_length=32",
    "moe.num_initial_experts=2",
    "moe.threshold_init=5.0",
    "moe.dynamics.enabled=true",
    "moe.dynamics.window_steps=2",
    "moe.dynamics.decision_interval=2",
    "moe.dynamics.warmup_steps=1",
    "moe.dynamics.add_threshold=0.5",
    "moe.dynamics.tau_min=0.01",
    "training.train_steps=5",
    "training.global_batch_size=4",
    "training.micro_batch_size=1",
    "logging.log_interval=1",
)


def _snapshot_hooks(trainer) -> None:
    """Around the dynamics hook: R_S of every layer before it, the added row and optimizer state after."""
    from megatron_timeexpert.train.expert_moves import slot_tensors
    from megatron_timeexpert.train.pretrain import _moe_layers

    layers = [layer for m in trainer.models for layer in _moe_layers(m)]
    trainer.snap = {}

    def before(tr):
        if tr.state.step == 2:
            for layer in layers:
                trainer.snap[("rs", layer.layer_number)] = layer.router.records.unrouted_mean().clone()

    def after(tr):
        if tr.state.step != 2:
            return
        for layer in layers:
            n = layer.layer_number
            trainer.snap[("row", n)] = (
                layer.router.weight[2].detach().clone(),
                float(layer.router.threshold[2].detach()),
            )
            phys = int(layer.placement.logical_to_physical[2])
            spr = layer.placement.slots_per_rank
            if phys // spr == layer.ep_rank:
                own = [*layer.experts.parameters(), *layer.experts.buffers()]
                module = {t.data_ptr() for t in own}
                state = [t for t in slot_tensors(layer, tr.optimizer) if t.data_ptr() not in module]
                assert len(state) >= 4  # at least exp_avg and exp_avg_sq of w1 and w2
                trainer.snap[("state_zero", n)] = all(float(t[phys % spr].abs().sum()) == 0 for t in state)
                trainer.snap[("w1", n)] = layer.experts.w1[phys % spr].detach().clone()

    trainer.step_hooks.insert(0, before)
    trainer.step_hooks.append(after)


def _run_loop(cfg):
    from megatron.core import parallel_state

    from megatron_timeexpert.train.expert_dynamics import ExpertDynamicsHook
    from megatron_timeexpert.train.pretrain import Pretrainer

    trainer = Pretrainer(cfg)
    try:
        _snapshot_hooks(trainer)
        result = trainer.train()
        hook = next(h for h in trainer.step_hooks if isinstance(h, ExpertDynamicsHook))
        events = [(d.layer_number, d.step, [(e, g) for e, g in d.added], d.pruned) for d in hook.decisions]
        return result.metrics, events, trainer.snap, cfg.training.seed
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def loops(tmp_path_factory):
    from tests.dist_runs import tiny_config

    out = {}
    for ep in (1, 4):
        cfg = tiny_config(tmp_path_factory.mktemp(f"ep{ep}"), 1, 1, ep, *LOOP, recipe="configs/tiny_timeexpert.yaml")
        out[ep] = run_distributed(_run_loop, ep, args=(cfg,), timeout=240)
    return out


def test_loop_adds_an_expert_that_the_unrouted_tokens_fire_and_prunes_the_idle_ones(loops):
    metrics, events, snap, _ = loops[1][0]
    k_vis = [m["moe/router/k_mean/visual/layer1"] for m in metrics]
    assert k_vis[0] == 0.0 and k_vis[1] == 0.0, k_vis  # steps 1-2: visual tokens fire no expert
    assert all(k > 0.1 for k in k_vis[2:]), k_vis  # after the add at step 2 they fire expert 2
    by = {(layer, step): (added, pruned) for layer, step, added, pruned in events}
    for layer in (1, 2):
        added, pruned = by[(layer, 2)]
        assert [e for e, _ in added] == [2] and pruned == [0]  # expert 1 kept: one must stay active
        torch.testing.assert_close(added[0][1], snap[("rs", layer)], rtol=0, atol=0)  # eq. 7
        row, thr = snap[("row", layer)]
        torch.testing.assert_close(row.double(), snap[("rs", layer)], rtol=0, atol=1e-7)
        assert thr == 0.0 and snap[("state_zero", layer)]
        assert by[(layer, 4)][1] == [1]  # expert 1 (never fired) pruned once expert 2 carries the layer
    # the events are in the metrics of the logged steps (metrics.jsonl)
    assert metrics[1]["dynamics/L1/added/e2"] == 2.0 and metrics[1]["dynamics/L1/pruned/e0"] == 2.0
    assert metrics[3]["dynamics/L2/pruned/e1"] == 4.0
    assert metrics[4]["moe/router/active_experts/layer1"] == 1.0


def test_loop_events_are_the_same_at_ep1_and_ep4(loops):
    # EP=4: one slot per rank, expert 2 lives on EP rank 2
    (m1, ev1, snap1, _), (m4, ev4, snap4, _), (_, ev4c, snap4c, _) = loops[1][0], loops[4][0], loops[4][2]

    def ids(events):
        return [(layer, step, [e for e, _ in added], pruned) for layer, step, added, pruned in events]

    assert ids(ev1) == ids(ev4) == ids(ev4c)
    for a, b in zip(ev1, ev4):
        for (_, g1), (_, g2) in zip(a[2], b[2]):
            torch.testing.assert_close(g1, g2, rtol=0, atol=1e-12)  # R_S summed in another order
    # same fresh FFN weights for expert 2 as at EP=1, and fresh Adam state
    for layer in (1, 2):
        torch.testing.assert_close(snap4c[("w1", layer)], snap1[("w1", layer)], rtol=0, atol=0)
        assert snap4c[("state_zero", layer)] and ("w1", layer) not in snap4
    assert [m["dynamics/L1/added/e2"] for m in (m1[1], m4[1])] == [2.0, 2.0]


def test_router_options_and_dynamics_are_reachable_from_the_yaml():
    from megatron_timeexpert.config import ConfigError, load_config
    from megatron_timeexpert.model.gpt import router_config

    cfg = load_config(
        "configs/tiny_timeexpert.yaml",
        [
            "moe.num_initial_experts=2",
            "moe.weighting=gate",
            "moe.rate_decay=0.9",
            "moe.expert_norm_coeff=0.0",
            "moe.empty_token_policy=top1",
            "moe.eval_empty_token_policy=zero",
            "moe.dynamics.enabled=true",
            "moe.dynamics.window_steps=5",
            "moe.dynamics.decision_interval=20",
            "moe.dynamics.tau_min=0.05",
        ],
    )
    r = router_config(cfg)
    assert (r.num_initial_experts, r.weighting, r.rate_decay, r.expert_norm_coeff) == (2, "gate", 0.9, 0.0)
    assert (r.empty_token_policy, r.eval_empty_token_policy) == ("top1", "zero")
    d = cfg.moe.dynamics
    assert (d.enabled, d.window_steps, d.decision_interval, d.tau_min) == (True, 5, 20, 0.05)
    assert cfg.to_dict()["moe"]["dynamics"]["tau_min"] == 0.05
    with pytest.raises(ConfigError, match=r"moe\.dynamics\.tau_min=-1\.0"):
        load_config("configs/tiny_timeexpert.yaml", ["moe.dynamics.tau_min=-1"])
    with pytest.raises(ConfigError, match=r"moe\.dynamics\.typo"):
        load_config("configs/tiny_timeexpert.yaml", ["moe.dynamics.typo=1"])
    with pytest.raises(ConfigError, match=r"moe\.num_initial_experts=5"):
        load_config("configs/tiny_timeexpert.yaml", ["moe.num_initial_experts=5"])


def test_hook_logs_one_line_per_layer_decision_and_reports_events(caplog):
    """The step hook on one process, with a fake trainer around a real MoE layer."""
    import logging

    from megatron.core.transformer import TransformerConfig

    from megatron_timeexpert.moe.layer import MoELayerConfig, TimeExpertMoELayer
    from megatron_timeexpert.train.expert_dynamics import ExpertDynamicsHook

    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=16)
    torch.manual_seed(0)
    router = RouterConfig(num_experts=E, num_initial_experts=2, threshold_init=5.0).build(H)
    layer = TimeExpertMoELayer(config, router, MoELayerConfig(num_experts=E), layer_number=3)
    adam = torch.optim.Adam(layer.parameters())
    for _ in range(2):  # two steps on which no token fires an expert
        x = torch.randn(5, 2, H)
        out, _ = layer(x, token_type=torch.full((2, 5), VIS))
        out.sum().backward()
        adam.step()
        layer.finish_step()
    trainer = types.SimpleNamespace(
        models=[torch.nn.ModuleList([layer])],
        optimizer=types.SimpleNamespace(optimizer=adam),
        state=types.SimpleNamespace(step=2),
        hook_metrics={},
    )
    hook = ExpertDynamicsHook(_cfg(window_steps=2, decision_interval=2, warmup_steps=1, tau_min=0.01))
    with caplog.at_level(logging.INFO, logger="megatron_timeexpert.train.expert_dynamics"):
        hook(trainer)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("expert dynamics: layer 3 step 2: added [2] pruned [0] skipped:")
    assert trainer.hook_metrics == {
        "dynamics/L3/added/e2": 2.0,
        "dynamics/L3/pruned/e0": 2.0,
        "dynamics/L3/skipped": 1.0,
    }
    assert router.active.tolist() == [False, True, True, False]
    assert float(router.records.window_type_tokens.sum()) == 0  # the window ended at step 2
    for key in ("exp_avg", "exp_avg_sq"):
        assert adam.state[layer.experts.w1][key][2].abs().sum() == 0
        assert adam.state[router.weight][key][2].abs().sum() == 0
    trainer.state.step = 3  # no decision, no window end
    hook(trainer)
    assert len(hook.decisions) == 1
