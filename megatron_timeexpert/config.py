"""Typed run configuration: small dataclasses, YAML recipes, dotted command-line overrides.

    cfg = load_config("configs/tiny_moe.yaml", ["training.lr=3e-4", "parallel.tp=2"])

Every section validates itself and raises :class:`ConfigError` naming ``section.field``, the bad
value and what is allowed. Unknown keys in a YAML file or an override are errors too (a typo must
not silently fall back to a default). No communication.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_timeexpert.model.frame_tokens import FrameTokensConfig
from megatron_timeexpert.model.vision import VisionConfig
from megatron_timeexpert.moe.dynamics import ExpertDynamicsConfig
from parallel.layout import LayoutError, ParallelLayout
from parallel.planner import RebalanceConfig


class ConfigError(ValueError):
    """A bad configuration value; the message names the field, the value and the rule."""


def _check(cond: bool, section: str, name: str, value: Any, rule: str) -> None:
    if not cond:
        raise ConfigError(f"{section}.{name}={value!r}: {rule}")


MODEL_KINDS = ("gpt", "timeexpert")


@dataclass
class ModelConfig:
    """The MoE decoder: a GPT-style token model, or the TimeExpert video LLM."""

    kind: str = "gpt"
    """'gpt': megatron's GPTModel on one token stream (data.kind synthetic_tokens); 'timeexpert': the
    TimeExpert video LLM (model/video_llm.py: vision tower on the first pipeline stage, text/time/score
    embeddings and heads; data.kind synthetic_vtg)."""
    num_layers: int = 4
    """Transformer layers (a multiple of pp * vpp)."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Attention heads (a multiple of tp)."""
    ffn_hidden_size: int = 128
    """Hidden width of each expert's MLP (and of dense MLPs)."""
    vocab_size: int = 256
    """Token vocabulary (megatron pads it to a multiple of 128 * tp internally)."""
    seq_length: int = 64
    """Tokens per sample."""
    normalization: str = "LayerNorm"
    """'LayerNorm' or 'RMSNorm'."""
    init_method_std: float = 0.02
    """Std of the normal weight init."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    vocab_from_tokenizer: bool = False
    """model.kind timeexpert: set ``vocab_size`` to the size of the text tokenizer ``data.tokenizer``
    when the run starts (a trained sentencepiece model may have fewer pieces than asked for); false:
    ``vocab_size`` must equal that size."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """model.kind timeexpert: the vision encoder (section ``model.vision``; ``out_hidden`` must equal
    ``hidden_size``)."""
    frame_tokens: FrameTokensConfig = field(default_factory=FrameTokensConfig)
    """model.kind timeexpert: per-video standardisation of the slot tokens and the frame-time embedding
    (section ``model.frame_tokens``, model/frame_tokens.py; our addition, off by default)."""
    frame_loss_weight: float = 0.0
    """model.kind timeexpert: weight of the per-frame relevance loss (a frame head on the last stage reads
    each frame's last position and predicts whether the frame lies inside the query's events; binary
    cross entropy summed over frames, added to the summed token losses before megatron divides by the
    loss tokens). 0: no frame head (the paper's recipe). Our addition (docs/MODEL.md "Grounding")."""

    def validate(self) -> None:
        _check(self.kind in MODEL_KINDS, "model", "kind", self.kind, f"choose one of {MODEL_KINDS}")
        try:
            self.vision.validate()
        except ValueError as e:
            raise ConfigError(f"model.vision.{e}") from None
        try:
            self.frame_tokens.validate()
        except ValueError as e:
            raise ConfigError(f"model.frame_tokens.{e}") from None
        _check(
            isinstance(self.frame_loss_weight, (int, float)) and 0.0 <= self.frame_loss_weight < float("inf"),
            "model",
            "frame_loss_weight",
            self.frame_loss_weight,
            "must be a finite number >= 0",
        )
        _check(
            self.kind != "timeexpert" or self.vision.out_hidden == self.hidden_size,
            "model.vision",
            "out_hidden",
            self.vision.out_hidden,
            f"must equal model.hidden_size={self.hidden_size} (the slot tokens enter the decoder)",
        )
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size", "seq_length"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, "model", name, v, "must be a positive integer")
        _check(
            self.hidden_size % self.num_attention_heads == 0,
            "model",
            "hidden_size",
            self.hidden_size,
            f"must be divisible by num_attention_heads={self.num_attention_heads}",
        )
        _check(
            self.normalization in ("LayerNorm", "RMSNorm"),
            "model",
            "normalization",
            self.normalization,
            "use 'LayerNorm' or 'RMSNorm'",
        )
        for name in ("hidden_dropout", "attention_dropout"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, "model", name, v, "must be in [0, 1)")


ROUTERS = ("megatron", "topk", "timeexpert")


@dataclass
class MoEConfig:
    """Mixture-of-Experts layers."""

    router: str = "megatron"
    """'megatron' (megatron-core's MoE layer and top-k router), 'topk' or 'timeexpert' (our MoE layer)."""
    num_experts: int = 4
    """Experts per MoE layer (for our layer: E_max, the fixed number of slots, ep * slots_per_rank)."""
    topk: int = 2
    """Experts per token for the top-k routers."""
    layer_freq: int = 1
    """Every layer_freq-th layer is an MoE layer (1: all layers); the others are dense MLPs."""
    aux_loss_coeff: float = 0.01
    """Load-balancing / task-dependent auxiliary loss coefficient."""
    z_loss_coeff: float = 0.0
    """Router z-loss coefficient."""
    dispatcher: str = "allgather"
    """megatron router only: 'allgather' or 'alltoall' token dispatcher."""
    alpha: float = 0.1
    """timeexpert: weight of the task activation rate A_t in the gate (eq. 6)."""
    threshold_init: float = 0.0
    """timeexpert: initial learnable threshold G."""
    num_initial_experts: int | None = None
    """topk/timeexpert: logical experts 0..n-1 start active, the others are free for expert addition
    (null: all num_experts)."""
    weighting: str = "uniform"
    """timeexpert: how fired experts' outputs combine: 'uniform' (1/k), 'gate' or 'sum' (RouterConfig)."""
    rate_decay: float = 0.99
    """topk/timeexpert: EMA decay of the per-type activation rates A_t, in [0, 1)."""
    expert_norm_coeff: float = 1e-4
    """timeexpert: lambda_2 of eq. 9 (sum of squared gate-vector norms)."""
    empty_token_policy: str = "zero"
    """timeexpert, training: output of a token that fires no expert: 'zero' or 'top1'."""
    eval_empty_token_policy: str = "top1"
    """timeexpert, evaluation: the same choice in eval mode."""
    dynamics: ExpertDynamicsConfig = field(default_factory=ExpertDynamicsConfig)
    """timeexpert/topk: adding and pruning experts while training (eq. 7-8), section ``moe.dynamics``."""
    placement: RebalanceConfig = field(default_factory=RebalanceConfig)
    """timeexpert/topk: re-planning expert placement over EP ranks and migrating experts while
    training (after adds/prunes and on persistent imbalance), section ``moe.placement``."""

    def validate(self) -> None:
        _check(self.router in ROUTERS, "moe", "router", self.router, f"choose one of {ROUTERS}")
        _check(
            self.num_initial_experts is None
            or (isinstance(self.num_initial_experts, int) and 1 <= self.num_initial_experts <= self.num_experts),
            "moe",
            "num_initial_experts",
            self.num_initial_experts,
            f"must be null or in 1..{self.num_experts}",
        )
        _check(
            self.router != "topk" or self.topk <= (self.num_initial_experts or self.num_experts),
            "moe",
            "topk",
            self.topk,
            "must not exceed moe.num_initial_experts",
        )
        _check(
            self.weighting in ("uniform", "gate", "sum"),
            "moe",
            "weighting",
            self.weighting,
            "use 'uniform', 'gate' or 'sum'",
        )
        _check(0.0 <= self.rate_decay < 1.0, "moe", "rate_decay", self.rate_decay, "must be in [0, 1)")
        _check(self.expert_norm_coeff >= 0, "moe", "expert_norm_coeff", self.expert_norm_coeff, "must be >= 0")
        for name in ("empty_token_policy", "eval_empty_token_policy"):
            v = getattr(self, name)
            _check(v in ("zero", "top1"), "moe", name, v, "use 'zero' or 'top1'")
        try:
            self.dynamics.validate()
        except ValueError as e:
            raise ConfigError(f"moe.dynamics.{e}") from None
        _check(
            not self.dynamics.enabled or self.router in ("topk", "timeexpert"),
            "moe.dynamics",
            "enabled",
            self.dynamics.enabled,
            "adding and pruning experts needs our MoE layer (moe.router 'topk' or 'timeexpert')",
        )
        try:
            self.placement.validate()
        except ValueError as e:
            raise ConfigError(f"moe.placement.{e}") from None
        _check(
            not self.placement.enabled or self.router in ("topk", "timeexpert"),
            "moe.placement",
            "enabled",
            self.placement.enabled,
            "re-planning expert placement needs our MoE layer (moe.router 'topk' or 'timeexpert')",
        )
        _check(
            isinstance(self.num_experts, int) and self.num_experts > 0,
            "moe",
            "num_experts",
            self.num_experts,
            "must be a positive integer",
        )
        _check(1 <= self.topk <= self.num_experts, "moe", "topk", self.topk, f"must be in 1..{self.num_experts}")
        _check(self.layer_freq >= 1, "moe", "layer_freq", self.layer_freq, "must be >= 1")
        _check(self.aux_loss_coeff >= 0, "moe", "aux_loss_coeff", self.aux_loss_coeff, "must be >= 0")
        _check(self.z_loss_coeff >= 0, "moe", "z_loss_coeff", self.z_loss_coeff, "must be >= 0")
        _check(
            self.dispatcher in ("allgather", "alltoall"),
            "moe",
            "dispatcher",
            self.dispatcher,
            "use 'allgather' or 'alltoall'",
        )


DATA_KINDS = ("synthetic_tokens", "synthetic_vtg")
VTG_TASKS = ("moment_retrieval", "highlight_detection", "dense_captioning")


@dataclass
class DataConfig:
    """Training data."""

    kind: str = "synthetic_tokens"
    """'synthetic_tokens': a deterministic, learnable token stream (model.kind gpt); 'synthetic_vtg':
    videos and annotations as tools/make_synthetic_vtg.py writes them, decoded and tokenized by
    data/vtg_source.py (model.kind timeexpert)."""
    seed: int = 1234
    """Seed of the synthetic data; sample i is a pure function of (seed, i). synthetic_vtg: the seed
    of the loader's shuffle."""
    root: str | None = None
    """synthetic_vtg: the data folder as ``python -m tools.make_synthetic_vtg --out ROOT`` writes it
    (``ROOT/videos``, ``ROOT/annotations``)."""
    annotations: dict[str, str] | None = None
    """synthetic_vtg: ``{reader: file}`` annotation files (relative to ``ROOT/annotations``); null: the
    source's default (Charades-STA, QVHighlights, ActivityNet Captions files of the synthetic data)."""
    tasks: list[str] = field(default_factory=lambda: list(VTG_TASKS))
    """synthetic_vtg: which VTG tasks to train on (subset of moment_retrieval, highlight_detection,
    dense_captioning)."""
    split: str = "all"
    """synthetic_vtg: 'all', or 'train' / 'test' (a deterministic split by video, data/vtg_source.py)."""
    num_frames: int = 2
    """synthetic_vtg: frames sampled per video (each is 8 VISUAL + 7 TIME positions of the sequence)."""
    image_size: int = 64
    """synthetic_vtg: side of the square uint8 frames the source hands the vision tower (pixels)."""
    tokenizer: str | None = None
    """synthetic_vtg: the text tokenizer's ``.model`` file (data/tokenizer.py); model.vocab_size must
    equal its size."""
    overflow: str = "drop_events"
    """synthetic_vtg: a sample longer than model.seq_length: 'error' or 'drop_events' (its last events go)."""
    num_workers: int = 2
    """synthetic_vtg: decoding threads per rank."""
    decode_timeout_s: float = 120.0
    """synthetic_vtg: longest wait for one video's decode; past it the video is skipped and counted."""
    cache_dir: str | None = None
    """synthetic_vtg: directory of the on-disk frame cache shared by ranks and runs (null: memory only)."""
    query_first: bool = True
    """synthetic_vtg: the instruction (with the query) comes before the video block, so every frame can
    attend to the query; false: after it, TRACE's order (data/vtg.py)."""
    frame_time_tokens: bool = True
    """synthetic_vtg: each frame's block ends with its presentation time as TIME tokens; false: the time
    reaches the model only through model.frame_time_embedding (shorter sequences)."""
    time_digits: int = 4
    """synthetic_vtg: integer digits of every time token, in the prompt and the answers (4: TRACE's
    ``0012.3``; 2: ``12.3``, for videos under 100 s). predict and eval read the same setting."""

    def sequence_config(self):
        """The token layout of these settings (data/vtg.py ``SequenceConfig``)."""
        from megatron_timeexpert.data.vtg import SequenceConfig

        return SequenceConfig(
            query_first=self.query_first, frame_time_tokens=self.frame_time_tokens, time_digits=self.time_digits
        )

    def validate(self) -> None:
        _check(self.kind in DATA_KINDS, "data", "kind", self.kind, f"choose one of {DATA_KINDS}")
        _check(
            isinstance(self.time_digits, int) and 1 <= self.time_digits <= 6,
            "data",
            "time_digits",
            self.time_digits,
            "must be an integer in 1..6",
        )
        _check(
            isinstance(self.tasks, list) and bool(self.tasks) and all(t in VTG_TASKS for t in self.tasks),
            "data",
            "tasks",
            self.tasks,
            f"a non-empty list of {VTG_TASKS}",
        )
        for name in ("num_frames", "image_size", "num_workers"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, "data", name, v, "must be a positive integer")


PRECISIONS = ("fp32", "bf16")
RECOMPUTE = ("none", "full", "selective")
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe")


@dataclass
class TrainingConfig:
    """Optimisation, schedule and checkpoints."""

    train_steps: int = 20
    """Optimizer steps to run (in total, counting steps before a resume); 0 initialises and saves."""
    stop_at_step: int | None = None
    """Stop this process when the step counter reaches this value (saving a checkpoint when save_dir
    is set), e.g. to fit a job's time limit; the LR schedule still spans train_steps. None: run on."""
    micro_batch_size: int = 2
    """Samples per microbatch per data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Final learning rate of the decay."""
    lr_warmup_steps: int = 2
    """Linear warm-up steps."""
    lr_decay_style: str = "cosine"
    """'cosine', 'linear' or 'constant'."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    seed: int = 42
    """Seed of weight init and dropout."""
    save_dir: str | None = None
    """Where checkpoints go (None: no checkpoints)."""
    save_interval: int = 0
    """Save every N steps (0: only at the end when save_dir is set)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in save_dir."""
    load_dir: str | None = None
    """Initialise from this checkpoint directory (any layout) instead of random weights; the step
    counter, optimizer and data position are loaded too unless finetune is set."""
    finetune: bool = False
    """With load_dir: load weights only (step 0, fresh optimizer)."""
    keep_last: int = 3
    """Complete checkpoints to keep (older ones are deleted after a successful save)."""
    recompute: str = "none"
    """Activation recomputation (megatron's ``recompute_granularity``): 'none'; 'full': each layer's
    input is kept and the whole layer is run again in backward (``recompute_num_layers`` layers per
    checkpoint, uniform method); 'selective': only ``recompute_modules`` are run again. Our MoE layer
    routes a recomputed microbatch with its own token types and counts its tokens once."""
    recompute_modules: str = "core_attn,mlp"
    """Comma-separated modules for ``recompute: selective`` (megatron's names: core_attn, mlp,
    layernorm, moe, ...). 'mlp' recomputes our MoE layer (megatron's 'moe' only its own MoE layer)."""
    recompute_num_layers: int = 1
    """Layers per recomputed checkpoint with ``recompute: full``."""
    precision: str = "fp32"
    """'fp32', or 'bf16': bf16 weights and activations (megatron's Float16Module) with fp32 main
    weights, Adam moments and gradient reduction in megatron's optimizer. In bf16 our routers keep
    fp32 weights and their routing records keep float64 buffers (routing decisions and counts are
    not rounded); expert slot weights are bf16 like the other layers."""
    freeze: list[str] = field(default_factory=list)
    """Glob patterns (``fnmatch``, ``*`` crosses dots) over parameter names within a model chunk (e.g.
    ``vision.vit.*``, ``lm.decoder.*``; decoder layers are numbered per pipeline stage): matching
    parameters get ``requires_grad=False`` before DDP and the optimizer are built, so they are not
    trained and hold no optimizer state. A pattern that matches no parameter on any rank is an error."""
    distributed_optimizer: bool = False
    """Shard the optimizer state (fp32 main weights, Adam moments) over the data-parallel ranks
    (megatron's DistributedOptimizer: gradients reduce-scattered, updated weights all-gathered).
    Checkpoints store its state in megatron's 'fully_reshardable' format, loadable at any layout."""

    def validate(self) -> None:
        _check(
            isinstance(self.train_steps, int) and self.train_steps >= 0,
            "training",
            "train_steps",
            self.train_steps,
            "must be an integer >= 0 (0: initialise, save, stop)",
        )
        _check(
            self.stop_at_step is None or self.stop_at_step >= 0,
            "training",
            "stop_at_step",
            self.stop_at_step,
            "must be >= 0 or null",
        )
        for name in ("micro_batch_size", "global_batch_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, "training", name, v, "must be a positive integer")
        _check(self.lr > 0, "training", "lr", self.lr, "must be > 0")
        _check(0 <= self.min_lr <= self.lr, "training", "min_lr", self.min_lr, f"must be in [0, lr={self.lr}]")
        _check(self.lr_warmup_steps >= 0, "training", "lr_warmup_steps", self.lr_warmup_steps, "must be >= 0")
        _check(
            self.lr_decay_style in ("cosine", "linear", "constant"),
            "training",
            "lr_decay_style",
            self.lr_decay_style,
            "use 'cosine', 'linear' or 'constant'",
        )
        _check(self.clip_grad >= 0, "training", "clip_grad", self.clip_grad, "must be >= 0")
        _check(self.save_interval >= 0, "training", "save_interval", self.save_interval, "must be >= 0")
        _check(self.keep_last >= 1, "training", "keep_last", self.keep_last, "must be >= 1")
        _check(
            self.recompute in RECOMPUTE,
            "training",
            "recompute",
            self.recompute,
            f"choose one of {RECOMPUTE}",
        )
        modules = [m.strip() for m in self.recompute_modules.split(",") if m.strip()]
        _check(
            self.recompute != "selective" or (modules and set(modules) <= set(RECOMPUTE_MODULES)),
            "training",
            "recompute_modules",
            self.recompute_modules,
            f"a comma-separated non-empty subset of {RECOMPUTE_MODULES}",
        )
        _check(
            self.recompute_num_layers >= 1,
            "training",
            "recompute_num_layers",
            self.recompute_num_layers,
            "must be >= 1",
        )
        _check(self.precision in PRECISIONS, "training", "precision", self.precision, f"choose one of {PRECISIONS}")
        _check(
            isinstance(self.freeze, list) and all(isinstance(p, str) and p for p in self.freeze),
            "training",
            "freeze",
            self.freeze,
            "must be a list of non-empty name patterns",
        )
        _check(
            not self.resume or self.save_dir is not None, "training", "resume", self.resume, "needs training.save_dir"
        )


@dataclass
class LoggingConfig:
    """Where metrics go."""

    log_interval: int = 1
    """Print one metrics line every N steps (rank 0)."""
    run_dir: str = "runs/default"
    """Run directory: metrics.jsonl, tensorboard/, wandb/ go here."""
    jsonl: bool = True
    """Write metrics.jsonl."""
    tensorboard: bool = True
    """Write TensorBoard events when tensorboard is installed."""
    wandb: bool = True
    """Log to wandb when it is installed (see wandb_mode)."""
    wandb_mode: str = "offline"
    """'offline' (default: no network needed), 'online' or 'disabled'."""
    wandb_project: str = "megatron-timeexpert"
    """wandb project name."""
    progress_bar: bool = True
    """tqdm progress bar on rank 0."""

    def validate(self) -> None:
        _check(self.log_interval >= 1, "logging", "log_interval", self.log_interval, "must be >= 1")
        _check(
            self.wandb_mode in ("offline", "online", "disabled"),
            "logging",
            "wandb_mode",
            self.wandb_mode,
            "use 'offline', 'online' or 'disabled'",
        )


@dataclass
class Config:
    """A whole run: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int | None = None) -> Config:
        """Check every section; with ``world_size`` also the parallel layout against the model."""
        for section in (self.model, self.moe, self.data, self.training, self.logging):
            section.validate()
        t = self.training
        _check(
            (self.model.kind == "timeexpert") == (self.data.kind == "synthetic_vtg"),
            "data",
            "kind",
            self.data.kind,
            f"model.kind={self.model.kind!r} trains on "
            + ("'synthetic_vtg'" if self.model.kind == "timeexpert" else "'synthetic_tokens'"),
        )
        _check(
            self.model.kind != "timeexpert" or not self.model.frame_tokens.standardize or self.data.num_frames >= 2,
            "model.frame_tokens",
            "standardize",
            self.model.frame_tokens.standardize,
            f"standardises each slot over the video's frames: needs data.num_frames >= 2 (is {self.data.num_frames})",
        )
        _check(
            self.model.kind != "timeexpert" or self.data.frame_time_tokens or self.model.frame_tokens.time_embedding,
            "data",
            "frame_time_tokens",
            self.data.frame_time_tokens,
            "without frame time tokens the model needs model.frame_tokens.time_embedding=true to know when a "
            "frame was shown",
        )
        _check(
            t.precision != "bf16"
            or self.moe.router == "megatron"
            or t.distributed_optimizer
            or (t.save_dir is None and (t.load_dir is None or t.finetune)),
            "training",
            "precision",
            t.precision,
            f"bf16 with our MoE layer (moe.router={self.moe.router!r}) writes or loads optimizer checkpoints "
            "only with training.distributed_optimizer=true: megatron-core 0.16.1's non-distributed bf16 "
            "optimizer cannot checkpoint the routers' fp32 parameters",
        )
        if world_size is not None:
            try:
                self.parallel.validate(
                    world_size,
                    num_layers=self.model.num_layers,
                    num_experts=self.moe.num_experts,
                    num_attention_heads=self.model.num_attention_heads,
                    global_batch_size=self.training.global_batch_size,
                    micro_batch_size=self.training.micro_batch_size,
                )
            except LayoutError as e:
                raise ConfigError(str(e)) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a dataclass field type (int, float, bool, str, optionals)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r}: must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r}: must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}={value!r}: must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}={value!r}: must be a string")
    return value


def _apply(obj: Any, data: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"{path}: unknown field (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}={value!r}: must be a mapping of fields")
            _apply(current, value, path)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``training.lr=3e-4`` -> (['training', 'lr'], 0.0003); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must look like section.field")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML recipe at ``path`` <- dotted ``overrides``; then section validation."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        try:
            _apply(cfg, data, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides or []:
        parts, value = parse_override(text)
        nested: dict[str, Any] = {parts[-1]: value}
        for p in reversed(parts[:-1]):
            nested = {p: nested}
        _apply(cfg, nested, "")
    return cfg.validate()
