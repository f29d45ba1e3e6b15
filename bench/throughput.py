"""Benchmark: training throughput (tokens/s) of the tiny MoE recipe on 1, 2 and 4 processes.

Run (CPU, gloo, about 2-3 minutes; writes the ``throughput`` section of docs/BENCHMARKS.md)::

    python -m bench.throughput
    python -m bench.throughput --steps 8 --no-write   # quicker, print only

Every layout trains configs/tiny_moe.yaml with the same global batch (so the same tokens per step)
through ``run_pretrain_in_group`` under ``parallel.testing.run_distributed``, one after the other in
this one job, so the ratios against the 1-process run share the machine's state:

- 1 process:  TP 1, PP 1, EP 1 (DP 1)
- 2 processes: TP 1, PP 1, EP 2 (DP 2; experts split over the two data-parallel ranks)
- 4 processes: TP 2, PP 2, EP 2 (the recipe's own layout)

Per layout we take rank 0's logged ``tokens_per_s`` of every step, drop the first ``--warmup`` steps
and report the median. Each process runs with one intra-op thread, so on a machine with fewer cores
than processes the ratio measures parallelism overhead (communication, pipeline bubbles,
oversubscription), not scaling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from bench.report import machine_line, write_section

RECIPE = "configs/tiny_moe.yaml"

# (processes, tp, pp, ep) in the order they run; the first is the baseline.
LAYOUTS: tuple[tuple[int, int, int, int], ...] = ((1, 1, 1, 1), (2, 1, 1, 2), (4, 2, 2, 2))


def measure(world: int, tp: int, pp: int, ep: int, steps: int, warmup: int, run_dir: str) -> dict:
    """Train ``steps`` steps at one layout; the median tokens/s and step time after the warm-up."""
    from megatron_timeexpert.config import load_config
    from megatron_timeexpert.train.pretrain import run_pretrain_in_group
    from parallel.testing import run_distributed

    cfg = load_config(
        RECIPE,
        [
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"parallel.ep={ep}",
            "training.save_dir=null",
            f"training.train_steps={steps}",
            "logging.log_interval=1",
            "logging.progress_bar=false",
            "logging.wandb=false",
            "logging.tensorboard=false",
            f"logging.run_dir={run_dir}",
        ],
    )
    t0 = time.perf_counter()
    result = run_distributed(run_pretrain_in_group, world, args=(cfg,), timeout=600)[0]
    wall = time.perf_counter() - t0
    kept = result.metrics[warmup:]
    if not kept:
        raise SystemExit(f"{world} processes: only {len(result.metrics)} logged steps, none after the warm-up")
    return {
        "world": world,
        "tp": tp,
        "pp": pp,
        "ep": ep,
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in kept),
        "step_time_s": statistics.median(m["step_time_s"] for m in kept),
        "steps_kept": len(kept),
        "final_loss": result.losses[-1],
        "wall_s": wall,
    }


def report(rows: list[dict], steps: int, warmup: int, command: str) -> str:
    """The markdown section: one table row per layout, ratios against the first row."""
    base = rows[0]["tokens_per_s"]
    cores = os.cpu_count() or 1
    lines = [
        "## Training throughput of the tiny MoE recipe",
        "",
        machine_line(),
        "",
        f"Command: `{command}`",
        "",
        f"configs/tiny_moe.yaml (4 layers, hidden 64, 4 experts top-2, seq 64, global batch 8), {steps} steps per "
        f"layout, the first {warmup} dropped as warm-up, median of rank 0's per-step tokens/s; all layouts in one "
        "job, one intra-op thread per process.",
        "",
        "| processes | TP | PP | EP | DP | tokens/s | step time (s) | vs 1 process | final loss |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        dp = r["world"] // (r["tp"] * r["pp"])
        lines.append(
            f"| {r['world']} | {r['tp']} | {r['pp']} | {r['ep']} | {dp} | {r['tokens_per_s']:,.0f} | "
            f"{r['step_time_s']:.3f} | {r['tokens_per_s'] / base:.2f}x | {r['final_loss']:.4f} |"
        )
    over = [r["world"] for r in rows if r["world"] > cores]
    lines.append("")
    if over:
        lines.append(
            f"This machine has {cores} cores, fewer than the {', '.join(map(str, over))} processes of the larger "
            "layouts, so those processes share cores: the ratio measures the overhead of parallelism "
            "(gloo communication, pipeline bubbles, time-slicing), not how the layouts scale on real hardware."
        )
    else:
        lines.append(
            "Every process has a core of its own; on a model this small the ratio is dominated by "
            "communication and pipeline bubbles rather than compute."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12, help="training steps per layout")
    p.add_argument("--warmup", type=int, default=2, help="leading steps left out of the median")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    ns = p.parse_args(argv)
    if ns.steps <= ns.warmup:
        p.error("--steps must exceed --warmup")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        for world, tp, pp, ep in LAYOUTS:
            row = measure(world, tp, pp, ep, ns.steps, ns.warmup, os.path.join(tmp, f"w{world}"))
            print(
                f"{world} processes (tp={tp} pp={pp} ep={ep}): {row['tokens_per_s']:,.0f} tokens/s, "
                f"step {row['step_time_s']:.3f}s, wall {row['wall_s']:.0f}s",
                flush=True,
            )
            rows.append(row)
    command = "python -m bench.throughput " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(rows, ns.steps, ns.warmup, command.strip())
    print(text)
    if not ns.no_write:
        print("wrote", write_section("throughput", text))


if __name__ == "__main__":
    main()
