"""Expert migration benchmark (issue 9): bytes and wall time of moving experts between EP ranks,
against a training step of the same run.

Run (CPU, gloo, about 4-5 minutes on 2 cores; writes the ``migration`` section of docs/BENCHMARKS.md and
docs/bench/migration.json)::

    python -m bench.migration [--ep 2 4] [--hidden 256 --ffn 1024] [--steps 4] [--no-write]
    python -m bench.migration --quick      # EP 2, small experts, 2 repeats: a smoke run, writes nothing

For each EP size (world = EP, TP = PP = 1, so DP = EP) and precision (fp32; bf16 with fp32 main
weights), one gloo job builds a real :class:`Pretrainer` from configs/tiny_timeexpert.yaml with
``moe.num_experts = 4 * EP`` and a wider model (``--hidden``/``--ffn``, so one expert is MBs),
megatron's plain optimizer (Adam), no checkpoints. After ``--warmup`` training steps (which create
the Adam state) it repeats ``--steps`` times: time one training step, then time
``install_placement`` on every MoE layer (the trainer's own migration path:
train/expert_moves.py -> parallel/migration.py, one ``all_to_all_single`` per layer) for each
move pattern:

- ``rotate``: every logical expert moves ``slots_per_rank`` slots on, i.e. to the next EP rank
  (every expert changes rank);
- ``swap``: two experts on ranks 0 and 1 trade slots, the smallest change of a full placement map
  (each of the two ranks sends one expert).

Times are wall times of the slowest rank between barriers; reported: medians over repeats.
Checked in the script (it raises otherwise): ``MigrationStats.bytes_per_expert`` equals the bytes
an expert owns, computed here from the expert parameters' shapes and dtypes, not from the
migration code's tensor list: per weight tensor, the slot's weights, the fp32 main copy (bf16
only) and Adam's two fp32 moments, plus the int64 per-slot Adam step base; the bytes all ranks
sent equal moved-to-another-rank experts x that; the moved counts are the pattern's.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time

from bench.report import DOC, machine_line, write_section

RECIPE = "configs/tiny_timeexpert.yaml"
JSON_OUT = DOC.parent / "bench" / "migration.json"
PATTERNS = ("rotate", "swap")
ADAM_MOMENTS = 2
FP32_BYTES = 4
STEP_BASE_BYTES = 8  # int64 experts.slot_step_base, one per slot


def bench_config(ep: int, precision: str, hidden: int, ffn: int, run_dir: str):
    """The tiny TimeExpert recipe at world = EP, TP = PP = 1, wider, more experts, no checkpoints."""
    from megatron_timeexpert.config import load_config

    return load_config(
        RECIPE,
        [
            "parallel.tp=1",
            "parallel.pp=1",
            f"parallel.ep={ep}",
            "moe.router=timeexpert",
            f"moe.num_experts={4 * ep}",
            f"model.hidden_size={hidden}",
            f"model.ffn_hidden_size={ffn}",
            f"training.precision={precision}",
            "training.save_dir=null",
            "training.save_interval=0",
            "training.train_steps=1000",
            "logging.progress_bar=false",
            "logging.wandb=false",
            "logging.tensorboard=false",
            f"logging.run_dir={run_dir}",
        ],
    )


def expected_expert_bytes(layer, precision: str) -> int:
    """Bytes one expert owns, from the expert parameters' shapes and dtypes (module docstring)."""
    total = STEP_BASE_BYTES
    for p in layer.experts.parameters():
        per_slot = p[0].numel()
        total += per_slot * p.element_size()  # the weights as the model holds them
        if precision == "bf16":
            total += per_slot * FP32_BYTES  # megatron's fp32 main copy
        total += per_slot * FP32_BYTES * ADAM_MOMENTS  # exp_avg, exp_avg_sq (fp32 like the main weights)
    return total


def _new_map(pattern: str, old, slots_per_rank: int):
    """The placement after ``pattern`` (module docstring) and how many experts change rank."""
    import torch

    e = old.numel()
    if pattern == "rotate":
        return (old + slots_per_rank) % e, e
    inv = torch.empty_like(old)
    inv[old] = torch.arange(e)
    a, b = int(inv[0]), int(inv[slots_per_rank])  # the experts in slot 0 (rank 0) and slot 0 of rank 1
    new = old.clone()
    new[a], new[b] = old[b], old[a]
    return new, 2


def _timed(fn):
    """``fn()`` between barriers; (result, wall seconds of the slowest rank)."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    dist.barrier()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return out, float(dt)


def _measure(cfg, precision: str, warmup: int, repeats: int) -> dict:
    """On every rank: build the trainer, warm up, then alternate timed steps and timed migrations."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_timeexpert.train.expert_moves import install_placement
    from megatron_timeexpert.train.pretrain import Pretrainer, _moe_layers

    trainer = Pretrainer(cfg)
    try:
        layers = [layer for model in trainer.models for layer in _moe_layers(model)]
        expected = expected_expert_bytes(layers[0], precision)
        if any(expected_expert_bytes(layer, precision) != expected for layer in layers):
            raise AssertionError("MoE layers differ in expert size")
        for _ in range(warmup):
            trainer._step()
        step_s: list[float] = []
        mig: dict[str, list[dict]] = {p: [] for p in PATTERNS}
        for _ in range(repeats):
            (loss, _), step_time = _timed(trainer._step)
            step_s.append(step_time)
            for pattern in PATTERNS:
                maps = [
                    _new_map(pattern, layer.placement.logical_to_physical, layer.placement.slots_per_rank)
                    for layer in layers
                ]

                def move(maps=maps):
                    return [install_placement(layer, trainer.optimizer, m) for layer, (m, _) in zip(layers, maps)]

                stats, wall = _timed(move)
                sent = torch.tensor([s.bytes_sent for s in stats], dtype=torch.int64)
                dist.all_reduce(sent)
                for s, (_, moved), total in zip(stats, maps, sent.tolist()):
                    if s.bytes_per_expert != expected:
                        raise AssertionError(
                            f"{precision} {pattern}: {s.bytes_per_expert} bytes per moved expert, expected {expected} "
                            "(weights + fp32 main copy under bf16 + 2 Adam moments + per-slot step)"
                        )
                    if s.remote_experts != moved or s.moved_experts != moved:
                        raise AssertionError(
                            f"{pattern}: {s.moved_experts}/{s.remote_experts} experts moved, not {moved}"
                        )
                    if total != moved * expected:
                        raise AssertionError(
                            f"{pattern}: {total} bytes sent by all ranks, expected {moved} x {expected}"
                        )
                mig[pattern].append(
                    {
                        "wall_s": wall,
                        "moved_per_layer": maps[0][1],
                        "bytes_sent_all_ranks": int(sent.sum()),
                        "bytes_sent_this_rank": sum(s.bytes_sent for s in stats),
                        "bytes_per_expert": stats[0].bytes_per_expert,
                    }
                )
        return {
            "expected_bytes_per_expert": expected,
            "moe_layers": len(layers),
            "slots_per_rank": layers[0].placement.slots_per_rank,
            "expert_weight_shapes": [list(p.shape[1:]) for p in layers[0].experts.parameters()],
            "weight_dtype": str(next(layers[0].experts.parameters()).dtype),
            "step_s": step_s,
            "migrations": mig,
            "last_loss": float(loss),
            "loss_finite": math.isfinite(loss),
        }
    finally:
        parallel_state.destroy_model_parallel()


def run_case(ep: int, precision: str, hidden: int, ffn: int, warmup: int, repeats: int) -> list[dict]:
    """One gloo job (world = EP, one precision); one row per move pattern."""
    from parallel.testing import run_distributed

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = bench_config(ep, precision, hidden, ffn, run_dir)
        t0 = time.perf_counter()
        res = run_distributed(_measure, ep, args=(cfg, precision, warmup, repeats), timeout=600)[0]
        job_s = time.perf_counter() - t0
    if not res["loss_finite"]:
        raise SystemExit(f"EP {ep} {precision}: loss is not finite ({res['last_loss']})")
    step = statistics.median(res["step_s"])
    rows = []
    for pattern in PATTERNS:
        recs = res["migrations"][pattern]
        wall = statistics.median(r["wall_s"] for r in recs)
        moved = recs[0]["moved_per_layer"]
        layers = res["moe_layers"]
        sent = recs[0]["bytes_sent_all_ranks"]
        rows.append(
            {
                "ep": ep,
                "precision": precision,
                "pattern": pattern,
                "experts": 4 * ep,
                "slots_per_rank": res["slots_per_rank"],
                "moe_layers": layers,
                "experts_moved_per_layer": moved,
                "experts_moved": moved * layers,
                "bytes_per_moved_expert": recs[0]["bytes_per_expert"],
                "expected_bytes_per_expert": res["expected_bytes_per_expert"],
                "equal": recs[0]["bytes_per_expert"] == res["expected_bytes_per_expert"],
                "bytes_sent_all_ranks": sent,
                "migration_s": wall,
                "migration_s_per_layer": wall / layers,
                "mb_per_s": sent / wall / 1e6,
                "step_s": step,
                "migration_over_step": wall / step,
                "migration_s_all": [r["wall_s"] for r in recs],
                "step_s_all": res["step_s"],
                "expert_weight_shapes": res["expert_weight_shapes"],
                "weight_dtype": res["weight_dtype"],
                "job_s": job_s,
            }
        )
    return rows


def render(rows: list[dict], meta: dict) -> str:
    r0 = rows[0]
    shapes = " and ".join("x".join(map(str, s)) for s in r0["expert_weight_shapes"])
    lines = [
        "## Expert migration",
        "",
        f"{meta['machine']}; gloo, one intra-op thread per process. Command: `{meta['command']}`.",
        "",
        f"configs/tiny_timeexpert.yaml (timeexpert router, {r0['moe_layers']} MoE layers) at world = EP, TP = PP = 1,",
        f"hidden {meta['hidden']}, FFN {meta['ffn']} (expert weights {shapes}), 4 x EP experts, megatron's plain",
        "Adam, no checkpoints. Per job (one EP and precision): "
        f"{meta['warmup']} warm-up steps, then {meta['steps']} repeats of one",
        "training step followed by two migrations of every MoE layer through `install_placement` (the",
        "trainer's path, one `all_to_all_single` per layer): `rotate` moves every expert to the next EP rank;",
        "`swap` trades two experts between ranks 0 and 1 (the smallest change of a full map). Times: slowest",
        "rank between barriers, median of the repeats. Bytes/expert: `MigrationStats.bytes_per_expert`;",
        "expected: computed from the expert parameters' shapes and dtypes (weights + fp32 main copy under bf16",
        "+ 2 fp32 Adam moments + 8-byte per-slot step base); the script raises unless they are equal and",
        "the bytes all ranks sent = experts moved x that. MB/s = all ranks' bytes sent / migration time.",
        "",
        "| EP | precision | pattern | experts moved (per layer x layers) | bytes/moved expert | expected | equal "
        "| migration ms (all layers) | ms per layer | MB/s | step ms | migration / step |",
        "| ---: | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['ep']} | {r['precision']} | {r['pattern']} | {r['experts_moved']} "
            f"({r['experts_moved_per_layer']} x {r['moe_layers']}) | {r['bytes_per_moved_expert']:,} "
            f"| {r['expected_bytes_per_expert']:,} | {'yes' if r['equal'] else 'NO'} | {1e3 * r['migration_s']:.1f} "
            f"| {1e3 * r['migration_s_per_layer']:.1f} | {r['mb_per_s']:.0f} | {1e3 * r['step_s']:.0f} "
            f"| {r['migration_over_step']:.3f} |"
        )
    lines += ["", "Small moves cost more than their bytes (swap against rotate, same job):", ""]
    for r in rows:
        if r["pattern"] != "swap":
            continue
        rot = next(x for x in rows if (x["ep"], x["precision"], x["pattern"]) == (r["ep"], r["precision"], "rotate"))
        packed = r["slots_per_rank"] * r["bytes_per_moved_expert"] / 1e6
        lines.append(
            f"- EP {r['ep']} {r['precision']}: {r['bytes_sent_all_ranks'] / rot['bytes_sent_all_ranks']:.0%} of the "
            f"bytes, {r['migration_s'] / rot['migration_s']:.0%} of the time ({r['slots_per_rank']} local slots "
            f"= {packed:.0f} MB of slot state per layer and rank)"
        )
    lines += [
        "",
        "`migrate_slots` copies only the rows that leave their slot (parallel/migration.py `_pack`); until",
        "commit ec65e6c it copied every local slot of every slot tensor, and a 2-expert swap then took 21-29%",
        "of a step (30-51% of a full rotation's time for 12-25% of its bytes).",
        "The machine is a shared 2-core box (other jobs ran alongside), and EP 4 puts 4 processes on 2 cores:",
        "expect run-to-run noise of tens of percent; compare the ratio column, measured within one job.",
        f"Total wall time {meta['wall_s']:.0f} s. Raw per-repeat times: `docs/bench/migration.json`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.migration", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4], help="EP sizes (world = EP)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4, help="timed repeats (step + migrations) per job")
    ap.add_argument("--warmup", type=int, default=2, help="untimed training steps first (create Adam state)")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--quick", action="store_true", help="EP 2, hidden 64, FFN 256, 1+2 steps; writes nothing")
    ap.add_argument("--no-write", action="store_true")
    raw = argv if argv is not None else sys.argv[1:]
    args = ap.parse_args(raw)
    if args.quick:
        args.ep, args.hidden, args.ffn, args.steps, args.warmup, args.no_write = [2], 64, 256, 2, 1, True
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1 (Adam state exists only after a step)")
    t0 = time.perf_counter()
    rows: list[dict] = []
    for ep in args.ep:
        for precision in args.precision:
            case = run_case(ep, precision, args.hidden, args.ffn, args.warmup, args.steps)
            rows += case
            for r in case:
                print(
                    f"EP={r['ep']} {r['precision']:4} {r['pattern']:6} moved {r['experts_moved']:3}  "
                    f"{r['bytes_per_moved_expert']:,} B/expert (expected {r['expected_bytes_per_expert']:,})  "
                    f"migration {1e3 * r['migration_s']:.1f} ms ({r['mb_per_s']:.0f} MB/s)  "
                    f"step {1e3 * r['step_s']:.0f} ms  ratio {r['migration_over_step']:.3f}",
                    flush=True,
                )
    meta = {
        "machine": machine_line(),
        "python": platform.python_version(),
        "command": "python -m bench.migration" + (" " + " ".join(raw)).rstrip(),
        "recipe": RECIPE,
        "hidden": args.hidden,
        "ffn": args.ffn,
        "steps": args.steps,
        "warmup": args.warmup,
        "wall_s": time.perf_counter() - t0,
    }
    print(f"total {meta['wall_s']:.0f} s")
    if not args.no_write:
        write_section("migration", render(rows, meta))
        JSON_OUT.parent.mkdir(parents=True, exist_ok=True)
        JSON_OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {DOC} (section migration) and {JSON_OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
