"""``timeexpert diagnose`` (tools/diagnose.py): the frame-specificity measures against hand computations,
and the command on real checkpoints and videos: the stage recipes' visual tokens pass its 0.9 cosine
bound, the same model without per-video standardisation and time embedding (what the recipes did
before) fails it.

The recipes are also held to the bound after each of their three stages by tests/test_main_job.py
(the main job runs ``diagnose`` on every stage's checkpoint)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.diagnose import token_stats

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(600)


def test_token_stats_by_hand():
    # one video, 3 frames, 1 slot, 2 channels; frame 1 holds the event
    x = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[1.0, 0.0]]])
    s = token_stats([(x, [False, True, False])], text_norm=0.5)
    norms = [1.0, math.sqrt(2), 1.0]
    assert s.norm == pytest.approx(sum(norms) / 3) and s.norm_vs_text == pytest.approx(sum(norms) / 3 / 0.5)
    centred = x - x.mean(0)  # channel 1: -1/3, 2/3, -1/3
    assert s.frame_share == pytest.approx(float(centred.norm() / x.norm()))
    assert s.cos_event_empty == pytest.approx(1 / math.sqrt(2)) and s.pairs == 2  # (1,1)·(1,0) / sqrt(2)
    # a video without an empty frame adds no pair; identical frames have no frame-dependent part
    same = torch.ones(4, 2, 3)
    s2 = token_stats([(same, [True] * 4)], text_norm=1.0)
    assert s2.frame_share == 0.0 and s2.pairs == 0 and math.isnan(s2.cos_event_empty)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("diag")
    root = out / "vtg"
    subprocess.run(
        [sys.executable, "-m", "tools.make_synthetic_vtg", "--out", str(root), "--num-videos", "6", "--seed", "4",
         "--width", "64", "--height", "64"],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    ann = root / "annotations"
    te = [sys.executable, "-m", "megatron_timeexpert.cli", "tokenizer"]
    subprocess.run(
        [*te, "corpus", "--annotations", f"charades_sta={ann / 'charades_sta.txt'}",
         f"activitynet={ann / 'activitynet_captions.json'}", "--video-root", str(root / "videos"),
         "--out", str(out / "corpus.txt")],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    subprocess.run(
        [*te, "train", "--corpus", str(out / "corpus.txt"), "--vocab-size", "384", "--out", str(out / "tok")],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return root, out / "tok.model"


ONE_PROCESS = ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1"]


def _checkpoint(data, where: Path, *overrides: str) -> Path:
    """The stage-1 recipe's model at initialisation (train_steps=0 saves it), on one process."""
    root, tok = data
    cmd = [sys.executable, "-m", "megatron_timeexpert.cli", "pretrain", "--config", "configs/timeexpert_stage1.yaml"]
    cmd += [*ONE_PROCESS, f"data.root={root}", f"data.tokenizer={tok}", "training.train_steps=0"]
    cmd += [f"training.save_dir={where}", f"logging.run_dir={where.parent / 'run'}", "logging.wandb=false"]
    cmd += ["logging.tensorboard=false", "logging.progress_bar=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return where


def _diagnose(data, ckpt: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    root, tok = data
    cmd = [sys.executable, "-m", "megatron_timeexpert.cli", "diagnose", "--config", "configs/timeexpert_stage1.yaml"]
    cmd += ["--checkpoint", str(ckpt), "--data", str(root), "--videos", "6", "--max-cosine", "0.9"]
    cmd += ["--json", str(out), f"data.tokenizer={tok}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_recipe_tokens_pass_and_unstandardised_tokens_fail(data, tmp_path):
    ok = _checkpoint(data, tmp_path / "recipe" / "ckpt")
    proc = _diagnose(data, ok, tmp_path / "ok.json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (row,) = json.loads((tmp_path / "ok.json").read_text())
    assert row["decoder"]["pairs"] > 0 and row["decoder"]["cos_event_empty"] < 0.9
    assert row["tower"]["cos_event_empty"] > 0.9  # the random tower alone does not tell the frames apart
    assert "cos(event, empty)" in proc.stdout and "decoder" in proc.stdout

    off = ["model.frame_tokens.standardize=false", "model.frame_tokens.time_embedding=false"]
    # without either step the model has no frame_tokens module, so the recipe's freeze list loses it
    kept = ["vision.*", "lm.decoder.*", "lm.embedding.word_embeddings.*", "lm.embedding.position_embeddings.*"]
    freeze = f"training.freeze=[{', '.join([*kept, 'lm.text_head.*'])}]"
    bad = _checkpoint(data, tmp_path / "plain" / "ckpt", *off, freeze)
    proc = _diagnose(data, bad, tmp_path / "bad.json", *off)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "do not tell frames with the event from frames without it" in proc.stderr and str(bad) in proc.stderr
    (row,) = json.loads((tmp_path / "bad.json").read_text())
    assert row["decoder"]["cos_event_empty"] >= 0.9
