"""Synthetic video temporal grounding data: real encoded videos with known events at known times.

Run::

    python -m tools.make_synthetic_vtg --out DIR --num-videos N --seed S [--width 128 --height 96 --fps 10 --workers 4]

Each video (H.264 ``.mp4`` and VP9 ``.webm``, alternating; encoded with PyAV, no ffmpeg binary
needed) shows a grey background on which coloured shapes appear, move, or change shape during
known time spans. The generator writes, under ``DIR``::

    videos/syn00000.mp4, videos/syn00001.webm, ...
    annotations/charades_sta.txt         vid start end##sentence               (moment retrieval)
    annotations/qvhighlights.jsonl       QVHighlights lines, 2 s clips, 3 saliency annotators
    annotations/youcook2.json            {"database": {vid: {"duration", "annotations": [segment, sentence]}}}
    annotations/activitynet_captions.json {vid: {"duration", "timestamps", "sentences"}}  (dense captions)
    annotations/instruction.json         VTG instruction-tuning list: video, conversations, times, scores
    events.json                          ground truth: every event's frames, colour, shape and times

An event from ``start`` to ``end`` (seconds, multiples of 0.5) is drawn in exactly the frames whose
presentation time ``t`` satisfies ``start <= t <= end``. Output is deterministic for a seed
(encoders run single-threaded); sizes go from a few clips (tests) to thousands (demo runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import random
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

COLOURS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 30, 30),
        "green": (30, 200, 40),
        "blue": (30, 60, 230),
        "yellow": (235, 220, 40),
        "magenta": (220, 40, 220),
        "cyan": (40, 215, 225),
    }
)
SHAPES = ("square", "circle", "triangle")
ACTIONS = ("appears", "moves", "changes")
BACKGROUND = (110, 110, 110)
CODECS = MappingProxyType({"h264": ("libx264", "mp4"), "vp9": ("libvpx-vp9", "webm")})


@dataclass
class GeneratorConfig:
    """What to generate."""

    out: Path
    """Output directory (created)."""
    num_videos: int = 8
    """Number of videos."""
    seed: int = 0
    """Seed: the same seed gives the same events, annotations and encoded bytes."""
    width: int = 128
    """Frame width in pixels (even)."""
    height: int = 96
    """Frame height in pixels (even)."""
    fps: int = 10
    """Frames per second."""
    min_duration: float = 8.0
    """Shortest video, seconds."""
    max_duration: float = 16.0
    """Longest video, seconds."""
    max_events: int = 3
    """Most events per video (at least one)."""
    codecs: tuple[str, ...] = ("h264", "vp9")
    """Codecs used in turn: ``h264`` (.mp4) and/or ``vp9`` (.webm)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    workers: int = 1
    """Encoding processes (each video has its own seed, so the output does not depend on this)."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        for c in self.codecs:
            if c not in CODECS:
                raise ValueError(f"GeneratorConfig.codecs: {c!r} is not one of {sorted(CODECS)}")
        if self.width % 2 or self.height % 2:
            raise ValueError(f"GeneratorConfig.width/height must be even, got {self.width}x{self.height}")
        if not 2.0 <= self.min_duration <= self.max_duration:
            raise ValueError("GeneratorConfig: need 2 <= min_duration <= max_duration")


@dataclass
class Event:
    """One thing that happens in a video, from ``start`` to ``end`` seconds (inclusive)."""

    start: float
    end: float
    colour: str
    shape: str
    action: str
    caption: str
    start_frame: int
    end_frame: int
    lane: int
    to_shape: str = ""
    rgb: tuple[int, int, int] = (0, 0, 0)


@dataclass
class VideoSpec:
    """One generated video and its ground truth."""

    vid: str
    file: str
    codec: str
    fps: int
    num_frames: int
    duration: float
    events: list[Event] = field(default_factory=list)


def _caption(colour: str, shape: str, action: str, to_shape: str) -> str:
    if action == "moves":
        return f"a {colour} {shape} moves across the screen"
    if action == "changes":
        return f"a {colour} {shape} turns into a {to_shape}"
    return f"a {colour} {shape} appears"


def plan_video(cfg: GeneratorConfig, index: int) -> VideoSpec:
    """Choose duration and events of video ``index`` from its own seeded generator."""
    rng = random.Random(f"{cfg.seed}:{index}")
    codec = cfg.codecs[index % len(cfg.codecs)]
    num_frames = int(round(rng.uniform(cfg.min_duration, cfg.max_duration) * 2)) * cfg.fps // 2
    duration = num_frames / cfg.fps
    vid = f"syn{index:05d}"
    spec = VideoSpec(vid, f"videos/{vid}.{CODECS[codec][1]}", codec, cfg.fps, num_frames, duration)
    colours = rng.sample(sorted(COLOURS), k=len(COLOURS))
    last_t = duration - 1.0 / cfg.fps  # time of the last frame
    for k, (start, length) in enumerate(_place_events(rng, cfg.max_events, last_t)):
        shape, action = rng.choice(SHAPES), rng.choice(ACTIONS)
        to_shape = rng.choice([s for s in SHAPES if s != shape]) if action == "changes" else ""
        colour = colours[k]
        spec.events.append(
            Event(
                start,
                start + length,
                colour,
                shape,
                action,
                _caption(colour, shape, action, to_shape),
                round(start * cfg.fps),
                round((start + length) * cfg.fps),
                lane=rng.randint(0, 1),
                to_shape=to_shape,
                rgb=COLOURS[colour],
            )
        )
    return spec


EVENT_LENGTHS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
"""Event lengths drawn from (seconds)."""
MIN_GAP = 0.5
"""Shortest pause between two events (seconds); events never overlap."""
MAX_BUSY = 0.7
"""Events (with their pauses) take at most this share of a video when it has more than one, so their
placement keeps room to vary."""


def _place_events(rng: random.Random, max_events: int, last_t: float) -> list[tuple[float, float]]:
    """``(start, length)`` of 1..``max_events`` events in time order, on a 0.5 s grid, inside ``[0, last_t]``.

    The number and lengths are drawn first (events beyond :data:`MAX_BUSY` of the video are dropped;
    every video keeps at least one of at least 1 s), then the free time is cut at uniformly random
    points into a lead-in, the pauses between events (each at least :data:`MIN_GAP`) and a tail. So the
    first event may start anywhere, and the order of the events' contents and their gaps vary from video
    to video: a window that is right for many videos (a "training prior") is rare."""
    lengths = [rng.choice(EVENT_LENGTHS) for _ in range(rng.randint(1, max_events))]
    while len(lengths) > 1 and sum(lengths) + MIN_GAP * (len(lengths) - 1) > MAX_BUSY * last_t:
        lengths.pop()
    if lengths[0] > last_t:
        lengths[0] = max(1.0, math.floor(last_t * 2) / 2)
    units = max(0, math.floor((last_t - sum(lengths) - MIN_GAP * (len(lengths) - 1)) * 2 + 1e-9))
    cuts = sorted(rng.randint(0, units) for _ in lengths)  # 0.5 s units of slack before each event
    out, t = [], 0.0
    for k, length in enumerate(lengths):
        t += (cuts[k] - (cuts[k - 1] if k else 0)) * 0.5 + (MIN_GAP if k else 0.0)
        out.append((t, length))
        t += length
    return out


def _mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "triangle":
        return np.abs(xx - size / 2) <= yy / 2
    return np.ones((size, size), dtype=bool)


def render_frame(cfg: GeneratorConfig, spec: VideoSpec, k: int) -> np.ndarray:
    """RGB frame ``k`` (uint8 ``[H, W, 3]``) of ``spec``."""
    h, w = cfg.height, cfg.width
    frame = np.empty((h, w, 3), dtype=np.uint8)
    frame[:] = BACKGROUND
    size = max(6, h // 2 - 8)
    for ev in spec.events:
        if not ev.start_frame <= k <= ev.end_frame:
            continue
        y = 4 + ev.lane * (h // 2)
        span = max(1, ev.end_frame - ev.start_frame)
        progress = (k - ev.start_frame) / span
        if ev.action == "moves":
            x = int(round(2 + progress * (w - size - 4)))
        else:
            x = (w - size) // 2 + (ev.lane * 2 - 1) * (w // 6)
        shape = ev.to_shape if ev.action == "changes" and progress >= 0.5 else ev.shape
        region = frame[y : y + size, x : x + size]
        region[_mask(shape, size)] = ev.rgb
    return frame


def encode_video(cfg: GeneratorConfig, spec: VideoSpec) -> Path:
    """Render and encode ``spec`` to ``cfg.out / spec.file``."""
    import av

    path = cfg.out / spec.file
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = CODECS[spec.codec][0]
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=cfg.fps)
        stream.width, stream.height, stream.pix_fmt = cfg.width, cfg.height, "yuv420p"
        stream.codec_context.thread_count = 1
        if spec.codec == "h264":
            stream.options = {"crf": "14", "preset": "veryfast", "g": str(2 * cfg.fps)}
        else:
            stream.options = {"crf": "16", "b:v": "0", "deadline": "realtime", "cpu-used": "8", "g": str(2 * cfg.fps)}
        for k in range(spec.num_frames):
            frame = av.VideoFrame.from_ndarray(render_frame(cfg, spec, k), format="rgb24")
            frame.pts = k
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---- annotation writers (one per real format) ----------------------------------------------------


def _clip_saliency(ev: Event, clip: int, annotator: int, rng: random.Random) -> int:
    overlap = max(0.0, min(ev.end, 2 * clip + 2) - max(ev.start, 2 * clip)) / 2.0
    return int(min(4, max(0, round(4 * overlap) - (annotator == 2 and rng.random() < 0.3))))


def write_annotations(cfg: GeneratorConfig, specs: list[VideoSpec]) -> dict[str, Path]:
    """Write every annotation format for ``specs``; returns {format: path}."""
    ann = cfg.out / "annotations"
    ann.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{cfg.seed}:annotations")
    paths = {name: ann / f for name, f in _FILES.items()}

    with open(paths["charades_sta"], "w", encoding="utf-8") as f:
        for s in specs:
            for ev in s.events:
                f.write(f"{s.vid} {ev.start:.1f} {ev.end:.1f}##{ev.caption}.\n")

    with open(paths["qvhighlights"], "w", encoding="utf-8") as f:
        qid = 0
        for s in specs:
            for ev in s.events:
                w0 = 2 * math.floor(ev.start / 2)
                # Whole 2 s clips, but never past the video's end (a last, shorter clip at an odd
                # duration), as in QVHighlights where windows end at most at the duration.
                w1 = min(2 * math.ceil(ev.end / 2), s.duration)
                # Clip ids stop at the last WHOLE clip: moment_detr's evaluator gives a video
                # int(duration / 2) clips, so a partial last clip has no saliency annotation.
                clips = list(range(w0 // 2, min(math.ceil(w1 / 2), int(s.duration / 2))))
                if not clips:  # the event lies wholly in that partial clip: no QVHighlights query
                    continue
                line = {
                    "qid": qid,
                    "query": ev.caption,
                    "duration": s.duration,
                    "vid": s.vid,
                    "relevant_windows": [[w0, w1]],
                    "relevant_clip_ids": clips,
                    "saliency_scores": [[_clip_saliency(ev, c, a, rng) for a in range(3)] for c in clips],
                }
                f.write(json.dumps(line) + "\n")
                qid += 1

    database = {
        s.vid: {
            "duration": s.duration,
            "subset": "training",
            "recipe_type": "synthetic",
            "url": "",
            "annotations": [
                {"segment": [ev.start, ev.end], "id": i, "sentence": ev.caption} for i, ev in enumerate(s.events)
            ],
        }
        for s in specs
    }
    paths["youcook2"].write_text(json.dumps({"database": database}, indent=1), encoding="utf-8")

    anet = {
        s.vid: {
            "duration": s.duration,
            "timestamps": [[ev.start, ev.end] for ev in s.events],
            "sentences": [ev.caption for ev in s.events],
        }
        for s in specs
    }
    paths["activitynet"].write_text(json.dumps(anet, indent=1), encoding="utf-8")

    inst = []
    for s in specs:
        human = "<video>\nLocalize every event in the video and describe it."
        answer = " ".join(f"<time>{ev.start:.1f}-{ev.end:.1f} seconds, {ev.caption}." for ev in s.events)
        times = [[ev.start, ev.end] for ev in s.events]
        inst.append(
            _inst(s, "dense_captioning", human, answer, times, [[] for _ in s.events], [e.caption for e in s.events])
        )
        ev = s.events[0]
        q = f"<video>\nDuring which time span does the following happen: {ev.caption}?"
        inst.append(
            _inst(s, "moment_retrieval", q, f"<time>{ev.start:.1f}-{ev.end:.1f} seconds.", [[ev.start, ev.end]])
        )
        n_clips = int(math.ceil(s.duration / 2))
        sal = [[float(_clip_saliency(ev, c, 0, rng))] for c in range(n_clips)]
        hq = f"<video>\nRate how well each 2-second clip matches: {ev.caption}."
        times_hd = [[2.0 * c, min(2.0 * c + 2, s.duration)] for c in range(n_clips)]
        inst.append(_inst(s, "highlight_detection", hq, "Scores per clip.", times_hd, sal))
    paths["instruction"].write_text(json.dumps(inst, indent=1), encoding="utf-8")

    truth = [asdict(s) for s in specs]
    (cfg.out / "events.json").write_text(json.dumps(truth, indent=1), encoding="utf-8")
    paths["events"] = cfg.out / "events.json"
    return paths


def _inst(s: VideoSpec, task: str, human: str, answer: str, times, scores=None, captions=None) -> dict:
    entry = {
        "video": Path(s.file).name,
        "duration": s.duration,
        "task": task,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}],
        "times": times,
        "scores": scores if scores is not None else [[] for _ in times],
    }
    if captions is not None:
        entry["captions"] = captions
    return entry


_FILES = MappingProxyType(
    {
        "charades_sta": "charades_sta.txt",
        "qvhighlights": "qvhighlights.jsonl",
        "youcook2": "youcook2.json",
        "activitynet": "activitynet_captions.json",
        "instruction": "instruction.json",
    }
)


def generate(cfg: GeneratorConfig) -> dict[str, Path]:
    """Write all videos and annotation files; returns {format: annotation path}."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    specs = [plan_video(cfg, i) for i in range(cfg.num_videos)]
    bar = tqdm(total=len(specs), desc="encoding videos", unit="video", disable=not cfg.progress)
    if cfg.workers > 1:
        # spawn, not fork: a forked worker inherits the caller's objects (a DALI pipeline, a decoder's
        # threads' locks) and may run their finalisers, which wait for threads it does not have (a hang
        # seen in the test suite: DALI's Pipeline.__del__ inside encode_video)
        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in pool.map(encode_video, [cfg] * len(specs), specs, chunksize=4):
                bar.update()
    else:
        for spec in specs:
            encode_video(cfg, spec)
            bar.update()
    bar.close()
    paths = write_annotations(cfg, specs)
    log.info("wrote %d videos and %d annotation files under %s", len(specs), len(paths), cfg.out)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--num-videos", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--min-duration", type=float, default=8.0)
    p.add_argument("--max-duration", type=float, default=16.0)
    p.add_argument("--codecs", default="h264,vp9", help="comma-separated: h264, vp9")
    p.add_argument("--workers", type=int, default=1, help="encoding processes")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = GeneratorConfig(
        a.out, a.num_videos, a.seed, a.width, a.height, a.fps, a.min_duration, a.max_duration,
        codecs=tuple(c.strip() for c in a.codecs.split(",") if c.strip()), workers=a.workers,
    )  # fmt: skip
    generate(cfg)


if __name__ == "__main__":
    main()
