"""The trainable TimeExpert video LLM: the vision tower on the first pipeline stage, then the decoder.

    chunks = build_video_llm(cfg)         # one TimeExpertVideoLLM per (virtual) pipeline stage
    out = chunk(ids, types, position_ids, frames=frames, labels=labels, label_types=label_types, loss_mask=mask)

:class:`TimeExpertVideoLLM` owns two parts:

- ``vision`` (:class:`~megatron_timeexpert.model.vision.VisionTower`: SigLIP ViT -> slot compression
  -> projector), only on the FIRST pipeline stage (the first virtual stage of pipeline rank 0), else
  None. Frames ``[b*F, H, W, 3]`` uint8 (sample-major, frame order; interface 1 of the data source)
  become ``[b*F, 8, h]`` slot tokens, reshaped to ``visual [b, F*8, h]``: the k-th VISUAL position of
  a sample takes row k (frame-major, slot order), as the token contract lays them out.
- ``frame_tokens`` (:class:`~megatron_timeexpert.model.frame_tokens.FrameTokens`, first stage, when
  ``model.frame_tokens`` enables a step): per-video standardisation of the slot tokens and the
  frame-time embedding, between the tower and the decoder (needs the frames' times, ``frame_times``).
- ``lm`` (:class:`~megatron_timeexpert.model.timeexpert.TimeExpertModel`): embeddings, MoE decoder,
  text/time/score heads (and the frame head); the token types reach the routers through its
  ``padding_mask``.

Parallelism. The vision tower is REPLICATED over the tensor-parallel group: every TP rank runs it on
all frames of its microbatch and feeds the whole ``visual`` tensor to the embedding, which builds the
full ``[s, b, h]`` sequence before the sequence-parallel scatter. The scatter's backward all-gathers
the gradient, so ``visual`` and every vision parameter get the COMPLETE gradient on every TP rank,
equal across ranks. Like the time/score embeddings (docs/MODEL.md) the vision parameters are
therefore NOT tagged ``sequence_parallel``: megatron's ``finalize_model_grads`` would all-reduce
them over TP and double them. Megatron's DDP reduces them over data parallelism like any dense
parameter and its grad norm counts them once (TP rank 0, ``param_is_not_tensor_parallel_duplicate``).
The tower's weights are drawn from a generator seeded by ``training.seed`` alone (a forked RNG), so
they are identical on every TP rank and in every layout. No communication of its own.

Under ``training.precision=bf16`` the trainer keeps the tower in fp32 (like the routers); its output
is cast to the decoder's dtype by the embedding.
"""

from __future__ import annotations

import logging

import torch
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from megatron_timeexpert.config import Config, ConfigError
from megatron_timeexpert.model.frame_tokens import FrameTokens
from megatron_timeexpert.model.timeexpert import TimeExpertModel, TimeExpertModelConfig, build_timeexpert_model
from megatron_timeexpert.model.vision import VisionTower

log = logging.getLogger(__name__)

VISION_SEED_OFFSET = 7_919
"""Added to ``training.seed`` for the vision tower's own init generator."""


class TimeExpertVideoLLM(MegatronModule):
    """One (virtual) pipeline stage of the video LLM: ``vision`` (first stage only) + ``lm``.

    Exposes what megatron's schedules and ``finalize_model_grads`` look up on a model chunk
    (``set_input_tensor``, ``pre_process``, ``post_process``, ``model_type``,
    ``share_embeddings_and_output_weights``). Checkpoint keys are ``vision.*`` (replicated) and
    ``lm.*`` (the decoder's own sharding).
    """

    def __init__(
        self, config, lm: TimeExpertModel, vision: VisionTower | None, frame_tokens: FrameTokens | None = None
    ):
        super().__init__(config=config)
        if vision is not None and not lm.pre_process:
            raise ValueError("TimeExpertVideoLLM: the vision tower belongs to the first pipeline stage only")
        if frame_tokens is not None and vision is None:
            raise ValueError("TimeExpertVideoLLM: frame_tokens sit with the vision tower (first stage only)")
        self.vision = vision
        self.frame_tokens = frame_tokens
        self.lm = lm
        self.pre_process = lm.pre_process
        self.post_process = lm.post_process
        self.vp_stage = lm.vp_stage
        self.model_type = lm.model_type
        self.share_embeddings_and_output_weights = False

    def set_input_tensor(self, input_tensor) -> None:
        """The previous pipeline stage's output goes to the decoder (megatron's contract)."""
        self.lm.set_input_tensor(input_tensor)

    def encode_frames(self, frames: Tensor, batch_size: int, frame_times: Tensor | None = None) -> Tensor:
        """Frames ``[b*F, H, W, 3]`` uint8 (or ``[b*F, 3, H, W]`` float) and their presentation times
        ``frame_times [b, F]`` (seconds; needed by ``frame_tokens``) -> ``visual [b, F*slots, h]``."""
        if self.vision is None:
            raise RuntimeError("TimeExpertVideoLLM.encode_frames: only the first pipeline stage has the vision tower")
        if frames.shape[0] % batch_size:
            raise ValueError(
                f"TimeExpertVideoLLM: {frames.shape[0]} frames do not split into {batch_size} samples "
                "(frames must be [b*F, ...], sample-major)"
            )
        tokens = self.vision(frames)  # [b*F, slots, h], row n from frame n only
        if self.frame_tokens is None:
            return tokens.reshape(batch_size, -1, tokens.shape[-1])
        per_video = tokens.reshape(batch_size, frames.shape[0] // batch_size, *tokens.shape[1:])
        return self.frame_tokens(per_video, frame_times)

    def forward(
        self,
        ids: Tensor,
        types: Tensor,
        position_ids: Tensor,
        frames: Tensor | None = None,
        labels: Tensor | None = None,
        label_types: Tensor | None = None,
        loss_mask: Tensor | None = None,
        inference_context=None,
        frame_times: Tensor | None = None,
        frame_targets: Tensor | None = None,
    ) -> Tensor:
        """As :meth:`TimeExpertModel.forward`, with ``frames`` and ``frame_times [b, F]`` instead of
        ``visual`` (read on the first stage only; other stages ignore them), and ``frame_targets [b, s]``
        for the frame head (last stage). Causal attention."""
        visual = None
        if self.vision is not None and frames is not None:
            visual = self.encode_frames(frames, ids.shape[0], frame_times)
        if frame_targets is not None:
            extra_targets = {"frame_targets": frame_targets}
        else:
            extra_targets = {}
        extra = {} if inference_context is None else {"inference_context": inference_context}
        return self.lm(
            ids,
            types,
            position_ids,
            None,
            visual=visual,
            labels=labels,
            label_types=label_types,
            loss_mask=loss_mask,
            **extra,
            **extra_targets,
        )


def build_vision_tower(cfg: Config) -> tuple[VisionTower, FrameTokens | None]:
    """The vision tower of ``model.vision`` and the frame-token module of ``model.frame_tokens`` (None
    when both of its steps are off), initialised from ``training.seed`` alone (module docstring)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.training.seed + VISION_SEED_OFFSET)
        tower = VisionTower(cfg.model.vision)
        ft = cfg.model.frame_tokens
        frame_tokens = FrameTokens(ft, cfg.model.hidden_size, cfg.model.init_method_std) if ft.enabled else None
    if torch.cuda.is_available():
        tower.cuda(torch.cuda.current_device())
        if frame_tokens is not None:
            frame_tokens.cuda(torch.cuda.current_device())
    return tower, frame_tokens


def check_vocab(cfg: Config) -> None:
    """With ``data.tokenizer`` set: take ``model.vocab_size`` from the tokenizer's size
    (``model.vocab_from_tokenizer``) or check that they are equal (ConfigError naming both)."""
    path = cfg.data.tokenizer
    if not path:
        if cfg.model.vocab_from_tokenizer:
            raise ConfigError("model.vocab_from_tokenizer=True: needs data.tokenizer (the .model file)")
        return
    from megatron_timeexpert.data.tokenizer import TextTokenizer

    try:
        tok = TextTokenizer.load(path)
    except ValueError as e:
        raise ConfigError(f"data.tokenizer={path!r}: {e}") from None
    if cfg.model.vocab_from_tokenizer:
        cfg.model.vocab_size = tok.vocab_size
    elif tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size}: the text tokenizer data.tokenizer={path!r} has "
            f"{tok.vocab_size} pieces; set model.vocab_size={tok.vocab_size} or model.vocab_from_tokenizer=true"
        )


def build_video_llm(cfg: Config, mcfg: TimeExpertModelConfig | None = None) -> list[TimeExpertVideoLLM]:
    """This rank's video-LLM chunks (one per virtual pipeline stage) for the initialised layout
    (:func:`check_vocab` first: it may set ``model.vocab_size``)."""
    check_vocab(cfg)
    chunks = []
    for lm in build_timeexpert_model(cfg, mcfg):
        # pre_process: the first virtual stage of pipeline rank 0 only
        vision, frame_tokens = build_vision_tower(cfg) if lm.pre_process else (None, None)
        chunks.append(TimeExpertVideoLLM(lm.config, lm, vision, frame_tokens))
    if torch.distributed.get_rank() == 0 and chunks[0].vision is not None:
        n = sum(p.numel() for p in chunks[0].vision.parameters())
        log.info("video LLM: vision tower on the first pipeline stage, %d parameters (replicated over TP)", n)
        ft = cfg.model.frame_tokens
        log.info(
            "video LLM: visual tokens %s, %s; frame loss weight %g",
            "standardised per slot over each video's frames" if ft.standardize else "as the tower gives them",
            "plus a frame-time embedding" if ft.time_embedding else "no frame-time embedding",
            cfg.model.frame_loss_weight,
        )
    return chunks
