"""Annotation readers: the real formats (samples in tests/data/) and every bad-annotation case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_timeexpert.data.annotations import ReaderConfig, as_moment_queries, read_annotations
from megatron_timeexpert.data.stats import BadInputs, DataError
from megatron_timeexpert.data.types import Task

DATA = Path(__file__).parent / "data"
IDS = ["3MSZA", "9KJZV", "AO8RW", "bP5KfdFJzC4_660.0_810.0", "RoripwjYFp8_360.0_510.0", "GLd3aX16zBg",
       "xHr8X2Wpmno", "v_QOlSCBRmfWY", "v_ehGHCYKzyZ8"]  # fmt: skip
DURATIONS = {"3MSZA": 31.5, "9KJZV": 30.0, "AO8RW": 20.0}


@pytest.fixture
def root(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for vid in IDS:  # the readers only resolve ids to files; decoding is the data set's job
        (videos / f"{vid}.mp4").write_bytes(b"x")
    return videos


def cfg(root, **kw):
    return ReaderConfig(root, durations=dict(DURATIONS), **kw)


def test_charades_sta_sample(root):
    bad = BadInputs()
    s = read_annotations("charades_sta", DATA / "charades_sta_sample.txt", cfg(root), bad)
    assert [x.query for x in s][0] == "person turn a light on."
    assert s[0].events[0].start == 24.3 and s[0].events[0].end == 30.4 and s[0].duration == 31.5
    assert s[0].video == str(root / "3MSZA.mp4") and s[0].source.endswith("charades_sta_sample.txt:1")
    assert {x.task for x in s} == {Task.MOMENT_RETRIEVAL} and len(s) == 4
    assert bad.summary() == {"read": 4, "good": 0, "skipped": 0, "bad/total": 0}  # good: decoded, none yet


def test_qvhighlights_sample(root):
    s = read_annotations("qvhighlights", DATA / "qvhighlights_sample.jsonl", cfg(root), BadInputs())
    assert [x.task for x in s] == [Task.MOMENT_RETRIEVAL, Task.HIGHLIGHT_DETECTION] * 2
    mr, hd = s[2], s[3]
    assert [(e.start, e.end) for e in mr.events] == [(96, 114), (122, 126)]
    assert len(hd.events) == 14 and (hd.events[0].start, hd.events[0].end) == (96, 98)
    assert hd.events[0].saliency == pytest.approx(7 / 3)  # mean of the 3 annotators
    assert hd.events[7].start == 112  # clip ids 54 -> 56 skip clip 55


def test_youcook2_sample(root):
    s = read_annotations("youcook2", DATA / "youcook2_sample.json", cfg(root), BadInputs())
    assert len(s) == 2 and s[0].task is Task.DENSE_CAPTIONING and s[0].duration == 241.62
    assert [e.caption for e in s[0].events][1] == "place a slice of cheese on the bread"
    moments = as_moment_queries(s)
    assert len(moments) == 5 and moments[0].query == "spread margarine on two slices of white bread"
    assert moments[0].task is Task.MOMENT_RETRIEVAL and moments[0].events[0].start == 90


def test_activitynet_sample(root):
    s = read_annotations("activitynet", DATA / "activitynet_sample.json", cfg(root), BadInputs())
    assert [len(x.events) for x in s] == [3, 2]
    assert s[0].events[1].caption == "The girl dances around the room while the camera captures her movements."


def test_instruction_sample(root):
    for sub in ("activitynet", "charades", "qvhighlights"):
        (root / sub).mkdir()
    s = read_annotations("instruction", DATA / "instruction_sample.json", cfg(root), BadInputs())
    assert [x.task for x in s] == [Task.DENSE_CAPTIONING, Task.MOMENT_RETRIEVAL, Task.HIGHLIGHT_DETECTION]
    assert s[0].video == str(root / "activitynet/v_QOlSCBRmfWY.mp4")
    assert s[0].query.startswith("Localize a series") and s[0].answer.startswith("<sync>")
    assert s[0].events[2].caption == "She ends by laying on the floor."
    assert s[2].events[0].saliency == pytest.approx(3.3)


# ---- bad annotations: skipped and counted (no good sample lost), or a clear error ------------------


def _write(tmp_path, name, data: bytes | str) -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


GOOD_CH = "3MSZA 1.0 2.0##one.\n9KJZV 3.0 4.0##two.\n"
CHARADES_BAD = {
    "start_after_end": ("AO8RW 9.0 2.0##backwards.\n", 3),
    "nan_time": ("AO8RW nan 2.0##not a number.\n", 3),
    "time_beyond_duration": ("AO8RW 21.0 25.0##starts past the end.\n", 3),  # an end alone is clamped
    "unknown_video": ("NOSUCH 1.0 2.0##who?\n", 3),
    "malformed_line": ("AO8RW 1.0 2.0 no separator\n", 3),
    "non_utf8": (b"AO8RW 1.0 2.0##caf\xe9 au lait\n", 3),
}


@pytest.mark.parametrize("reason", sorted(CHARADES_BAD))
def test_charades_bad_line_skipped_and_counted(tmp_path, root, reason):
    line, lineno = CHARADES_BAD[reason]
    data = GOOD_CH.encode() + (line if isinstance(line, bytes) else line.encode()) + b"AO8RW 5.0 6.0##three.\n"
    path = _write(tmp_path, "ch.txt", data)
    bad = BadInputs("skip")
    s = read_annotations("charades_sta", path, cfg(root), bad)
    assert [x.query for x in s] == ["one.", "two.", "three."]  # no good sample lost
    assert bad.summary()["bad/total"] == 1 and bad.summary()[f"bad/{reason}"] == 1
    (rec,) = bad.examples
    assert rec.file == str(path) and rec.where == str(lineno)
    with pytest.raises(DataError, match=rf"ch\.txt:{lineno}: {reason}"):
        read_annotations("charades_sta", path, cfg(root), BadInputs("fail"))


def _qv(**kw):
    d = {"qid": 1, "query": "q", "duration": 20, "vid": "3MSZA", "relevant_windows": [[2, 6]],
         "relevant_clip_ids": [1, 2], "saliency_scores": [[1, 2, 3], [4, 4, 4]]}  # fmt: skip
    d.update(kw)
    return json.dumps(d)


QV_BAD = {
    "malformed_json": '{"qid": 5, "query": "cut off',
    "nan_time": _qv(qid=5, relevant_windows=[[float("nan"), 4]]),
    "start_after_end": _qv(qid=5, relevant_windows=[[8, 4]]),
    "time_beyond_duration": _qv(qid=5, relevant_windows=[[2, 40]]),
    "unknown_video": _qv(qid=5, vid="nope_0.0_150.0"),
    "malformed_line": _qv(qid=5, saliency_scores=[[1, 2], [3, 4]]),
    "missing_field": _qv(qid=5, relevant_windows=[]),
}


@pytest.mark.parametrize("reason", sorted(QV_BAD))
def test_qvhighlights_bad_line_skipped_and_counted(tmp_path, root, reason):
    path = _write(tmp_path, "qv.jsonl", "\n".join([_qv(qid=1), QV_BAD[reason], _qv(qid=2), ""]))
    bad = BadInputs("skip")
    s = read_annotations("qvhighlights", path, cfg(root), bad)
    assert [x.sample_id for x in s] == [
        "qvhighlights:qv:1:mr",
        "qvhighlights:qv:1:hd",
        "qvhighlights:qv:2:mr",
        "qvhighlights:qv:2:hd",
    ]
    assert bad.summary()[f"bad/{reason}"] == 1 and bad.total == 1 and bad.examples[0].where == "2"
    with pytest.raises(DataError, match=rf"qv\.jsonl:2: {reason}"):
        read_annotations("qvhighlights", path, cfg(root), BadInputs("fail"))


def test_qvhighlights_non_utf8_line(tmp_path, root):
    latin1 = _qv(qid=9).encode().replace(b'"query": "q"', b'"query": "caf\xe9"')
    path = _write(tmp_path, "qv.jsonl", _qv(qid=1).encode() + b"\n" + latin1 + b"\n")
    bad = BadInputs()
    assert len(read_annotations("qvhighlights", path, cfg(root), bad)) == 2
    assert bad.summary()["bad/non_utf8"] == 1 and "0xe9" in bad.examples[0].detail


def test_end_slightly_past_duration_is_clamped_and_counted(tmp_path, root):
    doc = {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.8, 19.8], [60.0, 83.0]], "sentences": ["a", "b"]}}
    path = _write(tmp_path, "anet.json", json.dumps(doc))
    bad = BadInputs()
    (s,) = read_annotations("activitynet", path, cfg(root), bad)
    assert s.events[1].end == 82.73
    assert bad.summary() == {"read": 1, "good": 0, "skipped": 0, "bad/total": 0, "repaired/clamped_time": 1}


def test_activitynet_bad_entries(tmp_path, root):
    doc = {
        "v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.8, 19.8]], "sentences": ["good"]},
        "v_ehGHCYKzyZ8": {"duration": 61.72, "timestamps": [[5, 2]], "sentences": ["backwards"]},
        "v_unknown": {"duration": 10, "timestamps": [[1, 2]], "sentences": ["who"]},
        "AO8RW": {"duration": 10, "timestamps": [[1, 2], [3, 4]], "sentences": ["one sentence short"]},
    }
    path = _write(tmp_path, "anet.json", json.dumps(doc))
    bad = BadInputs()
    s = read_annotations("activitynet", path, cfg(root), bad)
    assert [x.sample_id for x in s] == ["activitynet:anet:v_QOlSCBRmfWY"]
    summary = bad.summary()
    assert (summary["bad/start_after_end"], summary["bad/unknown_video"], summary["bad/malformed_line"]) == (1, 1, 1)
    assert {b.where for b in bad.examples} == {"v_ehGHCYKzyZ8", "v_unknown", "AO8RW"}


def test_youcook2_non_utf8_entry(tmp_path, root):
    raw = (DATA / "youcook2_sample.json").read_bytes().replace(b"thin pieces", b"thin pi\xe8ces")
    path = _write(tmp_path, "yc2.json", raw)
    bad = BadInputs()
    s = read_annotations("youcook2", path, cfg(root), bad)
    assert [x.sample_id for x in s] == ["youcook2:yc2:GLd3aX16zBg"]
    assert bad.summary()["bad/non_utf8"] == 1 and bad.examples[0].where == "xHr8X2Wpmno"
    line = raw[: raw.index(b"\xe8")].count(b"\n") + 1
    with pytest.raises(DataError, match=rf"yc2\.json:{line}: non_utf8"):
        read_annotations("youcook2", path, cfg(root), BadInputs("fail"))


def test_whole_file_problems_always_raise_naming_file_and_line(tmp_path, root):
    broken = _write(tmp_path, "yc2.json", '{"database": {\n  "GLd3aX16zBg": {"duration": 1,,}\n}}')
    with pytest.raises(DataError, match=r"yc2\.json:2:\d+: malformed_json"):
        read_annotations("youcook2", broken, cfg(root), BadInputs("skip"))
    wrong = _write(tmp_path, "wrong.json", json.dumps({"GLd3aX16zBg": {}}))
    with pytest.raises(DataError, match=r"wrong\.json:1: top level has no 'database'"):
        read_annotations("youcook2", wrong, cfg(root), BadInputs("skip"))
    with pytest.raises(DataError, match=r"missing\.txt: annotation file not found"):
        read_annotations("charades_sta", tmp_path / "missing.txt", cfg(root), BadInputs("skip"))
    all_bad = _write(tmp_path, "allbad.txt", "NOSUCH 1 2##x\n")
    with pytest.raises(DataError, match=r"allbad\.txt: no usable sample"):
        read_annotations("charades_sta", all_bad, cfg(root), BadInputs("skip"))


def test_instruction_bad_entries(tmp_path, root):
    good = {"video": "3MSZA.mp4", "duration": 31.5, "conversations": [{"from": "human", "value": "<video>\nq"}],
            "times": [[1, 2]], "scores": [[]]}  # fmt: skip
    entries = [
        good,
        {**good, "times": [[1, 2], [3, 4]]},  # scores has one entry for two times
        {**good, "task": "video_qa"},
        {**good, "times": [[float("nan"), 2]]},
        {**good, "conversations": [{"from": "gpt", "value": "no question"}]},
        {**good, "video": "missing.mp4"},  # kept: the data set reports the missing file when decoding
    ]
    path = _write(tmp_path, "inst.json", json.dumps(entries))
    bad = BadInputs()
    s = read_annotations("instruction", path, cfg(root), bad)
    assert [x.sample_id for x in s] == ["instruction:inst:entry 0", "instruction:inst:entry 5"]
    assert bad.summary() == {
        "read": 2,
        "good": 0,
        "skipped": 4,
        "bad/total": 4,
        "bad/malformed_line": 2,
        "bad/missing_field": 1,
        "bad/nan_time": 1,
    }
    with pytest.raises(DataError, match=r"inst\.json:entry 1: malformed_line"):
        read_annotations("instruction", path, cfg(root), BadInputs("fail"))


# ---- real annotation files: every valid query is read (issue 8) -----------------------------------


def test_charades_ends_past_the_video_are_clamped_and_counted_not_dropped(tmp_path, root):
    """Official Charades-STA files have ends up to ~1.5 s past the video; standard loaders clamp them."""
    text = "AO8RW 10.0 21.4##ends 1.4 s late.\nAO8RW 3.0 4.0##fine.\nAO8RW 20.5 22.0##starts after the end.\n"
    path = _write(tmp_path, "ch.txt", text)
    bad = BadInputs()
    s = read_annotations("charades_sta", path, cfg(root), bad)
    assert [(x.query, x.events[0].end) for x in s] == [("ends 1.4 s late.", 20.0), ("fine.", 4.0)]
    summary = bad.summary()
    assert summary["repaired/clamped_time"] == 1 and summary["bad/time_beyond_duration"] == 1


def test_qvhighlights_query_only_test_split_is_readable(tmp_path, root):
    """The QVHighlights test release has no relevant_windows: its queries are what users predict for."""
    lines = [json.dumps({"qid": q, "query": f"query {q}", "duration": 150, "vid": "3MSZA"}) for q in (7, 8)]
    path = _write(tmp_path, "highlight_test_release.jsonl", "\n".join(lines) + "\n")
    bad = BadInputs("fail")
    s = read_annotations("qvhighlights", path, cfg(root), bad)
    assert [(x.sample_id, x.query, x.events, x.task) for x in s] == [
        ("qvhighlights:highlight_test_release:7:mr", "query 7", (), Task.MOMENT_RETRIEVAL),
        ("qvhighlights:highlight_test_release:8:mr", "query 8", (), Task.MOMENT_RETRIEVAL),
    ]
    assert bad.summary()["read"] == 2 and bad.total == 0


def test_one_bad_activitynet_segment_skips_only_that_segment(tmp_path, root):
    doc = {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.8, 19.8], [30, 20], [40, 50]],
                             "sentences": ["a", "backwards", "c"]}}  # fmt: skip
    path = _write(tmp_path, "anet.json", json.dumps(doc))
    bad = BadInputs()
    (s,) = read_annotations("activitynet", path, cfg(root), bad)
    assert [e.caption for e in s.events] == ["a", "c"]
    assert bad.summary()["bad/start_after_end"] == 1 and bad.total == 1
    assert bad.examples[0].where == "v_QOlSCBRmfWY" and "segment 1" in bad.examples[0].detail


def test_sample_ids_are_unique_across_files(tmp_path, root):
    bad = BadInputs()
    ch = [read_annotations("charades_sta", _write(tmp_path, f"charades_sta_{split}.txt", GOOD_CH), cfg(root), bad)
          for split in ("train", "test")]  # fmt: skip
    doc = {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.8, 19.8]], "sentences": ["a"]}}
    anet = [read_annotations("activitynet", _write(tmp_path, f"{split}.json", json.dumps(doc)), cfg(root), bad)
            for split in ("val_1", "val_2")]  # fmt: skip
    ids = [x.sample_id for group in ch + anet for x in group]
    assert len(ids) == len(set(ids)) == 6
    assert ids[0] == "charades_sta:charades_sta_train:1" and ids[-1] == "activitynet:val_2:v_QOlSCBRmfWY"
