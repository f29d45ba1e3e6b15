"""Event sequences: number formats, encode -> parse round trips, the head-switching grammar, and every
malformed response parse_response must survive and name (text ids from a tokenizer trained on the
synthetic generator's captions)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_timeexpert.data import events as E
from megatron_timeexpert.data.annotations import ReaderConfig, read_annotations
from megatron_timeexpert.data.stats import BadInputs
from megatron_timeexpert.data.tokenizer import TextTokenizer, TokenizerTrainConfig
from megatron_timeexpert.data.vtg import write_corpus
from megatron_timeexpert.moe.types import TokenType
from tools.make_synthetic_vtg import GeneratorConfig, generate

TEXT, TIME, SCORE, VISUAL = int(TokenType.TEXT), int(TokenType.TIME), int(TokenType.SCORE), int(TokenType.VISUAL)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("events_synth")
    generate(GeneratorConfig(out, 4, seed=3, width=32, height=24, progress=False))
    return out


@pytest.fixture(scope="module")
def captions(synth) -> list[str]:
    cfg = ReaderConfig(synth / "videos")
    samples = read_annotations("activitynet", synth / "annotations/activitynet_captions.json", cfg, BadInputs())
    return [ev.caption for s in samples for ev in s.events]


@pytest.fixture(scope="module")
def tok(synth, tmp_path_factory) -> TextTokenizer:
    cfg = ReaderConfig(synth / "videos")
    samples = read_annotations("youcook2", synth / "annotations/youcook2.json", cfg, BadInputs())
    samples += read_annotations("qvhighlights", synth / "annotations/qvhighlights.jsonl", cfg, BadInputs())
    d = tmp_path_factory.mktemp("events_tok")
    write_corpus(samples, d / "corpus.txt")
    return TextTokenizer.train([d / "corpus.txt"], d / "tok", TokenizerTrainConfig(vocab_size=400))


def num(chars: str) -> list[int]:
    return E.number_ids(chars)


def seq(*parts) -> tuple[list[int], list[int]]:
    """Build (ids, types) from (type, [ids]) parts."""
    ids, types = [], []
    for t, xs in parts:
        ids += list(xs)
        types += [t] * len(xs)
    return ids, types


# ---- numbers ---------------------------------------------------------------------------------------


def test_number_vocabulary_ids():
    assert E.NUM_VOCAB[E.NUM_SYNC] == "<sync>" and E.NUM_VOCAB[E.NUM_SEP] == "<sep>" and E.NUM_VOCAB[12] == "."
    assert [E.NUM_VOCAB[i] for i in E.DIGIT_IDS] == [str(d) for d in range(10)]
    assert num("0012.3") == [2, 2, 3, 4, 12, 5] and E.number_chars([2, 2, 3, 4, 12, 5]) == "0012.3"
    with pytest.raises(ValueError, match="'-'"):
        num("-1.0")


@pytest.mark.parametrize(
    "t, text",
    [(12.34, "0012.3"), (0, "0000.0"), (-3.0, "0000.0"), (9999.9, "9999.9"), (9999.97, "9999.9"), (1e9, "9999.9"),
     (123.45, "0123.5"), (0.05, "0000.1"), (7.0, "0007.0")],
)  # fmt: skip
def test_time_format_is_six_characters_clamped(t, text):
    assert E.format_time(t) == text and len(text) == E.TIME_WIDTH
    assert E.quantize_time(t) == float(text)


@pytest.mark.parametrize("s, text", [(4, "4.0"), (2.6667, "2.7"), (0, "0.0"), (-1, "0.0"), (9.96, "9.9"), (42, "9.9")])
def test_score_format_is_three_characters_clamped(s, text):
    assert E.format_score(s) == text and len(text) == E.SCORE_WIDTH


def test_non_finite_numbers_are_refused():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not a finite"):
            E.format_time(bad)
        with pytest.raises(ValueError, match="not a finite"):
            E.format_score(bad)


# ---- encoding and round trips --------------------------------------------------------------------


def test_encoded_layout_of_one_event(tok):
    ids, types = E.encode_events([E.Event((12.3, 15.0), (4.0,), "a red circle appears")], tok)
    cap = tok.encode("a red circle appears")
    want_ids = [tok.sync_id, *num("0012.3"), E.NUM_SEP, *num("0015.0"), E.NUM_SYNC, *num("4.0"), E.NUM_SYNC]
    want_ids += [*cap, tok.eos_id]
    want_types = [TEXT] + [TIME] * 14 + [SCORE] * 4 + [TEXT] * len(cap) + [TEXT]
    assert ids == want_ids and types == want_types


def test_round_trip_exact(tok, captions):
    events = [
        E.Event((0.0, 4.5), (1.0,), ""),
        E.Event((12.3,), (), captions[0]),
        E.Event((1.0, 3.0, 5.0, 7.0), (0.0, 2.7, 4.0, 9.9), ""),
        E.Event((100.0, 2345.6), (), captions[-1]),
        E.Event((9999.9, 0.1), (3.3, 3.4), "with unseen characters: é, 東京, 😀 and (parens)"),
    ]
    ids, types = E.encode_events(events, tok)
    got = E.parse_response(ids, types, tok)
    assert got.ok and got.reason is None and got.dropped == 0
    assert got.events == tuple(events)  # values on the 0.1 grid read back exactly
    assert E.parse_response(*E.encode_events([], tok), tok) == E.ParseResult(())  # just EOS: no event


def test_round_trip_random_events_equal_their_quantized_form(tok, captions):
    rng = random.Random(11)
    for _ in range(60):
        evs = [
            E.Event(
                tuple(rng.uniform(-5, 12000) for _ in range(rng.randint(1, 5))),
                tuple(rng.uniform(-1, 11) for _ in range(rng.randint(0, 4))),
                rng.choice(["", *captions]),
            )
            for _ in range(rng.randint(0, 4))
        ]
        got = E.parse_response(*E.encode_events(evs, tok), tok)
        assert got.ok and got.events == tuple(ev.quantized() for ev in evs)
        for ev in got.events:
            assert all(0 <= t <= E.TIME_MAX for t in ev.times) and all(0 <= s <= E.SCORE_MAX for s in ev.scores)


def test_encode_refuses_bad_events(tok):
    with pytest.raises(ValueError, match="event 1 has no time"):
        E.encode_events([E.Event((1.0,)), E.Event(())], tok)
    with pytest.raises(ValueError, match="event 0: time 1: .*not a finite"):
        E.encode_events([E.Event((1.0, float("nan")))], tok)
    with pytest.raises(ValueError, match="event 0: score 0"):
        E.encode_events([E.Event((1.0,), (float("inf"),))], tok)
    with pytest.raises(ValueError, match="reserved text '<sync>'"):
        E.encode_events([E.Event((1.0,), (), "a <sync> b")], tok)


# ---- head switching ---------------------------------------------------------------------------------


def test_next_type_switches_heads_on_sync_only(tok):
    assert E.next_type(TEXT, tok.sync_id, tok.sync_id) is TokenType.TIME
    assert E.next_type(TIME, E.NUM_SYNC, tok.sync_id) is TokenType.SCORE
    assert E.next_type(SCORE, E.NUM_SYNC, tok.sync_id) is TokenType.TEXT
    assert E.next_type(TIME, E.NUM_SEP, tok.sync_id) is TokenType.TIME
    assert E.next_type(SCORE, 5, tok.sync_id) is TokenType.SCORE
    assert E.next_type(TEXT, tok.eos_id, tok.sync_id) is TokenType.TEXT
    # TEXT id 0 is PAD, not the number <sync>: no switch
    assert E.next_type(TEXT, E.NUM_SYNC, tok.sync_id) is TokenType.TEXT


def walk(grammar: E.ResponseGrammar, ids, types, sync_id: int) -> E.GrammarState:
    """Check every position against the grammar and next_type; returns the final state."""
    state = grammar.initial()
    for i, (x, t) in enumerate(zip(ids, types)):
        assert state.next_type == t, f"position {i}: grammar expects {state.next_type}, sequence has {t}"
        assert x in grammar.allowed_ids(state), f"position {i}: id {x} not allowed in {state}"
        assert grammar.allowed_mask(state)[x]
        if i:
            assert E.next_type(types[i - 1], ids[i - 1], sync_id) == t
        state = grammar.step(state, t, x)
    return state


def test_grammar_accepts_every_encoded_response(tok, captions):
    g = E.ResponseGrammar.for_vocab(tok)
    rng = random.Random(5)
    for _ in range(40):
        evs = [
            E.Event(
                tuple(rng.uniform(0, 500) for _ in range(rng.randint(1, 4))),
                tuple(rng.uniform(0, 5) for _ in range(rng.randint(0, 3))),
                rng.choice(["", *captions]),
            )
            for _ in range(rng.randint(0, 3))
        ]
        ids, types = E.encode_events(evs, tok)
        final = walk(g, ids, types, tok.sync_id)
        assert final.phase is E.Phase.DONE and final.next_type is None and g.allowed_ids(final) == ()


def test_grammar_allowed_ids_follow_the_fixed_widths(tok):
    g = E.ResponseGrammar.for_vocab(tok)
    s = g.initial()
    assert s.next_type is TokenType.TEXT and set(g.allowed_ids(s)) == {tok.sync_id, tok.eos_id}
    s = g.step(s, TEXT, tok.sync_id)
    assert s.next_type is TokenType.TIME and g.allowed_ids(s) == E.DIGIT_IDS  # at least one time: no <sync> yet
    for k, x in enumerate(num("0012.3")):
        expect = (E.NUM_DOT,) if k == 4 else E.DIGIT_IDS
        assert g.allowed_ids(s) == expect
        s = g.step(s, TIME, x)
    assert set(g.allowed_ids(s)) == {E.NUM_SEP, E.NUM_SYNC}
    s = g.step(s, TIME, E.NUM_SEP)
    assert g.allowed_ids(s) == E.DIGIT_IDS  # no <sync> right after <sep>
    with pytest.raises(ValueError, match="not allowed"):
        g.step(s, TIME, E.NUM_SYNC)
    for x in num("0020.0"):
        s = g.step(s, TIME, x)
    s = g.step(s, TIME, E.NUM_SYNC)
    assert s.next_type is TokenType.SCORE and set(g.allowed_ids(s)) == {E.NUM_SYNC, *E.DIGIT_IDS}  # zero scores ok
    with pytest.raises(ValueError, match="expected type"):
        g.step(s, TIME, 3)  # the time head is masked here
    s = g.step(s, SCORE, num("4")[0])
    assert g.allowed_ids(s) == (E.NUM_DOT,)
    s = g.step(s, SCORE, E.NUM_DOT)
    s = g.step(s, SCORE, num("5")[0])
    s = g.step(s, SCORE, E.NUM_SYNC)
    assert s.phase is E.Phase.CAPTION and s.next_type is TokenType.TEXT
    caption_ids = set(g.allowed_ids(s))
    assert {tok.sync_id, tok.eos_id} <= caption_ids and not {tok.pad_id, tok.bos_id, tok.unk_id} & caption_ids
    assert len(caption_ids) == tok.vocab_size - 3 and sum(g.allowed_mask(s)) == tok.vocab_size - 3
    assert len(g.allowed_mask(g.step(s, TEXT, tok.sync_id))) == E.NUM_VOCAB_SIZE
    done = g.step(s, TEXT, tok.eos_id)
    assert g.allowed_mask(done) == [] and done.next_type is None
    with pytest.raises(ValueError, match="phase done"):
        g.step(done, TEXT, tok.eos_id)


def test_any_sequence_the_grammar_allows_parses_cleanly(tok):
    """Constrained random generation: whatever the masks let through reads back without a problem."""
    g = E.ResponseGrammar.for_vocab(tok)
    rng = random.Random(2)
    finished = 0
    for _ in range(200):
        state, ids, types = g.initial(), [], []
        while state.next_type is not None and len(ids) < 120:
            allowed = g.allowed_ids(state)
            # lean towards closing sections so sequences end
            closers = [x for x in allowed if x in (E.NUM_SYNC, tok.eos_id)]
            x = rng.choice(closers) if closers and rng.random() < 0.3 else rng.choice(allowed)
            t = int(state.next_type)
            ids.append(x)
            types.append(t)
            state = g.step(state, t, x)
        got = E.parse_response(ids, types, tok)
        if state.phase is E.Phase.DONE:
            finished += 1
            assert got.ok, (got.problems, ids, types)
            assert len(got.events) == sum(1 for x, t in zip(ids, types) if t == TEXT and x == tok.sync_id)
        else:  # cut by the length limit: only an end-of-response problem
            assert got.reason in (E.NO_EOS, E.NO_CLOSING_SYNC)
    assert finished > 100


# ---- malformed responses ----------------------------------------------------------------------------


def two_events(tok):
    a = E.Event((1.0, 2.0), (1.0,), "")
    b = E.Event((3.5, 4.0), (), "a red circle appears")
    return a, b


def test_no_closing_time_sync(tok):
    a, _ = two_events(tok)
    ids, types = E.encode_events([a], tok)
    ids, types = ids[:-1], types[:-1]  # drop EOS
    cut = seq((TEXT, [tok.sync_id]), (TIME, num("0003.0")))  # time section never closed
    got = E.parse_response(ids + cut[0], types + cut[1], tok)
    assert got.reason == E.NO_CLOSING_SYNC and got.events == (a,) and got.dropped == 1
    assert [p.reason for p in got.problems] == [E.NO_CLOSING_SYNC, E.NO_EOS]
    # closed by another type instead of <sync>: the event is dropped, reading resumes at the next event
    b = E.Event((5.0, 6.0), (2.0,), "")
    rest = E.encode_events([b], tok)
    mixed = seq((TEXT, [tok.sync_id]), (TIME, num("0003.0")), (SCORE, num("1.0") + [E.NUM_SYNC]))
    got = E.parse_response(mixed[0] + rest[0], mixed[1] + rest[1], tok)
    assert got.reason == E.NO_CLOSING_SYNC and got.events == (b,) and got.dropped == 1
    assert "time section not closed: SCORE came" in got.problems[0].detail


def test_no_closing_score_sync(tok):
    a, b = two_events(tok)
    ids, types = E.encode_events([a, b], tok)
    second = [i for i, (x, t) in enumerate(zip(ids, types)) if t == TEXT and x == tok.sync_id][1]
    # cut inside b's score section (b has no score: stop right after its TIME <sync>)
    time_sync = next(i for i in range(second, len(ids)) if types[i] == TIME and ids[i] == E.NUM_SYNC)
    got = E.parse_response(ids[: time_sync + 1], types[: time_sync + 1], tok)
    assert got.reason == E.NO_CLOSING_SYNC and got.events == (a,) and got.dropped == 1
    # EOS inside the score section
    x, t = seq((TEXT, [tok.sync_id]), (TIME, num("0001.0") + [E.NUM_SYNC]), (SCORE, num("2.0")), (TEXT, [tok.eos_id]))
    got = E.parse_response(x, t, tok)
    assert got.reason == E.NO_CLOSING_SYNC and got.events == () and got.problems[-1].reason == E.NO_CLOSING_SYNC


@pytest.mark.parametrize(
    "time_chars, score_chars",
    [("12.3", "1.0"), ("00012.3", "1.0"), ("0012.34", "1.0"), ("001.23", "1.0"), ("0012..", "1.0"),
     ("0012.3", "10"), ("0012.3", "4.00"), ("0012.3", ".40"), ("0012.3", "4")],
)  # fmt: skip
def test_unparsable_number(tok, time_chars, score_chars):
    _, b = two_events(tok)
    bad = seq(
        (TEXT, [tok.sync_id]),
        (TIME, num(time_chars) + [E.NUM_SYNC]),
        (SCORE, num(score_chars) + [E.NUM_SYNC]),
        (TEXT, tok.encode("lost caption")),
    )
    good = E.encode_events([b], tok)
    got = E.parse_response(bad[0] + good[0], bad[1] + good[1], tok)
    assert got.reason == E.UNPARSABLE_NUMBER and got.events == (b,) and got.dropped == 1
    assert len(got.problems) == 1
    assert (time_chars if time_chars != "0012.3" else score_chars) in got.problems[0].detail


def test_empty_numbers(tok):
    # a <sep> followed by <sync>: the last time is empty
    x, t = seq((TEXT, [tok.sync_id]), (TIME, num("0001.0") + [E.NUM_SEP, E.NUM_SYNC]), (SCORE, [0]), (TEXT, [3]))
    assert E.parse_response(x, t, tok).reason == E.UNPARSABLE_NUMBER
    x, t = seq((TEXT, [tok.sync_id]), (TIME, num("0001.0") + [E.NUM_SYNC]), (SCORE, [E.NUM_SEP, 0]), (TEXT, [3]))
    assert E.parse_response(x, t, tok).reason == E.UNPARSABLE_NUMBER
    # no time at all
    x, t = seq((TEXT, [tok.sync_id]), (TIME, [E.NUM_SYNC]), (SCORE, [E.NUM_SYNC]), (TEXT, [tok.eos_id]))
    got = E.parse_response(x, t, tok)
    assert got.reason == E.NO_TIME and got.events == () and got.dropped == 1


def test_wrong_type_in_text_keeps_the_finished_event(tok):
    a, b = two_events(tok)
    ids, types = E.encode_events([b], tok)
    ids, types = ids[:-1] + num("0001.0") + [tok.eos_id], types[:-1] + [TIME] * 6 + [TEXT]
    got = E.parse_response(ids, types, tok)
    assert got.reason == E.WRONG_TYPE and got.events == (b,) and got.dropped == 0
    # before the first event
    x, t = seq((SCORE, num("1.0")))
    rest = E.encode_events([a], tok)
    got = E.parse_response(x + rest[0], t + rest[1], tok)
    assert got.reason == E.WRONG_TYPE and got.events == (a,)


@pytest.mark.parametrize("where", ["time", "score", "caption", "start"])
@pytest.mark.parametrize(
    "bad",
    [(VISUAL, 0), (7, 1), (-1, 1), (TIME, 13), (SCORE, -2), (TEXT, 10**6), (TEXT, "pad"), (TEXT, "bos"),
     (TEXT, 1.5), (None, 2)],
)  # fmt: skip
def test_bad_tokens_never_raise(tok, where, bad):
    a, b = two_events(tok)
    t_bad, x_bad = bad
    x_bad = {"pad": tok.pad_id, "bos": tok.bos_id}.get(x_bad, x_bad)
    ids, types = E.encode_events([b], tok)
    pos = {
        "start": 0,
        "time": 3,
        "score": types.index(TEXT, 1) - 1 if SCORE not in types else types.index(SCORE),
        "caption": len(ids) - 2,
    }[where]
    ids, types = ids[:pos] + [x_bad] + ids[pos:], types[:pos] + [t_bad] + types[pos:]
    good = E.encode_events([a], tok)
    ids, types = ids[:-1] + good[0], types[:-1] + good[1]  # then a good event
    got = E.parse_response(ids, types, tok)
    assert got.reason == E.BAD_TOKEN and got.problems[0].position == pos
    assert got.events[-1] == a  # reading resumed at the next event
    if where == "caption":
        assert got.events[0].times == b.times and len(got.events) == 2  # finished event kept, caption cut
    elif where in ("time", "score"):
        assert len(got.events) == 1 and got.dropped == 1


def test_text_before_the_first_event_is_reported_and_skipped(tok):
    a, _ = two_events(tok)
    ids, types = E.encode_events([a], tok)
    pre = tok.encode("the answer is")
    got = E.parse_response(pre + ids, [TEXT] * len(pre) + types, tok)
    assert got.reason == E.TEXT_OUTSIDE_EVENT and got.events == (a,) and len(got.problems) == 1


def test_no_eos(tok):
    a, b = two_events(tok)
    ids, types = E.encode_events([a, b], tok)
    got = E.parse_response(ids[:-1], types[:-1], tok)
    assert got.reason == E.NO_EOS and got.events == (a, b)  # the caption was complete as far as it went
    got = E.parse_response(ids[:-3], types[:-3], tok)
    assert got.reason == E.NO_EOS and got.events[1].times == b.times and got.events[1].caption != b.caption
    got = E.parse_response([], [], tok)
    assert got.reason == E.NO_EOS and got.events == () and not got.ok


def test_tokens_after_eos_are_ignored_and_inputs_may_be_tensors(tok):
    a, b = two_events(tok)
    ids, types = E.encode_events([a], tok)
    ids, types = ids + [tok.pad_id] * 5 + [99], types + [TEXT] * 5 + [VISUAL]
    for cast in (list, tuple, np.array, lambda v: torch.tensor(v, dtype=torch.long)):
        got = E.parse_response(cast(ids), cast(types), tok)
        assert got.ok and got.events == (a,)
    got = E.parse_response(np.array(ids, dtype=np.int32), torch.tensor(types), tok)
    assert got.ok and got.events == (a,)
    with pytest.raises(ValueError, match="3 ids but 2 types"):
        E.parse_response([1, 2, 3], [1, 1], tok)


def test_random_garbage_never_raises(tok):
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randint(0, 40)
        types = [rng.choice([TEXT, TEXT, TIME, SCORE, TIME, VISUAL, 9]) for _ in range(n)]
        ids = [
            rng.choice([tok.sync_id, tok.eos_id, rng.randrange(-2, tok.vocab_size + 3)])
            if t == TEXT
            else rng.choice([0, 1, rng.randrange(-1, 15)])
            for t in types
        ]
        got = E.parse_response(ids, types, tok)
        assert got.reason is None or got.reason in E.REASONS
        assert all(p.reason in E.REASONS and 0 <= p.position <= n for p in got.problems)
        assert all(ev.times for ev in got.events)
