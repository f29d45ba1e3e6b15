"""Metrics sinks of rank 0: one dense console line, metrics.jsonl, TensorBoard and wandb.

TensorBoard and wandb are optional: when a package is missing the sink says so once in the log
and the others keep working. wandb runs offline by default so no network is needed
(``wandb sync`` uploads later). No communication: callers reduce metrics before logging them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from megatron_timeexpert.config import LoggingConfig

log = logging.getLogger(__name__)

_LINE_KEYS = (
    ("loss", "loss {:.4f}"),
    ("lr", "lr {:.2e}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("tokens_per_s", "tok/s {:.0f}"),
    ("step_time_s", "step {:.3f}s"),
    ("memory_gib", "mem {:.2f}GiB"),
)


_MOE_LINE_PREFIXES = (("moe/experts_per_token/", "k/"), ("moe/loss/", ""))


def format_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """``step 5/20 | loss 4.1234 | lr 1.00e-03 | ... | k/TEXT 2.7 | aux 5e-05``: the run's vital
    signs plus, for our MoE layers, mean experts per token by type and the router losses (averaged
    over layers). Everything else (per layer, per expert, bytes, timings) goes to the sinks."""
    parts = [f"step {step}/{total}"]
    parts += [fmt.format(metrics[k]) for k, fmt in _LINE_KEYS if k in metrics]
    for prefix, short in _MOE_LINE_PREFIXES:
        for k, v in sorted(metrics.items()):
            if k.startswith(prefix) and "/layer" not in k:
                parts.append(f"{short}{k[len(prefix) :]} {v:.3g}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes metrics of rank 0 to every enabled sink. Other ranks get a no-op logger."""

    def __init__(self, cfg: LoggingConfig, run_config: dict[str, Any], enabled: bool):
        self.enabled = enabled
        self.jsonl = self.tb = self.wandb_run = None
        if not enabled:
            return
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.info("tensorboard not installed: TensorBoard sink off (pip install tensorboard)")
        if cfg.wandb and cfg.wandb_mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb_run = wandb.init(
                    project=cfg.wandb_project,
                    dir=str(run_dir),
                    mode=cfg.wandb_mode,
                    config=run_config,
                    reinit="finish_previous",
                )
                log.info("wandb: %s mode, files under %s/wandb", cfg.wandb_mode, run_dir)
            except ImportError:
                log.info("wandb not installed: wandb sink off (pip install wandb)")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
