"""``timeexpert eval``: score predictions against a public ground-truth file.

    timeexpert eval --task charades --pred preds.jsonl --gt charades_sta_test.txt [--out metrics.json]
    timeexpert eval --task qvhighlights --pred hl_val_submission.jsonl --gt highlight_val_release.jsonl
    timeexpert eval --task dvc --pred dvc.json --gt youcookii_annotations_trainval.json --subset validation

Prints one ``name value`` line per metric (percent; counts as integers) and, with ``--out``, writes
``{"task", "pred", "gt", "metrics"}`` as JSON. A ground-truth item without a prediction counts as
an empty prediction (scores 0) and the count is reported as ``num_missing_predictions``.
Formats and metric definitions: docs/EVAL.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_timeexpert.eval import dvc, io, moment, qvhighlights

TASKS = ("charades", "qvhighlights", "dvc")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="timeexpert eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", required=True, choices=TASKS, help="which benchmark's metrics")
    p.add_argument("--pred", required=True, type=Path, help="prediction file")
    p.add_argument("--gt", required=True, type=Path, help="ground-truth annotation file (public format)")
    p.add_argument("--out", type=Path, default=None, help="write the metrics here as JSON")
    p.add_argument("--subset", default=None, help="dvc, YouCook2 only: evaluate the videos of this subset")
    p.add_argument(
        "--no-captions", action="store_true", help="dvc: localisation only (skip CIDEr, METEOR, SODA_c; no Java)"
    )
    return p


def evaluate(task: str, pred: Path, gt: Path, subset: str | None = None, captions: bool = True) -> dict:
    """The metrics of ``pred`` against ``gt`` for ``task`` (what the command prints)."""
    if task == "charades":
        return moment.charades_metrics(io.read_moment_gt(gt), io.read_moment_predictions(pred))
    if task == "qvhighlights":
        return qvhighlights.qvhighlights_metrics(io.read_qvhighlights_gt(gt), io.read_moment_predictions(pred))
    if task == "dvc":
        gts, preds = io.read_dense_gt(gt, subset), io.read_dense_predictions(pred)
        if not captions:
            return dvc.dvc_metrics(gts, preds)
        if not dvc.java_available():
            raise RuntimeError("dvc caption metrics need Java (no `java` on PATH); install it or pass --no-captions")
        with dvc.CocoScorers() as scorers:
            return dvc.dvc_metrics(gts, preds, scorers)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def _fmt(name: str, value: float | None) -> str:
    if value is None:
        return f"{name} n/a"
    if name.startswith("num_"):
        return f"{name} {int(value)}"
    return f"{name} {value:.2f}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        metrics = evaluate(args.task, args.pred, args.gt, args.subset, not args.no_captions)
    except (io.EvalInputError, RuntimeError) as exc:
        print(f"timeexpert eval: error: {exc}", file=sys.stderr)
        return 2
    for name, value in metrics.items():
        print(_fmt(name, value))
    if args.out is not None:
        doc = {"task": args.task, "pred": str(args.pred), "gt": str(args.gt), "metrics": metrics}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
