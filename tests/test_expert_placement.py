"""Placement re-planning in the training loop (train/expert_placement.py, ``moe.placement``):
re-plans after adds/prunes and on imbalance, migrations that change no loss, resume and re-layout
across an add, a prune and a migration, the routing trace, and the real recipe's run.

- Resume: 6 steps straight (checkpoint at step 3) against a resume from that checkpoint: bitwise in
  losses, grad norms and every state tensor (expert set, map, records, per-slot steps, Adam state).
  The run adds and prunes experts at step 2 and step 4 and migrates experts at both.
- Re-layout: the same step-3 checkpoint (EP=2) continues at EP=4 with the straight run's steps 4-6.
- Forced re-plans every 2 steps (EP=4, 8 experts) against a run that never re-plans.
- The recipe ``configs/tiny_dynamic.yaml`` through ``timeexpert pretrain --nproc 4``.

Run: ``pytest -q tests/test_expert_placement.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_timeexpert.config import ConfigError, load_config
from parallel.planner import rank_imbalance
from tests.dist_runs import CheckedRun, from_checkpoint, init_checkpoint, mismatches, tiny_config, train_checked

RECIPE = "configs/tiny_dynamic.yaml"
MAP = "placement.logical_to_physical"
# EP=2 (2 processes), 8 slots per layer, 4 active at start; thresholds that leave tokens unrouted:
# experts are added and pruned at steps 2 and 4, and each change re-plans and migrates.
DYN = (
    "parallel.pp=1",
    "model.num_layers=2",
    "model.seq_length=32",
    "moe.threshold_init=0.2",
    "moe.dynamics.window_steps=2",
    "moe.dynamics.decision_interval=2",
    "moe.dynamics.warmup_steps=1",
    "moe.dynamics.add_threshold=0.2",
    "moe.dynamics.tau_min=0.02",
    "moe.placement.check_interval=2",
    "moe.placement.warmup_steps=0",
    "moe.placement.load_window_steps=2",
    "training.train_steps=6",
    "training.global_batch_size=4",
    "training.micro_batch_size=1",
    "logging.log_interval=1",
)


def _events(run: CheckedRun, prefix: str) -> dict[str, float]:
    return {k: v for m in run.result.metrics for k, v in m.items() if k.startswith(prefix)}


def test_rebalance_config_from_yaml_and_its_errors():
    cfg = load_config(RECIPE, ["moe.placement.imbalance_threshold=1.3", "moe.placement.force_interval=5"])
    assert cfg.moe.placement.imbalance_threshold == 1.3 and cfg.moe.placement.force_interval == 5
    assert cfg.moe.placement.load_decay == pytest.approx(1 - 1 / cfg.moe.placement.load_window_steps)
    for override, name in [
        ("moe.placement.imbalance_threshold=1.0", "moe.placement.imbalance_threshold"),
        ("moe.placement.check_interval=0", "moe.placement.check_interval"),
        ("moe.placement.tolerance=-0.1", "moe.placement.tolerance"),
        ("moe.router=megatron", "moe.dynamics.enabled"),
    ]:
        with pytest.raises(ConfigError, match=name):
            load_config(RECIPE, [override]).validate()


def test_rank_imbalance_by_hand():
    # 2 ranks x 2 slots; experts 0,1 on rank 0 (loads 3+1), experts 2,3 on rank 1 (0+0): max 4, mean 2.
    assert rank_imbalance([3, 1, 0, 0], None, 2, 2) == 2.0
    # map puts expert 1 in slot 2 (rank 1) and expert 2 in slot 1: ranks 3+0 and 1+0 -> 3 / 2.
    assert rank_imbalance([3, 1, 0, 0], [0, 2, 1, 3], 2, 2) == 1.5
    assert rank_imbalance([0, 0, 0, 0], None, 2, 2) == 1.0


# --- resume and re-layout across an add, a prune and a migration ---------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps at EP=2 with a checkpoint after step 3 (and 6), routing trace on."""
    tmp = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(
        tmp,
        1,
        1,
        2,
        *DYN,
        f"training.save_dir={tmp / 'ckpt'}",
        "training.save_interval=3",
        "moe.placement.trace=true",
        recipe=RECIPE,
    )
    return train_checked(cfg, 2), tmp


def _last3(run: CheckedRun) -> CheckedRun:
    r = run.result
    return CheckedRun(replace(r, losses=r.losses[-3:], grad_norms=r.grad_norms[-3:]), run.checksums)


def _step3_copy(straight_tmp: Path, dst: Path) -> Path:
    shutil.copytree(straight_tmp / "ckpt" / "iter_0000003", dst / "iter_0000003")
    return dst


@pytest.mark.slow
def test_the_run_adds_prunes_and_migrates_on_both_sides_of_the_checkpoint(straight):
    run, _ = straight
    events = _events(run, "dynamics/")
    pruned = {k: v for k, v in events.items() if "/pruned/" in k}
    added = {k: v for k, v in events.items() if "/added/" in k}
    assert 2.0 in added.values() and 4.0 in added.values(), added
    assert 2.0 in pruned.values(), pruned
    per_step = {m.get("placement/L2/replan_step"): m for m in run.result.metrics if "placement/L2/replan_step" in m}
    for step in (2.0, 4.0):  # re-planned after the dynamics events, and experts changed rank
        m = per_step[step]
        assert m["placement/L2/remote_moves"] > 0 and m["placement/L2/bytes_moved"] > 0, m
        assert m["placement/L2/imbalance_after"] < m["placement/L2/imbalance_before"], m
    assert run.result.losses[-1] < run.result.losses[0]


@pytest.mark.slow
def test_resume_across_add_prune_and_migration_is_bitwise(straight, tmp_path):
    run, tmp = straight
    save_dir = _step3_copy(tmp, tmp_path / "ckpt")
    cfg = tiny_config(tmp_path, 1, 1, 2, *DYN, f"training.save_dir={save_dir}", "training.resume=true", recipe=RECIPE)
    resumed = train_checked(cfg, 2)
    assert resumed.result.first_step == 3
    assert mismatches(resumed, _last3(run), rtol=0.0) == []
    assert any(MAP in k for k in resumed.checksums) and any("slot_step_base" in k for k in resumed.checksums)
    # the step-4 events happen again after the resume
    assert _events(resumed, "dynamics/") == {k: v for k, v in _events(run, "dynamics/").items() if v > 3}


@pytest.mark.slow
def test_checkpoint_after_moves_continues_at_another_ep(straight, tmp_path):
    """EP=2 step-3 checkpoint (experts added, pruned and moved) -> EP=4: every expert's weights and
    Adam state follow it by logical id; steps 4-6 equal the EP=2 run's to reordering tolerance."""
    run, tmp = straight
    cfg = tiny_config(tmp_path, 1, 1, 4, *DYN, f"training.load_dir={tmp / 'ckpt' / 'iter_0000003'}", recipe=RECIPE)
    moved = train_checked(cfg, 4)
    assert moved.result.first_step == 3
    assert mismatches(moved, _last3(run), rtol=2e-5, ignore=(MAP,)) == []
    assert {k for k, v in _events(moved, "dynamics/").items()} == {
        k for k, v in _events(run, "dynamics/").items() if v > 3
    }


@pytest.mark.slow
def test_routing_trace_feeds_the_simulator(straight, capsys):
    from tools.placement_sim import main as sim

    _, tmp = straight
    path = tmp / "run" / "routing_trace" / "pp0.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6] and lines[0]["layers"] == [1, 2]
    # every step routes each of the global batch's 4 x 32 tokens to a whole number of experts >= 0
    assert all(len(t) == 8 and all(v >= 0 for v in t) for x in lines for t in x["tokens"])
    assert sim(["--loads", f"trace:{path}", "--ep", "2", "--every", "2", "--no-progress"]) == 0
    assert "ours" in capsys.readouterr().out


# --- forced re-plans change nothing -------------------------------------------------------------------

FORCED = ("moe.num_experts=8", "training.lr_warmup_steps=0", "training.clip_grad=0.3", "logging.log_interval=1")


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory.mktemp("init"), *FORCED, "moe.router=timeexpert")


@pytest.mark.slow
def test_forced_replans_every_two_steps_are_placement_invariant(init_ckpt, tmp_path):
    common = (*FORCED, "moe.router=timeexpert", "moe.placement.load_window_steps=1")
    still = train_checked(from_checkpoint(tmp_path / "still", init_ckpt, 1, 1, 4, 6, *common), 4)
    moving = train_checked(
        from_checkpoint(
            tmp_path / "moving",
            init_ckpt,
            1,
            1,
            4,
            6,
            *common,
            "moe.placement.enabled=true",
            "moe.placement.force_interval=2",
        ),
        4,
    )
    moves = sum(v for k, v in _events(moving, "placement/").items() if k.endswith("/remote_moves"))
    assert moves > 0, "the forced re-plans moved nothing: the comparison would prove nothing"
    assert mismatches(moving, still, rtol=2e-5, ignore=(MAP,)) == []


# --- the recipe ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_recipe_adds_prunes_and_rebalances_with_falling_loss(tmp_path):
    """``timeexpert pretrain --config configs/tiny_dynamic.yaml --nproc 4`` (shortened to 24 steps)."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "megatron_timeexpert.cli",
        "pretrain",
        "--config",
        RECIPE,
        "--nproc",
        "4",
        "training.train_steps=24",
        "training.save_dir=null",
        "logging.progress_bar=false",
        "logging.wandb=false",
        "logging.tensorboard=false",
        f"logging.run_dir={run_dir}",
    ]
    env = {**os.environ, "MASTER_PORT": "29647"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "expert dynamics: layer 1 step" in log and "expert placement: layer 1 step" in log
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in rows for k in r}
    assert any("/added/" in k for k in keys) and any("/pruned/" in k for k in keys), sorted(keys)
    rebalanced = [
        (r[f"{p}/imbalance_before"], r[f"{p}/imbalance_after"])
        for r in rows
        for p in {k.rsplit("/", 1)[0] for k in r if k.endswith("/remote_moves")}
        if r[f"{p}/remote_moves"] > 0
    ]
    assert rebalanced, "no rebalance moved an expert"
    assert all(after < before for before, after in rebalanced), rebalanced
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses
