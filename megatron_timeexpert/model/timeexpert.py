"""The TimeExpert multimodal decoder on megatron-core: four token types in, three heads out.

One :class:`TimeExpertModel` per (virtual) pipeline stage, built like megatron's ``GPTModel``
(``pre_process`` / ``post_process``); :func:`build_timeexpert_model` returns this rank's chunks.

- First stage: :class:`TimeExpertEmbedding` puts, per position, the TP-sharded text embedding
  (TEXT), the time embedding (TIME), the score embedding (SCORE) or the next slot token of the
  sample's ``visual`` tensor (VISUAL, in order), adds learned absolute position embeddings, and
  returns ``[s, b, h]``, scattered along the sequence over the TP group under sequence parallelism.
- Decoder: megatron's ``TransformerBlock`` with :func:`megatron_timeexpert.model.gpt.block_spec`
  (our MoE MLP); the token types ride in megatron's per-token ``padding_mask`` argument, as in
  train/pretrain.py, so every router sees VISUAL/TEXT/TIME/SCORE (moe/layer.py).
- Last stage: the block's final norm, then the text head (vocab-parallel), the time head and the
  score head (replicated, h -> 13); each position is scored by the head of its TARGET's type
  (tokens.md). With ``frame_head`` a replicated ``h -> 1`` frame head scores each frame's last position
  (per-frame relevance, our addition; heads.py). See :mod:`megatron_timeexpert.model.heads` for the
  loss tensor and who owns what.

Targets: ``labels[b, i]`` / ``label_types[b, i]`` are the id and type of position ``i + 1``, and
``loss_mask[b, i]`` says whether that target counts (tokens.md: the response tokens and the final
EOS), i.e. megatron's convention (masks aligned with the predicting position). The trainer passes
them; the model does not shift. :func:`next_token_targets` makes them from ``ids``, ``types`` and
data/vtg.py's ``loss_mask`` (which is aligned with the TARGET position, so it is shifted left).

Communication (TP group, per forward): the text embedding's all-reduce, one scatter of the
embeddings (first stage); the block's own; the text head's all-gather of its input and the
vocab-parallel cross entropy's all-reduces, plus one all-gather of the final hidden states for the
time/score heads (last stage). Backward mirrors them. Pipeline stages exchange ``[s/tp, b, h]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule
from torch import Tensor

from megatron_timeexpert.config import Config
from megatron_timeexpert.model.gpt import block_spec, layer_backend, model_chunks
from megatron_timeexpert.model.heads import (
    FrameHead,
    Head,
    NumberHead,
    TextHead,
    number_embedding,
    padded_vocab_size,
    per_head_loss,
)
from megatron_timeexpert.moe.types import TokenType

log = logging.getLogger(__name__)


@dataclass
class TimeExpertModelConfig:
    """What the TimeExpert model needs beyond megatron's ``TransformerConfig``."""

    text_vocab_size: int = 256
    """Ids of the text vocabulary (the tokenizer's size); from ``model.vocab_size``."""
    max_sequence_length: int = 64
    """Positions of the learned absolute position embedding; from ``model.seq_length``."""
    vocab_pad_multiple: int = 128
    """The text embedding and head have ``text_vocab_size`` rounded up to a multiple of this rows
    (layout-independent; must split over TP); padded entries are never predicted."""
    check_inputs: bool = True
    """Check ids/types/visual counts of every first-stage forward (clear errors; one host sync)."""
    frame_head: bool = False
    """Build the per-frame relevance head on the last stage (``model.frame_loss_weight > 0``)."""

    @classmethod
    def from_config(cls, cfg: Config) -> TimeExpertModelConfig:
        return cls(
            text_vocab_size=cfg.model.vocab_size,
            max_sequence_length=cfg.model.seq_length,
            frame_head=cfg.model.frame_loss_weight > 0,
        )


@dataclass
class Targets:
    """What position ``i`` of a sequence predicts (the model's ``labels``/``label_types``/``loss_mask``)."""

    labels: Tensor
    """long ``[b, s]``: the id of position ``i + 1`` (``pad_id`` at the last position)."""
    label_types: Tensor
    """long ``[b, s]``: the :class:`TokenType` of position ``i + 1`` (TEXT at the last position)."""
    loss_mask: Tensor | None
    """float ``[b, s]``: whether position ``i + 1`` is a counted target (0 at the last position);
    None when no target mask was given."""


def next_token_targets(ids: Tensor, types: Tensor, target_mask: Tensor | None = None, pad_id: int = 0) -> Targets:
    """Shift a sequence into next-token targets. ``target_mask [b, s]`` is aligned with ``ids`` as
    data/vtg.py makes it (``target_mask[i] = 1``: position ``i`` is a response target); the model's
    ``loss_mask`` is aligned with the PREDICTING position, so it is ``target_mask`` shifted left."""
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], pad_id)], dim=1)
    label_types = torch.cat([types[:, 1:], torch.full_like(types[:, :1], int(TokenType.TEXT))], dim=1)
    loss_mask = None
    if target_mask is not None:
        loss_mask = torch.cat([target_mask[:, 1:], torch.zeros_like(target_mask[:, :1])], dim=1)
    return Targets(labels, label_types, loss_mask)


class TimeExpertEmbedding(MegatronModule):
    """``ids, types [b, s]``, ``visual [b, n_vis, h]``, ``position_ids [b, s]`` -> ``[s(/tp), b, h]``.

    The text embedding is megatron's ``VocabParallelEmbedding`` (sharded rows, one all-reduce over
    TP in forward). The time, score and position embeddings are replicated and computed for the
    whole sequence on every TP rank before the scatter, so their gradients are complete on every
    rank (no ``sequence_parallel`` tag; see heads.py). The ``visual`` tensor (the vision tower's
    projected slot tokens, replicated over TP) gets the same complete gradient on every TP rank.
    A ``MegatronModule``, so distributed checkpoints store the text embedding as TP-sharded and the
    others as replicated.
    """

    def __init__(self, config, mcfg: TimeExpertModelConfig, padded_vocab: int):
        super().__init__(config=config)
        from megatron.core import tensor_parallel

        self.mcfg = mcfg
        self.word_embeddings = tensor_parallel.VocabParallelEmbedding(
            num_embeddings=padded_vocab,
            embedding_dim=config.hidden_size,
            init_method=config.embedding_init_method,
            reduce_scatter_embeddings=False,
            config=config,
        )
        self.time_embeddings = number_embedding(config)
        self.score_embeddings = number_embedding(config)
        self.position_embeddings = torch.nn.Embedding(
            mcfg.max_sequence_length, config.hidden_size, dtype=config.params_dtype
        )
        if config.perform_initialization:
            config.embedding_init_method(self.position_embeddings.weight)
        self.embedding_dropout = torch.nn.Dropout(config.hidden_dropout)

    def check(self, ids: Tensor, types: Tensor, visual: Tensor | None, position_ids: Tensor) -> None:
        """Raise ``ValueError`` naming the field at fault when a batch breaks the token contract."""
        num_ids = self.time_embeddings.num_embeddings
        if ids.shape != types.shape or ids.dim() != 2:
            raise ValueError(f"TimeExpertModel: ids {tuple(ids.shape)} and types {tuple(types.shape)} must be [b, s]")
        if types.min() < 0 or types.max() >= len(TokenType):
            raise ValueError(f"TimeExpertModel: types must be TokenType values 0..{len(TokenType) - 1}")
        text = types == TokenType.TEXT
        if text.any() and (ids[text].min() < 0 or ids[text].max() >= self.mcfg.text_vocab_size):
            raise ValueError(f"TimeExpertModel: a TEXT id is outside 0..{self.mcfg.text_vocab_size - 1}")
        number = (types == TokenType.TIME) | (types == TokenType.SCORE)
        if number.any() and (ids[number].min() < 0 or ids[number].max() >= num_ids):
            raise ValueError(f"TimeExpertModel: a TIME/SCORE id is outside 0..{num_ids - 1}")
        if position_ids.max() >= self.mcfg.max_sequence_length:
            raise ValueError(
                f"TimeExpertModel: position id {int(position_ids.max())} >= max_sequence_length "
                f"{self.mcfg.max_sequence_length} (model.seq_length)"
            )
        n_vis = int((types == TokenType.VISUAL).sum(1).max())
        have = 0 if visual is None else visual.shape[1]
        if n_vis > have:
            raise ValueError(
                f"TimeExpertModel: a sample has {n_vis} VISUAL positions but visual holds {have} slot tokens per sample"
            )
        if visual is not None and (visual.dim() != 3 or visual.shape[0] != ids.shape[0]):
            raise ValueError(f"TimeExpertModel: visual {tuple(visual.shape)} must be [b={ids.shape[0]}, n_vis, h]")

    def forward(self, ids: Tensor, types: Tensor, position_ids: Tensor, visual: Tensor | None) -> Tensor:
        from megatron.core import tensor_parallel

        if self.mcfg.check_inputs:
            self.check(ids, types, visual, position_ids)
        t = types.unsqueeze(-1)
        text = self.word_embeddings(torch.where(types == TokenType.TEXT, ids, 0))  # [b, s, h]
        number_ids = torch.where((types == TokenType.TIME) | (types == TokenType.SCORE), ids, 0)
        x = torch.where(t == TokenType.TIME, self.time_embeddings(number_ids), text)
        x = torch.where(t == TokenType.SCORE, self.score_embeddings(number_ids), x)
        is_vis = types == TokenType.VISUAL
        if visual is not None:
            # The k-th VISUAL position of a sample takes the sample's k-th slot token.
            slot = (is_vis.long().cumsum(1) - 1).clamp(min=0)
            vis = torch.gather(visual.to(x.dtype), 1, slot.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.where(is_vis.unsqueeze(-1), vis, x)
        x = x + self.position_embeddings(position_ids)
        x = x.transpose(0, 1).contiguous()  # [s, b, h]
        if self.config.fp32_residual_connection:
            x = x.float()
        if self.config.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)
            # The scatter returns a view of the full tensor; a copy lets that be freed.
            x = x.clone()
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.embedding_dropout(x)
        return self.embedding_dropout(x)


class TimeExpertModel(MegatronModule):
    """One (virtual) pipeline stage of the TimeExpert decoder (module docstring).

    ``forward`` with ``labels`` returns the ``[b, s, 2]`` loss tensor of heads.py on the last stage
    (for :func:`~megatron_timeexpert.model.heads.timeexpert_loss_func`); without labels the last
    stage returns the final hidden states ``[b, s, h]`` (after the final norm, whole sequence) for
    :meth:`logits_for_generation`. Other stages return their output hidden states ``[s/tp, b, h]``.
    """

    def __init__(
        self,
        config,
        mcfg: TimeExpertModelConfig,
        transformer_layer_spec,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        from megatron.core.transformer.transformer_block import TransformerBlock

        super().__init__(config=config)
        self.mcfg = mcfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = False  # read by megatron's finalize_model_grads
        self.padded_vocab = padded_vocab_size(
            mcfg.text_vocab_size, mcfg.vocab_pad_multiple, config.tensor_model_parallel_size
        )
        if pre_process:
            self.embedding = TimeExpertEmbedding(config, mcfg, self.padded_vocab)
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True
        self.decoder = TransformerBlock(
            config=config,
            spec=transformer_layer_spec,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
        )
        if post_process:
            self.text_head = TextHead(config, mcfg.text_vocab_size, self.padded_vocab)
            self.text_head.linear.weight.is_embedding_or_output_parameter = True
            self.time_head = NumberHead(config)
            self.score_head = NumberHead(config)
            self.frame_head = FrameHead(config) if mcfg.frame_head else None
        self.model_type = _encoder_or_decoder()
        # Token types go to our MoE layers only: megatron's own MoE layer (moe.router 'megatron')
        # would read padding_mask as a padding mask (as train/pretrain.py, which passes none then).
        self.routes_by_type = any(
            hasattr(m, "set_aux_loss_scale") and hasattr(m, "pop_metrics") for m in self.decoder.modules()
        )

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's output here (megatron's contract)."""
        if isinstance(input_tensor, list):
            if len(input_tensor) != 1:
                raise ValueError(f"TimeExpertModel.set_input_tensor: expected 1 tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def forward(
        self,
        ids: Tensor,
        types: Tensor,
        position_ids: Tensor,
        attention_mask: Tensor | None = None,
        visual: Tensor | None = None,
        labels: Tensor | None = None,
        label_types: Tensor | None = None,
        loss_mask: Tensor | None = None,
        inference_context=None,
        frame_targets: Tensor | None = None,
    ) -> Tensor:
        """``ids, types, position_ids [b, s]``; ``visual [b, n_vis, h]`` (first stage; None when the
        samples have no VISUAL positions); ``attention_mask`` None = causal; ``labels``,
        ``label_types``, ``loss_mask [b, s]`` (last stage; see the module docstring);
        ``frame_targets [b, s]`` (last stage, with a frame head: per-frame relevance at each frame's last
        position, -1 elsewhere; ignored without a frame head).

        ``inference_context``: megatron's ``StaticInferenceContext`` (KV cache) for generation, passed
        to the ``TransformerBlock``. The caller feeds the prompt once (prefill, ``sequence_len_offset``
        0) and then the new positions, advancing ``sequence_len_offset``; ``position_ids`` are the
        absolute positions of the fed tokens (the learned position embedding is added here, there is
        no rotary embedding), so an incremental step passes e.g. ``[[L + k]]``. A step of one position
        cannot be split along the sequence: with sequence parallelism (TP > 1) use full recomputation
        (predict/generation.py does)."""
        from megatron.core import tensor_parallel

        decoder_input = self.embedding(ids, types, position_ids, visual) if self.pre_process else None
        padding_mask = types if self.routes_by_type else None
        if padding_mask is not None and self.config.sequence_parallel:
            # Our MoE layer accepts [b, S] or this rank's [b, S / tp]; give it the chunk, as GPTModel does.
            padding_mask = tensor_parallel.scatter_to_sequence_parallel_region(types.t().contiguous()).t().contiguous()
        if inference_context is not None and self.config.sequence_parallel:
            raise ValueError(
                "TimeExpertModel.forward: a KV cache (inference_context) needs sequence_parallel off "
                "(an incremental step of one position cannot be split over the TP group)"
            )
        hidden = self.decoder(
            hidden_states=decoder_input,
            attention_mask=attention_mask,
            padding_mask=padding_mask,
            inference_context=inference_context,
        )
        if not self.post_process:
            return hidden
        if labels is None:
            return self._full_sequence(hidden).transpose(0, 1).contiguous()
        if label_types is None:
            raise ValueError("TimeExpertModel.forward: labels need label_types (the type of each target)")
        text_logits = self.text_head(hidden)
        full = self._full_sequence(hidden)
        frame_logits = None
        if self.frame_head is not None and frame_targets is not None:
            frame_logits = self.frame_head(full)
        else:
            frame_targets = None
        return per_head_loss(
            text_logits,
            self.time_head(full),
            self.score_head(full),
            labels,
            label_types,
            loss_mask,
            frame_logits,
            frame_targets,
        )

    def _full_sequence(self, hidden: Tensor) -> Tensor:
        """``[s/tp, b, h] -> [s, b, h]`` under sequence parallelism (all-gather; the backward takes this
        rank's chunk of the gradient, which is complete because the consumers are replicated)."""
        from megatron.core import tensor_parallel

        if not self.config.sequence_parallel:
            return hidden
        return tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)

    def logits_for_generation(self, hidden: Tensor, head: Head | int) -> Tensor:
        """Logits of ``head`` for final hidden states ``[..., h]`` (as ``forward`` returns them without
        labels, e.g. the last position's ``[b, h]``): ``[..., text_vocab_size]`` for TEXT (gathered
        over TP), ``[..., 13]`` for TIME and SCORE. Last stage only."""
        if not self.post_process:
            raise RuntimeError("TimeExpertModel.logits_for_generation: only the last pipeline stage has the heads")
        head = Head(int(head))
        if head == Head.TEXT:
            return self.text_head.gathered_logits(hidden)
        return (self.time_head if head == Head.TIME else self.score_head)(hidden)


def _encoder_or_decoder():
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


def build_timeexpert_model(cfg: Config, mcfg: TimeExpertModelConfig | None = None) -> list[TimeExpertModel]:
    """This rank's TimeExpert chunks (one per virtual pipeline stage) for the initialised layout."""
    mcfg = mcfg or TimeExpertModelConfig.from_config(cfg)

    def make(tconfig, vp_stage, pre_process, post_process):
        spec = block_spec(cfg, tconfig, vp_stage)
        return TimeExpertModel(
            tconfig, mcfg, spec, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage
        )

    chunks = model_chunks(cfg, make)
    if torch.distributed.get_rank() == 0:
        log.info(
            "TimeExpert model: %d layers, hidden %d, text vocab %d (padded %d), %d experts (router %s), backend %s",
            cfg.model.num_layers,
            cfg.model.hidden_size,
            mcfg.text_vocab_size,
            chunks[0].padded_vocab,
            cfg.moe.num_experts,
            cfg.moe.router,
            layer_backend(),
        )
    return chunks
