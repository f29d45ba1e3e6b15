"""bench/ablation.py's report: mean +- sample std over seeds per variant, the baselines' rows, and the
verdict against top-6 (quality within one std, activated-experts ratio). Hand-computed numbers."""

from __future__ import annotations

import pytest

from bench.ablation import COLUMNS, mean_std, tabulate, verdict


def _summary(r1: float, k_visual: float, k_text: float) -> dict:
    metrics = {t: {"model": {}, "chance": {}, "constant": {}} for t, _ in COLUMNS}
    for t, m in COLUMNS:
        metrics[t]["model"][m] = r1
        metrics[t]["chance"][m] = 5.0
        metrics[t]["constant"][m] = 18.0
    return {
        "metrics": metrics,
        "k_by_type": {"visual": k_visual, "text": k_text},
        "charades_distinct_top_windows": 60,
        "charades_queries": 240,
    }


def test_mean_and_sample_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))
    assert mean_std([4.0]) == (4.0, 0.0)


def test_table_and_verdict_by_hand():
    runs = {
        "timeexpert": {1: _summary(60.0, 1.0, 2.0), 2: _summary(64.0, 2.0, 2.0)},
        "topk_k6": {1: _summary(61.0, 6.0, 6.0), 2: _summary(61.0, 6.0, 6.0)},
    }
    rows, agg = tabulate(runs)
    # header, rule, two variants, chance, best constant
    assert len(rows) == 6
    te = rows[2].split(" | ")
    assert te[0] == "| timeexpert" and te[1] == "1,2"
    assert te[2] == "62.0 ± 2.8"  # mean 62, sample std sqrt(8) = 2.83
    assert "25 ± 0%" in rows[2]  # 60/240 distinct windows
    assert rows[4].startswith("| chance |  | 5.0") and rows[5].startswith("| best constant |  | 18.0")
    # k mean per seed: (1+2)/2 = 1.5 and 2.0 -> 1.75; top-6: 6
    assert agg["timeexpert"]["k_mean"][0] == pytest.approx(1.75)
    lines = verdict(agg)
    assert lines[0].endswith("matches (within one std: 2.8)")  # |62 - 61| <= 2.83
    assert "ratio 0.29" in lines[-1]  # 1.75 / 6
    runs["timeexpert"] = {1: _summary(70.0, 1.0, 2.0), 2: _summary(71.0, 2.0, 2.0)}
    assert "beats" in verdict(tabulate(runs)[1])[0]
