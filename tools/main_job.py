"""The main job: the tiny TimeExpert video LLM from synthetic videos to VTG metrics, end to end.

Run (README's first command; about 15 minutes on 2 CPU cores after the install)::

    python -m tools.main_job [--out runs/main_job] [--nproc 4] [--steps 30,600,600] [--seed N] [--fresh]

Steps (each skipped when its output exists, unless ``--fresh``):

1. generate the synthetic VTG sets (real H.264/VP9 videos with known events at random places): a
   training set (``--train-videos``, 1000) and a held-out set from another seed (``--test-videos``,
   128) (``tools/make_synthetic_vtg.py``);
2. train the sentencepiece text tokenizer on the training set's captions and instructions;
3. train the three TimeExpert stages (``configs/timeexpert_stage{1,2,3}.yaml``), each from the
   previous stage's checkpoint, on ``--nproc`` processes (TP, PP and EP = 2 on 4);
3b. ``timeexpert diagnose`` on the three stage checkpoints: are the visual tokens frame-specific?
4. predict on the held-out set for moment retrieval (Charades-STA format), highlight detection and
   moment retrieval (QVHighlights) and dense captioning (YouCook2 format), from stage 3's checkpoint;
5. evaluate with ``timeexpert eval``'s metrics, next to three baselines scored by the same code
   (``megatron_timeexpert/eval/chance.py``): chance, the mean over 5 seeds of random predictions;
   the training prior, the training set's most common window / spans and caption for every query;
   and the best constant answer, the one window (spans) that scores best on the training set (a
   model that learned only where events usually are scores like these); Charades-STA is also split
   by event index (first vs later events of a video) and the distinct top windows are counted;
6. print the metrics and the mean number of activated experts per token type (stage 3's last
   logged training step), and write everything to ``OUT/summary.json`` (``--write-bench``: also
   docs/BENCHMARKS.md and docs/bench/main_job.json, where runs with other ``--seed`` values of the
   same command are kept side by side with their spread).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

TASKS = {
    # task: (predict --task, ground-truth file under annotations/, eval --task)
    "charades": ("charades", "charades_sta.txt", "charades"),
    "qvhighlights": ("qvhighlights", "qvhighlights.jsonl", "qvhighlights"),
    "dvc": ("dvc", "youcook2.json", "dvc"),
}
HEADLINE = {
    "charades": ("R1@0.3", "R1@0.5", "mIoU"),
    "qvhighlights": ("MR-full-mAP", "MR-full-R1@0.5", "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1"),
    "dvc": ("F1", "CIDEr", "METEOR", "SODA_c"),
}
CHANCE_SEEDS = 5


def _recipe_steps(stage: int) -> int:
    """training.train_steps of ``configs/timeexpert_stage{stage}.yaml``."""
    from megatron_timeexpert.config import load_config

    return load_config(f"configs/timeexpert_stage{stage}.yaml").training.train_steps


def _run(cmd: list[str], what: str, log: Path, timeout_s: float) -> None:
    """Run one step; its wall time is kept in ``log``'s folder (timings.json), across invocations.

    A step still running after ``timeout_s`` is stopped with its whole process group (a launcher's
    ranks included: SIGTERM, then SIGKILL 10 s later) and the job ends with an error naming it."""
    t0 = time.perf_counter()
    print(f"main_job: {what} ...", flush=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            raise SystemExit(
                f"main_job: {what} still running after {timeout_s:.0f} s (--step-timeout-s): stopped; see {log}"
            ) from None
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"main_job: {what} failed (exit {rc}); last lines of {log}:\n{tail}")
    took = time.perf_counter() - t0
    timings = log.parent / "timings.json"
    done = json.loads(timings.read_text()) if timings.exists() else {}
    done[what] = took
    timings.write_text(json.dumps(done, indent=1))
    print(f"main_job: {what} done in {took:.0f} s", flush=True)


def _timeexpert(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_timeexpert.cli", *args]


def _k_by_type(metrics_file: Path) -> dict[str, float]:
    rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    last = next((r for r in reversed(rows) if any(k.startswith("moe/router/k_mean/") for k in r)), {})
    prefix = "moe/router/k_mean/"
    # "moe/router/k_mean/<type>" is the mean over layers; per-layer keys end in ".../layerN"
    out = {k[len(prefix) :]: v for k, v in last.items() if k.startswith(prefix)}
    return {t: v for t, v in out.items() if "layer" not in t}


def _chance(
    task: str, gt: Path, train_root: Path, durations: dict[str, float], out: Path, seeds: int = CHANCE_SEEDS
) -> dict[str, float]:
    from megatron_timeexpert.eval import chance
    from megatron_timeexpert.eval import io as eio
    from megatron_timeexpert.eval.cli import evaluate

    # The ground truth (and the training captions) are read once; each seed only draws and scores.
    if task == "dvc":
        videos = eio.read_dense_gt(gt)
        captions = [c for v in eio.read_dense_gt(train_root / "annotations" / TASKS["dvc"][1]) for c in v.captions]
    else:
        queries = (eio.read_moment_gt if task == "charades" else eio.read_qvhighlights_gt)(gt)
    runs = []
    for seed in range(seeds):
        path = out / f"chance_{task}_{seed}.json"
        if task == "dvc":
            eio.write_dense_predictions(path, chance.random_dense_predictions(videos, captions, seed))
        elif task == "charades":
            eio.write_moment_predictions(path, chance.random_moment_predictions(queries, durations, seed))
        else:
            eio.write_qvhighlights_predictions(path, chance.random_moment_predictions(queries, durations, seed))
        runs.append(evaluate(TASKS[task][2], path, gt, captions=_captions()))
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and all(r.get(k) is not None for r in runs)]
    return {k: mean(float(r[k]) for r in runs) for k in keys}


def _prior(task: str, gt: Path, train_root: Path, durations: dict[str, float], out: Path) -> dict[str, float]:
    from megatron_timeexpert.eval import chance
    from megatron_timeexpert.eval import io as eio
    from megatron_timeexpert.eval.cli import evaluate

    path = out / f"prior_{task}.json"
    train_gt = train_root / "annotations" / TASKS[task][1]
    if task == "dvc":
        preds = chance.prior_dense_predictions(eio.read_dense_gt(gt), eio.read_dense_gt(train_gt))
        eio.write_dense_predictions(path, preds)
    else:
        read = eio.read_moment_gt if task == "charades" else eio.read_qvhighlights_gt
        windows = [w for q in read(train_gt) for w in q.windows]
        preds = chance.prior_moment_predictions(read(gt), durations, windows)
        write = eio.write_moment_predictions if task == "charades" else eio.write_qvhighlights_predictions
        write(path, preds)
    metrics = evaluate(TASKS[task][2], path, gt, captions=_captions())
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _constant(
    task: str, gt: Path, train_root: Path, durations: dict[str, float], out: Path
) -> tuple[dict[str, float], Path]:
    """The best constant answer (eval/chance.py): chosen on the TRAINING set, scored on ``gt``; with the
    prediction file it wrote."""
    from megatron_timeexpert.eval import chance
    from megatron_timeexpert.eval import io as eio
    from megatron_timeexpert.eval.cli import evaluate

    path = out / f"constant_{task}.json"
    train_gt = train_root / "annotations" / TASKS[task][1]
    if task == "dvc":
        train = eio.read_dense_gt(train_gt)
        preds = chance.constant_dense_predictions(
            eio.read_dense_gt(gt), chance.best_constant_spans(train), chance.most_common_caption(train)
        )
        eio.write_dense_predictions(path, preds)
    else:
        read = eio.read_moment_gt if task == "charades" else eio.read_qvhighlights_gt
        window = chance.best_constant_window(read(train_gt), _durations(train_root))
        preds = chance.constant_moment_predictions(read(gt), durations, window)
        (eio.write_moment_predictions if task == "charades" else eio.write_qvhighlights_predictions)(path, preds)
    metrics = evaluate(TASKS[task][2], path, gt, captions=_captions())
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, path


def _by_event(gt: Path, pred: Path) -> dict[str, dict[str, float]]:
    """Charades-STA R1/mIoU for the videos' first events and for their later ones (eval/moment.py)."""
    from megatron_timeexpert.eval import io as eio
    from megatron_timeexpert.eval.moment import charades_by_event_index

    return charades_by_event_index(eio.read_moment_gt(gt), eio.read_moment_predictions(pred))


def _distinct(pred: Path) -> int:
    from megatron_timeexpert.eval import io as eio
    from megatron_timeexpert.eval.moment import distinct_top_windows

    return distinct_top_windows(eio.read_moment_predictions(pred))


def _captions() -> bool:
    """CIDEr/METEOR/SODA_c need Java (METEOR, PTB tokenizer); without it dense captioning reports P/R/F1."""
    from megatron_timeexpert.eval.dvc import java_available

    return java_available()


def _durations(root: Path) -> dict[str, float]:
    doc = json.loads((root / "annotations" / "activitynet_captions.json").read_text())
    return {vid: float(v["duration"]) for vid, v in doc.items()}


BASELINES = (("model", "model"), ("chance", "chance"), ("prior", "training prior"), ("constant", "best constant"))


def results_table(summary: dict) -> list[str]:
    """Markdown rows: every headline metric for the model and the three baselines, the Charades-STA
    split by event index (first vs later events of a video) and the distinct top windows."""
    nan = float("nan")
    res = summary["metrics"]
    rows = ["| task | metric | " + " | ".join(n for _, n in BASELINES) + " |", "| --- | --- |" + " ---: |" * 4]
    for task, names in HEADLINE.items():
        for n in names:
            cells = [f"{res[task][k].get(n, nan):.1f}" for k, _ in BASELINES]
            rows.append(f"| {task} | {n} | " + " | ".join(cells) + " |")
    split = res["charades"].get("by_event", {})
    for part in ("first", "later"):
        for n in ("R1@0.5", "mIoU"):
            cells = [f"{split[k][part][n]:.1f}" if k in split else "" for k, _ in BASELINES]
            count = int(split["model"][part]["num_queries"]) if "model" in split else 0
            rows.append(f"| charades, {part} events ({count} queries) | {n} | " + " | ".join(cells) + " |")
    for task in ("charades", "qvhighlights"):
        d = res[task].get("distinct_windows", {})
        n_q = int(res[task]["model"].get("num_queries", 0) or 0) or "?"
        cells = [f"{d[k]}/{n_q}" if k in d else "" for k, _ in BASELINES]
        rows.append(f"| {task} | distinct top windows | " + " | ".join(cells) + " |")
    return rows


RUN_COLUMNS = (
    # (column, task, metric); "later" reads the Charades split by event index
    ("Charades R1@0.5", "charades", "R1@0.5"),
    ("R1@0.7", "charades", "R1@0.7"),
    ("mIoU", "charades", "mIoU"),
    ("later events R1@0.5", "later", "R1@0.5"),
    ("QVH MR-mAP", "qvhighlights", "MR-full-mAP"),
    ("QVH HIT@1", "qvhighlights", "HL-min-VeryGood-Hit1"),
    ("DVC F1", "dvc", "F1"),
)


def _run_value(summary: dict, task: str, metric: str) -> float:
    res = summary["metrics"]
    if task == "later":
        return res["charades"]["by_event"]["model"]["later"][metric]
    return res[task]["model"][metric]


def runs_table(runs: dict[str, dict]) -> list[str]:
    """Markdown rows: the headline numbers of each recorded run (one per seed) and their spread
    (max - min), so that two runs of the same command can be compared."""
    head = ["seed", *(c for c, _, _ in RUN_COLUMNS), "distinct windows", "wall (min)"]
    rows = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for seed, summ in runs.items():
        cells = [f"{_run_value(summ, t, m):.1f}" for _, t, m in RUN_COLUMNS]
        n_q = summ["charades_queries"]
        wall = sum(summ["step_seconds"].values()) / 60
        rows.append(
            f"| {seed} | " + " | ".join(cells) + f" | {summ['charades_distinct_top_windows']}/{n_q} | {wall:.1f} |"
        )
    if len(runs) > 1:
        spread = [
            max(v) - min(v) for v in zip(*([_run_value(x, t, m) for _, t, m in RUN_COLUMNS] for x in runs.values()))
        ]
        rows.append("| spread (max - min) | " + " | ".join(f"{v:.1f}" for v in spread) + " | | |")
    return rows


def _same_command(a: dict, b: dict) -> bool:
    """Two summaries of one command: same steps, videos, processes and overrides, seeds aside."""

    def unseeded(summary: dict) -> list[str]:
        return [o for o in summary.get("overrides", []) if not o.startswith(("training.seed=", "data.seed="))]

    keys = ("steps", "train_videos", "test_videos", "nproc")
    return all(a.get(k) == b.get(k) for k in keys) and unseeded(a) == unseeded(b)


def _write_bench(summary: dict, args) -> None:
    """docs/BENCHMARKS.md's main-job section and docs/bench/main_job.json. Runs of the same command
    with other ``--seed`` values already recorded there are kept (and tabulated with their spread);
    a run of another command replaces them."""
    from bench.report import machine_line, write_section
    from tools.diagnose import format_rows

    store = Path("docs/bench/main_job.json")
    old = json.loads(store.read_text()) if store.exists() else {}
    runs = {k: v for k, v in old.get("runs", {}).items() if _same_command(v, summary)}
    runs[str(args.seed if args.seed is not None else "recipe")] = summary
    k = ", ".join(f"{t} {v:.2f}" for t, v in sorted(summary["k_by_type"].items()))
    seed = f" --seed {args.seed}" if args.seed is not None else ""
    body = (
        "## Main job: held-out VTG quality of the tiny TimeExpert\n\n"
        f"Command: `python -m tools.main_job --steps {args.steps} --train-videos {args.train_videos} "
        f"--test-videos {args.test_videos}{seed} --write-bench` ({args.nproc} processes). {machine_line()}. "
        f"Wall time (after the install): {sum(summary['step_seconds'].values()) / 60:.1f} min of data, tokenizer, "
        f"training, diagnosis and prediction steps, {summary['score_s'] / 60:.1f} min of scoring.\n\n"
        "Synthetic videos (held-out set from another generator seed), metrics in percent. Chance: mean of "
        f"{args.chance_seeds} seeds of random windows/scores/captions; training prior: the training set's most "
        "common window (spans and caption) for every query; best constant: the one window (dense captioning: the "
        "spans) that scores best on the TRAINING set, for every query (`megatron_timeexpert/eval/chance.py`).\n\n"
        + "\n".join(results_table(summary))
        + f"\n\nMean activated experts per token (stage 3, last logged step): {k}.\n\n"
        "Visual tokens after each stage (`timeexpert diagnose` on the held-out videos; docs/MODEL.md):\n\n```\n"
        + format_rows(summary["diagnose"])
        + "\n```\n\n"
        "Runs of this command recorded so far (`--seed` sets training.seed and data.seed: initialisation and "
        "sample order; the videos are the same):\n\n" + "\n".join(runs_table(runs)) + "\n"
    )
    write_section("main_job", body)
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps({"runs": runs}, indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.main_job", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/main_job"))
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--steps", help="training steps of stages 1, 2, 3 (default: the recipes' training.train_steps)")
    ap.add_argument("--train-videos", type=int, default=1000)
    ap.add_argument("--test-videos", type=int, default=128)
    ap.add_argument(
        "--seed",
        type=int,
        help="training.seed and data.seed of every stage (initialisation and sample order; default: the recipes')",
    )
    ap.add_argument("--fresh", action="store_true", help="redo every step")
    ap.add_argument(
        "--step-timeout-s", type=float, default=3600.0, help="longest any one step (a stage, a prediction) may run"
    )
    ap.add_argument("--chance-seeds", type=int, default=CHANCE_SEEDS, help="seeds of random predictions averaged")
    ap.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override for every stage and predict"
    )
    ap.add_argument("--data-from", type=Path, help="reuse the videos and tokenizer of another --out folder")
    ap.add_argument(
        "--write-bench", action="store_true", help="write the numbers to docs/BENCHMARKS.md, docs/bench/main_job.json"
    )
    args = ap.parse_args(argv)
    from megatron_timeexpert.train.checkpoint import latest_checkpoint

    if args.seed is not None:
        args.set = [f"training.seed={args.seed}", f"data.seed={args.seed}", *args.set]

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = out / "main_job.log"
    if args.steps is None:
        args.steps = ",".join(str(_recipe_steps(k)) for k in (1, 2, 3))
    steps = [int(s) for s in args.steps.split(",")]
    if len(steps) != 3:
        ap.error("--steps needs three numbers (stages 1, 2, 3)")
    t_start = time.perf_counter()
    data_dir = args.data_from or out
    train_root, test_root = data_dir / "vtg_train", data_dir / "vtg_test"

    # 1. data
    for root, n, seed in ((train_root, args.train_videos, 1), (test_root, args.test_videos, 2)):
        if args.data_from is None and (args.fresh or not (root / "events.json").exists()):
            gen = [sys.executable, "-m", "tools.make_synthetic_vtg", "--out", str(root), "--num-videos", str(n)]
            gen += ["--seed", str(seed), "--width", "64", "--height", "64", "--workers", "2"]
            _run(gen, f"videos {root}", log, args.step_timeout_s)
    # 2. tokenizer
    tok = data_dir / "tok"
    if args.data_from is None and (args.fresh or not tok.with_suffix(".model").exists()):
        ann = train_root / "annotations"
        corpus = [
            *("tokenizer", "corpus", "--annotations"),
            f"charades_sta={ann / 'charades_sta.txt'}",
            f"qvhighlights={ann / 'qvhighlights.jsonl'}",
            f"activitynet={ann / 'activitynet_captions.json'}",
            *("--video-root", str(train_root / "videos"), "--out", str(out / "corpus.txt")),
        ]
        _run(_timeexpert(*corpus), "tokenizer corpus", log, args.step_timeout_s)
        train_tok = ("tokenizer", "train", "--corpus", str(out / "corpus.txt"), "--vocab-size", "512")
        _run(_timeexpert(*train_tok, "--out", str(tok)), "tokenizer", log, args.step_timeout_s)
    # 3. three stages
    previous = None
    for stage, n_steps in zip((1, 2, 3), steps):
        save = out / f"stage{stage}" / "checkpoints"
        if args.fresh or latest_checkpoint(save) is None:
            over = [
                f"data.root={train_root}",
                f"data.tokenizer={tok}.model",
                f"training.save_dir={save}",
                f"training.train_steps={n_steps}",
                f"logging.run_dir={out / f'stage{stage}'}",
                "logging.progress_bar=false",
                "logging.wandb=false",
                "logging.tensorboard=false",
            ]
            if previous is not None:
                over += [f"training.load_dir={previous}", "training.finetune=true"]
            over += args.set
            cfg = f"configs/timeexpert_stage{stage}.yaml"
            _run(
                _timeexpert("pretrain", "--config", cfg, "--nproc", str(args.nproc), *over),
                f"stage {stage}",
                log,
                args.step_timeout_s,
            )
        previous = latest_checkpoint(save)
    # 3b. are the visual tokens frame-specific after every stage? (tools/diagnose.py, held-out videos)
    diag = out / "diagnose.json"
    if args.fresh or not diag.exists():
        stages = [str(out / f"stage{k}" / "checkpoints") for k in (1, 2, 3)]
        cmd = _timeexpert(
            "diagnose",
            *("--config", "configs/timeexpert_stage3.yaml", "--data", str(test_root), "--json", str(diag)),
            *(a for c in stages for a in ("--checkpoint", c)),
            f"data.tokenizer={tok}.model",
            *args.set,
        )
        _run(cmd, "diagnose", log, args.step_timeout_s)
    diagnosis = json.loads(diag.read_text())
    # 4-5. predict and evaluate on the held-out set
    from megatron_timeexpert.eval.cli import evaluate

    if not _captions():
        print("main_job: no `java` on PATH: dense captioning is scored without CIDEr, METEOR and SODA_c", flush=True)

    durations = _durations(test_root)
    results: dict[str, dict] = {}
    score_s = 0.0
    for task, (pred_task, gt_name, eval_task) in TASKS.items():
        pred = out / f"pred_{task}.json"
        if args.fresh or not pred.exists():
            cmd = _timeexpert(
                "predict",
                *("--config", "configs/timeexpert_stage3.yaml", "--checkpoint", str(previous)),
                *("--data", str(test_root), "--task", pred_task, "--out", str(pred), "--no-progress"),
                *("--batch-size", "32"),
                f"data.tokenizer={tok}.model",
                *args.set,
            )
            _run(cmd, f"predict {task}", log, args.step_timeout_s)
        gt = test_root / "annotations" / gt_name
        t_score = time.perf_counter()
        constant, constant_pred = _constant(task, gt, train_root, durations, out)
        results[task] = {
            "model": evaluate(eval_task, pred, gt, captions=_captions()),
            "chance": _chance(task, gt, train_root, durations, out, args.chance_seeds),
            "prior": _prior(task, gt, train_root, durations, out),
            "constant": constant,
        }
        if task != "dvc":
            preds = {"model": pred, "prior": out / f"prior_{task}.json", "constant": constant_pred}
            results[task]["distinct_windows"] = {k: _distinct(p) for k, p in preds.items()}
        if task == "charades":
            results[task]["by_event"] = {k: _by_event(gt, p) for k, p in preds.items()}
        score_s += time.perf_counter() - t_score
    # 6. report
    k_types = _k_by_type(out / "stage3" / "metrics.jsonl")
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    summary = {
        "step_seconds": timings,
        "charades_distinct_top_windows": results["charades"]["distinct_windows"]["model"],
        "charades_queries": int(results["charades"]["model"]["num_queries"]),
        "metrics": results,
        "diagnose": diagnosis,
        "k_by_type": k_types,
        "overrides": args.set,
        "seed": args.seed,
        "nproc": args.nproc,
        "train_videos": args.train_videos,
        "test_videos": args.test_videos,
        "steps": steps,
        "score_s": score_s,
        "wall_s": time.perf_counter() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nheld-out VTG metrics (synthetic, {args.test_videos} test videos, percent)")
    print("\n".join(results_table(summary)))
    print("mean activated experts per token (stage 3, last logged step): " + ", ".join(
        f"{t} {v:.2f}" for t, v in sorted(k_types.items())
    ))  # fmt: skip
    from tools.diagnose import format_rows

    print("visual tokens after each stage (timeexpert diagnose, held-out videos):\n" + format_rows(diagnosis))
    print(f"main_job: finished in {summary['wall_s'] / 60:.1f} min; {out / 'summary.json'}")
    if args.write_bench:
        _write_bench(summary, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
