"""A corpus of real-world video files, made with the ffmpeg command-line tool, for the decoder tests.

Run::

    python -m tools.make_test_corpus --out DIR

Needs the ``ffmpeg`` and ``ffprobe`` binaries (Debian package ``ffmpeg``). Every frame carries its
frame number as a binary code of big black/white blocks in its top-left corner (:func:`draw_code`,
read back by :func:`read_code`), so a test can tell which source frame a decoder returned.

The files are the kinds users bring (see :data:`RECIPES`): HEVC/MKV, AV1, VP8/WebM, MPEG-4 part 2
in AVI with B-frames, MJPEG, variable frame rate, 29.97 fps, 10-bit and 4:4:4, odd sizes, a 90°
display rotation, start offsets in MKV and WebM, MP4 cuts with an edit list (H.264 and VP9) made
with ``ffmpeg -ss ... -c copy``, an MKV starting mid-GOP, a long GOP with B-frames, one-frame
videos and files with the wrong extension.

The ground truth is what a player shows: each file is decoded once by the ffmpeg command-line tool
(edit lists, start offsets and display rotation applied, every frame passed through), and
``DIR/corpus.json`` records, per file, the frame number and presentation time (seconds from the
first shown frame) of every shown frame, plus the displayed size. The script checks that every shown
frame carries a readable code, so a drawing or rotation mistake fails here, not in a test.

Small on purpose: 64x48 frames, 30 frames per clip (120 for the long GOP); the whole corpus takes a
few seconds to build on one core.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Code layout: a grid of ``ROWS x COLS`` blocks of ``BLOCK`` pixels; column 0 holds the markers
#: (white above black), the other columns the frame number's bits, most significant first.
BLOCK = 8
ROWS, COLS = 2, 5
BITS = ROWS * (COLS - 1)
BACKGROUND = 100
MANIFEST = "corpus.json"


def draw_code(n: int, width: int, height: int) -> np.ndarray:
    """An RGB uint8 ``[height, width, 3]`` frame showing frame number ``n`` as blocks in the top-left,
    plus a small square that moves with ``n`` (so encoders see motion and use their B-frames)."""
    if not 0 <= n < 2**BITS:
        raise ValueError(f"draw_code: frame number {n} does not fit {BITS} bits")
    if width < COLS * BLOCK or height < ROWS * BLOCK + 8:
        raise ValueError(f"draw_code: {width}x{height} is too small for the code")
    img = np.full((height, width, 3), BACKGROUND, np.uint8)
    bits = [(n >> (BITS - 1 - i)) & 1 for i in range(BITS)]
    cells = [1] + bits[: COLS - 1] + [0] + bits[COLS - 1 :]
    for i, on in enumerate(cells):
        r, c = divmod(i, COLS)
        img[r * BLOCK : (r + 1) * BLOCK, c * BLOCK : (c + 1) * BLOCK] = 255 if on else 0
    y0 = ROWS * BLOCK + 2
    x0 = (3 * n) % max(1, width - 6)
    img[y0 : y0 + 6, x0 : x0 + 6] = (230, 200, 40)
    return img


def read_code(frame: np.ndarray) -> int | None:
    """The frame number drawn by :func:`draw_code` in an RGB ``[H, W, 3]`` frame, or None if the
    markers are not there (a black, grey, sideways or garbage frame)."""
    f = np.asarray(frame)
    if f.ndim != 3 or f.shape[0] < ROWS * BLOCK or f.shape[1] < COLS * BLOCK:
        return None
    lo, hi = BLOCK // 4, BLOCK - BLOCK // 4
    cells = []
    for i in range(ROWS * COLS):
        r, c = divmod(i, COLS)
        patch = f[r * BLOCK + lo : r * BLOCK + hi, c * BLOCK + lo : c * BLOCK + hi].astype(np.float64)
        v = patch.mean()
        if 70 < v < 185:
            return None  # neither black nor white: not a code block
        cells.append(v >= 128)
    if not cells[0] or cells[COLS]:
        return None
    bits = cells[1:COLS] + cells[COLS + 1 :]
    return sum(int(b) << (BITS - 1 - i) for i, b in enumerate(bits))


@dataclass
class CorpusConfig:
    """Where and how big."""

    out: Path
    """Output directory (created)."""
    width: int = 64
    """Frame width of the clips (odd-size clips add 3 and 1)."""
    height: int = 48
    """Frame height of the clips."""
    fps: int = 10
    """Frame rate of the constant-rate clips."""
    frames: int = 30
    """Frames per clip (the long-GOP clip has four times as many)."""
    timeout_s: float = 120.0
    """Limit on each ffmpeg call: no build can hang."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)


@dataclass(frozen=True)
class Recipe:
    """One corpus file: how it is made and what it exercises."""

    name: str
    """File name inside ``DIR/videos``."""
    codec: str
    """FFmpeg name of the codec the file holds (what the probe must report)."""
    features: tuple[str, ...]
    """What it tests, for reading the manifest (``edit_list``, ``rotation``, ``start_offset`` ...)."""
    make: Callable[[CorpusConfig, Path], None]
    """Writes the file at the given path."""
    size: tuple[int, int] | None = None
    """Encoded (width, height) if not the config's."""
    extra: dict = field(default_factory=dict)
    """Facts for the tests (e.g. ``rotation``)."""


def _run(cmd: list[str], cfg: CorpusConfig, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, input=stdin, capture_output=True, timeout=cfg.timeout_s)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.decode(errors='replace')[-800:]}")
    return r


def _encode(
    cfg: CorpusConfig,
    path: Path,
    args: list[str],
    n: int | None = None,
    size: tuple[int, int] | None = None,
    rate: str | None = None,
    rotate_input: bool = False,
) -> None:
    """Pipe numbered frames into ffmpeg as raw RGB and encode them with ``args``."""
    w, h = size or (cfg.width, cfg.height)
    n = cfg.frames if n is None else n
    if rotate_input:
        # Drawn as displayed (portrait, h wide and w tall), stored turned a quarter turn clockwise;
        # the container's display matrix (rotate=90) turns it back when shown.
        frames = [np.ascontiguousarray(np.rot90(draw_code(k, h, w), k=-1)) for k in range(n)]
    else:
        frames = [draw_code(k, w, h) for k in range(n)]
    raw = b"".join(f.tobytes() for f in frames)
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}"]
    cmd += ["-r", rate or str(cfg.fps), "-i", "-", "-map_metadata", "-1", "-fflags", "+bitexact"]
    _run([*cmd, *args, str(path)], cfg, raw)


def _copy(cfg: CorpusConfig, src: Path, dst: Path, before: list[str], after: list[str]) -> None:
    """Remux ``src`` into ``dst`` without re-encoding (``-c copy``), as users cut and remux files."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", *before, "-i", str(src), "-map", "0:v", "-c", "copy", *after]
    _run([*cmd, str(dst)], cfg)


X264 = ["-c:v", "libx264", "-preset", "veryfast", "-bf", "3", "-g", "12", "-pix_fmt", "yuv420p"]
VP9 = ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "300k", "-g", "10"]


def _tmp(path: Path, suffix: str) -> Path:
    return path.with_name(f".src_{path.stem}{suffix}")


def _cut(cfg: CorpusConfig, path: Path, codec_args: list[str], src_ext: str, before: list[str], after: list[str]):
    src = _tmp(path, src_ext)
    _encode(cfg, src, codec_args, n=cfg.frames + 10)
    _copy(cfg, src, path, before, after)
    src.unlink()


def _rotated(codec_args: list[str]) -> Callable[[CorpusConfig, Path], None]:
    def make(cfg: CorpusConfig, path: Path) -> None:
        src = _tmp(path, path.suffix)
        _encode(cfg, src, codec_args, rotate_input=True)
        _copy(cfg, src, path, [], ["-metadata:s:v:0", "rotate=90"])  # the display matrix phones write
        src.unlink()

    return make


def _vfr(cfg: CorpusConfig, path: Path) -> None:
    # 10 frames at 10 fps, 10 at 25 fps, 10 at 5 fps: presentation times are not a fixed grid.
    expr = "if(lt(N,10),N*0.1,if(lt(N,20),1.0+(N-10)*0.04,1.4+(N-20)*0.2))/TB"
    _encode(
        cfg,
        path,
        ["-vf", f"settb=1/1000,setpts='{expr}'", "-fps_mode", "passthrough", "-enc_time_base", "1/1000", *X264],
    )


def _recipes() -> list[Recipe]:
    enc = lambda args, **kw: lambda cfg, path: _encode(cfg, path, args, **kw)  # noqa: E731
    odd = lambda cfg: (cfg.width + 3, cfg.height + 1)  # noqa: E731
    return [
        Recipe("h264_bframes.mp4", "h264", ("b_frames",), enc(X264)),
        Recipe("hevc.mkv", "hevc", ("hevc", "b_frames"), enc(["-c:v", "libx265", "-x265-params", "log-level=none"])),
        Recipe("av1.mp4", "av1", ("av1",), enc(["-c:v", "libaom-av1", "-cpu-used", "8", "-g", "10"])),
        Recipe("av1.webm", "av1", ("av1",), enc(["-c:v", "libaom-av1", "-cpu-used", "8", "-g", "10"])),
        Recipe("vp8.webm", "vp8", ("vp8",), enc(["-c:v", "libvpx", "-b:v", "300k", "-g", "10"])),
        Recipe("mpeg4_bframes.avi", "mpeg4", ("avi", "b_frames"), enc(["-c:v", "mpeg4", "-q:v", "3", "-bf", "2"])),
        Recipe("mjpeg.avi", "mjpeg", ("mjpeg",), enc(["-c:v", "mjpeg", "-q:v", "3"])),
        Recipe("vfr.mkv", "h264", ("variable_frame_rate",), _vfr),
        Recipe("ntsc_2997.mp4", "h264", ("fps_29.97",), enc(X264, rate="30000/1001")),
        Recipe("h264_10bit.mkv", "h264", ("10bit",), enc([*X264[:-2], "-pix_fmt", "yuv420p10le"])),
        Recipe("h264_444.mp4", "h264", ("yuv444",), enc([*X264[:-2], "-pix_fmt", "yuv444p"])),
        Recipe("vp9_444.webm", "vp9", ("yuv444",), enc([*VP9, "-pix_fmt", "yuv444p"])),
        Recipe("vp9_odd.webm", "vp9", ("odd_size",), lambda c, p: _encode(c, p, VP9, size=odd(c)), extra={"odd": 1}),
        Recipe("mjpeg_odd.avi", "mjpeg", ("odd_size",), lambda c, p: _encode(c, p, ["-c:v", "mjpeg"], size=odd(c))),
        Recipe("rotated.mp4", "h264", ("rotation",), _rotated(X264), extra={"rotation": 90}),
        Recipe("rotated_vp9.mp4", "vp9", ("rotation",), _rotated(VP9), extra={"rotation": 90}),
        Recipe("offset.mkv", "h264", ("start_offset",), enc([*X264, "-output_ts_offset", "1.5"])),
        Recipe("offset.webm", "vp9", ("start_offset",), enc([*VP9, "-output_ts_offset", "1.5"])),
        Recipe(
            "cut_h264.mp4",
            "h264",
            ("edit_list", "b_frames"),
            lambda c, p: _cut(c, p, X264, ".mp4", ["-ss", "2.3"], []),
        ),  # fmt: skip
        Recipe("cut_vp9.mp4", "vp9", ("edit_list",), lambda c, p: _cut(c, p, VP9, ".webm", ["-ss", "1.9"], [])),
        Recipe(
            "midgop.mkv",
            "h264",
            ("mid_gop_start", "b_frames"),
            lambda c, p: _cut(c, p, X264, ".mkv", [], ["-ss", "0.55", "-copyinkf"]),
        ),  # fmt: skip
        Recipe(
            "long_gop.mp4",
            "h264",
            ("long_gop", "b_frames"),
            lambda c, p: _encode(c, p, [*X264[:-4], "-g", "1000", "-pix_fmt", "yuv420p"], n=4 * c.frames),
        ),  # fmt: skip
        Recipe("one_frame.mp4", "h264", ("one_frame",), lambda c, p: _encode(c, p, X264, n=1)),
        Recipe("one_frame.webm", "vp9", ("one_frame",), lambda c, p: _encode(c, p, VP9, n=1)),
        Recipe("one_frame_mjpeg.avi", "mjpeg", ("one_frame",), lambda c, p: _encode(c, p, ["-c:v", "mjpeg"], n=1)),
        Recipe("webm_named.mp4", "vp9", ("wrong_extension",), lambda c, p: _encode(c, p, [*VP9, "-f", "webm"])),
        Recipe("mkv_named.avi", "h264", ("wrong_extension",), lambda c, p: _encode(c, p, [*X264, "-f", "matroska"])),
    ]


#: Every corpus file, by name.
RECIPES = {r.name: r for r in _recipes()}

_SHOWINFO = re.compile(r"\bn:\s*(\d+)\s+pts:\s*(-?\d+)\s+pts_time:(-?[\d.e+-]+).*?\bs:(\d+)x(\d+)")


def reference_frames(path: Path, timeout_s: float = 120.0) -> tuple[list[tuple[int | None, float]], tuple[int, int]]:
    """What a player shows: ``[(frame number or None, seconds from the first shown frame)]`` and
    the displayed (width, height), from the ffmpeg command-line tool (edit lists, start offsets and
    display rotation applied; every decoded frame passed through, none duplicated or dropped)."""
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "info", "-i", str(path), "-map", "0:v:0"]
    cmd += ["-vf", "showinfo", "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    r = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
    if r.returncode != 0:
        raise RuntimeError(f"ffmpeg could not decode {path}: {r.stderr.decode(errors='replace')[-500:]}")
    infos = [m.groups() for m in _SHOWINFO.finditer(r.stderr.decode(errors="replace"))]
    if not infos:
        raise RuntimeError(f"ffmpeg showed no frame of {path}")
    w, h = int(infos[0][3]), int(infos[0][4])
    data = np.frombuffer(r.stdout, np.uint8)
    if data.size != len(infos) * w * h * 3:
        raise RuntimeError(f"{path}: {len(infos)} frames reported but {data.size} bytes decoded")
    frames = data.reshape(len(infos), h, w, 3)
    t0 = float(infos[0][2])
    return [(read_code(f), round(float(i[2]) - t0, 6)) for f, i in zip(frames, infos)], (w, h)


def build(cfg: CorpusConfig, names: list[str] | None = None) -> Path:
    """Make the corpus under ``cfg.out`` and return the manifest's path (``corpus.json``)."""
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"make_test_corpus needs the {tool!r} binary (apt-get install ffmpeg)")
    videos = cfg.out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name in names or list(RECIPES):
        recipe = RECIPES[name]
        path = videos / name
        recipe.make(cfg, path)
        frames, (w, h) = reference_frames(path, cfg.timeout_s)
        unreadable = [i for i, (code, _) in enumerate(frames) if code is None]
        if unreadable:
            raise RuntimeError(f"{path}: the shown frames {unreadable} carry no readable frame number")
        manifest[name] = {
            "file": f"videos/{name}",
            "codec": recipe.codec,
            "features": list(recipe.features),
            "display_size": [w, h],
            "frames": [[code, t] for code, t in frames],
            **recipe.extra,
        }
    out = cfg.out / MANIFEST
    out.write_text(json.dumps(manifest, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", nargs="*", choices=sorted(RECIPES), help="make only these files")
    args = p.parse_args(argv)
    print(build(CorpusConfig(args.out), args.only))


if __name__ == "__main__":
    main()
