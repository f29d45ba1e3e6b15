"""The pretraining loop on megatron-core: DDP, optimizer, LR schedule, pipeline schedules.

    torchrun --nproc-per-node 4 -m megatron_timeexpert.cli pretrain --config configs/tiny_moe.yaml

One step: every pipeline stage walks the same microbatches through megatron's forward-backward
schedule (1F1B, interleaved when vpp > 1, or no pipelining when pp == 1); gradients are reduced by
megatron's ``finalize_model_grads`` (DP all-reduce, expert grads over the expert-DP group, TP
all-reduce of sequence-parallel params, per-token loss scaling); the optimizer clips by the global
norm and steps; the scheduler advances. Losses are averaged per token over the global batch, so
the loss of a step does not depend on the layout. Metrics are reduced to rank 0 with one small
all-reduce per step (plus an all_gather_object of MoE metrics on logging steps).

Models and data by config: ``model.kind: gpt`` (megatron's GPTModel on ``data.kind:
synthetic_tokens``) or ``timeexpert`` (model/video_llm.py: vision tower + TimeExpert decoder on
``data.kind: synthetic_vtg``, interface 1 microbatches with frames; loss = heads.timeexpert_loss_func,
and the metrics add ``loss/text``, ``loss/time``, ``loss/score`` and ``loss/frame`` (the per-frame
relevance loss, unweighted, per frame) with their counts ``loss_tokens/*``, reduced over the global
batch in the same all-reduce as the loss).
``training.freeze`` patterns freeze parameters before DDP and the optimizer exist. Every logged step
reports ``data_wait_s`` (seconds per step spent in the data source's ``microbatches`` call, the
slowest rank, averaged over the logging interval) and ``data_wait_frac`` (that / step time). A data
source with ``state_dict()`` has its per-data-parallel-rank state saved in ``train_state.json``
(``data_state``) and restored on resume.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_timeexpert.config import Config, ConfigError
from megatron_timeexpert.model.gpt import build_model, transformer_config
from megatron_timeexpert.train import checkpoint as ckpt
from megatron_timeexpert.train.fault import StepGuard
from megatron_timeexpert.train.metrics import MetricsLogger, format_line
from megatron_timeexpert.train.precision import param_group_overrides, wrap_bf16
from megatron_timeexpert.train.slot_adam import install_slot_adam
from megatron_timeexpert.train.synthetic import SyntheticTokens
from parallel.cpu_compat import apply_cpu_shims
from parallel.env import collective_device

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run returns to its caller (tests compare these across layouts and resumes)."""

    losses: list[float] = field(default_factory=list)
    """Global per-token loss of each step run in this process, in order."""
    grad_norms: list[float] = field(default_factory=list)
    first_step: int = 0
    """Step counter at the start of this process's training (non-zero after a resume)."""
    checkpoint: str | None = None
    """Path of the last checkpoint written."""
    metrics: list[dict[str, float]] = field(default_factory=list)
    """Rank 0's metrics of every logged step."""


def _loss_func(output_tensor: torch.Tensor):
    """Per-token loss: megatron divides the summed gradients by the token count of the global batch."""
    losses = output_tensor.float().reshape(-1)
    loss_sum = losses.sum()
    num_tokens = torch.tensor(losses.numel(), dtype=torch.int, device=losses.device)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _forward_step(data_iterator, model):
    """One microbatch through one model chunk. Token types ``[b, s]`` ride in megatron's per-token
    ``padding_mask`` argument, which megatron threads to every MLP and replays when a layer is
    recomputed (our MoE layer reads them from there; see moe/layer.py). Megatron's own MoE layer
    would read it as a padding mask, so it gets none."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    token_type = batch.get("token_type")
    extra = {}
    if token_type is not None and _moe_layers(model):
        extra["padding_mask"] = token_type.to(device)
    output = model(
        batch["tokens"].to(device),
        batch["position_ids"].to(device),
        None,
        labels=batch["labels"].to(device),
        **extra,
    )
    return output, _loss_func


def _video_forward_step(data_iterator, model, frame_loss_weight: float = 0.0):
    """One interface-1 microbatch through one chunk of the video LLM (model/video_llm.py): frames and
    their times go to the vision tower on the first stage (other stages ignore them), token types reach
    the routers through the decoder's ``padding_mask``; the last stage returns heads.py's ``[b, s, 4]``
    loss tensor (token losses and, with a frame head, the per-frame relevance loss weighted by
    ``frame_loss_weight``; bind it with ``functools.partial``)."""
    from functools import partial

    from megatron_timeexpert.model.heads import timeexpert_loss_func

    batch = next(data_iterator)
    device = next(model.parameters()).device
    optional = {k: batch[k].to(device) for k in ("frame_times", "frame_targets") if batch.get(k) is not None}
    output = model(
        batch["ids"].to(device),
        batch["types"].to(device),
        batch["position_ids"].to(device),
        frames=batch["frames"].to(device),
        labels=batch["labels"].to(device),
        label_types=batch["label_types"].to(device),
        loss_mask=batch["loss_mask"].to(device),
        **optional,
    )
    return output, partial(timeexpert_loss_func, frame_weight=frame_loss_weight)


HEAD_LOSSES = {"text loss": "text", "time loss": "time", "score loss": "score", "frame loss": "frame"}
"""Per-head report keys of heads.timeexpert_loss_func -> metric suffix (``loss/text`` ...)."""


def freeze_parameters(chunks: list[torch.nn.Module], patterns: list[str]) -> dict[str, int]:
    """Set ``requires_grad=False`` on every parameter whose name within its chunk matches one of the
    glob ``patterns`` (``fnmatch``; ``*`` crosses dots). Call before DDP and the optimizer are built.
    Returns this rank's counts: ``trainable``/``frozen`` (tensors), ``trainable_elems``/``frozen_elems``
    and ``match/<i>`` (parameters that pattern i matched here)."""
    from fnmatch import fnmatchcase

    counts = {"trainable": 0, "frozen": 0, "trainable_elems": 0, "frozen_elems": 0}
    counts.update({f"match/{i}": 0 for i in range(len(patterns))})
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            hits = [i for i, pattern in enumerate(patterns) if fnmatchcase(name, pattern)]
            for i in hits:
                counts[f"match/{i}"] += 1
            if hits:
                p.requires_grad_(False)
            kind = "trainable" if p.requires_grad else "frozen"
            counts[kind] += 1
            counts[f"{kind}_elems"] += p.numel()
    return counts


def check_freeze_matches(patterns: list[str], matched: list[int]) -> None:
    """ConfigError naming the first pattern of ``training.freeze`` that matched no parameter
    (``matched[i]``: parameters pattern i matched, summed over all ranks)."""
    for i, n in enumerate(matched):
        if n == 0:
            raise ConfigError(
                f"training.freeze[{i}]={patterns[i]!r}: matches no parameter on any rank "
                "(names are as in a model chunk, e.g. 'vision.vit.*', 'lm.decoder.*', 'decoder.*')"
            )


def _moe_layers(model: torch.nn.Module):
    """Our MoE layers in ``model`` (megatron's own MoE layer is not one of them)."""
    return [m for m in model.modules() if hasattr(m, "set_aux_loss_scale") and hasattr(m, "pop_metrics")]


def _loss_tokens(microbatch: dict[str, torch.Tensor]) -> int:
    """Tokens that count in the main loss (``loss_mask`` when the batch has one, else every label)."""
    mask = microbatch.get("loss_mask")
    return int(mask.sum()) if mask is not None else microbatch["labels"].numel()


class Pretrainer:
    """Owns one run: model chunks, DDP, optimizer, scheduler, data position, checkpoints.

    ``data``: a data source to use instead of the one ``data.kind`` names (the same API as
    train/synthetic.py's ``SyntheticTokens``: ``microbatches(consumed_samples)``, optionally
    ``state_dict``/``load_state_dict``), e.g. a test's hand-built batches."""

    def __init__(self, cfg: Config, data=None):
        self.cfg = cfg
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        cfg.validate(self.world)
        apply_cpu_shims()
        cfg.parallel.initialize(cfg.training.seed)
        # use_cpu_initialization draws full weights from the CPU generator and slices them per rank,
        # so every layout starts from the same weights when seeded identically.
        torch.manual_seed(cfg.training.seed)
        self.tconfig = transformer_config(cfg)
        self.video = cfg.model.kind == "timeexpert"
        if self.video:
            self.forward_step = partial(_video_forward_step, frame_loss_weight=cfg.model.frame_loss_weight)
        else:
            self.forward_step = _forward_step
        self.loss_keys = ("lm loss", *HEAD_LOSSES) if self.video else ("lm loss",)
        """Report keys of the loss func reduced over the global batch every step."""
        chunks = self._build()
        self.freeze_counts = self._freeze(chunks)
        self.models = self._wrap(chunks)
        self.optimizer = self._optimizer()
        # Per-slot and per-row Adam steps of expert slots and router rows (train/slot_adam.py): a slot
        # or row made fresh takes a fresh Adam's updates. Without resets nothing changes. Frozen
        # slots/rows are not in the optimizer and are not tracked.
        install_slot_adam(
            [
                m
                for model in self.models
                for m in model.modules()
                if (hasattr(m, "slot_step_base") or hasattr(m, "row_step_base"))
                and all(p.requires_grad for p in m.parameters())
            ],
            self.optimizer,
        )
        self.scheduler = self._scheduler()
        self.state = ckpt.TrainState()
        self.step_hooks: list = []
        """Callables ``hook(trainer)`` run on every rank after each optimizer step (and the routing
        records' update), before the next step: the one place where the expert set and placement
        may change (all ranks must take the same decisions there)."""
        self.hook_metrics: dict[str, float] = {}
        """Events the step hooks report (e.g. experts added/pruned); they join the metrics of the
        next logged step (every rank of a stage holds the same values)."""
        if cfg.moe.dynamics.enabled:
            from megatron_timeexpert.train.expert_dynamics import ExpertDynamicsHook

            self.step_hooks.append(ExpertDynamicsHook(cfg.moe.dynamics))
        if cfg.moe.placement.enabled:
            from megatron_timeexpert.train.expert_placement import PlacementHook

            dynamics = self.step_hooks[0] if self.step_hooks else None
            self.step_hooks.append(PlacementHook(cfg.moe.placement, dynamics, run_dir=cfg.logging.run_dir))
        if self.step_hooks and any(
            not p.requires_grad for model in self.models for layer in _moe_layers(model) for p in layer.parameters()
        ):
            raise ConfigError(
                f"training.freeze={cfg.training.freeze!r} freezes MoE-layer parameters, but moe.dynamics / "
                "moe.placement change experts and their optimizer state: keep the MoE layers trainable or "
                "disable both"
            )
        self.data = data if data is not None else self._data()
        self._own_data = data is None
        self.data_wait_s = 0.0
        """Seconds this rank spent in ``data.microbatches`` since the last logged step."""
        self.step_losses: dict[str, float] = {}
        """Global per-token losses of the last step by metric name (``loss``, ``loss/text`` ...) and
        their token counts (``loss_tokens``, ``loss_tokens/text`` ...); every rank knows them."""
        self._restore()

    # -- construction -------------------------------------------------------------------------

    def _build(self) -> list[torch.nn.Module]:
        if self.video:
            from megatron_timeexpert.model.video_llm import build_video_llm

            return build_video_llm(self.cfg)
        return build_model(self.cfg)

    def _freeze(self, chunks) -> dict[str, int]:
        """``training.freeze`` on the unwrapped chunks (before DDP/optimizer); one log line. A pattern
        matching no parameter on any rank is a ConfigError (one all-reduce; only with patterns)."""
        patterns = self.cfg.training.freeze
        counts = freeze_parameters(chunks, patterns)
        if not patterns:
            return counts
        matched = torch.tensor([counts[f"match/{i}"] for i in range(len(patterns))], device=collective_device())
        dist.all_reduce(matched)
        check_freeze_matches(patterns, matched.tolist())
        if self.rank == 0:
            log.info(
                "freeze %s: rank 0 trains %d parameter tensors (%d elements), %d frozen (%d elements)",
                patterns,
                counts["trainable"],
                counts["trainable_elems"],
                counts["frozen"],
                counts["frozen_elems"],
            )
        return counts

    def _wrap(self, chunks):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )

        t = self.cfg.training
        if t.precision == "bf16":
            # Float16Module casts the chunk to bf16 except our routers (fp32 weights, float64
            # records: routing decisions and counts are not rounded); see train/precision.py.
            # The vision tower stays fp32 too (its uint8 frames are no float input Float16Module casts).
            chunks = [
                wrap_bf16(
                    chunk,
                    self.tconfig,
                    keep=[m.router for m in _moe_layers(chunk)]
                    + [v for v in [getattr(chunk, "vision", None), getattr(chunk, "frame_tokens", None)] if v],
                )
                for chunk in chunks
            ]
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=t.distributed_optimizer
        )
        wrapped = [
            DistributedDataParallel(self.tconfig, ddp_cfg, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        return wrapped

    def _optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t = self.cfg.training
        ocfg = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            clip_grad=t.clip_grad,
            bf16=t.precision == "bf16",
            fp16=False,
            params_dtype=self.tconfig.params_dtype,
            use_distributed_optimizer=t.distributed_optimizer,
        )
        # bf16: our routers' fp32 parameters go in param groups of their own (train/precision.py).
        overrides = param_group_overrides(ocfg) if t.precision == "bf16" else None
        optimizer = get_megatron_optimizer(ocfg, self.models, config_overrides=overrides)
        # As megatron's training loop does: the schedules scale the loss that starts backward (and
        # router losses) by the optimizer's loss scale (1.0 for fp32 and for bf16 without a scaler).
        self.tconfig.grad_scale_func = optimizer.scale_loss
        if self.rank == 0:
            log.info(
                "precision %s (%s), optimizer %s",
                t.precision,
                "bf16 weights and activations, fp32 main weights, routers fp32"
                if t.precision == "bf16"
                else "fp32 weights",
                "distributed (state sharded over data-parallel ranks)"
                if t.distributed_optimizer
                else "replicated on every data-parallel rank",
            )
        return optimizer

    def _scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        t = self.cfg.training
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if t.lr_warmup_steps else t.lr,
            max_lr=t.lr,
            min_lr=t.min_lr,
            lr_warmup_steps=t.lr_warmup_steps,
            lr_decay_steps=max(t.train_steps, t.lr_warmup_steps + 1),
            lr_decay_style=t.lr_decay_style,
            start_wd=t.weight_decay,
            end_wd=t.weight_decay,
            wd_incr_steps=max(t.train_steps, 1),
            wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=True,
            override_opt_param_scheduler=False,
        )

    def _data(self):
        from megatron.core import parallel_state as ps

        c = self.cfg
        if c.data.kind == "synthetic_vtg":
            return self._vtg_source()
        return SyntheticTokens(
            seed=c.data.seed,
            seq_length=c.model.seq_length,
            vocab_size=c.model.vocab_size,
            global_batch_size=c.training.global_batch_size,
            micro_batch_size=c.training.micro_batch_size,
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
        )

    def _vtg_source(self):
        """data.kind synthetic_vtg: data/vtg_source.py's VTGSource (interface 1) for this DP rank."""
        from megatron.core import parallel_state as ps

        from megatron_timeexpert.data.vtg_source import DEFAULT_ANNOTATIONS, VTGSource, VTGSourceConfig

        d = self.cfg.data
        for name in ("root", "tokenizer"):
            if not getattr(d, name):
                raise ConfigError(f"data.{name}=None: data.kind 'synthetic_vtg' needs it")
        scfg = VTGSourceConfig(
            root=d.root,
            annotations=tuple(d.annotations.items()) if d.annotations else DEFAULT_ANNOTATIONS,
            tasks=tuple(d.tasks),
            split=d.split,
            num_frames=d.num_frames,
            image_size=d.image_size,
            tokenizer=d.tokenizer,
            seed=d.seed,
            overflow=d.overflow,
            num_workers=d.num_workers,
            decode_timeout_s=d.decode_timeout_s,
            cache_dir=d.cache_dir or "",
            query_first=d.query_first,
            frame_time_tokens=d.frame_time_tokens,
            time_digits=d.time_digits,
        )
        try:
            scfg.validate()
        except ValueError as e:
            raise ConfigError(str(e).replace("VTGSourceConfig.", "data.", 1)) from None
        return VTGSource(
            scfg,
            seq_length=self.cfg.model.seq_length,
            tokenizer=None,
            global_batch_size=self.cfg.training.global_batch_size,
            micro_batch_size=self.cfg.training.micro_batch_size,
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
        )

    def _scale_router_losses(self, microbatches: list[dict[str, torch.Tensor]]) -> None:
        """Set the gradient our MoE layers inject into their router losses for this step.

        The main loss is megatron's per-token loss: the summed token losses are back-propagated
        (times ``grad_scale_func(1)``, the fp16 loss scale) and ``finalize_model_grads`` divides the
        gradients by N, the loss tokens of the global batch. Each router loss is a mean over one
        microbatch's tokens (reduced over its TP chunks), and the objective takes their mean over the
        M microbatches of the global batch, so each receives ``grad_scale * N / M``. N counts the
        same tokens as the main loss (loss masks included): one all_reduce of two numbers over the DP
        group per step. The value is constant within the step, so recomputed forwards reuse it.
        """
        from megatron.core import parallel_state as ps

        layers = [layer for model in self.models for layer in _moe_layers(model)]
        if not layers:
            return
        device = collective_device()  # NCCL needs CUDA tensors
        counts = torch.tensor(
            [sum(_loss_tokens(mb) for mb in microbatches), len(microbatches)], dtype=torch.float64, device=device
        )
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        loss_tokens, num_microbatches = counts.tolist()
        grad_scale = 1.0
        if self.tconfig.grad_scale_func is not None:
            grad_scale = float(self.tconfig.grad_scale_func(torch.ones(1, device=device)))
        scale = grad_scale * loss_tokens / num_microbatches
        for layer in layers:
            layer.set_aux_loss_scale(scale)

    def _restore(self) -> None:
        t = self.cfg.training
        path = None
        if t.resume:
            path = ckpt.latest_checkpoint(t.save_dir)
            if path is None and self.rank == 0:
                log.info("resume: no complete checkpoint in %s, starting from scratch", t.save_dir)
        if path is None and t.load_dir:
            # A save_dir was given: take its newest checkpoint; otherwise the folder is one.
            path = ckpt.latest_checkpoint(t.load_dir) or Path(t.load_dir)
            if t.finetune:
                ckpt.load_checkpoint(path, self.models)
                # bf16: the optimizer's fp32 main weights were copied from the model when it was
                # built; refresh them from the loaded weights (megatron's loop does the same), or
                # the first step would write the initial weights back.
                self.optimizer.reload_model_params()
                return
        if path is not None:
            self.state, meta = ckpt.load_checkpoint(path, self.models, self.optimizer, self.scheduler)
            self._load_data_state(meta.get("data_state"), path)

    def _data_state(self) -> dict | None:
        """The data source's state of every data-parallel rank (collective: all_gather_object), for
        ``train_state.json``; None when the source has no ``state_dict``."""
        from megatron.core import parallel_state as ps

        if not hasattr(self.data, "state_dict"):
            return None
        mine = (ps.get_data_parallel_rank(), self.data.state_dict())
        gathered = [None] * self.world
        dist.all_gather_object(gathered, mine)
        ranks: dict[str, dict] = {}
        for dp_rank, state in gathered:
            ranks.setdefault(str(dp_rank), state)
        return {"dp_size": ps.get_data_parallel_world_size(), "ranks": ranks}

    def _load_data_state(self, saved: dict | None, path) -> None:
        from megatron.core import parallel_state as ps

        if saved is None or not hasattr(self.data, "load_state_dict"):
            return
        if saved["dp_size"] != ps.get_data_parallel_world_size():
            if self.rank == 0:
                log.warning(
                    "%s: data position saved for %d data-parallel ranks, this run has %d: the data source "
                    "starts from consumed_samples=%d instead of its saved per-rank position",
                    path,
                    saved["dp_size"],
                    ps.get_data_parallel_world_size(),
                    self.state.consumed_samples,
                )
            return
        self.data.load_state_dict(saved["ranks"][str(ps.get_data_parallel_rank())])

    # -- training -----------------------------------------------------------------------------

    def _step(self) -> tuple[float, float]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        for m in self.models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        t0 = time.perf_counter()
        mbs = self.data.microbatches(self.state.consumed_samples)
        self.data_wait_s += time.perf_counter() - t0
        self._scale_router_losses(mbs)
        iters = [iter(mbs) for _ in self.models] if len(self.models) > 1 else iter(mbs)
        reduced = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=iters,
            model=self.models if len(self.models) > 1 else self.models[0],
            num_microbatches=len(mbs),
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=False,
        )
        _, grad_norm, _ = self.optimizer.step()
        # Routing records of our MoE layers: one all_reduce per layer over its stage, then A_t of the
        # global batch for the next step (constant within a step, so independent of the layout).
        for model in self.models:
            for layer in _moe_layers(model):
                layer.finish_step()
        self.scheduler.step(increment=1)
        self.state.step += 1
        self.state.consumed_samples += self.cfg.training.global_batch_size
        for hook in self.step_hooks:  # state.step counts the step just finished
            hook(self)
        self.step_losses = self._global_losses(reduced)
        return self.step_losses["loss"], float(grad_norm if grad_norm is not None else 0.0)

    def _global_loss(self, reduced: list[dict]) -> float:
        """Sum of token losses / tokens over the whole global batch, known to every rank."""
        return self._global_losses(reduced)["loss"]

    def _global_losses(self, reduced: list[dict]) -> dict[str, float]:
        """Every report key of ``loss_keys`` (``[sum, count]`` per microbatch on the last stage) summed
        over the global batch in ONE all-reduce: ``loss`` (all heads) and ``loss/<head>`` per token,
        with ``loss_tokens`` / ``loss_tokens/<head>``; known to every rank. A head with no token in
        the step reports loss 0.0 (and count 0)."""
        from megatron.core import parallel_state as ps

        device = collective_device()  # NCCL needs CUDA tensors
        totals = torch.zeros(len(self.loss_keys), 2, dtype=torch.float64, device=device)
        if reduced and ps.get_tensor_model_parallel_rank() == 0:
            for d in reduced:
                for i, key in enumerate(self.loss_keys):
                    totals[i] += d[key].double().to(device)
        dist.all_reduce(totals)
        out = {}
        for key, (total, count) in zip(self.loss_keys, totals.tolist()):
            name = "loss" if key == "lm loss" else f"loss/{HEAD_LOSSES[key]}"
            out[name] = total / count if count else 0.0
            out[name.replace("loss", "loss_tokens", 1)] = count
        return out

    def _data_wait(self, steps: int, step_time_s: float) -> dict[str, float]:
        """``data_wait_s`` per step (the slowest rank, one all-reduce) and ``data_wait_frac`` of the
        ``steps`` steps since the last logged step, which took ``step_time_s`` in all (this rank)."""
        wait = torch.tensor([self.data_wait_s], dtype=torch.float64, device=collective_device())
        dist.all_reduce(wait, op=dist.ReduceOp.MAX)
        self.data_wait_s = 0.0
        total = float(wait[0])
        return {"data_wait_s": total / max(steps, 1), "data_wait_frac": total / step_time_s if step_time_s else 0.0}

    def _moe_metrics(self) -> dict[str, float]:
        local = dict(self.hook_metrics)
        self.hook_metrics.clear()
        for layer_no, layer in enumerate(m for model in self.models for m in _moe_layers(model)):
            for k, v in layer.pop_metrics().items():
                local[f"moe/{k}/layer{getattr(layer, 'layer_number', layer_no)}"] = float(v)
        gathered = [None] * self.world
        dist.all_gather_object(gathered, local)
        per_key: dict[str, list[float]] = {}
        for d in gathered:
            for k, v in d.items():
                per_key.setdefault(k, []).append(v)
        out = {k: sum(v) / len(v) for k, v in per_key.items()}
        # Averages over layers for the console line (per-layer values stay in the sinks).
        by_name: dict[str, list[float]] = {}
        for k, v in out.items():
            by_name.setdefault(k.rsplit("/layer", 1)[0], []).append(v)
        out.update({k: sum(v) / len(v) for k, v in by_name.items()})
        return out

    def _memory_gib(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux

    def train(self) -> RunResult:
        """Run until ``training.train_steps`` (or ``stop_at_step``); save on the interval and at the end."""
        from tqdm import tqdm

        c = self.cfg
        t = c.training
        result = RunResult(first_step=self.state.step)
        sink = MetricsLogger(c.logging, c.to_dict(), enabled=self.rank == 0)
        bar = tqdm(
            total=t.train_steps,
            initial=self.state.step,
            disable=self.rank != 0 or not c.logging.progress_bar,
            desc="pretrain",
            dynamic_ncols=True,
        )
        tokens_per_step = t.global_batch_size * c.model.seq_length
        last_step = t.train_steps if t.stop_at_step is None else min(t.train_steps, t.stop_at_step)
        # Pre-emption signal -> stop after an agreed step; a dead rank -> an error naming the step.
        guard = StepGuard(c.parallel.collective_timeout_s).start()
        interval_steps, interval_time = 0, 0.0
        self.data_wait_s = 0.0
        try:
            while self.state.step < last_step:
                t0 = time.perf_counter()
                with guard.step(self.state.step + 1):
                    loss, grad_norm = self._step()
                step_time = time.perf_counter() - t0
                interval_steps += 1
                interval_time += step_time
                result.losses.append(loss)
                result.grad_norms.append(grad_norm)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.state.step % c.logging.log_interval == 0 or self.state.step == t.train_steps:
                    metrics = {
                        "loss": loss,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_step / step_time,
                        "step_time_s": step_time,
                        "memory_gib": self._memory_gib(),
                        **{k: v for k, v in self.step_losses.items() if k != "loss"},
                        **self._data_wait(interval_steps, interval_time),
                        # the source's own counters (bad inputs, cache, ...), this rank's
                        **(self.data.metrics() if hasattr(self.data, "metrics") else {}),
                        **self._moe_metrics(),
                    }
                    interval_steps, interval_time = 0, 0.0
                    if self.rank == 0:
                        bar.write(format_line(self.state.step, t.train_steps, metrics))
                        sink.log(self.state.step, metrics)
                        result.metrics.append(metrics)
                # Between logging steps the MoE layers keep accumulating: the logged values are
                # averages over the whole logging interval (no collective on the other steps).
                if t.save_dir and t.save_interval and self.state.step % t.save_interval == 0:
                    result.checkpoint = str(self.save(more_steps=self.state.step < last_step))
                if guard.should_stop(self.state.step):
                    break  # pre-empted: the final save below writes this step's checkpoint
            if t.save_dir and (
                result.checkpoint is None or not result.checkpoint.endswith(ckpt.checkpoint_name(self.state.step))
            ):
                result.checkpoint = str(self.save(more_steps=False))
        finally:
            guard.close()
            bar.close()
            sink.close()
            if hasattr(self.data, "close"):
                self.data.close()  # decode threads
        return result

    def save(self, more_steps: bool = True) -> Path:
        """Write a checkpoint (collective). A data source built here from ``data.kind`` that has decode
        threads (``close``) is closed first and, with ``more_steps``, rebuilt at its saved position
        afterwards: megatron's checkpoint writer FORKS worker processes, and a fork taken while a
        decode thread holds a lock (PyAV/DALI/OpenMP) leaves the writer child hung for good."""
        extra = {"config": self.cfg.to_dict(), "layout": self.cfg.parallel.describe(self.world)}
        data_state = self._data_state()  # collective: before the save, on every rank
        if data_state is not None:
            extra["data_state"] = data_state
        restart = self._own_data and hasattr(self.data, "close")
        if restart:
            own_state = self.data.state_dict()
            self.data.close()
        path = self._save_checkpoint(extra)
        if restart and more_steps:
            self.data = self._data()
            self.data.load_state_dict(own_state)
        return path

    def _save_checkpoint(self, extra: dict) -> Path:
        return ckpt.save_checkpoint(
            self.cfg.training.save_dir,
            self.state,
            self.models,
            self.optimizer,
            self.scheduler,
            extra=extra,
            keep_last=self.cfg.training.keep_last,
        )


def pretrain(cfg: Config) -> RunResult:
    """Build and run one pretraining job in an initialised process group."""
    trainer = Pretrainer(cfg)
    try:
        return trainer.train()
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()


def run_pretrain_in_group(cfg: Config) -> RunResult:
    """Entry point for ``parallel.testing.run_distributed`` (the group exists already)."""
    return pretrain(cfg)
