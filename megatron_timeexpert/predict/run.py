"""Predict for a data set: samples -> prompts -> batched generation -> parsed events -> prediction records.

:func:`predict_prompts` is the part the command and the tests share: it takes prompts (tokenized
samples plus their vision tokens), groups them by prompt length (generation.py), generates, parses
every response (data/events.py ``parse_response``) and returns one :class:`Outcome` per prompt,
IN INPUT ORDER, malformed ones included (their ``events`` are empty and ``reason`` says why:
a code of data/events.py ``REASONS``, ``no_eos`` when the length limit came first). Nothing is
dropped: :func:`records_for_task` turns every outcome into a prediction record, an empty one for a
malformed generation or an undecodable video.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from megatron_timeexpert.data import events as E
from megatron_timeexpert.predict import outputs as O
from megatron_timeexpert.predict.generation import Generated, GenerationConfig, generate, length_buckets

BAD_VIDEO = "bad_video"
"""Reason of an empty prediction whose video could not be decoded (counted apart from malformed output)."""


@dataclass
class Prompt:
    """One prompt to continue."""

    key: str
    """Identifies the prompt in the outcome (e.g. the sample id)."""
    ids: Tensor
    """long ``[L]``: the prompt (data/vtg.py ``tokenize_sample(..., with_response=False)``)."""
    types: Tensor
    """long ``[L]``: the token types."""
    visual: Tensor | None
    """``[n_vis, h]``: the vision tokens of its VISUAL positions (frame-major), or None."""


@dataclass
class Outcome:
    """What generation gave for one prompt."""

    key: str
    """The prompt's key."""
    generated: Generated | None
    """Raw ids/types (None: not generated, e.g. a bad video)."""
    events: tuple[E.Event, ...] = ()
    """Parsed events; empty when the generation is malformed."""
    reason: str | None = None
    """None = well formed; else the malformation code (or :data:`BAD_VIDEO`)."""


@dataclass
class PredictStats:
    """Counts for the summary line."""

    samples: int = 0
    """Prompts handled (every one gets a prediction)."""
    malformed: Counter = field(default_factory=Counter)
    """Malformed generations by reason (and undecodable videos as ``bad_video``)."""
    tokens: int = 0
    """Response tokens generated."""
    seconds: float = 0.0
    """Wall time spent generating."""

    def line(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.malformed.items())) or "none"
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{self.samples} samples, {sum(self.malformed.values())} empty predictions ({reasons}), "
            f"{self.tokens} tokens in {self.seconds:.1f}s ({rate:.1f} tokens/s)"
        )


def outcome_of(key: str, gen: Generated, text: E.TextVocab, numbers: E.NumberFormat = E.TRACE_NUMBERS) -> Outcome:
    """Parse one generation (times in ``numbers``' format); malformed (any problem, or no EOS) -> no
    events and the first reason."""
    parsed = E.parse_response(gen.ids, gen.types, text, numbers)
    reason = parsed.reason
    if reason is None and not gen.finished:
        reason = E.NO_EOS
    return Outcome(key, gen, () if reason else parsed.events, reason)


def predict_prompts(
    model,
    prompts: Sequence[Prompt],
    text: E.TextVocab,
    gcfg: GenerationConfig,
    batch_size: int,
    stats: PredictStats | None = None,
    progress: Callable[[int], None] | None = None,
    index_offset: int = 0,
    numbers: E.NumberFormat = E.TRACE_NUMBERS,
) -> list[Outcome]:
    """Generate for every prompt (batches of equal prompt length) and parse; outcomes in input order.
    Sampling seeds are per prompt (``gcfg.seed`` + ``index_offset`` + its index here), so batching
    (and chunking, with the offset) changes no token. Times are written in ``numbers``' format (the
    training data's, ``data.time_digits``)."""
    grammar = E.ResponseGrammar.for_vocab(text, numbers)
    out: list[Outcome | None] = [None] * len(prompts)
    device = next(model.parameters()).device
    for bucket in length_buckets([int(p.ids.numel()) for p in prompts], batch_size):
        ps = [prompts[i] for i in bucket]
        ids = torch.stack([p.ids for p in ps]).to(device)
        types = torch.stack([p.types for p in ps]).to(device)
        visual = None
        if any(p.visual is not None for p in ps):
            n = max(p.visual.shape[0] for p in ps if p.visual is not None)
            h = next(p.visual for p in ps if p.visual is not None).shape[-1]
            visual = torch.zeros(len(ps), n, h, dtype=next(model.parameters()).dtype, device=device)
            for j, p in enumerate(ps):
                if p.visual is not None:
                    visual[j, : p.visual.shape[0]] = p.visual.to(visual.dtype)
        t0 = time.perf_counter()
        gens = generate(
            model, ids, types, visual, grammar, gcfg, pad_id=text.pad_id, row_seeds=[index_offset + i for i in bucket]
        )
        if stats is not None:
            stats.seconds += time.perf_counter() - t0
        for i, g in zip(bucket, gens):
            out[i] = outcome_of(prompts[i].key, g, text, numbers)
            if stats is not None:
                stats.samples += 1
                stats.tokens += len(g.ids)
                if out[i].reason:
                    stats.malformed[out[i].reason] += 1
        if progress is not None:
            progress(len(bucket))
    return out  # type: ignore[return-value]


# ---- prediction records per task ------------------------------------------------------------------


@dataclass
class Query:
    """One query of the data set and where its prediction comes from."""

    vid: str
    """Video id (file stem)."""
    query: str
    """The query sentence (moment retrieval / highlights) or instruction (dense captioning)."""
    qid: str | None = None
    """QVHighlights query id."""
    duration: float = 0.0
    """Video duration in seconds (for the saliency clips)."""
    mr: Outcome | None = None
    """The moment-retrieval (or dense-captioning) generation."""
    hd: Outcome | None = None
    """QVHighlights: the highlight-detection generation."""


def moment_record(q: Query) -> dict:
    """``{"vid", "query", ("qid"), "pred_windows"}`` (write_moment_predictions)."""
    rec = {"vid": q.vid, "query": q.query, "pred_windows": O.moment_windows(q.mr.events if q.mr else ())}
    if q.qid is not None:
        rec["qid"] = q.qid
    return rec


def qvhighlights_record(q: Query) -> dict:
    """moment_detr's line: windows from the moment generation, saliency per 2 s clip from the highlight one."""
    return {
        "qid": q.qid,
        "query": q.query,
        "vid": q.vid,
        "pred_relevant_windows": O.moment_windows(q.mr.events if q.mr else ()),
        "pred_saliency_scores": O.saliency_per_clip(q.hd.events if q.hd else (), q.duration),
    }


def dense_records(queries: Sequence[Query]) -> dict[str, list[dict]]:
    """``{vid: [{"timestamp", "caption"}]}`` (write_dense_predictions); a video appears even when empty."""
    out: dict[str, list[dict]] = {}
    for q in queries:
        out.setdefault(q.vid, []).extend(O.dense_events(q.mr.events if q.mr else ()))
    return out
