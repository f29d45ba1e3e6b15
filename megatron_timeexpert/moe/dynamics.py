"""Adding and pruning experts from the routing records (TimeExpert §3.3, eq. 7-8).

    decision = decide_expert_changes(layer.router, cfg, layer_number=layer.layer_number, step=step)
    check_decision_consistent(decision, layer.stats_group)      # collective: every rank, same point
    added = apply_expert_changes(layer, decision, cfg)           # no communication

The decision is a pure function of one router's records (globally reduced, so identical on every
rank, DESIGN contract 3), its ``active`` mask and its minimum number of active experts:

- ADD (eq. 7): when, in the current recording window, some token type has more than
  ``add_threshold`` of its tokens firing no expert, the lowest inactive (free) logical id is
  activated with gate vector ``W_g[e] = R_S / ||R_S||`` (``records.unrouted_mean()``, the
  normalised mean embedding of the window's tokens that fired nothing) and threshold ``G_e = 0``.
  The records keep one R_S per layer (all types together), so one decision adds at most one expert
  (``max_added_per_decision`` is 0 or 1). A non-finite R_S (a NaN or inf token reached it) or a zero
  one never becomes a gate vector: the add is skipped and the reason is returned (and logged).
- PRUNE (eq. 8): active experts whose window activation rate A_e (``records.window_rates()``:
  activations per token of the window) is below ``tau_min``, lowest rate first (ties: lowest id),
  never leaving fewer active experts than the router needs (``router._min_active()``: 1 for
  TimeExpert, so never the last expert; ``topk`` for the top-k baseline). Experts added in the same
  decision are not counted towards that minimum. A window without tokens prunes nothing.

FFN init of an added expert (the documented rule): a FRESH draw from the layer's normal init, from
the seed :func:`added_expert_seed` ``(base seed, layer, logical id, step)``; never the first init
of that id (which uses ``base + 1009 * layer + id``), so an id that is pruned and added again gets
new weights, and all EP layouts draw the same weights. The rank whose slot hosts the id (found
through ``layer.placement``) writes it; the trainer's hook resets the optimizer state of that slot
and of the router rows ``W_g[e]``, ``G[e]`` (train/expert_dynamics.py).
Communication: only :func:`check_decision_consistent` (one ``all_reduce`` of 2 float64 over the
layer's statistics group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

from megatron_timeexpert.moe.types import TokenType


@dataclass
class ExpertDynamicsConfig:
    """When and how a TimeExpert MoE layer adds and prunes experts (YAML section ``moe.dynamics``)."""

    enabled: bool = False
    """Run the add/prune decisions during training (the trainer registers a step hook)."""
    window_steps: int = 10
    """Length of a recording window in optimizer steps: the window records are reset every
    ``window_steps`` steps (after any decision of that step)."""
    decision_interval: int = 10
    """Decide every this many optimizer steps (a multiple of ``window_steps``, so each decision
    reads complete windows only)."""
    warmup_steps: int = 10
    """No decision at or before this step (the router and the records settle first)."""
    add_threshold: float = 0.2
    """Add an expert when, for some token type, the fraction of its window tokens that fired no
    expert exceeds this value (in [0, 1))."""
    tau_min: float = 0.01
    """tau_min of eq. 8: prune active experts whose window activation rate (activations per token)
    is below this (>= 0; 0 never prunes)."""
    max_added_per_decision: int = 1
    """At most this many experts added per decision and layer: 0 (never add) or 1 (the records hold
    one R_S per layer, so a second expert added at once would get the same gate vector)."""
    init_seed: int = 1234
    """Base of the seeds of added experts' FFN weights (see :func:`added_expert_seed`)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (``name=value: rule``)."""

        def bad(name: str, rule: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r}: {rule}")

        for name in ("window_steps", "decision_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "must be an integer >= 1")
        if self.decision_interval % self.window_steps:
            bad("decision_interval", f"must be a multiple of window_steps={self.window_steps}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            bad("warmup_steps", "must be an integer >= 0")
        if not 0.0 <= self.add_threshold < 1.0:
            bad("add_threshold", "must be in [0, 1)")
        if not (self.tau_min >= 0.0 and math.isfinite(self.tau_min)):
            bad("tau_min", "must be a finite number >= 0")
        if self.max_added_per_decision not in (0, 1):
            bad("max_added_per_decision", "must be 0 or 1 (one R_S per layer: two adds would share a gate vector)")

    def decides_at(self, step: int) -> bool:
        """Whether a decision is due after optimizer step ``step`` (steps done)."""
        return self.enabled and step > self.warmup_steps and step % self.decision_interval == 0

    def window_ends_at(self, step: int) -> bool:
        """Whether the recording window is reset after optimizer step ``step``."""
        return step > 0 and step % self.window_steps == 0

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ExpertDecision:
    """What one layer decided at one step (identical on every rank; compare with :meth:`checksum`)."""

    layer_number: int
    step: int
    added: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    """``(logical id, gate vector [H] float64 unit norm)`` of each expert to add."""
    pruned: list[int] = field(default_factory=list)
    """Logical ids to deactivate."""
    skipped: list[str] = field(default_factory=list)
    """Why an add or prune that the records asked for was not made (for the log)."""

    @property
    def changes(self) -> bool:
        return bool(self.added or self.pruned)

    def checksum(self) -> float:
        """A float64 digest of the decision: ids, gate vectors (position-weighted), counts, step.

        Equal decisions give bit-equal checksums on every rank (the gate vectors come from the same
        reduced float64 records); different ids or gates change it."""
        total = float(self.step) * 1e-3 + 7.0 * len(self.added) + 11.0 * len(self.pruned) + 13.0 * len(self.skipped)
        for e, gate in self.added:
            weights = torch.arange(1, gate.numel() + 1, dtype=torch.float64)
            total += 101.0 * (e + 1) + float((gate.double().cpu() * weights).sum())
        for e in self.pruned:
            total += 1009.0 * (e + 1)
        return total

    def describe(self) -> str:
        """One log line: ``layer 1 step 20: added [2] pruned [0] skipped: ...``."""
        text = f"layer {self.layer_number} step {self.step}: added {[e for e, _ in self.added]} pruned {self.pruned}"
        if self.skipped:
            text += " skipped: " + "; ".join(self.skipped)
        return text


def _type_name(t: int) -> str:
    try:
        return TokenType(t).name.lower()
    except ValueError:
        return str(t)


@torch.no_grad()
def decide_expert_changes(router, cfg: ExpertDynamicsConfig, layer_number: int, step: int) -> ExpertDecision:
    """The add/prune decision of eq. 7-8 from ``router.records`` (module docstring). Pure: reads
    the router's records, ``active`` mask and ``_min_active()``, changes nothing."""
    rec = router.records
    decision = ExpertDecision(layer_number=layer_number, step=step)
    active = router.active.detach().cpu().bool()

    # ---- add (eq. 7)
    tokens = rec.window_type_tokens.detach().cpu().double()
    unrouted = rec.window_type_unrouted.detach().cpu().double()
    starved = [t for t in range(tokens.numel()) if tokens[t] > 0 and float(unrouted[t] / tokens[t]) > cfg.add_threshold]
    if starved:
        names = ", ".join(f"{_type_name(t)} {float(unrouted[t] / tokens[t]):.2f}" for t in starved)
        free = [e for e in range(active.numel()) if not active[e]]
        if cfg.max_added_per_decision < 1:
            decision.skipped.append(f"add: unrouted fraction above {cfg.add_threshold} ({names}) but adds are off")
        elif not free:
            decision.skipped.append(f"add: unrouted fraction above {cfg.add_threshold} ({names}) but no free expert id")
        else:
            raw = rec.window_unrouted_sum.detach().cpu().double()
            if not bool(torch.isfinite(raw).all()) or not bool(torch.isfinite(rec.window_unrouted_count).all()):
                decision.skipped.append(f"add: R_S is not finite ({names}): no gate vector from it")
            else:
                gate = rec.unrouted_mean().detach().cpu().double()
                if not bool(torch.isfinite(gate).all()) or float(gate.norm()) == 0.0:
                    decision.skipped.append(f"add: R_S is zero or not finite after normalising ({names})")
                else:
                    decision.added.append((free[0], gate))

    # ---- prune (eq. 8)
    if cfg.tau_min > 0 and float(tokens.sum()) > 0:
        rates = rec.window_rates().detach().cpu().double()
        low = [e for e in range(active.numel()) if active[e] and not (rates[e] >= cfg.tau_min)]
        bad = [e for e in low if not math.isfinite(float(rates[e]))]
        for e in bad:
            decision.skipped.append(f"prune: expert {e} has a non-finite activation rate")
        low = sorted((e for e in low if e not in bad), key=lambda e: (float(rates[e]), e))
        room = int(active.sum()) - int(router._min_active())
        if len(low) > room:
            kept = low[max(room, 0) :]
            floor = router._min_active()
            decision.skipped.append(
                f"prune: experts {kept} below tau_min={cfg.tau_min} kept (at least {floor} must stay active)"
            )
            low = low[: max(room, 0)]
        decision.pruned = sorted(low)
    return decision


def check_decision_consistent(decision: ExpertDecision, group: dist.ProcessGroup | None, device=None) -> None:
    """Raise RuntimeError naming the layer and step unless every rank of ``group`` holds the same
    decision checksum. Collective: ONE ``all_reduce(MAX)`` of 2 float64 (``[c, -c]``) over
    ``group``; every rank of it must call this at the same point. No-op without a group."""
    c = decision.checksum()
    if not math.isfinite(c):
        raise RuntimeError(f"expert decision of layer {decision.layer_number} at step {decision.step} is not finite")
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    t = torch.tensor([c, -c], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    hi, lo = float(t[0]), -float(t[1])
    if hi != lo:
        raise RuntimeError(
            f"ranks disagree on the expert decision of layer {decision.layer_number} at step {decision.step}: "
            f"checksums range over [{lo!r}, {hi!r}] (this rank: {c!r}; {decision.describe()}); "
            "the routing records differ between ranks"
        )


def added_expert_seed(base_seed: int, layer_number: int, logical_id: int, step: int) -> int:
    """Seed of the FFN of expert ``logical_id`` added to layer ``layer_number`` after ``step``.

    A 63-bit mix (splitmix64 finaliser) of the four numbers, so it differs from the first-init
    seeds ``base + 1009 * layer + id`` (small numbers) and between re-additions at other steps."""
    x = 0x9E3779B97F4A7C15
    for v in (base_seed, layer_number, logical_id, step):
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return (x & 0x7FFFFFFFFFFFFFFF) | (1 << 40)  # >= 2**40: never one of the first-init seeds


def local_slot(layer, logical_id: int) -> int | None:
    """This rank's slot hosting ``logical_id`` (through ``layer.placement``), or None if another EP rank hosts it."""
    phys = int(layer.placement.logical_to_physical[logical_id])
    spr = layer.placement.slots_per_rank
    return phys % spr if phys // spr == layer.ep_rank else None


def init_added_expert(layer, logical_id: int, seed: int) -> int | None:
    """Fresh FFN weights for ``logical_id`` from ``seed`` on the rank hosting it; returns its local
    slot (None on other ranks, which do nothing)."""
    slot = local_slot(layer, logical_id)
    if slot is not None:
        layer.experts.init_slot(slot, seed)
    return slot


def apply_expert_changes(layer, decision: ExpertDecision, cfg: ExpertDynamicsConfig) -> list[tuple[int, int | None]]:
    """Carry out ``decision`` on ``layer`` (every rank, identical decisions; no communication).

    Added: ``router.activate(e, gate, threshold=0)`` (eq. 7) and fresh FFN weights
    (:func:`init_added_expert`). Pruned: ``router.deactivate(e)`` (weights stay; the slot is free
    for a later add). Returns ``(logical id, local slot or None)`` of each added expert: the caller
    (train/expert_dynamics.py) gives those slots and router rows fresh optimizer state."""
    router = layer.router
    added = []
    for e, gate in decision.added:
        router.activate(e, gate.to(router.weight.dtype), threshold=0.0)
        seed = added_expert_seed(cfg.init_seed, decision.layer_number, e, decision.step)
        added.append((e, init_added_expert(layer, e, seed)))
    for e in decision.pruned:
        router.deactivate(e)
    return added
