"""The invariances of DESIGN.md for the full pretraining loop with OUR MoE layer and the TimeExpert
router (adaptive-k gating, records, A_t), aux and z losses ON, gradient clipping ACTIVE, on gloo.

- Layout: one init checkpoint written by a single process is loaded into every layout, which trains
  6 steps on the same data (no LR warm-up: every step updates the weights). Per step, the loss AND
  the global gradient norm must equal the single-process run's, and after the run a checksum of
  every parameter, buffer (routing records, A_t, placement map) and optimizer-state tensor (both
  Adam moments of every expert slot, by global name; train/checksum.py) must too. Layouts (TP, PP,
  EP): (1,1,1) on 4 ranks (DP 4), (2,1,1), (2,1,2), (1,2,2), (2,2,2), and (1,2,2) with 2 virtual
  stages; the (2,2,2) run moves every logical expert to another slot and rank before the first
  step (a placement map that is not the identity).
- Re-layout: that (2,2,2) run's checkpoint of step 3 (permuted map) continues at (1,1,4) with the
  reference's steps 4-6.
- Resume: 6 steps straight equal 3 + stop + resume + 3, BITWISE (losses, grad norms, every state
  tensor) at (2,2,2), with dropout on (so the RNG state matters), a permuted placement map, and an
  LR schedule that changes after the resume point (warm-up ends at step 4).
- Recomputation: at (1,2,2) with 4 microbatches per rank, megatron's full and selective activation
  recomputation give the same losses, grad norms and state (records included: every token is
  counted once) as no recomputation.

Every comparison has a twin that plants a known error and shows the comparison catches it
(``tests.dist_runs.Plant``): a doubled router gradient, a skipped TP all-reduce of the LayerNorm
gradients, a wrong RNG state or a scheduler not restored after a resume, an identity map installed
over a permuted checkpoint, routing records counted twice.

Tolerance for layout changes: rtol 2e-5 on losses and grad norms, and 2e-5 of each tensor's
absolute sum on its checksum. TP splits matmuls into partial sums, DP and microbatches regroup the
loss sums and EP regroups expert outputs, so results differ by reordered fp32 additions (~1e-7
relative per op, a few 1e-7 after 6 Adam steps; measured: at most 3e-7 on losses). The planted
errors move the compared numbers by 3e-4 or more (a doubled router gradient: the grad norm by 3e-4
relative and the router's Adam moments by 2x).

Run: ``pytest -q tests/test_invariance.py`` (about 7 minutes on 2 cores).
"""

from __future__ import annotations

import shutil

import pytest

from tests.dist_runs import CheckedRun, Plant, from_checkpoint, init_checkpoint, mismatches, tiny_config, train_checked

pytestmark = pytest.mark.slow

STEPS = 6
RTOL = 2e-5
MAP = "placement.logical_to_physical"  # differs by design between runs with different placements
TIMEEXPERT = ("moe.router=timeexpert", "moe.aux_loss_coeff=0.01", "moe.z_loss_coeff=0.001")
# clip_grad 0.3 is below every step's norm (~0.6): clipping scales every step's update.
TRAINING = ("training.lr_warmup_steps=0", "training.clip_grad=0.3")


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """Random initial weights and empty routing records, written once by one process at (1,1,1)."""
    return init_checkpoint(tmp_path_factory.mktemp("init"), *TIMEEXPERT)


def _layout_cfg(tmp, init_ckpt, tp, pp, ep, *extra):
    return from_checkpoint(tmp, init_ckpt, tp, pp, ep, STEPS, *TIMEEXPERT, *TRAINING, *extra)


@pytest.fixture(scope="module")
def reference(init_ckpt, tmp_path_factory) -> CheckedRun:
    """The single-process run every layout is compared with."""
    run = train_checked(_layout_cfg(tmp_path_factory.mktemp("ref"), init_ckpt, 1, 1, 1), 1)
    assert run.result.losses[-1] < run.result.losses[0], "the reference run does not learn"
    return run


@pytest.fixture(scope="module")
def permuted_222(init_ckpt, tmp_path_factory):
    """(2,2,2) with a permuted placement map, saving a checkpoint at step 3 (for the re-layout test)."""
    tmp = tmp_path_factory.mktemp("p222")
    cfg = _layout_cfg(tmp, init_ckpt, 2, 2, 2, f"training.save_dir={tmp / 'ckpt'}", "training.save_interval=3")
    return train_checked(cfg, 4, permute=True), tmp / "ckpt" / "iter_0000003"


LAYOUTS = [(1, 1, 1, None, 4), (2, 1, 1, None, 2), (2, 1, 2, None, 4), (1, 2, 2, None, 4), (1, 2, 2, 2, 4)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda t: f"tp{t[0]}-pp{t[1]}-ep{t[2]}-vpp{t[3]}-world{t[4]}")
def test_layout_invariance(layout, init_ckpt, reference, tmp_path):
    tp, pp, ep, vpp, world = layout
    cfg = _layout_cfg(tmp_path, init_ckpt, tp, pp, ep)
    cfg.parallel.vpp = vpp
    run = train_checked(cfg, world)
    assert mismatches(run, reference, RTOL) == []


def test_layout_invariance_with_permuted_placement(permuted_222, reference):
    run, _ = permuted_222
    # Every expert's weights and Adam moments are compared by logical id; only the map differs.
    assert mismatches(run, reference, RTOL, ignore=(MAP,)) == []
    assert [b.split(":")[0] for b in mismatches(run, reference, RTOL)] == [f"decoder.layers.mlp.{MAP}"]


@pytest.mark.parametrize(
    "plant",
    [Plant("scale_grad", "router.weight", 2.0), Plant("skip_tp_reduce", "layernorm")],
    ids=["router-grad-x2", "no-tp-allreduce-of-layernorm-grads"],
)
def test_layout_comparison_catches_planted_errors(plant, init_ckpt, reference, tmp_path):
    """The twin of the layout test: the same comparison at (2,1,2) fails on a planted error."""
    run = train_checked(_layout_cfg(tmp_path, init_ckpt, 2, 1, 2), 4, plants=(plant,))
    assert run.planted > 0, f"{plant} matched no parameter"
    bad = mismatches(run, reference, RTOL)
    assert bad, f"{plant} went unnoticed"
    if plant.kind == "scale_grad":  # Adam hides a scaled gradient from the losses, not from its moments
        assert any("exp_avg.decoder.layers.mlp.router.weight" in b for b in bad), bad


def _relayout_cfg(tmp, ckpt, *extra):
    return tiny_config(
        tmp, 1, 1, 4, *TIMEEXPERT, *TRAINING, f"training.train_steps={STEPS}", f"training.load_dir={ckpt}", *extra
    )


def _last_steps(run: CheckedRun, n: int) -> CheckedRun:
    """The last ``n`` steps of a run's per-step numbers (and its final state)."""
    from dataclasses import replace

    r = run.result
    return CheckedRun(replace(r, losses=r.losses[-n:], grad_norms=r.grad_norms[-n:]), run.checksums)


def test_permuted_checkpoint_continues_in_another_layout(permuted_222, reference, tmp_path):
    """(2,2,2) with a permuted map, checkpoint at step 3 -> (1,1,4): steps 4-6 and the final state
    equal the reference's (every expert's weights and Adam state follow it by logical id)."""
    _, ckpt = permuted_222
    moved = train_checked(_relayout_cfg(tmp_path, ckpt), 4)
    assert moved.result.first_step == 3
    assert mismatches(moved, _last_steps(reference, 3), RTOL, ignore=(MAP,)) == []


def _identity_map_after_load(trainer) -> None:
    from megatron_timeexpert.train.pretrain import _moe_layers

    for model in trainer.models:
        for layer in _moe_layers(model):
            layer.placement.set_map(layer.placement.logical_to_physical.sort().values)


def test_relayout_comparison_catches_a_lost_map(permuted_222, reference, tmp_path):
    """Twin: the checkpoint loaded without its placement map (identity installed over it) differs."""
    _, ckpt = permuted_222
    moved = train_checked(_relayout_cfg(tmp_path, ckpt), 4, after_build=_identity_map_after_load)
    assert mismatches(moved, _last_steps(reference, 3), RTOL, ignore=(MAP,))


# --- resume: bitwise, with dropout, a permuted map and an LR-schedule change after the resume -----

RESUME = (
    *TIMEEXPERT,
    "model.hidden_dropout=0.1",
    "model.attention_dropout=0.1",
    "training.lr_warmup_steps=4",
    f"training.train_steps={STEPS}",
)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> CheckedRun:
    """Six steps without interruption at (2,2,2), permuted placement."""
    return train_checked(tiny_config(tmp_path_factory.mktemp("straight"), 2, 2, 2, *RESUME), 4, permute=True)


@pytest.fixture(scope="module")
def half_run(tmp_path_factory):
    """The same run stopped after three steps with a checkpoint (its process group ends)."""
    tmp = tmp_path_factory.mktemp("half")
    cfg = tiny_config(tmp, 2, 2, 2, *RESUME, "training.stop_at_step=3", f"training.save_dir={tmp / 'ckpt'}")
    return train_checked(cfg, 4, permute=True), tmp / "ckpt"


def _resume(tmp_path, half_dir, after_build=None) -> CheckedRun:
    save_dir = tmp_path / "ckpt"
    shutil.copytree(half_dir, save_dir)  # the resumed run writes here; keep half_run's folder intact
    cfg = tiny_config(tmp_path, 2, 2, 2, *RESUME, f"training.save_dir={save_dir}", "training.resume=true")
    return train_checked(cfg, 4, after_build=after_build)


def test_resume_is_bitwise(straight_run, half_run, tmp_path):
    first, half_dir = half_run
    assert first.result.losses == straight_run.result.losses[:3]
    resumed = _resume(tmp_path, half_dir)
    assert resumed.result.first_step == 3
    # Bitwise: same layout and reduction order; RNG, optimizer, scheduler, records, map, data position restored.
    assert mismatches(resumed, _last_steps(straight_run, 3), rtol=0.0) == []
    assert any("router.records.type_rate" in k for k in resumed.checksums), "A_t is not in the compared state"


def _reseed(trainer) -> None:
    """A resume that restored the wrong RNG states: the default generator and megatron's named
    streams (dropout inside tensor-parallel regions draws from those)."""
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(12345)
    model_parallel_cuda_manual_seed(12345)


def _fresh_scheduler(trainer) -> None:
    trainer.scheduler = trainer._scheduler()  # a load that skipped the LR schedule's state


@pytest.mark.parametrize("after_build", [_reseed, _fresh_scheduler], ids=["wrong-rng", "scheduler-not-restored"])
def test_resume_comparison_catches_planted_errors(after_build, straight_run, half_run, tmp_path):
    _, half_dir = half_run
    resumed = _resume(tmp_path, half_dir, after_build=after_build)
    assert mismatches(resumed, _last_steps(straight_run, 3), rtol=0.0)


# --- activation recomputation ------------------------------------------------------------------

RECOMPUTE = (
    *TIMEEXPERT,
    "training.lr_warmup_steps=0",
    "training.micro_batch_size=1",
    "training.train_steps=3",
    "logging.log_interval=1",
)


@pytest.fixture(scope="module")
def no_recompute(tmp_path_factory) -> CheckedRun:
    """(1,2,2): DP 2, 4 microbatches of 1 per rank and step through the 1F1B pipeline schedule."""
    return train_checked(tiny_config(tmp_path_factory.mktemp("norec"), 1, 2, 2, *RECOMPUTE), 4)


@pytest.mark.parametrize(
    "mode", ["training.recompute=full", "training.recompute=selective,training.recompute_modules=mlp"]
)
def test_recomputation_changes_nothing(mode, no_recompute, tmp_path):
    """Recomputed microbatches route with their own token types, and their tokens are counted once
    in the routing records (records are buffers: they are in the compared state), bitwise."""
    run = train_checked(tiny_config(tmp_path, 1, 2, 2, *RECOMPUTE, *mode.split(",")), 4)
    assert mismatches(run, no_recompute, rtol=0.0) == []
    assert run.result.metrics and all(m["moe/forwards"] == 4 for m in run.result.metrics)


def _count_records_twice(trainer) -> None:
    from megatron_timeexpert.train.pretrain import _moe_layers

    for model in trainer.models:
        for layer in _moe_layers(model):
            records = layer.router.records
            once = records.accumulate
            records.accumulate = lambda *a, once=once: (once(*a), once(*a))


def test_recompute_comparison_catches_double_counting(no_recompute, tmp_path):
    run = train_checked(
        tiny_config(tmp_path, 1, 2, 2, *RECOMPUTE, "training.recompute=full"), 4, after_build=_count_records_twice
    )
    bad = mismatches(run, no_recompute, rtol=0.0)
    assert any("records" in b for b in bad), bad
