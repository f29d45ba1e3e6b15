"""QVHighlights metrics as moment_detr's standalone_eval computes them (hand-computed cases)."""

import json

import pytest

from megatron_timeexpert.eval import io
from megatron_timeexpert.eval.qvhighlights import (
    detection_ap,
    qvhighlights_metrics,
    ranking_ap,
    voc_interpolated_ap,
)


def test_ap_is_all_point_interpolated_not_11_point():
    # tp, fp, tp with 2 gt windows: precision [1, 1/2, 2/3], recall [1/2, 1/2, 1].
    # All-point: 0.5 * 1 + 0.5 * 2/3 = 0.8333; 11-point VOC would give (6 * 1 + 5 * 2/3) / 11 = 0.8485.
    assert voc_interpolated_ap([1, 0.5, 2 / 3], [0.5, 0.5, 1.0]) == pytest.approx(5 / 6)
    gt = [(0, 10), (20, 30)]
    assert detection_ap(gt, [(0, 10, 0.9), (50, 60, 0.8), (20, 30, 0.7)], [0.5]) == [pytest.approx(5 / 6)]


def test_detection_ap_sorts_by_score_stably():
    gt = [(0, 10)]
    # Given out of score order: sorted to (0,10) first -> tp, fp: AP 1.
    assert detection_ap(gt, [(40, 50, 0.1), (0, 10, 0.9)], [0.5]) == [1.0]
    # Equal scores keep file order: fp then tp -> precision [0, 1/2], recall [0, 1] -> AP 0.5.
    assert detection_ap(gt, [(40, 50, 0.5), (0, 10, 0.5)], [0.5]) == [0.5]
    # A second detection of the same window is a false positive: tp, fp -> AP 1 (recall 1 at precision 1).
    assert detection_ap(gt, [(0, 10, 0.9), (0, 10, 0.8)], [0.5]) == [1.0]
    assert detection_ap(gt, [], [0.5, 0.7]) == [0.0, 0.0]


def test_detection_ap_equal_iou_takes_the_later_window():
    # (5,15) overlaps both windows with IoU 5/15; as the reference's reversed argsort it takes gt 1 = (10,20).
    # Then (10,20) finds gt 1 taken and gt 0 at IoU 0 -> false positive. tp, fp: precision [1, .5],
    # recall [.5, .5] -> AP 0.5 (taking gt 0 first would give 1.0).
    gt = [(0, 10), (10, 20)]
    assert detection_ap(gt, [(5, 15, 0.9), (10, 20, 0.8)], [0.3]) == [0.5]


def _gt_line(qid, duration, windows, clips=None, scores=None):
    d = {"qid": qid, "query": f"q{qid}", "duration": duration, "vid": f"v{qid}", "relevant_windows": windows}
    if clips is not None:
        d.update(relevant_clip_ids=clips, saliency_scores=scores)
    return d


def _files(tmp_path, gts, preds):
    g, p = tmp_path / "gt.jsonl", tmp_path / "pred.jsonl"
    g.write_text("".join(json.dumps(x) + "\n" for x in gts))
    p.write_text("".join(json.dumps(x) + "\n" for x in preds))
    return io.read_qvhighlights_gt(g), io.read_moment_predictions(p)


def test_moment_retrieval_hand_computed(tmp_path):
    gts = [_gt_line(1, 150, [[0, 10], [20, 30]]), _gt_line(2, 150, [[0, 40]])]
    # qid 1: tp (IoU 1), fp, tp (IoU 9/10) for thresholds <= 0.9: AP = .5 * 1 + .5 * 2/3 = 5/6;
    # at 0.95 the third is a fp: precision [1, .5, 1/3], recall [.5, .5, .5] -> AP 0.5.
    # Mean over the 10 thresholds: (9 * 5/6 + 0.5) / 10 = 0.8. qid 2 has no prediction -> 0.
    preds = [{"qid": 1, "pred_relevant_windows": [[0, 10, 0.9], [30, 40, 0.8], [21, 30, 0.7]]}]
    m = qvhighlights_metrics(*_files(tmp_path, gts, preds))
    assert m["MR-full-mAP"] == pytest.approx(40.0)  # (0.8 + 0) / 2
    assert m["MR-full-mAP@0.5"] == pytest.approx(100 * (5 / 6) / 2)
    assert m["MR-full-mAP@0.95"] == pytest.approx(25.0)
    # R1: first window (0,10) has IoU 1 with gt (0,10) -> hit at every threshold; qid 2 -> miss.
    assert m["MR-full-R1@0.5"] == pytest.approx(50.0) and m["MR-full-R1@0.95"] == pytest.approx(50.0)
    # Buckets by gt window length: short (0,10] holds qid 1 only, long (30,150] qid 2 only, middle nobody.
    assert m["MR-short-mAP"] == pytest.approx(80.0)
    assert m["MR-long-mAP"] == 0.0
    assert m["MR-middle-mAP"] is None
    assert m["num_missing_predictions"] == 1


def test_mr_uses_first_ten_windows_and_first_window_for_r1(tmp_path):
    gts = [_gt_line(1, 150, [[0, 10]])]
    # The only correct window is the 11th in file order (highest score): cut by max_pred_windows=10 -> AP 0.
    wins = [[50 + i, 60 + i, 0.1] for i in range(10)] + [[0, 10, 0.99]]
    m = qvhighlights_metrics(*_files(tmp_path, gts, [{"qid": 1, "pred_relevant_windows": wins}]))
    assert m["MR-full-mAP"] == 0.0
    # R1 takes the first window in file order, not the best scored: (20,30) misses although (0,10) scores higher.
    m = qvhighlights_metrics(
        *_files(tmp_path, gts, [{"qid": 1, "pred_relevant_windows": [[20, 30, 0.1], [0, 10, 0.9]]}])
    )
    assert m["MR-full-R1@0.5"] == 0.0 and m["MR-full-mAP"] == pytest.approx(100.0)


def test_ranking_ap_groups_tied_scores():
    # Scores 0.9 | 0.8 0.8 | 0.1 with truths 1 | 1 0 | 0: the tie is one threshold: after it tp=2, fp=1.
    # Recall steps: at 0.9 (precision 1) and at the 0.8 group (precision 2/3): AP = (1 + 2/3) / 2.
    # (Ranking the tied positive first would give 1.0.)
    assert ranking_ap([1, 1, 0, 0], [0.9, 0.8, 0.8, 0.1]) == pytest.approx(5 / 6)
    # Unweighted mean over recall steps: truths 1 0 1 1 by rank -> steps at precision 1, 2/3, 3/4 (interpolated
    # 1, 3/4, 3/4) -> (1 + 3/4 + 3/4) / 3.
    assert ranking_ap([1, 0, 1, 1], [4, 3, 2, 1]) == pytest.approx(2.5 / 3)
    assert ranking_ap([0, 0, 0], [1, 2, 3]) == 0.0  # all-negative truth
    assert ranking_ap([1, 1], [0, 0]) == 1.0  # all-positive truth


def test_highlight_detection_very_good_hand_computed(tmp_path):
    gts = [
        # 9 s -> int(9/2) = 4 clips. Clip 1 scores [4,3,2], clip 2 [1,4,0]; VeryGood (>= 4) per annotator:
        # a0 [0,1,0,0], a1 [0,0,1,0], a2 all 0.
        _gt_line(1, 9, [[2, 6]], [1, 2], [[4, 3, 2], [1, 4, 0]]),
        _gt_line(2, 9, [[2, 6]], [1], [[4, 4, 4]]),  # no prediction
        # 6 s -> 3 clips; clip 2 [4,0,0]: a0 [0,0,1].
        _gt_line(3, 6, [[4, 6]], [0, 2], [[2, 2, 2], [4, 0, 0]]),
        # 4 s -> 2 clips; clip 1 [0,4,1]: a1 [0,1].
        _gt_line(4, 4, [[2, 4]], [1], [[0, 4, 1]]),
    ]
    preds = [
        # 5 scores for 4 clips: cut to 4 for AP; the top score is clip 4, past the video -> HIT miss.
        # a0: group 0.7 = {clip1 tp, clip2 fp} -> precision 1/2 at the only recall step -> AP 0.5; a1 the same.
        {"qid": 1, "pred_saliency_scores": [0.1, 0.7, 0.7, 0.2, 5.0]},
        # Tie 0.9 at clips 1 and 2: HIT takes the first (clip 1, negative) -> miss. a0 AP: group 0.9 = {fp, tp} -> 0.5.
        {"qid": 3, "pred_saliency_scores": [0.3, 0.9, 0.9]},
        # Top clip 1 is VeryGood for a1 -> hit; a1 AP 1, a0 and a2 all-negative -> 0.
        {"qid": 4, "pred_saliency_scores": [0.2, 0.8]},
    ]
    m = qvhighlights_metrics(*_files(tmp_path, gts, preds))
    # mAP over 4 queries x 3 annotators: (0.5 + 0.5 + 0 | 0 0 0 | 0.5 + 0 + 0 | 0 + 1 + 0) / 12 = 2.5 / 12
    assert m["HL-min-VeryGood-mAP"] == pytest.approx(100 * 2.5 / 12)
    assert m["HL-min-VeryGood-Hit1"] == pytest.approx(25.0)  # only qid 4 hits
    # Fair (>= 2) for qid 4: clip 1 [0,4,1] -> a1 only; same AP pattern as VeryGood there. qid 1 a1: [0,1,1,0] -> group
    # 0.7 has both positives -> AP 1. Hit1 at Fair: qid 3 clip 1 scores 0 -> miss; still only qid 4 hits.
    assert m["HL-min-Fair-Hit1"] == pytest.approx(25.0)
    assert "MR-full-mAP" not in m  # no window predicted at all: no moment-retrieval metrics


def test_qvhighlights_gt_errors_name_line(tmp_path):
    g = tmp_path / "gt.jsonl"
    g.write_text(
        json.dumps(_gt_line(1, 10, [[0, 2]], [0], [[1, 2, 3]]))
        + "\n"
        + json.dumps(_gt_line(2, 10, [[0, 2]], [7], [[1, 2, 3]]))
    )
    with pytest.raises(io.EvalInputError, match=r"gt\.jsonl:2: clip ids \[7\] beyond the 5 clips"):
        io.read_qvhighlights_gt(g)
    g.write_text(json.dumps({"qid": 1, "vid": "v", "duration": 10}) + "\n")
    with pytest.raises(io.EvalInputError, match=r"gt\.jsonl:1: missing field 'relevant_windows'"):
        io.read_qvhighlights_gt(g)
    g.write_text(json.dumps(_gt_line(1, 10, [[0, 2]])) + "\n")
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"qid": 1, "pred_relevant_windows": [[0, 2]]}) + "\n")
    with pytest.raises(io.EvalInputError, match=r"p\.jsonl:1: pred_relevant_windows\[0\] has no score"):
        qvhighlights_metrics(io.read_qvhighlights_gt(g), io.read_moment_predictions(p))
