"""``timeexpert eval`` end to end on the synthetic generator's annotation files (perfect and damaged predictions)."""

import json
import subprocess
import sys

import pytest

from megatron_timeexpert.cli import main as timeexpert
from megatron_timeexpert.eval import io
from megatron_timeexpert.eval.dvc import java_available
from tools.make_synthetic_vtg import GeneratorConfig, generate


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    paths = generate(GeneratorConfig(out, num_videos=3, seed=3, progress=False))
    return out, paths


def _run(capsys, *argv):
    rc = timeexpert(["eval", *map(str, argv)])
    out = capsys.readouterr()
    lines = dict(line.split(" ", 1) for line in out.out.splitlines() if not line.startswith("wrote "))
    return rc, lines, out.err


def test_charades_perfect_and_missing(synthetic, tmp_path, capsys):
    _, paths = synthetic
    gt = io.read_moment_gt(paths["charades_sta"])
    pred = tmp_path / "charades_pred.jsonl"
    io.write_moment_predictions(pred, [{"vid": q.vid, "query": q.query, "pred_windows": [q.windows[0]]} for q in gt])
    rc, lines, _ = _run(capsys, "--task", "charades", "--pred", pred, "--gt", paths["charades_sta"], "--out",
                        tmp_path / "m.json")  # fmt: skip
    assert rc == 0
    assert {k: lines[k] for k in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")} == dict.fromkeys(
        ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU"), "100.00"
    )
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["task"] == "charades" and doc["metrics"]["R1@0.7"] == 100.0
    assert doc["metrics"]["num_queries"] == len(gt)
    # Drop the first query's prediction: it scores 0 and is counted; the average is over all queries.
    io.write_moment_predictions(
        pred, [{"vid": q.vid, "query": q.query, "pred_windows": [q.windows[0]]} for q in gt[1:]]
    )
    rc, lines, _ = _run(capsys, "--task", "charades", "--pred", pred, "--gt", paths["charades_sta"])
    assert rc == 0 and lines["num_missing_predictions"] == "1"
    assert float(lines["R1@0.5"]) == pytest.approx(100 * (len(gt) - 1) / len(gt), abs=0.005)


def test_qvhighlights_perfect(synthetic, tmp_path, capsys):
    _, paths = synthetic
    gt = io.read_qvhighlights_gt(paths["qvhighlights"])
    preds = []
    for q in gt:
        clips = [0.0] * int(q.duration / 2)
        for c, s in zip(q.relevant_clip_ids, q.saliency_scores):
            clips[c] = max(s)  # the best annotator's score: a clip someone rated 4 ranks first
        wins = [[*w, 1.0] for w in q.windows]
        preds.append({"qid": int(q.qid), "vid": q.vid, "query": q.query, "pred_relevant_windows": wins,
                      "pred_saliency_scores": clips})  # fmt: skip
    pred = io.write_qvhighlights_predictions(tmp_path / "qv.jsonl", preds)
    rc, lines, _ = _run(capsys, "--task", "qvhighlights", "--pred", pred, "--gt", paths["qvhighlights"])
    assert rc == 0
    assert lines["MR-full-mAP"] == "100.00" and lines["MR-full-R1@0.7"] == "100.00"
    # Ranked by the best annotator's score, the top clip is rated 4 by someone wherever such a clip exists;
    # queries without any 4 score 0 (moment_detr's definition), so HIT@1 is the share of queries that have one.
    has_vg = sum(any(max(s) >= 4 for s in q.saliency_scores) for q in gt)
    assert float(lines["HL-min-VeryGood-Hit1"]) == pytest.approx(100 * has_vg / len(gt), abs=0.005)


@pytest.mark.skipif(not java_available(), reason="no `java` on PATH: PTBTokenizer and METEOR need Java")
def test_dvc_perfect_with_captions(synthetic, tmp_path, capsys):
    _, paths = synthetic
    gt = io.read_dense_gt(paths["activitynet"])
    # ActivityNet's submission format, events of each video in reverse order (unsorted).
    results = {v.vid: [{"timestamp": list(s), "sentence": c} for s, c in zip(v.segments[::-1], v.captions[::-1])]
               for v in gt}  # fmt: skip
    pred = tmp_path / "dvc.json"
    pred.write_text(json.dumps({"results": results}))
    rc, lines, _ = _run(capsys, "--task", "dvc", "--pred", pred, "--gt", paths["activitynet"])
    assert rc == 0
    for k in ("Precision", "Recall", "F1", "METEOR", "SODA_c"):
        assert float(lines[k]) == pytest.approx(100.0, abs=1e-6), k
    assert float(lines["CIDEr"]) > 0.0 and lines["num_missing_predictions"] == "0"


def test_dvc_localisation_only(synthetic, tmp_path, capsys):
    _, paths = synthetic
    gt = io.read_dense_gt(paths["youcook2"])
    preds = {v.vid: [{"timestamp": s, "caption": c} for s, c in zip(v.segments, v.captions)] for v in gt[1:]}
    pred = io.write_dense_predictions(tmp_path / "dvc.json", preds)
    rc, lines, _ = _run(capsys, "--task", "dvc", "--pred", pred, "--gt", paths["youcook2"], "--no-captions")
    assert rc == 0 and "CIDEr" not in lines
    assert float(lines["F1"]) == pytest.approx(100 * (len(gt) - 1) / len(gt), abs=0.005)
    assert lines["num_missing_predictions"] == "1"


def test_malformed_input_is_a_clear_error(synthetic, tmp_path, capsys):
    _, paths = synthetic
    pred = tmp_path / "bad.jsonl"
    pred.write_text(
        '{"vid": "a", "query": "b", "pred_windows": [[0, 1]]}\n{"vid": "a", "query": "b", "pred_windows": [[1]]}\n'
    )
    rc, _, err = _run(capsys, "--task", "charades", "--pred", pred, "--gt", paths["charades_sta"])
    assert rc == 2
    assert f"{pred}:2: pred_windows[0] is [1], not [start, end(, score)]" in err
    rc, _, err = _run(capsys, "--task", "charades", "--pred", tmp_path / "none.json", "--gt", paths["charades_sta"])
    assert rc == 2 and "none.json: file not found" in err


def test_eval_does_not_import_torch():
    code = (
        "import sys, megatron_timeexpert.eval.cli, megatron_timeexpert.eval.dvc; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
