"""``timeexpert predict``: structured event predictions for a data set, in the public evaluators' formats.

    timeexpert predict --config R.yaml --checkpoint RUN/ckpt --data ROOT --task charades --out pred.jsonl
    timeexpert predict ... --task qvhighlights --out qv.jsonl --batch-size 16 --max-new-tokens 256
    timeexpert predict ... --task dvc --out dvc.json model.seq_length=1024           # overrides as pretrain
    torchrun --nproc-per-node 2 -m megatron_timeexpert.cli predict ... parallel.tp=2  # same predictions

``--data ROOT`` is a folder laid out as tools/make_synthetic_vtg.py writes it (``videos/`` and
``annotations/charades_sta.txt``, ``qvhighlights.jsonl``, ``youcook2.json``); ``--annotations`` and
``--video-root`` point elsewhere. The checkpoint (a ``save_dir``: its newest complete checkpoint,
or one ``iter_N`` folder) may come from any (TP, PP, EP) layout: it is loaded resharded into this
run's layout: PP = 1 (generation needs the whole decoder on a rank), and TP = EP = 1 in one process
(under torchrun the recipe's TP/EP or ``parallel.*`` overrides). Every rank decodes the
same samples and generates the same batches (chosen ids come from rank 0); rank 0 writes.

Output (eval/io.py writers): ``charades`` -> moment jsonl ``{vid, query, pred_windows}``;
``qvhighlights`` -> moment_detr jsonl ``{qid, query, vid, pred_relevant_windows, pred_saliency_scores}``
(a moment and a highlight generation per query); ``dvc`` -> ``{vid: [{timestamp, caption}]}``.
A malformed generation or an undecodable video gives an empty prediction, counted in the summary line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TASKS = {
    "charades": ("charades_sta", "charades_sta.txt"),
    "qvhighlights": ("qvhighlights", "qvhighlights.jsonl"),
    "dvc": ("youcook2", "youcook2.json"),
}
"""``--task`` -> (annotation reader, file under ``ROOT/annotations``)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="timeexpert predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="the training recipe (model sizes, vision, tokenizer)")
    p.add_argument("--checkpoint", required=True, help="save_dir (newest complete checkpoint) or an iter_N folder")
    p.add_argument("--data", help="data root: ROOT/videos and ROOT/annotations/<task file>")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--out", required=True, help="prediction file to write")
    p.add_argument("--annotations", help="annotation file (default ROOT/annotations/<task file>)")
    p.add_argument("--format", help="annotation reader (default by task: charades_sta, qvhighlights, youcook2)")
    p.add_argument("--video-root", help="video folder (default ROOT/videos)")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: the config's data.tokenizer)")
    p.add_argument("--num-frames", type=int, help="frames per video (default: the config's data.num_frames, else 8)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (equal prompt length)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response positions per sample at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--no-cache", action="store_true", help="recompute every step instead of the KV cache")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    return p


def build_predict_model(cfg) -> tuple[list[torch.nn.Module], Callable, torch.nn.Module]:
    """``(chunks to load the checkpoint into, encode, decoder)`` at the initialised layout (PP = 1):
    the trainer's ``TimeExpertVideoLLM`` (model/video_llm.py), so checkpoint keys match what training
    saved, and ``encode(frames [F, H, W, 3], times [F]) -> visual [F * 8, h]`` for one video: the vision
    tower and the frame-token step exactly as training runs them."""
    from megatron_timeexpert.model.video_llm import build_video_llm

    chunks = build_video_llm(cfg)
    video = chunks[0]

    def encode(frames: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
        times = torch.as_tensor(times, dtype=torch.float32, device=frames.device).reshape(1, -1)
        return video.encode_frames(frames, 1, times)[0]

    return chunks, encode, video.lm


def resolve_checkpoint(path: str | Path) -> Path:
    """An ``iter_N`` folder with its COMPLETE marker, or the newest complete one in a save_dir."""
    from megatron_timeexpert.train.checkpoint import MARKER, latest_checkpoint

    p = Path(path)
    if (p / MARKER).is_file():
        return p
    found = latest_checkpoint(p) if p.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"{p}: neither a complete checkpoint (no {MARKER}) nor a save_dir holding one")
    return found


def _tokenizer(args, cfg):
    from megatron_timeexpert.data.tokenizer import TextTokenizer

    path = args.tokenizer or getattr(cfg.data, "tokenizer", None)
    if not path:
        raise ValueError("no tokenizer: pass --tokenizer or set data.tokenizer in the config")
    tok = TextTokenizer.load(path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"{path}: {tok.vocab_size} pieces but model.vocab_size is {cfg.model.vocab_size}")
    return tok


def _samples(args):
    """The samples to predict for: (reader samples, the ReaderConfig's video root, bad-input counter)."""
    from megatron_timeexpert.data.annotations import ReaderConfig, read_annotations
    from megatron_timeexpert.data.stats import BadInputs
    from megatron_timeexpert.data.types import Task

    fmt, name = TASKS[args.task]
    fmt = args.format or fmt
    if args.annotations is None and args.data is None:
        raise ValueError("pass --data ROOT or --annotations FILE")
    ann = Path(args.annotations) if args.annotations else Path(args.data) / "annotations" / name
    video_root = Path(args.video_root) if args.video_root else Path(args.data or ann.parent.parent) / "videos"
    bad = BadInputs("skip")
    samples = read_annotations(fmt, ann, ReaderConfig(video_root), bad)
    if args.task == "qvhighlights":
        samples = [s for s in samples if s.task is Task.MOMENT_RETRIEVAL]
    if args.limit is not None:
        samples = samples[: args.limit]
    return samples, bad


def _qid(sample_id: str) -> str:
    """QVHighlights query id from ``qvhighlights:<stem>:<qid>:mr``."""
    parts = sample_id.split(":")
    return parts[-2] if len(parts) >= 4 else sample_id


def _agree_on_decoded(decoded: list) -> list:
    """Under several ranks, a sample counts as decoded only if it decoded on EVERY rank (a decode
    deadline may pass on one rank only), so that all ranks generate the same batches."""
    import torch.distributed as dist

    if dist.get_world_size() == 1 or not decoded:
        return decoded
    from parallel.env import collective_device

    ok = torch.tensor([fs is not None for fs in decoded], dtype=torch.int32, device=collective_device())
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return [fs if bool(k) else None for fs, k in zip(decoded, ok.tolist())]


def run_predict(args, cfg) -> int:
    """Everything after the process groups exist (collective: every rank calls it)."""
    import torch.distributed as dist
    from tqdm import tqdm

    from dali_pipes import DecoderConfig, SamplingConfig, VideoDecoder
    from megatron_timeexpert.data import vtg
    from megatron_timeexpert.data.dataset import VTGDataset
    from megatron_timeexpert.data.types import Task
    from megatron_timeexpert.data.vtg_source import resize_frames
    from megatron_timeexpert.eval import io
    from megatron_timeexpert.predict.generation import GenerationConfig
    from megatron_timeexpert.predict.run import (
        BAD_VIDEO,
        Outcome,
        PredictStats,
        Prompt,
        Query,
        dense_records,
        moment_record,
        predict_prompts,
        qvhighlights_record,
    )
    from megatron_timeexpert.train.checkpoint import load_checkpoint

    rank = dist.get_rank()
    if getattr(cfg.model, "kind", "timeexpert") != "timeexpert":
        raise ValueError(f"{args.config}: model.kind is {cfg.model.kind!r}; predict needs a 'timeexpert' model")
    tok = _tokenizer(args, cfg)
    chunks, encode, lm = build_predict_model(cfg)
    seq_cfg = cfg.data.sequence_config()
    ckpt = resolve_checkpoint(args.checkpoint)
    load_checkpoint(ckpt, chunks)
    for c in chunks:
        c.eval()
    use_cache = not args.no_cache and not lm.config.sequence_parallel
    if not args.no_cache and not use_cache and rank == 0:
        print("timeexpert predict: TP > 1 (sequence parallel): recomputing every step instead of a KV cache")
    gcfg = GenerationConfig(args.max_new_tokens, args.temperature, args.top_p, args.seed, use_cache)
    if args.data is None and args.annotations is None:
        args.data = getattr(cfg.data, "root", None)
    samples, bad = _samples(args)
    num_frames = args.num_frames or int(getattr(cfg.data, "num_frames", 0) or 8)
    sampling = SamplingConfig(mode="uniform", num_frames=num_frames)
    decoder = VideoDecoder(DecoderConfig(sampling=sampling, transform=None))
    dataset = VTGDataset(samples, decoder, bad)
    device = next(lm.parameters()).device
    # The training source resizes frames to data.image_size (uint8) before the tower; so does predict.
    frame_size = int(getattr(cfg.data, "image_size", 0) or 0)
    quiet = rank != 0 or args.no_progress
    bar = tqdm(total=len(samples), desc="predict", unit="sample", disable=quiet, file=sys.stderr)
    queries: list[Query] = []
    stats = PredictStats()
    n_prompts = 0
    # Chunks of samples: decode + vision tokens of one chunk are held in memory at a time.
    chunk = max(64, 8 * args.batch_size)
    for lo in range(0, len(samples), chunk):
        idx = range(lo, min(lo + chunk, len(samples)))
        with torch.no_grad():
            decoded = [dataset.get(i) for i in idx]
        decoded = _agree_on_decoded(decoded)
        prompts: list[Prompt] = []
        where: list[tuple[Query, str]] = []  # prompt -> (its query, "mr" | "hd")
        with torch.no_grad():
            for i, fs in zip(idx, decoded):
                s = samples[i]
                q = Query(Path(s.video).stem, s.query, _qid(s.sample_id) if args.task == "qvhighlights" else None)
                q.duration = float(s.duration or 0.0)  # the annotation's; the decoded video's when it has none
                queries.append(q)
                if fs is None:
                    q.mr = Outcome(s.sample_id, None, (), BAD_VIDEO)
                    q.hd = Outcome(s.sample_id, None, (), BAD_VIDEO) if args.task == "qvhighlights" else None
                    continue
                q.duration = float(s.duration if s.duration is not None else fs.duration)
                frames = resize_frames(fs.frames, frame_size) if frame_size else fs.frames  # as the training source
                visual = encode(frames.to(device), fs.timestamps)  # [N * 8, h]
                kinds = [("mr", s)]
                if args.task == "qvhighlights":
                    hd = replace(s, task=Task.HIGHLIGHT_DETECTION, sample_id=s.sample_id[:-2] + "hd")
                    kinds.append(("hd", hd))
                for kind, sample in kinds:
                    t = vtg.tokenize_sample(sample, fs.timestamps, tok, seq_cfg, with_response=False)
                    prompts.append(Prompt(sample.sample_id, t.ids, t.types, visual))
                    where.append((q, kind))
        outcomes = predict_prompts(
            lm, prompts, tok, gcfg, args.batch_size, stats, index_offset=n_prompts, numbers=seq_cfg.numbers
        )
        n_prompts += len(prompts)
        for (q, kind), o in zip(where, outcomes):
            setattr(q, kind, o)
        bar.update(len(idx))
    bar.close()
    for q in queries:
        for o in (q.mr, q.hd):
            if o is not None and o.reason == BAD_VIDEO:
                stats.samples += 1
                stats.malformed[BAD_VIDEO] += 1
    if rank == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if args.task == "charades":
            io.write_moment_predictions(out, [moment_record(q) for q in queries])
        elif args.task == "qvhighlights":
            io.write_qvhighlights_predictions(out, [qvhighlights_record(q) for q in queries])
        else:
            io.write_dense_predictions(out, dense_records(queries))
        print(f"timeexpert predict: {stats.line()}; checkpoint {ckpt}; wrote {out}", flush=True)
    return 0


def init_inference(config: str, overrides: list[str]):
    """Load ``config`` for a run that only evaluates a model (predict, diagnose) and start its process
    groups: PP = 1 (the whole decoder on a rank); one process means TP = EP = 1, under a launcher the
    recipe's TP/EP or ``parallel.*`` overrides (given last, they win). Training batch sizes are set to
    fit any data-parallel size. ConfigError (before any process group exists) on a bad setting."""
    import torch.distributed as dist

    from megatron_timeexpert.config import load_config
    from parallel.cpu_compat import apply_cpu_shims
    from parallel.env import discover, init_distributed

    dist_env = discover()
    layout = ["parallel.pp=1", "parallel.vpp=null"]
    if dist_env.world_size == 1:
        layout += ["parallel.tp=1", "parallel.ep=1", "parallel.etp=1"]
    cfg = load_config(config, [*layout, *overrides])
    init_distributed(dist_env, timeout_s=cfg.parallel.collective_timeout_s)
    cfg.training.micro_batch_size = 1
    cfg.training.global_batch_size = dist_env.world_size
    try:
        cfg.validate(dist_env.world_size)
    except Exception:
        dist.destroy_process_group()
        raise
    if not torch.cuda.is_available():
        apply_cpu_shims()
    cfg.parallel.initialize(cfg.training.seed)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch.distributed as dist

    from megatron_timeexpert.config import ConfigError

    try:
        cfg = init_inference(args.config, args.overrides)
    except ConfigError as e:
        print(f"timeexpert predict: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        return run_predict(args, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"timeexpert predict: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
