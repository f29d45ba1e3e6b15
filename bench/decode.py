"""Decoder and loader throughput: every decoder path available here, on the same clips.

Run::

    python -m bench.decode [--num-clips 12 --width 256 --height 192 --fps 25] [--no-write]

Generates synthetic H.264 and VP9 clips (tools.make_synthetic_vtg), then measures

* full decode (every frame, raw RGB): frames/s per backend and codec, and the ratio to PyAV, the
  baseline measured in the same run on the same clips;
* training sampling (8 frames per clip, resized/normalised to 224x224): clips/s per backend;
* the training loader (``VTGLoader``, QVHighlights samples, 8 frames at 224, batch 4): samples/s
  with 1 and 2 decode threads, against a plain sequential ``VTGDataset.get`` loop.

Results are printed and written to the ``decode`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from pathlib import Path

from bench.report import machine_line, write_section
from dali_pipes import DecoderConfig, SamplingConfig, TransformConfig, VideoDecoder
from dali_pipes.dali_backend import version as dali_version
from megatron_timeexpert.data.annotations import ReaderConfig, read_annotations
from megatron_timeexpert.data.dataset import VTGDataset
from megatron_timeexpert.data.loader import LoaderConfig, VTGLoader
from megatron_timeexpert.data.stats import BadInputs
from tools.make_synthetic_vtg import GeneratorConfig, generate


def _backends(codec: str) -> list[str]:
    out = ["pyav"]
    if dali_version() is not None:
        out.append("dali-cpu" if codec in ("vp9", "vp8", "mjpeg") else None)
        import torch

        if torch.cuda.is_available():
            out.append("dali-mixed")
    return [b for b in out if b]


def _time_decode(backend: str, paths: list[str], sampling: SamplingConfig, transform, repeat: int) -> tuple[float, int]:
    dec = VideoDecoder(DecoderConfig(backend=backend, sampling=sampling, transform=transform))
    infos = [dec.probe(p) for p in paths]
    dec.read(paths[0], info=infos[0])  # warm-up: pipeline build, library load
    best, frames = float("inf"), 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        frames = 0
        for p, info in zip(paths, infos):
            clip = dec.read(p, info=info)
            frames += clip.frames.shape[0]
        if clip.frames.is_cuda:
            import torch

            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, frames


def bench_decoders(out: Path, fps: int, repeat: int) -> list[dict]:
    videos = sorted((out / "videos").iterdir())
    rows = []
    for codec, ext in (("h264", ".mp4"), ("vp9", ".webm")):
        paths = [str(p) for p in videos if p.suffix == ext]
        base_full = base_clip = None
        for backend in _backends(codec):
            full_s, n_frames = _time_decode(backend, paths, SamplingConfig("fps", fps=fps, num_frames=0), None, repeat)
            clip_s, _ = _time_decode(backend, paths, SamplingConfig(num_frames=8), TransformConfig(224), repeat)
            base_full = base_full or full_s
            base_clip = base_clip or clip_s
            rows.append(
                dict(codec=codec, backend=backend, clips=len(paths), frames=n_frames, fps=n_frames / full_s,
                     fps_ratio=base_full / full_s, clips_s=len(paths) / clip_s, clips_ratio=base_clip / clip_s)
            )  # fmt: skip
    return rows


def bench_loader(out: Path, batches: int, repeat: int) -> list[dict]:
    def dataset():
        bad = BadInputs()
        samples = read_annotations(
            "qvhighlights", out / "annotations/qvhighlights.jsonl", ReaderConfig(out / "videos"), bad
        )
        dec = VideoDecoder(DecoderConfig(sampling=SamplingConfig(num_frames=8), transform=TransformConfig(224)))
        return VTGDataset(samples, dec, bad)

    rows = []
    ds = dataset()
    n = min(len(ds), batches * 4)
    for i in range(n):  # warm-up pass: probes cached, DALI pipeline built, as in the loaders below
        ds.get(i)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(n):
            ds.get(i)
        best = min(best, time.perf_counter() - t0)
    base = n / best
    rows.append(dict(path="sequential VTGDataset.get (baseline)", samples_s=base, ratio=1.0))
    for workers in (1, 2):
        loader = VTGLoader(dataset(), LoaderConfig(batch_size=4, num_workers=workers, prefetch_batches=2))
        it = iter(loader)
        for _ in range(batches):  # warm-up: every video probed, each thread's pipeline built
            next(it)
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            got = sum(len(b.sample_ids) for b in itertools.islice(it, batches))
            best = min(best, (time.perf_counter() - t0) / got)
        rate = 1.0 / best
        rows.append(dict(path=f"VTGLoader, {workers} decode thread(s), batch 4", samples_s=rate, ratio=rate / base))
    return rows


def bench_consumer(steps: int = 10) -> float:
    """Samples/s the tiny recipe's trainer consumes on one process (median step, warm-up dropped)."""
    from bench.throughput import RECIPE, measure
    from megatron_timeexpert.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        step_s = measure(1, 1, 1, 1, steps, warmup=2, run_dir=tmp)["step_time_s"]
    return load_config(RECIPE).training.global_batch_size / step_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-clips", type=int, default=12)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--repeat", type=int, default=3, help="timed passes per path (best is kept)")
    p.add_argument("--loader-batches", type=int, default=12)
    p.add_argument("--no-write", action="store_true", help="print only, leave docs/BENCHMARKS.md alone")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cfg = GeneratorConfig(out, a.num_clips, seed=0, width=a.width, height=a.height, fps=a.fps,
                              min_duration=8, max_duration=12, progress=False)  # fmt: skip
        generate(cfg)
        dec_rows = bench_decoders(out, a.fps, a.repeat)
        loader_rows = bench_loader(out, a.loader_batches, a.repeat)
    consumer = bench_consumer()
    cmd = "python -m bench.decode " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    lines = [
        "## decode: video decoding and loader throughput",
        "",
        machine_line(),
        "",
        f"Command: `{cmd.strip()}`. {a.num_clips} synthetic clips ({a.width}x{a.height}, {a.fps} fps, 8-12 s, half",
        "H.264 .mp4, half VP9 .webm). Ratios are against PyAV (decoders) or a sequential `VTGDataset.get` loop",
        "(loader), measured in the same run; each number is the best of `--repeat` timed passes.",
        f"DALI: {dali_version() or 'not installed'}; torchcodec: not measured (its wheel needs the system FFmpeg",
        "libraries, absent here). The machine is shared: expect run-to-run noise of tens of percent.",
        "",
        "| codec | backend | clips | frames | all frames: frames/s | vs PyAV | 8 frames @224: clips/s | vs PyAV |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in dec_rows:
        lines.append(
            f"| {r['codec']} | {r['backend']} | {r['clips']} | {r['frames']} | {r['fps']:.0f} | {r['fps_ratio']:.2f}x "
            f"| {r['clips_s']:.1f} | {r['clips_ratio']:.2f}x |"
        )
    lines += ["", "**Loader throughput** (QVHighlights samples, 8 frames at 224x224, mixed H.264/VP9):", "",
              "| path | samples/s | vs baseline |", "|---|---|---|"]  # fmt: skip
    for r in loader_rows:
        lines.append(f"| {r['path']} | **{r['samples_s']:.1f}** | {r['ratio']:.2f}x |")
    best = max(r["samples_s"] for r in loader_rows[1:])
    lines += [
        "",
        "**Loader vs the trainer's consumption**: the tiny recipe (configs/tiny_moe.yaml, 1 process, measured in",
        f"the same job) consumes {consumer:.1f} samples/s; the best loader delivers {best:.1f} samples/s =",
        f"**{best / consumer:.2f}x** the consumption rate (>1: the trainer does not wait for data). The tiny model",
        "still trains on token sequences; the video model of a later issue will consume these samples.",
    ]
    md = "\n".join(lines) + "\n"
    print(md)
    print(f"LOADER samples/s (best): {best:.1f}")
    if not a.no_write:
        print(f"wrote {write_section('decode', md)}")


if __name__ == "__main__":
    main()
