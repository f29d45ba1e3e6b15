"""VTG samples as token sequences, from the synthetic generator's real annotation files (all readers, all
three tasks): the layout (BOS, 8 VISUAL + 6 TIME + <sep> per frame, instruction, response, EOS), the loss
mask, the targets against the generator's ground truth, the grammar on every sample, padding and
overflow, frame times from really decoded videos."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dali_pipes import DecoderConfig, SamplingConfig, VideoDecoder
from megatron_timeexpert.data import events as E
from megatron_timeexpert.data import vtg
from megatron_timeexpert.data.annotations import ReaderConfig, read_annotations
from megatron_timeexpert.data.dataset import VTGDataset
from megatron_timeexpert.data.stats import BadInputs
from megatron_timeexpert.data.tokenizer import TextTokenizer, TokenizerTrainConfig
from megatron_timeexpert.data.types import Event, Task, VTGSample
from megatron_timeexpert.moe.types import TokenType
from tools.make_synthetic_vtg import GeneratorConfig, generate

pytestmark = pytest.mark.timeout(300)
TEXT, TIME, SCORE, VISUAL = int(TokenType.TEXT), int(TokenType.TIME), int(TokenType.SCORE), int(TokenType.VISUAL)
FORMATS = {
    "charades_sta": "charades_sta.txt",
    "qvhighlights": "qvhighlights.jsonl",
    "youcook2": "youcook2.json",
    "activitynet": "activitynet_captions.json",
    "instruction": "instruction.json",
}
PER_FRAME = 8 + E.TIME_WIDTH + 1


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vtg_synth")
    generate(GeneratorConfig(out, 4, seed=2, width=32, height=24, progress=False))
    return out


@pytest.fixture(scope="module")
def by_format(synth) -> dict[str, list[VTGSample]]:
    cfg = ReaderConfig(synth / "videos")
    return {fmt: read_annotations(fmt, synth / "annotations" / f, cfg, BadInputs()) for fmt, f in FORMATS.items()}


@pytest.fixture(scope="module")
def truth(synth) -> dict[str, list[dict]]:
    """The generator's ground truth: video id -> its events (start, end, caption), in time order."""
    return {v["vid"]: v["events"] for v in json.loads((synth / "events.json").read_text())}


@pytest.fixture(scope="module")
def tok(by_format, tmp_path_factory) -> TextTokenizer:
    d = tmp_path_factory.mktemp("vtg_tok")
    vtg.write_corpus([s for ss in by_format.values() for s in ss], d / "corpus.txt")
    return TextTokenizer.train([d / "corpus.txt"], d / "tok", TokenizerTrainConfig(vocab_size=384))


def frame_times(sample: VTGSample, n: int = 6) -> list[float]:
    duration = sample.duration or 10.0
    return [(k + 0.5) * duration / n for k in range(n)]


def vid(sample: VTGSample) -> str:
    return Path(sample.video).stem


def response(ts: vtg.TokenizedSample, tok) -> E.ParseResult:
    return E.parse_response(ts.ids[ts.response_start :], ts.types[ts.response_start :], tok)


def check_layout(
    ts: vtg.TokenizedSample, sample: VTGSample, times: list[float], tok, cfg: vtg.SequenceConfig | None = None
) -> None:
    cfg = cfg or vtg.SequenceConfig()
    ids, types = ts.ids.tolist(), ts.types.tolist()
    assert (ids[0], types[0]) == (tok.bos_id, TEXT)
    n = len(times)
    instr = tok.encode(vtg.instruction(sample))
    video_start = 1 + len(instr) if cfg.query_first else 1
    text_start = 1 if cfg.query_first else 1 + n * cfg.frame_length
    assert ids[text_start : text_start + len(instr)] == instr and set(types[text_start : text_start + len(instr)]) == {
        TEXT
    }
    width = cfg.numbers.time_width
    per_frame = 8 + (width + 1 if cfg.frame_time_tokens else 0)
    assert cfg.frame_length == per_frame
    for k, t in enumerate(times):  # 8 VISUAL, the frame's time characters, <sep>
        block = slice(video_start + k * per_frame, video_start + (k + 1) * per_frame)
        if cfg.frame_time_tokens:
            assert types[block] == [VISUAL] * 8 + [TIME] * (width + 1)
            assert ids[block] == [0] * 8 + E.number_ids(cfg.numbers.format_time(t)) + [E.NUM_SEP]
        else:
            assert types[block] == [VISUAL] * 8 and ids[block] == [0] * 8
        assert ts.visual_positions[k * 8 : (k + 1) * 8].tolist() == list(range(block.start, block.start + 8))
        assert int(ts.frame_positions[k]) == block.stop - 1  # the frame head reads the frame's last position
    assert ts.visual_positions.numel() == 8 * n and ts.frame_times.tolist() == times
    assert sorted(i for i, t in enumerate(types) if t == VISUAL) == ts.visual_positions.tolist()
    assert ts.response_start == (video_start + n * per_frame if cfg.query_first else text_start + len(instr))
    # per-frame relevance: inside a target event (a highlight clip with saliency > 0), independently computed
    spans = [(ev.start, ev.end) for ev in sample.events if ev.saliency is None or ev.saliency > 0]
    want = [float(any(a - 1e-6 <= t <= b + 1e-6 for a, b in spans)) for t in times]
    assert ts.frame_relevance.tolist() == want
    # the loss covers exactly the response and the final EOS
    mask = ts.loss_mask.tolist()
    assert mask == [0.0] * ts.response_start + [1.0] * (ts.length - ts.response_start)
    text_eos = [i for i in range(ts.length) if (ids[i], types[i]) == (tok.eos_id, TEXT)]
    assert text_eos == [ts.length - 1]
    assert (ids[ts.response_start], types[ts.response_start]) == (tok.sync_id, TEXT)
    assert [i for i in range(ts.length) if (ids[i], types[i]) == (tok.sync_id, TEXT)] == list(ts.event_starts)
    # the head-switching grammar agrees with every response position's type and id
    g = cfg.grammar(tok)
    state = g.initial()
    for i in range(ts.response_start, ts.length):
        assert state.next_type == types[i] and ids[i] in g.allowed_ids(state), f"position {i} of {sample.sample_id}"
        if i > ts.response_start:
            assert E.next_type(types[i - 1], ids[i - 1], tok.sync_id) == types[i]
        state = g.step(state, types[i], ids[i])
    assert state.phase is E.Phase.DONE


LAYOUTS = {
    "default": vtg.SequenceConfig(),
    "video_first": vtg.SequenceConfig(query_first=False),
    "no_frame_times_2_digits": vtg.SequenceConfig(frame_time_tokens=False, time_digits=2),
    "2_digits": vtg.SequenceConfig(time_digits=2),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_sample_of_every_reader(by_format, tok, layout):
    cfg = LAYOUTS[layout]
    tasks = set()
    relevant = []
    for fmt, samples in by_format.items():
        assert samples, fmt
        for s in samples:
            times = frame_times(s)
            ts = vtg.tokenize_sample(s, times, tok, cfg)
            check_layout(ts, s, times, tok, cfg)
            relevant += ts.frame_relevance.tolist()
            got = E.parse_response(ts.ids[ts.response_start :], ts.types[ts.response_start :], tok, cfg.numbers)
            assert got.ok and got.events == tuple(ev.quantized(cfg.numbers) for ev in vtg.response_events(s))
            assert len(got.events) == (1 if s.task is Task.HIGHLIGHT_DETECTION else len(s.events))
            assert ts.sample_id == s.sample_id and ts.task is s.task
            tasks.add((fmt, s.task))
    assert {t for _, t in tasks} == set(Task)
    assert ("instruction", Task.HIGHLIGHT_DETECTION) in tasks and ("instruction", Task.DENSE_CAPTIONING) in tasks
    assert set(relevant) == {0.0, 1.0}  # both kinds of frame target occur


def test_frame_relevance_follows_the_generators_ground_truth(by_format, tok, truth):
    """Each Charades query's frame targets are 1 exactly where its own event is drawn (the generator's
    frames with start <= t <= end), not where the video's other events are."""
    for s in by_format["charades_sta"]:
        (gt,) = [e for e in truth[vid(s)] if e["caption"] + "." == s.query]
        others = [e for e in truth[vid(s)] if e is not gt]
        times = [0.1 * k for k in range(int(10 * s.events[0].end) + 12)]
        ts = vtg.tokenize_sample(s, times, tok)
        assert ts.frame_relevance.tolist() == [float(gt["start"] <= t + 1e-9 and t <= gt["end"] + 1e-9) for t in times]
        for e in others:  # frames of another event are negatives for this query
            assert all(r == 0.0 for t, r in zip(times, ts.frame_relevance.tolist()) if e["start"] <= t <= e["end"])
    s = by_format["charades_sta"][0]
    times = [s.events[0].start, s.events[0].end + 0.5]
    prompt = vtg.tokenize_sample(s, times, tok, with_response=False)
    assert prompt.frame_relevance.tolist() == [1.0, 0.0]  # events known: targets even without the answer


def test_moment_retrieval_targets_match_the_ground_truth(by_format, tok, truth):
    for s in by_format["charades_sta"]:
        (ev,) = response(vtg.tokenize_sample(s, frame_times(s), tok), tok).events
        gt = [e for e in truth[vid(s)] if e["caption"] + "." == s.query]
        assert len(gt) == 1 and ev.times == (gt[0]["start"], gt[0]["end"])
        assert ev.scores == (1.0,) and ev.caption == ""  # Charades-STA has no window score
    qv = [s for s in by_format["qvhighlights"] if s.task is Task.MOMENT_RETRIEVAL]
    for s in qv:
        evs = response(vtg.tokenize_sample(s, frame_times(s), tok), tok).events
        gt = next(e for e in truth[vid(s)] if e["caption"] == s.query)
        w0, w1 = 2 * math.floor(gt["start"] / 2), 2 * math.ceil(gt["end"] / 2)  # the generator's 2 s window
        assert [ev.times for ev in evs] == [(float(w0), float(min(w1, s.duration)))]  # end clamped to the video
        assert evs[0].scores == (1.0,)
    assert vtg.instruction(qv[0]).startswith("Find the start and end time") and qv[0].query in vtg.instruction(qv[0])
    inst = [s for s in by_format["instruction"] if s.task is Task.MOMENT_RETRIEVAL]
    (ev,) = response(vtg.tokenize_sample(inst[0], [0.0], tok), tok).events
    assert ev.times == (truth[vid(inst[0])][0]["start"], truth[vid(inst[0])][0]["end"])
    assert vtg.instruction(inst[0]) == inst[0].query  # instruction data is used verbatim


def test_highlight_targets_are_clip_centres_and_mean_saliency(by_format, tok, synth):
    lines = [json.loads(x) for x in (synth / "annotations/qvhighlights.jsonl").read_text().splitlines()]
    hd = [s for s in by_format["qvhighlights"] if s.task is Task.HIGHLIGHT_DETECTION]
    assert len(hd) == len(lines)
    for s, line in zip(hd, lines):
        (ev,) = response(vtg.tokenize_sample(s, frame_times(s), tok), tok).events
        centres = [(2 * c + min(2 * c + 2, line["duration"])) / 2 for c in line["relevant_clip_ids"]]
        assert ev.times == tuple(E.quantize_time(c) for c in centres)
        assert ev.scores == tuple(E.quantize_score(sum(a) / 3) for a in line["saliency_scores"])
        assert ev.caption == ""
    assert any(len(s.events) > 1 for s in hd)
    inst = next(s for s in by_format["instruction"] if s.task is Task.HIGHLIGHT_DETECTION)
    (ev,) = response(vtg.tokenize_sample(inst, [0.0, 1.0], tok), tok).events
    assert ev.times[:2] == (1.0, 3.0) and len(ev.times) == len(ev.scores) == len(inst.events)


def test_dense_caption_targets_match_the_ground_truth(by_format, tok, truth):
    for fmt in ("youcook2", "activitynet"):
        for s in by_format[fmt]:
            got = response(vtg.tokenize_sample(s, frame_times(s), tok), tok)
            gt = truth[vid(s)]
            assert [(ev.times, ev.scores, ev.caption) for ev in got.events] == [
                ((e["start"], e["end"]), (), e["caption"]) for e in gt
            ]
            assert vtg.instruction(s) == "Localize every event in the video and describe it."


def test_real_decoded_frame_times(by_format, tok):
    """The times the video loader decodes go into the video block unchanged (the sample is not re-decoded)."""
    samples = by_format["activitynet"][:2]
    ds = VTGDataset(
        samples, VideoDecoder(DecoderConfig(sampling=SamplingConfig(num_frames=5), transform=None)), BadInputs()
    )
    for i in range(len(samples)):
        fs = ds.get(i)
        assert fs is not None
        times = fs.timestamps.tolist()
        ts = vtg.tokenize_sample(fs.sample, fs.timestamps, tok)
        check_layout(ts, fs.sample, times, tok)
        assert ts.frame_times.dtype == torch.float64 and ts.num_frames == 5
        assert len(set(times)) == 5 and times[-1] < fs.duration


def test_prompt_only_samples(by_format, tok, synth, tmp_path):
    s = by_format["charades_sta"][0]
    full = vtg.tokenize_sample(s, [0.0, 2.0], tok)
    prompt = vtg.tokenize_sample(s, [0.0, 2.0], tok, with_response=False)
    assert prompt.length == prompt.response_start == full.response_start
    assert torch.equal(prompt.ids, full.ids[: full.response_start]) and prompt.loss_mask.sum() == 0
    assert prompt.event_starts == () and tok.eos_id not in prompt.ids[1:].tolist()
    # a QVHighlights test-release line (no windows): prompt only, and a clear error when asked for targets
    line = {"qid": 99, "query": "a red circle appears", "duration": 10.0, "vid": vid(s)}
    (tmp_path / "test.jsonl").write_text(json.dumps(line) + "\n")
    (q,) = read_annotations("qvhighlights", tmp_path / "test.jsonl", ReaderConfig(synth / "videos"), BadInputs())
    qp = vtg.tokenize_sample(q, [1.0], tok, with_response=False)
    assert qp.length == 1 + PER_FRAME + len(tok.encode(vtg.instruction(q)))
    assert qp.frame_relevance.tolist() == [-1.0]  # no events: no frame target
    with pytest.raises(ValueError, match=r"qvhighlights:test:99:mr \(.*test.jsonl:1\): no target event"):
        vtg.tokenize_sample(q, [1.0], tok)


def test_bad_inputs_name_the_sample(by_format, tok):
    s = by_format["charades_sta"][0]
    with pytest.raises(ValueError, match=f"{s.sample_id}.*no frame times"):
        vtg.tokenize_sample(s, [], tok)
    with pytest.raises(ValueError, match=f"{s.sample_id}.*frame 1 time is nan"):
        vtg.tokenize_sample(s, [0.0, float("nan")], tok)
    with pytest.raises(ValueError, match=f"{s.sample_id}.*go backwards at frame 2"):
        vtg.tokenize_sample(s, [0.0, 2.0, 1.0], tok)
    bad_query = VTGSample("x:1", s.video, 10.0, Task.MOMENT_RETRIEVAL, "a <sync> b", (Event(1, 2),), "f.txt:3")
    with pytest.raises(ValueError, match=r"x:1 \(f.txt:3\): instruction: .*reserved"):
        vtg.tokenize_sample(bad_query, [0.0], tok)
    bad_cap = VTGSample("y:2", s.video, 10.0, Task.DENSE_CAPTIONING, "", (Event(1, 2, caption="<sync>!"),), "g:4")
    with pytest.raises(ValueError, match=r"y:2 \(g:4\): event 0: caption"):
        vtg.tokenize_sample(bad_cap, [0.0], tok)
    no_sal = VTGSample("z:3", s.video, 10.0, Task.HIGHLIGHT_DETECTION, "q", (Event(0, 2),), "h:5")
    with pytest.raises(ValueError, match=r"z:3 \(h:5\): highlight clips \[0\] have no saliency"):
        vtg.tokenize_sample(no_sal, [0.0], tok)
    with pytest.raises(ValueError, match="slots_per_frame"):
        vtg.SequenceConfig(slots_per_frame=0)


def test_slots_per_frame_and_moment_score_are_configurable(by_format, tok):
    s = by_format["charades_sta"][0]
    cfg = vtg.SequenceConfig(slots_per_frame=4, moment_score=2.5, query_first=False)
    ts = vtg.tokenize_sample(s, [0.0, 1.0], tok, cfg)
    assert ts.types[1:12].tolist() == [VISUAL] * 4 + [TIME] * 7 and ts.visual_positions.tolist()[4:] == [12, 13, 14, 15]
    assert ts.frame_positions.tolist() == [11, 22]
    assert response(ts, tok).events[0].scores == (2.5,)


def test_collate_pads_to_a_fixed_length(by_format, tok):
    a = vtg.tokenize_sample(by_format["charades_sta"][0], [0.0, 1.0, 2.0], tok)
    b = vtg.tokenize_sample(by_format["activitynet"][0], [0.5, 1.5], tok)
    L = max(a.length, b.length) + 7
    batch = vtg.collate([a, b], L, tok.pad_id)
    assert batch.ids.shape == batch.types.shape == batch.loss_mask.shape == (2, L)
    for i, s in enumerate((a, b)):
        assert torch.equal(batch.ids[i, : s.length], s.ids) and torch.equal(batch.types[i, : s.length], s.types)
        assert torch.equal(batch.loss_mask[i, : s.length], s.loss_mask)
        assert (batch.ids[i, s.length :] == tok.pad_id).all() and (batch.types[i, s.length :] == TEXT).all()
        assert (batch.loss_mask[i, s.length :] == 0).all()
        nv = s.visual_positions.numel()
        assert torch.equal(batch.visual_positions[i, :nv], s.visual_positions)
        assert (batch.visual_positions[i, nv:] == -1).all()
        assert torch.equal(batch.frame_times[i, : s.num_frames], s.frame_times)
        targets = torch.full((L,), -1.0)
        targets[s.frame_positions] = s.frame_relevance
        assert torch.equal(batch.frame_targets[i], targets)
    assert batch.visual_positions.shape == (2, 24) and batch.frame_times.shape == (2, 3)
    assert batch.num_frames.tolist() == [3, 2] and batch.lengths.tolist() == [a.length, b.length]
    assert batch.sample_ids == (a.sample_id, b.sample_id) and batch.dropped_events == (0, 0)
    assert batch.loss_mask.sum().item() == (a.length - a.response_start) + (b.length - b.response_start)


def test_collate_overflow(by_format, tok):
    dense = next(s for s in by_format["activitynet"] if len(s.events) >= 2)
    ts = vtg.tokenize_sample(dense, [0.0, 1.0], tok)
    fits = vtg.tokenize_sample(by_format["charades_sta"][0], [0.0], tok)
    with pytest.raises(
        vtg.SequenceTooLong, match=f"{dense.sample_id} .*{ts.length} positions .*seq_len {ts.length - 1}"
    ):
        vtg.collate([fits, ts], ts.length - 1, tok.pad_id)
    # drop_events: whole events go from the end, EOS comes back, at least one event stays
    cut = ts.event_starts[-1] + 1  # room for all events but the last, plus EOS
    short = vtg.tokenize_sample(dense, [0.0], tok, with_response=False)
    assert short.length < cut
    batch = vtg.collate([short, ts], cut, tok.pad_id, eos_id=tok.eos_id, overflow="drop_events")
    assert batch.dropped_events == (0, 1) and batch.lengths.tolist() == [short.length, cut]
    row_ids, row_types = batch.ids[1], batch.types[1]
    got = E.parse_response(row_ids[ts.response_start :], row_types[ts.response_start :], tok)
    full = response(ts, tok).events
    assert got.ok and got.events == full[:-1]
    assert batch.loss_mask[1].sum().item() == cut - ts.response_start and batch.loss_mask[1, -1] == 1
    first_only = ts.event_starts[1] + 1
    batch = vtg.collate([ts], first_only, tok.pad_id, eos_id=tok.eos_id, overflow="drop_events")
    assert batch.dropped_events == (len(ts.event_starts) - 1,)
    with pytest.raises(vtg.SequenceTooLong, match=f"{dense.sample_id} .*first event alone needs {first_only}"):
        vtg.collate([ts], first_only - 1, tok.pad_id, eos_id=tok.eos_id, overflow="drop_events")
    with pytest.raises(ValueError, match="needs eos_id"):
        vtg.collate([ts], 10, tok.pad_id, overflow="drop_events")
    with pytest.raises(ValueError, match="overflow 'truncate'"):
        vtg.collate([ts], 10, tok.pad_id, overflow="truncate")


def test_write_corpus(by_format, tmp_path):
    samples = [s for ss in by_format.values() for s in ss]
    extra = VTGSample("w:1", "v.mp4", 5.0, Task.DENSE_CAPTIONING, "", (Event(0, 1, caption="a <sync>  b\nc"),), "w")
    n = vtg.write_corpus([*samples, extra], tmp_path / "sub" / "c.txt")
    lines = (tmp_path / "sub" / "c.txt").read_text(encoding="utf-8").splitlines()
    captions = [ev.caption for s in samples for ev in s.events if ev.caption]
    assert n == len(lines) == len(samples) + len(captions) + 2
    assert lines[: 1 + len(samples[0].events)][0] == vtg.instruction(samples[0])
    assert set(captions) <= set(lines) and {vtg.instruction(s) for s in samples} <= set(lines)
    assert lines[-2:] == [vtg.DENSE_DEFAULT, "a b c"]
    with pytest.raises(ValueError, match="no text to write"):
        vtg.write_corpus([], tmp_path / "empty.txt")
