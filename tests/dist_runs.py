"""Shared helpers for tests that run the pretraining loop in several gloo processes."""

from __future__ import annotations

from megatron_timeexpert.config import Config, load_config
from megatron_timeexpert.train.pretrain import RunResult, run_pretrain_in_group
from parallel.testing import run_distributed

TINY = "configs/tiny_moe.yaml"


def tiny_config(tmp_path, tp: int, pp: int, ep: int, *overrides: str) -> Config:
    """The tiny recipe at a layout, with sinks off and everything written under ``tmp_path``."""
    return load_config(
        TINY,
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
