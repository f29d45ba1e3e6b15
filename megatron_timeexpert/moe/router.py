"""Routers over LOGICAL expert ids: TimeExpert's task-aware adaptive-k gate and the top-k baseline.

Owns the gate parameters (``weight`` = W_g ``[E_max, H]``, and for TimeExpert the thresholds
``threshold`` = G ``[E_max]``), the ``active`` slot mask ``[E_max]`` (bool buffer) and the
:class:`~megatron_timeexpert.moe.records.RoutingRecords` whose A_t the TimeExpert gate reads.
Both routers implement ``forward(hidden [T, H], token_type [T]) -> RouterOutput`` (contract in
:mod:`megatron_timeexpert.moe.types`) and put ``{"aux": ..., "z": ...}`` (already scaled) in
``losses``.

Communication in forward: none on one rank. With ``tp_group`` of size > 1 (sequence parallelism:
each TP rank routes its own chunk of the same microbatch) ONE ``all_reduce`` of the router losses'
per-token statistics (a few dozen floats) over the TP group, forward only (identity in backward),
so the losses and their gradients are those of the whole microbatch, as on one rank (see
losses.py). In training (``module.training`` and ``config.record_routing``) each
forward adds this rank's routing counts to ``records.pending`` (local, see records.py);
:meth:`finish_step`, called once after every optimizer step by the trainer (through the MoE layer),
does ONE ``all_reduce(SUM)`` of a flat float64 buffer over the records' group (all ranks of the
stage holding distinct tokens) and updates the records and A_t from the global batch. So A_t is
constant within a step: every microbatch routes with the A_t of the start of the step, whatever the
number of microbatches per rank. The router weights are replicated on every rank (their gradients
are reduced like any other replicated parameter by the trainer).

TimeExpert gate (paper eq. 5-6)::

    s = cos(x, W_g)                           # [T, E]
    a = (s + alpha * A_t[type(x)]) / (1 + alpha)
    d = sigmoid(a) - sigmoid(G)               # pre-activation
    g = step(d) forward, dL/dd = dL/dg        # straight-through sign(); fires iff d > 0 and active

Expert set changes (adding / pruning, a later issue) go through :meth:`activate` / :meth:`deactivate`,
which every rank must call with identical arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_timeexpert.moe import losses as L
from megatron_timeexpert.moe.records import RoutingRecords
from megatron_timeexpert.moe.types import NUM_TOKEN_TYPES, RouterOutput, TokenType

ROUTER_TYPES = ("timeexpert", "topk")
EMPTY_TOKEN_POLICIES = ("zero", "top1")
WEIGHTINGS = ("uniform", "gate", "sum")


@dataclass
class RouterConfig:
    """Configuration of one MoE layer's router (both router types share it)."""

    router_type: str = "timeexpert"
    """``"timeexpert"``: cosine gate with learnable thresholds and task activation rates (adaptive k,
    eq. 5-6); ``"topk"``: linear gate, softmax, top-k, renormalised (eq. 3-4), the baseline."""

    num_experts: int = 8
    """E_max: number of logical expert slots, fixed for the life of the model."""

    num_initial_experts: int | None = None
    """Slots ``0..n-1`` start active, the rest inactive (free for expert addition). None: all E_max."""

    alpha: float = 0.1
    """alpha of eq. 6, weight of the task activation rate A_t against the cosine score (>= 0).
    The paper gives no value; 0.1 lets A_t (in [0, 1]) shift a gate by at most ~0.09 in score units,
    a nudge towards experts that served this token type rather than an override of the score."""

    threshold_init: float = 0.0
    """Initial value of every learnable threshold G_e (DynMoE and eq. 7 use 0)."""

    rate_decay: float = 0.99
    """EMA decay of the per-type activation rates A_t, in [0, 1); one EMA step per optimizer step
    (:meth:`finish_step`), from the counts of the whole global batch."""

    load_decay: float = 0.9
    """EMA decay of the per-expert load (tokens per step) the placement planner balances, in [0, 1)
    (``moe.placement.load_window_steps`` sets it to ``1 - 1/window``)."""

    token_types: tuple[str, ...] = ("visual", "text", "time", "score")
    """Token types present in this model (names of :class:`TokenType`, lower case); metrics are
    reported for these. A_t always has one row per TokenType value."""

    empty_token_policy: str = "zero"
    """Training-mode output of a token that fires no expert. ``"zero"`` (default): zero MoE output
    (the residual stream passes the token unchanged), as DynMoE / TimeExpert train: the router is
    not forced onto an expert the token does not match, and those tokens are exactly what R_S
    collects to add a new expert (eq. 7). ``"top1"``: route it to its best active expert with weight 1."""

    eval_empty_token_policy: str = "top1"
    """The same choice in eval mode. Default ``"top1"``, as DynMoE infers: at inference no token is
    left without an expert, and no expert addition can rescue it any more."""

    weighting: str = "uniform"
    """How the fired experts' outputs are combined (TimeExpert router; top-k always uses eq. 4).
    ``"uniform"`` (default): 1/k each, the straight-through form of sign() gates renormalised like eq. 4,
    so the output scale does not grow with the number k of fired experts (k varies 0..E_max per token)
    and the gradient reaches W_g and G through the STE of eq. 6. ``"gate"``: weights proportional to
    the positive pre-activations d_e of the fired experts (rows sum to 1; a smooth gradient with no
    STE, but experts barely over their threshold get almost no weight). ``"sum"``: the plain 0/1 gates
    (rows sum to k; output scale grows with k). In every case probs are exactly 0 off the routing map."""

    aux_loss_coeff: float = 1e-2
    """lambda_1 of eq. 9 (task-aware concentration term); for the top-k router, the coefficient of
    the Switch load-balancing loss. 1e-2 is the Switch Transformer value."""

    expert_norm_coeff: float = 1e-4
    """lambda_2 of eq. 9: coefficient of sum_e ||w_{g,e}||^2 (TimeExpert router only)."""

    z_loss_coeff: float = 1e-3
    """Coefficient of the router z-loss (ST-MoE value). Top-k: on the gate logits; TimeExpert: on the
    threshold margins (s + alpha A_t)/(1 + alpha) - G. 0 disables it (it is still reported as 0)."""

    topk: int = 2
    """k of the top-k baseline (must not exceed the number of active experts)."""

    record_routing: bool = True
    """Accumulate routing records in training-mode forwards (local) and fold them in at
    ``finish_step`` (one all_reduce per optimizer step). False: records and A_t never change, and
    ``finish_step`` does nothing (no communication)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and its value."""

        def bad(name: str, why: str) -> None:
            raise ValueError(f"RouterConfig.{name}={getattr(self, name)!r}: {why}")

        if self.router_type not in ROUTER_TYPES:
            bad("router_type", f"must be one of {ROUTER_TYPES}")
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            bad("num_experts", "must be an int >= 1")
        if self.num_initial_experts is not None and not (1 <= self.num_initial_experts <= self.num_experts):
            bad("num_initial_experts", f"must be None or in [1, num_experts={self.num_experts}]")
        if not self.alpha >= 0.0:
            bad("alpha", "must be >= 0")
        if not torch.isfinite(torch.tensor(float(self.threshold_init))):
            bad("threshold_init", "must be finite")
        if not 0.0 <= self.rate_decay < 1.0:
            bad("rate_decay", "must be in [0, 1)")
        if not 0.0 <= self.load_decay < 1.0:
            bad("load_decay", "must be in [0, 1)")
        names = [t.name.lower() for t in TokenType]
        if not self.token_types or len(set(self.token_types)) != len(self.token_types):
            bad("token_types", "must be a non-empty tuple without duplicates")
        if any(t not in names for t in self.token_types):
            bad("token_types", f"each must be one of {tuple(names)}")
        if self.empty_token_policy not in EMPTY_TOKEN_POLICIES:
            bad("empty_token_policy", f"must be one of {EMPTY_TOKEN_POLICIES}")
        if self.eval_empty_token_policy not in EMPTY_TOKEN_POLICIES:
            bad("eval_empty_token_policy", f"must be one of {EMPTY_TOKEN_POLICIES}")
        if self.weighting not in WEIGHTINGS:
            bad("weighting", f"must be one of {WEIGHTINGS}")
        for name in ("aux_loss_coeff", "expert_norm_coeff", "z_loss_coeff"):
            if not getattr(self, name) >= 0.0:
                bad(name, "must be >= 0")
        if not isinstance(self.topk, int) or self.topk < 1:
            bad("topk", "must be an int >= 1")
        if self.router_type == "topk" and self.topk > self.initial_active:
            bad("topk", f"must not exceed the number of initially active experts ({self.initial_active})")

    @property
    def initial_active(self) -> int:
        return self.num_experts if self.num_initial_experts is None else self.num_initial_experts

    def build(
        self,
        hidden_size: int,
        group: dist.ProcessGroup | None = None,
        init_method: Callable[[torch.Tensor], None] | None = None,
        tp_group: dist.ProcessGroup | None = None,
    ) -> TimeExpertRouter | TopKRouter:
        """The router this config describes (``group``: the records' reduction group, all DP x EP
        ranks; ``tp_group``: the ranks sharing a microbatch's tokens under sequence parallelism)."""
        cls = TimeExpertRouter if self.router_type == "timeexpert" else TopKRouter
        return cls(self, hidden_size, group=group, init_method=init_method, tp_group=tp_group)


class _Router(nn.Module):
    """Shared parts: W_g, the active mask, the records, expert-set changes and metrics."""

    def __init__(
        self,
        config: RouterConfig,
        hidden_size: int,
        group: dist.ProcessGroup | None = None,
        init_method: Callable[[torch.Tensor], None] | None = None,
        tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        self.tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
        self._reduce = L.group_reduce(tp_group)
        self.config = config
        self.hidden_size = hidden_size
        e = config.num_experts
        self.weight = nn.Parameter(torch.empty(e, hidden_size))
        if init_method is None:
            nn.init.normal_(self.weight, std=0.02)
        else:
            init_method(self.weight)
        active = torch.zeros(e, dtype=torch.bool)
        active[: config.initial_active] = True
        self.register_buffer("active", active)
        # Per-row Adam step base of W_g[e] and G[e] (train/slot_adam.py): row e's own optimizer step
        # is the parameter's step minus this; 0 = as old as the parameter. Replicated like the router.
        self.register_buffer("row_step_base", torch.zeros(e, dtype=torch.long))
        self.records = RoutingRecords(
            e, hidden_size, NUM_TOKEN_TYPES, config.rate_decay, group=group, load_decay=config.load_decay
        )
        self._metric_types = [(TokenType[n.upper()].value, n) for n in config.token_types]

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def _check_slot(self, e: int) -> None:
        if not 0 <= e < self.num_experts:
            raise ValueError(f"expert id {e} out of range [0, {self.num_experts})")

    @torch.no_grad()
    def activate(self, e: int, w_init: torch.Tensor, threshold: float | None = None) -> None:
        """Enable logical slot ``e`` with gate vector ``w_init [H]`` (written as given; eq. 7 passes
        R_S/||R_S||) and, for TimeExpert, threshold G_e (default ``config.threshold_init``).

        Resets the slot's window records and A_t column. Call with identical arguments on every rank;
        the optimizer state of the row is the caller's business.
        """
        self._check_slot(e)
        if w_init.shape != (self.hidden_size,):
            raise ValueError(f"w_init must have shape ({self.hidden_size},), got {tuple(w_init.shape)}")
        self.weight[e].copy_(w_init.to(self.weight.dtype))
        self.active[e] = True
        self.records.reset_expert(e)

    @torch.no_grad()
    def deactivate(self, e: int) -> None:
        """Disable logical slot ``e``: it never fires again until :meth:`activate`. Its weights stay."""
        self._check_slot(e)
        min_active = self._min_active()
        if bool(self.active[e]) and int(self.active.sum()) - 1 < min_active:
            raise ValueError(f"cannot deactivate expert {e}: at least {min_active} expert(s) must stay active")
        self.active[e] = False

    def _min_active(self) -> int:
        return 1

    def _record(self, fired: torch.Tensor, token_type: torch.Tensor, hidden: torch.Tensor) -> None:
        # A training forward without autograd is the first pass of an activation-recomputed region
        # (megatron runs it under no_grad and repeats it with grad in backward): record only the
        # repeat, so every token is counted once per step.
        if self.training and self.config.record_routing and torch.is_grad_enabled():
            self.records.accumulate(fired, token_type, hidden)

    def _reduce_stats(self, *stats: torch.Tensor) -> list[torch.Tensor]:
        """Sum per-token loss statistics over the TP group in ONE all_reduce (identity backward)."""
        flat = self._reduce(torch.cat([s.reshape(-1) for s in stats]))
        return [part.view_as(s) for part, s in zip(flat.split([s.numel() for s in stats]), stats)]

    def _replicated_term(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss term of the (TP-replicated) router parameters alone, e.g. ||W_g||^2: its value as is,
        its gradient divided by the TP size, because megatron sums the router's gradients over the TP
        group (``sequence_parallel`` params) and every TP rank computes this term in full."""
        if self.tp_size == 1:
            return loss
        return loss / self.tp_size + (loss - loss / self.tp_size).detach()

    def finish_step(self) -> None:
        """End of an optimizer step: fold the step's routing counts of all ranks into the records.

        Collective over the records' group (one ``all_reduce``) when ``config.record_routing``; every
        rank of that group must call it at the same point. Updates A_t for the next step's forwards.
        """
        if self.config.record_routing:
            self.records.finish_step()

    def _metrics(self, fired: torch.Tensor, token_type: torch.Tensor, extra: dict[str, torch.Tensor]) -> dict:
        """Detached metrics of this rank's tokens, fetched to the host in one transfer."""
        k = fired.sum(1).float()
        onehot = F.one_hot(token_type.long(), NUM_TOKEN_TYPES).float()
        n_type = onehot.sum(0)
        k_type = onehot.t() @ k
        k0_type = onehot.t() @ (k == 0).float()
        t = max(fired.shape[0], 1)
        head = torch.stack([k.sum() / t, (k == 0).float().sum() / t, self.active.float().sum()])
        extras = torch.stack([v.detach().float() for v in extra.values()]) if extra else head.new_zeros(0)
        vals = torch.cat([head, n_type, k_type, k0_type, extras]).tolist()
        out = {"k_mean": vals[0], "frac_k0": vals[1], "active_experts": vals[2]}
        nt = NUM_TOKEN_TYPES
        for idx, name in self._metric_types:
            n = vals[3 + idx]
            if n > 0:
                out[f"k_mean/{name}"] = vals[3 + nt + idx] / n
                out[f"frac_k0/{name}"] = vals[3 + 2 * nt + idx] / n
        for i, name in enumerate(extra):
            out[name] = vals[3 + 3 * nt + i]
        return out

    @staticmethod
    def _check_inputs(hidden: torch.Tensor, token_type: torch.Tensor) -> None:
        if hidden.dim() != 2 or token_type.shape != hidden.shape[:1]:
            raise ValueError(
                f"expected hidden [T, H] and token_type [T], got {tuple(hidden.shape)} and {tuple(token_type.shape)}"
            )


class TimeExpertRouter(_Router):
    """TimeExpert task-aware dynamic gate (eq. 5-6): each token fires 0..E_max active experts.

    Args:
        config: a :class:`RouterConfig` (``router_type`` is not checked here).
        hidden_size: H.
        group: the routing records' reduction group (all DP x EP ranks); None: single process.
        tp_group: ranks holding other chunks of the same microbatch (sequence parallelism); the loss
            statistics are summed over it. None: one rank holds whole microbatches.
        init_method: in-place initialiser of W_g ``[E_max, H]``; default normal(0, 0.02) (the cosine
            gate is scale-invariant, only directions matter).

    Parameters: ``weight`` W_g ``[E_max, H]``, ``threshold`` G ``[E_max]``. Buffers: ``active``
    ``[E_max]`` bool, ``row_step_base`` ``[E_max]`` int64 (per-row Adam step, train/slot_adam.py)
    and ``records.*`` (A_t is ``records.type_rate``).
    """

    def __init__(
        self,
        config: RouterConfig,
        hidden_size: int,
        group: dist.ProcessGroup | None = None,
        init_method: Callable[[torch.Tensor], None] | None = None,
        tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(config, hidden_size, group, init_method, tp_group)
        self.threshold = nn.Parameter(torch.full((config.num_experts,), float(config.threshold_init)))

    @torch.no_grad()
    def activate(self, e: int, w_init: torch.Tensor, threshold: float | None = None) -> None:
        super().activate(e, w_init)
        self.threshold[e] = self.config.threshold_init if threshold is None else threshold

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Cosine similarities s(x) = cos(x, W_g), ``[T, E_max]`` float32 (eq. 5)."""
        x = F.normalize(hidden.float(), dim=-1)
        w = F.normalize(self.weight.float(), dim=-1)
        return x @ w.t()

    def forward(self, hidden: torch.Tensor, token_type: torch.Tensor) -> RouterOutput:
        self._check_inputs(hidden, token_type)
        cfg = self.config
        alpha = cfg.alpha
        active = self.active
        type_rate = self.records.type_rate.clone()  # A_t of the start of the step (changes only in finish_step)
        s = self.scores(hidden)
        logits = (s + alpha * type_rate[token_type.long()]) / (1.0 + alpha)
        g_thr = self.threshold.float()
        d = torch.sigmoid(logits) - torch.sigmoid(g_thr)  # pre-activation of sign()
        fired = (d > 0) & active
        gates = L.straight_through_gates(fired, d) * active.to(d.dtype)  # no gradient to inactive slots

        k_hard = fired.sum(1, keepdim=True).to(d.dtype)
        if cfg.weighting == "sum":
            probs = gates
        elif cfg.weighting == "uniform":
            k_ste = gates.sum(1, keepdim=True)
            probs = gates / (k_hard.clamp(min=1.0) + (k_ste - k_ste.detach()))
        else:  # "gate"
            d_pos = torch.where(fired, d, torch.zeros_like(d))
            denom = d_pos.sum(1, keepdim=True)
            probs = d_pos / torch.where(denom > 0, denom, torch.ones_like(denom))

        routing_map = fired
        policy = cfg.empty_token_policy if self.training else cfg.eval_empty_token_policy
        if policy == "top1":
            empty = k_hard.squeeze(1) == 0
            best = d.masked_fill(~active, float("-inf")).argmax(1)
            fallback = F.one_hot(best, self.num_experts).bool() & empty.unsqueeze(1)
            routing_map = fired | fallback
            probs = torch.where(fallback, 1.0 + (d - d.detach()), probs)

        conc_stats, z_stats = self._reduce_stats(
            L.concentration_stats(gates, token_type, type_rate.shape[0]),
            L.z_stats(logits - g_thr, active),
        )
        conc = L.concentration_from_stats(conc_stats, type_rate, active)
        norm = self._replicated_term(L.expert_norm_loss(self.weight, active))
        z = L.z_from_stats(z_stats)
        losses = {"aux": cfg.aux_loss_coeff * conc + cfg.expert_norm_coeff * norm, "z": cfg.z_loss_coeff * z}
        metrics = self._metrics(fired, token_type, {"aux/concentration": conc, "aux/expert_norm": norm, "z_raw": z})
        self._record(fired, token_type, hidden)
        return RouterOutput(probs, routing_map, token_type, losses, metrics)


class TopKRouter(_Router):
    """Vanilla softmax top-k router (eq. 3-4): linear gate W_g ``[E_max, H]`` (no bias), softmax over
    the active experts, the k best, renormalised over them. Losses: Switch load balancing
    (``aux``, coefficient ``aux_loss_coeff``) and z-loss on the logits. Same constructor as
    :class:`TimeExpertRouter`; the records are kept too (for profiling and comparison), unused by routing.
    """

    def _min_active(self) -> int:
        return self.config.topk

    def forward(self, hidden: torch.Tensor, token_type: torch.Tensor) -> RouterOutput:
        self._check_inputs(hidden, token_type)
        cfg = self.config
        active = self.active
        logits = hidden.float() @ self.weight.float().t()
        masked = logits.masked_fill(~active, float("-inf"))
        soft = torch.softmax(masked, dim=-1)
        k = cfg.topk
        idx = masked.topk(k, dim=-1).indices  # ranks on logits: inactive (-inf) slots never win
        top = soft.gather(1, idx)
        top = top / top.sum(-1, keepdim=True)
        routing_map = torch.zeros_like(soft, dtype=torch.bool).scatter(1, idx, True)
        probs = torch.zeros_like(soft).scatter(1, idx, top)
        sw_stats, z_stats = self._reduce_stats(L.switch_stats(soft, routing_map), L.z_stats(logits, active))
        balance = L.switch_from_stats(sw_stats, k, active)
        z = L.z_from_stats(z_stats)
        losses = {"aux": cfg.aux_loss_coeff * balance, "z": cfg.z_loss_coeff * z}
        metrics = self._metrics(routing_map, token_type, {"aux/switch": balance, "z_raw": z})
        self._record(routing_map, token_type, hidden)
        return RouterOutput(probs, routing_map, token_type, losses, metrics)
