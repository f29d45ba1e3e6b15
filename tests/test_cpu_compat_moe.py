"""The two CPU shims megatron-core's all-to-all MoE token dispatcher needs on gloo, each shown
failing without it: the dispatcher's construction (a torch.cuda.Stream) and its all_to_all (split
sizes as tensors). Every other shim is applied first, so exactly these two are missing."""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.testing import run_distributed

MOE_SHIMS = ("moe_alltoall_dispatcher", "moe_a2a_split_lists")


def _build_alltoall_moe():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    cfg = TransformerConfig(
        num_layers=1,
        hidden_size=16,
        num_attention_heads=2,
        ffn_hidden_size=32,
        num_moe_experts=4,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        expert_model_parallel_size=dist.get_world_size(),
        use_cpu_initialization=True,
    )
    return build_module(get_gpt_layer_local_spec(num_experts=4).submodules.mlp, config=cfg)


def _without_then_with() -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from parallel import cpu_compat

    shims = {s.name: s for s in cpu_compat.SHIMS}
    for name, shim in shims.items():
        if name not in MOE_SHIMS:
            shim.apply()
    ps.initialize_model_parallel(expert_model_parallel_size=dist.get_world_size(), expert_tensor_parallel_size=1)
    errors = {}
    try:
        model_parallel_cuda_manual_seed(1)
        try:
            _build_alltoall_moe()
        except RuntimeError as e:
            errors["moe_alltoall_dispatcher"] = str(e)
        shims["moe_alltoall_dispatcher"].apply()
        layer = _build_alltoall_moe()
        torch.manual_seed(dist.get_rank())
        x = torch.randn(8, 2, 16, requires_grad=True)
        try:
            layer(x)
        except TypeError as e:
            errors["moe_a2a_split_lists"] = str(e)
        shims["moe_a2a_split_lists"].apply()
        out, _ = layer(x)
        out.sum().backward()
        return {"errors": errors, "ok": bool(torch.isfinite(x.grad).all()) and x.grad.abs().sum().item() > 0}
    finally:
        ps.destroy_model_parallel()


def test_alltoall_dispatcher_needs_both_shims():
    for r in run_distributed(_without_then_with, 2, timeout=120):
        assert "requires CUDA" in r["errors"]["moe_alltoall_dispatcher"]
        assert "all_to_all_single" in r["errors"]["moe_a2a_split_lists"]
        assert r["ok"]
