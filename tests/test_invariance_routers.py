"""Layout invariance of the pretraining loop with the OTHER routers (tests/test_invariance.py covers
the TimeExpert router at every layout), and the TimeExpert router's training run at EP = 2 checked
against the single-process run.

- ``moe.router=topk`` (our MoE layer, softmax top-k, Switch load-balancing loss and z-loss ON) and
  ``moe.router=megatron`` (megatron-core's own MoE layer; its load-balancing loss is off, it is
  defined per micro-batch and rank by megatron) at (2,2,2) on 4 ranks against one process at
  (1,1,1): per-step losses and grad norms (clipping active, no LR warm-up, 4 steps), and the final
  state's checksums (every parameter and Adam moment by global name).
- The TimeExpert router at (1,1,2) on 2 ranks, from scratch (no init checkpoint: weights are drawn
  full-size on the CPU and expert slots are seeded by logical id, so every layout starts from the
  same weights) with its default aux and z losses: its losses, grad norms and logged routing (mean
  experts per token by type, aux and z values) equal those of the single-process run, and it learns.

Tolerance: as in tests/test_invariance.py (rtol 2e-5; reordered fp32 sums).

Run: ``pytest -q tests/test_invariance_routers.py`` (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import math

import pytest

from tests.dist_runs import from_checkpoint, init_checkpoint, mismatches, tiny_config, train_checked

pytestmark = pytest.mark.slow

RTOL = 2e-5
NUM_EXPERTS = 4  # configs/tiny_moe.yaml
TYPES = ("VISUAL", "TEXT", "TIME", "SCORE")
OVERRIDES = {
    "topk": ("moe.router=topk", "moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001"),
    "megatron": ("moe.router=megatron", "moe.aux_loss_coeff=0.0"),
}
TRAINING = ("training.lr_warmup_steps=0", "training.clip_grad=0.3")


@pytest.mark.parametrize("router", sorted(OVERRIDES))
def test_layout_invariance_of_the_other_routers(router, tmp_path):
    init = init_checkpoint(tmp_path / "init", *OVERRIDES[router])
    ref = train_checked(from_checkpoint(tmp_path / "ref", init, 1, 1, 1, 4, *OVERRIDES[router], *TRAINING), 1)
    assert ref.result.losses[-1] < ref.result.losses[0], "the reference run does not learn"
    run = train_checked(from_checkpoint(tmp_path / "run", init, 2, 2, 2, 4, *OVERRIDES[router], *TRAINING), 4)
    assert mismatches(run, ref, RTOL) == []


def test_timeexpert_router_trains_at_ep2_as_on_one_process(tmp_path):
    """(1,1,2) on 2 processes with the default aux loss (task concentration + expert norm) and z-loss
    equals (1,1,1) on one process step by step: losses, grad norms, the routing it logs."""
    steps = ("moe.router=timeexpert", "training.train_steps=8", "logging.log_interval=1")
    one = train_checked(tiny_config(tmp_path / "one", 1, 1, 1, *steps), 1)
    two = train_checked(tiny_config(tmp_path / "two", 1, 1, 2, *steps), 2)
    assert two.result.losses[-1] < two.result.losses[0] - 0.1, two.result.losses
    assert mismatches(two, one, RTOL) == []
    assert len(two.result.metrics) == 8
    for step, (got, want) in enumerate(zip(two.result.metrics, one.result.metrics), start=1):
        assert got["moe/loss/aux"] > 0, "the aux loss is not on"
        for key in [f"moe/experts_per_token/{t}" for t in TYPES] + ["moe/loss/aux", "moe/loss/z"]:
            assert 0.0 <= got[key] <= NUM_EXPERTS or "loss" in key, (step, key, got[key])
            assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-9), (step, key, got[key], want[key])
