"""Dense video captioning metrics: localisation P/R/F1, SODA_c matching, CIDEr/METEOR (hand-computed cases)."""

import json

import pytest

from megatron_timeexpert.eval import io
from megatron_timeexpert.eval.dvc import (
    CocoScorers,
    TokenisedVideo,
    caption_pairs,
    dvc_iou,
    dvc_metrics,
    java_available,
    localisation_metrics,
    soda_c_video,
)

needs_java = pytest.mark.skipif(not java_available(), reason="no `java` on PATH: PTBTokenizer and METEOR need Java")


def _video(vid, segments, captions=None, duration=100.0):
    return io.DenseVideo(vid, [tuple(s) for s in segments], captions or ["x"] * len(segments), duration)


def test_dvc_iou():
    assert dvc_iou((0, 10), (5, 15)) == pytest.approx(5 / 15)  # union min(hull 15, 10 + 10)
    assert dvc_iou((0, 10), (0, 10)) == pytest.approx(1 - 1e-9)  # 10 / (10 + 1e-8)
    assert dvc_iou((0, 2), (5, 7)) == 0.0


def test_localisation_hand_computed():
    gt = [
        _video("a", [(0, 10), (20, 30)]),
        _video("b", [(0, 5)]),  # no prediction
        _video("c", [(0, 20)], duration=20.0),
    ]
    preds = [
        # Unsorted. IoUs: (21,30)~g1 = 9/10 - eps, (0,10)~g0 = 1 - 1e-9, (0,9)~g0 = 9/10 - eps.
        # tIoU 0.3/0.5/0.7: all 3 predictions and both events covered -> P 1, R 1.
        # tIoU 0.9 (strictly above): only (0,10) -> P 1/3, R 1/2.
        _video("a", [(21, 30), (0, 10), (0, 9)]),
        None,
        # Past the 20 s video, not clipped: inter 10, union min(hull 40, 20 + 30) = 40 -> 0.25: nothing covered
        # (clipped to 20 it would be 10/20 = 0.5).
        _video("c", [(10, 40)]),
    ]
    m = localisation_metrics(gt, preds)
    # video a: P = (1 + 1 + 1 + 1/3) / 4 = 5/6, R = (1 + 1 + 1 + 1/2) / 4 = 7/8, F1 = 2PR/(P+R) = 35/41.
    assert m["Precision"] == pytest.approx(100 * (5 / 6) / 3)
    assert m["Recall"] == pytest.approx(100 * (7 / 8) / 3)
    assert m["F1"] == pytest.approx(100 * (35 / 41) / 3)
    assert m["Precision@0.9"] == pytest.approx(100 * (1 / 3) / 3)
    assert m["Recall@0.3"] == pytest.approx(100 / 3)
    p, r = (5 / 6) / 3, (7 / 8) / 3
    assert m["F1_of_mean_PR"] == pytest.approx(100 * 2 * p * r / (p + r))


def test_threshold_ties_fall_below_because_of_the_epsilon():
    # (0,5) in (0,10): 5 / (10 + 1e-8) is just under 0.5, so at tIoU 0.5 it neither covers (> 0.5) nor pairs
    # (>= 0.5) the event; at 0.3 it does both.
    gt = _video("v", [(0, 10)], ["g"])
    p = _video("v", [(0, 5)], ["p"])
    m = localisation_metrics([gt], [p])
    assert (m["Precision@0.3"], m["Precision@0.5"], m["Recall@0.5"]) == (100.0, 0.0, 0.0)
    tg, tp = TokenisedVideo(gt.segments, gt.captions), TokenisedVideo(p.segments, p.captions)
    assert caption_pairs(tg, tp, 0.3) == [("p", "g")]
    assert caption_pairs(tg, tp, 0.5)[0][1] != "g"


def test_missing_and_empty_predictions_count(tmp_path):
    gt = [_video("a", [(0, 10)]), _video("b", [(0, 10)]), _video("c", [(0, 10)])]
    preds = {"a": _video("a", [(0, 10)]), "b": _video("b", []), "zzz": _video("zzz", [(0, 1)])}
    m = dvc_metrics(gt, preds)
    assert m["F1"] == pytest.approx(100 / 3)  # a perfect, b empty, c missing
    assert (m["num_missing_predictions"], m["num_empty_predictions"], m["num_unmatched_predictions"]) == (1, 1, 1)
    assert "CIDEr" not in m  # no scorers given: localisation only


def test_soda_c_matching_is_order_preserving_in_time():
    exact = lambda pairs: [1.0 if h == r else 0.0 for h, r in pairs]  # noqa: E731
    gt = TokenisedVideo([(0, 10), (10, 20)], ["a", "b"])
    # Predictions given out of time order: sorted by start they are a, b and both match -> S = 2 (1 - 1e-9),
    # P = R = S / 2 -> F ~ 1. (Unsorted, the order-preserving matching could keep only one pair: F = 0.5.)
    assert soda_c_video(gt, TokenisedVideo([(10, 20), (0, 10)], ["b", "a"]), exact) == pytest.approx(1.0)
    # Crossed captions in time: a prediction "b" at (0,10) and "a" at (10,20) -> every time-aligned pair scores 0,
    # and the captions that match lie in crossed order: S = 0.
    assert soda_c_video(gt, TokenisedVideo([(0, 10), (10, 20)], ["b", "a"]), exact) == 0.0
    # One prediction over both events, matching "a" with IoU 10/20: S = 0.5, P = 0.5 / 1, R = 0.5 / 2 -> F = 1/3.
    assert soda_c_video(gt, TokenisedVideo([(0, 20)], ["a"]), exact) == pytest.approx(1 / 3)
    assert soda_c_video(gt, TokenisedVideo([], []), exact) == 0.0
    seen = []
    soda_c_video(gt, TokenisedVideo([(0, 10)], ["p"]), lambda pairs: seen.extend(pairs) or [0.0] * len(pairs))
    assert seen == [("a", "p"), ("b", "p")]  # the event's caption is METEOR's hypothesis, as the reference calls it


def test_caption_pairs_follow_densevid():
    gt = TokenisedVideo([(0, 10), (5, 15)], ["g0", "g1"])
    pred = TokenisedVideo([(0, 10), (50, 60)], ["p0", "p1"])
    # tIoU 0.3: p0 pairs with g0 (IoU ~1) and g1 (5/15 >= 0.3); p1 overlaps nothing -> paired with a fresh word.
    pairs = caption_pairs(gt, pred, 0.3)
    assert pairs[:2] == [("p0", "g0"), ("p0", "g1")]
    assert pairs[2][0] == "p1" and pairs[2][1] not in {"g0", "g1", "p0", "p1"} and " " not in pairs[2][1]
    assert len(caption_pairs(gt, pred, 0.5)) == 2  # p0-g0, p1-garbage


@pytest.fixture(scope="module")
def scorers():
    if not java_available():
        pytest.skip("no `java` on PATH: PTBTokenizer and METEOR need Java")
    with CocoScorers() as s:
        yield s


@needs_java
def test_cider_hand_computed(scorers):
    # One event, two predictions: p0 is the event's caption exactly, p1 overlaps nothing (paired with a garbage
    # word). Per video, CIDEr-D's document frequencies come from the 2 references: every n-gram of the caption
    # has df 1, idf log(2) - log(1) > 0; p0's vector equals its reference's -> cosine 1 for n = 1..4, no length
    # penalty -> 10 * mean(1, 1, 1, 1) = 10. p1 scores 0. Mean over pairs: 5, at every tIoU -> 500 (percent).
    # (With p0 alone the single reference gives idf log(1) - log(1) = 0 and CIDEr 0.)
    gt = [_video("v", [(0, 10)], ["a man slices the red onion"])]
    pred = {"v": _video("v", [(0, 10), (50, 60)], ["A man slices the red onion.", "water boils in a pot"])}
    m = dvc_metrics(gt, pred, scorers)
    assert m["CIDEr"] == pytest.approx(500.0)
    alone = dvc_metrics(gt, {"v": _video("v", [(0, 10)], ["a man slices the red onion"])}, scorers)
    assert alone["CIDEr"] == 0.0


@needs_java
def test_meteor_and_soda_perfect_and_missing(scorers):
    # METEOR 1.5 scores an identical sentence 1 (a single full-length chunk has no fragmentation penalty),
    # so video a scores 100 for METEOR and SODA_c (IoU 1 - 1e-9); video b has no prediction -> 0. Mean: 50.
    gt = [_video("a", [(0, 10), (10, 20)], ["a dog runs", "the dog sits down"]), _video("b", [(0, 5)], ["x y"])]
    pred = {"a": _video("a", [(10, 20), (0, 10)], ["The dog sits down.", "A dog runs!"])}  # unsorted, cased
    m = dvc_metrics(gt, pred, scorers)
    assert m["METEOR"] == pytest.approx(50.0, abs=1e-6)
    assert m["SODA_c"] == pytest.approx(50.0, abs=1e-6)
    assert m["F1"] == pytest.approx(50.0)


@needs_java
def test_tokenizer_lowercases_and_drops_punctuation(scorers):
    assert scorers.tokenize(["A man, slices the onion.", "Caf\u00e9 time!"]) == ["a man slices the onion", "caf time"]


def test_dense_readers_and_errors(tmp_path):
    yc = tmp_path / "youcook2.json"
    db = {
        "v1": {"duration": 20, "subset": "validation", "annotations": [{"segment": [1, 5], "sentence": "cut"}]},
        "v2": {"duration": 20, "subset": "training", "annotations": [{"segment": [2, 6], "sentence": "mix"}]},
    }
    yc.write_text(json.dumps({"database": db}, indent=1))
    assert [v.vid for v in io.read_dense_gt(yc)] == ["v1", "v2"]
    (v,) = io.read_dense_gt(yc, subset="validation")
    assert (v.vid, v.segments, v.captions, v.duration) == ("v1", [(1.0, 5.0)], ["cut"], 20.0)
    anet = tmp_path / "val_1.json"
    anet.write_text(json.dumps({"v": {"duration": 9, "timestamps": [[0, 3], [2, 9]], "sentences": ["a", "b"]}}))
    assert io.read_dense_gt(anet)[0].segments == [(0.0, 3.0), (2.0, 9.0)]
    # Predictions: ours (writer) and ActivityNet's {"results": ...} read the same.
    ours = io.write_dense_predictions(tmp_path / "p.json", {"v": [{"timestamp": [0, 3], "caption": "a"}]})
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"version": "1.0", "results": {"v": [{"timestamp": [0, 3], "sentence": "a"}]}}))
    for f in (ours, res):
        p = io.read_dense_predictions(f)["v"]
        assert (p.segments, p.captions) == ([(0.0, 3.0)], ["a"])
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{\n "v1": [{"timestamp": [0, 3], "caption": "a"}],\n "v2": [{"timestamp": [5, 3], "caption": "b"}]\n}'
    )
    with pytest.raises(io.EvalInputError, match=r"bad\.json:3: v2\[0\]\.timestamp = \[5\.0, 3\.0\] starts after"):
        io.read_dense_predictions(bad)
    bad.write_text('{\n "v1": [{"timestamp": [0, 3], "caption": "a"}],\n "v2": [{"timestamp": [1, 3]}]\n}')
    with pytest.raises(io.EvalInputError, match=r"bad\.json:3: missing field 'sentence'"):
        io.read_dense_predictions(bad)
    bad.write_text('{"v": {"duration": 9, "timestamps": [[0, 3]], "sentences": ["a", "b"]}}')
    with pytest.raises(io.EvalInputError, match=r"bad\.json:1: 1 timestamps but 2 sentences"):
        io.read_dense_gt(bad)
    bad.write_text('{"v": [\n{"timestamp": [0, 3], "caption": "a"},\n')
    with pytest.raises(io.EvalInputError, match=r"bad\.json:3:\d+: malformed JSON"):
        io.read_dense_predictions(bad)
