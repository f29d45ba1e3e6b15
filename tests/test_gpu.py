"""GPU checks (skipped without CUDA): the tiny recipe trains on one GPU over NCCL, with no CPU shims."""

from __future__ import annotations

import pytest

from parallel.testing import run_distributed
from tests.dist_runs import tiny_config

pytestmark = pytest.mark.gpu


def _train_on_gpu(cfg):
    import torch

    from megatron_timeexpert.train.pretrain import run_pretrain_in_group
    from parallel.cpu_compat import apply_cpu_shims

    assert apply_cpu_shims() == [], "no shim may be applied when CUDA is present"
    result = run_pretrain_in_group(cfg)
    return result, torch.cuda.get_device_name(0)


@pytest.mark.parametrize("router", ["megatron", "timeexpert"])
def test_tiny_recipe_on_one_gpu_with_nccl(tmp_path, router):
    cfg = tiny_config(
        tmp_path, 1, 1, 1, "training.train_steps=10", f"moe.router={router}", f"training.save_dir={tmp_path / 'ckpt'}"
    )
    result, device = run_distributed(_train_on_gpu, 1, args=(cfg,), backend="nccl")[0]
    assert result.losses[-1] < result.losses[0]
    assert result.checkpoint and result.checkpoint.endswith("iter_0000010")
    print(f"{device}: {router} loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
