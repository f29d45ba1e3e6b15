"""Router losses: TimeExpert's task-dependent auxiliary loss (eq. 9), z-loss, Switch load balancing.

Pure functions of one forward's routing tensors and the (detached) routing records; no
communication. Every function returns the UNSCALED loss; the routers multiply by the coefficients
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
  * ``N_{t,e}`` = the number of type-t tokens of THIS forward (this rank's micro-batch) that fire
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

import torch


def straight_through_gates(fired: torch.Tensor, pre_activation: torch.Tensor) -> torch.Tensor:
    """``fired`` (0/1) in the forward; in the backward the upstream gradient goes to ``pre_activation``.

    ``pre_activation - pre_activation.detach()`` is exactly 0.0 for finite values, so the forward
    value is exactly the 0/1 map.
    """
    return fired.to(pre_activation.dtype) + (pre_activation - pre_activation.detach())


def task_concentration_loss(
    gates: torch.Tensor, token_type: torch.Tensor, type_rate: torch.Tensor, active: torch.Tensor
) -> torch.Tensor:
    """First term of eq. 9 (unscaled), our per-type reading (module docstring).

    Args:
        gates: ``[T, E]`` straight-through gates (forward 0/1), the source of N (differentiable).
        token_type: ``[T]`` long.
        type_rate: ``[num_types, E]`` historical activation rates A_t (treated as constants).
        active: ``[E]`` bool; inactive experts are excluded from both distributions.
    """
    num_types = type_rate.shape[0]
    t = gates.shape[0]
    act = active.to(gates.dtype)
    onehot = torch.nn.functional.one_hot(token_type.long(), num_types).to(gates.dtype)  # [T, nt]
    n = onehot.t() @ (gates * act)  # [nt, E] soft(STE) counts N_{t,e}
    a = type_rate.detach().to(gates.dtype) * act  # [nt, E]
    n_sum = n.sum(1, keepdim=True)
    a_sum = a.sum(1, keepdim=True)
    valid = (n_sum.detach() > 0) & (a_sum > 0)  # [nt, 1]
    one = torch.ones_like(n_sum)
    p_a = a / torch.where(valid, a_sum, one)
    p_n = n / torch.where(valid, n_sum, one)
    per_type = ((p_a - p_n) ** 2).sum(1, keepdim=True) * valid.to(gates.dtype)  # [nt, 1]
    type_share = onehot.sum(0) / max(t, 1)  # [nt]
    return (per_type.squeeze(1) * type_share).sum()


def expert_norm_loss(weight: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Second term of eq. 9 (unscaled): ``Σ_{e active} ||w_{g,e}||²`` for W_g of shape ``[E, H]``."""
    return (weight.float().pow(2).sum(1) * active.float()).sum()


def z_loss(logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``mean_t (logsumexp over active e of logits[t, e])²`` (unscaled); 0 for an empty batch.

    ``active`` must hold at least one True (the routers guarantee it).
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    masked = logits.float().masked_fill(~active, float("-inf"))
    return torch.logsumexp(masked, dim=-1).pow(2).mean()


def switch_load_balancing_loss(
    softmax_probs: torch.Tensor, routing_map: torch.Tensor, topk: int, active: torch.Tensor
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (unscaled): ``E · Σ_e f_e · P_e``.

    E is the number of active experts, ``f_e = (tokens routed to e) / (T · k)`` (a constant, no
    gradient), ``P_e = mean_t softmax_probs[t, e]`` (the full softmax, before top-k; differentiable).
    It equals 1 for perfectly uniform routing and probabilities.
    """
    t = softmax_probs.shape[0]
    if t == 0:
        return softmax_probs.sum() * 0.0
    num_active = active.sum().to(softmax_probs.dtype)
    f = routing_map.to(softmax_probs.dtype).sum(0).detach() / (t * topk)
    p = softmax_probs.mean(0)
    return num_active * (f * p * active.to(softmax_probs.dtype)).sum()
