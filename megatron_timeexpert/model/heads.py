"""Time/score encoders and the three output heads of the TimeExpert model, and its per-head loss.

Token contract (/work/notes/tokens.md): TIME and SCORE positions carry ids of the number vocabulary
``["<sync>", "<sep>", "0".."9", "."]`` (:data:`NUM_VOCAB_SIZE` = 13 ids, the same ids for both
types) with SEPARATE embeddings (:func:`number_embedding`) and SEPARATE heads (:class:`NumberHead`);
TEXT positions use the TP-sharded text vocabulary (:class:`TextHead`). The head that predicts a
position is the head of its TARGET's type (:func:`head_of_type`): VISUAL targets are never
predicted.

Who owns what under tensor parallelism (TP) with sequence parallelism:

- :class:`TextHead` is megatron's ``ColumnParallelLinear``: each TP rank holds a slice of the
  (padded) vocabulary; with sequence parallelism it all-gathers its input along the sequence in
  forward and reduce-scatters the input gradient in backward. The loss is megatron's
  ``vocab_parallel_cross_entropy`` (two all-reduces over the TP group of ``[s, b]`` floats).
- :class:`NumberHead` and the number embeddings are REPLICATED on every TP rank and see the WHOLE
  sequence on every rank (the heads read hidden states all-gathered with a split backward, the
  embeddings are scattered after they are computed), so their gradients are already complete and
  identical on every TP rank: they are NOT tagged ``sequence_parallel`` (megatron's
  ``finalize_model_grads`` would then sum them over TP and double them), exactly like megatron's
  own position embeddings. Megatron's grad norm counts them once (``param_is_not_tensor_parallel_duplicate``:
  TP rank 0 only).

- :class:`FrameHead` (only with ``model.frame_loss_weight > 0``, our addition) is replicated in the
  same way: ``h -> 1`` relevance logit per position, read at each frame's last position.

The loss tensor (:func:`per_head_loss`) is ``[b, s, 4]`` float: ``[..., 0]`` the masked per-token
loss, ``[..., 1]`` the :class:`Head` id that produced it (``-1``: the position does not count),
``[..., 2]`` the frame head's binary cross entropy at a frame position (0 elsewhere) and ``[..., 3]``
1 where a frame target counts. A position can carry both a token loss and a frame loss (the last frame's
last position predicts the first answer token when the query comes first). The schedule's ``loss_func``
(:func:`timeexpert_loss_func`) turns it into megatron's per-token ``(loss_sum, num_tokens, report)``
with one ``[sum, count]`` entry per head; the frame term joins ``loss_sum`` times its weight but not
``num_tokens`` (megatron divides by the LOSS TOKENS of the global batch, so the objective is
``(sum of token losses + w * sum of frame losses) / loss tokens``).
"""

from __future__ import annotations

from enum import IntEnum

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import nn

from megatron_timeexpert.moe.types import TokenType

NUM_VOCAB_SIZE = 13
"""Ids of the number vocabulary shared by TIME and SCORE tokens (tokens.md): <sync>=0, <sep>=1,
digit d = 2 + d, "." = 12."""

PADDED_LOGIT = -1.0e9
"""Logit of the padded text-vocabulary entries (never predicted, no gradient)."""


class Head(IntEnum):
    """Output heads; the value is the head id in the loss tensor's second channel."""

    TEXT = 0
    TIME = 1
    SCORE = 2


HEAD_NAMES = {Head.TEXT: "text loss", Head.TIME: "time loss", Head.SCORE: "score loss"}
"""Report keys of the per-head losses (``timeexpert_loss_func``)."""
FRAME_LOSS = "frame loss"
"""Report key of the frame head's loss: ``[sum of binary cross entropies, frames]`` (unweighted)."""


def head_of_type(types: torch.Tensor) -> torch.Tensor:
    """Head id of each position whose TARGET has token type ``types`` (long, same shape); -1 for VISUAL."""
    head = torch.full_like(types, -1)
    head = torch.where(types == TokenType.TEXT, int(Head.TEXT), head)
    head = torch.where(types == TokenType.TIME, int(Head.TIME), head)
    return torch.where(types == TokenType.SCORE, int(Head.SCORE), head)


def number_embedding(config, num_embeddings: int = NUM_VOCAB_SIZE) -> nn.Embedding:
    """A replicated ``[13, h]`` embedding (time or score encoder), initialised like megatron's embeddings."""
    emb = nn.Embedding(num_embeddings, config.hidden_size, dtype=config.params_dtype)
    if config.perform_initialization:
        config.embedding_init_method(emb.weight)
    return emb


class NumberHead(nn.Module):
    """``[..., h] -> [..., 13]`` logits of the time or score head: one replicated linear, no bias."""

    def __init__(self, config, num_classes: int = NUM_VOCAB_SIZE):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, config.hidden_size, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


class FrameHead(nn.Module):
    """``[..., h] -> [...]`` per-position relevance logit of the frame head: one replicated linear with a
    bias (initialised to 0: the frame loss starts at log 2 for every frame)."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, config.hidden_size, dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(1, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias).squeeze(-1)


def padded_vocab_size(vocab_size: int, multiple: int, tp: int) -> int:
    """Rows of the text embedding / head: ``vocab_size`` rounded up to a multiple of ``multiple``
    (independent of the layout, so weights and losses do not change with TP); that must split
    evenly over ``tp`` ranks."""
    padded = -(-vocab_size // multiple) * multiple
    if padded % tp:
        raise ValueError(
            f"TimeExpertModelConfig.vocab_pad_multiple={multiple}: the padded text vocabulary {padded} "
            f"(from model.vocab_size={vocab_size}) must be divisible by parallel.tp={tp}"
        )
    return padded


class TextHead(MegatronModule):
    """The text head: megatron's vocab-parallel ``ColumnParallelLinear`` over the padded vocabulary;
    the padded entries get :data:`PADDED_LOGIT` so the model is exactly one over ``vocab_size`` ids.
    A ``MegatronModule``, so distributed checkpoints store its weight as TP-sharded."""

    def __init__(self, config, vocab_size: int, padded_size: int, tp_group=None):
        super().__init__(config=config)
        from megatron.core import tensor_parallel

        self.vocab_size = vocab_size
        self.padded_size = padded_size
        self.linear = tensor_parallel.ColumnParallelLinear(
            config.hidden_size,
            padded_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            skip_bias_add=False,
            gather_output=False,
            tp_group=tp_group,
        )

    def _mask_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the padded vocabulary entries of this rank's logit shard ``[..., V_p / tp]``."""
        from megatron.core import parallel_state as ps

        if self.padded_size == self.vocab_size:
            return logits
        part = logits.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * part
        padded = torch.arange(start, start + part, device=logits.device) >= self.vocab_size
        return logits.masked_fill(padded, PADDED_LOGIT)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[s(/tp), b, h]`` (sequence-parallel chunk under SP) -> this rank's logit shard ``[s, b, V_p / tp]``."""
        logits, _ = self.linear(hidden)
        return self._mask_padding(logits)

    def gathered_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., h]`` full (not sequence-parallel) hidden states -> ``[..., vocab_size]`` logits over
        the whole text vocabulary (all-gather of the shards over the TP group)."""
        from megatron.core import tensor_parallel

        local = self._mask_padding(F.linear(hidden, self.linear.weight))
        full = tensor_parallel.gather_from_tensor_model_parallel_region(local)
        return full[..., : self.vocab_size]


def per_head_loss(
    text_logits: torch.Tensor,
    time_logits: torch.Tensor,
    score_logits: torch.Tensor,
    labels: torch.Tensor,
    label_types: torch.Tensor,
    loss_mask: torch.Tensor | None,
    frame_logits: torch.Tensor | None = None,
    frame_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``[b, s, 4]`` loss tensor (module docstring) of one microbatch.

    ``text_logits [s, b, V_p / tp]`` (this rank's vocabulary shard), ``time_logits`` and
    ``score_logits [s, b, 13]`` (whole sequence), ``labels``/``label_types``/``loss_mask [b, s]``:
    the id and type of the token each position predicts, and whether it counts (None: every
    non-VISUAL target counts). Each position's loss is the cross entropy of the head of its
    target's type; the other heads' losses at that position are computed and discarded (no gradient).
    ``frame_logits [s, b]`` (whole sequence) and ``frame_targets [b, s]`` (0/1 at frame positions, -1
    elsewhere; NOT shifted): the frame head's binary cross entropy where the target is >= 0; both None:
    no frame loss (zeros).
    """
    from megatron.core import tensor_parallel

    head = head_of_type(label_types)
    if loss_mask is not None:
        head = torch.where(loss_mask.bool(), head, -1)
    lab = labels.t()  # [s, b]
    h = head.t()
    text_ids = torch.where(h == Head.TEXT, lab, 0)
    text = tensor_parallel.vocab_parallel_cross_entropy(text_logits.float(), text_ids.contiguous())
    time = F.cross_entropy(
        time_logits.float().flatten(0, 1), torch.where(h == Head.TIME, lab, 0).flatten(), reduction="none"
    ).view_as(lab)
    score = F.cross_entropy(
        score_logits.float().flatten(0, 1), torch.where(h == Head.SCORE, lab, 0).flatten(), reduction="none"
    ).view_as(lab)
    zero = torch.zeros_like(text)
    loss = torch.where(
        h == Head.TEXT, text, torch.where(h == Head.TIME, time, torch.where(h == Head.SCORE, score, zero))
    ).t()
    frame, counted = torch.zeros_like(loss), torch.zeros_like(loss)
    if (frame_logits is None) != (frame_targets is None):
        raise ValueError("per_head_loss: frame_logits and frame_targets go together")
    if frame_logits is not None:
        if frame_targets.shape != labels.shape:
            raise ValueError(f"per_head_loss: frame_targets {tuple(frame_targets.shape)} must be [b, s] like labels")
        target = frame_targets.to(loss.dtype)
        counted = (target >= 0).to(loss.dtype)
        bce = F.binary_cross_entropy_with_logits(frame_logits.t().float(), target.clamp(min=0.0), reduction="none")
        frame = bce * counted
    return torch.stack([loss, head.to(loss.dtype), frame, counted], dim=-1).contiguous()


def head_sums(output: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[sum, count]`` (float, detached) of the counted token losses of each head in a loss tensor, and
    of the frame losses (:data:`FRAME_LOSS`, unweighted)."""
    loss, head = output[..., 0].detach().float(), output[..., 1]
    out = {}
    for h, name in HEAD_NAMES.items():
        sel = head == h
        out[name] = torch.stack([loss[sel].sum(), sel.sum().to(loss.dtype)])
    out[FRAME_LOSS] = torch.stack([output[..., 2].detach().float().sum(), output[..., 3].detach().float().sum()])
    return out


def timeexpert_loss_func(output: torch.Tensor, frame_weight: float = 0.0):
    """megatron's ``loss_func`` for the ``[b, s, 4]`` loss tensor with ``calculate_per_token_loss``:
    ``(loss_sum, num_tokens, report)``. ``loss_sum`` = the token losses plus ``frame_weight`` times the
    frame losses; ``num_tokens`` counts the token losses only. ``report`` holds ``"lm loss"`` (that
    objective over the loss tokens) and one ``"<head> loss"`` entry per head plus ``"frame loss"``, each
    ``[sum, count]``, so the trainer can report one loss per head (bind ``frame_weight`` with
    ``functools.partial``)."""
    loss, head = output[..., 0].float(), output[..., 1]
    counted = head >= 0
    loss_sum = loss.sum()
    if frame_weight:
        loss_sum = loss_sum + frame_weight * output[..., 2].float().sum()
    num_tokens = counted.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()]), **head_sums(output)}
    return loss_sum, num_tokens, report
