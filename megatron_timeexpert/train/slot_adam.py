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

The distributed optimizer: its inner torch optimizer updates flat shards (one contiguous element
range of each parameter per data-parallel rank, cutting across rows); the same correction runs on
the part of each young row a shard holds, and a rank without a shard of a parameter still keeps
the row bases in step (the same resets at the same steps), so every rank holds the same bases.
Not supported: amsgrad and maximize (refused). Apex / transformer-engine FusedAdam keep ``exp_avg`` /
``exp_avg_sq`` the same way and are handled by the same formula (their ``step`` in the group,
``adam_w_mode`` for decoupled decay), to their kernels' rounding; not tested here (no GPU).

No communication: every rank corrects its own rows; bases change only through the ``fresh_*``
calls, which every rank holding the row makes with the same arguments at the same step boundary.
"""

from __future__ import annotations

import torch

from megatron_timeexpert.train.expert_moves import _main_param, _sub_optimizers, distributed_part, shard_of

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
    ``[rows]`` int64 per-row step bases. ``track(shard, base, flat=(start, end, row_len))``: ``shard``
    is the distributed optimizer's flat shard holding elements ``[start, end)`` of a flattened
    ``[rows, ...]`` parameter whose rows have ``row_len`` elements (a shard cuts across rows).
    ``track_base(base)``: a base whose parameters have no shard on this rank; it is kept in step
    with the other ranks (the same resets at the same steps) without any row to correct.
    Built once per optimizer by :meth:`of`.
    """

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        # id(param) -> (param, base, start, end, row_len): rows r cover elements [r*row_len, (r+1)*row_len)
        # of the flattened parameter, of which param holds [start, end).
        self.bases: dict[int, tuple[torch.Tensor, torch.Tensor, int, int, int]] = {}
        self.base_only: list[torch.Tensor] = []
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

    def track(self, param: torch.Tensor, base: torch.Tensor, flat: tuple[int, int, int] | None = None) -> None:
        if flat is None:
            if base.dim() != 1 or base.shape[0] != param.shape[0]:
                raise ValueError(f"base of shape {tuple(base.shape)} does not match rows of {tuple(param.shape)}")
            start, end, row_len = 0, param.numel(), param.numel() // max(param.shape[0], 1)
        else:
            start, end, row_len = (int(x) for x in flat)
            if param.numel() != end - start or row_len < 1 or end > base.shape[0] * row_len:
                raise ValueError(f"shard of {param.numel()} elements does not fit range {flat} of {base.shape[0]} rows")
        group = self._group(param)
        if group.get("amsgrad") or group.get("maximize"):
            raise NotImplementedError("per-row Adam steps support plain Adam/AdamW (no amsgrad, no maximize)")
        self.bases[id(param)] = (param, base, start, end, row_len)

    def track_base(self, base: torch.Tensor) -> None:
        if not any(b is base for b in self.base_only):
            self.base_only.append(base)

    def _group(self, param: torch.Tensor) -> dict:
        for group in self.opt.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise ValueError("parameter is not in this optimizer's param groups")

    def step_of(self, param: torch.Tensor) -> int:
        """Steps ``param`` has taken so far."""
        return _step_count(self.opt, self._group(param), param)

    def global_step(self) -> int:
        """Steps this optimizer has taken (every parameter steps together in megatron's optimizers)."""
        for group in self.opt.param_groups:
            for p in group["params"]:
                if p in self.opt.state:
                    return _step_count(self.opt, group, p)
        return 0

    @staticmethod
    @torch.no_grad()
    def _maintain(base: torch.Tensor, t: int, betas) -> dict[int, list[int]]:
        """Reset bases that no longer need a correction; the young rows by age for step ``t``."""
        base[base >= t] = 0  # optimizer younger than the record: the whole param is fresh
        ages: dict[int, list[int]] = {}
        for r in base.nonzero().flatten().tolist():
            age = t - int(base[r])
            if _same_correction(age, t, betas):
                base[r] = 0  # the correction is the identity from now on
            else:
                ages.setdefault(age, []).append(r)
        return ages

    @staticmethod
    def _local_range(row: int, start: int, end: int, row_len: int) -> tuple[int, int] | None:
        lo, hi = max(row * row_len, start), min((row + 1) * row_len, end)
        return (lo - start, hi - start) if lo < hi else None

    def _pre(self, opt, args, kwargs) -> None:
        self._pending = []
        if self.base_only and opt.param_groups:
            t_all = self.global_step() + 1
            for base in self.base_only:
                self._maintain(base, t_all, opt.param_groups[0]["betas"])
        for group in opt.param_groups:
            for p in group["params"]:
                tracked = self.bases.get(id(p))
                if tracked is None or tracked[0] is not p or p.grad is None:
                    continue
                _, base, start, end, row_len = tracked
                t = _step_count(opt, group, p) + 1  # the step about to be taken
                for age, rows in self._maintain(base, t, group["betas"]).items():
                    ranges = [r for r in (self._local_range(row, start, end, row_len) for row in rows) if r]
                    if ranges:
                        flat = p.detach().view(-1)
                        self._pending.append((p, group, age, ranges, [flat[lo:hi].clone() for lo, hi in ranges]))

    def _post(self, opt, args, kwargs) -> None:
        pending, self._pending = self._pending, []
        for p, group, age, ranges, olds in pending:
            state = opt.state[p]
            m, v, flat = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1), p.view(-1)
            for (lo, hi), p_old in zip(ranges, olds):
                new = adam_rows(
                    p_old,
                    m[lo:hi],
                    v[lo:hi],
                    age,
                    group["lr"],
                    group["betas"],
                    group["eps"],
                    group["weight_decay"],
                    _decoupled(opt, group),
                )
                with torch.no_grad():
                    flat[lo:hi].copy_(new.to(p.dtype))

    def row_range(self, param: torch.Tensor, row: int) -> tuple[int, int, int] | None:
        """``(lo, hi, global_lo)``: the elements of row ``row`` that tracked ``param`` holds, as a
        range of its flat view, and where that range starts in the flattened full parameter."""
        tracked = self.bases.get(id(param))
        if tracked is None or tracked[0] is not param:
            raise ValueError("parameter is not tracked: call track(param, base) first")
        _, _, start, end, row_len = tracked
        local = self._local_range(row, start, end, row_len)
        return None if local is None else (local[0], local[1], local[0] + start)

    @torch.no_grad()
    def fresh_row(self, param: torch.Tensor, row: int) -> None:
        """Fresh Adam state for row ``row`` of tracked ``param`` alone: moments zeroed, step 0."""
        tracked = self.bases.get(id(param))
        if tracked is None or tracked[0] is not param:
            raise ValueError("parameter is not tracked: call track(param, base) first")
        tracked[1][row] = self.reset_row(param, row)

    @torch.no_grad()
    def reset_row(self, param: torch.Tensor, row: int) -> int:
        """Zero ``param``'s row ``row`` (the part of it this tensor holds) in every optimizer-state
        tensor shaped like it; return the parameter's current step count (the row's new base)."""
        rng = self.row_range(param, row)
        if rng is not None:
            for value in self.opt.state.get(param, {}).values():
                if torch.is_tensor(value) and value.numel() == param.numel() and value.dim() >= 1:
                    value.view(-1)[rng[0] : rng[1]].zero_()
        return self.step_of(param)


def _owner(optimizer, param: torch.Tensor):
    """``(inner torch optimizer, the tensor it updates for param, flat range or None)`` for megatron's
    ``optimizer``: the tensor is ``param``, its fp32 main copy, or (distributed optimizer) this rank's
    flat shard with ``(start, end, row_len)``, or None when this rank holds no shard of it. None when
    no part of ``optimizer`` holds ``param``."""
    sub = distributed_part(optimizer, param)
    if sub is not None:
        found = shard_of(sub, param)
        if found is None:
            return sub.optimizer, None, None
        flat, start, end = found
        return sub.optimizer, flat["param"], (start, end, param.numel() // max(param.shape[0], 1))
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        main = _main_param(sub, param)
        if any(main is p for group in inner.param_groups for p in group["params"]):
            return inner, main, None
    return None


def _row_params(module) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(parameters sliced by the module's per-row step base, that base)."""
    if hasattr(module, "slot_step_base"):
        return list(module.parameters()), module.slot_step_base
    params = [module.weight] + ([module.threshold] if hasattr(module, "threshold") else [])
    return params, module.row_step_base


def _track(module, optimizer) -> list[tuple[RowStepAdam, torch.Tensor, torch.Tensor | None]]:
    """Track ``module``'s row-sliced params on their optimizers; (correction, model param, the
    tensor the optimizer updates or None without a shard on this rank)."""
    params, base = _row_params(module)
    out = []
    for p in params:
        owner = _owner(optimizer, p)
        if owner is None:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is in no part of the optimizer")
        corr = RowStepAdam.of(owner[0])
        if owner[1] is None:
            corr.track_base(base)
        else:
            corr.track(owner[1], base, owner[2])
        out.append((corr, p, owner[1]))
    return out


def install_slot_adam(models, optimizer) -> int:
    """Track every MoE layer's expert slots and router rows of ``models`` on ``optimizer`` (megatron's,
    as built by the trainer). Idempotent; returns the number of row-sliced parameters tracked."""
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
        if main is None:  # distributed optimizer, no shard of p here: only the step count
            steps.add(corr.global_step())
            continue
        if main is not p:  # bf16: the fp32 main copy starts from the new weights
            rng = corr.row_range(main, row)
            if rng is not None:
                lo, hi, global_lo = rng
                main.view(-1)[lo:hi].copy_(p.detach().reshape(-1)[global_lo : global_lo + hi - lo])
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
