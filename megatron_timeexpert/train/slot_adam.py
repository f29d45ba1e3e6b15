"""Fresh Adam state for one expert slot or one router row: a per-row Adam step (DESIGN contract 6).

    install_slot_adam(models, optimizer)          # once, after the optimizer is built (the trainer does it)
    fresh_slot_state(layer, optimizer, slot)      # local slot of layer.experts whose expert was just (re)initialised
    fresh_router_row(router, optimizer, e)        # router rows W_g[e], G[e] of a just activated expert
    fresh_expert_state(layer, optimizer, e)       # both, for logical expert e (the slot only on its EP rank)

Why. An expert slot is a slice of one parameter (``experts.w1 [slots, H, F]``, ``experts.w2``) and a
router row is a row of ``router.weight [E, H]`` / ``router.threshold [E]``; Adam keeps ONE step
count ``t`` per parameter and bias-corrects every element with it. Zeroing a slice's moments at
``t >> 1`` is not a fresh start: the first update of that slice becomes
``(1 - b1) g / (sqrt(1 - b2) |g| + eps)`` instead of a fresh Adam's ``g / (|g| + eps)``, i.e.
0.1 / sqrt(0.05) = 0.45x a fresh step at b2 = 0.95 and 0.1 / sqrt(0.001) = 3.2x at b2 = 0.999.

What is kept. Each row-sliced parameter has an int64 buffer of per-row step bases beside it:
``experts.slot_step_base [slots]`` (persistent, checkpointed by physical slot like the weights,
moved with its slot by train/expert_moves.slot_tensors) and ``router.row_step_base [E]``
(replicated like the router). Row ``r``'s own Adam step is ``a = t - base[r]``: base 0 (the
default) means the row is as old as the parameter (``a = t``); :func:`fresh_slot_state` /
:func:`fresh_router_row` zero the row's moments in the optimizer state and set ``base = t`` (its
step is 0), so the next optimizer step is the row's step 1.

The correction (exact). Hooks on the inner torch optimizer that updates the parameter (megatron's
``FP32Optimizer`` / ``Float16OptimizerWithFloat16Params``, also inside a ``ChainedOptimizer``;
for bf16 the fp32 main copy is the tensor corrected, before megatron copies it to the model):

- step pre-hook: for every tracked parameter that will step (it has a grad), with ``t`` its step
  count after this step, keep a copy of the rows whose ``a < t`` (the only rows that need a
  correction; none in a run that never resets a row, so the default path is untouched);
- step post-hook: the optimizer has updated the moments ``m``, ``v`` of every row exactly as a
  fresh Adam would (the moment updates do not depend on ``t``, and the row's moments were zero at
  its reset), but it has moved the row with ``t``'s bias correction. Each kept row is recomputed
  from its copy, its new ``m`` and ``v`` and its own step ``a``, with the same operations, in the
  same order, that torch's single-tensor Adam/AdamW performs for a parameter at step ``a``::

      p = p_old * (1 - lr * wd)                   # AdamW (decoupled); Adam folds wd * p_old into g, hence m, v
      p = p - lr / (1 - b1^a) * m / (sqrt(v) / sqrt(1 - b2^a) + eps)

  With torch's CPU (single-tensor) Adam/AdamW the result is bitwise the update a freshly built
  Adam(W) gives a parameter holding that row, fed the same (clipped) gradients; with the foreach
  path (torch on CUDA) it is the same formula up to float rounding. Gradient clipping, loss
  scaling, LR schedules and weight decay stay megatron's and torch's: the hook only replaces the
  bias-correction factors of the young rows. Once ``1 - b^a`` equals ``1 - b^t`` in float64 for
  both betas, the row's base is reset to 0 (exact: the correction is then the identity).
- A base ``>= t`` means the optimizer state is younger than the row's record (a fine-tune that
  loads weights but starts a fresh optimizer): the whole parameter is fresh, so the base is 0.

Not supported: megatron's distributed optimizer (its state is flat shards of grad buffers;
:func:`install_slot_adam` skips it and the ``fresh_*`` functions raise ``NotImplementedError``),
amsgrad and maximize (refused). Apex / transformer-engine FusedAdam keep ``exp_avg`` /
``exp_avg_sq`` the same way and are handled by the same formula (their ``step`` in the group,
``adam_w_mode`` for decoupled decay), to their kernels' rounding; not tested here (no GPU).

No communication: every rank corrects its own rows; bases change only through the ``fresh_*``
calls, which every rank holding the row makes with the same arguments at the same step boundary.
"""

from __future__ import annotations

import torch

from megatron_timeexpert.train.expert_moves import _main_param, _sub_optimizers

_ATTR = "_timeexpert_row_step_adam"  # the RowStepAdam of an inner torch optimizer


def _step_count(opt: torch.optim.Optimizer, group: dict, p: torch.Tensor) -> int:
    """Steps ``p`` has taken in ``opt`` so far (0 before its first)."""
    step = opt.state.get(p, {}).get("step", group.get("step", 0))
    return int(float(step))


def _decoupled(opt: torch.optim.Optimizer, group: dict) -> bool:
    if "decoupled_weight_decay" in group:
        return bool(group["decoupled_weight_decay"])
    if hasattr(opt, "adam_w_mode"):  # apex / transformer-engine FusedAdam
        return bool(opt.adam_w_mode)
    return isinstance(opt, torch.optim.AdamW)


def _same_correction(age: int, t: int, betas: tuple[float, float]) -> bool:
    return all(1 - b ** float(age) == 1 - b ** float(t) for b in betas)


@torch.no_grad()
def adam_rows(
    p_old: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    age: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decoupled: bool,
) -> torch.Tensor:
    """Adam's parameter update at step ``age`` from ``p_old`` and the already updated moments, with
    the operations and order of torch's single-tensor Adam/AdamW (module docstring)."""
    p = p_old.clone()
    if weight_decay != 0 and decoupled:
        p.mul_(1 - lr * weight_decay)
    step = float(age)
    bias_correction1 = 1 - betas[0] ** step
    bias_correction2 = 1 - betas[1] ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    return p.addcdiv_(exp_avg, denom, value=-step_size)


class RowStepAdam:
    """The per-row step correction on one inner torch optimizer (module docstring).

    ``track(param, base)``: ``param`` is a tensor ``opt`` updates (``[rows, ...]``), ``base`` its
    ``[rows]`` int64 per-row step bases. Built once per optimizer by :meth:`of`.
    """

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self.bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(param) -> (param, base)
        self._pending: list[tuple] = []
        opt.register_step_pre_hook(self._pre)
        opt.register_step_post_hook(self._post)

    @classmethod
    def of(cls, opt: torch.optim.Optimizer) -> RowStepAdam:
        """The correction installed on ``opt`` (installed on first use; one per optimizer)."""
        found = opt.__dict__.get(_ATTR)
        if found is None:
            found = cls(opt)
            setattr(opt, _ATTR, found)
        return found

    def track(self, param: torch.Tensor, base: torch.Tensor) -> None:
        if base.dim() != 1 or base.shape[0] != param.shape[0]:
            raise ValueError(f"base of shape {tuple(base.shape)} does not match rows of {tuple(param.shape)}")
        group = self._group(param)
        if group.get("amsgrad") or group.get("maximize"):
            raise NotImplementedError("per-row Adam steps support plain Adam/AdamW (no amsgrad, no maximize)")
        self.bases[id(param)] = (param, base)

    def _group(self, param: torch.Tensor) -> dict:
        for group in self.opt.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("parameter is not in this optimizer's param groups")

    def step_of(self, param: torch.Tensor) -> int:
        """Steps ``param`` has taken so far."""
        return _step_count(self.opt, self._group(param), param)

    def _pre(self, opt, args, kwargs) -> None:
        self._pending = []
        for group in opt.param_groups:
            for p in group["params"]:
                tracked = self.bases.get(id(p))
                if tracked is None or tracked[0] is not p or p.grad is None:
                    continue
                base = tracked[1]
                t = _step_count(opt, group, p) + 1  # the step about to be taken
                with torch.no_grad():
                    base[base >= t] = 0  # optimizer younger than the record: the whole param is fresh
                    rows = base.nonzero().flatten().tolist()
                    ages: dict[int, list[int]] = {}
                    for r in rows:
                        age = t - int(base[r])
                        if _same_correction(age, t, group["betas"]):
                            base[r] = 0  # the correction is the identity from now on
                        else:
                            ages.setdefault(age, []).append(r)
                for age, idx in ages.items():
                    index = torch.tensor(idx, device=p.device)
                    self._pending.append((p, group, age, index, p.detach().index_select(0, index)))

    def _post(self, opt, args, kwargs) -> None:
        pending, self._pending = self._pending, []
        for p, group, age, index, p_old in pending:
            state = opt.state[p]
            new = adam_rows(
                p_old,
                state["exp_avg"].index_select(0, index),
                state["exp_avg_sq"].index_select(0, index),
                age,
                group["lr"],
                group["betas"],
                group["eps"],
                group["weight_decay"],
                _decoupled(opt, group),
            )
            with torch.no_grad():
                p.index_copy_(0, index, new.to(p.dtype))

    @torch.no_grad()
    def fresh_row(self, param: torch.Tensor, row: int) -> None:
        """Fresh Adam state for row ``row`` of tracked ``param`` alone: moments zeroed, step 0."""
        tracked = self.bases.get(id(param))
        if tracked is None or tracked[0] is not param:
            raise ValueError("parameter is not tracked: call track(param, base) first")
        tracked[1][row] = self.reset_row(param, row)

    @torch.no_grad()
    def reset_row(self, param: torch.Tensor, row: int) -> int:
        """Zero ``param``'s row ``row`` in every optimizer-state tensor with a row axis; return the
        parameter's current step count (the new base of the row)."""
        rows = param.shape[0]
        for value in self.opt.state.get(param, {}).values():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == rows:
                value[row].zero_()
        return self.step_of(param)


def _owner(optimizer, param: torch.Tensor) -> tuple[torch.optim.Optimizer, torch.Tensor] | None:
    """The inner torch optimizer of megatron's ``optimizer`` that updates ``param``, and the tensor
    it updates (``param`` or its fp32 main copy); None when no part of ``optimizer`` holds it."""
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        main = _main_param(sub, param)  # raises NotImplementedError for the distributed optimizer
        if any(main is p for group in inner.param_groups for p in group["params"]):
            return inner, main
    return None


def _row_params(module) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(parameters sliced by the module's per-row step base, that base)."""
    if hasattr(module, "slot_step_base"):
        return list(module.parameters()), module.slot_step_base
    params = [module.weight] + ([module.threshold] if hasattr(module, "threshold") else [])
    return params, module.row_step_base


def _track(module, optimizer) -> list[tuple[RowStepAdam, torch.Tensor, torch.Tensor]]:
    """Track ``module``'s row-sliced params on their optimizers; (correction, model param, main param)."""
    params, base = _row_params(module)
    out = []
    for p in params:
        owner = _owner(optimizer, p)
        if owner is None:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is in no part of the optimizer")
        corr = RowStepAdam.of(owner[0])
        corr.track(owner[1], base)
        out.append((corr, p, owner[1]))
    return out


def _uses_distributed_optimizer(optimizer) -> bool:
    return any(type(sub).__name__ == "DistributedOptimizer" for sub in _sub_optimizers(optimizer))


def install_slot_adam(models, optimizer) -> int:
    """Track every MoE layer's expert slots and router rows of ``models`` on ``optimizer`` (megatron's,
    as built by the trainer). Idempotent; returns the number of row-sliced parameters tracked.
    Skipped (0) under the distributed optimizer, whose resets are not supported."""
    if _uses_distributed_optimizer(optimizer):
        return 0
    n = 0
    for model in models:
        for m in model.modules():
            if hasattr(m, "slot_step_base") or hasattr(m, "row_step_base"):
                n += len(_track(m, optimizer))
    return n


@torch.no_grad()
def _fresh_rows(module, optimizer, row: int) -> None:
    tracked = _track(module, optimizer)
    _, base = _row_params(module)
    steps = set()
    for corr, p, main in tracked:
        if main is not p:
            main[row].copy_(p[row])  # bf16: the fp32 main copy starts from the new weights
        steps.add(corr.reset_row(main, row))
    if len(steps) != 1:
        raise RuntimeError(f"parameters sharing a per-row step base have different step counts {sorted(steps)}")
    base[row] = steps.pop()


def fresh_slot_state(layer, optimizer, slot: int) -> None:
    """Give local slot ``slot`` of ``layer.experts`` the optimizer state of a fresh optimizer: zero its
    rows of every optimizer-state tensor of its weights (Adam's moments), set its step to 0
    (``slot_step_base[slot] = t``), and under bf16 copy its (new) weights into the fp32 main copy.
    Call after writing the slot's new weights, on the rank that holds the slot, between steps."""
    if not 0 <= slot < layer.experts.slot_step_base.shape[0]:
        raise ValueError(f"slot {slot} out of range [0, {layer.experts.slot_step_base.shape[0]})")
    _fresh_rows(layer.experts, optimizer, slot)


def fresh_router_row(router, optimizer, e: int) -> None:
    """The same for logical expert ``e``'s router rows ``weight[e]`` and ``threshold[e]``, on every
    rank (the router is replicated): call after ``router.activate(e, ...)``, with the same ``e``."""
    if not 0 <= e < router.row_step_base.shape[0]:
        raise ValueError(f"expert id {e} out of range [0, {router.row_step_base.shape[0]})")
    _fresh_rows(router, optimizer, e)


def fresh_expert_state(layer, optimizer, e: int) -> None:
    """Fresh optimizer state for logical expert ``e`` of ``layer``: its router rows on every rank,
    its slot on the EP rank that holds it. Every rank of the stage calls it with the same ``e``."""
    fresh_router_row(layer.router, optimizer, e)
    rank, slot = divmod(int(layer.placement.logical_to_physical[e]), layer.placement.slots_per_rank)
    if rank == layer.ep_rank:
        fresh_slot_state(layer, optimizer, slot)
