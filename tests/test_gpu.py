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


def _statistics_reduction_and_te_spec():
    """On one GPU under NCCL: our MoE layer's statistics reduction forced at world size 1 (NCCL
    rejects the CPU tensors it used to reduce), and the layer built from transformer-engine's dense
    spec (real pre-MLP norm, the same checkpoint keys as the torch backend)."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    from megatron_timeexpert.config import load_config
    from megatron_timeexpert.model.gpt import _base_layer_spec, layer_backend, our_moe_spec, transformer_config

    ps.initialize_model_parallel()
    try:
        model_parallel_cuda_manual_seed(1)
        cfg = load_config("configs/tiny_timeexpert.yaml", ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1"])
        tconfig = transformer_config(cfg)
        out = {"backend": layer_backend()}
        for backend in ("torch", layer_backend()):
            layer = build_module(
                our_moe_spec(cfg, _base_layer_spec(backend, None), backend), config=tconfig, layer_number=1
            ).cuda()
            x = torch.randn(6, 2, 64, device="cuda") * 3.0 + 1.5
            y, _ = layer(x, attention_mask=None, padding_mask=torch.randint(0, 4, (2, 6), device="cuda"))
            y.sum().backward()
            metrics = layer.mlp.instrument.pop(layer.mlp.stats_group, force_reduce=True)
            out[backend] = {
                "norm": type(layer.pre_mlp_layernorm).__name__,
                "keys": sorted(layer.sharded_state_dict().keys()),
                "forwards": metrics["forwards"],
            }
        return out
    finally:
        ps.destroy_model_parallel()


def test_statistics_reduction_and_te_spec_on_gpu():
    out = run_distributed(_statistics_reduction_and_te_spec, 1, backend="nccl", timeout=300)[0]
    for backend in ("torch", out["backend"]):
        assert out[backend]["forwards"] == 1.0
        assert out[backend]["norm"] != "IdentityOp"
    assert out["torch"]["keys"] == out[out["backend"]]["keys"]
    print(f"backend {out['backend']}: norm {out[out['backend']]['norm']}")
