"""Structured event generation with the TimeExpert decoder: head switching, grammar masks, KV cache.

One call of :func:`generate` continues a batch of prompts of EQUAL length ``L`` (the caller groups
samples by prompt length, :func:`length_buckets`; so there is no padding, no attention mask and a
row never sees another row). At every step each row's grammar state (data/events.py
:class:`~megatron_timeexpert.data.events.ResponseGrammar`) says which type comes next; the row takes
the logits of THAT head only (``TimeExpertModel.logits_for_generation``; the other two heads are
never evaluated for it), sets every id the grammar does not allow to ``-inf``, and picks greedily
(``temperature == 0``) or samples with temperature / top-p from the row's own seeded generator.
The chosen id is fed back with its type. A row stops at TEXT EOS; a row that reaches
``max_new_tokens`` (or the model's ``max_sequence_length``) without EOS is returned unfinished (the
caller counts it as malformed: ``no_closing_sync`` when cut inside a number section, else
``no_eos``). The model must be in eval mode (megatron turns the causal mask off for cached steps
only outside training).

Two ways to run the decoder, with the same tokens (a test checks it):

- ``use_cache=True``: megatron's ``StaticInferenceContext`` (KV cache) goes through the
  ``TransformerBlock``: the prompt once (prefill, the vision tokens included), then one position per
  step with its absolute position id ``L + k``. Needs sequence parallelism off (one position cannot
  be split over TP ranks), i.e. TP = 1.
- ``use_cache=False``: every step recomputes the whole sequence (prompt + generated), right-padded
  to a multiple of the TP size (causal attention: padding never reaches the real positions). Works
  at any TP, with sequence parallelism.

Several processes (TP, EP, or replicas): every rank runs the same batch; the chosen ids are
broadcast from global rank 0 every step, so all ranks feed the same tokens and stop together, even
where their logits differ in the last bits. Pipeline parallelism is not supported (load the
checkpoint at PP = 1; checkpoints re-layout on load).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from megatron_timeexpert.data.events import GrammarState, ResponseGrammar
from megatron_timeexpert.model.heads import Head
from megatron_timeexpert.moe.types import TokenType

HEAD_OF = {TokenType.TEXT: Head.TEXT, TokenType.TIME: Head.TIME, TokenType.SCORE: Head.SCORE}
"""The head that predicts a position of each response type."""


@dataclass
class GenerationConfig:
    """How :func:`generate` picks tokens."""

    max_new_tokens: int = 256
    """Response positions generated at most per sample (EOS included); a sample that reaches it
    without EOS is unfinished (malformed: ``no_eos``)."""
    temperature: float = 0.0
    """0 = greedy (argmax of the allowed ids); > 0 = sample from ``softmax(logits / temperature)``."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of allowed ids whose probability reaches ``top_p``
    (only with ``temperature > 0``)."""
    seed: int = 0
    """Base seed of the per-row sampling generators (only with ``temperature > 0``; see :func:`generate`)."""
    use_cache: bool = True
    """KV cache through megatron's ``StaticInferenceContext`` (TP = 1); False = recompute every step."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationConfig.max_new_tokens: {self.max_new_tokens} < 1")
        if self.temperature < 0:
            raise ValueError(f"GenerationConfig.temperature: {self.temperature} < 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p: {self.top_p} is not in (0, 1]")


@dataclass
class Generated:
    """One sample's response as generated."""

    ids: list[int] = field(default_factory=list)
    """Response ids, EOS included when reached."""
    types: list[int] = field(default_factory=list)
    """The :class:`TokenType` of each id (the head that produced it)."""
    finished: bool = False
    """Whether TEXT EOS was generated (False: the length limit came first)."""


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of equal prompt length, at most ``batch_size`` each, in order of
    length then index (deterministic; every index exactly once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} < 1")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < batch_size and lengths[out[-1][0]] == lengths[i]:
            out[-1].append(i)
        else:
            out.append([i])
    return out


class _Masks:
    """Allowed-id masks per grammar state (computed once per distinct state)."""

    def __init__(self, grammar: ResponseGrammar, device: torch.device) -> None:
        self.grammar = grammar
        self.device = device
        self._cache: dict[GrammarState, Tensor] = {}

    def __call__(self, state: GrammarState) -> Tensor:
        m = self._cache.get(state)
        if m is None:
            m = torch.tensor(self.grammar.allowed_mask(state), dtype=torch.bool, device=self.device)
            self._cache[state] = m
        return m


def _pick(logits: Tensor, mask: Tensor, gcfg: GenerationConfig, gens: Sequence[torch.Generator] | None) -> Tensor:
    """Ids chosen from ``logits [n, V]`` among ``mask [n, V]``: greedy, or sampled with row ``r``'s own
    generator ``gens[r]`` (so a row's draws do not depend on which rows share its batch)."""
    logits = logits.float().masked_fill(~mask, float("-inf"))
    if gcfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / gcfg.temperature, dim=-1)
    if gcfg.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # probability of the ids ranked above
        sorted_p = sorted_p.masked_fill(before >= gcfg.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    probs = probs.cpu()
    picked = [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)]
    return torch.cat(picked).to(logits.device)


def _sync_ids(ids: Tensor) -> Tensor:
    """Rank 0's ids on every rank (a no-op in one process)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ids
    from parallel.env import collective_device

    t = ids.to(collective_device())
    dist.broadcast(t, src=0)
    return t.to(ids.device)


def _tp_size(model) -> int:
    return int(getattr(model.config, "tensor_model_parallel_size", 1) or 1)


@torch.no_grad()
def generate(
    model,
    ids: Tensor,
    types: Tensor,
    visual: Tensor | None,
    grammar: ResponseGrammar,
    gcfg: GenerationConfig | None = None,
    pad_id: int = 0,
    row_seeds: Sequence[int] | None = None,
) -> list[Generated]:
    """Continue the prompts ``ids, types [b, L]`` (equal lengths) with ``model`` (a
    :class:`~megatron_timeexpert.model.timeexpert.TimeExpertModel` holding the first and last stage)
    and the vision tokens ``visual [b, n_vis, h]`` of their VISUAL positions. See the module docstring.

    Sampling (``temperature > 0``): row ``r`` draws from its own generator seeded with
    ``gcfg.seed + row_seeds[r]`` (default ``r``); give each sample a stable number (its index in the
    data set) and its tokens do not depend on the batching."""
    gcfg = gcfg or GenerationConfig()
    if model.training:
        raise ValueError("generate: call model.eval() first (dropout, and megatron's cached attention)")
    if not (model.pre_process and model.post_process):
        raise ValueError("generate: the model must hold the whole decoder (pipeline parallel size 1)")
    if ids.shape != types.shape or ids.dim() != 2:
        raise ValueError(f"generate: ids {tuple(ids.shape)} and types {tuple(types.shape)} must be [b, L]")
    b, prompt_len = ids.shape
    device = ids.device
    max_len = model.mcfg.max_sequence_length
    if prompt_len >= max_len:
        raise ValueError(
            f"generate: prompts of {prompt_len} positions leave no room in max_sequence_length {max_len} "
            "(model.seq_length)"
        )
    budget = min(gcfg.max_new_tokens, max_len - prompt_len)
    if gcfg.use_cache and model.config.sequence_parallel:
        raise ValueError("generate: use_cache=True needs TP = 1 (sequence parallelism off); use use_cache=False")
    masks = _Masks(grammar, device)
    seeds = list(range(b)) if row_seeds is None else [int(x) for x in row_seeds]
    if len(seeds) != b:
        raise ValueError(f"generate: {len(seeds)} row_seeds for {b} prompts")
    gens = [torch.Generator().manual_seed(gcfg.seed + x) for x in seeds] if gcfg.temperature > 0 else None
    states = [grammar.initial() for _ in range(b)]
    out = [Generated() for _ in range(b)]
    seq_ids, seq_types = ids, types
    ctx = None
    if gcfg.use_cache:
        from megatron.core.inference.contexts import StaticInferenceContext

        ctx = StaticInferenceContext(b, prompt_len + budget)
        _allocate_cache(model, ctx, device)
        positions = torch.arange(prompt_len, device=device).expand(b, -1)
        hidden = model(ids, types, positions, None, visual=visual, inference_context=ctx)[:, -1]
        ctx.increment_sequence_len_offset(prompt_len)
        ctx.enable_decode_mode()
    else:
        hidden = _recompute_last(model, ids, types, visual, pad_id)
    for step in range(budget):
        new_ids = torch.full((b,), pad_id, dtype=torch.long, device=device)
        new_types = torch.full((b,), int(TokenType.TEXT), dtype=torch.long, device=device)
        live = [i for i in range(b) if states[i].next_type is not None]
        for head in (TokenType.TEXT, TokenType.TIME, TokenType.SCORE):
            rows = [i for i in live if states[i].next_type is head]
            if not rows:
                continue
            logits = model.logits_for_generation(hidden[rows], HEAD_OF[head])
            mask = torch.stack([masks(states[i]) for i in rows])
            new_ids[rows] = _pick(logits, mask, gcfg, [gens[i] for i in rows] if gens else None)
            new_types[rows] = int(head)
        new_ids = _sync_ids(new_ids)
        for i in live:
            token = int(new_ids[i])
            t = int(new_types[i])
            states[i] = grammar.step(states[i], t, token)
            out[i].ids.append(token)
            out[i].types.append(t)
            out[i].finished = states[i].next_type is None
        if all(s.next_type is None for s in states) or step == budget - 1:
            break
        pos = prompt_len + step
        if ctx is not None:
            positions = torch.full((b, 1), pos, dtype=torch.long, device=device)
            hidden = model(new_ids[:, None], new_types[:, None], positions, None, inference_context=ctx)[:, -1]
            ctx.increment_sequence_len_offset(1)
        else:
            seq_ids = torch.cat([seq_ids, new_ids[:, None]], dim=1)
            seq_types = torch.cat([seq_types, new_types[:, None]], dim=1)
            hidden = _recompute_last(model, seq_ids, seq_types, visual, pad_id)
    return out


def _allocate_cache(model, ctx, device: torch.device) -> None:
    """Fill ``ctx.key_value_memory_dict`` with each attention layer's key/value buffers on ``device``
    (the layout megatron's ``Attention._allocate_memory`` uses: ``[max_seq, max_batch, groups, dim]``),
    which megatron would otherwise allocate on the current CUDA device (there is none on CPU)."""
    for layer in model.decoder.layers:
        attn = layer.self_attention
        dtype = next(attn.parameters()).dtype
        shape = (ctx.max_sequence_length, ctx.max_batch_size, attn.num_query_groups_per_partition)
        ctx.key_value_memory_dict[attn.layer_number] = (
            torch.empty(*shape, attn.key_hidden_size, dtype=dtype, device=device),
            torch.empty(*shape, attn.val_hidden_size, dtype=dtype, device=device),
        )


def _recompute_last(model, ids: Tensor, types: Tensor, visual: Tensor | None, pad_id: int) -> Tensor:
    """Final hidden state ``[b, h]`` of the last position, recomputing the whole sequence (padded on
    the right to a multiple of the TP size; causal attention keeps the padding out of it)."""
    b, n = ids.shape
    tp = _tp_size(model)
    extra = (-n) % tp if model.config.sequence_parallel else 0
    if extra:
        ids = torch.cat([ids, torch.full((b, extra), pad_id, dtype=ids.dtype, device=ids.device)], dim=1)
        types = torch.cat([types, torch.full((b, extra), int(TokenType.TEXT), dtype=types.dtype, device=ids.device)], 1)
    # The padding's positions are clamped to the embedding's range (they never reach position n - 1).
    positions = torch.arange(ids.shape[1], device=ids.device).clamp(max=model.mcfg.max_sequence_length - 1)
    positions = positions.expand(b, -1)
    return model(ids, types, positions, None, visual=visual)[:, n - 1]
