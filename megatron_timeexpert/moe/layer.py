"""The TimeExpert MoE layer: route -> placement -> dispatch -> local experts -> combine.

Drop-in MLP of megatron-core's ``TransformerLayer``: ``forward(hidden_states [s, b, h],
padding_mask=token_type [b, s]) -> (output [s, b, h], None)``. With sequence parallelism (TP > 1,
required by megatron-core for MoE) ``s`` is this TP rank's chunk of the sequence: tokens on
different TP ranks are different tokens, and each expert is whole on one rank (expert-TP = 1).

Token types travel WITH the forward, never as layer state: megatron threads one per-token tensor,
``padding_mask [b, s]``, from ``GPTModel.forward`` through every ``TransformerLayer`` to its MLP,
scatters it for sequence parallelism on the first pipeline stage, and passes it again when a layer
or the MLP is recomputed (activation recomputation, full or selective). Our layer reads that
tensor as the token types (integer :class:`TokenType` values; the trainer passes them there), so a
recomputed microbatch routes with its own types. It accepts them for the full sequence ``[b, S]``
(later pipeline stages get them unscattered) or for this TP rank's chunk ``[b, S / tp]``.

Who owns what:

- the router (any ``nn.Module`` obeying :mod:`megatron_timeexpert.moe.types`) is replicated on every
  rank; its parameters get normal data-parallel all-reduce, and with sequence parallelism they are
  marked ``sequence_parallel = True`` so megatron's ``finalize_model_grads`` all-reduces their
  gradients over the TP group (each TP rank saw only its chunk of the tokens);
- the placement map (:class:`parallel.placement.ExpertPlacement`, a buffer identical on all ranks)
  says which EP rank and slot hosts each logical expert;
- :class:`megatron_timeexpert.moe.experts.SlotExperts` holds this rank's slots (``allreduce=False``:
  megatron DDP reduces their gradients over the expert-data-parallel group).

Communication per forward, all on the EP group (see :mod:`parallel.dispatch`): one count exchange
(``all_to_all_single`` of ``[ep]`` int64), one dispatch ``all_to_all_single`` of the deduplicated
token rows (+ their local-slot weights and mask), one combine ``all_to_all_single`` of partial sums;
the backward repeats dispatch and combine with swapped splits. The router does not communicate in
forward except, at TP > 1, one small all_reduce over the TP group of its loss statistics (the router
losses are those of the whole microbatch, see losses.py). Once per optimizer step,
:meth:`TimeExpertMoELayer.finish_step` lets the router fold the step's statistics into its records
with one ``all_reduce`` on the router's records group (the statistics group when built through the
spec). ``pop_metrics`` does one ``all_reduce`` on the statistics group.

Router losses reach the training loss through the autograd graph: :class:`AttachAuxLoss` is the
identity on the output in forward and feeds ``d loss = aux_loss_scale`` into each loss in backward,
so the trainer only back-propagates its main loss. Each router loss is a mean over the tokens of one
microbatch (all its TP chunks); the training objective takes their MEAN over the step's microbatches
and data-parallel ranks, so ``aux_loss_scale`` must be the derivative of the back-propagated main
loss with respect to that mean's terms: ``grad_scale / M`` for a main loss that is a mean over the
``M`` microbatches of the step (all DP ranks), and ``grad_scale * N / M`` with megatron's per-token
loss (``calculate_per_token_loss``: gradients are divided by the ``N`` loss tokens of the global
batch after the backward), where ``grad_scale`` is megatron's ``config.grad_scale_func(1)`` (the
fp16 loss scale; 1 in fp32 and bf16). The scale is the same for all TP ranks: the losses are
TP-global and each rank's backward reaches only its own tokens. The trainer sets it once per step
(:meth:`set_aux_loss_scale`), before the step's forwards; recomputation within the step reuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megatron_timeexpert.moe.experts import ExpertsConfig, SlotExperts
from megatron_timeexpert.moe.instrument import MoEInstrument
from megatron_timeexpert.moe.types import RouterOutput, TokenType
from parallel.dispatch import CommBytes, DispatchedTokens, DispatchPlan, VariableKDispatcher
from parallel.placement import ExpertPlacement


@dataclass
class MoELayerConfig:
    """Options of :class:`TimeExpertMoELayer` beyond megatron's ``TransformerConfig``."""

    num_experts: int
    """E_max: logical expert ids = physical slots in the EP group; must be divisible by ep_size."""
    ffn_hidden_size: int | None = None
    """Each expert's inner width; default ``config.moe_ffn_hidden_size`` or ``config.ffn_hidden_size``."""
    expert_init_seed: int = 1234
    """Expert slots are initialised from ``seed + 1009 * layer_number + logical id`` (layout-independent)."""
    reduce_metrics: bool = True
    """``pop_metrics`` averages over the statistics group (one all_reduce) when True, else local only."""


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``output`` in forward; in backward, each ``loss`` receives gradient ``scale``.

    This is how router losses join the training loss without the trainer summing them: whenever the
    layer's output is back-propagated, so are the losses, with ``d total / d loss = scale``.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, scale: float, *losses: torch.Tensor):  # noqa: D102
        ctx.scale = scale
        ctx.loss_meta = [(loss.shape, loss.dtype, loss.device) for loss in losses]
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        loss_grads = [torch.full(s, ctx.scale, dtype=d, device=dev) for s, d, dev in ctx.loss_meta]
        return (grad, None, *loss_grads)


@dataclass
class RoutedTokens:
    """Result of the route step: flattened tokens and the router's decision."""

    hidden: torch.Tensor
    """``[T, H]`` local tokens, flattened from ``[s, b, h]`` (s-major)."""
    router: RouterOutput
    """The router's output over logical experts."""


@dataclass
class DispatchResult:
    """Result of the dispatch step on this rank."""

    plan: DispatchPlan
    """Send order and split sizes (reused by combine)."""
    tokens: DispatchedTokens
    """Rows received from all EP ranks for this rank's experts."""
    nbytes: CommBytes
    """Bytes this rank moved (combine fills its part)."""


class TimeExpertMoELayer(nn.Module):
    """Variable-k MoE MLP over a fixed pool of expert slots (see module docstring).

    Args:
        config: megatron-core ``TransformerConfig`` (hidden_size, activation_func,
            gated_linear_unit, init_method_std, params_dtype, sequence_parallel).
        router: nn.Module, ``router(hidden [T, H], token_type [T]) -> RouterOutput`` over
            ``moe.num_experts`` logical ids.
        moe: :class:`MoELayerConfig`.
        ep_group: expert-parallel group (``None``: single rank, no communication).
        tp_group: tensor-parallel group; picks this rank's sequence chunk of the token
            types when sequence parallelism is on (``None``: TP = 1).
        stats_group: group over which :meth:`pop_metrics` averages (all ranks of this pipeline
            stage); ``None``: local only.
        layer_number: 1-based layer index (megatron's ``set_layer_number`` may set it later; it
            names the profiler ranges and seeds the expert init).
    """

    def __init__(
        self,
        config,
        router: nn.Module,
        moe: MoELayerConfig,
        ep_group: dist.ProcessGroup | None = None,
        tp_group: dist.ProcessGroup | None = None,
        stats_group: dist.ProcessGroup | None = None,
        layer_number: int = 1,
    ):
        super().__init__()
        self.config = config
        self.moe = moe
        self.ep_group, self.tp_group, self.stats_group = ep_group, tp_group, stats_group
        ep_size = 1 if ep_group is None else dist.get_world_size(ep_group)
        self.ep_rank = 0 if ep_group is None else dist.get_rank(ep_group)
        self.tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
        self.tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
        if moe.num_experts % ep_size:
            raise ValueError(f"num_experts={moe.num_experts} is not divisible by the EP size {ep_size}")
        if self.tp_size > 1 and not getattr(config, "sequence_parallel", False):
            raise ValueError("TP > 1 needs sequence_parallel=True (each TP rank must hold distinct tokens)")
        self.router = router
        self.placement = ExpertPlacement(ep_size, moe.num_experts // ep_size)
        self.dispatcher = VariableKDispatcher(self.placement, ep_group)
        ffn = moe.ffn_hidden_size or getattr(config, "moe_ffn_hidden_size", None) or config.ffn_hidden_size
        self.experts = SlotExperts(
            ExpertsConfig(
                hidden_size=config.hidden_size,
                ffn_hidden_size=ffn,
                slots_per_rank=self.placement.slots_per_rank,
                gated_linear_unit=getattr(config, "gated_linear_unit", False),
                activation=config.activation_func,
                init_std=getattr(config, "init_method_std", 0.02),
                params_dtype=getattr(config, "params_dtype", torch.float32),
            )
        )
        if self.tp_size > 1:
            for p in self.router.parameters():
                p.sequence_parallel = True  # finalize_model_grads all-reduces these over TP
        self.aux_loss_scale = 1.0
        self.set_layer_number(layer_number)

    # --- set-up hooks ------------------------------------------------------------------------

    def set_layer_number(self, layer_number: int) -> None:
        """Called by megatron's TransformerLayer after construction: names ranges, re-seeds experts."""
        self.layer_number = layer_number
        self.instrument = MoEInstrument(self.moe.num_experts, name=f"moe/L{layer_number}")
        self.reset_expert_parameters()

    def reset_expert_parameters(self) -> None:
        """Initialise each local slot from a generator keyed by the logical expert it hosts."""
        base = self.moe.expert_init_seed + 1009 * self.layer_number
        for slot, logical in enumerate(self.placement.local_experts(self.ep_rank)):
            self.experts.init_slot(slot, base + logical)

    def set_aux_loss_scale(self, scale: float) -> None:
        """Gradient each router loss receives in backward (module docstring: ``grad_scale * N / M``
        under megatron's per-token loss, ``grad_scale / M`` for a mean over M microbatches)."""
        self.aux_loss_scale = float(scale)

    def _local_token_types(self, token_type: torch.Tensor | None, s_local: int, b: int, device) -> torch.Tensor:
        """``[s_local * b]`` (s-major) token types of this rank's tokens from ``[b, S]`` or ``[b, S/tp]``."""
        if token_type is None:
            return torch.full((s_local * b,), int(TokenType.TEXT), dtype=torch.long, device=device)
        if token_type.dtype == torch.bool or token_type.is_floating_point():
            raise TypeError(
                f"{self.instrument.name}: token types must be an integer tensor [b, s] of TokenType values, "
                f"got {token_type.dtype} (a boolean padding mask is not supported by this layer)"
            )
        full = s_local * self.tp_size
        if token_type.dim() != 2 or token_type.shape[0] != b or token_type.shape[1] not in (s_local, full):
            raise ValueError(
                f"{self.instrument.name}: token types {tuple(token_type.shape)} match neither [b, s] = "
                f"[{b}, {full}] nor this TP rank's chunk [{b}, {s_local}]"
            )
        if token_type.shape[1] != s_local:  # the full sequence: take this TP rank's chunk
            token_type = token_type[:, self.tp_rank * s_local : (self.tp_rank + 1) * s_local]
        return token_type.t().reshape(-1).to(device=device, dtype=torch.long)

    # --- the four steps ----------------------------------------------------------------------

    def route(self, hidden_states: torch.Tensor, token_type: torch.Tensor | None = None) -> RoutedTokens:
        """Flatten ``[s, b, h]`` to ``[T, h]`` and run the router (``token_type``: ``[b, S]`` or
        ``[b, S/tp]``, None = all TEXT). Communication: only the router's TP loss reduction."""
        s, b, h = hidden_states.shape
        x = hidden_states.reshape(s * b, h)
        tt = self._local_token_types(token_type, s, b, hidden_states.device)
        out = self.router(x, tt)
        # The first pass of a recomputed region (training, no autograd) is not recorded; its repeat
        # in backward is, so every token counts once (see router._record).
        if not self.training or torch.is_grad_enabled():
            self.instrument.record_routing(out.routing_map, tt)
            self.instrument.record_router(out.losses, out.metrics)
        return RoutedTokens(hidden=x, router=out)

    def dispatch(self, routed: RoutedTokens) -> DispatchResult:
        """Count exchange + one all_to_all of deduplicated token rows over the EP group."""
        r = routed.router
        plan = self.dispatcher.plan(r.routing_map)
        tokens, nbytes = self.dispatcher.dispatch(routed.hidden, r.probs, r.routing_map, plan)
        return DispatchResult(plan=plan, tokens=tokens, nbytes=nbytes)

    def compute(self, dispatched: DispatchResult) -> torch.Tensor:
        """Run every local expert each received row fired; one weighted partial sum per row."""
        t = dispatched.tokens
        return self.experts(t.hidden, t.weights, t.mask)

    def combine(self, partial: torch.Tensor, dispatched: DispatchResult) -> torch.Tensor:
        """Return partial sums to the tokens' ranks (one all_to_all on the EP group) and add them."""
        return self.dispatcher.combine(partial, dispatched.plan, dispatched.nbytes)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        token_type: torch.Tensor | None = None,
    ):
        """``[s, b, h] -> ([s, b, h], None)``.

        ``token_type`` (or, from megatron's ``TransformerLayer``, ``padding_mask``: the per-token
        tensor megatron threads to the MLP and replays under recomputation, see the module
        docstring): integer token types ``[b, S]`` or ``[b, S / tp]``; None: every token is TEXT.
        """
        inst = self.instrument
        if token_type is None:
            token_type = padding_mask
        with inst.phase("route"):
            routed = self.route(hidden_states, token_type)
        with inst.phase("dispatch"):
            dispatched = self.dispatch(routed)
        with inst.phase("experts"):
            partial = self.compute(dispatched)
        with inst.phase("combine"):
            out = self.combine(partial, dispatched)
        inst.record_bytes(**vars(dispatched.nbytes))
        losses = [v for v in routed.router.losses.values() if v.requires_grad]
        if losses and torch.is_grad_enabled():
            out = AttachAuxLoss.apply(out, self.aux_loss_scale, *losses)
        return out.view_as(hidden_states), None

    def finish_step(self) -> None:
        """Call once after every optimizer step: the router's records absorb the step's routing.

        Collective: one ``all_reduce`` on the router's records group (the statistics group, all ranks
        of this pipeline stage, when built through the spec); every rank of it must call this at the
        same point. Afterwards every rank holds identical records, and A_t (which the TimeExpert gate
        reads) is that of the global batch, for the next step. A router without records (no
        ``finish_step``) makes this a no-op.
        """
        finish = getattr(self.router, "finish_step", None)
        if finish is not None:
            finish()

    def pop_metrics(self) -> dict[str, float]:
        """This layer's averaged losses and metrics since the last pop (see ``MoEInstrument.pop``).

        With ``moe.reduce_metrics`` this is a collective on the statistics group: every rank of the
        group must call it at the same point.
        """
        return self.instrument.pop(self.stats_group if self.moe.reduce_metrics else None)
