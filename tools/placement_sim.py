"""Placement simulator: our planner (incremental) against EPLB-style greedy packing on synthetic or recorded loads.

Run::

    python -m tools.placement_sim --loads zipf --ep 1024 --experts 4096 --steps 8 [--seed 0] [--json out.json]
    python -m tools.placement_sim --loads trace:routing.jsonl --ep 8 [--every 10] [--steps K]

Both planners start from the contiguous map. At every re-plan each gets the same per-expert loads and
its OWN previous map: ours (:func:`parallel.planner.plan_placement`) carries its map over re-plans;
the baseline (:func:`parallel.planner.plan_greedy_packing`) packs from scratch each time and moves
whatever changes rank. Reported per planner: max/mean rank load before and after (predicted with the
loads it planned for), experts and bytes moved per re-plan, and planner wall time.

Loads (``--loads``), one MoE layer unless a trace has more:

* ``zipf``: load of the i-th most popular expert ~ 1 / i**a (``--zipf-a``, default 1.0), popularity
  randomly assigned to expert ids; between re-plans every load is multiplied by exp(N(0, drift)).
* ``lognormal``: exp(N(0, sigma)) per expert (``--sigma``, default 1.0), drifting the same way.
* ``hotspot``: 1 per expert plus a Gaussian bump of height ``--hot`` (default 20) and width E/64
  over consecutive logical ids, whose centre moves by E/(4*steps) ids per re-plan; each re-plan's
  loads are multiplied by fresh exp(N(0, drift)) noise (``--drift 0``: exact, many equal loads).
* ``trace:FILE``: routing records written by a run, JSON lines, one line per training step::

      {"step": 120, "tokens": [[12, 0, 31, ...], [7, 7, 0, ...]]}

  ``tokens[l][e]`` is the number of tokens routed to logical expert ``e`` in MoE layer ``l`` at that
  step (optionally already weighted by the expert's compute); every line has the same layers and
  experts. Inactive experts have 0. The planners re-plan every ``--every`` steps (default 1) with
  the mean of the steps since the last re-plan as the load; ``--steps`` caps the number of re-plans.
  Each layer has its own map.

Bytes moved = experts moved * bytes per expert; by default an expert is a SwiGLU FFN of
``--hidden`` x ``--ffn`` (three matrices) with bf16 weights, an fp32 master copy and two fp32 Adam
moments (14 bytes per parameter); ``--bytes-per-expert`` sets it directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from parallel.planner import PlannerConfig, plan_greedy_packing, plan_placement

PLANNERS = ("ours", "greedy")


def expert_bytes(hidden: int, ffn: int) -> int:
    """Bytes that move with one SwiGLU expert: 3*H*F params x (bf16 + fp32 master + 2 fp32 moments)."""
    return 3 * hidden * ffn * (2 + 4 + 4 + 4)


def synthetic_loads(kind: str, experts: int, steps: int, seed: int, **opt) -> Iterator[list[np.ndarray]]:
    """Per re-plan, one ``[experts]`` load array per layer (one layer) for ``zipf|lognormal|hotspot``."""
    rng = np.random.default_rng(seed)
    drift = opt.get("drift", 0.2)
    if kind == "zipf":
        load = 1.0 / np.arange(1, experts + 1) ** opt.get("zipf_a", 1.0)
        load = load[rng.permutation(experts)]
    elif kind == "lognormal":
        load = rng.lognormal(0.0, opt.get("sigma", 1.0), experts)
    elif kind == "hotspot":
        width = max(1.0, experts / 64)
        shift = max(1.0, experts / (4 * max(steps, 1)))
        ids = np.arange(experts)
        for t in range(steps):
            centre = (experts / 4 + t * shift) % experts
            dist = np.minimum(np.abs(ids - centre), experts - np.abs(ids - centre))
            load = 1.0 + opt.get("hot", 20.0) * np.exp(-0.5 * (dist / width) ** 2)
            yield [load * np.exp(rng.normal(0.0, drift, experts)) if drift else load]
        return
    else:
        raise ValueError(f"--loads must be zipf, lognormal, hotspot or trace:FILE, got {kind!r}")
    for t in range(steps):
        if t:
            load = load * np.exp(rng.normal(0.0, drift, experts))
        yield [load.copy()]


def trace_loads(path: Path, every: int, steps: int | None) -> Iterator[list[np.ndarray]]:
    """Per re-plan, one load array per layer: the mean tokens per expert over ``every`` trace steps."""
    if every < 1:
        raise ValueError(f"--every must be >= 1, got {every}")
    acc, n, done, shape = None, 0, 0, None
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                tokens = np.asarray(rec["tokens"], dtype=np.float64)
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a routing record ({exc})") from exc
            if tokens.ndim != 2:
                raise ValueError(f"{path}:{lineno}: 'tokens' must be [layers][experts], got shape {tokens.shape}")
            if shape is not None and tokens.shape != shape:
                raise ValueError(f"{path}:{lineno}: shape {tokens.shape} differs from the first line's {shape}")
            shape = tokens.shape
            acc = tokens if acc is None else acc + tokens
            n += 1
            if n == every:
                yield list(acc / n)
                acc, n, done = None, 0, done + 1
                if steps is not None and done >= steps:
                    return
    if n:
        yield list(acc / n)


def simulate(
    series: Iterator[list[np.ndarray]],
    ep: int,
    config: PlannerConfig,
    total: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Run both planners over a load series; returns per-re-plan records and a summary per planner."""
    maps: dict[tuple[str, int], list[int] | None] = {}
    records = []
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=total, desc="re-plans", unit="plan", disable=not show, leave=False)
    for step, layers in enumerate(series):
        for layer, load in enumerate(layers):
            if load.size % ep:
                raise ValueError(f"--experts ({load.size}) must be a multiple of --ep ({ep})")
            spr = load.size // ep
            row = {"step": step, "layer": layer}
            for name in PLANNERS:
                current = maps.get((name, layer))
                if name == "ours":
                    plan = plan_placement(load, current, ep, spr, config)
                else:
                    plan = plan_greedy_packing(load, current, ep, spr, config.bytes_per_expert)
                maps[(name, layer)] = list(plan.logical_to_physical)
                row[name] = {
                    "imbalance_before": plan.imbalance_before,
                    "imbalance_after": plan.imbalance_after,
                    "experts_moved": plan.experts_moved,
                    "bytes_moved": plan.bytes_moved,
                    "plan_time_s": plan.plan_time_s,
                    "strategy": plan.strategy,
                }
            row["lower_bound_imbalance"] = plan.lower_bound / plan.mean_load if plan.mean_load > 0 else 1.0
            records.append(row)
        bar.update(1)
    bar.close()
    if not records:
        raise ValueError("no loads to plan for (empty trace?)")
    summary = {}
    for name in PLANNERS:
        col = [r[name] for r in records]
        summary[name] = {
            "replans": len(col),
            "imbalance_before_mean": float(np.mean([c["imbalance_before"] for c in col])),
            "imbalance_after_mean": float(np.mean([c["imbalance_after"] for c in col])),
            "imbalance_after_max": float(np.max([c["imbalance_after"] for c in col])),
            "experts_moved_mean": float(np.mean([c["experts_moved"] for c in col])),
            "experts_moved_total": int(sum(c["experts_moved"] for c in col)),
            "bytes_moved_total": int(sum(c["bytes_moved"] for c in col)),
            "plan_time_s_mean": float(np.mean([c["plan_time_s"] for c in col])),
            "plan_time_s_max": float(np.max([c["plan_time_s"] for c in col])),
        }
    return {"records": records, "summary": summary}


def _format(summary: dict, header: str) -> str:
    lines = [
        header,
        f"{'planner':8} {'before':>8} {'after':>8} {'after max':>9} {'moved/plan':>10} "
        f"{'GB moved':>9} {'ms mean':>8} {'ms max':>8}",
    ]
    for name, s in summary.items():
        lines.append(
            f"{name:8} {s['imbalance_before_mean']:8.4f} {s['imbalance_after_mean']:8.4f} "
            f"{s['imbalance_after_max']:9.4f} {s['experts_moved_mean']:10.1f} {s['bytes_moved_total'] / 1e9:9.2f} "
            f"{1e3 * s['plan_time_s_mean']:8.1f} {1e3 * s['plan_time_s_max']:8.1f}"
        )
    lines.append("(before/after: max/mean rank load, mean over re-plans; moved/plan: experts per re-plan)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.placement_sim", description=__doc__.split("\n\n")[0])
    ap.add_argument("--loads", required=True, help="zipf | lognormal | hotspot | trace:FILE")
    ap.add_argument("--ep", type=int, required=True, help="expert-parallel ranks")
    ap.add_argument("--experts", type=int, help="logical experts (= slots), a multiple of --ep; from the trace")
    ap.add_argument("--steps", type=int, help="re-plans (synthetic default 8; trace default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write records and summary here")
    ap.add_argument("--every", type=int, default=1, help="trace: re-plan every N steps")
    ap.add_argument("--tolerance", type=float, default=PlannerConfig.tolerance, help="planner tolerance")
    ap.add_argument("--zipf-a", type=float, default=1.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument(
        "--drift", type=float, default=0.2, help="zipf/lognormal: log-normal random walk per re-plan; hotspot: noise"
    )
    ap.add_argument("--hot", type=float, default=20.0, help="hotspot: bump height over a base load of 1")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--bytes-per-expert", type=int, help="overrides --hidden/--ffn")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args(argv)
    if args.ep < 1:
        ap.error(f"--ep must be >= 1, got {args.ep}")
    nbytes = args.bytes_per_expert if args.bytes_per_expert is not None else expert_bytes(args.hidden, args.ffn)
    try:
        config = PlannerConfig(tolerance=args.tolerance, bytes_per_expert=nbytes)
    except ValueError as exc:
        ap.error(str(exc))
    if args.loads.startswith("trace:"):
        path = Path(args.loads[len("trace:") :])
        if not path.is_file():
            ap.error(f"--loads trace file {path} does not exist")
        series, total = trace_loads(path, args.every, args.steps), args.steps
        first = None
    else:
        if args.experts is None:
            ap.error("--experts is required for synthetic loads")
        if args.experts % args.ep:
            ap.error(f"--experts ({args.experts}) must be a multiple of --ep ({args.ep})")
        steps = 8 if args.steps is None else args.steps
        if args.loads not in ("zipf", "lognormal", "hotspot"):
            ap.error(f"--loads must be zipf, lognormal, hotspot or trace:FILE, got {args.loads!r}")
        series = synthetic_loads(
            args.loads,
            args.experts,
            steps,
            args.seed,
            zipf_a=args.zipf_a,
            sigma=args.sigma,
            drift=args.drift,
            hot=args.hot,
        )
        total, first = steps, args.experts
    if first is None and args.experts is not None:
        expected = args.experts

        def checked(it=series):
            for layers in it:
                if layers[0].size != expected:
                    raise SystemExit(f"--experts {expected} but the trace has {layers[0].size} experts per layer")
                yield layers

        series = checked()
    try:
        result = simulate(series, args.ep, config, total=total, progress=args.progress)
    except ValueError as exc:
        raise SystemExit(f"placement_sim: {exc}") from exc
    result["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["bytes_per_expert"] = nbytes
    print(
        _format(result["summary"], f"loads={args.loads} ep={args.ep} re-plans={result['summary']['ours']['replans']}")
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
