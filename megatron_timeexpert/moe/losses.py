"""Router losses: TimeExpert's task-dependent auxiliary loss (eq. 9), z-loss, Switch load balancing.

Pure functions of one forward's routing tensors and the (detached) routing records; no
communication of their own. Each loss is a function of per-token SUMS (its "statistics"), so a
caller whose tokens are split over several ranks (sequence parallelism: each TP rank holds a chunk
of the same microbatch) passes a ``reduce`` that all-reduces those sums in forward and is the
identity in backward (:class:`ReduceFromGroup`); the loss is then that of the WHOLE microbatch on
every rank, and each rank's backward reaches only its own tokens, exactly as the single-process
reference computes it (megatron-core reduces its load-balancing statistics over TP the same way).
Every function returns the UNSCALED loss; the routers multiply by the coefficients
of :class:`~megatron_timeexpert.moe.router.RouterConfig` before putting them in ``RouterOutput.losses``.
All of them see only the experts marked ``active`` (inactive logical ids take no part and get no gradient).

Our reading of eq. 9,
``L_aux = λ1 Σ_e (A_e/Σ_j A_j − N_e/Σ_j N_j)² + λ2 Σ_e ||w_{g,e}||²``:

- The paper calls A_e "the activation count of expert e" and N_e "the number of task tokens assigned
  to expert e", and says the first term makes "experts with higher activation rates receive more
  relevant task tokens" per task type. We therefore evaluate the first term PER TOKEN TYPE t and
  average it over types weighted by their share of the batch's tokens, ``n_t / T``:

  * ``A_{t,e}`` = the historical activation rate of expert e on type-t tokens, i.e. the A_t row of the
    routing records (an EMA of globally reduced counts). It is a buffer: DETACHED, the target.
  * ``N_{t,e}`` = the number of type-t tokens of THIS forward (the micro-batch, over its TP ranks) that fire
    expert e, computed as the sum of straight-through gates ``g = step(d) + (d − d.detach())`` with
    ``d = σ((s + αA_t)/(1+α)) − σ(G)`` (the same STE as the gate itself). Its forward value is the
    exact hard count of the paper; its backward is the STE's: identity to ``d``, hence gradients
    to W_g (through the cosine score s) and to the thresholds G. This is the only differentiable
    part of the first term.

  A type whose history is empty (Σ_e A_{t,e} = 0) or that fired nothing in this batch
  (Σ_e N_{t,e} = 0) contributes 0, since one of the two distributions is undefined.
- The second term is ``Σ_e ||w_{g,e}||²`` over active rows of W_g, differentiable w.r.t. W_g. The
  cosine gate is invariant to the norm of w_{g,e}, so this term only keeps the norms from growing
  (the "numerical stability" the paper names) without changing any routing decision directly.

z-loss (ST-MoE): ``mean_t (logsumexp_e z_{t,e})²`` over active experts. For the top-k router z are
the linear gate logits; for the TimeExpert router z are the threshold MARGINS
``(s + αA_t)/(1+α) − G`` (the pre-sign logits: σ is monotone, so a token fires e iff its margin is
> 0), so the loss keeps the learnable thresholds and margins in a bounded range.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(x: torch.Tensor) -> torch.Tensor:
    """The ``reduce`` of a single rank: the statistics are already those of the whole microbatch."""
    return x


class ReduceFromGroup(torch.autograd.Function):
    """``all_reduce(SUM)`` over ``group`` in forward, identity in backward.

    For statistics that are sums over tokens split between the ranks of ``group``: every rank gets
    the total, and the gradient of the total with respect to this rank's partial sum is 1, so the
    backward passes the upstream gradient through unchanged (summing it over the group would count
    every other rank's copy of the loss again). Collective: one ``all_reduce`` per call, every rank
    of ``group`` must call it at the same point.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup):  # noqa: D102
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        return grad, None


def group_reduce(group: dist.ProcessGroup | None) -> Reduce:
    """The ``reduce`` for tokens split over ``group`` (``None`` or a group of one: :func:`no_reduce`)."""
    if group is None or dist.get_world_size(group) == 1:
        return no_reduce
    return lambda x: ReduceFromGroup.apply(x, group)


def straight_through_gates(fired: torch.Tensor, pre_activation: torch.Tensor) -> torch.Tensor:
    """``fired`` (0/1) in the forward; in the backward the upstream gradient goes to ``pre_activation``.

    ``pre_activation - pre_activation.detach()`` is exactly 0.0 for finite values, so the forward
    value is exactly the 0/1 map.
    """
    return fired.to(pre_activation.dtype) + (pre_activation - pre_activation.detach())


# ---- statistics (per-token sums; what a caller reduces over the ranks sharing a microbatch) ----


def concentration_stats(gates: torch.Tensor, token_type: torch.Tensor, num_types: int) -> torch.Tensor:
    """``[num_types, E + 1]``: soft counts N_{t,e} (differentiable, STE) and, in the last column, the
    number of type-t tokens, of this rank's tokens."""
    onehot = torch.nn.functional.one_hot(token_type.long(), num_types).to(gates.dtype)  # [T, nt]
    return torch.cat([onehot.t() @ gates, onehot.sum(0, keepdim=True).t()], dim=1)


def concentration_from_stats(stats: torch.Tensor, type_rate: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """First term of eq. 9 from the (reduced) :func:`concentration_stats` (module docstring)."""
    n = stats[:, :-1] * active.to(stats.dtype)  # [nt, E] N_{t,e} over active experts
    type_tokens = stats[:, -1].detach()  # [nt]
    a = type_rate.detach().to(stats.dtype) * active.to(stats.dtype)  # [nt, E]
    n_sum = n.sum(1, keepdim=True)
    a_sum = a.sum(1, keepdim=True)
    valid = (n_sum.detach() > 0) & (a_sum > 0)  # [nt, 1]
    one = torch.ones_like(n_sum)
    p_a = a / torch.where(valid, a_sum, one)
    p_n = n / torch.where(valid, n_sum, one)
    per_type = ((p_a - p_n) ** 2).sum(1, keepdim=True) * valid.to(stats.dtype)  # [nt, 1]
    type_share = type_tokens / type_tokens.sum().clamp(min=1)  # [nt]
    return (per_type.squeeze(1) * type_share).sum()


def z_stats(logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``[2]``: sum over this rank's tokens of ``(logsumexp over active e of logits)^2``, and their number."""
    masked = logits.float().masked_fill(~active, float("-inf"))
    lse_sq = torch.logsumexp(masked, dim=-1).pow(2).sum() if logits.shape[0] else logits.float().sum() * 0.0
    return torch.stack([lse_sq, lse_sq.new_tensor(float(logits.shape[0]))])


def z_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """The z-loss (mean over tokens) from the (reduced) :func:`z_stats`; 0 for no tokens."""
    return stats[0] / stats[1].detach().clamp(min=1.0)


def switch_stats(softmax_probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """``[2E + 1]``: per-expert sums of the softmax probabilities (differentiable) and of the routing
    map (counts), and the number of tokens, over this rank's tokens."""
    t = softmax_probs.shape[0]
    counts = routing_map.to(softmax_probs.dtype).sum(0).detach()
    return torch.cat([softmax_probs.sum(0), counts, softmax_probs.new_tensor([float(t)])])


def switch_from_stats(stats: torch.Tensor, topk: int, active: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load-balancing loss from the (reduced) :func:`switch_stats`:
    ``E_active · Σ_e f_e · P_e``, ``f_e = count_e / (T·k)`` (no gradient), ``P_e = mean_t p_{t,e}``.
    It equals 1 for perfectly uniform routing and probabilities; 0 for no tokens."""
    e = active.shape[0]
    prob_sum, counts, t = stats[:e], stats[e : 2 * e].detach(), stats[2 * e].detach().clamp(min=1.0)
    num_active = active.sum().to(stats.dtype)
    return num_active * ((counts / (t * topk)) * (prob_sum / t) * active.to(stats.dtype)).sum()


# ---- the losses of one rank's tokens (single process, or statistics reduced by ``reduce``) ----


def task_concentration_loss(
    gates: torch.Tensor,
    token_type: torch.Tensor,
    type_rate: torch.Tensor,
    active: torch.Tensor,
    reduce: Reduce = no_reduce,
) -> torch.Tensor:
    """First term of eq. 9 (unscaled), our per-type reading (module docstring).

    Args:
        gates: ``[T, E]`` straight-through gates (forward 0/1), the source of N (differentiable).
        token_type: ``[T]`` long.
        type_rate: ``[num_types, E]`` historical activation rates A_t (treated as constants).
        active: ``[E]`` bool; inactive experts are excluded from both distributions.
        reduce: sums the statistics over the ranks sharing the microbatch (default: none).
    """
    stats = concentration_stats(gates, token_type, type_rate.shape[0])
    return concentration_from_stats(reduce(stats), type_rate, active)


def expert_norm_loss(weight: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Second term of eq. 9 (unscaled): ``Σ_{e active} ||w_{g,e}||²`` for W_g of shape ``[E, H]``."""
    return (weight.float().pow(2).sum(1) * active.float()).sum()


def z_loss(logits: torch.Tensor, active: torch.Tensor, reduce: Reduce = no_reduce) -> torch.Tensor:
    """``mean_t (logsumexp over active e of logits[t, e])²`` (unscaled); 0 for an empty batch.

    ``active`` must hold at least one True (the routers guarantee it).
    """
    return z_from_stats(reduce(z_stats(logits, active)))


def switch_load_balancing_loss(
    softmax_probs: torch.Tensor,
    routing_map: torch.Tensor,
    topk: int,
    active: torch.Tensor,
    reduce: Reduce = no_reduce,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (unscaled): ``E · Σ_e f_e · P_e`` (see :func:`switch_from_stats`)."""
    return switch_from_stats(reduce(switch_stats(softmax_probs, routing_map)), topk, active)
