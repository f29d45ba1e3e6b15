"""Causal event sequences of the TimeExpert model: number vocabulary, encoding, head switching, parsing.

This module owns the response half of the token contract (``/work/notes/tokens.md``, docs/EVENTS.md):

* the number vocabulary :data:`NUM_VOCAB` shared by TIME and SCORE tokens (``<sync>`` = 0, ``<sep>`` = 1,
  digit ``d`` = ``2 + d``, ``"."`` = 12) and the fixed-width formats (:func:`format_time` ``%06.1f`` in
  [0, 9999.9], :func:`format_score` ``%3.1f`` in [0, 9.9]);
* :class:`Event` (times, scores, caption) and :func:`encode_events` -> ``(ids, types)`` of a response:
  per event ``TEXT <sync>``, the times as TIME tokens separated by ``<sep>`` and closed by TIME ``<sync>``,
  the scores likewise as SCORE tokens, the caption as TEXT tokens; then TEXT ``EOS``;
* the head-switching state machine used by generation: :func:`next_type` (which head predicts the next
  position, from the previous position's type and id) and :class:`ResponseGrammar` (which ids that head
  may emit there, so the fixed-width formats are respected);
* :func:`parse_response`: ``(ids, types)`` -> the events it could read plus a malformation reason code
  (:data:`REASONS`); it never raises on model output.

Text ids come from any object with the :class:`TextVocab` attributes (the sentencepiece wrapper in
:mod:`.tokenizer` is one). Nothing here knows videos, prompts or batches (see :mod:`.vtg`).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from megatron_timeexpert.moe.types import TokenType

NUM_VOCAB: tuple[str, ...] = ("<sync>", "<sep>", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", ".")
"""The TIME/SCORE vocabulary; a token's id is its index (the same ids for both types)."""
NUM_SYNC = 0
"""Id of ``<sync>`` among the number tokens (closes a time or score section)."""
NUM_SEP = 1
"""Id of ``<sep>`` among the number tokens (between two times or two scores, after a frame time)."""
NUM_DOT = 12
"""Id of ``"."`` among the number tokens."""
NUM_VOCAB_SIZE = len(NUM_VOCAB)
DIGIT_IDS: tuple[int, ...] = tuple(range(2, 12))
"""Ids of the digits 0..9, in order."""

TIME_WIDTH = 6
"""Characters of one time in the default format (``%06.1f``: ``0012.3``; :data:`TRACE_NUMBERS`)."""
SCORE_WIDTH = 3
"""Characters of one score (``%3.1f``: ``4.0``)."""
TIME_MAX = 9999.9
"""Largest time the default format can write; larger times are clamped to it (smaller than 0: to 0)."""
SCORE_MAX = 9.9
"""Largest score that can be written; larger scores are clamped to it (smaller than 0: to 0)."""
_SCORE_RE = re.compile(r"\d\.\d")


@dataclass(frozen=True)
class NumberFormat:
    """How a time is written: ``time_digits`` integer digits, a dot and one decimal (zero-padded).

    TRACE writes 4 integer digits (``0012.3``, up to 9999.9 s). Videos shorter than 100 s never use the
    first two, so a data set of short videos can drop them (``time_digits=2``: ``12.3``): the leading
    zeros carry nothing, and each time costs two positions less in the video block and the answer.
    Times are clamped to ``[0, 10**time_digits - 0.1]``. Scores keep their one format (``D.D``)."""

    time_digits: int = 4
    """Integer digits of every time (frame times in the prompt and times in the answer)."""

    def __post_init__(self) -> None:
        d = self.time_digits
        if not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= 6:
            raise ValueError(f"NumberFormat.time_digits={self.time_digits!r}: must be an integer in 1..6")

    @property
    def time_width(self) -> int:
        """Characters (= TIME tokens) of one time."""
        return self.time_digits + 2

    @property
    def time_max(self) -> float:
        """Largest time that can be written."""
        return 10**self.time_digits - 0.1

    @property
    def time_shape(self) -> str:
        """The pattern in words, for messages (``DDDD.D``)."""
        return "D" * self.time_digits + ".D"

    def format_time(self, t: float) -> str:
        """``t`` seconds as :attr:`time_width` characters (``12.34`` -> ``"0012.3"`` with 4 digits), clamped."""
        if not math.isfinite(t):
            raise ValueError(f"time {t!r} is not a finite number")
        return f"{min(max(float(t), 0.0), self.time_max):0{self.time_width}.1f}"

    def quantize_time(self, t: float) -> float:
        """The value ``t`` reads back as after :meth:`format_time`."""
        return float(self.format_time(t))

    def time_ids(self, t: float) -> list[int]:
        """The :attr:`time_width` TIME ids of time ``t`` (no ``<sep>``)."""
        return number_ids(self.format_time(t))

    def time_pattern(self) -> re.Pattern:
        return re.compile(r"\d{" + str(self.time_digits) + r"}\.\d")


TRACE_NUMBERS = NumberFormat(4)
"""TRACE's number format (4 integer digits); the default everywhere."""


class TextVocab(Protocol):
    """What the event code needs from the text tokenizer (:class:`~.tokenizer.TextTokenizer` has it)."""

    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int
    sync_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# ---- numbers ---------------------------------------------------------------------------------------


def format_time(t: float, numbers: NumberFormat = TRACE_NUMBERS) -> str:
    """``t`` seconds in ``numbers``' format (default ``%06.1f``: ``12.34`` -> ``"0012.3"``), clamped."""
    return numbers.format_time(t)


def format_score(s: float) -> str:
    """Score ``s`` as 3 characters ``%3.1f`` (``4`` -> ``"4.0"``), clamped to [0, 9.9]."""
    if not math.isfinite(s):
        raise ValueError(f"score {s!r} is not a finite number")
    return f"{min(max(float(s), 0.0), SCORE_MAX):3.1f}"


def quantize_time(t: float, numbers: NumberFormat = TRACE_NUMBERS) -> float:
    """The value ``t`` reads back as after :func:`format_time`."""
    return numbers.quantize_time(t)


def quantize_score(s: float) -> float:
    """The value ``s`` reads back as after :func:`format_score`."""
    return float(format_score(s))


def number_ids(chars: str) -> list[int]:
    """Number-vocabulary ids of a string of digits and dots (``"0012.3"`` -> ``[2, 2, 3, 4, 12, 5]``)."""
    out = []
    for c in chars:
        if c == ".":
            out.append(NUM_DOT)
        elif "0" <= c <= "9":
            out.append(2 + ord(c) - ord("0"))
        else:
            raise ValueError(f"{chars!r}: character {c!r} is not in the number vocabulary")
    return out


def number_chars(ids: Sequence[int]) -> str:
    """Inverse of :func:`number_ids` for digit and dot ids (``<sync>``/``<sep>`` come out as themselves)."""
    return "".join(NUM_VOCAB[i] for i in ids)


def time_ids(t: float, numbers: NumberFormat = TRACE_NUMBERS) -> list[int]:
    """The TIME ids of time ``t`` (6 in the default format; no ``<sep>``)."""
    return numbers.time_ids(t)


# ---- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One event of a response: what the model writes and what :func:`parse_response` reads back.

    Not to be confused with :class:`~.types.Event` (an annotation's span); :mod:`.vtg` maps those to these.
    """

    times: tuple[float, ...]
    """Times in seconds (moment: ``(start, end)``; highlights: one per clip); at least one."""
    scores: tuple[float, ...] = ()
    """Scores (moment: the window's score; highlights: one per clip; dense captions: none)."""
    caption: str = ""
    """Caption text (empty for moments and highlights)."""

    def quantized(self, numbers: NumberFormat = TRACE_NUMBERS) -> Event:
        """This event as it reads back after encoding (times/scores rounded to 0.1 and clamped)."""
        return Event(
            tuple(numbers.quantize_time(t) for t in self.times),
            tuple(quantize_score(s) for s in self.scores),
            self.caption,
        )


def encode_events(
    events: Sequence[Event], text: TextVocab, numbers: NumberFormat = TRACE_NUMBERS
) -> tuple[list[int], list[int]]:
    """The response of ``events``: ``(ids, types)`` ending with TEXT EOS (see the module docstring);
    times in ``numbers``' format.

    Raises ValueError for an event without times, a non-finite number or a caption holding ``<sync>``.
    """
    ids: list[int] = []
    types: list[int] = []

    def put(kind: TokenType, new: Sequence[int]) -> None:
        ids.extend(new)
        types.extend([int(kind)] * len(new))

    for k, ev in enumerate(events):
        if not ev.times:
            raise ValueError(f"event {k} has no time (every event needs at least one)")
        put(TokenType.TEXT, [text.sync_id])
        for kind, values, fmt in (
            (TokenType.TIME, ev.times, numbers.format_time),
            (TokenType.SCORE, ev.scores, format_score),
        ):
            for j, v in enumerate(values):
                if j:
                    put(kind, [NUM_SEP])
                try:
                    put(kind, number_ids(fmt(v)))
                except ValueError as exc:
                    raise ValueError(f"event {k}: {kind.name.lower()} {j}: {exc}") from None
            put(kind, [NUM_SYNC])
        if ev.caption:
            if "<sync>" in ev.caption:
                raise ValueError(f"event {k}: caption {ev.caption!r} holds the reserved text '<sync>'")
            put(TokenType.TEXT, text.encode(ev.caption))
    put(TokenType.TEXT, [text.eos_id])
    return ids, types


# ---- head switching (generation) -------------------------------------------------------------------


def next_type(prev_type: int, prev_id: int, text_sync_id: int) -> TokenType:
    """Type (= head) of the next RESPONSE position, from the previous position's type and id.

    TEXT ``<sync>`` -> TIME, TIME ``<sync>`` -> SCORE, SCORE ``<sync>`` -> TEXT, anything else keeps its type.
    (Only for the response: in the video block a frame's TIME ``<sep>`` is followed by VISUAL or TEXT.)
    """
    t = TokenType(prev_type)
    if t is TokenType.TEXT and prev_id == text_sync_id:
        return TokenType.TIME
    if t is TokenType.TIME and prev_id == NUM_SYNC:
        return TokenType.SCORE
    if t is TokenType.SCORE and prev_id == NUM_SYNC:
        return TokenType.TEXT
    return t


class Phase(str, Enum):
    """Where generation stands in the response."""

    START = "start"
    """Before the first event: TEXT ``<sync>`` (an event) or TEXT EOS (no event)."""
    TIME = "time"
    """Inside a time section."""
    SCORE = "score"
    """Inside a score section."""
    CAPTION = "caption"
    """After SCORE ``<sync>``: caption text, TEXT ``<sync>`` (next event) or EOS."""
    DONE = "done"
    """After EOS: nothing more."""


@dataclass(frozen=True)
class GrammarState:
    """Immutable state of :class:`ResponseGrammar` after some response tokens."""

    phase: Phase = Phase.START
    """Section of the response the next token belongs to."""
    chars: int = 0
    """Characters already written of the current time or score."""
    count: int = 0
    """Times or scores already completed in the current section."""

    @property
    def next_type(self) -> TokenType | None:
        """Type (head) of the next position; None after EOS."""
        return _PHASE_TYPE[self.phase]


_PHASE_TYPE = {
    Phase.START: TokenType.TEXT,
    Phase.TIME: TokenType.TIME,
    Phase.SCORE: TokenType.SCORE,
    Phase.CAPTION: TokenType.TEXT,
    Phase.DONE: None,
}


@dataclass(frozen=True)
class ResponseGrammar:
    """The response grammar as a state machine: which head comes next and which of its ids are allowed.

    Generation keeps a :class:`GrammarState` per sequence (``state = grammar.initial()``), masks every
    head but ``state.next_type`` and every id outside ``grammar.allowed_ids(state)``, samples, then
    ``state = grammar.step(state, type, id)``. Numbers must follow the fixed-width formats: time
    ``DDDD.D`` (``numbers``), score ``D.D``; an event has one or more times and zero or more scores. In text, PAD,
    BOS and UNK are never allowed.
    """

    text_vocab_size: int
    """Number of TEXT ids."""
    sync_id: int
    """TEXT id of ``<sync>``."""
    eos_id: int
    """TEXT id of EOS."""
    banned_text_ids: tuple[int, ...] = ()
    """TEXT ids never generated (PAD, BOS, UNK)."""
    numbers: NumberFormat = TRACE_NUMBERS
    """The time format the answers are written in (the training data's)."""
    _caption_ids: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        banned = set(self.banned_text_ids)
        object.__setattr__(self, "_caption_ids", tuple(i for i in range(self.text_vocab_size) if i not in banned))

    @classmethod
    def for_vocab(cls, text: TextVocab, numbers: NumberFormat = TRACE_NUMBERS) -> ResponseGrammar:
        """The grammar for a text tokenizer (bans its PAD, BOS and UNK ids) and a time format."""
        banned = tuple(sorted({i for i in (text.pad_id, text.bos_id, text.unk_id) if i >= 0}))
        return cls(text.vocab_size, text.sync_id, text.eos_id, banned, numbers)

    def initial(self) -> GrammarState:
        """State at the first response position (right after the prompt)."""
        return GrammarState()

    def allowed_ids(self, state: GrammarState) -> tuple[int, ...]:
        """Ids (of ``state.next_type``'s vocabulary) that may come next; empty after EOS."""
        p = state.phase
        if p is Phase.START:
            return (self.sync_id, self.eos_id)
        if p is Phase.CAPTION:
            return self._caption_ids
        if p is Phase.DONE:
            return ()
        tw = self.numbers.time_width
        width, dot = (tw, tw - 2) if p is Phase.TIME else (SCORE_WIDTH, SCORE_WIDTH - 2)
        if state.chars == width:
            return (NUM_SYNC, NUM_SEP)
        if state.chars == dot:
            return (NUM_DOT,)
        if state.chars == 0 and p is Phase.SCORE and state.count == 0:
            return (NUM_SYNC, *DIGIT_IDS)  # zero scores: the section may close at once
        return DIGIT_IDS

    def allowed_mask(self, state: GrammarState) -> list[bool]:
        """:meth:`allowed_ids` as a mask over ``state.next_type``'s vocabulary (empty after EOS)."""
        t = state.next_type
        if t is None:
            return []
        mask = [False] * (self.text_vocab_size if t is TokenType.TEXT else NUM_VOCAB_SIZE)
        for i in self.allowed_ids(state):
            mask[i] = True
        return mask

    def step(self, state: GrammarState, token_type: int, token_id: int) -> GrammarState:
        """State after emitting ``(token_type, token_id)``; ValueError if the grammar does not allow it."""
        if state.next_type is None or int(token_type) != state.next_type or token_id not in self.allowed_ids(state):
            raise ValueError(
                f"token (type {token_type}, id {token_id}) is not allowed in phase {state.phase.value} "
                f"(expected type {state.next_type!r}, ids {self.allowed_ids(state)[:16]})"
            )
        p = state.phase
        if p in (Phase.START, Phase.CAPTION):
            if token_id == self.sync_id:
                return GrammarState(Phase.TIME)
            if token_id == self.eos_id:
                return GrammarState(Phase.DONE)
            return GrammarState(Phase.CAPTION)
        if token_id == NUM_SYNC:
            return GrammarState(Phase.SCORE if p is Phase.TIME else Phase.CAPTION)
        if token_id == NUM_SEP:
            return GrammarState(p, 0, state.count + 1)
        return GrammarState(p, state.chars + 1, state.count)


# ---- parsing (model output -> events) ----------------------------------------------------------------

NO_CLOSING_SYNC = "no_closing_sync"
"""A time or score section was not closed by its ``<sync>`` (another type came, EOS, or the end)."""
UNPARSABLE_NUMBER = "unparsable_number"
"""A time is not ``DDDD.D`` or a score is not ``D.D`` (wrong width, misplaced or missing dot, empty)."""
NO_TIME = "no_time"
"""An event's time section closed with no time in it."""
WRONG_TYPE = "wrong_type"
"""A TIME/SCORE token where text must come (outside an event's number sections)."""
BAD_TOKEN = "bad_token"
"""A VISUAL or unknown type, an id outside its vocabulary, or a PAD/BOS text id."""
TEXT_OUTSIDE_EVENT = "text_outside_event"
"""Text before the first event's TEXT ``<sync>`` (ignored)."""
NO_EOS = "no_eos"
"""The response ended without TEXT EOS (e.g. the generation length ran out)."""
REASONS: tuple[str, ...] = (
    NO_CLOSING_SYNC, UNPARSABLE_NUMBER, NO_TIME, WRONG_TYPE, BAD_TOKEN, TEXT_OUTSIDE_EVENT, NO_EOS,
)  # fmt: skip
"""Every malformation code :func:`parse_response` can report."""


@dataclass(frozen=True)
class Problem:
    """One malformation found while parsing."""

    reason: str
    """One of :data:`REASONS`."""
    position: int
    """Index in the parsed response where it was noticed."""
    detail: str
    """What was wrong, for a log line."""


@dataclass(frozen=True)
class ParseResult:
    """What :func:`parse_response` could read."""

    events: tuple[Event, ...]
    """Every event read completely (through its SCORE ``<sync>``), in order."""
    problems: tuple[Problem, ...] = ()
    """Every malformation, in order of position."""
    dropped: int = 0
    """Events begun but not read (a malformation inside their number sections)."""

    @property
    def reason(self) -> str | None:
        """The first malformation's code (None: well formed)."""
        return self.problems[0].reason if self.problems else None

    @property
    def ok(self) -> bool:
        return not self.problems


def _as_ints(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _index(v) -> int:
    """``v`` as an int when it is an integer (int, numpy or torch integer scalar), else -1 (a bad token)."""
    if isinstance(v, bool):
        return -1
    try:
        return operator.index(v)
    except TypeError:
        return -1


def _check_number(chars: list[int], kind: TokenType, numbers: NumberFormat) -> tuple[float | None, str]:
    s = "".join(NUM_VOCAB[i] for i in chars)
    if kind is TokenType.TIME:
        pattern, width, shape = numbers.time_pattern(), numbers.time_width, numbers.time_shape
    else:
        pattern, width, shape = _SCORE_RE, SCORE_WIDTH, "D.D"
    if pattern.fullmatch(s) is None:
        return None, f"{kind.name.lower()} {s!r} is not {width} characters {shape}"
    return float(s), ""


def parse_response(ids, types, text: TextVocab, numbers: NumberFormat = TRACE_NUMBERS) -> ParseResult:
    """Read the events of a generated (or encoded) response; never raises on model output.

    ``ids``/``types``: the response positions (lists, tuples or 1-D tensors), starting right after the
    prompt. Reading stops at the first TEXT EOS (what follows, e.g. padding, is ignored). An event with
    a malformation inside its time or score section is dropped and reading resumes at the next TEXT
    ``<sync>``; an event whose caption is cut (wrong type, no EOS) is kept with the caption read so far.
    Times must be in ``numbers``' format (the one the model was trained with).
    ValueError only when ``ids`` and ``types`` differ in length (a caller's bug, not model output).
    """
    ids, types = _as_ints(ids), _as_ints(types)
    if len(ids) != len(types):
        raise ValueError(f"parse_response: {len(ids)} ids but {len(types)} types")
    events: list[Event] = []
    problems: list[Problem] = []
    dropped = 0
    phase = Phase.START
    skipping = False  # after a malformation: ignore tokens up to the next TEXT <sync> or EOS
    times: list[float] = []
    scores: list[float] = []
    chars: list[int] = []
    caption: list[int] = []
    seps = 0

    def bad_token(t, x) -> str | None:
        if t == TokenType.TEXT:
            if not 0 <= x < text.vocab_size or x in (text.pad_id, text.bos_id):
                return f"TEXT id {x} is out of range or PAD/BOS"
            return None
        if t in (TokenType.TIME, TokenType.SCORE):
            return None if 0 <= x < NUM_VOCAB_SIZE else f"{TokenType(t).name} id {x} is outside 0..{NUM_VOCAB_SIZE - 1}"
        return f"type {t} cannot appear in a response"

    def finish_event() -> None:
        events.append(Event(tuple(times), tuple(scores), text.decode(caption) if caption else ""))

    i = 0
    n = len(ids)
    while i < n:
        t, x = _index(types[i]), _index(ids[i])
        why = bad_token(t, x)
        in_number = phase in (Phase.TIME, Phase.SCORE) and not skipping
        if why is not None:
            problems.append(Problem(BAD_TOKEN, i, why))
            if in_number:
                dropped += 1
            elif phase is Phase.CAPTION and not skipping:
                finish_event()
            phase, skipping = Phase.START, True
            i += 1
            continue
        if in_number:
            kind = TokenType.TIME if phase is Phase.TIME else TokenType.SCORE
            if t != kind:
                problems.append(
                    Problem(
                        NO_CLOSING_SYNC,
                        i,
                        f"{kind.name.lower()} section not closed: {TokenType(t).name} came",
                    )
                )
                dropped += 1
                phase, skipping = Phase.START, True
                continue  # re-read this token while skipping (it may start the next event or be EOS)
            if x in (NUM_SEP, NUM_SYNC):
                target = times if kind is TokenType.TIME else scores
                if x == NUM_SYNC and not chars and not seps:
                    if kind is TokenType.TIME:
                        problems.append(Problem(NO_TIME, i, "time section closed with no time"))
                        dropped += 1
                        phase, skipping = Phase.START, True
                    else:
                        phase = Phase.CAPTION  # zero scores
                    i += 1
                    continue
                value, why = _check_number(chars, kind, numbers)
                if value is None:
                    problems.append(Problem(UNPARSABLE_NUMBER, i, why))
                    dropped += 1
                    phase, skipping = Phase.START, True
                    i += 1
                    continue
                target.append(value)
                chars = []
                if x == NUM_SEP:
                    seps += 1
                else:
                    phase, seps = (Phase.SCORE if kind is TokenType.TIME else Phase.CAPTION), 0
            else:
                chars.append(x)
            i += 1
            continue
        # text phases: START / CAPTION, or skipping after a malformation
        if t != TokenType.TEXT:
            if not skipping:
                problems.append(Problem(WRONG_TYPE, i, f"{TokenType(t).name} token where text must come"))
                if phase is Phase.CAPTION:
                    finish_event()
                phase, skipping = Phase.START, True
            i += 1
            continue
        if x == text.sync_id or x == text.eos_id:
            if phase is Phase.CAPTION and not skipping:
                finish_event()
            if x == text.eos_id:
                return ParseResult(tuple(events), tuple(problems), dropped)
            phase, skipping = Phase.TIME, False
            times, scores, chars, caption, seps = [], [], [], [], 0
        elif phase is Phase.CAPTION and not skipping:
            caption.append(x)
        elif not skipping:
            problems.append(Problem(TEXT_OUTSIDE_EVENT, i, "text before the first event's <sync>"))
            skipping = True
        i += 1
    # the end came without EOS
    if phase in (Phase.TIME, Phase.SCORE) and not skipping:
        problems.append(Problem(NO_CLOSING_SYNC, n, f"the response ended inside a {phase.value} section"))
        problems.append(Problem(NO_EOS, n, "the response ended without EOS"))
        dropped += 1
    else:
        if phase is Phase.CAPTION and not skipping:
            finish_event()
        problems.append(Problem(NO_EOS, n, "the response ended without EOS"))
    return ParseResult(tuple(events), tuple(problems), dropped)
