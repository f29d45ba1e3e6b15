"""Placement planner: a new logical -> physical expert map that balances rank load with few moves.

Pure logic (numpy), no process groups: every rank calls :func:`plan_placement` with the same globally
reduced loads and the same current map, and gets the same plan (ties are broken by rank and expert
ids, never by hashing or timing). The plan's map goes to :meth:`parallel.placement.ExpertPlacement.set_map`
and its moves to the migration code (DESIGN contracts 2 and 6: shapes never change, a slot is the
unit of migration).

Model. ``E = ep_size * slots_per_rank`` physical slots; slot ``p`` lives on EP rank
``p // slots_per_rank``; every slot holds exactly one logical id (active or not), so every rank always
holds ``slots_per_rank`` experts and a change of rank is always part of a swap or a cycle. The load
of a rank is the sum of its experts' loads (``load[e]``: running average of tokens routed to ``e``,
weighted by its compute; inactive experts have load 0).

Objective. Minimise the maximum rank load; among plans whose maximum is within
``PlannerConfig.tolerance`` (relative) of the best maximum found, move the fewest experts. An
expert "moves" when its RANK changes; an expert that stays on its rank keeps its slot (reordering
slots within a rank would cost a copy and buy nothing). Candidates:

* ``keep``: the current map (0 moves);
* ``swaps``: every prefix of a greedy improvement walk from the current map: take the most loaded
  rank, swap one of its experts with one on a lightly loaded rank so that the pair's larger load is
  as small as possible (ties: fewer displaced experts, then lower ids), repeat while the maximum
  falls and is above ``lower_bound * (1 + tolerance)``;
* ``packing``: a from-scratch longest-processing-time packing (:func:`greedy_pack`), its bins
  relabelled onto ranks so that as many experts as possible stay where they are;
* ``packing+swaps``: that packing improved by the same swap walk;
* ``sticky-packing(f)``: the same packing, except that an expert stays on its rank whenever that
  rank, with its remaining free slots filled by the lightest expert, stays under
  ``best packing max * (1 + f * tolerance)`` (f = 0, 0.5, 1), then the swap walk;
* ``partial-packing(n ranks)``: only when nothing above lands within the tolerance of the packing:
  the n/2 most and n/2 least loaded ranks repacked among themselves (n = 2, 4, 8, ...), then the walk.

The best maximum found is the minimum over all candidates; the plan returned is the candidate with
the fewest moves whose maximum is within the tolerance of it.

The baseline the simulator and benchmark compare against, :func:`plan_greedy_packing`, is a
non-incremental greedy balanced packing written from the published description of DeepSeek's EPLB
(no replicas): experts sorted by load, heaviest first, each to the least loaded rank that still has a
free slot; its bins are NOT relabelled, so it moves what EPLB moves.

Simulator: ``python -m tools.placement_sim --loads zipf --ep 1024 --experts 4096`` (docs/PLACEMENT.md).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class PlannerConfig:
    """How the planner trades balance against moves."""

    tolerance: float = 0.02
    """Relative slack: a plan whose max rank load is <= best * (1 + tolerance) counts as balanced,
    and among those the one moving the fewest experts wins."""

    candidate_ranks: int = 16
    """Swap partners examined per step: the least loaded ranks (all ranks are tried once before the
    walk gives up)."""

    max_swaps: int | None = None
    """Cap on swaps per improvement walk (None: 2 * number of experts)."""

    bytes_per_expert: int = 0
    """Bytes that move with one expert (weights plus all optimizer state keyed to its slot);
    ``PlacementPlan.bytes_moved = experts_moved * bytes_per_expert``."""

    def __post_init__(self):
        if not (self.tolerance >= 0 and np.isfinite(self.tolerance)):
            raise ValueError(f"PlannerConfig.tolerance must be a finite number >= 0, got {self.tolerance}")
        if int(self.candidate_ranks) != self.candidate_ranks or self.candidate_ranks < 1:
            raise ValueError(f"PlannerConfig.candidate_ranks must be an integer >= 1, got {self.candidate_ranks}")
        if self.max_swaps is not None and (int(self.max_swaps) != self.max_swaps or self.max_swaps < 0):
            raise ValueError(f"PlannerConfig.max_swaps must be None or an integer >= 0, got {self.max_swaps}")
        if int(self.bytes_per_expert) != self.bytes_per_expert or self.bytes_per_expert < 0:
            raise ValueError(f"PlannerConfig.bytes_per_expert must be an integer >= 0, got {self.bytes_per_expert}")


@dataclass
class RebalanceConfig:
    """When a training run re-plans expert placement (YAML section ``moe.placement``; the trainer's
    hook is megatron_timeexpert/train/expert_placement.py). The load is each expert's running average
    of tokens routed per step (the routing records' ``load_ema``, reduced over every rank of the
    stage); experts have equal compute, so tokens are the load."""

    enabled: bool = False
    """Re-plan and migrate experts while training (needs our MoE layer and EP > 1 to move anything)."""

    check_interval: int = 10
    """Every this many optimizer steps the rank-load imbalance (max/mean over EP ranks) of the load
    average is checked against ``imbalance_threshold``."""

    imbalance_threshold: float = 1.15
    """Re-plan when the load average's max/mean rank load exceeds this (> 1)."""

    load_window_steps: int = 20
    """The load average is an EMA over about this many steps (decay ``1 - 1/window``), so the
    imbalance must persist over a window, not one noisy step, to trigger a re-plan."""

    warmup_steps: int = 0
    """No imbalance-triggered re-plan at or before this step (routing settles first)."""

    after_dynamics: bool = True
    """Re-plan a layer right after experts were added to or pruned from it (moe.dynamics)."""

    force_interval: int = 0
    """Re-plan every this many steps whatever the imbalance (0: never; benchmarks and tests)."""

    tolerance: float = 0.02
    """Planner tolerance (:class:`PlannerConfig`): among plans within this of the best max rank
    load, the one moving the fewest experts wins."""

    trace: bool = False
    """Write the routing trace (tokens per expert per layer per step) to
    ``logging.run_dir/routing_trace/pp{stage}.jsonl`` for tools/placement_sim.py."""

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (``field: why``)."""
        for name in ("check_interval", "load_window_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r}: must be an integer >= 1")
        for name in ("warmup_steps", "force_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}={v!r}: must be an integer >= 0")
        if not (isinstance(self.imbalance_threshold, (int, float)) and self.imbalance_threshold > 1.0):
            raise ValueError(f"imbalance_threshold={self.imbalance_threshold!r}: must be a number > 1")
        if not (isinstance(self.tolerance, (int, float)) and 0.0 <= self.tolerance < 1.0):
            raise ValueError(f"tolerance={self.tolerance!r}: must be in [0, 1)")

    @property
    def load_decay(self) -> float:
        return 1.0 - 1.0 / self.load_window_steps


def rank_imbalance(load, current_map, ep_size: int, slots_per_rank: int) -> float:
    """max / mean rank load of ``load`` under ``current_map`` (1.0 when there is no load)."""
    load, l2p = _check_inputs(load, current_map, ep_size, slots_per_rank)
    totals = _rank_loads(load, l2p // int(slots_per_rank), int(ep_size))
    mean = float(totals.mean())
    return float(totals.max()) / mean if mean > 0 else 1.0


@dataclass(frozen=True)
class Move:
    """One logical expert changing rank: from (src_rank, src_slot) to (dst_rank, dst_slot)."""

    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


@dataclass(frozen=True)
class PlacementPlan:
    """A new placement map, the moves that produce it from the current one, and its predicted effect."""

    logical_to_physical: tuple[int, ...]
    """New map: logical expert e -> physical slot (a permutation of 0..E-1)."""
    moves: tuple[Move, ...]
    """Experts whose rank changes, by expert id; applying them to the old map gives the new one."""
    ep_size: int
    slots_per_rank: int
    max_load_before: float
    """Largest rank load under the current map."""
    max_load_after: float
    """Largest rank load under the new map (predicted with the same loads)."""
    mean_load: float
    """Mean rank load (the same before and after)."""
    lower_bound: float
    """max(mean rank load, largest single expert load): no map does better."""
    best_max_load: float
    """Smallest max rank load among the candidates the planner examined."""
    bytes_moved: int
    strategy: str
    """Which candidate won (see the module docstring; ``+swaps``: improved by the swap walk), or
    greedy-packing for the baseline."""
    plan_time_s: float = field(default=0.0, compare=False)

    @property
    def experts_moved(self) -> int:
        return len(self.moves)

    @property
    def imbalance_before(self) -> float:
        """max / mean rank load under the current map (1.0 when every load is 0)."""
        return self.max_load_before / self.mean_load if self.mean_load > 0 else 1.0

    @property
    def imbalance_after(self) -> float:
        """max / mean rank load under the new map (1.0 when every load is 0)."""
        return self.max_load_after / self.mean_load if self.mean_load > 0 else 1.0

    def map_tensor(self) -> torch.Tensor:
        """The new map as a long tensor, ready for ``ExpertPlacement.set_map``."""
        return torch.tensor(self.logical_to_physical, dtype=torch.long)


# ----------------------------------------------------------------------------------------- inputs


def _as_array(x, name: str, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name} must be a 1-D sequence of numbers: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
    return arr.astype(dtype)


def _check_inputs(load, current_map, ep_size: int, slots_per_rank: int) -> tuple[np.ndarray, np.ndarray]:
    for name, v in (("ep_size", ep_size), ("slots_per_rank", slots_per_rank)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    num = int(ep_size) * int(slots_per_rank)
    load = _as_array(load, "load", np.float64)
    if load.shape != (num,):
        raise ValueError(f"load must have one entry per expert: ep_size * slots_per_rank = {num}, got {load.shape[0]}")
    if not np.all(np.isfinite(load)):
        bad = np.flatnonzero(~np.isfinite(load))[:8].tolist()
        raise ValueError(f"load must be finite; experts {bad} are not")
    if np.any(load < 0):
        bad = np.flatnonzero(load < 0)[:8].tolist()
        raise ValueError(f"load must be >= 0; experts {bad} are negative")
    if current_map is None:
        l2p = np.arange(num, dtype=np.int64)
    else:
        raw = _as_array(current_map, "current_map", np.float64)
        if raw.shape != (num,):
            raise ValueError(f"current_map must have {num} entries (ep_size * slots_per_rank), got {raw.shape[0]}")
        if not np.all(raw == np.round(raw)):
            raise ValueError("current_map must hold integer slot ids")
        l2p = raw.astype(np.int64)
        if not np.array_equal(np.sort(l2p), np.arange(num)):
            raise ValueError(f"current_map must be a permutation of 0..{num - 1}")
    return load, l2p


def _rank_loads(load: np.ndarray, rank_of: np.ndarray, ep_size: int) -> np.ndarray:
    return np.bincount(rank_of, weights=load, minlength=ep_size)


# ----------------------------------------------------------------------------------- the packing


def greedy_pack(load, ep_size: int, slots_per_rank: int) -> np.ndarray:
    """EPLB-style balanced packing, from scratch: ``[ep_size, slots_per_rank]`` logical ids per bin.

    Experts sorted by load, heaviest first (ties: lower id first); each goes to the least loaded bin
    that still has a free slot (ties: lower bin id), filling that bin's slots in order. No replicas.
    """
    load = np.asarray(load, dtype=np.float64)
    order = np.lexsort((np.arange(load.size), -load))
    bins = np.empty((ep_size, slots_per_rank), dtype=np.int64)
    fill = [0] * ep_size
    heap = [(0.0, r) for r in range(ep_size)]  # already a heap: all zero, ascending r
    for e in order.tolist():
        total, r = heapq.heappop(heap)
        bins[r, fill[r]] = e
        fill[r] += 1
        if fill[r] < slots_per_rank:
            heapq.heappush(heap, (total + float(load[e]), r))
    return bins


def _sticky_pack(load: np.ndarray, home: np.ndarray, ep_size: int, spr: int, cap: float) -> np.ndarray:
    """Longest-processing-time packing that leaves an expert on its home rank when it fits: new rank per expert.

    Experts heaviest first (ties: lower id); each stays home if that rank has a free slot and its load,
    with its other free slots filled by the lightest expert, stays <= ``cap``; otherwise it goes to the
    least loaded rank with a free slot (ties: lower rank).
    """
    floor = float(load.min()) if load.size else 0.0
    order = np.lexsort((np.arange(load.size), -load))
    totals = [0.0] * ep_size
    free = [spr] * ep_size
    heap = [(0.0, r) for r in range(ep_size)]
    new_rank = np.empty(load.size, dtype=np.int64)
    for e in order.tolist():
        w, r = float(load[e]), int(home[e])
        if not (free[r] and totals[r] + w + (free[r] - 1) * floor <= cap):
            while True:  # lazy heap: skip stale entries and full ranks
                t, r = heapq.heappop(heap)
                if free[r] and t == totals[r]:
                    break
        totals[r] += w
        free[r] -= 1
        new_rank[e] = r
        if free[r]:
            heapq.heappush(heap, (totals[r], r))
    return new_rank


def _relabel(bins: np.ndarray, old_rank: np.ndarray) -> np.ndarray:
    """Assign packing bins to ranks so that many experts stay on their rank: new rank per expert.

    Greedy maximum-overlap matching: (bin, rank) pairs by the number of the bin's experts already on
    that rank, most first (ties: lower bin, lower rank); unmatched bins take the free ranks in order.
    """
    ep_size = bins.shape[0]
    pairs: dict[tuple[int, int], int] = {}
    for b in range(ep_size):
        for r in old_rank[bins[b]].tolist():
            pairs[(b, r)] = pairs.get((b, r), 0) + 1
    ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0][0], kv[0][1]))
    bin_to_rank = [-1] * ep_size
    rank_used = [False] * ep_size
    for (b, r), _ in ranked:
        if bin_to_rank[b] < 0 and not rank_used[r]:
            bin_to_rank[b] = r
            rank_used[r] = True
    free = iter(r for r in range(ep_size) if not rank_used[r])
    new_rank = np.empty(bins.size, dtype=np.int64)
    for b in range(ep_size):
        if bin_to_rank[b] < 0:
            bin_to_rank[b] = next(free)
        new_rank[bins[b]] = bin_to_rank[b]
    return new_rank


# ------------------------------------------------------------------------------- the swap walk


@dataclass
class _Walk:
    """A swap-improvement walk: the swaps made and (max rank load, experts displaced) after each."""

    swaps: list[tuple[int, int]]
    max_load: list[float]
    displaced: list[int]


def _swap_walk(
    load: np.ndarray, rank_of: np.ndarray, home: np.ndarray, ep_size: int, spr: int, stop_at: float, cfg: PlannerConfig
) -> _Walk:
    """Greedy improvement from the assignment ``rank_of`` (modified in place).

    ``home``: each expert's rank under the current map, for counting displaced experts.
    """
    members = np.argsort(rank_of, kind="stable").reshape(ep_size, spr)  # ids per rank
    weights = load[members]
    totals = weights.sum(axis=1)
    displaced = int(np.count_nonzero(rank_of != home))
    walk = _Walk([], [float(totals.max())], [displaced])
    max_swaps = 2 * load.size if cfg.max_swaps is None else cfg.max_swaps
    k = min(cfg.candidate_ranks, ep_size - 1)
    scale = max(float(totals.max()), 1e-300)
    for _ in range(max_swaps):
        h = int(np.argmax(totals))
        if totals[h] <= stop_at or ep_size == 1:
            break
        order = np.argsort(totals, kind="stable")
        order = order[order != h]
        best = _best_swap(h, order[:k], members, weights, totals, rank_of, home, scale)
        if best is None and k < ep_size - 1:
            best = _best_swap(h, order, members, weights, totals, rank_of, home, scale)
        if best is None:
            break
        c, i, j = best
        x, y = int(members[h, i]), int(members[c, j])
        d = weights[h, i] - weights[c, j]
        members[h, i], members[c, j] = y, x
        weights[h, i], weights[c, j] = load[y], load[x]
        totals[h] -= d
        totals[c] += d
        displaced += int(c != home[x]) - int(h != home[x]) + int(h != home[y]) - int(c != home[y])
        rank_of[x], rank_of[y] = c, h
        walk.swaps.append((x, y))
        walk.max_load.append(float(totals.max()))
        walk.displaced.append(displaced)
    return walk


def _rowwise_searchsorted(rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``out[c, i] = np.searchsorted(rows[c], targets[c, i])`` for every (sorted) row ``c``."""
    k, n = rows.shape
    if k * n * targets.shape[1] <= 1 << 18:  # small: count in one dense comparison
        return (rows[:, None, :] < targets[:, :, None]).sum(axis=2)
    return np.stack([np.searchsorted(row, t) for row, t in zip(rows, targets)])


def _best_swap(h, partners, members, weights, totals, rank_of, home, scale):
    """Best (partner rank, slot on h, slot on partner) swap that lowers the pair's max below totals[h].

    For each expert x on h and partner c, the best y on c is the one whose load is nearest to
    ``load[x] - (totals[h] - totals[c]) / 2`` (the pair max is V-shaped in the exchanged load), found
    by binary search in c's sorted loads. Ties within 1e-12 relative: fewer displaced experts, then
    lower expert ids.
    """
    th = totals[h]
    partners = partners[totals[partners] < th]
    if partners.size == 0:
        return None
    xw = weights[h]
    order = np.argsort(weights[partners], axis=1, kind="stable")
    yw = np.take_along_axis(weights[partners], order, axis=1)
    gap = (th - totals[partners])[:, None]
    target = xw[None, :] - gap / 2
    idx = _rowwise_searchsorted(yw, target)  # [k, S]
    spr = yw.shape[1]
    jj = np.concatenate([np.clip(idx - 1, 0, spr - 1), np.clip(idx, 0, spr - 1)], axis=1)  # [k, 2S]
    ii = np.concatenate([np.arange(spr), np.arange(spr)])[None, :].repeat(partners.size, 0)
    d = xw[ii] - np.take_along_axis(yw, jj, axis=1)
    pair = np.maximum(th - d, totals[partners][:, None] + d)
    ok = (d > 0) & (pair < th - 1e-12 * scale)
    if not ok.any():
        return None
    best_pair = pair[ok].min()
    rows, cols = np.nonzero(ok & (pair <= best_pair + 1e-12 * scale))
    c = partners[rows]
    i = ii[rows, cols]
    j = np.take_along_axis(order, jj, axis=1)[rows, cols]
    x = members[h, i]
    y = members[c, j]
    delta = (c != home[x]).astype(int) - (h != home[x]) + (h != home[y]) - (c != home[y])
    pick = np.lexsort((y, x, delta))[0]
    return int(c[pick]), int(i[pick]), int(j[pick])


def _replay(rank_of: np.ndarray, swaps: list[tuple[int, int]]) -> np.ndarray:
    out = rank_of.copy()
    for x, y in swaps:
        out[x], out[y] = out[y], out[x]
    return out


# ------------------------------------------------------------------------------------ the plan


def _build_plan(load, l2p, new_rank, ep_size, spr, strategy, bytes_per_expert, best_max, t0) -> PlacementPlan:
    """Slots for ``new_rank``: stayers keep their slot, arrivals take freed slots (ascending) by id."""
    old_rank = l2p // spr
    movers = np.flatnonzero(new_rank != old_rank)
    new_l2p = l2p.copy()
    if movers.size:
        freed = np.sort(l2p[movers])  # physical ids, so grouped by rank, ascending slot
        arrivals = movers[np.lexsort((movers, new_rank[movers]))]
        new_l2p[arrivals] = freed
        if not np.array_equal(freed // spr, new_rank[arrivals]):
            raise AssertionError("internal: a rank would not keep slots_per_rank experts")
    moves = tuple(
        Move(int(e), int(l2p[e] // spr), int(l2p[e] % spr), int(new_l2p[e] // spr), int(new_l2p[e] % spr))
        for e in movers.tolist()
    )
    before = _rank_loads(load, old_rank, ep_size)
    after = _rank_loads(load, new_rank, ep_size)
    mean = float(load.sum()) / ep_size
    lower = max(mean, float(load.max()) if load.size else 0.0)
    return PlacementPlan(
        logical_to_physical=tuple(new_l2p.tolist()),
        moves=moves,
        ep_size=ep_size,
        slots_per_rank=spr,
        max_load_before=float(before.max()),
        max_load_after=float(after.max()),
        mean_load=mean,
        lower_bound=lower,
        best_max_load=float(after.max()) if best_max is None else min(best_max, float(after.max())),
        bytes_moved=len(moves) * int(bytes_per_expert),
        strategy=strategy,
        plan_time_s=time.perf_counter() - t0,
    )


def plan_placement(
    load: Sequence[float] | np.ndarray | torch.Tensor,
    current_map: Sequence[int] | np.ndarray | torch.Tensor | None,
    ep_size: int,
    slots_per_rank: int,
    config: PlannerConfig | None = None,
) -> PlacementPlan:
    """Plan a new placement for one MoE layer (see the module docstring for the objective).

    Args:
        load: ``[E]`` non-negative finite load per logical expert (0 for inactive experts).
        current_map: ``[E]`` logical -> physical slot map now installed (a permutation; None:
            contiguous).
        ep_size: EP ranks; ``slots_per_rank``: slots per rank; ``E = ep_size * slots_per_rank``.
        config: :class:`PlannerConfig` (defaults: 2% tolerance).
    """
    t0 = time.perf_counter()
    cfg = config or PlannerConfig()
    if not isinstance(cfg, PlannerConfig):
        raise TypeError(f"config must be a PlannerConfig, got {type(cfg).__name__}")
    load, l2p = _check_inputs(load, current_map, ep_size, slots_per_rank)
    ep_size, spr = int(ep_size), int(slots_per_rank)
    home = l2p // spr
    mean = float(load.sum()) / ep_size
    lower = max(mean, float(load.max()))
    stop = lower * (1 + cfg.tolerance)

    # Each candidate: a starting assignment and the swap walk from it; every point of every walk is
    # a plan (max load, experts displaced); the selection below picks among all of them.
    starts: list[tuple[str, np.ndarray, _Walk]] = []

    def walk_from(name: str, rank_of: np.ndarray, stop_at: float) -> _Walk:
        start = rank_of.copy()
        walk = _swap_walk(load, rank_of, home, ep_size, spr, stop_at, cfg)
        starts.append((name, start, walk))
        return walk

    packed = _relabel(greedy_pack(load, ep_size, spr), home)
    pwalk = walk_from("packing", packed, lower)
    # Walks near the current map stop once within the tolerance of the (polished) packing.
    target = min(pwalk.max_load) * (1 + cfg.tolerance)
    stop = max(stop, target)
    walk_from("keep", home.copy(), stop)
    starts.insert(0, starts.pop())  # on equal moves and balance, prefer the walk from the current map
    for frac in (0.0, 0.5, 1.0):
        cap = min(pwalk.max_load) * (1 + frac * cfg.tolerance)
        walk_from(f"sticky-packing({frac:g})", _sticky_pack(load, home, ep_size, spr, cap), stop)
    if min(min(w.max_load) for name, _, w in starts if name != "packing") > target:
        # Nothing near the current map is balanced enough: repack the m most and m least loaded ranks.
        totals = _rank_loads(load, home, ep_size)
        order = np.argsort(totals, kind="stable")
        m = 1
        while 2 * m < ep_size:
            pool = np.sort(np.concatenate([order[:m], order[-m:]]))
            sub = np.flatnonzero(np.isin(home, pool))
            local_home = np.searchsorted(pool, home[sub])
            local = _relabel(greedy_pack(load[sub], pool.size, spr), local_home)
            rank_of = home.copy()
            rank_of[sub] = pool[local]
            if min(walk_from(f"partial-packing({2 * m} ranks)", rank_of, stop).max_load) <= target:
                break
            m *= 2

    best = min(min(w.max_load) for _, _, w in starts)
    threshold = best * (1 + cfg.tolerance) + 1e-12 * max(best, 1e-300)
    choice = None  # (displaced, max load, candidate index, walk position): fewest moves, then best balance
    for k, (_, _, walk) in enumerate(starts):
        for t, (mx, moved) in enumerate(zip(walk.max_load, walk.displaced)):
            if mx <= threshold and (choice is None or (moved, mx, k, t) < choice):
                choice = (moved, mx, k, t)
    _, _, k, t = choice
    name, start, walk = starts[k]
    strategy = name if t == 0 else ("swaps" if name == "keep" else f"{name}+swaps")
    new_rank = _replay(start, walk.swaps[:t])
    return _build_plan(load, l2p, new_rank, ep_size, spr, strategy, cfg.bytes_per_expert, best, t0)


def plan_greedy_packing(
    load: Sequence[float] | np.ndarray | torch.Tensor,
    current_map: Sequence[int] | np.ndarray | torch.Tensor | None,
    ep_size: int,
    slots_per_rank: int,
    bytes_per_expert: int = 0,
) -> PlacementPlan:
    """The baseline: EPLB's greedy packing (:func:`greedy_pack`), bin b on rank b (no relabelling).

    Non-incremental: the current map only decides slots (an expert the packing leaves on its rank
    keeps its slot, as in our plans, so that only rank changes count as moves).
    """
    t0 = time.perf_counter()
    if int(bytes_per_expert) != bytes_per_expert or bytes_per_expert < 0:
        raise ValueError(f"bytes_per_expert must be an integer >= 0, got {bytes_per_expert}")
    load, l2p = _check_inputs(load, current_map, ep_size, slots_per_rank)
    ep_size, spr = int(ep_size), int(slots_per_rank)
    new_rank = np.empty_like(l2p)
    new_rank[greedy_pack(load, ep_size, spr).reshape(-1)] = np.arange(l2p.size) // spr
    return _build_plan(load, l2p, new_rank, ep_size, spr, "greedy-packing", bytes_per_expert, None, t0)


def apply_moves(current_map: Sequence[int], moves: Sequence[Move], slots_per_rank: int) -> list[int]:
    """The map obtained by applying ``moves`` to ``current_map`` (checks each move's source)."""
    out = list(int(p) for p in current_map)
    for m in moves:
        src = m.src_rank * slots_per_rank + m.src_slot
        if out[m.expert] != src:
            raise ValueError(f"move of expert {m.expert} says it is in slot {src}, the map says {out[m.expert]}")
        out[m.expert] = m.dst_rank * slots_per_rank + m.dst_slot
    return out
