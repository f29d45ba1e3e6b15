"""Reading and writing the public VTG formats for evaluation (no torch, no video files needed).

Ground truth (the data sets' public annotation files):

=====================  ==========================================================================
task                   accepted ground-truth formats
=====================  ==========================================================================
charades               Charades-STA text ``vid start end##sentence`` (qid = 0-based index of the
                       non-blank line), or TRACE's caption-coco JSON
                       ``{"annotations": [{"image_id", "caption", "timestamp": [s, e], "id"}]}``
qvhighlights           QVHighlights jsonl (``qid, query, duration, vid, relevant_windows,
                       relevant_clip_ids, saliency_scores``)
dvc                    YouCook2 ``{"database": {vid: {"duration", "annotations": [{"segment",
                       "sentence"}]}}}`` or ActivityNet Captions ``{vid: {"duration",
                       "timestamps", "sentences"}}``
=====================  ==========================================================================

Predictions (what ``timeexpert predict`` writes with the ``write_*`` functions here):

- moment retrieval: a JSON list or jsonl of ``{"vid", "query" and/or "qid", "pred_windows": [[s, e(, score)], ...]}``
  in ranked order (the first window is the top-1); also accepted: QVHighlights prediction lines
  (``pred_relevant_windows``) and TRACE's ``{qid: {"timestamp": [s, e], ...}}``.
- QVHighlights: jsonl of ``{"qid", "query", "vid", "pred_relevant_windows": [[s, e, score], ...],
  "pred_saliency_scores": [one per 2 s clip]}`` (moment_detr's submission format).
- dense captioning: ``{vid: [{"timestamp": [s, e], "caption"}]}`` or ActivityNet's
  ``{"results": {vid: [{"timestamp", "sentence"}]}}``.

Malformed input raises :class:`EvalInputError` naming the file and line (for whole-file JSON the
line where the offending entry starts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class EvalInputError(ValueError):
    """A prediction or ground-truth file that cannot be read; the message names the file and line."""


# ---- records ---------------------------------------------------------------------------------------


@dataclass
class MomentQuery:
    """One ground-truth moment-retrieval query."""

    qid: str
    """Query id as a string (Charades-STA text: the 0-based line index; caption-coco: ``id``; QVHighlights: ``qid``)."""
    vid: str
    """Video id."""
    query: str
    """The sentence."""
    windows: list[tuple[float, float]]
    """Ground-truth windows in file order (Charades-STA: exactly one)."""
    where: str = ""
    """``file:line`` of the entry, for messages."""
    duration: float | None = None
    """Video duration in seconds, when the format has one."""
    relevant_clip_ids: list[int] | None = None
    """QVHighlights: ids of the 2 s clips that have saliency scores."""
    saliency_scores: list[list[float]] | None = None
    """QVHighlights: the three annotators' scores (0..4) per relevant clip."""


@dataclass
class MomentPrediction:
    """One query's prediction (moment retrieval and/or highlight detection)."""

    qid: str | None
    """Query id as a string, or None when the file gives only ``vid`` + ``query``."""
    vid: str | None
    """Video id (may be None when ``qid`` is given)."""
    query: str | None
    """The sentence (may be None when ``qid`` is given)."""
    windows: list[tuple[float, float, float | None]] = field(default_factory=list)
    """Predicted windows ``(start, end, score or None)`` in the file's (ranked) order."""
    saliency: list[float] | None = None
    """QVHighlights: one predicted saliency score per 2 s clip, or None."""
    where: str = ""
    """``file:line`` of the entry, for messages."""


@dataclass
class DenseVideo:
    """One video's dense captions (ground truth or prediction)."""

    vid: str
    """Video id."""
    segments: list[tuple[float, float]]
    """Event spans in file order."""
    captions: list[str]
    """One sentence per segment."""
    duration: float | None = None
    """Video duration in seconds (ground truth only)."""
    where: str = ""
    """``file:line`` of the entry, for messages."""


# ---- low-level JSON reading with line numbers ------------------------------------------------------


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise EvalInputError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not JSON
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise EvalInputError(f"{path}:{line}: byte {data[exc.start]:#04x} is not UTF-8") from None


def _line_at(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


_DECODER = json.JSONDecoder()


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_error(path: Path, text: str, exc: json.JSONDecodeError) -> EvalInputError:
    return EvalInputError(f"{path}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}")


def _load_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _json_error(path, text, exc) from None


def _items(path: Path, text: str, pos: int) -> list[tuple[Any, Any, int]]:
    """The items of the JSON object or array starting at ``text[pos]``: ``(key or index, value, position)``.

    Values are fully decoded; the position is where each value starts (``_line_at`` turns it into a line).
    """
    try:
        pos = _skip_ws(text, pos)
        opener = text[pos]
        closer = {"{": "}", "[": "]"}.get(opener)
        if closer is None:
            raise EvalInputError(f"{path}:{_line_at(text, pos)}: expected a JSON object or list")
        out, pos, index = [], _skip_ws(text, pos + 1), 0
        if text[pos] == closer:
            return out
        while True:
            if opener == "{":
                key, pos = _DECODER.raw_decode(text, pos)
                pos = _skip_ws(text, pos)
                if text[pos] != ":":
                    raise json.JSONDecodeError("expected ':'", text, pos)
                pos = _skip_ws(text, pos + 1)
            else:
                key, index = index, index + 1
            start = pos
            value, pos = _DECODER.raw_decode(text, pos)
            out.append((key, value, start))
            pos = _skip_ws(text, pos)
            if text[pos] == closer:
                return out
            if text[pos] != ",":
                raise json.JSONDecodeError(f"expected ',' or '{closer}'", text, pos)
            pos = _skip_ws(text, pos + 1)
    except json.JSONDecodeError as exc:
        raise _json_error(path, text, exc) from None
    except IndexError:
        raise EvalInputError(f"{path}:{_line_at(text, len(text))}: malformed JSON: unexpected end of file") from None


def _value_pos(path: Path, text: str, key: str) -> int:
    """Where the value of top-level ``key`` of a JSON object document starts."""
    for k, _, pos in _items(path, text, 0):
        if k == key:
            return pos
    raise EvalInputError(f"{path}:1: no {key!r}")


def _jsonl(path: Path, text: str) -> list[tuple[Any, int]]:
    out = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), n))
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{path}:{n}:{exc.colno}: malformed JSON line: {exc.msg}") from None
    return out


def _records(path: Path, text: str) -> list[tuple[Any, int]]:
    """Entries of a JSON list document or a jsonl file, with their line numbers."""
    if text.lstrip().startswith("["):
        return [(v, _line_at(text, pos)) for _, v, pos in _items(path, text, 0)]
    return _jsonl(path, text)


# ---- field checks ----------------------------------------------------------------------------------


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EvalInputError(f"{where}: {name} is {value!r}, not a number")
    v = float(value)
    if not math.isfinite(v):
        raise EvalInputError(f"{where}: {name} is {value!r}")
    return v


def _window(value: Any, where: str, name: str, with_score: bool) -> tuple:
    sizes = (2, 3) if with_score else (2,)
    if not isinstance(value, list | tuple) or len(value) not in sizes:
        shape = "[start, end(, score)]" if with_score else "[start, end]"
        raise EvalInputError(f"{where}: {name} is {value!r}, not {shape}")
    s = _number(value[0], where, f"{name}[0]")
    e = _number(value[1], where, f"{name}[1]")
    if s > e:
        raise EvalInputError(f"{where}: {name} = [{s}, {e}] starts after it ends")
    if not with_score:
        return s, e
    score = _number(value[2], where, f"{name}[2]") if len(value) == 3 else None
    return s, e, score


def _field(entry: Any, name: str, where: str) -> Any:
    if not isinstance(entry, dict):
        raise EvalInputError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    if name not in entry:
        raise EvalInputError(f"{where}: missing field {name!r}")
    return entry[name]


def _list(value: Any, where: str, name: str) -> list:
    if not isinstance(value, list):
        raise EvalInputError(f"{where}: {name} is {type(value).__name__}, not a list")
    return value


def _str(value: Any, where: str, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise EvalInputError(f"{where}: {name} is {value!r}, not a string")
    return str(value)


def _qid(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise EvalInputError(f"{where}: qid is {value!r}, not an int or string")
    return str(value)


# ---- ground truth ----------------------------------------------------------------------------------


def read_moment_gt(path: str | Path) -> list[MomentQuery]:
    """Charades-STA text or TRACE caption-coco JSON -> one :class:`MomentQuery` per query, in file order."""
    path = Path(path)
    text = _read_text(path)
    out = []
    if text.lstrip().startswith("{"):
        doc = _load_json(path, text)
        if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
            raise EvalInputError(f"{path}:1: expected {{'annotations': [...]}} (caption-coco format)")
        for _, entry, pos in _items(path, text, _value_pos(path, text, "annotations")):
            where = f"{path}:{_line_at(text, pos)}"
            span = _window(_field(entry, "timestamp", where), where, "timestamp", False)
            vid = _str(_field(entry, "image_id", where), where, "image_id")
            qid = _qid(_field(entry, "id", where), where)
            query = _str(_field(entry, "caption", where), where, "caption")
            out.append(MomentQuery(qid, vid, query.strip(), [span], where))
    else:
        index = 0
        for n, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            head, sep, sentence = line.strip().partition("##")
            parts = head.split()
            if not sep or len(parts) != 3:
                raise EvalInputError(f"{where}: expected 'vid start end##sentence', got {line[:80]!r}")
            try:
                s, e = float(parts[1]), float(parts[2])
            except ValueError:
                raise EvalInputError(f"{where}: start/end {parts[1]!r} {parts[2]!r} are not numbers") from None
            span = _window([s, e], where, "start/end", False)
            out.append(MomentQuery(str(index), parts[0], sentence.strip(), [span], where))
            index += 1
    if not out:
        raise EvalInputError(f"{path}: no ground-truth query")
    _unique(out, path)
    return out


def _unique(queries: list[MomentQuery], path: Path) -> None:
    seen: dict[str, str] = {}
    for q in queries:
        if q.qid in seen:
            raise EvalInputError(f"{q.where}: qid {q.qid} already used at {seen[q.qid]}")
        seen[q.qid] = q.where


def read_qvhighlights_gt(path: str | Path) -> list[MomentQuery]:
    """QVHighlights jsonl ground truth (every line needs ``relevant_windows``)."""
    path = Path(path)
    text = _read_text(path)
    out = []
    for entry, n in _jsonl(path, text):
        where = f"{path}:{n}"
        qid = _qid(_field(entry, "qid", where), where)
        vid = _str(_field(entry, "vid", where), where, "vid")
        query = _str(entry.get("query", ""), where, "query")
        duration = _number(_field(entry, "duration", where), where, "duration")
        raw = _list(_field(entry, "relevant_windows", where), where, "relevant_windows")
        windows = [_window(w, where, f"relevant_windows[{i}]", False) for i, w in enumerate(raw)]
        clips = scores = None
        if "relevant_clip_ids" in entry or "saliency_scores" in entry:
            clips = _list(_field(entry, "relevant_clip_ids", where), where, "relevant_clip_ids")
            scores = _list(_field(entry, "saliency_scores", where), where, "saliency_scores")
            if len(clips) != len(scores):
                raise EvalInputError(f"{where}: relevant_clip_ids and saliency_scores differ in length")
            for c, sc in zip(clips, scores):
                if isinstance(c, bool) or not isinstance(c, int) or c < 0:
                    raise EvalInputError(f"{where}: clip id {c!r} is not a non-negative int")
                if not isinstance(sc, list) or len(sc) != 3:
                    raise EvalInputError(f"{where}: clip {c}: saliency scores {sc!r} are not 3 annotators' scores")
                for v in sc:
                    _number(v, where, f"saliency score of clip {c}")
            num_clips = int(duration / 2)
            bad = [c for c in clips if c >= num_clips]
            if bad:
                raise EvalInputError(f"{where}: clip ids {bad} beyond the {num_clips} clips of a {duration} s video")
        out.append(MomentQuery(qid, vid, query.strip(), windows, where, duration, clips, scores))
    if not out:
        raise EvalInputError(f"{path}: no ground-truth query")
    _unique(out, path)
    return out


def read_dense_gt(path: str | Path, subset: str | None = None) -> list[DenseVideo]:
    """YouCook2 (``{"database": ...}``, optionally only ``subset``) or ActivityNet Captions ground truth."""
    path = Path(path)
    text = _read_text(path)
    doc = _load_json(path, text)
    if not isinstance(doc, dict):
        raise EvalInputError(f"{path}:1: expected a JSON object (YouCook2 or ActivityNet Captions)")
    out = []
    if isinstance(doc.get("database"), dict):  # YouCook2
        for vid, entry, pos in _items(path, text, _value_pos(path, text, "database")):
            where = f"{path}:{_line_at(text, pos)}"
            if subset is not None and isinstance(entry, dict) and entry.get("subset") != subset:
                continue
            anns = _list(_field(entry, "annotations", where), where, "annotations")
            segs = [_window(_field(a, "segment", where), where, f"annotations[{i}].segment", False)
                    for i, a in enumerate(anns)]  # fmt: skip
            caps = [_str(_field(a, "sentence", where), where, f"annotations[{i}].sentence") for i, a in enumerate(anns)]
            dur = _number(_field(entry, "duration", where), where, "duration")
            out.append(DenseVideo(str(vid), segs, caps, dur, where))
    else:  # ActivityNet Captions
        if subset is not None:
            raise EvalInputError(f"{path}: --subset applies to YouCook2 files only")
        for vid, entry, pos in _items(path, text, 0):
            where = f"{path}:{_line_at(text, pos)}"
            ts = _list(_field(entry, "timestamps", where), where, "timestamps")
            sents = _list(_field(entry, "sentences", where), where, "sentences")
            if len(ts) != len(sents):
                raise EvalInputError(f"{where}: {len(ts)} timestamps but {len(sents)} sentences")
            segs = [_window(t, where, f"timestamps[{i}]", False) for i, t in enumerate(ts)]
            caps = [_str(s, where, f"sentences[{i}]") for i, s in enumerate(sents)]
            dur = _number(_field(entry, "duration", where), where, "duration")
            out.append(DenseVideo(str(vid), segs, caps, dur, where))
    for v in out:
        if not v.segments:
            raise EvalInputError(f"{v.where}: video {v.vid!r} has no ground-truth event")
    if not out:
        raise EvalInputError(f"{path}: no ground-truth video" + (f" in subset {subset!r}" if subset else ""))
    return out


# ---- predictions -----------------------------------------------------------------------------------


_PRED_KEYS = ("qid", "vid", "query", "pred_windows", "pred_relevant_windows", "pred_saliency_scores")


def read_moment_predictions(path: str | Path) -> list[MomentPrediction]:
    """Moment-retrieval / QVHighlights predictions in any of the accepted formats, in file order."""
    path = Path(path)
    text = _read_text(path)
    out = []
    records = None
    if text.lstrip().startswith("["):
        records = _records(path, text)
    else:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # jsonl (several lines), or malformed: the line reader names the bad line
        if not isinstance(doc, dict) or any(k in doc for k in _PRED_KEYS):
            records = _jsonl(path, text)
    if records is None:
        # TRACE's {qid: {"timestamp": [s, e], "vid", "query"}} (one window per query).
        for key, entry, pos in _items(path, text, 0):
            where = f"{path}:{_line_at(text, pos)}"
            if not isinstance(entry, dict):
                raise EvalInputError(f"{where}: expected {{qid: {{'timestamp': [s, e]}}}}")
            windows = []
            if "timestamp" in entry:  # TRACE writes an empty object when the answer had no time
                s, e = _window(entry["timestamp"], where, "timestamp", False)
                windows = [(s, e, None)]
            vid = entry.get("vid")
            query = entry.get("query")
            query = None if query is None else str(query).strip()
            out.append(MomentPrediction(str(key), None if vid is None else str(vid), query, windows, None, where))
        return out
    for entry, line in records:
        where = f"{path}:{line}"
        if not isinstance(entry, dict):
            raise EvalInputError(f"{where}: expected a JSON object per prediction")
        qid = _qid(entry["qid"], where) if "qid" in entry else None
        vid = _str(entry["vid"], where, "vid") if "vid" in entry else None
        query = _str(entry["query"], where, "query").strip() if "query" in entry else None
        if qid is None and (vid is None or query is None):
            raise EvalInputError(f"{where}: a prediction needs 'qid' or both 'vid' and 'query'")
        name = "pred_windows" if "pred_windows" in entry else "pred_relevant_windows"
        raw = _list(entry.get(name, []), where, name)
        windows = [_window(w, where, f"{name}[{i}]", True) for i, w in enumerate(raw)]
        saliency = None
        if "pred_saliency_scores" in entry:
            sal = _list(entry["pred_saliency_scores"], where, "pred_saliency_scores")
            saliency = [_number(v, where, f"pred_saliency_scores[{i}]") for i, v in enumerate(sal)]
        out.append(MomentPrediction(qid, vid, query, windows, saliency, where))
    return out


def read_dense_predictions(path: str | Path) -> dict[str, DenseVideo]:
    """``{vid: [{"timestamp", "caption"}]}`` or ``{"results": {vid: [{"timestamp", "sentence"}]}}``."""
    path = Path(path)
    text = _read_text(path)
    doc = _load_json(path, text)
    if not isinstance(doc, dict):
        raise EvalInputError(f"{path}:1: expected a JSON object {{video: [events]}}")
    start = _value_pos(path, text, "results") if isinstance(doc.get("results"), dict) else 0
    out = {}
    for vid, events, pos in _items(path, text, start):
        where = f"{path}:{_line_at(text, pos)}"
        events = _list(events, where, f"video {vid!r}")
        segs, caps = [], []
        for i, ev in enumerate(events):
            segs.append(_window(_field(ev, "timestamp", where), where, f"{vid}[{i}].timestamp", False))
            key = "caption" if "caption" in ev else "sentence"
            caps.append(_str(_field(ev, key, where), where, f"{vid}[{i}].{key}"))
        out[str(vid)] = DenseVideo(str(vid), segs, caps, None, where)
    return out


# ---- writers (used by ``timeexpert predict``) ---------------------------------------------------------


def _windows_json(windows: Iterable[Iterable[float | None]]) -> list[list[float]]:
    return [[float(v) for v in w if v is not None] for w in windows]


def write_moment_predictions(path: str | Path, predictions: Iterable[Mapping[str, Any]]) -> Path:
    """Write moment-retrieval predictions as jsonl: one ``{"qid"?, "vid", "query", "pred_windows"}`` per line.

    Each mapping needs ``vid`` and ``query`` (``qid`` optional) and ``pred_windows``: ``[[s, e(, score)], ...]``
    ranked best first.
    """
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for p in predictions:
            line = {k: p[k] for k in ("qid", "vid", "query") if k in p}
            line["pred_windows"] = _windows_json(p["pred_windows"])
            f.write(json.dumps(line) + "\n")
    return path


def write_qvhighlights_predictions(path: str | Path, predictions: Iterable[Mapping[str, Any]]) -> Path:
    """Write moment_detr's submission jsonl: ``qid, query, vid, pred_relevant_windows, pred_saliency_scores``.

    ``pred_relevant_windows`` are ``[s, e, score]`` (a missing score is written as 1.0);
    ``pred_saliency_scores`` has one score per 2 s clip.
    """
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for p in predictions:
            line = {"qid": p["qid"], "query": p.get("query", ""), "vid": p["vid"]}
            line["pred_relevant_windows"] = [
                [float(w[0]), float(w[1]), float(w[2]) if len(w) > 2 and w[2] is not None else 1.0]
                for w in p.get("pred_relevant_windows", [])
            ]
            if p.get("pred_saliency_scores") is not None:
                line["pred_saliency_scores"] = [float(v) for v in p["pred_saliency_scores"]]
            f.write(json.dumps(line) + "\n")
    return path


def write_dense_predictions(path: str | Path, predictions: Mapping[str, Iterable[Mapping[str, Any]]]) -> Path:
    """Write ``{vid: [{"timestamp": [s, e], "caption": str}, ...]}`` (events in the model's order)."""
    path = Path(path)
    doc = {
        str(vid): [{"timestamp": [float(e["timestamp"][0]), float(e["timestamp"][1])], "caption": str(e["caption"])}
                   for e in events]
        for vid, events in predictions.items()
    }  # fmt: skip
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return path
