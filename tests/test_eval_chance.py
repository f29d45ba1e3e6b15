"""Chance baselines (megatron_timeexpert/eval/chance.py): random predictions the evaluators read,
deterministic per seed, inside the video, and scoring what chance should on a hand-made case."""

from __future__ import annotations

from megatron_timeexpert.eval import chance
from megatron_timeexpert.eval import io as eio
from megatron_timeexpert.eval.moment import charades_metrics


def _queries(n: int) -> list[eio.MomentQuery]:
    return [eio.MomentQuery(qid=str(i), vid=f"v{i % 3}", query=f"q{i}", windows=[(2.0, 6.0)]) for i in range(n)]


def test_random_windows_lie_in_the_video_are_ranked_and_repeat_per_seed(tmp_path):
    qs = _queries(30)
    durations = {"v0": 10.0, "v1": 20.0, "v2": 30.0}
    a = chance.random_moment_predictions(qs, durations, seed=3)
    assert a == chance.random_moment_predictions(qs, durations, seed=3)
    assert a != chance.random_moment_predictions(qs, durations, seed=4)
    for q, p in zip(qs, a):
        d = durations[q.vid]
        assert all(0 <= s < e <= d + 0.1 for s, e, _ in p["pred_windows"])
        scores = [w[2] for w in p["pred_windows"]]
        assert scores == sorted(scores, reverse=True)
        assert len(p["pred_saliency_scores"]) == -(-int(d) // 2)
    path = eio.write_moment_predictions(tmp_path / "p.jsonl", a)
    assert len(eio.read_moment_predictions(path)) == 30


def test_chance_r1_is_near_its_expected_value():
    # gt window (2, 6) in a 10 s video: a random window (sorted pair of uniforms) has IoU >= 0.5 with it
    # with probability ~0.09 (Monte Carlo below with another generator); 2000 queries keep the
    # estimate within a few points.
    import random

    rng = random.Random(0)
    hits = 0
    for _ in range(200_000):
        s, e = sorted((rng.uniform(0, 10), rng.uniform(0, 10)))
        inter = max(0.0, min(e, 6) - max(s, 2))
        hits += inter / (max(e, 6) - min(s, 2)) >= 0.5
    expected = 100.0 * hits / 200_000
    qs = [eio.MomentQuery(qid=str(i), vid="v0", query=f"q{i}", windows=[(2.0, 6.0)]) for i in range(2000)]
    preds = chance.random_moment_predictions(qs, {"v0": 10.0}, seed=1)
    got = charades_metrics(
        qs, [eio.MomentPrediction(p["qid"], p["vid"], p["query"], [tuple(w) for w in p["pred_windows"]]) for p in preds]
    )
    assert abs(got["R1@0.5"] - expected) < 3.0, (got["R1@0.5"], expected)


def test_random_dense_captions_have_one_event_per_gt_event():
    videos = [eio.DenseVideo("a", [(0.0, 2.0), (3.0, 5.0)], ["x", "y"], duration=8.0)]
    out = chance.random_dense_predictions(videos, ["c1", "c2"], seed=0)
    assert len(out["a"]) == 2 and all(e["caption"] in ("c1", "c2") for e in out["a"])
    assert all(0 <= e["timestamp"][0] < e["timestamp"][1] <= 8.1 for e in out["a"])


def test_prior_baselines_predict_the_most_common_training_window_and_caption():
    qs = [eio.MomentQuery(qid="0", vid="v", query="q", windows=[(1.0, 3.0)], duration=5.0)]
    train = [(0.5, 2.5), (4.0, 8.0), (0.5, 2.5), (4.0, 8.0), (1.0, 2.0)]  # tie: the earlier window wins
    (p,) = chance.prior_moment_predictions(qs, {}, train)
    assert p["pred_windows"] == [[0.5, 2.5, 1.0]]
    assert p["pred_saliency_scores"] == [1.0, 1.0, 0.0]  # clips [0,2) and [2,4) overlap (0.5, 2.5)
    (p,) = chance.prior_moment_predictions(qs, {}, [(4.0, 8.0)])
    assert p["pred_windows"] == [[4.0, 5.0, 1.0]]  # clipped to the 5 s video
    train_v = [
        eio.DenseVideo("t1", [(0.0, 2.0), (3.0, 5.0)], ["a", "b"]),
        eio.DenseVideo("t2", [(0.0, 2.0)], ["b"]),
    ]
    out = chance.prior_dense_predictions([eio.DenseVideo("x", [(1.0, 2.0), (2.0, 4.0)], ["p", "q"])], train_v)
    assert out["x"] == [{"timestamp": [0.0, 2.0], "caption": "b"}, {"timestamp": [3.0, 5.0], "caption": "b"}]


def _as_predictions(preds: list[dict]) -> list[eio.MomentPrediction]:
    return [eio.MomentPrediction(p["qid"], p["vid"], p["query"], [tuple(w) for w in p["pred_windows"]]) for p in preds]


def test_best_constant_window_is_the_training_sets_best_by_the_evaluator():
    """Independent check: every window of the grid scored by eval/moment.py's charades_metrics on the
    training queries; the chosen one has the top R1@0.5 and, among those, the top mIoU."""
    import random

    rng = random.Random(5)
    durations = {f"v{i}": float(rng.choice([6, 8, 10])) for i in range(12)}
    train = []
    for i in range(40):
        vid = f"v{i % 12}"
        s = rng.choice([0.0, 0.5, 1.0, 2.0, 3.5])
        e = min(s + rng.choice([1.0, 2.0, 3.0]), durations[vid])
        train.append(eio.MomentQuery(qid=str(i), vid=vid, query=f"q{i}", windows=[(s, e)]))
    best = chance.best_constant_window(train, durations)
    scored = {}
    grid = [k / 2 for k in range(21)]
    for s in grid:
        for e in grid:
            if e > s:
                preds = chance.constant_moment_predictions(train, durations, (s, e))
                m = charades_metrics(train, _as_predictions(preds))
                scored[(s, e)] = (m["R1@0.5"], m["mIoU"])
    top = max(scored.values())
    assert scored[best] == top, (best, scored[best], top)
    # a hand-made case: two of three queries share a window, so it wins; clipping to the video counts
    qs = [
        eio.MomentQuery("0", "a", "x", [(0.0, 2.0)], duration=10.0),
        eio.MomentQuery("1", "b", "y", [(0.0, 2.0)], duration=10.0),
        eio.MomentQuery("2", "c", "z", [(4.0, 6.0)], duration=10.0),
    ]
    assert chance.best_constant_window(qs, {}) == (0.0, 2.0)
    short = [eio.MomentQuery("0", "a", "x", [(1.0, 3.0)], duration=3.0)]
    w = chance.best_constant_window(short, {})
    assert w[0] == 1.0 and min(w[1], 3.0) == 3.0  # any end past the video clips to the same window


def test_best_constant_spans_pick_windows_greedily_by_matched_training_events():
    train = [
        eio.DenseVideo("a", [(0.0, 2.0), (4.0, 6.0)], ["p", "q"], duration=10.0),
        eio.DenseVideo("b", [(0.0, 2.0), (7.0, 9.0)], ["p", "r"], duration=10.0),
        eio.DenseVideo("c", [(4.0, 6.0)], ["p"], duration=10.0),
    ]
    spans = chance.best_constant_spans(train, n=3)
    # (0, 2) and (4, 6) match two events each at IoU 1 (the earliest first); then (7, 9) matches the last
    assert spans[:2] == [(0.0, 2.0), (4.0, 6.0)] and spans[2][0] <= 7.0 <= spans[2][1]
    assert chance.most_common_caption(train) == "p"
    preds = chance.constant_dense_predictions([eio.DenseVideo("t", [(1, 2)], ["x"], duration=1.5)], spans, "p")
    assert preds == {"t": [{"timestamp": [0.0, 1.5], "caption": "p"}]}  # one gt event -> one span, clipped


def test_charades_split_by_event_index_and_distinct_windows():
    from megatron_timeexpert.eval.moment import charades_by_event_index, distinct_top_windows, event_indices

    gt = [
        eio.MomentQuery("0", "a", "later one", [(5.0, 7.0)]),
        eio.MomentQuery("1", "a", "first one", [(0.5, 2.0)]),
        eio.MomentQuery("2", "b", "only one", [(3.0, 4.0)]),
        eio.MomentQuery("3", "a", "third", [(8.0, 9.0)]),
    ]
    assert event_indices(gt) == [1, 0, 0, 2]
    preds = [
        eio.MomentPrediction("0", "a", "later one", [(0.5, 2.0, None)]),  # answers the first event: IoU 0
        eio.MomentPrediction("1", "a", "first one", [(0.5, 2.0, None)]),  # IoU 1
        eio.MomentPrediction("2", "b", "only one", [(3.0, 5.0, None)]),  # IoU 0.5
        eio.MomentPrediction("3", "a", "third", [(8.0, 9.0, None)]),  # IoU 1
    ]
    split = charades_by_event_index(gt, preds)
    assert split["first"]["num_queries"] == 2 and split["later"]["num_queries"] == 2
    assert split["first"]["R1@0.5"] == 100.0 and split["first"]["mIoU"] == 75.0
    assert split["later"]["R1@0.5"] == 50.0 and split["later"]["mIoU"] == 50.0
    assert distinct_top_windows(preds) == 3
