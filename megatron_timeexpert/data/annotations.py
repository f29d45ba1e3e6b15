"""Readers for the real VTG annotation formats, all producing :class:`~.types.VTGSample`.

=================  ===============================================================================
reader             format
=================  ===============================================================================
charades_sta       text, one moment per line: ``vid start end##sentence``
qvhighlights       jsonl: qid, query, duration, vid, relevant_windows, relevant_clip_ids,
                   saliency_scores (3 annotators per 2-second clip); gives a moment-retrieval and a
                   highlight-detection sample per line
youcook2           json ``{"database": {vid: {"duration", "annotations": [{"segment", "sentence"}]}}}``
activitynet        json ``{vid: {"duration", "timestamps": [[s, e]], "sentences": [...]}}``
instruction        json list (or jsonl) of ``{"video", "conversations", "times", "scores"}`` with
                   optional ``duration``, ``task`` and ``captions``
=================  ===============================================================================

Bad entries (non-UTF-8 text, malformed JSON lines, NaN or inverted times, times beyond the
duration, unknown video ids) go through :class:`~.stats.BadInputs`: skipped and counted, or a
:class:`~.stats.DataError` under the fail policy. Problems only the user can fix (the file is
missing, a whole-file JSON does not parse, the top level has the wrong shape) always raise.

Sample ids are ``<reader>:<annotation file stem>:<key>`` (key: line number, qid, video id or entry),
so they stay unique when several files (train/val/test, ActivityNet val_1 and val_2) are combined.
A dense-caption segment that is bad is skipped alone; the video's other events are kept.
QVHighlights lines without ``relevant_windows`` (the test release) become query-only samples
(no events) for prediction. Charades-STA ends past the video are clamped, not skipped (see
:mod:`.dataset`; with ``ReaderConfig.durations`` the reader clamps them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from megatron_timeexpert.data import stats as S
from megatron_timeexpert.data.stats import BadInputs, DataError
from megatron_timeexpert.data.types import Event, Task, VTGSample

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")


@dataclass
class ReaderConfig:
    """Where videos live and how strictly times are checked."""

    video_root: Path
    """Directory holding the videos; ids resolve to ``video_root/<id><ext>`` (instruction paths are relative to it)."""
    time_tolerance: float = 0.5
    """Seconds an end time may exceed the duration and be clamped (counted as ``repaired``) instead of skipped."""
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS
    """File extensions tried, in order, when resolving a video id."""
    durations: dict[str, float] | None = None
    """Optional ``{vid: seconds}`` for formats that carry no duration (Charades-STA)."""
    clip_length: float = 2.0
    """QVHighlights clip length in seconds (clip ``i`` spans ``[i*L, (i+1)*L]``)."""

    def __post_init__(self) -> None:
        self.video_root = Path(self.video_root)


# ---- shared helpers -------------------------------------------------------------------------------


def _lines(path: Path, bad: BadInputs) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; lines that are not UTF-8 are reported."""
    data = _read_bytes(path)
    for n, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            bad.report(S.NON_UTF8, str(path), n, f"byte {raw[exc.start]:#04x} at column {exc.start + 1}")
            continue
        if text:
            yield n, text


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    return path.read_bytes()


def _load_json(path: Path, bad: BadInputs) -> Any:
    """Parse a whole-file JSON document. Undecodable bytes: fail policy raises naming the line;
    skip policy keeps them as surrogates so the entries holding them can be skipped one by one."""
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        if bad.policy == "fail":
            raise DataError(f"{path}:{line}: {S.NON_UTF8}: byte {data[exc.start]:#04x} is not UTF-8") from None
        text = data.decode("utf-8", errors="surrogateescape")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: {S.MALFORMED_JSON}: {exc.msg} (fix the file)") from None


def _has_bad_text(obj: Any) -> bool:
    """True if any string inside ``obj`` carries undecodable bytes (surrogate escapes)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, dict):
        return any(_has_bad_text(k) or _has_bad_text(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_bad_text(v) for v in obj)
    return False


def _resolve(vid: str, cfg: ReaderConfig) -> Path | None:
    """The video file for an id (or a relative path with its extension), or None."""
    direct = cfg.video_root / vid
    if direct.suffix.lower() in cfg.extensions and direct.exists():
        return direct
    for ext in cfg.extensions:
        p = cfg.video_root / f"{vid}{ext}"
        if p.exists():
            return p
    return None


class _Skip(Exception):
    """Internal: the current entry was reported and must be dropped."""


def _time(value: Any, file: str, where: str, field: str, bad: BadInputs) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        bad.report(S.MALFORMED_LINE, file, where, f"{field} is {value!r}, not a number")
        raise _Skip
    try:
        t = float(value)
    except ValueError:
        bad.report(S.MALFORMED_LINE, file, where, f"{field} is {value!r}, not a number")
        raise _Skip from None
    if not math.isfinite(t):
        bad.report(S.NAN_TIME, file, where, f"{field} is {value!r}")
        raise _Skip
    return t


def _span(
    pair: Any,
    duration: float | None,
    file: str,
    where: str,
    field: str,
    cfg: ReaderConfig,
    bad: BadInputs,
    clamp_any: bool = False,
) -> tuple[float, float]:
    """A checked ``(start, end)``: numbers, finite, 0 <= start <= end <= duration (+ tolerance, clamped).

    ``clamp_any``: clamp an end however far past the duration (Charades-STA), as long as the start is within it.
    """
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        bad.report(S.MALFORMED_LINE, file, where, f"{field} is {pair!r}, not [start, end]")
        raise _Skip
    s = _time(pair[0], file, where, f"{field}[0]", bad)
    e = _time(pair[1], file, where, f"{field}[1]", bad)
    if s > e:
        bad.report(S.START_AFTER_END, file, where, f"{field} = [{s}, {e}]")
        raise _Skip
    if s < 0:
        bad.report(S.TIME_BEYOND_DURATION, file, where, f"{field} starts before 0: [{s}, {e}]")
        raise _Skip
    if duration is not None:
        if s > duration or (e > duration + cfg.time_tolerance and not clamp_any):
            bad.report(S.TIME_BEYOND_DURATION, file, where, f"{field} = [{s}, {e}] but duration is {duration}")
            raise _Skip
        if e > duration:
            bad.note(S.CLAMPED_TIME, file, where, f"{field} end {e} clamped to {duration}")
            e = duration
    return s, e


def _duration(value: Any, file: str, where: str, bad: BadInputs) -> float:
    d = _time(value, file, where, "duration", bad)
    if d <= 0:
        bad.report(S.MALFORMED_LINE, file, where, f"duration is {d}")
        raise _Skip
    return d


def _video(vid: Any, file: str, where: str, cfg: ReaderConfig, bad: BadInputs) -> str:
    if not isinstance(vid, str) or not vid:
        bad.report(S.MISSING_FIELD, file, where, f"video id is {vid!r}")
        raise _Skip
    path = _resolve(vid, cfg)
    if path is None:
        bad.report(S.UNKNOWN_VIDEO, file, where, f"no file for video id {vid!r} under {cfg.video_root}")
        raise _Skip
    return str(path)


def _field(entry: dict, name: str, file: str, where: str, bad: BadInputs) -> Any:
    if not isinstance(entry, dict) or name not in entry:
        bad.report(S.MISSING_FIELD, file, where, f"no {name!r}")
        raise _Skip
    return entry[name]


def _finish(samples: list[VTGSample], path: Path, bad: BadInputs) -> list[VTGSample]:
    if not samples:
        raise DataError(f"{path}: no usable sample (skipped: {bad.summary()}); is this the right format?")
    bad.add_read(len(samples))
    return samples


# ---- readers -------------------------------------------------------------------------------------


def read_charades_sta(path: str | Path, cfg: ReaderConfig, bad: BadInputs) -> list[VTGSample]:
    """Charades-STA: ``vid start end##sentence`` per line -> moment-retrieval samples."""
    path, file, out = Path(path), str(path), []
    for n, line in _lines(path, bad):
        try:
            head, sep, sentence = line.partition("##")
            parts = head.split()
            if not sep or len(parts) != 3 or not sentence.strip():
                bad.report(S.MALFORMED_LINE, file, n, f"expected 'vid start end##sentence', got {line[:80]!r}")
                continue
            vid = parts[0]
            duration = (cfg.durations or {}).get(vid)
            video = _video(vid, file, str(n), cfg, bad)
            s, e = _span(parts[1:], duration, file, str(n), "start/end", cfg, bad, clamp_any=True)
            out.append(
                VTGSample(
                    f"charades_sta:{path.stem}:{n}", video, duration, Task.MOMENT_RETRIEVAL, sentence.strip(),
                    (Event(s, e),), f"{file}:{n}", "charades_sta",
                )
            )  # fmt: skip
        except _Skip:
            continue
    return _finish(out, path, bad)


def read_qvhighlights(path: str | Path, cfg: ReaderConfig, bad: BadInputs) -> list[VTGSample]:
    """QVHighlights jsonl -> a moment-retrieval and a highlight-detection sample per line."""
    path, file, out = Path(path), str(path), []
    L = cfg.clip_length
    for n, line in _lines(path, bad):
        where = str(n)
        try:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.report(S.MALFORMED_JSON, file, n, f"column {exc.colno}: {exc.msg}")
                continue
            qid = _field(entry, "qid", file, where, bad)
            query = _field(entry, "query", file, where, bad)
            duration = _duration(_field(entry, "duration", file, where, bad), file, where, bad)
            video = _video(_field(entry, "vid", file, where, bad), file, where, cfg, bad)
            if isinstance(entry, dict) and "relevant_windows" not in entry:
                # A query-only line (the QVHighlights test release): a sample to predict for, no targets.
                base = dict(video=video, duration=duration, query=str(query), source=f"{file}:{n}")
                out.append(VTGSample(f"qvhighlights:{path.stem}:{qid}:mr", task=Task.MOMENT_RETRIEVAL, events=(),
                                     dataset="qvhighlights", **base))  # fmt: skip
                continue
            windows = _field(entry, "relevant_windows", file, where, bad)
            if not isinstance(windows, list) or not windows:
                bad.report(S.MISSING_FIELD, file, n, "relevant_windows is empty")
                continue
            spans = [_span(w, duration, file, where, f"relevant_windows[{i}]", cfg, bad) for i, w in enumerate(windows)]
            clips = _field(entry, "relevant_clip_ids", file, where, bad)
            scores = _field(entry, "saliency_scores", file, where, bad)
            if not isinstance(clips, list) or not isinstance(scores, list) or len(clips) != len(scores):
                bad.report(S.MALFORMED_LINE, file, n, "relevant_clip_ids and saliency_scores differ in length")
                continue
            hl = []
            for cid, sc in zip(clips, scores):
                if not isinstance(cid, int) or not isinstance(sc, list) or len(sc) != 3:
                    bad.report(S.MALFORMED_LINE, file, n, f"clip {cid!r}: scores {sc!r} are not 3 annotators")
                    raise _Skip
                vals = [_time(v, file, where, f"saliency_scores[clip {cid}]", bad) for v in sc]
                s, e = _span([cid * L, min((cid + 1) * L, duration)], duration, file, where, f"clip {cid}", cfg, bad)
                hl.append(Event(s, e, saliency=sum(vals) / 3.0))
        except _Skip:
            continue
        spans.sort()
        base = dict(video=video, duration=duration, query=str(query), source=f"{file}:{n}", dataset="qvhighlights")
        out.append(
            VTGSample(
                f"qvhighlights:{path.stem}:{qid}:mr",
                task=Task.MOMENT_RETRIEVAL,
                events=tuple(Event(s, e) for s, e in spans),
                **base,
            )
        )
        out.append(
            VTGSample(f"qvhighlights:{path.stem}:{qid}:hd", task=Task.HIGHLIGHT_DETECTION, events=tuple(hl), **base)
        )
    return _finish(out, path, bad)


def _caption_entries(name: str, path: Path, table: dict, cfg: ReaderConfig, bad: BadInputs, pairs) -> list[VTGSample]:
    """Shared body of the dense-caption readers: ``pairs(entry)`` yields (span, sentence)."""
    file, out = str(path), []
    for vid, entry in table.items():
        where = f"{vid}"
        try:
            if _has_bad_text(entry) or _has_bad_text(vid):
                bad.report(S.NON_UTF8, file, where, "entry holds bytes that are not UTF-8")
                continue
            duration = _duration(_field(entry, "duration", file, where, bad), file, where, bad)
            video = _video(vid, file, where, cfg, bad)
            events, dropped = [], 0
            for i, (span, sentence) in enumerate(pairs(entry, file, where)):
                try:
                    s, e = _span(span, duration, file, where, f"segment {i}", cfg, bad)
                except _Skip:
                    dropped += 1  # reported; only this segment is lost
                    continue
                events.append(Event(s, e, caption=str(sentence).strip()))
        except _Skip:
            continue
        if not events:
            if not dropped:
                bad.report(S.MISSING_FIELD, file, where, "no events")
            continue
        events.sort(key=lambda ev: (ev.start, ev.end))
        out.append(
            VTGSample(
                f"{name}:{path.stem}:{vid}", video, duration, Task.DENSE_CAPTIONING,
                "Localize every event in the video and describe it.", tuple(events), f"{file}:{vid}", name,
            )
        )  # fmt: skip
    return _finish(out, path, bad)


def read_youcook2(path: str | Path, cfg: ReaderConfig, bad: BadInputs, subset: str | None = None) -> list[VTGSample]:
    """YouCook2 ``{"database": {vid: {duration, annotations: [{segment, sentence}]}}}`` -> dense captions."""
    path = Path(path)
    doc = _load_json(path, bad)
    if not isinstance(doc, dict) or not isinstance(doc.get("database"), dict):
        raise DataError(f"{path}:1: top level has no 'database' object; is this a YouCook2 file?")
    table = {k: v for k, v in doc["database"].items() if subset is None or v.get("subset") == subset}

    def pairs(entry, file, where):
        anns = _field(entry, "annotations", file, where, bad)
        if not isinstance(anns, list):
            bad.report(S.MALFORMED_LINE, file, where, "annotations is not a list")
            raise _Skip
        return [(_field(a, "segment", file, where, bad), _field(a, "sentence", file, where, bad)) for a in anns]

    return _caption_entries("youcook2", path, table, cfg, bad, pairs)


def read_activitynet(path: str | Path, cfg: ReaderConfig, bad: BadInputs) -> list[VTGSample]:
    """ActivityNet Captions ``{vid: {duration, timestamps, sentences}}`` -> dense captions."""
    path = Path(path)
    doc = _load_json(path, bad)
    if not isinstance(doc, dict) or any(not isinstance(v, dict) for v in doc.values()):
        raise DataError(f"{path}:1: expected {{video_id: {{duration, timestamps, sentences}}}}")

    def pairs(entry, file, where):
        ts = _field(entry, "timestamps", file, where, bad)
        sents = _field(entry, "sentences", file, where, bad)
        if not isinstance(ts, list) or not isinstance(sents, list) or len(ts) != len(sents):
            bad.report(S.MALFORMED_LINE, file, where, "timestamps and sentences differ in length")
            raise _Skip
        return list(zip(ts, sents))

    return _caption_entries("activitynet", path, doc, cfg, bad, pairs)


def _instruction_entries(path: Path, bad: BadInputs) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        for n, line in _lines(path, bad):
            try:
                yield str(n), json.loads(line)
            except json.JSONDecodeError as exc:
                bad.report(S.MALFORMED_JSON, str(path), n, f"column {exc.colno}: {exc.msg}")
        return
    doc = _load_json(path, bad)
    if not isinstance(doc, list):
        raise DataError(f"{path}:1: expected a JSON list of instruction entries")
    for i, entry in enumerate(doc):
        yield f"entry {i}", entry


def read_instruction(path: str | Path, cfg: ReaderConfig, bad: BadInputs) -> list[VTGSample]:
    """VTG instruction-tuning data: ``{video, conversations, times, scores[, duration, task, captions]}``.

    ``video`` is relative to ``video_root``. The first human turn is the query, the first assistant
    turn the answer. The task is ``task`` if given, else highlight detection when any score is
    present, dense captioning when there are several times, moment retrieval otherwise.
    """
    path, file, out = Path(path), str(path), []
    for where, entry in _instruction_entries(path, bad):
        try:
            if _has_bad_text(entry):
                bad.report(S.NON_UTF8, file, where, "entry holds bytes that are not UTF-8")
                continue
            rel = _field(entry, "video", file, where, bad)
            video = str(cfg.video_root / rel) if isinstance(rel, str) else _video(rel, file, where, cfg, bad)
            conv = _field(entry, "conversations", file, where, bad)
            human = [c.get("value", "") for c in conv if isinstance(c, dict) and c.get("from") == "human"]
            gpt = [c.get("value", "") for c in conv if isinstance(c, dict) and c.get("from") == "gpt"]
            if not human:
                bad.report(S.MISSING_FIELD, file, where, "conversations has no human turn")
                continue
            duration = _duration(entry["duration"], file, where, bad) if "duration" in entry else None
            times = _field(entry, "times", file, where, bad)
            scores = entry.get("scores") or [[] for _ in times]
            captions = entry.get("captions") or [None] * len(times)
            if not isinstance(times, list) or len(scores) != len(times) or len(captions) != len(times):
                bad.report(S.MALFORMED_LINE, file, where, "times, scores and captions differ in length")
                continue
            events = []
            for i, (span, sc, cap) in enumerate(zip(times, scores, captions)):
                s, e = _span(span, duration, file, where, f"times[{i}]", cfg, bad)
                vals = [_time(v, file, where, f"scores[{i}]", bad) for v in (sc if isinstance(sc, list) else [sc])]
                events.append(Event(s, e, saliency=sum(vals) / len(vals) if vals else None, caption=cap))
            task_name = entry.get("task")
            if task_name is None:
                task = (
                    Task.HIGHLIGHT_DETECTION if any(ev.saliency is not None for ev in events)
                    else Task.DENSE_CAPTIONING if len(events) > 1 else Task.MOMENT_RETRIEVAL
                )  # fmt: skip
            else:
                try:
                    task = Task(task_name)
                except ValueError:
                    bad.report(
                        S.MALFORMED_LINE, file, where, f"task {task_name!r} is not one of {[t.value for t in Task]}"
                    )
                    continue
        except _Skip:
            continue
        query = human[0].replace("<video>", "").strip()
        out.append(
            VTGSample(
                f"instruction:{path.stem}:{where}", video, duration, task, query, tuple(events), f"{file}:{where}",
                "instruction", answer=gpt[0] if gpt else None,
            )
        )  # fmt: skip
    return _finish(out, path, bad)


READERS = MappingProxyType(
    {
        "charades_sta": read_charades_sta,
        "qvhighlights": read_qvhighlights,
        "youcook2": read_youcook2,
        "activitynet": read_activitynet,
        "instruction": read_instruction,
    }
)


def read_annotations(fmt: str, path: str | Path, cfg: ReaderConfig, bad: BadInputs) -> list[VTGSample]:
    """Read ``path`` with the reader named ``fmt`` (a key of :data:`READERS`)."""
    if fmt not in READERS:
        raise DataError(f"{path}: unknown annotation format {fmt!r}; known: {sorted(READERS)}")
    return READERS[fmt](path, cfg, bad)


def as_moment_queries(samples: list[VTGSample]) -> list[VTGSample]:
    """Split dense-caption samples into one moment-retrieval sample per captioned event."""
    out = []
    for s in samples:
        if s.task is not Task.DENSE_CAPTIONING:
            out.append(s)
            continue
        for i, ev in enumerate(s.events):
            if ev.caption:
                out.append(
                    VTGSample(
                        f"{s.sample_id}:{i}", s.video, s.duration, Task.MOMENT_RETRIEVAL, ev.caption,
                        (Event(ev.start, ev.end),), s.source, s.dataset,
                    )
                )  # fmt: skip
    return out
