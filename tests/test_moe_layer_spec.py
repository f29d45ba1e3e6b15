"""The MoE layer inside megatron-core's real TransformerLayer (local spec, EP = 2 on gloo), and its
profiler ranges. TP = 2 with sequence parallelism is covered in tests/test_moe_layer.py by building
the MLP spec the way TransformerLayer does (megatron's local torch LayerNorm refuses sequence
parallelism, so a full local-spec layer cannot run TP = 2 on CPU)."""

from __future__ import annotations

import pytest
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
    from tests.moe_reference import reference_moe

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
        token_type = torch.randint(0, 4, (2, 6))  # [b, s], as megatron threads padding_mask to the MLP
        seen = {}
        layer.mlp.register_forward_hook(lambda mod, args, out: seen.update(x=args[0].detach(), y=out[0].detach()))
        ref_router = layer.mlp.router.config.build(16)  # the same router on one process (no groups)
        ref_router.load_state_dict(layer.mlp.router.state_dict())
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out, _ = layer(x, attention_mask=None, padding_mask=token_type)
        out.sum().backward()
        names = {e.key for e in prof.key_averages()}
        metrics = layer.mlp.pop_metrics()
        # The reference MoE on the MLP's input, with every expert's weights gathered by logical id.
        ep = ps.get_expert_model_parallel_group()
        w = {}
        for name in ("w1", "w2"):
            p = getattr(layer.mlp.experts, name).detach()
            parts = [torch.empty_like(p) for _ in range(2)]
            torch.distributed.all_gather(parts, p, group=ep)
            w[name] = torch.cat(parts)[layer.mlp.placement.logical_to_physical]
        y_ref, r_ref = reference_moe(
            seen["x"].reshape(12, 16), token_type.t().reshape(-1), ref_router, w["w1"], w["w2"]
        )
        return {
            "shape": tuple(out.shape),
            "ranges": sorted(n for n in names if n.startswith("moe/")),
            "expert_grads": all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.mlp.experts.parameters()),
            "router_grad": layer.mlp.router.weight.grad is not None and layer.mlp.router.weight.grad.abs().sum() > 0,
            "dx": x.grad is not None and bool(torch.isfinite(x.grad).all()),
            "metrics": metrics,
            "mlp_err": (seen["y"].reshape(12, 16) - y_ref).abs().max().item(),
            "mlp_scale": y_ref.abs().max().item(),
            "k_ref": r_ref.routing_map.sum(1).double().mean().item(),
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
        # The layer inside megatron's TransformerLayer computes what the plain reference MoE computes.
        assert r["mlp_scale"] > 0 and r["mlp_err"] <= 1e-5 * r["mlp_scale"], r
        assert sum(m[f"tokens_per_expert/{e}"] for e in range(4)) == m["experts_per_token/ALL"] * 24
    # Mean experts per token over both ranks' tokens equals the reference routing's.
    assert res[0]["metrics"]["experts_per_token/ALL"] == pytest.approx((res[0]["k_ref"] + res[1]["k_ref"]) / 2)
    # Statistics are reduced over the stage: every rank reports the same global numbers.
    assert res[0]["metrics"]["tokens_per_expert/0"] == res[1]["metrics"]["tokens_per_expert/0"]
    assert res[0]["metrics"]["bytes/dispatch_sent"] == res[1]["metrics"]["bytes/dispatch_sent"]


def _moe_layer_from_dense_specs() -> dict:
    """Our MoE layer built from the local dense spec and from a transformer-engine-like one (whose
    ``pre_mlp_layernorm`` is an identity because TE fuses that norm into the fc1 we replace, and
    whose key map has no entry for it): the MLP's input and the checkpoint keys of each."""
    import copy

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import build_module

    from megatron_timeexpert.config import load_config
    from megatron_timeexpert.model.gpt import _base_layer_spec, our_moe_spec, transformer_config
    from parallel.cpu_compat import apply_cpu_shims

    apply_cpu_shims()
    ps.initialize_model_parallel()
    try:
        model_parallel_cuda_manual_seed(1)
        cfg = load_config("configs/tiny_timeexpert.yaml", ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1"])
        tconfig = transformer_config(cfg)
        local = _base_layer_spec("torch", None)
        te_like = copy.deepcopy(local)
        te_like.submodules.pre_mlp_layernorm = IdentityOp
        te_like.submodules.sharded_state_dict_keys_map = {}
        out = {}
        for name, dense in (("local", local), ("te_like", te_like)):
            layer = build_module(our_moe_spec(cfg, dense, "torch"), config=tconfig, layer_number=1)
            seen = {}
            layer.mlp.register_forward_pre_hook(
                lambda mod, args, kw, seen=seen: seen.update(x=args[0].detach()), with_kwargs=True
            )
            torch.manual_seed(0)
            x = torch.randn(6, 2, 64) * 3.0 + 1.5  # a residual stream far from zero mean / unit variance
            layer(x, attention_mask=None, padding_mask=torch.randint(0, 4, (2, 6)))
            h = seen["x"]
            out[name] = {
                "norm": type(layer.pre_mlp_layernorm).__name__,
                "mean": h.mean(-1).abs().max().item(),
                "var_err": (h.var(-1, unbiased=False) - 1).abs().max().item(),
                "keys": sorted(layer.sharded_state_dict().keys()),
            }
        return out
    finally:
        ps.destroy_model_parallel()


def test_moe_layer_gets_a_real_pre_mlp_norm_from_any_dense_spec():
    """Whichever dense spec it starts from, our MoE layer normalises its input (per token mean 0,
    variance 1 with the initial norm weights), and both write the same checkpoint keys, the norm
    under ``pre_mlp_layernorm.*`` (the local spec's map to the fused fc1's name is dropped)."""
    out = run_distributed(_moe_layer_from_dense_specs, 1, timeout=120)[0]
    for name, r in out.items():
        assert r["norm"] != "IdentityOp", name
        assert r["mean"] < 1e-5 and r["var_err"] < 1e-3, (name, r["mean"], r["var_err"])
    assert out["local"]["keys"] == out["te_like"]["keys"]
    assert "pre_mlp_layernorm.weight" in out["local"]["keys"]
    assert not any("linear_fc1" in k for k in out["local"]["keys"]), out["local"]["keys"]


def _forced_reduction_on_one_rank() -> dict:
    from megatron_timeexpert.moe.instrument import MoEInstrument
    from parallel.env import collective_device

    inst = MoEInstrument(4, name="moe/L1")
    routing_map = torch.tensor([[True, False, True, False], [False, False, False, False]])
    inst.record_routing(routing_map, torch.tensor([0, 1]))
    inst.record_router({"z": torch.tensor(0.5)}, {})
    return {"device": str(collective_device()), "metrics": inst.pop(torch.distributed.group.WORLD, force_reduce=True)}


def test_statistics_reduction_runs_on_the_backend_device():
    """The statistics reduction, forced at world size 1, runs on the device the backend needs (the
    CPU for gloo; tests/test_gpu.py runs the same under NCCL, where it must be CUDA)."""
    out = run_distributed(_forced_reduction_on_one_rank, 1, timeout=60)[0]
    assert out["device"] == "cpu"
    m = out["metrics"]
    assert m["forwards"] == 1.0 and m["loss/z"] == 0.5
    assert m["tokens_per_expert/0"] == 1.0 and m["tokens_per_expert/1"] == 0.0
    assert m["experts_per_token/VISUAL"] == 2.0 and m["experts_per_token/TEXT"] == 0.0
