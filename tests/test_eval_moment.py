"""Charades-STA moment retrieval metrics and the moment-retrieval readers (hand-computed cases)."""

import json

import pytest

from megatron_timeexpert.eval import io
from megatron_timeexpert.eval.moment import charades_metrics, hull_iou, match_predictions


def _q(qid, vid, query, s, e):
    return io.MomentQuery(str(qid), vid, query, [(s, e)], f"gt:{qid}")


def _p(vid, query, windows, qid=None):
    return io.MomentPrediction(qid, vid, query, [tuple(w) + (None,) * (3 - len(w)) for w in windows], None, "pred")


def test_hull_iou():
    assert hull_iou((0, 10), (5, 15)) == pytest.approx(5 / 15)  # overlap 5, hull 15
    assert hull_iou((0, 5), (0, 10)) == 0.5  # exactly 0.5: counts for R1@0.5 (>=)
    assert hull_iou((0, 2), (5, 7)) == 0.0  # disjoint
    assert hull_iou((3, 3), (3, 3)) == 0.0  # empty hull


def test_charades_hand_computed():
    gt = [
        _q(0, "a", "q0", 0, 10),
        _q(1, "a", "q1", 5, 15),
        _q(2, "b", "q2", 20, 30),  # the video is 32 s long
        _q(3, "b", "q3", 0, 4),
        _q(4, "c", "q4", 3, 6),
    ]
    preds = [
        _p("a", "q0", [(0, 5)]),  # IoU 5/10 = 0.5 exactly: a hit at 0.3 and 0.5
        # Unsorted scores: the FIRST window is the top-1 ([6,14]: IoU 8/10 = 0.8), not the best scored
        # ([0,10], score 0.9, IoU 5/15 would miss 0.5 and 0.7).
        _p("a", "q1", [(6, 14, 0.1), (0, 10, 0.9)]),
        # Past the 32 s video: not clipped. IoU = (30-25) / (60-20) = 0.125 (clipped to 32 it would be 5/12 > 0.3).
        _p("b", "q2", [(25, 60)]),
        # q3: no prediction at all -> IoU 0
        _p("c", "q4", []),  # empty prediction -> IoU 0
        _p("z", "not in the ground truth", [(0, 1)]),
    ]
    m = charades_metrics(gt, preds)
    # hits: 0.3 -> q0, q1 (2 of 5); 0.5 -> q0, q1; 0.7 -> q1 only. Averages over the 5 gt queries.
    assert m["R1@0.3"] == pytest.approx(40.0)
    assert m["R1@0.5"] == pytest.approx(40.0)
    assert m["R1@0.7"] == pytest.approx(20.0)
    # mIoU = (0.5 + 0.8 + 0.125 + 0 + 0) / 5 = 0.285
    assert m["mIoU"] == pytest.approx(28.5)
    assert m["num_queries"] == 5
    assert m["num_missing_predictions"] == 1
    assert m["num_empty_predictions"] == 1
    assert m["num_unmatched_predictions"] == 1


def test_matching_by_qid_and_duplicate_queries():
    gt = [_q(0, "v", "same", 0, 10), _q(1, "v", "same", 20, 30), _q(2, "v", "other", 0, 2)]
    preds = [
        _p("v", "same", [(0, 10)]),  # first duplicate -> gt 0
        _p("v", " same ", [(20, 30)]),  # whitespace-stripped, second duplicate -> gt 1
        _p("v", "same", [(0, 1)]),  # third with that key: nothing left -> unmatched
        _p(None, None, [(0, 2)], qid="2"),  # by qid
        _p(None, None, [(5, 6)], qid="2"),  # a second prediction for qid 2 -> unmatched
    ]
    m = match_predictions(gt, preds)
    assert [p.windows[0][:2] for p in m.predictions] == [(0, 10), (20, 30), (0, 2)]
    assert m.missing == 0 and len(m.unmatched) == 2
    assert charades_metrics(gt, preds)["R1@0.7"] == pytest.approx(100.0)


def test_read_charades_text_and_caption_coco(tmp_path):
    txt = tmp_path / "charades_sta_test.txt"
    txt.write_text(
        "AO8RW 0.0 6.9##a person is putting a book on a shelf.\n\n3MSZA 24.3 30.4##person turn a light on.\n"
    )
    gt = io.read_moment_gt(txt)
    assert [(q.qid, q.vid, q.query, q.windows) for q in gt] == [
        ("0", "AO8RW", "a person is putting a book on a shelf.", [(0.0, 6.9)]),
        ("1", "3MSZA", "person turn a light on.", [(24.3, 30.4)]),
    ]
    coco = tmp_path / "test.caption_coco_format.json"
    doc = {"annotations": [{"image_id": "AO8RW.mp4", "caption": "x", "timestamp": [1, 2], "id": 7}]}
    coco.write_text(json.dumps(doc, indent=1))
    (q,) = io.read_moment_gt(coco)
    assert (q.qid, q.vid, q.windows) == ("7", "AO8RW.mp4", [(1.0, 2.0)])


def test_prediction_formats(tmp_path):
    # Our jsonl (writer), a JSON list, QVHighlights lines and TRACE's dict all read to the same windows.
    ours = io.write_moment_predictions(
        tmp_path / "p.jsonl", [{"vid": "v", "query": "q", "pred_windows": [[1, 2, 0.5]]}]
    )
    lst = tmp_path / "p.json"
    lst.write_text(json.dumps([{"vid": "v", "query": "q", "pred_windows": [[1, 2]]}], indent=1))
    qvh = io.write_qvhighlights_predictions(
        tmp_path / "q.jsonl", [{"qid": 0, "vid": "v", "query": "q", "pred_relevant_windows": [[1, 2, 0.5]]}]
    )
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"0": {"timestamp": [1, 2], "vid": "v", "query": "q"}, "1": {}}))
    assert io.read_moment_predictions(ours)[0].windows == [(1.0, 2.0, 0.5)]
    assert io.read_moment_predictions(lst)[0].windows == [(1.0, 2.0, None)]
    (p,) = io.read_moment_predictions(qvh)
    assert (p.qid, p.windows) == ("0", [(1.0, 2.0, 0.5)])
    t0, t1 = io.read_moment_predictions(trace)
    assert (t0.qid, t0.windows, t1.qid, t1.windows) == ("0", [(1.0, 2.0, None)], "1", [])


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"vid": "v", "query": "q", "pred_windows": []}\n\n{"vid": "v", "query": "q", "pred_windows": [[3, 1]]}\n',
         ":3: pred_windows[0] = [3.0, 1.0] starts after it ends"),
        ('{"vid": "v", "query": "q", "pred_windows": [[0, "x"]]}\n', ":1: pred_windows[0][1] is 'x', not a number"),
        ('{"vid": "v", "pred_windows": []}\n{"qid": 1}\n', ":1: a prediction needs 'qid' or both 'vid' and 'query'"),
        ('{"qid": 1}\n{"qid": 2,\n', ":2:"),
        ('[\n {"qid": 1, "pred_windows": [[0, 1]]},\n {"qid": 2, "pred_windows": [0, 1]}\n]',
         ":3: pred_windows[0] is 0, not [start, end(, score)]"),
    ],
)  # fmt: skip
def test_malformed_predictions_name_file_and_line(tmp_path, text, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(text)
    with pytest.raises(io.EvalInputError) as exc:
        io.read_moment_predictions(f)
    assert str(exc.value).startswith(str(f)) and message in str(exc.value)


def test_malformed_ground_truth_names_line(tmp_path):
    f = tmp_path / "gt.txt"
    f.write_text("v 0 1##ok\nv 0 one##bad\n")
    with pytest.raises(io.EvalInputError, match=r"gt\.txt:2: start/end '0' 'one' are not numbers"):
        io.read_moment_gt(f)
    f.write_text("v 0 1##ok\nv 5 1##inverted\n")
    with pytest.raises(io.EvalInputError, match=r"gt\.txt:2: start/end = \[5.0, 1.0\] starts after it ends"):
        io.read_moment_gt(f)
    with pytest.raises(io.EvalInputError, match="file not found"):
        io.read_moment_gt(tmp_path / "missing.txt")
