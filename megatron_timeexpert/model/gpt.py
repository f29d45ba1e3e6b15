"""GPT-style MoE decoder built from megatron-core parts (``GPTModel`` + per-layer specs).

``build_model(cfg)`` returns this rank's model chunks (one per virtual pipeline stage) for the
layout already initialised by :meth:`parallel.layout.ParallelLayout.initialize`. Layer backend, in
order of preference: transformer-engine (CUDA + TE installed), apex fused norms, plain torch with
:class:`~megatron_timeexpert.model.norm.SequenceParallelTorchNorm`; one log line says which.
Communication happens inside megatron's layers (TP all-gathers/reduce-scatters, EP token exchange).
"""

from __future__ import annotations

import copy
import importlib.util
import logging

import torch

from megatron_timeexpert.config import Config
from megatron_timeexpert.model.norm import SequenceParallelTorchNorm

log = logging.getLogger(__name__)


def layer_backend() -> str:
    """'te' when transformer-engine is usable, else 'apex' when apex imports, else 'torch'."""
    if torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None:
        return "te"
    if importlib.util.find_spec("apex") is not None and torch.cuda.is_available():
        return "apex"
    return "torch"


def transformer_config(cfg: Config):
    """megatron-core ``TransformerConfig`` for this run (``training.precision``, per-token loss averaging)."""
    from megatron.core.transformer import TransformerConfig

    m, moe, par = cfg.model, cfg.moe, cfg.parallel
    uses_megatron_moe = moe.router == "megatron"
    # bf16: layers are built in bf16 (our expert slots follow params_dtype; our routers build fp32)
    # and pipeline stages exchange bf16 activations; the trainer wraps each chunk in Float16Module.
    dtype = torch.bfloat16 if cfg.training.precision == "bf16" else torch.float32
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        moe_ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        add_bias_linear=False,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp if par.vpp and par.vpp > 1 else None,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.etp,
        sequence_parallel=par.tp > 1,
        # megatron requires it whenever EP > 1; only megatron's own MoE layer reads the router fields below.
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.topk,
        moe_aux_loss_coeff=moe.aux_loss_coeff if uses_megatron_moe else 0.0,
        moe_z_loss_coeff=(moe.z_loss_coeff or None) if uses_megatron_moe else None,
        moe_router_load_balancing_type="aux_loss" if moe.aux_loss_coeff > 0 else "none",
        moe_token_dispatcher_type=moe.dispatcher,
        moe_grouped_gemm=False,
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        calculate_per_token_loss=True,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        **_recompute_fields(cfg),
    )


def _recompute_fields(cfg: Config) -> dict:
    """megatron's activation-recomputation fields from ``training.recompute*``."""
    t = cfg.training
    if t.recompute == "full":
        return {
            "recompute_granularity": "full",
            "recompute_method": "uniform",
            "recompute_num_layers": t.recompute_num_layers,
        }
    if t.recompute == "selective":
        modules = [m.strip() for m in t.recompute_modules.split(",") if m.strip()]
        return {"recompute_granularity": "selective", "recompute_modules": modules}
    return {}


def _base_layer_spec(backend: str, num_experts: int | None):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if backend == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=False)
    spec = specs.get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    if backend == "torch":
        spec.submodules.input_layernorm = SequenceParallelTorchNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    return spec


def router_config(cfg: Config):
    """Our router's config (TimeExpert adaptive-k or the top-k baseline) from the run config."""
    from megatron_timeexpert.moe.router import RouterConfig

    m = cfg.moe
    return RouterConfig(
        router_type=m.router,
        num_experts=m.num_experts,
        topk=m.topk,
        alpha=m.alpha,
        threshold_init=m.threshold_init,
        aux_loss_coeff=m.aux_loss_coeff,
        z_loss_coeff=m.z_loss_coeff,
        num_initial_experts=m.num_initial_experts,
        weighting=m.weighting,
        rate_decay=m.rate_decay,
        load_decay=m.placement.load_decay,
        expert_norm_coeff=m.expert_norm_coeff,
        empty_token_policy=m.empty_token_policy,
        eval_empty_token_policy=m.eval_empty_token_policy,
    )


def backend_norm(backend: str):
    """The norm module of a layer backend ('te', 'apex' or 'torch')."""
    if backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    if backend == "apex":
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        return FusedLayerNorm
    return SequenceParallelTorchNorm


PRE_MLP_NORM_KEY = "pre_mlp_layernorm."


def our_moe_spec(cfg: Config, dense, backend: str):
    """The dense layer spec with its MLP replaced by our MoE layer (fixed expert slots, variable-k
    all-to-all; see megatron_timeexpert/moe/spec.py) and a real pre-MLP norm.

    transformer-engine's dense spec fuses the pre-MLP norm into its fc1 (``TELayerNormColumnParallelLinear``)
    and leaves ``pre_mlp_layernorm`` an identity; our MoE layer replaces that fc1, so the norm would
    be lost and the router and experts would see the raw residual stream. The layer therefore always
    gets the backend's own norm module there (as megatron's MoE specs do), and its checkpoint key is
    ``pre_mlp_layernorm.*`` on every backend: the local spec's key map, which renames that norm to
    the fused fc1's ``mlp.linear_fc1.layer_norm_*``, is dropped for our layer (that fc1 does not exist).
    """
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_timeexpert.moe.spec import get_timeexpert_moe_spec

    spec = copy.deepcopy(dense)
    sub = spec.submodules
    if sub.pre_mlp_layernorm is IdentityOp or isinstance(sub.pre_mlp_layernorm, IdentityOp):
        sub.pre_mlp_layernorm = backend_norm(backend)
    sub.sharded_state_dict_keys_map = {
        k: v for k, v in (sub.sharded_state_dict_keys_map or {}).items() if not k.startswith(PRE_MLP_NORM_KEY)
    }
    sub.mlp = get_timeexpert_moe_spec(
        router_config(cfg), ffn_hidden_size=cfg.model.ffn_hidden_size, expert_init_seed=cfg.training.seed
    )
    return spec


def _is_moe_layer(cfg: Config, layer_index: int) -> bool:
    return layer_index % cfg.moe.layer_freq == 0


def block_spec(cfg: Config, tconfig, vp_stage: int | None):
    """Layer specs of this rank's (virtual) stage: MoE MLP on every ``moe.layer_freq``-th layer."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    backend = layer_backend()
    dense = _base_layer_spec(backend, None)
    if cfg.moe.router == "megatron":
        moe = _base_layer_spec(backend, cfg.moe.num_experts)
    else:
        moe = our_moe_spec(cfg, dense, backend)
    all_specs = [moe if _is_moe_layer(cfg, i) else dense for i in range(cfg.model.num_layers)]
    offset = get_transformer_layer_offset(tconfig, vp_stage=vp_stage)
    count = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=all_specs[offset : offset + count], layer_norm=backend_norm(backend))


def model_chunks(cfg: Config, make) -> list[torch.nn.Module]:
    """This rank's model chunks, one per virtual pipeline stage, on the current device:
    ``make(tconfig, vp_stage, pre_process, post_process)`` builds one."""
    from megatron.core import parallel_state as ps

    tconfig = transformer_config(cfg)
    vpp = cfg.parallel.vpp if cfg.parallel.vpp and cfg.parallel.vpp > 1 else None
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        model = make(
            tconfig,
            vp_stage,
            ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def build_model(cfg: Config) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks (one per virtual pipeline stage), on the current device."""
    from megatron.core.models.gpt import GPTModel

    def make(tconfig, vp_stage, pre_process, post_process):
        return GPTModel(
            config=tconfig,
            transformer_layer_spec=block_spec(cfg, tconfig, vp_stage),
            vocab_size=cfg.model.vocab_size,
            max_sequence_length=cfg.model.seq_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=False,
            position_embedding_type="learned_absolute",
            vp_stage=vp_stage,
        )

    chunks = model_chunks(cfg, make)
    if torch.distributed.get_rank() == 0:
        log.info(
            "model: %d layers, hidden %d, %d experts (router %s), layer backend %s%s",
            cfg.model.num_layers,
            cfg.model.hidden_size,
            cfg.moe.num_experts,
            cfg.moe.router,
            layer_backend(),
            "" if layer_backend() != "torch" else " (transformer-engine/apex absent or no CUDA)",
        )
    return chunks
