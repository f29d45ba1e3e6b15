"""Shared helpers for tests that run the pretraining loop in several gloo processes.

Besides plain runs (:func:`train`), :func:`train_checked` runs the loop and returns, with rank 0's
:class:`RunResult`, a layout-independent checksum of every parameter, buffer and optimizer-state
tensor by global name (``megatron_timeexpert.train.checksum``). It can also

- install a non-identity expert placement before the first step (``permute=True``: every MoE
  layer's logical experts are moved to other slots and ranks, with the init each expert would get),
- plant a known error (:class:`Plant`) so a test can show that a comparison catches it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_timeexpert.config import Config, load_config
from megatron_timeexpert.train.checksum import Checksum, compare_checksums
from megatron_timeexpert.train.pretrain import RunResult, run_pretrain_in_group
from parallel.testing import run_distributed

TINY = "configs/tiny_moe.yaml"


def tiny_config(tmp_path, tp: int, pp: int, ep: int, *overrides: str, recipe: str = TINY) -> Config:
    """The tiny recipe (or ``recipe``) at a layout, with sinks off and everything under ``tmp_path``."""
    return load_config(
        recipe,
        [
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"parallel.ep={ep}",
            "training.save_dir=null",
            "training.save_interval=0",
            "logging.progress_bar=false",
            "logging.wandb=false",
            "logging.tensorboard=false",
            f"logging.run_dir={tmp_path / 'run'}",
            *overrides,
        ],
    )


def train(cfg: Config, world: int, env: dict[str, str] | None = None, timeout: float = 240) -> RunResult:
    """Run the loop on ``world`` gloo ranks; rank 0's result."""
    return run_distributed(run_pretrain_in_group, world, args=(cfg,), env=env, timeout=timeout)[0]


def init_checkpoint(tmp_path, *overrides: str) -> str:
    """Random initial weights written by ONE process at (1,1,1) (``train_steps=0``): the common
    starting point that layout-invariance tests load into every layout."""
    cfg = tiny_config(tmp_path, 1, 1, 1, *overrides, "training.train_steps=0", f"training.save_dir={tmp_path / 'ckpt'}")
    result = train(cfg, 1)
    assert result.checkpoint and result.checkpoint.endswith("iter_0000000")
    return result.checkpoint


def from_checkpoint(tmp_path, ckpt: str, tp: int, pp: int, ep: int, steps: int, *overrides: str) -> Config:
    """The tiny recipe at a layout, starting from the weights of ``ckpt`` (fresh optimizer, step 0)."""
    return tiny_config(
        tmp_path,
        tp,
        pp,
        ep,
        *overrides,
        f"training.train_steps={steps}",
        f"training.load_dir={ckpt}",
        "training.finetune=true",
    )


# --- checked runs: checksums, permuted placement, planted errors ------------------------------------


@dataclass(frozen=True)
class Plant:
    """A known error planted into a run (on every rank, or on ``rank`` only).

    ``kind``:
    - ``"scale_grad"``: multiply the gradient of every parameter whose name contains ``pattern`` by
      ``factor`` (a hook on the parameter, before megatron accumulates it);
    - ``"skip_tp_reduce"``: drop the ``sequence_parallel`` mark of those parameters, so megatron skips
      the TP all-reduce of their gradients (e.g. the LayerNorms under sequence parallelism).
    """

    kind: str
    pattern: str
    factor: float = 2.0
    rank: int | None = None


@dataclass
class CheckedRun:
    """Rank 0's result of :func:`train_checked`."""

    result: RunResult
    checksums: dict[str, Checksum] = field(default_factory=dict)
    planted: int = 0
    """Parameters the plants touched on rank 0 (0 when the pattern matched nothing there)."""


def _apply_plants(trainer, plants: tuple[Plant, ...]) -> int:
    rank = torch.distributed.get_rank()
    touched = 0
    for plant in plants:
        if plant.rank is not None and plant.rank != rank:
            continue
        for model in trainer.models:
            for name, p in model.named_parameters():
                if plant.pattern not in name:
                    continue
                touched += 1
                if plant.kind == "scale_grad":
                    p.register_hook(lambda g, f=plant.factor: g * f)
                elif plant.kind == "skip_tp_reduce":
                    p.sequence_parallel = False
                else:
                    raise ValueError(f"unknown plant {plant.kind!r}")
    return touched


def _permute_placement(trainer) -> None:
    """Move every MoE layer's logical experts to other slots (and EP ranks): logical e goes to
    physical slot (e + 1 + E/2) mod E, its weights with it (gathered over the EP group), before
    the first step (no optimizer state exists yet)."""
    import torch.distributed as dist

    from megatron_timeexpert.train.pretrain import _moe_layers

    for model in trainer.models:
        for layer in _moe_layers(model):
            place = layer.placement
            e = place.num_slots
            old_phys_of = place.logical_to_physical.clone()
            new_map = (torch.arange(e) + 1 + e // 2) % e
            for p in layer.experts.parameters():
                if layer.ep_group is not None and dist.get_world_size(layer.ep_group) > 1:
                    parts = [torch.empty_like(p.data) for _ in range(dist.get_world_size(layer.ep_group))]
                    dist.all_gather(parts, p.data.contiguous(), group=layer.ep_group)
                    every_slot = torch.cat(parts)  # [E, ...] in physical slot order
                else:
                    every_slot = p.data.clone()
                by_logical = every_slot[old_phys_of]
                with torch.no_grad():
                    for slot, logical in enumerate(_local_logical(new_map, place.slots_per_rank, layer.ep_rank)):
                        p.data[slot].copy_(by_logical[logical])
            place.set_map(new_map)


def _local_logical(new_map: torch.Tensor, slots_per_rank: int, ep_rank: int) -> list[int]:
    inv = torch.empty_like(new_map)
    inv[new_map] = torch.arange(len(new_map))
    return inv[ep_rank * slots_per_rank : (ep_rank + 1) * slots_per_rank].tolist()


def _run_checked(cfg: Config, plants: tuple[Plant, ...], permute: bool, after_build) -> CheckedRun:
    from megatron.core import parallel_state

    from megatron_timeexpert.train.checksum import state_checksums
    from megatron_timeexpert.train.pretrain import Pretrainer

    trainer = Pretrainer(cfg)
    try:
        if permute and trainer.state.step == 0:
            _permute_placement(trainer)
        touched = _apply_plants(trainer, plants)
        if after_build is not None:
            after_build(trainer)
        result = trainer.train()
        t = cfg.training
        # megatron-core 0.16.1 cannot describe the plain bf16 optimizer's state with our fp32 routers
        # (the checkpoint bug config.py refuses): those runs compare the model state only; a main copy
        # that went wrong shows in the losses and weights of the following steps.
        plain_bf16 = t.precision == "bf16" and not t.distributed_optimizer
        sums = state_checksums(trainer.models, None if plain_bf16 else trainer.optimizer)
        return CheckedRun(result, sums, touched)
    finally:
        parallel_state.destroy_model_parallel()


def train_checked(
    cfg: Config,
    world: int,
    plants: tuple[Plant, ...] = (),
    permute: bool = False,
    after_build: Callable | None = None,
    timeout: float = 300,
) -> CheckedRun:
    """Run the loop on ``world`` gloo ranks and checksum the final state (module docstring).

    ``after_build(trainer)``, a module-level function, runs on every rank once the trainer is built
    and its checkpoint loaded, before the first step (another way to plant an error)."""
    args = (cfg, tuple(plants), permute, after_build)
    return run_distributed(_run_checked, world, args=args, timeout=timeout)[0]


def mismatches(
    run: CheckedRun,
    ref: CheckedRun,
    rtol: float,
    state_rtol: float | None = None,
    ignore: tuple[str, ...] = (),
    grad_rtol: float | None = None,
) -> list[str]:
    """Every way ``run`` differs from ``ref``: per-step losses (relative ``rtol``), grad norms
    (``grad_rtol``; None: ``rtol``) and the
    final state's checksums (``state_rtol`` of each tensor's absolute sum; None: ``rtol``), except
    state tensors whose name contains one of ``ignore``. Empty when they agree; a bitwise comparison
    is ``rtol=0``."""
    bad = []
    a, b = run.result, ref.result
    if len(a.losses) != len(b.losses):
        return [f"{len(a.losses)} steps != {len(b.losses)}"]
    grad_rtol = rtol if grad_rtol is None else grad_rtol
    for name, got, want, tol in (
        ("loss", a.losses, b.losses, rtol),
        ("grad norm", a.grad_norms, b.grad_norms, grad_rtol),
    ):
        for step, (x, y) in enumerate(zip(got, want)):
            if not math.isclose(x, y, rel_tol=tol, abs_tol=0.0):
                bad.append(f"step {a.first_step + step + 1} {name}: {x!r} != {y!r}")
    keep = {k: v for k, v in run.checksums.items() if not any(i in k for i in ignore)}
    keep_ref = {k: v for k, v in ref.checksums.items() if not any(i in k for i in ignore)}
    bad += compare_checksums(keep, keep_ref, rtol if state_rtol is None else state_rtol)
    return bad
