"""The trainer's step hook that re-plans expert placement and migrates experts (issue 9, items 3-5).

Registered by :class:`~megatron_timeexpert.train.pretrain.Pretrainer` when ``moe.placement.enabled``
(YAML section ``moe.placement``, :class:`parallel.planner.RebalanceConfig`), after the expert-dynamics
hook. After optimizer step ``s`` (the routing records already hold the step's globally reduced
counts), on every rank, for each of this rank's MoE layers, a re-plan happens when

- ``after_dynamics`` and the dynamics hook added or pruned an expert of that layer at step ``s``
  (reason ``dynamics``);
- ``s > warmup_steps``, ``s % check_interval == 0`` and the rank-load imbalance (max/mean over EP
  ranks) of the layer's load average ``records.load_ema`` (of its active experts) exceeds
  ``imbalance_threshold``
  (reason ``imbalance``; the EMA spans about ``load_window_steps`` steps, so the imbalance must
  persist over that window);
- ``force_interval`` divides ``s`` (reason ``forced``; tests and benchmarks).

A re-plan runs :func:`parallel.planner.plan_placement` on the load average (pure, deterministic,
the same input on every rank), checks that every rank of the stage planned the same map (one
``all_reduce`` of 2 float64; a mismatch raises naming the layer and step), and, if the map
changes, moves the experts with all their optimizer state (:func:`install_placement`: one
``all_to_all_single`` over the layer's EP group). One log line per re-plan (first rank of the
stage) gives the layer, the reason, experts added/pruned at this step, experts moved, bytes moved,
predicted imbalance before and after, and the planning and migration wall times; the same numbers
join the next logged step's metrics (``placement/L{layer}/...``) in metrics.jsonl. Every step the
current imbalance of the load average is reported as ``placement/L{layer}/imbalance``.

With ``moe.placement.trace`` the first rank of each pipeline stage appends one JSON line per step
to ``logging.run_dir/routing_trace/pp{stage}.jsonl``: ``{"step": s, "layers": [layer numbers],
"tokens": [[tokens per logical expert] per layer]}``, the format ``tools/placement_sim.py
--loads trace:FILE`` reads.

Communication per re-plan: one ``all_reduce`` (consistency) over the stage and, when experts move,
one ``all_to_all_single`` over the EP group; per step otherwise none (the load is already global).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_timeexpert.train.expert_dynamics import _first_of, _moe_layers
from megatron_timeexpert.train.expert_moves import install_placement, slot_row_bytes
from parallel.env import collective_device
from parallel.planner import PlannerConfig, RebalanceConfig, plan_placement, rank_imbalance

log = logging.getLogger(__name__)


@dataclass
class PlacementEvent:
    """One re-plan of one layer (what the log line and metrics.jsonl report)."""

    step: int
    layer: int
    reason: str
    added: list[int]
    pruned: list[int]
    experts_moved: int
    """Experts whose physical slot changed (rank or local slot)."""
    remote_moves: int
    """Of those, experts that changed EP rank."""
    bytes_moved: int
    """Bytes sent between EP ranks by all ranks of the EP group together (= remote_moves x
    bytes per expert, weights plus every slot-keyed optimizer tensor)."""
    bytes_per_expert: int
    imbalance_before: float
    imbalance_after: float
    """Predicted max/mean rank load under the new map, from the same load average."""
    plan_s: float
    migrate_s: float

    def describe(self) -> str:
        changes = "".join(
            [f", added {self.added}" if self.added else "", f", pruned {self.pruned}" if self.pruned else ""]
        )
        return (
            f"layer {self.layer} step {self.step} ({self.reason}{changes}): moved {self.experts_moved} experts "
            f"({self.remote_moves} to other ranks, {self.bytes_moved / 2**20:.3f} MiB), imbalance "
            f"{self.imbalance_before:.3f} -> {self.imbalance_after:.3f} (predicted), "
            f"plan {self.plan_s * 1e3:.1f} ms, migration {self.migrate_s * 1e3:.1f} ms"
        )


def check_same_map(new_map: torch.Tensor, group, layer: int, step: int) -> None:
    """Raise RuntimeError naming the layer and step unless every rank of ``group`` planned
    ``new_map``. Collective: ONE ``all_reduce(MAX)`` of 2 float64 over ``group``."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    idx = torch.arange(1, new_map.numel() + 1, dtype=torch.float64)
    checksum = float((new_map.double().cpu() * (idx * idx + 7 * idx)).sum())
    t = torch.tensor([checksum, -checksum], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if float(t[0]) != -float(t[1]):
        raise RuntimeError(
            f"ranks disagree on the placement plan of layer {layer} at step {step}: map checksums range over "
            f"[{-float(t[1])!r}, {float(t[0])!r}] (this rank {checksum!r}); the load averages differ between ranks"
        )


class PlacementHook:
    """``hook(trainer)`` for ``Pretrainer.step_hooks`` (module docstring).

    ``events`` keeps every re-plan this rank took part in (tests read it). ``dynamics`` is the
    expert-dynamics hook (or None), whose decisions of the current step trigger re-plans."""

    def __init__(self, cfg: RebalanceConfig, dynamics=None, run_dir: str | Path | None = None):
        cfg.validate()
        self.cfg = cfg
        self.dynamics = dynamics
        self.events: list[PlacementEvent] = []
        self.trace_dir = Path(run_dir) / "routing_trace" if cfg.trace and run_dir is not None else None
        self._trace_started = False

    def __call__(self, trainer) -> None:
        step = trainer.state.step
        layers = _moe_layers(trainer)
        if self.trace_dir is not None:
            self._write_trace(step, layers)
        changed = self._dynamics_changes(step)
        for layer in layers:
            reason = self._reason(step, layer, changed)
            if reason is not None:
                self._replan(trainer, layer, step, reason, changed.get(layer.layer_number, ([], [])))
            if hasattr(trainer, "hook_metrics"):
                imb = rank_imbalance(self._load(layer), self._map(layer), *self._shape(layer))
                trainer.hook_metrics[f"placement/L{layer.layer_number}/imbalance"] = imb

    # ------------------------------------------------------------------ decisions
    @staticmethod
    def _load(layer) -> torch.Tensor:
        """The load average of active experts (a pruned expert carries none from now on)."""
        router = layer.router
        return (router.records.load_ema * router.active.to(torch.float64)).detach().cpu()

    @staticmethod
    def _map(layer) -> torch.Tensor:
        return layer.placement.logical_to_physical.detach().cpu()

    @staticmethod
    def _shape(layer) -> tuple[int, int]:
        return layer.placement.ep_size, layer.placement.slots_per_rank

    def _dynamics_changes(self, step: int) -> dict[int, tuple[list[int], list[int]]]:
        if self.dynamics is None or not self.cfg.after_dynamics:
            return {}
        out = {}
        for d in self.dynamics.decisions:
            if d.step == step and (d.added or d.pruned):
                out[d.layer_number] = ([e for e, _ in d.added], list(d.pruned))
        return out

    def _reason(self, step: int, layer, changed) -> str | None:
        c = self.cfg
        if layer.placement.ep_size == 1:
            return None  # one rank: every placement is balanced, nothing can move
        if layer.layer_number in changed:
            return "dynamics"
        if c.force_interval and step % c.force_interval == 0:
            return "forced"
        if step > c.warmup_steps and step % c.check_interval == 0:
            imb = rank_imbalance(self._load(layer), self._map(layer), *self._shape(layer))
            if imb > c.imbalance_threshold:
                return "imbalance"
        return None

    def _replan(self, trainer, layer, step: int, reason: str, changes) -> None:
        row_bytes = slot_row_bytes(layer, trainer.optimizer)
        t0 = time.perf_counter()
        plan = plan_placement(
            self._load(layer),
            self._map(layer),
            *self._shape(layer),
            PlannerConfig(tolerance=self.cfg.tolerance, bytes_per_expert=row_bytes),
        )
        new_map = plan.map_tensor().to(layer.placement.logical_to_physical.device)
        plan_s = time.perf_counter() - t0
        check_same_map(new_map, layer.stats_group, layer.layer_number, step)
        moved = remote = sent = 0
        t1 = time.perf_counter()
        if not torch.equal(new_map, layer.placement.logical_to_physical):
            stats = install_placement(layer, trainer.optimizer, new_map)
            moved, remote = stats.moved_experts, stats.remote_experts
            sent = stats.remote_experts * stats.bytes_per_expert
        migrate_s = time.perf_counter() - t1
        event = PlacementEvent(
            step=step,
            layer=layer.layer_number,
            reason=reason,
            added=changes[0],
            pruned=changes[1],
            experts_moved=moved,
            remote_moves=remote,
            bytes_moved=sent,
            bytes_per_expert=row_bytes,
            imbalance_before=plan.imbalance_before,
            imbalance_after=plan.imbalance_after,
            plan_s=plan_s,
            migrate_s=migrate_s,
        )
        self.events.append(event)
        if _first_of(layer.stats_group):
            log.info("expert placement: %s", event.describe())
        metrics = getattr(trainer, "hook_metrics", None)
        if metrics is not None:
            prefix = f"placement/L{layer.layer_number}"
            for k in ("experts_moved", "remote_moves", "bytes_moved", "imbalance_before", "imbalance_after"):
                metrics[f"{prefix}/{k}"] = float(getattr(event, k))
            metrics[f"{prefix}/plan_ms"] = plan_s * 1e3
            metrics[f"{prefix}/migrate_ms"] = migrate_s * 1e3
            metrics[f"{prefix}/replan_step"] = float(step)

    # ------------------------------------------------------------------ routing trace
    def _write_trace(self, step: int, layers) -> None:
        if not layers or not _first_of(layers[0].stats_group):
            return
        from megatron.core import parallel_state as ps

        self.trace_dir.mkdir(parents=True, exist_ok=True)
        line = {
            "step": step,
            "layers": [layer.layer_number for layer in layers],
            "tokens": [[round(float(x)) for x in layer.router.records.step_counts.cpu()] for layer in layers],
        }
        path = self.trace_dir / f"pp{ps.get_pipeline_model_parallel_rank()}.jsonl"
        if not self._trace_started:
            # A resumed run continues the trace: lines of steps it is about to redo are dropped.
            self._trace_started = True
            if path.exists():
                keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < step]
                path.write_text("".join(ln + "\n" for ln in keep))
        with path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def summary(self) -> list[dict]:
        """Every event as a dict (for tests and reports)."""
        return [asdict(e) for e in self.events]
