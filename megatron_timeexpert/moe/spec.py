"""Select the TimeExpert MoE layer in megatron-core through a ``ModuleSpec``.

Usage (the MLP of megatron-core's ``TransformerLayer``)::

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron_timeexpert.moe.router import RouterConfig
    from megatron_timeexpert.moe.spec import get_timeexpert_moe_spec

    layer_spec = get_gpt_layer_local_spec()
    layer_spec.submodules.mlp = get_timeexpert_moe_spec(RouterConfig(num_experts=8))

``TransformerLayer`` builds the MLP with ``build_module(spec, config=config)``: for a module that is
not megatron's own MoELayer / MLP it passes only ``config`` plus the spec's ``params``, so the
router config and layer options travel in ``params`` and the process groups come from
``megatron.core.parallel_state`` (``initialize_model_parallel`` must have run, with
``expert_tensor_parallel_size=1``):

- EP group: ``get_expert_model_parallel_group()`` - the ranks that exchange tokens and split the
  expert slots between them;
- TP group: ``get_tensor_model_parallel_group()`` - only to pick this rank's sequence chunk of the
  token types (sequence parallelism; no TP communication in the layer);
- statistics group: ``get_tensor_and_data_parallel_group(with_context_parallel=True)`` - ALL ranks of
  this pipeline stage (TP x CP x DP; megatron folds EP inside it), over which the router's routing
  records (once per optimizer step, in ``finish_step``) and ``pop_metrics`` are reduced, so every
  rank decides the same thing (DESIGN contract 3).
  With PP each stage has its own group and its own layers, so nothing crosses stages.

Gradient reduction in megatron-core (checked in megatron/core/distributed/):

- expert weights carry ``allreduce = False``: ``DistributedDataParallel.__init__`` puts such params
  in ``expert_parallel_params`` with their own buffers, reduced over ``expt_dp_group`` (the
  expert-data-parallel group, ranks holding the same slots) instead of the DP x CP group, and
  ``broadcast_params`` broadcasts them over that group too;
- router parameters are replicated: plain DP all-reduce; with sequence parallelism they carry
  ``sequence_parallel = True``, which ``finalize_model_grads._allreduce_non_tensor_model_parallel_grads``
  all-reduces (SUM) over the TP group when ``config.sequence_parallel`` is on.
"""

from __future__ import annotations

from megatron.core import parallel_state as ps
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_timeexpert.moe.layer import MoELayerConfig, TimeExpertMoELayer


class TimeExpertMoEMLP(TimeExpertMoELayer):
    """:class:`TimeExpertMoELayer` built by megatron's ``build_module``: groups from ``parallel_state``.

    Args:
        config: the ``TransformerConfig`` megatron passes.
        router: a router config with ``build(hidden_size, group=..., init_method=...)`` (e.g.
            :class:`megatron_timeexpert.moe.router.RouterConfig`); built with the statistics group.
        moe: :class:`MoELayerConfig` (``num_experts`` must equal the router's).
        kwargs: extra arguments megatron may pass to MLP modules (``tp_group``, ``pg_collection``);
            ignored, the groups come from ``parallel_state``.
    """

    def __init__(self, config, router, moe: MoELayerConfig, **kwargs):
        if ps.get_expert_tensor_parallel_world_size() != 1:
            raise ValueError("TimeExpertMoEMLP keeps each expert whole on one rank: use expert_tensor_parallel_size=1")
        if ps.get_context_parallel_world_size() != 1:
            # The token-type slicing assumes the sequence is split only by sequence parallelism.
            raise NotImplementedError("TimeExpertMoEMLP does not support context parallelism yet")
        stats = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        router_module = router.build(config.hidden_size, group=stats, init_method=config.init_method)
        super().__init__(
            config,
            router_module,
            moe,
            ep_group=ps.get_expert_model_parallel_group(),
            tp_group=ps.get_tensor_model_parallel_group(),
            stats_group=stats,
        )


def get_timeexpert_moe_spec(
    router,
    ffn_hidden_size: int | None = None,
    expert_init_seed: int = 1234,
    reduce_metrics: bool = True,
) -> ModuleSpec:
    """The ``ModuleSpec`` of the TimeExpert MoE MLP, for ``TransformerLayerSubmodules.mlp``.

    Args:
        router: router config (``RouterConfig``); its ``num_experts`` is E_max, divisible by EP size.
        ffn_hidden_size: each expert's inner width (default: ``config.moe_ffn_hidden_size`` or
            ``config.ffn_hidden_size``).
        expert_init_seed: base seed of the layout-independent expert init.
        reduce_metrics: ``pop_metrics`` averages over the statistics group (a collective) when True.
    """
    moe = MoELayerConfig(
        num_experts=router.num_experts,
        ffn_hidden_size=ffn_hidden_size,
        expert_init_seed=expert_init_seed,
        reduce_metrics=reduce_metrics,
    )
    return ModuleSpec(module=TimeExpertMoEMLP, params={"router": router, "moe": moe})
