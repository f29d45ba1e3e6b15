"""VTG samples as TimeExpert token sequences: prompts per task, response events, tokenization, padding.

An annotation sample (:class:`~.types.VTGSample`, from the readers in :mod:`.annotations`) plus the
presentation times of its sampled frames (what the loader decoded; nothing here decodes video) becomes
one sequence (docs/EVENTS.md has the full layout)::

    [BOS] [instruction text] [video block] [response events] [EOS]      (SequenceConfig.query_first, default)
    [BOS] [video block] [instruction text] [response events] [EOS]      (query_first=False: TRACE's order)

* video block: per frame ``slots_per_frame`` VISUAL positions (id 0; the vision encoder's slot tokens go
  there, frame-major), then (``frame_time_tokens``) the frame's time as TIME tokens and TIME ``<sep>``;
  with the query first, every frame's positions can attend to the query (causal attention), so the
  model can mark the frames the query is about before it answers;
* instruction: :func:`instruction` (a template per task around the query; instruction-format data is
  used verbatim);
* response: :func:`response_events` -> :func:`~.events.encode_events`. Moment retrieval: one event per
  window, times ``(start, end)``, score = the window's saliency or ``moment_score`` (1.0), no caption.
  Highlight detection: ONE event, times = the CENTRES of the clips (``(start + end) / 2`` of each clip
  span, so a 2 s clip ``[2i, 2i + 2]`` is ``2i + 1``), scores = the mean saliency per clip. Dense
  captioning: one event per segment, times ``(start, end)``, no score, caption = the sentence.

``loss_mask[i] = 1`` marks position ``i`` as a TARGET: every response token and the final EOS (each
predicted from position ``i - 1`` by the head of ``types[i]``); BOS, video block, instruction and
padding are 0.

Per-frame relevance (our addition to the paper's recipe; docs/MODEL.md): ``frame_positions[k]`` is the
LAST position of frame ``k``'s block (its ``<sep>``, or its last VISUAL slot without time tokens), which
has seen the whole frame, and ``frame_relevance[k]`` is 1.0 when the frame's time lies inside one of the
sample's target events (:func:`frame_relevance`), else 0.0. The model's frame head reads the hidden
state there (model/heads.py). A next-token trainer takes inputs ``ids[:-1]`` and targets ``ids[1:]`` with mask
``loss_mask[1:]``.

:func:`collate` right-pads to a fixed length (TEXT PAD, mask 0). A sample longer than that raises a
:class:`SequenceTooLong` naming it, or with ``overflow="drop_events"`` loses its LAST events (whole
events; EOS re-appended) until it fits, keeping at least one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import torch

from megatron_timeexpert.data import events as E
from megatron_timeexpert.data.types import Task, VTGSample
from megatron_timeexpert.moe.types import TokenType

PROMPTS = MappingProxyType(
    {
        Task.MOMENT_RETRIEVAL: "Find the start and end time of the moment that matches this query: {query}",
        Task.HIGHLIGHT_DETECTION: "Give a saliency score to every 2-second clip that matches this query: {query}",
        Task.DENSE_CAPTIONING: "{query}",
    }
)
"""Instruction templates per task (``{query}`` is the sample's query, whitespace collapsed)."""
DENSE_DEFAULT = "Localize every event in the video and describe it."
"""Instruction of a dense-captioning sample whose query is empty."""
OVERFLOW_POLICIES = ("error", "drop_events")


class SequenceTooLong(ValueError):
    """A sample does not fit the sequence length (the message names it and both lengths)."""


@dataclass
class SequenceConfig:
    """Layout choices of :func:`tokenize_sample` (the fixed parts are in docs/EVENTS.md)."""

    slots_per_frame: int = 8
    """VISUAL positions per frame (the slot-compressed tokens of one frame)."""
    moment_score: float = 1.0
    """Score of a moment-retrieval window whose data set gives none (Charades-STA, QVHighlights windows)."""
    query_first: bool = True
    """The instruction (with the query) comes BEFORE the video block, so that the frames can attend to it;
    False: after it (TRACE's order)."""
    frame_time_tokens: bool = True
    """Each frame's block ends with its time as TIME tokens and ``<sep>``; False: only its VISUAL slots
    (the time then reaches the model through the frame-time embedding, model/frame_tokens.py)."""
    time_digits: int = 4
    """Integer digits of every time (frame times and answers; data/events.py ``NumberFormat``): 4 is
    TRACE's ``0012.3``; 2 (``12.3``) drops two digits that are always 0 in videos under 100 s."""

    def __post_init__(self) -> None:
        if self.slots_per_frame < 1:
            raise ValueError(f"SequenceConfig.slots_per_frame: {self.slots_per_frame} < 1")
        if not math.isfinite(self.moment_score):
            raise ValueError(f"SequenceConfig.moment_score: {self.moment_score} is not finite")
        try:
            E.NumberFormat(self.time_digits)
        except ValueError as exc:
            raise ValueError(f"SequenceConfig.time_digits: {exc}") from None

    @property
    def numbers(self) -> E.NumberFormat:
        """The time format of the prompt's frame times and of the answers."""
        return E.NumberFormat(self.time_digits)

    @property
    def frame_length(self) -> int:
        """Positions of one frame's block."""
        return self.slots_per_frame + (self.numbers.time_width + 1 if self.frame_time_tokens else 0)

    def grammar(self, text: E.TextVocab) -> E.ResponseGrammar:
        """The response grammar of generation for this layout's number format."""
        return E.ResponseGrammar.for_vocab(text, self.numbers)


@dataclass(frozen=True)
class TokenizedSample:
    """One sample as the model's token sequence (all tensors 1-D, length ``S`` unless noted)."""

    sample_id: str
    """The annotation sample's id."""
    source: str
    """``file:line`` of its annotation (for error messages)."""
    task: Task
    """Its VTG task."""
    ids: torch.Tensor
    """long ``[S]``: id within the vocabulary of the position's type."""
    types: torch.Tensor
    """long ``[S]``: :class:`~megatron_timeexpert.moe.types.TokenType` per position."""
    loss_mask: torch.Tensor
    """float32 ``[S]``: 1 at target positions (response + EOS), else 0."""
    visual_positions: torch.Tensor
    """long ``[N * slots_per_frame]``: the VISUAL positions, frame by frame, slot by slot."""
    frame_times: torch.Tensor
    """float64 ``[N]``: presentation time in seconds of each frame (as given)."""
    response_start: int
    """Index of the first response position (== S for a prompt-only sample)."""
    event_starts: tuple[int, ...]
    """Index of each event's TEXT ``<sync>``."""
    frame_positions: torch.Tensor
    """long ``[N]``: the last position of each frame's block (where the frame head reads)."""
    frame_relevance: torch.Tensor
    """float32 ``[N]``: 1.0 where the frame lies inside a target event, 0.0 elsewhere; -1.0 for every frame
    of a sample without events (a query to predict for)."""

    @property
    def length(self) -> int:
        return int(self.ids.numel())

    @property
    def num_frames(self) -> int:
        return int(self.frame_times.numel())


@dataclass(frozen=True)
class Batch:
    """Samples padded to one length ``L`` (``B`` samples)."""

    ids: torch.Tensor
    """long ``[B, L]`` (TEXT PAD after each sample's end)."""
    types: torch.Tensor
    """long ``[B, L]`` (TEXT after each sample's end)."""
    loss_mask: torch.Tensor
    """float32 ``[B, L]`` (0 on padding)."""
    visual_positions: torch.Tensor
    """long ``[B, V]``: each sample's VISUAL positions, -1 after its own."""
    frame_times: torch.Tensor
    """float64 ``[B, N]``: frame times, 0 after each sample's ``num_frames``."""
    frame_targets: torch.Tensor
    """float32 ``[B, L]``: each frame's relevance (0.0 or 1.0) at its ``frame_positions`` entry, -1.0 (no
    target) everywhere else."""
    num_frames: torch.Tensor
    """long ``[B]``."""
    lengths: torch.Tensor
    """long ``[B]``: positions before the padding."""
    sample_ids: tuple[str, ...]
    """The samples' ids, in batch order."""
    dropped_events: tuple[int, ...]
    """Events each sample lost to ``overflow="drop_events"`` (0 when it fit)."""


# ---- prompts and responses ------------------------------------------------------------------------


def instruction(sample: VTGSample) -> str:
    """The instruction text of ``sample``: its task's template around the query (instruction data: verbatim)."""
    query = " ".join(sample.query.split())
    if sample.dataset == "instruction":
        return query
    if sample.task is Task.DENSE_CAPTIONING and not query:
        return DENSE_DEFAULT
    return PROMPTS[sample.task].format(query=query)


def response_events(sample: VTGSample, cfg: SequenceConfig | None = None) -> list[E.Event]:
    """The events ``sample``'s response encodes (see the module docstring for each task)."""
    cfg = cfg or SequenceConfig()
    evs = sample.events
    if sample.task is Task.MOMENT_RETRIEVAL:
        return [
            E.Event((ev.start, ev.end), (cfg.moment_score if ev.saliency is None else ev.saliency,), "") for ev in evs
        ]
    if sample.task is Task.HIGHLIGHT_DETECTION:
        if not evs:
            return []
        missing = [k for k, ev in enumerate(evs) if ev.saliency is None]
        if missing:
            raise ValueError(f"{sample.sample_id} ({sample.source}): highlight clips {missing[:5]} have no saliency")
        return [E.Event(tuple((ev.start + ev.end) / 2 for ev in evs), tuple(ev.saliency for ev in evs), "")]
    return [E.Event((ev.start, ev.end), (), ev.caption or "") for ev in evs]


def frame_relevance(sample: VTGSample, times: Sequence[float], tolerance: float = 1e-6) -> list[float]:
    """Per frame time: 1.0 when it lies inside one of ``sample``'s target events (``start <= t <= end``, as
    the synthetic generator draws them; a highlight clip counts when its saliency is above 0), else 0.0.
    A sample without events (a query to predict for) gets -1.0 (no target) for every frame."""
    spans = [(ev.start, ev.end) for ev in sample.events if ev.saliency is None or ev.saliency > 0]
    if not sample.events:
        return [-1.0] * len(times)
    return [1.0 if any(a - tolerance <= t <= b + tolerance for a, b in spans) else 0.0 for t in times]


# ---- tokenization ----------------------------------------------------------------------------------


def tokenize_sample(
    sample: VTGSample,
    frame_times: Sequence[float] | torch.Tensor,
    tokenizer: E.TextVocab,
    cfg: SequenceConfig | None = None,
    with_response: bool = True,
) -> TokenizedSample:
    """``sample`` with its frames' presentation times as one token sequence.

    ``with_response=False`` gives the prompt only (``[BOS] [video] [instruction]``, no EOS) for generation,
    e.g. of a query-only sample. ValueError naming the sample when it has no frames, a frame time is not
    finite or goes backwards, a text holds ``<sync>``, or a training sample has no target event.
    """
    cfg = cfg or SequenceConfig()
    who = f"{sample.sample_id} ({sample.source})"
    times = [float(t) for t in (frame_times.tolist() if hasattr(frame_times, "tolist") else frame_times)]
    if not times:
        raise ValueError(f"{who}: no frame times (a sample needs at least one frame)")
    for k, t in enumerate(times):
        if not math.isfinite(t):
            raise ValueError(f"{who}: frame {k} time is {t}")
        if k and t < times[k - 1]:
            raise ValueError(f"{who}: frame times go backwards at frame {k} ({times[k - 1]} -> {t})")
    numbers = cfg.numbers
    ids: list[int] = [tokenizer.bos_id]
    types: list[int] = [int(TokenType.TEXT)]
    visual: list[int] = []
    frame_ends: list[int] = []
    try:
        text_ids = tokenizer.encode(instruction(sample))
    except ValueError as exc:
        raise ValueError(f"{who}: instruction: {exc}") from None

    def put_text() -> None:
        ids.extend(text_ids)
        types.extend([int(TokenType.TEXT)] * len(text_ids))

    if cfg.query_first:
        put_text()
    for t in times:
        visual.extend(range(len(ids), len(ids) + cfg.slots_per_frame))
        ids += [0] * cfg.slots_per_frame
        types += [int(TokenType.VISUAL)] * cfg.slots_per_frame
        if cfg.frame_time_tokens:
            ids += [*numbers.time_ids(t), E.NUM_SEP]
            types += [int(TokenType.TIME)] * (numbers.time_width + 1)
        frame_ends.append(len(ids) - 1)
    if not cfg.query_first:
        put_text()
    response_start = len(ids)
    event_starts: list[int] = []
    if with_response:
        evs = response_events(sample, cfg)
        if not evs:
            raise ValueError(f"{who}: no target event to train on (tokenize it with with_response=False)")
        try:
            r_ids, r_types = E.encode_events(evs, tokenizer, numbers)
        except ValueError as exc:
            raise ValueError(f"{who}: {exc}") from None
        event_starts = [
            response_start + k
            for k, (x, t) in enumerate(zip(r_ids, r_types))
            if t == TokenType.TEXT and x == tokenizer.sync_id
        ]
        ids += r_ids
        types += r_types
    mask = torch.zeros(len(ids), dtype=torch.float32)
    mask[response_start:] = 1.0
    return TokenizedSample(
        sample.sample_id,
        sample.source,
        sample.task,
        torch.tensor(ids, dtype=torch.long),
        torch.tensor(types, dtype=torch.long),
        mask,
        torch.tensor(visual, dtype=torch.long),
        torch.tensor(times, dtype=torch.float64),
        response_start,
        tuple(event_starts),
        torch.tensor(frame_ends, dtype=torch.long),
        torch.tensor(frame_relevance(sample, times), dtype=torch.float32),
    )


def drop_events(sample: TokenizedSample, max_len: int, eos_id: int) -> tuple[TokenizedSample, int]:
    """``sample`` without its last events so that it fits ``max_len`` (EOS re-appended), and how many went.

    SequenceTooLong naming the sample when even its first event alone does not fit.
    """
    if sample.length <= max_len:
        return sample, 0
    keep = 0
    for k in range(1, len(sample.event_starts)):
        if sample.event_starts[k] + 1 <= max_len:  # events 0..k-1 plus EOS
            keep = k
    if keep == 0:
        raise SequenceTooLong(
            f"{sample.sample_id} ({sample.source}): {sample.length} positions do not fit {max_len}, and its "
            f"first event alone needs "
            f"{(sample.event_starts[1] if len(sample.event_starts) > 1 else sample.length - 1) + 1}"
        )
    cut = sample.event_starts[keep]
    ids = torch.cat([sample.ids[:cut], torch.tensor([eos_id], dtype=torch.long)])
    types = torch.cat([sample.types[:cut], torch.tensor([int(TokenType.TEXT)], dtype=torch.long)])
    mask = torch.cat([sample.loss_mask[:cut], torch.ones(1, dtype=torch.float32)])
    out = replace(sample, ids=ids, types=types, loss_mask=mask, event_starts=sample.event_starts[:keep])
    return out, len(sample.event_starts) - keep


def collate(
    samples: Sequence[TokenizedSample], seq_len: int, pad_id: int, eos_id: int | None = None, overflow: str = "error"
) -> Batch:
    """Right-pad ``samples`` to ``seq_len`` positions.

    ``overflow="error"``: a longer sample raises :class:`SequenceTooLong` naming it. ``"drop_events"``
    (needs ``eos_id``): it loses its last events until it fits (:func:`drop_events`).
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"collate: overflow {overflow!r} is not one of {OVERFLOW_POLICIES}")
    if overflow == "drop_events" and eos_id is None:
        raise ValueError("collate: overflow='drop_events' needs eos_id")
    if not samples:
        raise ValueError("collate: no sample")
    fitted, dropped = [], []
    for s in samples:
        if s.length > seq_len:
            if overflow == "error":
                raise SequenceTooLong(
                    f"{s.sample_id} ({s.source}): {s.length} positions ({s.num_frames} frames, "
                    f"{s.length - s.response_start} response) do not fit seq_len {seq_len}"
                )
            s, n = drop_events(s, seq_len, eos_id)
        else:
            n = 0
        fitted.append(s)
        dropped.append(n)
    b = len(fitted)
    ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    types = torch.full((b, seq_len), int(TokenType.TEXT), dtype=torch.long)
    mask = torch.zeros((b, seq_len), dtype=torch.float32)
    n_vis = max(s.visual_positions.numel() for s in fitted)
    n_frames = max(s.num_frames for s in fitted)
    visual = torch.full((b, n_vis), -1, dtype=torch.long)
    times = torch.zeros((b, n_frames), dtype=torch.float64)
    frame_targets = torch.full((b, seq_len), -1.0, dtype=torch.float32)
    for i, s in enumerate(fitted):
        ids[i, : s.length] = s.ids
        types[i, : s.length] = s.types
        mask[i, : s.length] = s.loss_mask
        visual[i, : s.visual_positions.numel()] = s.visual_positions
        times[i, : s.num_frames] = s.frame_times
        frame_targets[i, s.frame_positions] = s.frame_relevance
    return Batch(
        ids,
        types,
        mask,
        visual,
        times,
        frame_targets,
        torch.tensor([s.num_frames for s in fitted], dtype=torch.long),
        torch.tensor([s.length for s in fitted], dtype=torch.long),
        tuple(s.sample_id for s in fitted),
        tuple(dropped),
    )


# ---- tokenizer corpus ------------------------------------------------------------------------------


def write_corpus(samples: Sequence[VTGSample], path: str | Path) -> int:
    """Write the instruction of every sample and every caption of its events, one per line; returns the lines.

    Lines are in sample order, not deduplicated (frequencies matter to the tokenizer), whitespace
    collapsed; ``<sync>`` is removed (it is a reserved piece, never learnt from text).
    """
    lines: list[str] = []
    for s in samples:
        texts = [instruction(s)] + [ev.caption for ev in s.events if ev.caption]
        for text in texts:
            line = " ".join(text.replace("<sync>", " ").split())
            if line:
                lines.append(line)
    if not lines:
        raise ValueError(f"{path}: no text to write (no sample with an instruction or caption)")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)
