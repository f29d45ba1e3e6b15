"""bench/frame_oracle.py's N-frame upper bound, by hand: frames at 0.5, 1.5, ... 7.5 s of an 8 s video."""

from bench.frame_oracle import oracle_window


def test_midpoint_rule_and_frame_times_by_hand():
    # frames 2.5, 3.5, 4.5 lie inside [2.2, 4.9]: their segments [2, 5]; their times [2.5, 4.5]
    assert oracle_window(2.2, 4.9, 8.0, 8) == (2.0, 5.0)
    assert oracle_window(2.2, 4.9, 8.0, 8, midpoint=False) == (2.5, 4.5)
    # no frame inside [2.6, 2.9]: the segment of the frame nearest its centre (2.5 s)
    assert oracle_window(2.6, 2.9, 8.0, 8) == (2.0, 3.0)
    # the last segment ends at the video's end
    assert oracle_window(7.2, 8.0, 8.0, 8) == (7.0, 8.0)
