"""Routing records (TimeExpert §3.3): what the router remembers about past routing decisions.

Owns, as buffers (so they travel in ``state_dict`` and checkpoints):

- per-expert activation counts, as totals since construction and for the current recording window
  (``reset_window()`` starts a new window; the totals are never reset);
- ``last_active_step`` (R_E): the update step (one per :meth:`RoutingRecords.finish_step`, i.e. per
  optimizer step in training) at which each expert last fired on any rank;
- ``*_unrouted_sum`` / ``*_unrouted_count`` (R_S): the float64 sum and the number of embeddings of
  tokens that fired no expert (``unrouted_mean()`` gives the normalised mean used to add an expert,
  TimeExpert eq. 7);
- per-expert load for placement: ``step_counts`` (tokens routed to each expert in the last step,
  all ranks; not persistent) and ``load_ema``, an EMA of it with decay ``load_decay`` (the running
  average the placement planner balances, parallel/planner.py; tokens per step);
- per token type: token counts and per-expert activation counts (``[num_types, E_max]``), and the
  running activation rate ``type_rate`` = A_t, an EMA of "fraction of type-t tokens that fired
  expert e" that the TimeExpert gate reads (eq. 6).

When records change: once per optimizer step, never inside a step. Each training forward of the
router calls :meth:`RoutingRecords.accumulate`, which only adds this rank's contribution to a local
flat float64 buffer ``pending`` (not persistent, no communication). After the optimizer step the
trainer calls :meth:`RoutingRecords.finish_step` (through ``TimeExpertMoELayer.finish_step``), which
does ONE ``all_reduce(SUM)`` of ``pending`` over ``group`` and only then updates totals, windows,
R_E, R_S and the A_t EMA from the GLOBAL batch's numbers, and zeroes ``pending``. So every
microbatch of a step routes with the A_t of the start of the step, A_t takes exactly one EMA step
per optimizer step from the counts of the whole global batch, and neither depends on how the
batch is split into microbatches and data-parallel ranks (layout invariance, DESIGN.md).

Communication: one ``all_reduce(SUM)`` per :meth:`finish_step` over ``group`` (a process group that
must cover ALL ranks holding distinct tokens of this layer: every data-parallel, expert-parallel
and, with sequence parallelism, tensor-parallel rank of the pipeline stage; ``None`` means a single
process and no communication). The flat buffer is ``[type_expert_counts (num_types*E_max) |
type_token_counts (num_types) | type_unrouted_counts (num_types) | unrouted_sum (H)]``; every
derived quantity is computed from the reduced numbers, so every rank holds bit-identical records
and routes identically (DESIGN contract 3). Every rank of ``group`` must call ``finish_step`` at the
same point (the number of forwards per rank in between does not matter). Float64 keeps counts
exact up to 2**53 and makes the sums independent of the dtype of the hidden states.

Activation recomputation: megatron runs a recomputed region twice, first without autograd and
again in backward. The routers call ``accumulate`` only from forwards with autograd on (see
``router._record``), so every token is counted once per step (tests/test_invariance.py checks the
records with and without full and selective recomputation). Routing is the same in both passes:
A_t does not change within a step, and the token types travel with the forward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_timeexpert.moe.types import NUM_TOKEN_TYPES

_ACC = ("counts", "type_counts", "type_tokens", "type_unrouted", "unrouted_sum", "unrouted_count")


class RoutingRecords(nn.Module):
    """Globally reduced routing statistics of one router (see module docstring).

    Args:
        num_experts: E_max, the number of logical expert ids.
        hidden_size: H, the size of the token embeddings summed into R_S.
        num_types: number of token types (rows of A_t); defaults to every :class:`TokenType`.
        rate_decay: EMA decay of A_t: ``A <- decay * A + (1 - decay) * batch_rate`` once per
            :meth:`finish_step` for each type present in the (reduced, global) batch of the step; a
            type's first observation initialises A_t directly.
        group: process group over which :meth:`finish_step` sums the step's contributions (all ranks
            of the stage holding distinct tokens); None: no reduction.
        load_decay: EMA decay of ``load_ema`` (``1 - 1/window`` averages over about ``window``
            steps); its first step takes the step's counts directly.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        num_types: int = NUM_TOKEN_TYPES,
        rate_decay: float = 0.99,
        group: dist.ProcessGroup | None = None,
        load_decay: float = 0.9,
    ) -> None:
        super().__init__()
        if not 0.0 <= rate_decay < 1.0:
            raise ValueError(f"rate_decay must be in [0, 1), got {rate_decay!r}")
        if not 0.0 <= load_decay < 1.0:
            raise ValueError(f"load_decay must be in [0, 1), got {load_decay!r}")
        self.load_decay = load_decay
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.num_types = num_types
        self.rate_decay = rate_decay
        self.group = group
        f64 = torch.float64
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("window_start_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_active_step", torch.zeros(num_experts, dtype=torch.long))
        self.register_buffer("type_rate", torch.zeros(num_types, num_experts, dtype=torch.float32))
        self.register_buffer("load_ema", torch.zeros(num_experts, dtype=f64))
        self.register_buffer("step_counts", torch.zeros(num_experts, dtype=f64), persistent=False)
        for prefix in ("total", "window"):
            self.register_buffer(f"{prefix}_counts", torch.zeros(num_experts, dtype=f64))
            self.register_buffer(f"{prefix}_type_counts", torch.zeros(num_types, num_experts, dtype=f64))
            self.register_buffer(f"{prefix}_type_tokens", torch.zeros(num_types, dtype=f64))
            self.register_buffer(f"{prefix}_type_unrouted", torch.zeros(num_types, dtype=f64))
            self.register_buffer(f"{prefix}_unrouted_sum", torch.zeros(hidden_size, dtype=f64))
            self.register_buffer(f"{prefix}_unrouted_count", torch.zeros((), dtype=f64))
        # This rank's sums of the current step (accumulate), reduced and applied by finish_step.
        # Not persistent: checkpoints are written between steps, when it is zero.
        flat_size = num_types * num_experts + 2 * num_types + hidden_size
        self.register_buffer("pending", torch.zeros(flat_size, dtype=f64), persistent=False)

    # ------------------------------------------------------------------ accumulate and finish a step
    def local_contribution(self, fired: torch.Tensor, token_type: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's flat float64 buffer for one forward (the layout in the module docstring)."""
        nt = self.num_types
        fired = fired.detach().to(torch.float64)
        tt = token_type.detach().long()
        type_onehot = torch.nn.functional.one_hot(tt, nt).to(torch.float64)  # [T, nt]
        type_counts = type_onehot.t() @ fired  # [nt, E]
        type_tokens = type_onehot.sum(0)
        empty = fired.sum(1) == 0  # [T]
        type_unrouted = type_onehot[empty].sum(0)
        unrouted_sum = hidden.detach()[empty].to(torch.float64).sum(0)
        if unrouted_sum.numel() != self.hidden_size:
            raise ValueError(f"hidden has size {hidden.shape[-1]}, records expect {self.hidden_size}")
        return torch.cat([type_counts.reshape(-1), type_tokens, type_unrouted, unrouted_sum]).reshape(-1)

    @torch.no_grad()
    def accumulate(self, fired: torch.Tensor, token_type: torch.Tensor, hidden: torch.Tensor) -> None:
        """Add one forward's routing result (this rank's tokens) to the step's local ``pending`` sums.

        No communication and no change to the records themselves: they change in :meth:`finish_step`.

        Args:
            fired: ``[T, E_max]`` bool, the experts each token fired by its own gate (before any
                empty-token fallback, so that tokens firing nothing are recorded as such).
            token_type: ``[T]`` long token types.
            hidden: ``[T, H]`` the router's input embeddings (only the unrouted ones are summed).
        """
        self.pending.add_(self.local_contribution(fired, token_type, hidden).to(self.pending.device))

    @torch.no_grad()
    def finish_step(self) -> None:
        """Fold the step's accumulated forwards of ALL ranks of ``group`` into the records.

        Collective: ONE ``all_reduce(SUM)`` of ``pending`` over ``group``; every rank of the group
        must call it at the same point (ranks that ran no forward contribute zeros). Then, from the
        reduced numbers: ``step += 1``, totals and windows grow, R_E and R_S update, and A_t takes one
        EMA step per token type present in the global batch; ``pending`` is zeroed.
        """
        flat = self.pending.clone()
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        self.pending.zero_()
        self._absorb_reduced(flat)

    def _absorb_reduced(self, flat: torch.Tensor) -> None:
        e, nt, h = self.num_experts, self.num_types, self.hidden_size
        sizes = [nt * e, nt, nt, h]
        type_counts, type_tokens, type_unrouted, unrouted_sum = torch.split(flat, sizes)
        type_counts = type_counts.reshape(nt, e)
        counts = type_counts.sum(0)
        unrouted_count = type_unrouted.sum()
        self.step += 1
        # A_t EMA from the reduced counts; a type seen for the first time takes its batch rate directly.
        present = type_tokens > 0
        rate = (type_counts / type_tokens.clamp(min=1).unsqueeze(1)).to(self.type_rate.dtype)
        first = present & (self.total_type_tokens == 0)
        ema = self.rate_decay * self.type_rate + (1.0 - self.rate_decay) * rate
        new_rate = torch.where(first.unsqueeze(1), rate, ema)
        self.type_rate.copy_(torch.where(present.unsqueeze(1), new_rate, self.type_rate))
        self.last_active_step.copy_(torch.where(counts > 0, self.step, self.last_active_step))
        self.step_counts.copy_(counts)
        if int(self.step) == 1:
            self.load_ema.copy_(counts)
        else:
            self.load_ema.mul_(self.load_decay).add_(counts, alpha=1.0 - self.load_decay)
        for prefix in ("total", "window"):
            getattr(self, f"{prefix}_counts").add_(counts)
            getattr(self, f"{prefix}_type_counts").add_(type_counts)
            getattr(self, f"{prefix}_type_tokens").add_(type_tokens)
            getattr(self, f"{prefix}_type_unrouted").add_(type_unrouted)
            getattr(self, f"{prefix}_unrouted_sum").add_(unrouted_sum)
            getattr(self, f"{prefix}_unrouted_count").add_(unrouted_count)

    # ------------------------------------------------------------------ window and expert set
    @torch.no_grad()
    def reset_window(self) -> None:
        """Start a new recording window: zero the ``window_*`` accumulators; totals are kept."""
        for name in _ACC:
            getattr(self, f"window_{name}").zero_()
        self.window_start_step.copy_(self.step)

    @torch.no_grad()
    def reset_expert(self, e: int) -> None:
        """Forget expert ``e``'s window history and A_t column (a slot being reused for a new expert).

        ``last_active_step`` is set to the current step so a freshly added expert is not pruned as
        "never active" before it had a chance to fire. Totals keep the slot's lifetime history.
        """
        self.window_counts[e] = 0
        self.window_type_counts[:, e] = 0
        self.type_rate[:, e] = 0
        self.load_ema[e] = 0
        self.last_active_step[e] = self.step

    # ------------------------------------------------------------------ read-outs
    def window_rates(self) -> torch.Tensor:
        """``[E_max]`` activations per token of the current window (activation rate A_e of eq. 8)."""
        tokens = self.window_type_tokens.sum().clamp(min=1)
        return self.window_counts / tokens

    def unrouted_mean(self, window: bool = True) -> torch.Tensor:
        """R_S as a unit vector: the normalised mean embedding of tokens that fired no expert (eq. 7).

        Zero vector if no token went unrouted.
        """
        prefix = "window" if window else "total"
        s = getattr(self, f"{prefix}_unrouted_sum")
        n = getattr(self, f"{prefix}_unrouted_count")
        mean = s / n.clamp(min=1)
        return mean / mean.norm().clamp(min=torch.finfo(mean.dtype).tiny)

    def unrouted_fraction(self, window: bool = True) -> torch.Tensor:
        """Fraction of tokens (all types) that fired no expert, scalar tensor."""
        prefix = "window" if window else "total"
        return getattr(self, f"{prefix}_unrouted_count") / getattr(self, f"{prefix}_type_tokens").sum().clamp(min=1)
