"""``training.precision=bf16`` and ``training.distributed_optimizer=true`` with our MoE layer (gloo).

The tiny TimeExpert recipe (configs/tiny_timeexpert.yaml: our MoE layer and the TimeExpert router
at TP2 PP2 EP2) runs 4 steps in bf16 with megatron's DistributedOptimizer, saving after steps 2
and 4 (lr warm-up ends at step 3, so steps 3-4 cross an LR-schedule change). Checked:

- dtypes on every rank: layers and expert slots bf16; our routers' weights fp32 and their records
  float64; no optimizer param group mixes fp32 and bf16 parameters (megatron-core 0.16.1's
  DistributedOptimizer mis-maps checkpoint state in such groups, see train/precision.py);
- the loss falls, and per step the loss and grad norm are close to the same run in fp32 with the
  plain optimizer (tolerances below);
- resume: the step-2 checkpoint resumed (``training.resume``) gives bitwise the straight run's
  losses AND grad norms at steps 3-4 (fp32 main weights, Adam moments and steps, scheduler, data
  position and records restored);
- re-layout: the step-2 checkpoint continues at (TP1, PP1, EP4) with losses and grad norms close
  to the straight run's.

Tolerances. bf16 vs fp32: bf16 keeps 8 significant bits (relative rounding up to 2^-9 ~ 2e-3 per
stored value, in weights and activations); the loss averages 512 tokens' log-probabilities, so
roundings largely cancel: measured |rel diff| <= 1.4e-4 for losses and <= 2.1e-3 for grad norms over
the 4 steps; we allow 2e-3 and 2e-2. Re-layout: the same bf16 model summed
in another order (TP, EP and DP splits): measured <= 7.3e-5 (loss) and <= 1.2e-3 (grad norm); we
allow 1e-3 and 1e-2. Resume is compared bitwise (same layout, same reduction order).

Cost: 4 four-process runs of 2-4 steps, one single-process construction, one in-process unit test.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from megatron_timeexpert.config import Config, ConfigError, load_config
from megatron_timeexpert.train.pretrain import RunResult
from parallel.testing import run_distributed
from tests.dist_runs import tiny_config, train

pytestmark = pytest.mark.slow

RECIPE = "configs/tiny_timeexpert.yaml"
STEPS = 4
BF16_DISTOPT = ("training.precision=bf16", "training.distributed_optimizer=true")
LOSS_RTOL_VS_FP32, GNORM_RTOL_VS_FP32 = 2e-3, 2e-2
LOSS_RTOL_RELAYOUT, GNORM_RTOL_RELAYOUT = 1e-3, 1e-2


def _recipe(tmp_path, tp: int, pp: int, ep: int, *overrides: str) -> Config:
    """The tiny TimeExpert recipe at a layout, sinks off, everything under ``tmp_path``."""
    return tiny_config(tmp_path, tp, pp, ep, f"training.train_steps={STEPS}", *overrides, recipe=RECIPE)


def _dtype_facts(trainer) -> dict:
    """What precision each kind of tensor has on this rank, and how the optimizer grouped them."""
    from megatron_timeexpert.train.pretrain import _moe_layers

    routers = [layer.router for model in trainer.models for layer in _moe_layers(model)]
    router_params = {id(p) for r in routers for p in r.parameters()}
    others = [p for m in trainer.models for p in m.parameters() if id(p) not in router_params]
    experts = [p for m in trainer.models for n, p in m.named_parameters() if ".experts." in n]
    mixed_groups = 0
    for part in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
        for fp32_group, bf16_group in zip(part.model_fp32_groups, part.model_float16_groups):
            mixed_groups += bool(fp32_group) and bool(bf16_group)
    return {
        "routers": len(routers),
        "router_params": sorted({str(p.dtype) for r in routers for p in r.parameters()}),
        "records_counts": sorted({str(r.records.total_counts.dtype) for r in routers}),
        "records_unrouted_sum": sorted({str(r.records.window_unrouted_sum.dtype) for r in routers}),
        "experts": sorted({str(p.dtype) for p in experts}),
        "other_params": sorted({str(p.dtype) for p in others}),
        "mixed_optimizer_groups": mixed_groups,
    }


def _train_and_inspect(cfg: Config) -> tuple[RunResult, dict]:
    """Build the trainer, record its dtypes, then train (one rank of ``run_distributed``)."""
    from megatron.core import parallel_state

    from megatron_timeexpert.train.pretrain import Pretrainer

    trainer = Pretrainer(cfg)
    try:
        facts = _dtype_facts(trainer)
        return trainer.train(), facts
    finally:
        parallel_state.destroy_model_parallel()


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> RunResult:
    """The recipe in fp32 with the plain optimizer: the reference for bf16."""
    return train(_recipe(tmp_path_factory.mktemp("fp32"), 2, 2, 2), 4)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """bf16 + distributed optimizer at (2,2,2), checkpoints after steps 2 and 4; per-rank dtype facts."""
    tmp = tmp_path_factory.mktemp("bf16")
    cfg = _recipe(tmp, 2, 2, 2, *BF16_DISTOPT, f"training.save_dir={tmp / 'ckpt'}", "training.save_interval=2")
    per_rank = run_distributed(_train_and_inspect, 4, args=(cfg,), timeout=300)
    return per_rank[0][0], [facts for _, facts in per_rank], tmp / "ckpt"


def test_bf16_dtypes_on_every_rank(bf16_run):
    """Layers and expert slots bf16; routers fp32, their records float64; no mixed optimizer group."""
    _, facts, _ = bf16_run
    for rank, f in enumerate(facts):
        assert f["routers"] == 2, (rank, f)  # 4 MoE layers over 2 pipeline stages
        assert f["router_params"] == ["torch.float32"], (rank, f)
        assert f["records_counts"] == f["records_unrouted_sum"] == ["torch.float64"], (rank, f)
        assert f["experts"] == ["torch.bfloat16"], (rank, f)
        assert f["other_params"] == ["torch.bfloat16"], (rank, f)
        assert f["mixed_optimizer_groups"] == 0, (rank, f)


def test_bf16_distributed_optimizer_trains_close_to_fp32(bf16_run, fp32_run):
    """The loss falls, and each step's loss and grad norm are within the bf16 tolerances of fp32's."""
    bf16, _, _ = bf16_run
    assert len(bf16.losses) == len(fp32_run.losses) == STEPS
    assert bf16.losses[-1] < bf16.losses[0] - 0.05, bf16.losses
    for step in range(STEPS):
        assert math.isclose(bf16.losses[step], fp32_run.losses[step], rel_tol=LOSS_RTOL_VS_FP32), (
            step,
            bf16.losses,
            fp32_run.losses,
        )
        assert math.isclose(bf16.grad_norms[step], fp32_run.grad_norms[step], rel_tol=GNORM_RTOL_VS_FP32), (
            step,
            bf16.grad_norms,
            fp32_run.grad_norms,
        )
    # bf16 is really in use: the runs are not bitwise equal.
    assert bf16.losses != fp32_run.losses


def test_bf16_distributed_optimizer_resume_is_bitwise(bf16_run, tmp_path):
    """Stop after step 2 (its checkpoint), resume, 2 more steps: bitwise the straight run's steps 3-4."""
    straight, _, ckpt = bf16_run
    save_dir = tmp_path / "ckpt"
    shutil.copytree(ckpt, save_dir)
    shutil.rmtree(save_dir / "iter_0000004")  # resume must find step 2 as the newest checkpoint
    (save_dir / "latest").unlink()
    cfg = _recipe(tmp_path, 2, 2, 2, *BF16_DISTOPT, f"training.save_dir={save_dir}", "training.resume=true")
    resumed = train(cfg, 4)
    assert resumed.first_step == 2
    assert resumed.losses == straight.losses[2:], (resumed.losses, straight.losses)
    assert resumed.grad_norms == straight.grad_norms[2:], (resumed.grad_norms, straight.grad_norms)


def test_bf16_distributed_optimizer_checkpoint_loads_at_another_layout(bf16_run, tmp_path):
    """The step-2 checkpoint written at (2,2,2) continues at (1,1,4) (DP 4 shards of the optimizer
    state instead of 2, experts 1 per rank instead of 2) close to the straight run."""
    straight, _, ckpt = bf16_run
    cfg = _recipe(tmp_path, 1, 1, 4, *BF16_DISTOPT, f"training.load_dir={ckpt / 'iter_0000002'}")
    moved = train(cfg, 4)
    assert moved.first_step == 2
    for i, step in enumerate(range(2, STEPS)):
        assert math.isclose(moved.losses[i], straight.losses[step], rel_tol=LOSS_RTOL_RELAYOUT), (
            moved.losses,
            straight.losses,
        )
        assert math.isclose(moved.grad_norms[i], straight.grad_norms[step], rel_tol=GNORM_RTOL_RELAYOUT), (
            moved.grad_norms,
            straight.grad_norms,
        )


def _main_weights_behind_model(cfg: Config) -> tuple[int, int]:
    """(bf16 parameters whose fp32 main weight differs from the model's value, bf16 parameters)."""
    from megatron.core import parallel_state

    from megatron_timeexpert.train.pretrain import Pretrainer

    trainer = Pretrainer(cfg)
    try:
        pairs = [
            (p.detach().float().view(-1), p.main_param.view(-1))
            for m in trainer.models
            for p in m.parameters()
            if p.dtype == torch.bfloat16 and getattr(p, "main_param", None) is not None
        ]
        return sum(not torch.equal(model, main) for model, main in pairs), len(pairs)
    finally:
        parallel_state.destroy_model_parallel()


def test_bf16_finetune_refreshes_the_fp32_main_weights(bf16_run, tmp_path):
    """Weights-only load (load_dir + finetune) in bf16: the optimizer's fp32 main weights, copied from
    the model when it was built, must be refreshed from the loaded weights, or the first step writes
    the initial weights back (measured before the fix, from a 3-step checkpoint at (1,1,1): the
    second finetune loss was 5.587 in bf16 against 5.212 in fp32; 5.209 in bf16 after it)."""
    _, _, ckpt = bf16_run
    cfg = _recipe(
        tmp_path, 1, 1, 1, *BF16_DISTOPT, f"training.load_dir={ckpt / 'iter_0000002'}", "training.finetune=true"
    )
    behind, total = run_distributed(_main_weights_behind_model, 1, args=(cfg,), timeout=120)[0]
    assert total > 0 and behind == 0, (behind, total)


def test_wrap_bf16_keeps_the_given_modules_exact():
    """Float16Module casts everything; wrap_bf16 puts the kept modules' tensors back bit for bit, in
    the same Parameter objects, and leaves the rest bf16. Values are chosen so bf16 would change them."""
    from megatron.core.transformer import TransformerConfig

    from megatron_timeexpert.train.precision import wrap_bf16

    def model():
        m = torch.nn.Module()
        m.dense = torch.nn.Linear(4, 4)
        m.router = torch.nn.Module()
        m.router.weight = torch.nn.Parameter(torch.full((3,), 1.0 / 3.0))
        m.router.weight.sequence_parallel = True
        m.router.records = torch.nn.Module()
        m.router.records.register_buffer("counts", torch.tensor([2.0**40 + 1.0], dtype=torch.float64))
        m.router.records.register_buffer("step", torch.tensor(7))
        return m

    cfg = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, bf16=True)
    kept = model()
    weight = kept.router.weight
    wrapped = wrap_bf16(kept, cfg, keep=[kept.router])
    assert wrapped.module is kept
    assert kept.router.weight is weight and weight.sequence_parallel
    assert weight.dtype == torch.float32 and torch.equal(weight.detach(), torch.full((3,), 1.0 / 3.0))
    assert kept.router.records.counts.dtype == torch.float64 and kept.router.records.counts.item() == 2.0**40 + 1.0
    assert kept.router.records.step.item() == 7
    assert kept.dense.weight.dtype == torch.bfloat16
    # Without keeping it, Float16Module rounds the router and its counts (what wrap_bf16 prevents).
    plain = model()
    wrap_bf16(plain, cfg)
    assert plain.router.weight.dtype == torch.bfloat16 and plain.router.records.counts.item() != 2.0**40 + 1.0
    with pytest.raises(ValueError, match="bf16=True"):
        wrap_bf16(model(), TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2))


def test_precision_config_errors():
    """Unknown precisions, and bf16 checkpoints with our MoE layer but the plain optimizer, are
    refused with an error naming training.precision."""
    with pytest.raises(ConfigError, match=r"training\.precision='fp16'"):
        load_config(RECIPE, ["training.precision=fp16"])
    with pytest.raises(ConfigError, match=r"training\.precision='bf16'.*distributed_optimizer=true"):
        load_config(RECIPE, ["training.precision=bf16"])  # the recipe saves checkpoints
    assert load_config(RECIPE, ["training.precision=bf16", "training.save_dir=null"]).training.precision == "bf16"
    assert load_config(RECIPE, list(BF16_DISTOPT)).training.distributed_optimizer


def _train_on_gpu(cfg: Config):
    from megatron_timeexpert.train.pretrain import run_pretrain_in_group

    return run_pretrain_in_group(cfg)


@pytest.mark.gpu
def test_bf16_distributed_optimizer_on_one_gpu(tmp_path):
    """The recipe's model in bf16 with the distributed optimizer on one GPU over NCCL (no CPU shims):
    it trains and writes its checkpoint. Resume is not checked here: with torch's Adam (no
    transformer-engine or apex) megatron's DistributedOptimizer load fails on a GPU too (see the
    distrib_optimizer_adam_step shim, applied only without CUDA)."""
    cfg = _recipe(tmp_path, 1, 1, 1, *BF16_DISTOPT, "training.train_steps=6", f"training.save_dir={tmp_path / 'ckpt'}")
    result = run_distributed(_train_on_gpu, 1, args=(cfg,), backend="nccl")[0]
    assert result.losses[-1] < result.losses[0], result.losses
    assert all(math.isfinite(g) for g in result.grad_norms), result.grad_norms
    assert result.checkpoint and result.checkpoint.endswith("iter_0000006")
