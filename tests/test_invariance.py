"""The invariances of DESIGN.md for the pretraining loop on real megatron-core layers (gloo).

- Layout: the same initial weights (one checkpoint written by a single process, loaded into
  every layout) and the same data give the same per-step losses at (TP,PP,EP) = (1,1,1) on one
  process and (1,1,1), (2,1,2), (1,2,2), (2,2,2) and (1,2,2) with 2 virtual stages (interleaved
  schedule) on four.
- Resume: 2N steps straight equal N steps, stop, resume, N more -- bitwise on CPU.
- Re-layout: a checkpoint saved at (TP2, PP2, EP2) continues at (TP1, PP1, EP4) with the losses
  of the uninterrupted (2,2,2) run.

Tolerance for layout changes: rtol 2e-5 on fp32 losses of ~5.5. TP splits every matmul into partial
sums that are all-reduced and DP/microbatch splits regroup the per-token loss sums, so results
differ by reordered fp32 additions (~1e-7 relative per op); three Adam steps amplify that to
~1e-6. A real layout bug (a wrong shard, a missing all-reduce, a doubled gradient) moves the loss
by 1e-3 or more. The Switch load-balancing loss is switched off here (moe.aux_loss_coeff=0)
because it is defined per micro-batch and per rank: its value depends on how the batch is split,
by definition, not by a bug.
"""

from __future__ import annotations

import math
import shutil

import pytest

from tests.dist_runs import from_checkpoint, init_checkpoint, tiny_config, train

pytestmark = pytest.mark.slow

STEPS = 3
RTOL = 2e-5


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """Random initial weights written once by a single process at layout (1,1,1)."""
    return init_checkpoint(tmp_path_factory.mktemp("init"))


def _from_init(tmp_path, init_ckpt, tp, pp, ep):
    return from_checkpoint(tmp_path, init_ckpt, tp, pp, ep, STEPS, "moe.aux_loss_coeff=0.0")


@pytest.fixture(scope="module")
def reference_losses(init_ckpt, tmp_path_factory):
    """The single-process reference run."""
    return train(_from_init(tmp_path_factory.mktemp("ref"), init_ckpt, 1, 1, 1), 1).losses


@pytest.mark.parametrize(
    "layout",
    [(1, 1, 1, None), (2, 1, 2, None), (1, 2, 2, None), (2, 2, 2, None), (1, 2, 2, 2)],
    ids=lambda t: f"tp{t[0]}-pp{t[1]}-ep{t[2]}" + (f"-vpp{t[3]}" if t[3] else ""),
)
def test_layout_invariance(layout, init_ckpt, reference_losses, tmp_path):
    cfg = _from_init(tmp_path, init_ckpt, *layout[:3])
    cfg.parallel.vpp = layout[3]
    losses = train(cfg, 4).losses
    assert len(losses) == len(reference_losses) == STEPS
    assert reference_losses[-1] < reference_losses[0], "the reference run does not learn"
    for step, (got, want) in enumerate(zip(losses, reference_losses)):
        assert math.isclose(got, want, rel_tol=RTOL), f"step {step}: layout {layout} loss {got!r} != {want!r}"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Six steps without interruption at (2,2,2), for the resume and re-layout tests."""
    tmp = tmp_path_factory.mktemp("straight")
    return train(tiny_config(tmp, 2, 2, 2, "training.train_steps=6"), 4).losses


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    """The same six-step run stopped after three steps with a checkpoint (its process group ends)."""
    tmp = tmp_path_factory.mktemp("half")
    cfg = tiny_config(
        tmp, 2, 2, 2, "training.train_steps=6", "training.stop_at_step=3", f"training.save_dir={tmp / 'ckpt'}"
    )
    result = train(cfg, 4)
    return result, tmp / "ckpt"


def test_resume_is_bitwise(straight_run, half_run, tmp_path):
    first, half_dir = half_run
    assert first.losses == straight_run[:3]
    save_dir = tmp_path / "ckpt"
    shutil.copytree(half_dir, save_dir)  # the resumed run writes here; keep half_run's folder intact
    cfg = tiny_config(
        tmp_path, 2, 2, 2, "training.train_steps=6", f"training.save_dir={save_dir}", "training.resume=true"
    )
    resumed = train(cfg, 4)
    assert resumed.first_step == 3
    # Bitwise: same layout, same reduction order, RNG/optimizer/scheduler/data position restored.
    assert resumed.losses == straight_run[3:], (resumed.losses, straight_run[3:])


def test_checkpoint_loads_into_another_layout(straight_run, half_run, tmp_path):
    _, save_dir = half_run
    cfg = tiny_config(
        tmp_path, 1, 1, 4, "training.train_steps=6", "training.stop_at_step=5", f"training.load_dir={save_dir}"
    )
    moved = train(cfg, 4)
    assert moved.first_step == 3
    # Step 4 checks the resharded weights, step 5 the resharded Adam state and LR schedule.
    for got, want in zip(moved.losses, straight_run[3:5]):
        assert math.isclose(got, want, rel_tol=RTOL), (moved.losses, straight_run[3:5])
