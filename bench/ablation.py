"""Router ablation on the main job: TimeExpert's adaptive-k router against top-k at k = 2 and k = 6
and against TimeExpert with alpha = 0 (no task activation rates), the same budget for each, over seeds.

Run (4 variants x 3 seeds of the main job; ``--nproc 1`` runs each on one process, the same model and
steps as the 4-process TP/PP/EP layout, about half the time)::

    python -m bench.ablation [--out runs/ablation] [--seeds 1,2,3] [--nproc 1] [--steps S1,S2,S3]
        [--data-from runs/main_job]

Every run is ``tools/main_job.py`` with the same videos and tokenizer (``--data-from``'s or the first
run's), stage recipes and steps; a seed sets ``training.seed`` (weights, dropout) and ``data.seed``
(sample order), and the variants change only the router settings (the top-k variants start with all 8
experts active, since k = 6 needs 6). Quality is the held-out VTG metrics; cost is the mean number of
activated experts per token by token type (stage 3's last logged training step). Each cell is mean +-
standard deviation over the seeds. The TimeExpert paper claims adaptive-k matches k = 6 with fewer
activated experts; the table and its closing lines say what this tiny synthetic setting gives, whatever
it is. Writes the "Router ablation" section of docs/BENCHMARKS.md and docs/bench/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.report import machine_line, write_section

VARIANTS = {
    "timeexpert": [],
    "timeexpert_alpha0": ["moe.alpha=0.0"],
    "topk_k2": ["moe.router=topk", "moe.topk=2", "moe.num_initial_experts=8"],
    "topk_k6": ["moe.router=topk", "moe.topk=6", "moe.num_initial_experts=8"],
}
COLUMNS = [
    ("charades", "R1@0.5"),
    ("charades", "mIoU"),
    ("qvhighlights", "MR-full-mAP"),
    ("qvhighlights", "HL-min-VeryGood-mAP"),
    ("dvc", "F1"),
    ("dvc", "SODA_c"),
]
ONE_PROCESS = ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], digits: int = 1) -> str:
    if not values:
        return "n/a"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def tabulate(runs: dict[str, dict[int, dict]]) -> tuple[list[str], dict]:
    """Markdown rows (one per variant, plus chance and the best constant answer) and the aggregated
    numbers: ``runs[variant][seed]`` is that run's summary.json."""
    types = sorted({t for seeds in runs.values() for s in seeds.values() for t in s["k_by_type"]})
    head = ["router", "seeds"] + [f"{t} {m}" for t, m in COLUMNS] + ["distinct windows"]
    head += [f"k/{t}" for t in types] + ["k mean"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    agg: dict[str, dict] = {}
    for name, seeds in runs.items():
        summaries = list(seeds.values())
        metric = {
            f"{t}/{m}": [s["metrics"][t]["model"][m] for s in summaries if s["metrics"][t]["model"].get(m) is not None]
            for t, m in COLUMNS
        }
        k = {t: [s["k_by_type"][t] for s in summaries if t in s["k_by_type"]] for t in types}
        k_all = [statistics.fmean(s["k_by_type"].values()) for s in summaries]
        distinct = [s["charades_distinct_top_windows"] / s["charades_queries"] for s in summaries]
        agg[name] = {"metrics": {key: mean_std(v) for key, v in metric.items() if v},
                     "k_by_type": {t: mean_std(v) for t, v in k.items() if v}, "k_mean": mean_std(k_all),
                     "distinct_share": mean_std(distinct), "seeds": sorted(seeds)}  # fmt: skip
        cells = [name, ",".join(str(x) for x in sorted(seeds))]
        cells += [_cell(metric[f"{t}/{m}"]) for t, m in COLUMNS]
        cells.append(_cell([100 * d for d in distinct], 0) + "%")
        cells += [_cell(k[t], 2) for t in types] + [_cell(k_all, 2)]
        rows.append("| " + " | ".join(cells) + " |")
    first = next(iter(next(iter(runs.values())).values()))["metrics"]
    for who, label in (("chance", "chance"), ("constant", "best constant")):
        cells = [label, ""] + [f"{first[t].get(who, {}).get(m, float('nan')):.1f}" for t, m in COLUMNS]
        rows.append("| " + " | ".join(cells + [""] * (len(types) + 2)) + " |")
    return rows, agg


def verdict(agg: dict) -> list[str]:
    """What the table says about adaptive-k against top-6 (quality within one standard deviation?)."""
    if "timeexpert" not in agg or "topk_k6" not in agg:
        return []
    te, k6 = agg["timeexpert"], agg["topk_k6"]
    lines = []
    for key, (m, s) in te["metrics"].items():
        m6, s6 = k6["metrics"].get(key, (float("nan"), 0.0))
        tol = max(s, s6)
        word = "matches" if abs(m - m6) <= tol else ("beats" if m > m6 else "trails")
        lines.append(
            f"- {key}: TimeExpert {m:.1f} ± {s:.1f} vs top-6 {m6:.1f} ± {s6:.1f}: {word} (within one std: {tol:.1f})"
        )
    ratio = te["k_mean"][0] / k6["k_mean"][0] if k6["k_mean"][0] else float("nan")
    lines.append(
        f"- activated experts per token (mean over token types): TimeExpert {te['k_mean'][0]:.2f} vs top-6 "
        f"{k6['k_mean'][0]:.2f}, ratio {ratio:.2f} (aim: <= 0.75 at equal quality)"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    from tools.main_job import main as main_job

    ap = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/ablation"))
    ap.add_argument("--steps", default=None, help="stage steps S1,S2,S3 (default: the main job's)")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated training/data seeds")
    ap.add_argument("--nproc", type=int, default=4, help="processes per run (1: TP = PP = EP = 1)")
    ap.add_argument(
        "--data-from", type=Path, help="reuse the videos and tokenizer of a main-job folder (runs/main_job)"
    )
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--no-write", action="store_true", help="do not write docs/BENCHMARKS.md")
    ap.add_argument(
        "--report-only", action="store_true", help="only tabulate the runs' existing OUT/<variant>_s<seed>/summary.json"
    )
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    first = args.data_from
    runs: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for name in names:
            out = args.out / f"{name}_s{seed}"
            if not args.report_only:
                cmd = ["--out", str(out), "--nproc", str(args.nproc), "--chance-seeds", "1"]
                cmd += ["--steps", args.steps] if args.steps else []
                cmd += ["--seed", str(seed)] + [f"--set={s}" for s in VARIANTS[name]]
                cmd += [f"--set={s}" for s in ONE_PROCESS] if args.nproc == 1 else []
                if first is not None:
                    cmd += ["--data-from", str(first)]
                print(f"ablation: {name}, seed {seed}", flush=True)
                main_job(cmd)
            first = first or out
            runs.setdefault(name, {})[seed] = json.loads((out / "summary.json").read_text())
    rows, agg = tabulate(runs)
    lines = verdict(agg)
    print("\n".join(rows + [""] + lines))
    if not args.no_write:
        steps = next(iter(next(iter(runs.values())).values()))["steps"]
        step_list = ",".join(map(str, steps))
        body = (
            "## Router ablation (TimeExpert vs top-k on the main job)\n\n"
            f"Command: `python -m bench.ablation --seeds {args.seeds} --nproc {args.nproc} --steps {step_list}"
            + (f" --data-from {args.data_from}" if args.data_from else "")
            + (f" --variants {args.variants}" if names != list(VARIANTS) else "")
            + f"`. {machine_line()}.\n"
            "Held-out metrics on the synthetic VTG test set (percent) and the mean number of activated experts per\n"
            "token by type (stage 3, last logged step), each mean ± standard deviation over the seeds (a seed sets\n"
            "the initial weights and the sample order; videos, steps and recipes are the same for every run).\n"
            '"distinct windows": the share of held-out Charades-STA queries whose top window differs from every\n'
            "other query's (a model that ignores the query predicts one). The top-k variants start with all 8\n"
            "experts active (k = 6 needs 6), TimeExpert with 4 of 8 and its add/prune loop.\n\n"
            + "\n".join(rows)
            + "\n\nTimeExpert (adaptive k) against top-6:\n\n"
            + "\n".join(lines)
            + "\n"
        )
        write_section("ablation", body)
        Path("docs/bench").mkdir(parents=True, exist_ok=True)
        Path("docs/bench/ablation.json").write_text(json.dumps({"runs": runs, "aggregate": agg}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
