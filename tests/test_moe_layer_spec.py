"""The MoE layer inside megatron-core's real TransformerLayer (local spec, EP = 2 on gloo), and its
profiler ranges. TP = 2 with sequence parallelism is covered in tests/test_moe_layer.py by building
the MLP spec the way TransformerLayer does (megatron's local torch LayerNorm refuses sequence
parallelism, so a full local-spec layer cannot run TP = 2 on CPU)."""

from __future__ import annotations

import torch

from parallel.testing import run_distributed


def _transformer_layer_with_moe() -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from megatron_timeexpert.moe.router import RouterConfig
    from megatron_timeexpert.moe.spec import TimeExpertMoEMLP, get_timeexpert_moe_spec
    from parallel.cpu_compat import apply_cpu_shims

    apply_cpu_shims()
    ps.initialize_model_parallel(expert_model_parallel_size=2, expert_tensor_parallel_size=1)
    try:
        model_parallel_cuda_manual_seed(1)
        cfg = TransformerConfig(
            num_layers=2,
            hidden_size=16,
            num_attention_heads=2,
            ffn_hidden_size=32,
            use_cpu_initialization=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
        spec = get_gpt_layer_local_spec()
        spec.submodules.mlp = get_timeexpert_moe_spec(RouterConfig(num_experts=4))
        layer = build_module(spec, config=cfg, layer_number=2)
        assert isinstance(layer.mlp, TimeExpertMoEMLP)
        torch.manual_seed(ps.get_data_parallel_rank())
        x = torch.randn(6, 2, 16, requires_grad=True)
        layer.mlp.set_token_types(torch.randint(0, 4, (6, 2)))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out, _ = layer(x, attention_mask=None)
        out.sum().backward()
        names = {e.key for e in prof.key_averages()}
        metrics = layer.mlp.pop_metrics()
        return {
            "shape": tuple(out.shape),
            "ranges": sorted(n for n in names if n.startswith("moe/")),
            "expert_grads": all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.mlp.experts.parameters()),
            "router_grad": layer.mlp.router.weight.grad is not None and layer.mlp.router.weight.grad.abs().sum() > 0,
            "dx": x.grad is not None and bool(torch.isfinite(x.grad).all()),
            "metrics": metrics,
        }
    finally:
        ps.destroy_model_parallel()


def test_transformer_layer_runs_the_moe_mlp():
    res = run_distributed(_transformer_layer_with_moe, 2, timeout=120)
    for r in res:
        assert r["shape"] == (6, 2, 16)
        assert r["ranges"] == ["moe/L2/combine", "moe/L2/dispatch", "moe/L2/experts", "moe/L2/route"]
        assert r["expert_grads"] and r["router_grad"] and r["dx"]
        m = r["metrics"]
        assert m["forwards"] == 1 and m["loss/aux"] > 0 and m["loss/z"] > 0
        assert sum(m[f"tokens_per_expert/{e}"] for e in range(4)) == m["experts_per_token/ALL"] * 24
    # Statistics are reduced over the stage: every rank reports the same global numbers.
    assert res[0]["metrics"]["tokens_per_expert/0"] == res[1]["metrics"]["tokens_per_expert/0"]
    assert res[0]["metrics"]["bytes/dispatch_sent"] == res[1]["metrics"]["bytes/dispatch_sent"]
