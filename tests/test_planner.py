"""Placement planner and its greedy-packing baseline (pure logic), and the placement simulator CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from parallel.placement import ExpertPlacement
from parallel.planner import (
    Move,
    PlannerConfig,
    apply_moves,
    greedy_pack,
    plan_greedy_packing,
    plan_placement,
)


def _rank_loads(load, mapping, spr):
    out = {}
    for e, p in enumerate(mapping):
        out[p // spr] = out.get(p // spr, 0.0) + float(load[e])
    return out


def _check_plan(plan, load, old_map, spr):
    """The map is a permutation, the moves turn the old map into it, stayers keep their slot."""
    new_map = list(plan.logical_to_physical)
    assert sorted(new_map) == list(range(len(load)))
    assert apply_moves(old_map, plan.moves, spr) == new_map
    moved = {m.expert for m in plan.moves}
    for e in range(len(load)):
        if e in moved:
            assert old_map[e] // spr != new_map[e] // spr, "a move must change rank"
        else:
            assert old_map[e] == new_map[e], "an expert that stays on its rank keeps its slot"
    assert [m.expert for m in plan.moves] == sorted(moved)
    loads = _rank_loads(load, new_map, spr)
    assert plan.max_load_after == pytest.approx(max(loads.values()))
    assert plan.max_load_before == pytest.approx(max(_rank_loads(load, old_map, spr).values()))
    ExpertPlacement(plan.ep_size, plan.slots_per_rank, plan.map_tensor())  # installs


def test_balanced_input_moves_nothing():
    load = [1.0] * 8
    plan = plan_placement(load, [3, 2, 1, 0, 7, 6, 5, 4], ep_size=4, slots_per_rank=2)
    assert plan.moves == () and plan.strategy == "keep"
    assert plan.logical_to_physical == (3, 2, 1, 0, 7, 6, 5, 4)
    assert plan.imbalance_before == plan.imbalance_after == 1.0


def test_one_hot_rank_is_relieved_by_one_swap():
    # Rank 0 holds experts 0 and 1 (load 4 each); the rest carry 1. Best max = 5 (the two 4s apart),
    # reachable with one swap = 2 moved experts, the fewest possible (every slot is always full).
    load = [4, 4, 1, 1, 1, 1, 1, 1]
    plan = plan_placement(load, None, ep_size=4, slots_per_rank=2)
    _check_plan(plan, load, list(range(8)), 2)
    assert plan.max_load_before == 8 and plan.max_load_after == 5
    assert plan.experts_moved == 2
    # ties broken by ids: the lowest hot id goes to the lowest least-loaded rank, swapped with its lowest id
    assert plan.moves == (Move(0, 0, 0, 1, 0), Move(2, 1, 0, 0, 0))
    assert plan.logical_to_physical == (2, 1, 0, 3, 4, 5, 6, 7)


def test_ties_are_deterministic():
    rng = np.random.default_rng(3)
    load = rng.integers(0, 4, 64).astype(float)  # many exact ties
    mapping = rng.permutation(64).tolist()
    plans = [plan_placement(list(load), mapping, 8, 8) for _ in range(3)]
    plans.append(plan_placement(torch.tensor(load), torch.tensor(mapping), 8, 8))
    assert all(p == plans[0] for p in plans[1:])
    assert plan_greedy_packing(load, mapping, 8, 8) == plan_greedy_packing(load, mapping, 8, 8)


def test_inactive_experts_take_the_hot_ones_place():
    # Experts 0, 1 (load 3) share rank 0; all others are inactive (load 0). One swap with an
    # inactive expert puts the two hot ones apart: max 3 = the largest single expert (optimal).
    load = [3, 3, 0, 0, 0, 0, 0, 0]
    plan = plan_placement(load, None, 4, 2)
    _check_plan(plan, load, list(range(8)), 2)
    assert plan.max_load_after == 3 and plan.lower_bound == 3
    assert plan.experts_moved == 2
    assert {m.expert for m in plan.moves} == {0, 2}
    # all inactive: nothing to balance, nothing moves
    idle = plan_placement([0.0] * 8, None, 4, 2)
    assert idle.moves == () and idle.imbalance_after == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(load=[1.0] * 7), "load must have one entry per expert"),
        (dict(load=[1.0, float("nan")] + [1.0] * 6), "load must be finite"),
        (dict(load=[1.0, -1.0] + [1.0] * 6), "load must be >= 0"),
        (dict(load=[[1.0] * 8]), "load must be 1-D"),
        (dict(load=["a"] * 8), "load must hold numbers"),
        (dict(current_map=[0, 0, 1, 2, 3, 4, 5, 6]), "current_map must be a permutation"),
        (dict(current_map=[0, 1, 2]), "current_map must have 8 entries"),
        (dict(current_map=[0.5, 1, 2, 3, 4, 5, 6, 7]), "current_map must hold integer"),
        (dict(ep_size=0, slots_per_rank=8), "ep_size must be an integer >= 1"),
        (dict(slots_per_rank=2.5), "slots_per_rank must be an integer >= 1"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    args = dict(load=[1.0] * 8, current_map=None, ep_size=4, slots_per_rank=2) | kwargs
    with pytest.raises(ValueError, match=match):
        plan_placement(**args)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="PlannerConfig.tolerance"):
        PlannerConfig(tolerance=-0.1)
    with pytest.raises(ValueError, match="PlannerConfig.candidate_ranks"):
        PlannerConfig(candidate_ranks=0)
    with pytest.raises(ValueError, match="PlannerConfig.bytes_per_expert"):
        PlannerConfig(bytes_per_expert=-1)
    with pytest.raises(ValueError, match="PlannerConfig.max_swaps"):
        PlannerConfig(max_swaps=-1)
    with pytest.raises(TypeError, match="config must be a PlannerConfig"):
        plan_placement([1.0] * 4, None, 2, 2, config={"tolerance": 0.1})
    with pytest.raises(ValueError, match="bytes_per_expert"):
        plan_greedy_packing([1.0] * 4, None, 2, 2, bytes_per_expert=-5)


def test_tolerance_trades_balance_for_moves():
    rng = np.random.default_rng(7)
    load = rng.lognormal(0, 1, 256)
    plans = {tol: plan_placement(load, None, 32, 8, PlannerConfig(tolerance=tol)) for tol in (0.0, 0.05, 0.2, 100.0)}
    moved = [plans[t].experts_moved for t in (0.0, 0.05, 0.2, 100.0)]
    assert moved == sorted(moved, reverse=True) and moved[0] > moved[-1]
    for tol, p in plans.items():
        assert p.max_load_after <= p.best_max_load * (1 + tol) + 1e-9
    assert plans[100.0].moves == () and plans[100.0].strategy == "keep"  # the current map is within 100x
    # bytes follow the moves
    p = plan_placement(load, None, 32, 8, PlannerConfig(bytes_per_expert=1000))
    assert p.bytes_moved == 1000 * p.experts_moved > 0


def test_greedy_pack_by_hand():
    # loads 8..1 on 2 ranks x 4 slots: 8->r0, 7->r1, 6->r1 (7<8), 5->r0 (8<13), 4->r0 (13=13, lower id),
    # 3->r1 (16<17), 2->r1 (16<17), r1 is full, 1->r0. Both ranks end at 18.
    load = [8, 7, 6, 5, 4, 3, 2, 1]
    assert greedy_pack(load, 2, 4).tolist() == [[0, 3, 4, 7], [1, 2, 5, 6]]
    plan = plan_greedy_packing(load, None, 2, 4)
    # stayers keep their slot (0, 3 on rank 0; 5, 6 on rank 1); arrivals take the freed slots by id
    assert plan.logical_to_physical == (0, 4, 7, 3, 1, 5, 6, 2)
    assert plan.max_load_after == 18 and plan.strategy == "greedy-packing"
    assert {m.expert for m in plan.moves} == {1, 2, 4, 7}  # what changed rank


def test_greedy_baseline_invariants():
    rng = np.random.default_rng(11)
    for ep, spr in ((1, 5), (3, 1), (8, 4), (16, 16)):
        load = rng.lognormal(0, 1.5, ep * spr)
        mapping = rng.permutation(ep * spr).tolist()
        bins = greedy_pack(load, ep, spr)
        assert sorted(bins.reshape(-1).tolist()) == list(range(ep * spr))
        assert bins[0, 0] == int(np.argmax(load))  # the heaviest goes first, to rank 0
        plan = plan_greedy_packing(load, mapping, ep, spr)
        _check_plan(plan, load, mapping, spr)
        assert plan.max_load_after >= plan.lower_bound - 1e-9
    # equal loads pack perfectly
    assert plan_greedy_packing([2.0] * 12, None, 3, 4).imbalance_after == 1.0


@pytest.mark.parametrize("seed", range(40))
def test_random_loads_against_the_lower_bound(seed):
    rng = np.random.default_rng(seed)
    ep = int(rng.choice([1, 2, 4, 8, 32]))
    spr = int(rng.choice([1, 2, 4, 16]))
    n = ep * spr
    kind = seed % 3
    if kind == 0:
        load = 1.0 / np.arange(1, n + 1) ** rng.uniform(0.5, 1.5)
        load = load[rng.permutation(n)]
    elif kind == 1:
        load = rng.lognormal(0, rng.uniform(0.3, 2.0), n)
    else:
        load = rng.integers(0, 10, n).astype(float)
        load[rng.random(n) < 0.3] = 0.0  # inactive experts
    mapping = rng.permutation(n).tolist()
    tol = float(rng.choice([0.0, 0.02, 0.1]))
    plan = plan_placement(load, mapping, ep, spr, PlannerConfig(tolerance=tol))
    _check_plan(plan, load, mapping, spr)
    lower = max(load.sum() / ep, load.max())
    assert plan.lower_bound == pytest.approx(lower)
    assert lower - 1e-9 <= plan.best_max_load <= plan.max_load_after <= plan.max_load_before + 1e-9
    assert plan.max_load_after <= plan.best_max_load * (1 + tol) + 1e-9
    greedy = plan_greedy_packing(load, mapping, ep, spr)
    assert plan.best_max_load <= greedy.max_load_after + 1e-9  # the packing is one of our candidates
    assert plan.max_load_after <= greedy.max_load_after * (1 + tol) + 1e-9
    if plan.max_load_before <= plan.best_max_load * (1 + tol):
        assert plan.moves == ()


def test_large_case_is_fast_and_moves_little():
    rng = np.random.default_rng(0)
    load = rng.lognormal(0, 1, 4096)
    plan = plan_placement(load, None, 1024, 4)
    greedy = plan_greedy_packing(load, None, 1024, 4)
    assert plan.plan_time_s < 5.0  # the benchmark measures the real figure; this machine is shared
    assert plan.max_load_after <= greedy.max_load_after * 1.02
    assert plan.experts_moved <= greedy.experts_moved / 4


def test_simulator_cli_tiny(tmp_path, capsys):
    from tools.placement_sim import main

    out = tmp_path / "sim.json"
    assert main(["--loads", "hotspot", "--ep", "4", "--experts", "16", "--steps", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ours" in printed and "greedy" in printed
    result = json.loads(out.read_text())
    assert len(result["records"]) == 3
    for name in ("ours", "greedy"):
        s = result["summary"][name]
        assert s["replans"] == 3 and s["imbalance_after_mean"] <= s["imbalance_before_mean"] + 1e-9
        assert s["bytes_moved_total"] == s["experts_moved_total"] * result["bytes_per_expert"]

    # a routing trace: 2 layers x 8 experts, 4 steps, re-plan every 2 steps
    trace = tmp_path / "routing.jsonl"
    rng = np.random.default_rng(0)
    lines = [json.dumps({"step": s, "tokens": rng.integers(0, 50, (2, 8)).tolist()}) for s in range(4)]
    trace.write_text("\n".join(lines) + "\n")
    assert main(["--loads", f"trace:{trace}", "--ep", "2", "--every", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["step"], r["layer"]) for r in result["records"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]

    with pytest.raises(SystemExit):
        main(["--loads", "zipf", "--ep", "3", "--experts", "16"])  # not a multiple
    trace.write_text('{"step": 0, "tokens": [1, 2]}\n')
    with pytest.raises(SystemExit, match="tokens"):
        main(["--loads", f"trace:{trace}", "--ep", "2"])


def test_benchmark_rows_render(tmp_path):
    from bench.placement import render, run_case

    rows = [run_case("hotspot", "hotspot", {}, 32, 4, 2, 0, PlannerConfig())]
    assert rows[0]["replans"] == 2 and rows[0]["ours_over_greedy_max"] <= 1.02 + 1e-9
    aims = dict(
        within_2pct="met",
        worst_ratio=1.0,
        quarter_moves="met",
        worst_moved_ratio=0.1,
        under_1s="met",
        max_ms_4096_1024=1.0,
    )
    text = render(rows, {"machine": "test", "command": "x", "steps": 2, "aims": aims})
    assert "| hotspot | 32 | 4 |" in text and "Aims" in text
