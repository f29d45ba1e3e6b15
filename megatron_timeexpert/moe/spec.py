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
- TP group: ``get_tensor_model_parallel_group()`` - to pick this rank's sequence chunk of the token
  types and to sum the router losses' per-token statistics over the microbatch's TP chunks (one
  small all_reduce per forward, identity in backward);
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
        tp = ps.get_tensor_model_parallel_group()
        router_module = router.build(config.hidden_size, group=stats, init_method=config.init_method, tp_group=tp)
        super().__init__(
            config,
            router_module,
            moe,
            ep_group=ps.get_expert_model_parallel_group(),
            tp_group=tp,
            stats_group=stats,
        )
        self.expert_dp_rank = ps.get_expert_data_parallel_rank()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Layout-independent distributed-checkpoint view of this layer (megatron dist_checkpointing).

        Expert weights ``experts.w1 [slots_per_rank, ...]`` / ``experts.w2`` (and every persistent buffer
        of ``experts``, e.g. the per-slot Adam step base ``experts.slot_step_base``) are this EP rank's block
        of PHYSICAL slots ``[ep_rank * slots_per_rank, (ep_rank + 1) * slots_per_rank)`` of global
        ``[E_max, ...]`` tensors (sharded on axis 0 over the EP group, replicated over the
        expert-data-parallel group, main replica at expert-DP rank 0). Physical slot ids do not depend
        on the EP size, and the placement map (logical -> physical, replicated like the router and
        its records) travels with them, so a checkpoint written at one (TP, PP, EP) layout loads at
        any other with every logical expert's weights (and, through the optimizer's param mapping,
        its Adam state) in the slot the map names. Without this, megatron's default treats the
        per-rank slot blocks as replicated tensors of shape ``[slots_per_rank, ...]``, which neither
        saves the other ranks' experts nor loads at another EP size. Router, records and placement
        are replicated over the stage (main replica at TP rank 0, DP rank 0).
        """
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.transformer.utils import sharded_state_dict_default

        out = {}
        for name, child in self.named_children():
            if name != "experts":
                # Replicated over the stage. tp_group must be given: megatron's helper reads the TP
                # rank from it only when it is passed alongside the metadata's dp_cp_group, and with
                # rank 0 on every TP rank it would declare several main replicas of each tensor.
                out.update(
                    sharded_state_dict_default(
                        child, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group
                    )
                )
        axis = len(sharded_offsets)  # axis 0 of the slot tensors, after the prepended (layer) axes
        ep_size = self.placement.ep_size
        # Parameters and persistent buffers (the per-slot Adam step base): all keyed to physical slots.
        for name, tensor in self.experts.state_dict(keep_vars=True).items():
            key = f"{prefix}experts.{name}"
            out[key] = ShardedTensor.from_rank_offsets(
                key,
                tensor,
                *sharded_offsets,
                (axis, self.ep_rank, ep_size),
                replica_id=(0, 0, self.expert_dp_rank),
                prepend_axis_num=axis,
            )
        return out


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
