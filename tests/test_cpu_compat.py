"""Every CPU shim in parallel/cpu_compat.py (except the two MoE dispatcher ones, which
tests/test_cpu_compat_moe.py covers) shown necessary: the exact megatron-core call its ``why`` names
fails on this CUDA-less torch while every other shim is installed, and succeeds (with the right
values where that is cheap to check) once the shim is applied.

Shims patch modules in-process and cannot be removed, so every scenario runs in freshly spawned
interpreters through ``run_distributed``. Four spawns hold them all (to keep the file under a minute on
2 cores): one process walks the single-rank shims in dependency order, two ranks walk the
tensor-parallel, pipeline and checkpoint shims, one process checks ``apply_cpu_shims`` itself, and two
ranks show megatron's fully-parallel checkpoint load still failing with every shim (xfail).
Each walk records, per shim, the error seen without it and the file of megatron-core that raised
it, so a test can say exactly which code path needed which shim.

Run: ``PYTHONWARNINGS=ignore pytest tests/test_cpu_compat.py``
"""

from __future__ import annotations

import logging
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel import cpu_compat
from parallel.testing import DistributedRunError, run_distributed

MOE_SHIMS = frozenset({"moe_alltoall_dispatcher", "moe_a2a_split_lists"})
NO_CUDA = "Torch not compiled with CUDA enabled"


# --- helpers run inside the spawned ranks ---------------------------------------------------------


def _megatron_frame(exc: BaseException) -> str:
    """``path/in/megatron/core.py:function: source line`` of the innermost megatron-core frame that raised ``exc``."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/megatron/core/" in f.filename]
    if not frames:
        return "<not in megatron.core>"
    last = frames[-1]
    return f"{last.filename.split('/megatron/core/')[-1]}:{last.name}: {last.line}"


class _Walk:
    """Applies shims one at a time and records what each call did before and after its shim."""

    def __init__(self, skip: set[str]):
        self.shims = {s.name: s for s in cpu_compat.SHIMS}
        for name, shim in self.shims.items():
            if name not in skip and name not in MOE_SHIMS:
                shim.apply()
        self.out: dict[str, dict] = {}

    def without(self, name: str, call) -> None:
        """Run ``call`` while shim ``name`` is missing; record the error (or that there was none)."""
        try:
            call()
        except Exception as e:  # noqa: BLE001 - the error is the observation
            self.out.setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"
            self.out[name]["where"] = _megatron_frame(e)
        else:
            self.out.setdefault(name, {})["error"] = None

    def apply(self, name: str) -> None:
        assert self.shims[name].apply(), f"{name} was already applied"

    def check(self, name: str, **facts) -> None:
        """Record what the same call produced once shim ``name`` is installed."""
        self.out.setdefault(name, {}).update(facts)


def _tiny_transformer_config(**kw):
    from megatron.core.transformer import TransformerConfig

    base = dict(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, use_cpu_initialization=True)
    return TransformerConfig(**{**base, **kw})


def _ddp_linear(config, ddp_config=None, dtype=torch.float32, bias=False):
    """A 16->4 linear inside megatron's DistributedDataParallel (contiguous grad buffer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule

    class Linear(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            self.proj = torch.nn.Linear(16, 4, bias=bias, dtype=dtype)

        def set_input_tensor(self, tensor):  # the schedules call it; a single stage has no input tensor
            pass

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    return DistributedDataParallel(config, ddp_config or DistributedDataParallelConfig(), Linear())


def _single_rank_walk() -> dict:
    """rng, causal mask, global buffer, the router trio, DDP, optimizer + clipping, schedules (1 rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
    from megatron.core.transformer import utils as tutils
    from megatron.core.transformer.moe.moe_utils import (
        get_default_pg_collection,
        get_moe_layer_wise_logging_tracker,
        track_moe_metrics,
    )
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.utils import GlobalMemoryBuffer

    names = [
        "rng_tracker",
        "causal_mask_device",
        "global_buffer_device",
        "moe_utils_device",
        "moe_router_device",
        "router_gemm_without_te",
        "ddp_buffer_device",
        "optimizer_cuda_tensors",
        "clip_grads_device",
        "clip_grads_cpu",
        "schedules_cuda_tensors",
        "recompute_rng_states",
    ]
    w = _Walk(skip=set(names))
    ps.initialize_model_parallel()
    try:
        # rng_tracker: megatron's seeding of its named model-parallel RNG streams.
        w.without("rng_tracker", lambda: tensor_parallel.model_parallel_cuda_manual_seed(123))
        w.apply("rng_tracker")
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        torch.manual_seed(7)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            forked = torch.randn(4)
        after_fork = torch.randn(4)
        torch.manual_seed(7)
        # megatron seeds the model-parallel stream with seed + 2718 + tp_rank; the default stream is untouched.
        w.check(
            "rng_tracker",
            fork_stream_ok=torch.equal(forked, torch.randn(4, generator=torch.Generator().manual_seed(123 + 2718))),
            default_stream_untouched=torch.equal(after_fork, torch.randn(4)),
        )

        # causal_mask_device: the default causal mask (FusedScaleMaskSoftmax builds it when no mask is given).
        w.without("causal_mask_device", lambda: tutils.get_default_causal_mask(5))
        w.apply("causal_mask_device")
        mask = tutils.get_default_causal_mask(5)
        w.check("causal_mask_device", ok=torch.equal(mask, torch.triu(torch.ones(5, 5), diagonal=1).bool()))

        # global_buffer_device: the buffer sequence-parallel all-gathers write into.
        w.without("global_buffer_device", lambda: GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "probe"))
        w.apply("global_buffer_device")
        buf = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "probe")
        w.check("global_buffer_device", ok=tuple(buf.shape) == (2, 3) and buf.device.type == "cpu")

        # moe_utils_device: megatron's MoE metric logging pre-creates the per-layer aux-loss values for
        # names this rank has not logged yet (force_initialize, as megatron's training loop calls it).
        def track(total):
            track_moe_metrics(
                1.0, 1, total_loss_dict=total, force_initialize=True, track_names=["load_balancing_loss"], num_layers=1
            )
            return total

        try:
            w.without("moe_utils_device", lambda: track({}))
        finally:
            get_moe_layer_wise_logging_tracker().clear()  # the failed call left a half-made entry
        w.apply("moe_utils_device")
        before_routing = track({})["load_balancing_loss"].item()

        # The router pair: one TopKRouter forward fails twice, once per shim.
        rcfg = _tiny_transformer_config(
            num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="aux_loss"
        )
        router = TopKRouter(config=rcfg, pg_collection=get_default_pg_collection())
        router.set_layer_number(1)
        x = torch.randn(6, 1, 16, requires_grad=True)
        for name in ("moe_router_device", "router_gemm_without_te"):
            w.without(name, lambda: router(x))
            w.apply(name)
        probs, routing_map = router(x)
        # megatron's default: softmax over the top-k logits x @ W^T + b.
        top = (x.detach().view(6, 16) @ router.weight.detach().t() + router.bias.detach()).topk(2, dim=-1)
        expected = torch.zeros(6, 4).scatter(1, top.indices, torch.softmax(top.values, dim=-1))
        w.check("router_gemm_without_te", ok=torch.allclose(probs.detach(), expected, atol=1e-6))
        w.check(
            "moe_router_device", ok=router.weight.device.type == "cpu" and routing_map.sum(dim=1).eq(2).all().item()
        )
        after_routing = track({})["load_balancing_loss"].item()
        w.check("moe_utils_device", ok=before_routing == 0.0 and after_routing > 0.0)

        # ddp_buffer_device: DDP's contiguous grad buffer.
        dcfg = _tiny_transformer_config()
        w.without("ddp_buffer_device", lambda: _ddp_linear(dcfg))
        w.apply("ddp_buffer_device")
        model = _ddp_linear(dcfg)
        inp = torch.randn(8, 16)
        model(inp).pow(2).sum().backward()
        model.finish_grad_sync()
        weight = model.module.proj.weight
        hand_grad = 2 * (inp @ weight.detach().t()).t() @ inp
        w.check("ddp_buffer_device", ok=torch.allclose(weight.main_grad, hand_grad, rtol=1e-5, atol=1e-5))

        # optimizer_cuda_tensors, then the two clipping shims, on one fp32 optimizer step.
        ocfg = OptimizerConfig(optimizer="sgd", lr=0.1, clip_grad=1.0, weight_decay=0.0, sgd_momentum=0.0)
        w.without("optimizer_cuda_tensors", lambda: get_megatron_optimizer(ocfg, [model]))
        w.apply("optimizer_cuda_tensors")
        opt = get_megatron_optimizer(ocfg, [model])
        before = weight.detach().clone()
        w.without("clip_grads_device", opt.step)
        w.apply("clip_grads_device")
        w.without("clip_grads_cpu", opt.step)
        w.apply("clip_grads_cpu")
        _, grad_norm, _ = opt.step()
        norm = hand_grad.norm().item()
        expected_w = before - 0.1 * hand_grad * min(1.0, 1.0 / (norm + 1e-6))
        w.check("clip_grads_device", ok=abs(grad_norm - norm) <= 1e-4 * norm, norm=norm)
        w.check("clip_grads_cpu", ok=torch.allclose(weight.detach(), expected_w, rtol=1e-5, atol=1e-6))
        w.check("optimizer_cuda_tensors", ok=not torch.equal(weight.detach(), before))

        # schedules_cuda_tensors: one forward/backward through megatron's no-pipelining schedule.
        def step():
            model.zero_grad_buffer()

            def forward_step(data_iterator, m):
                out = m(next(data_iterator))
                return out, lambda o: (o.pow(2).mean(), {"loss": o.pow(2).mean().detach()})

            return forward_backward_no_pipelining(
                forward_step_func=forward_step,
                data_iterator=iter([inp]),
                model=model,
                num_microbatches=1,
                seq_length=8,
                micro_batch_size=1,
            )

        w.without("schedules_cuda_tensors", step)
        w.apply("schedules_cuda_tensors")
        losses = step()
        w.check("schedules_cuda_tensors", ok=len(losses) == 1 and weight.main_grad.abs().sum().item() > 0)

        # recompute_rng_states: activation recomputation of a region with dropout; the replay must draw
        # the same mask, so output and input gradient equal those of the plain (stored) forward.
        def dropped(v):
            return torch.nn.functional.dropout(v, 0.5, training=True) * 3.0

        xr = torch.randn(4, 8, requires_grad=True)
        w.without("recompute_rng_states", lambda: tensor_parallel.checkpoint(dropped, False, xr).sum().backward())
        w.apply("recompute_rng_states")
        xr.grad = None
        torch.manual_seed(3)
        y_ckpt = tensor_parallel.checkpoint(dropped, False, xr)
        (y_ckpt * torch.arange(8.0)).sum().backward()
        g_ckpt, xr.grad = xr.grad.clone(), None
        torch.manual_seed(3)
        y_plain = dropped(xr)
        (y_plain * torch.arange(8.0)).sum().backward()
        w.check(
            "recompute_rng_states",
            ok=torch.equal(y_ckpt, y_plain) and torch.equal(g_ckpt, xr.grad) and bool((y_plain == 0).any()),
        )
        return w.out
    finally:
        ps.destroy_model_parallel()


def _tiny_gpt_stage(pre_process: bool, post_process: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cfg = _tiny_transformer_config(num_layers=2, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    return GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=32,
        max_sequence_length=8,
        pre_process=pre_process,
        post_process=post_process,
    )


def _pipeline_step(model):
    from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_without_interleaving

    torch.manual_seed(0)
    tokens = torch.randint(0, 32, (1, 8))
    batch = {"tokens": tokens, "position_ids": torch.arange(8)[None], "labels": tokens.roll(-1, 1)}

    def forward_step(data_iterator, m):
        b = next(data_iterator)
        out = m(b["tokens"], b["position_ids"], None, labels=b["labels"])
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

    return forward_backward_pipelining_without_interleaving(
        forward_step_func=forward_step,
        data_iterator=iter([batch, batch]),
        model=model,
        num_microbatches=2,
        seq_length=8,
        micro_batch_size=1,
    )


def _ckpt_state(rank: int, fill: bool) -> dict:
    """Row ``rank`` of a 2x4 tensor sharded over 2 ranks, and a 3-vector every rank holds a replica of."""
    from megatron.core.dist_checkpointing import ShardedTensor

    row = torch.arange(8.0).view(2, 4)[rank : rank + 1].clone() if fill else torch.zeros(1, 4)
    rep = torch.tensor([1.0, 2.0, 3.0]) if fill else torch.zeros(3)
    return {
        "w": ShardedTensor.from_rank_offsets("w", row, (0, rank, 2)),
        "r": ShardedTensor.from_rank_offsets("r", rep, replica_id=rank),
    }


def _ckpt_values(sd: dict) -> dict:
    return {
        k: (v.data if hasattr(v, "data") and not isinstance(v, torch.Tensor) else v).tolist() for k, v in sd.items()
    }


def _fully_parallel_load(path, rank: int) -> dict:
    """megatron's fully-parallel load: each shard read by one rank, then broadcast to the others."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(path)))
    return _ckpt_values(dist_checkpointing.load(_ckpt_state(rank, fill=False), str(path), strategy))


def _fully_parallel_with_all_shims(ckpt_root: str) -> dict:
    """Save with every shim applied, then load fully-parallel."""
    from megatron.core import dist_checkpointing

    cpu_compat.apply_cpu_shims()
    rank = dist.get_rank()
    path = Path(ckpt_root) / "fp"
    if rank == 0:
        path.mkdir()
    dist.barrier()
    dist_checkpointing.save(_ckpt_state(rank, fill=True), str(path))
    return {"loaded": _fully_parallel_load(path, rank), "expected": _ckpt_values(_ckpt_state(rank, fill=True))}


def _two_rank_walk(ckpt_root: str) -> dict:
    """TP mappings and layers at TP 2, p2p at PP 2, then the three checkpoint shims (2 ranks)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, model_parallel_cuda_manual_seed
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    names = [
        "tp_mappings_device",
        "tp_layers_device",
        "p2p_cuda_device",
        "checkpoint_writer_sync",
        "checkpoint_finalize_device",
    ]
    w = _Walk(skip=set(names))
    rank = dist.get_rank()
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        model_parallel_cuda_manual_seed(1)
        # tp_mappings_device: the sequence-parallel all-gather's output buffer.
        x = torch.full((2, 3), float(rank))
        w.without("tp_mappings_device", lambda: gather_from_sequence_parallel_region(x))
        w.apply("tp_mappings_device")
        gathered = gather_from_sequence_parallel_region(x)
        w.check("tp_mappings_device", ok=torch.equal(gathered, torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])))

        # tp_layers_device: a sequence-parallel ColumnParallelLinear's backward.
        cfg = _tiny_transformer_config(tensor_model_parallel_size=2, sequence_parallel=True)
        layer = ColumnParallelLinear(16, 8, config=cfg, init_method=torch.nn.init.normal_, bias=False)
        torch.manual_seed(0)
        full_x = torch.randn(4, 1, 16)
        local_x = full_x[2 * rank : 2 * rank + 2].clone()

        def fwd_bwd():
            layer.weight.grad = None
            out, _ = layer(local_x)
            out.sum().backward()

        w.without("tp_layers_device", fwd_bwd)
        w.apply("tp_layers_device")
        fwd_bwd()
        hand = torch.ones(4, 4).t() @ full_x.view(4, 16)  # d(sum out)/dW over the all-gathered sequence
        grad = layer.weight.main_grad if hasattr(layer.weight, "main_grad") else layer.weight.grad
        w.check("tp_layers_device", ok=torch.allclose(grad, hand, atol=1e-5))
        ps.destroy_model_parallel()

        # p2p_cuda_device: pipeline stage 1 receives stage 0's activations. Without the shim it fails
        # allocating the receive buffer, before any message moves; stage 0 waits so nothing is sent.
        ps.initialize_model_parallel(pipeline_model_parallel_size=2)
        model_parallel_cuda_manual_seed(1)
        stage = _tiny_gpt_stage(pre_process=rank == 0, post_process=rank == 1)
        if rank == 1:
            w.without("p2p_cuda_device", lambda: _pipeline_step(stage))
        dist.barrier()
        w.apply("p2p_cuda_device")
        losses = _pipeline_step(stage)
        grads = [p.grad for p in stage.parameters() if p.grad is not None]
        w.check(
            "p2p_cuda_device",
            ok=len(grads) > 0 and all(torch.isfinite(g).all() for g in grads),
            losses=[float(d["loss"]) for d in losses],
        )
        ps.destroy_model_parallel()

        # The checkpoint trio: save and load a tensor sharded over both ranks plus a replicated one.
        def save(tag):
            path = Path(ckpt_root) / tag
            if rank == 0:
                path.mkdir()
            dist.barrier()
            dist_checkpointing.save(_ckpt_state(rank, fill=True), str(path))
            return path

        w.without("checkpoint_writer_sync", lambda: save("a"))
        w.apply("checkpoint_writer_sync")
        w.without("checkpoint_finalize_device", lambda: save("b"))
        w.apply("checkpoint_finalize_device")
        path = save("c")
        # megatron's default load (what train/checkpoint.py uses) needs no shim of its own.
        expected = _ckpt_values(_ckpt_state(rank, fill=True))
        after = _ckpt_values(dist_checkpointing.load(_ckpt_state(rank, fill=False), str(path)))
        w.check("checkpoint_writer_sync", ok=after == expected)
        w.check("checkpoint_finalize_device", ok=after == expected)
        return w.out
    finally:
        ps.destroy_model_parallel()


def _optimizer_walk(ckpt_root: str) -> dict:
    """training.precision=bf16 and training.distributed_optimizer=true on one rank: megatron's
    bf16 optimizer and DistributedOptimizer over a bf16 linear (the two type-check shims), then a
    DistributedOptimizer checkpoint saved and loaded as train/checkpoint.py does (the Adam-step shim)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_timeexpert.train import distopt

    names = ["float16_optimizer_param_types", "distrib_optimizer_param_types", "distrib_optimizer_adam_step"]
    w = _Walk(skip=set(names))
    ps.initialize_model_parallel()
    try:
        torch.manual_seed(3)
        inp = torch.randn(8, 16).bfloat16()
        cfg = _tiny_transformer_config(bf16=True, params_dtype=torch.bfloat16)

        def backward(model):
            model.zero_grad_buffer()
            model(inp).float().pow(2).sum().backward()
            model.finish_grad_sync()
            return {n: p.main_grad.clone() for n, p in model.module.named_parameters()}

        # float16_optimizer_param_types: bf16 weights, fp32 main copies, one SGD step.
        model = _ddp_linear(cfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), torch.bfloat16)
        sgd = OptimizerConfig(optimizer="sgd", lr=0.1, weight_decay=0.0, sgd_momentum=0.0, clip_grad=0.0, bf16=True)
        w.without("float16_optimizer_param_types", lambda: get_megatron_optimizer(sgd, [model]))
        w.apply("float16_optimizer_param_types")
        opt = get_megatron_optimizer(sgd, [model])
        weight = model.module.proj.weight
        before = weight.main_param.detach().clone()
        grad = backward(model)["proj.weight"]
        opt.step()
        w.check(
            "float16_optimizer_param_types",
            main_fp32=weight.main_param.dtype == torch.float32 and weight.dtype == torch.bfloat16,
            sgd_on_main=torch.allclose(weight.main_param, before - 0.1 * grad, rtol=1e-6, atol=1e-7),
            weight_is_rounded_main=torch.equal(weight.detach(), weight.main_param.detach().bfloat16()),
        )

        # distrib_optimizer_param_types: the same with the state sharded over (one) DP rank, Adam.
        ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
        dmodel = _ddp_linear(cfg, ddp, torch.bfloat16, bias=True)
        adam = OptimizerConfig(
            optimizer="adam", lr=0.01, weight_decay=0.0, clip_grad=0.0, bf16=True, use_distributed_optimizer=True
        )
        w.without("distrib_optimizer_param_types", lambda: get_megatron_optimizer(adam, [dmodel]))
        w.apply("distrib_optimizer_param_types")
        dopt = get_megatron_optimizer(adam, [dmodel])
        params = dict(dmodel.module.named_parameters())
        before = {n: p.main_param.detach().clone().view(p.shape) for n, p in params.items()}
        grads = backward(dmodel)
        dopt.step()
        eps, b1, b2 = adam.adam_eps, adam.adam_beta1, adam.adam_beta2
        # First Adam step: m_hat = g, v_hat = g^2, so the update is lr * g / (|g| + eps).
        first = {n: before[n] - 0.01 * g / (g.abs() + eps) for n, g in grads.items()}
        w.check(
            "distrib_optimizer_param_types",
            adam_on_main=all(
                torch.allclose(p.main_param.view(p.shape), first[n], atol=1e-6) for n, p in params.items()
            ),
            weights_gathered=all(
                torch.equal(p.detach(), p.main_param.view(p.shape).bfloat16()) for p in params.values()
            ),
        )

        # distrib_optimizer_adam_step: save the stepped optimizer, load it back, step once more.
        model_sd = dmodel.module.sharded_state_dict()
        path = Path(ckpt_root) / "distopt"
        path.mkdir()
        dist_checkpointing.save(
            {"optimizer": dopt.sharded_state_dict(model_sd, metadata=distopt.checkpoint_metadata())}, str(path)
        )
        inner = getattr(dopt, "chained_optimizers", [dopt])[0].optimizer
        saved = {n: {k: v.clone() for k, v in inner.state[p.main_param].items()} for n, p in params.items()}

        def load():
            sd = dopt.sharded_state_dict(model_sd, is_loading=True, metadata=distopt.checkpoint_metadata())
            dopt.load_state_dict(dist_checkpointing.load({"optimizer": sd}, str(path))["optimizer"])

        w.without("distrib_optimizer_adam_step", load)
        w.apply("distrib_optimizer_adam_step")
        load()
        restored = all(
            torch.equal(inner.state[p.main_param][k], saved[n][k]) for n, p in params.items() for k in saved[n]
        )
        after_first = {n: p.main_param.detach().clone().view(p.shape) for n, p in params.items()}
        grads = backward(dmodel)
        dopt.step()
        steps = [inner.state[p.main_param]["step"] for p in params.values()]

        def second(n, g):  # Adam's second step from the restored moments, bias-corrected with step 2
            m = b1 * saved[n]["exp_avg"].view(g.shape) + (1 - b1) * g
            v = b2 * saved[n]["exp_avg_sq"].view(g.shape) + (1 - b2) * g * g
            return after_first[n] - 0.01 * (m / (1 - b1**2)) / ((v / (1 - b2**2)).sqrt() + eps)

        w.check(
            "distrib_optimizer_adam_step",
            state_restored=restored,
            own_step_each=len({id(t) for t in steps}) == len(steps) and all(float(t) == 2.0 for t in steps),
            second_step=all(
                torch.allclose(p.main_param.view(p.shape), second(n, grads[n]), atol=1e-6) for n, p in params.items()
            ),
        )
        return w.out
    finally:
        ps.destroy_model_parallel()


def _apply_twice() -> dict:
    """apply_cpu_shims on a fresh interpreter: what it returns twice and what it logs."""

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    keep = Keep()
    cpu_compat.log.addHandler(keep)
    cpu_compat.log.setLevel(logging.INFO)
    first = cpu_compat.apply_cpu_shims()
    second = cpu_compat.apply_cpu_shims()
    return {"first": first, "second": second, "lines": keep.lines}


# --- the tests ------------------------------------------------------------------------------------

# For each shim: the megatron-core file (and function) that raises without it, and the error text.
EXPECTED = {
    "recompute_rng_states": ("tensor_parallel/random.py:_get_cuda_rng_state", NO_CUDA),
    "rng_tracker": ("tensor_parallel/random.py", NO_CUDA),
    "causal_mask_device": ("transformer/utils.py:get_default_causal_mask", NO_CUDA),
    "global_buffer_device": ("utils.py:get_tensor", NO_CUDA),
    "moe_router_device": ("transformer/moe/router.py:gating", NO_CUDA),
    "router_gemm_without_te": ("transformer/moe/moe_utils.py:forward", "NameError: name 'te_general_gemm'"),
    "moe_utils_device": ("transformer/moe/moe_utils.py:track_moe_metrics", NO_CUDA),
    "ddp_buffer_device": ("distributed/param_and_grad_buffer.py", NO_CUDA),
    "optimizer_cuda_tensors": ("optimizer/optimizer.py:__init__", NO_CUDA),
    "clip_grads_device": ("optimizer/clip_grads.py:get_grad_norm_fp32", NO_CUDA),
    "clip_grads_cpu": (
        "optimizer/clip_grads.py:clip_grad_by_total_norm_fp32: assert param.grad.type() == 'torch.cuda.FloatTensor'",
        "AssertionError",
    ),
    "schedules_cuda_tensors": ("pipeline_parallel/schedules.py:forward_backward_no_pipelining", NO_CUDA),
    "tp_mappings_device": ("tensor_parallel/mappings.py:_gather_along_first_dim", NO_CUDA),
    "tp_layers_device": ("tensor_parallel/layers.py:backward", NO_CUDA),
    "p2p_cuda_device": ("pipeline_parallel/p2p_communication.py:create_tensor_recv_prev", NO_CUDA),
    "checkpoint_writer_sync": ("dist_checkpointing/strategies/filesystem_async.py", NO_CUDA),
    "checkpoint_finalize_device": ("dist_checkpointing/strategies/state_dict_saver.py", NO_CUDA),
    "float16_optimizer_param_types": ("optimizer/optimizer.py:__init__", "TypeError: Wrapped parameters must be"),
    "distrib_optimizer_param_types": (
        "optimizer/distrib_optimizer.py:_build_model_and_main_param_groups",
        "TypeError: Wrapped parameters must be",
    ),
    "distrib_optimizer_adam_step": (
        "optimizer/distrib_optimizer.py:_set_main_param_and_optimizer_states",
        "KeyError: 'step'",
    ),
}


@pytest.fixture(scope="module")
def observed() -> dict[str, list[dict]]:
    """Per shim, what each rank of its walk saw (one rank for the single-rank walk, two for the other)."""
    single = run_distributed(_single_rank_walk, 1, timeout=240)
    with tempfile.TemporaryDirectory() as tmp:
        two = run_distributed(_two_rank_walk, 2, args=(tmp,), timeout=240)
    with tempfile.TemporaryDirectory() as tmp:
        optim = run_distributed(_optimizer_walk, 1, args=(tmp,), timeout=240)
    out: dict[str, list[dict]] = {}
    for per_rank in (single, two, optim):
        for ranks_view in per_rank:
            for name, seen in ranks_view.items():
                out.setdefault(name, []).append(seen)
    return out


def test_every_shim_has_a_scenario():
    """A shim added to cpu_compat.SHIMS without a scenario here (or in test_cpu_compat_moe.py) fails."""
    assert set(EXPECTED) == {s.name for s in cpu_compat.SHIMS} - MOE_SHIMS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shim_is_needed_and_sufficient(observed, name):
    """Without shim ``name`` (all others applied) its megatron-core call raises the expected error in
    the module the shim patches (on at least one rank: in a pipeline only the receiving stage
    allocates); with it the same call succeeds on every rank and gives the hand-computed result."""
    where, message = EXPECTED[name]
    ranks = observed[name]
    failed = [seen for seen in ranks if seen.get("error")]
    assert failed, f"{name}: megatron ran fine without it - the shim is not needed"
    assert any(message in seen["error"] and seen["where"].startswith(where) for seen in failed), ranks
    for seen in ranks:
        assert all(v for k, v in seen.items() if k not in ("error", "where", "norm", "losses")), seen


def test_rng_tracker_streams(observed):
    """The CPU tracker seeds megatron's model-parallel stream as megatron does (seed + 2718 + tp rank)
    and leaves torch's default generator where it was after a fork."""
    (seen,) = observed["rng_tracker"]
    assert seen["fork_stream_ok"] and seen["default_stream_untouched"]


@pytest.mark.xfail(
    raises=DistributedRunError,
    strict=True,
    reason="megatron's fully-parallel load is not supported on CPU: exchange_utils allocates exchange "
    "buffers with device='cuda' and calls Tensor.cuda() on loaded shards, which no module-level torch "
    "rebinding reaches; the default load (train/checkpoint.py's) never goes there",
)
def test_fully_parallel_load_with_all_shims():
    """megatron's FullyParallelLoadStrategyWrapper load on 2 gloo ranks with every shim applied gives
    back what was saved. Expected to fail today (strict: it reports when megatron or a shim fixes it);
    the trainer uses the default load, covered by the checkpoint scenarios above."""
    with tempfile.TemporaryDirectory() as tmp:
        for r in run_distributed(_fully_parallel_with_all_shims, 2, args=(tmp,), timeout=120):
            assert r["loaded"] == r["expected"]


def test_apply_cpu_shims_is_idempotent_and_logs():
    """On a CUDA-less torch apply_cpu_shims installs every shim once, in SHIMS order, logs one line
    naming them, and a second call installs nothing and logs nothing."""
    if torch.cuda.is_available():
        assert cpu_compat.apply_cpu_shims() == []
        return
    r = run_distributed(_apply_twice, 1, timeout=120)[0]
    names = [s.name for s in cpu_compat.SHIMS]
    assert r["first"] == names
    assert r["second"] == []
    assert len(r["lines"]) == 1
    assert r["lines"][0].startswith("CUDA absent: applied megatron-core CPU shims: ")
    assert all(n in r["lines"][0] for n in names)
