"""``timeexpert diagnose``: are the visual tokens frame-specific, after each training stage?

    timeexpert diagnose --config configs/timeexpert_stage3.yaml --data runs/main_job/vtg_test \\
        --checkpoint runs/main_job/stage1/checkpoints --checkpoint runs/main_job/stage2/checkpoints \\
        --checkpoint runs/main_job/stage3/checkpoints [--videos 16] [--max-cosine 0.9] [--json diag.json]

For every checkpoint (a save_dir: its newest complete checkpoint, or one ``iter_N`` folder; any layout,
loaded at TP = PP = EP = 1 in one process) and ``--videos`` videos of ``--data ROOT`` (laid out as
tools/make_synthetic_vtg.py writes it; the events come from ``annotations/activitynet_captions.json``),
the frames are decoded and resized as training does, and two token sets are measured:

- ``tower``: what the vision tower gives (``[F, 8, h]`` per video);
- ``decoder``: what enters the decoder's VISUAL positions (after ``model.frame_tokens``: per-video
  standardisation and the frame-time embedding), the tokens that matter.

Per set, averaged over the videos (docs/MODEL.md "Grounding"):

- ``norm``: mean L2 norm of a token, and ``x text``: that over the mean norm of a text embedding row;
- ``frame share``: ``||x - mean_f x|| / ||x||`` over a video's tokens (``mean_f``: the mean over its
  frames, per slot): the part of the tokens that differs between frames (0: every frame alike);
- ``cos(event, empty)``: cosine between the same slot's tokens of a frame inside an event and a frame
  inside none, over every such pair (1.0: the tokens do not see the event).

``--max-cosine X`` makes the command fail (exit 1, naming the checkpoint) when a checkpoint's decoder
tokens have ``cos(event, empty) >= X``: the stage recipes keep it below 0.9 (tests/test_diagnose.py).
One process, no communication beyond its own process group.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass
class TokenStats:
    """Frame-specificity of one token set over some videos (module docstring)."""

    norm: float
    """Mean L2 norm of a token."""
    norm_vs_text: float
    """``norm`` / mean L2 norm of a text-embedding row."""
    frame_share: float
    """Mean over videos of ``||x - mean_f x|| / ||x||``."""
    cos_event_empty: float
    """Mean cosine between a slot's token in a frame inside an event and in a frame inside none."""
    pairs: int
    """(event frame, empty frame, slot) triples behind ``cos_event_empty``."""


def token_stats(videos: list[tuple[torch.Tensor, list[bool]]], text_norm: float) -> TokenStats:
    """``videos``: per video its tokens ``[F, S, h]`` and whether each frame lies inside an event."""
    norms, shares, cosines = [], [], []
    for x, inside in videos:
        x = x.double()
        norms.append(x.norm(dim=-1).mean())
        centred = x - x.mean(dim=0, keepdim=True)
        shares.append(centred.norm() / x.norm().clamp_min(1e-30))
        ev = [f for f, i in enumerate(inside) if i]
        empty = [f for f, i in enumerate(inside) if not i]
        if ev and empty:
            a = x[ev].unsqueeze(1)  # [E, 1, S, h]
            b = x[empty].unsqueeze(0)  # [1, N, S, h]
            cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-30).flatten())
    cos = torch.cat(cosines) if cosines else torch.empty(0, dtype=torch.float64)
    norm = float(torch.stack(norms).mean())
    return TokenStats(
        norm=norm,
        norm_vs_text=norm / text_norm if text_norm > 0 else float("nan"),
        frame_share=float(torch.stack(shares).mean()),
        cos_event_empty=float(cos.mean()) if cos.numel() else float("nan"),
        pairs=int(cos.numel()),
    )


def _videos(root: Path, limit: int) -> list[tuple[str, list[tuple[float, float]]]]:
    """``(video path, event spans)`` of the first ``limit`` videos of ``root``'s dense-caption file."""
    from megatron_timeexpert.eval.io import read_dense_gt

    ann = root / "annotations" / "activitynet_captions.json"
    if not ann.is_file():
        raise FileNotFoundError(f"--data {root}: no {ann} (a folder written by tools/make_synthetic_vtg.py)")
    out = []
    for v in read_dense_gt(ann)[:limit]:
        found = sorted((root / "videos").glob(f"{v.vid}.*"))
        if not found:
            raise FileNotFoundError(f"--data {root}: no video file for {v.vid} in {root / 'videos'}")
        out.append((str(found[0]), list(v.segments)))
    if not out:
        raise ValueError(f"--data {root}: no video in {ann}")
    return out


def diagnose(cfg, checkpoints: list[str], data: Path, num_videos: int) -> list[dict]:
    """The measurements of every checkpoint (module docstring), in order (the process group exists)."""
    from dali_pipes import DecoderConfig, SamplingConfig, VideoDecoder
    from megatron_timeexpert.data.vtg_source import resize_frames
    from megatron_timeexpert.predict.cli import build_predict_model, resolve_checkpoint
    from megatron_timeexpert.train.checkpoint import load_checkpoint

    decoder = VideoDecoder(DecoderConfig(sampling=SamplingConfig("uniform", cfg.data.num_frames), transform=None))
    clips = []
    for path, spans in _videos(data, num_videos):
        clip = decoder.read(path)
        times = clip.timestamps.to(torch.float64)
        inside = [any(a - 1e-6 <= float(t) <= b + 1e-6 for a, b in spans) for t in times]
        clips.append((resize_frames(clip.frames.cpu(), cfg.data.image_size), times, inside))
    chunks, encode, lm = build_predict_model(cfg)
    video = chunks[0]
    rows = []
    for ckpt in checkpoints:
        path = resolve_checkpoint(ckpt)
        load_checkpoint(path, chunks)
        for c in chunks:
            c.eval()
        words = lm.embedding.word_embeddings.weight[: cfg.model.vocab_size]
        text_norm = float(words.double().norm(dim=-1).mean())
        tower, dec = [], []
        with torch.no_grad():
            for frames, times, inside in clips:
                tokens = video.vision(frames)  # [F, S, h]
                tower.append((tokens, inside))
                dec.append((encode(frames, times).reshape(tokens.shape), inside))
        state = path / "train_state.json"
        step = json.loads(state.read_text()).get("step") if state.is_file() else None
        rows.append(
            {
                "checkpoint": str(path),
                "step": step,
                "videos": len(clips),
                "text_embedding_norm": text_norm,
                "tower": asdict(token_stats(tower, text_norm)),
                "decoder": asdict(token_stats(dec, text_norm)),
            }
        )
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [
        f"{'checkpoint':<60} {'tokens':<8} {'norm':>8} {'x text':>8} {'frame share':>12} {'cos(event, empty)':>18}"
    ]
    for r in rows:
        for kind in ("tower", "decoder"):
            s = r[kind]
            lines.append(
                f"{r['checkpoint'][-60:]:<60} {kind:<8} {s['norm']:>8.3f} {s['norm_vs_text']:>8.2f} "
                f"{s['frame_share']:>12.3f} {s['cos_event_empty']:>18.4f}"
            )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="timeexpert diagnose", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="the recipe the checkpoints were trained with")
    p.add_argument("--checkpoint", action="append", required=True, help="save_dir or iter_N folder (repeatable)")
    p.add_argument("--data", required=True, type=Path, help="data root (videos/, annotations/)")
    p.add_argument("--videos", type=int, default=16, help="videos to measure (the first N of the dense file)")
    p.add_argument("--max-cosine", type=float, default=None, help="fail when a decoder cos(event, empty) >= this")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    p.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch.distributed as dist

    from megatron_timeexpert.config import ConfigError
    from megatron_timeexpert.predict.cli import init_inference

    try:
        cfg = init_inference(args.config, args.overrides)
    except ConfigError as e:
        print(f"timeexpert diagnose: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        if cfg.model.kind != "timeexpert":
            raise ValueError(f"{args.config}: model.kind is {cfg.model.kind!r}; diagnose needs a 'timeexpert' model")
        rows = diagnose(cfg, args.checkpoint, args.data, args.videos)
    except (ValueError, FileNotFoundError) as e:
        print(f"timeexpert diagnose: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    print(format_rows(rows), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.max_cosine is not None:
        bad = [r for r in rows if not r["decoder"]["cos_event_empty"] < args.max_cosine]
        for r in bad:
            print(
                f"timeexpert diagnose: {r['checkpoint']}: decoder tokens cos(event, empty) = "
                f"{r['decoder']['cos_event_empty']:.4f} >= {args.max_cosine}: the visual tokens do not tell "
                "frames with the event from frames without it",
                file=sys.stderr,
            )
        if bad:
            return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
