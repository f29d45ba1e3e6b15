"""README's main job end to end at a tiny size: data, tokenizer, the three stages (on one process),
prediction of the three tasks, scoring next to chance and the training prior.

The real budget (30/600/600 steps, 1000 videos) runs in ``python -m tools.main_job``; this run keeps the
glue between the steps from rotting: each stage loads the previous stage's checkpoint, every held-out
query gets a prediction line, and the summary carries every metric and the experts per token type.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_main_job_runs_every_step_and_scores_every_query(tmp_path):
    out = tmp_path / "mj"
    cmd = [sys.executable, "-m", "tools.main_job", "--out", str(out), "--steps", "5,5,5"]
    cmd += ["--train-videos", "6", "--test-videos", "3", "--nproc", "1", "--chance-seeds", "1", "--seed", "7"]
    # One process (the recipes' TP=2 PP=2 EP=2 runs are tested in test_video_llm / test_predict): this
    # test is about the steps between the commands, and 4-process start-ups would triple its time.
    cmd += ["--set=parallel.tp=1", "--set=parallel.pp=1", "--set=parallel.ep=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out VTG metrics" in proc.stdout and "mean activated experts per token" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [5, 5, 5]
    # --seed reaches every stage's command line (training.seed: init, data.seed: sample order)
    stages = [c for c in (out / "main_job.log").read_text().splitlines() if c.startswith("$ ") and " pretrain " in c]
    assert len(stages) == 3 and all("training.seed=7 data.seed=7" in c for c in stages), stages
    for stage in (2, 3):
        rank0 = (out / f"stage{stage}" / "logs" / "rank000.log").read_text()
        previous = out / f"stage{stage - 1}" / "checkpoints" / "iter_0000005"
        assert f"loaded checkpoint {previous} (step 5)" in rank0, f"stage {stage} did not start from stage {stage - 1}"
    for task in ("charades", "qvhighlights", "dvc"):
        for who in ("model", "chance", "prior", "constant"):
            assert summary["metrics"][task][who], f"{task}: no {who} metrics"
    split = summary["metrics"]["charades"]["by_event"]
    assert {k: set(v) for k, v in split.items()} == {k: {"first", "later"} for k in ("model", "prior", "constant")}
    assert summary["metrics"]["charades"]["distinct_windows"]["constant"] == 1
    # the recipes keep the visual tokens frame-specific after every stage (tools/diagnose.py)
    diag = summary["diagnose"]
    assert [Path(r["checkpoint"]).parent.parent.name for r in diag] == ["stage1", "stage2", "stage3"]
    for r in diag:
        assert r["decoder"]["pairs"] > 0 and r["decoder"]["cos_event_empty"] < 0.9, r
    assert "cos(event, empty)" in proc.stdout and "best constant" in proc.stdout
    assert set(summary["k_by_type"]) == {"visual", "text", "time", "score"}

    gt_lines = (out / "vtg_test" / "annotations" / "charades_sta.txt").read_text().splitlines()
    pred_lines = (out / "pred_charades.json").read_text().splitlines()
    assert len(pred_lines) == len([g for g in gt_lines if g.strip()]), "a held-out query was dropped"
    assert summary["charades_queries"] == len(pred_lines)


def _summary(seed: int, r1: float, later: float, wall_s: float) -> dict:
    """A main-job summary with only the fields the runs table reads."""
    model = {"R1@0.5": r1, "R1@0.7": r1 / 2, "mIoU": r1 * 0.8}
    return {
        "metrics": {
            "charades": {"model": model, "by_event": {"model": {"later": {"R1@0.5": later}}}},
            "qvhighlights": {"model": {"MR-full-mAP": 40.0, "HL-min-VeryGood-Hit1": 20.0}},
            "dvc": {"model": {"F1": 25.0}},
        },
        "charades_queries": 240,
        "charades_distinct_top_windows": 80,
        "step_seconds": {"stage 2": wall_s},
        "steps": [30, 800, 400],
        "train_videos": 1000,
        "test_videos": 128,
        "nproc": 4,
        "overrides": [f"training.seed={seed}", f"data.seed={seed}"],
    }


def test_runs_table_reports_each_seed_and_the_spread():
    from tools.main_job import _same_command, runs_table

    rows = runs_table({"1": _summary(1, 60.0, 40.0, 600), "2": _summary(2, 55.5, 31.0, 660)})
    assert rows[2].startswith("| 1 | 60.0 | 30.0 | 48.0 | 40.0 |") and rows[2].endswith("| 80/240 | 10.0 |")
    # spread = max - min of each column: 4.5 (R1@0.5), 2.25 -> 2.2 (R1@0.7), 3.6 (mIoU), 9.0 (later)
    assert rows[-1].startswith("| spread (max - min) | 4.5 | 2.2 | 3.6 | 9.0 | 0.0 | 0.0 | 0.0 |")
    # runs that differ only in their seed are the same command; other steps or overrides are not
    assert _same_command(_summary(1, 0, 0, 0), _summary(2, 0, 0, 0))
    assert not _same_command(_summary(1, 0, 0, 0), {**_summary(1, 0, 0, 0), "steps": [30, 900, 400]})
    other = {**_summary(1, 0, 0, 0), "overrides": ["training.seed=1", "moe.router=topk"]}
    assert not _same_command(_summary(1, 0, 0, 0), other)


def test_a_stuck_step_is_stopped_with_its_process_group(tmp_path):
    """No unbounded wait: a step past ``--step-timeout-s`` ends the job with an error naming it, and
    the processes it started (a launcher's ranks) are stopped with it."""
    import os
    import time

    from tools.main_job import _run

    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    t0 = time.monotonic()
    with pytest.raises(SystemExit, match=r"stuck step still running after 3 s"):
        _run([sys.executable, "-c", script], "stuck step", tmp_path / "main_job.log", timeout_s=3)
    assert time.monotonic() - t0 < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    stat = Path(f"/proc/{grandchild}/stat")
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
            if stat.read_text().split(")")[-1].split()[0] == "Z":  # dead, not yet reaped by its new parent
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child {grandchild} outlived the step")
