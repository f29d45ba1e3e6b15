"""Deterministic, learnable synthetic token data for pretraining before the video path exists.

Sample ``i`` is a pure function of ``(seed, i)``: an arithmetic progression modulo the vocabulary
with a stride drawn from a few values, so a model can learn to predict the next token and the
loss visibly falls. The global batch of step ``k`` is samples ``[k*G, (k+1)*G)``; data-parallel
rank ``r`` of ``dp`` takes the contiguous ``G/dp`` block ``r`` and cuts it into microbatches.
Position in the stream is just the number of consumed samples, which checkpoints store.

Token types (for the TimeExpert router's per-type statistics) are a fixed function of the token id:
the vocabulary is cut into four equal ranges, visual | text | time | score, in the order of
:class:`~megatron_timeexpert.moe.types.TokenType`. They are given ``[b, s]``, like the tokens (the trainer
passes them to the model as megatron's per-token ``padding_mask``; see train/pretrain.py). No communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_timeexpert.moe.types import NUM_TOKEN_TYPES

STRIDES = (1, 2, 3, 5)


def sample(seed: int, index: int, seq_length: int, vocab_size: int) -> torch.Tensor:
    """Tokens ``[seq_length + 1]`` of sample ``index`` (inputs are [:-1], labels [1:])."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    start = int(torch.randint(0, vocab_size, (1,), generator=g))
    stride = STRIDES[int(torch.randint(0, len(STRIDES), (1,), generator=g))]
    return (start + stride * torch.arange(seq_length + 1)) % vocab_size


def token_types(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Type of each token id: four equal vocabulary ranges, visual/text/time/score (0..3)."""
    return (tokens * NUM_TOKEN_TYPES) // vocab_size


@dataclass
class SyntheticTokens:
    """The microbatches of one step for one data-parallel rank."""

    seed: int
    seq_length: int
    vocab_size: int
    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    def microbatches(self, consumed_samples: int) -> list[dict[str, torch.Tensor]]:
        """Microbatches (tokens, labels, position_ids) of the step starting at ``consumed_samples``."""
        per_rank = self.global_batch_size // self.dp_size
        first = consumed_samples + self.dp_rank * per_rank
        rows = torch.stack([sample(self.seed, first + j, self.seq_length, self.vocab_size) for j in range(per_rank)])
        out = []
        for mb in rows.split(self.micro_batch_size):
            out.append(
                {
                    "tokens": mb[:, :-1].contiguous(),
                    "labels": mb[:, 1:].contiguous(),
                    "position_ids": torch.arange(self.seq_length).unsqueeze(0).expand(mb.shape[0], -1).contiguous(),
                    "token_type": token_types(mb[:, :-1], self.vocab_size),
                }
            )
        return out
