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
