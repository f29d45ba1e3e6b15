"""README's main job end to end at a tiny size: data, tokenizer, the three stages (on one process),
prediction of the three tasks, scoring next to chance and the training prior.

The real budget (60/160/240 steps, 48 videos) runs in ``python -m tools.main_job``; this run keeps the
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
    cmd += ["--train-videos", "6", "--test-videos", "3", "--nproc", "1", "--chance-seeds", "1"]
    # One process (the recipes' TP=2 PP=2 EP=2 runs are tested in test_video_llm / test_predict): this
    # test is about the steps between the commands, and 4-process start-ups would triple its time.
    cmd += ["--set=parallel.tp=1", "--set=parallel.pp=1", "--set=parallel.ep=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out VTG metrics" in proc.stdout and "mean activated experts per token" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == [5, 5, 5]
    for stage in (2, 3):
        rank0 = (out / f"stage{stage}" / "logs" / "rank000.log").read_text()
        previous = out / f"stage{stage - 1}" / "checkpoints" / "iter_0000005"
        assert f"loaded checkpoint {previous} (step 5)" in rank0, f"stage {stage} did not start from stage {stage - 1}"
    for task in ("charades", "qvhighlights", "dvc"):
        for who in ("model", "chance", "prior"):
            assert summary["metrics"][task][who], f"{task}: no {who} metrics"
    assert set(summary["k_by_type"]) == {"visual", "text", "time", "score"}

    gt_lines = (out / "vtg_test" / "annotations" / "charades_sta.txt").read_text().splitlines()
    pred_lines = (out / "pred_charades.json").read_text().splitlines()
    assert len(pred_lines) == len([g for g in gt_lines if g.strip()]), "a held-out query was dropped"
    assert summary["charades_queries"] == len(pred_lines)


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
