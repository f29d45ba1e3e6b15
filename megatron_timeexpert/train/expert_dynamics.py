"""The trainer's step hook that adds and prunes experts (TimeExpert eq. 7-8, moe/dynamics.py).

Registered by :class:`~megatron_timeexpert.train.pretrain.Pretrainer` when ``moe.dynamics.enabled``
(YAML section ``moe.dynamics``). After optimizer step ``s`` (the records already hold the step's
globally reduced routing), on every rank:

- if ``s > warmup_steps`` and ``s % decision_interval == 0``, for each of this rank's MoE layers:
  decide from the layer's records, check that every rank of the layer's statistics group took the
  same decision (one small ``all_reduce``; a mismatch raises naming the layer and step), apply it
  (router activate/deactivate, fresh FFN for added experts), give the added expert's slot and router
  rows fresh optimizer state, log one line (layer, added, pruned, skipped reasons; first rank of the
  stage) and keep the events for the metrics of the next logged step (metrics.jsonl):
  ``dynamics/L{layer}/added/e{id}`` and ``dynamics/L{layer}/pruned/e{id}`` = the step of the
  decision, ``dynamics/L{layer}/skipped`` = reasons counted;
- if ``s % window_steps == 0``, every layer's recording window is reset (after the decision).

Communication: one ``all_reduce`` of 2 float64 per MoE layer per decision (the consistency check),
over the layer's statistics group (all ranks of its pipeline stage).
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from megatron_timeexpert.moe.dynamics import (
    ExpertDecision,
    ExpertDynamicsConfig,
    apply_expert_changes,
    check_decision_consistent,
    decide_expert_changes,
)
from megatron_timeexpert.train.slot_adam import fresh_router_row, fresh_slot_state
from parallel.env import collective_device

log = logging.getLogger(__name__)


def _moe_layers(trainer) -> list:
    from megatron_timeexpert.train.pretrain import _moe_layers as layers_of

    return [layer for model in trainer.models for layer in layers_of(model) if hasattr(layer.router, "records")]


def _first_of(group) -> bool:
    if group is None or not dist.is_initialized():
        return True
    return dist.get_rank(group) == 0


class ExpertDynamicsHook:
    """``hook(trainer)`` for ``Pretrainer.step_hooks`` (module docstring).

    ``decisions`` keeps every decision this rank took for its layers (tests read it)."""

    def __init__(self, cfg: ExpertDynamicsConfig):
        cfg.validate()
        self.cfg = cfg
        self.decisions: list[ExpertDecision] = []

    def __call__(self, trainer) -> None:
        step = trainer.state.step
        layers = _moe_layers(trainer)
        if self.cfg.decides_at(step):
            device = collective_device()
            for layer in layers:
                self._decide(trainer, layer, step, device)
        if self.cfg.window_ends_at(step):
            for layer in layers:
                layer.router.records.reset_window()

    def _decide(self, trainer, layer, step: int, device) -> None:
        decision = decide_expert_changes(layer.router, self.cfg, layer.layer_number, step)
        check_decision_consistent(decision, layer.stats_group, device=device)
        for e, slot in apply_expert_changes(layer, decision, self.cfg):
            if slot is not None:
                fresh_slot_state(layer, trainer.optimizer, slot)
            fresh_router_row(layer.router, trainer.optimizer, e)
        self.decisions.append(decision)
        if _first_of(layer.stats_group):
            log.info("expert dynamics: %s", decision.describe())
        events = getattr(trainer, "hook_metrics", None)
        if events is None:
            return
        prefix = f"dynamics/L{layer.layer_number}"
        for e, _ in decision.added:
            events[f"{prefix}/added/e{e}"] = float(step)
        for e in decision.pruned:
            events[f"{prefix}/pruned/e{e}"] = float(step)
        if decision.skipped:
            events[f"{prefix}/skipped"] = events.get(f"{prefix}/skipped", 0.0) + len(decision.skipped)
