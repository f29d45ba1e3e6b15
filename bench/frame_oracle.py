"""How well could a model that sees N frames ground at best? The upper bound behind ``data.num_frames``.

Run (seconds; reads only annotations)::

    python -m bench.frame_oracle --data runs/main_job/vtg_test [--frames 4,8,16] [--write]

For each Charades-STA query of the set, a perfect per-frame detector knows which of the N sampled frames
lie inside the query's event (frames at the centres of N equal segments, ``dali_pipes/sampling.py``'s
``uniform`` mode, as the data path samples them). Its answer is the union of those frames' segments
(the midpoint rule: the window's edges are half-way between a frame inside and its neighbour
outside); a query with no frame inside gets the segment of the frame nearest to the event's centre.
Copying frame times instead (first to last frame inside) is the second row. Scored with
``charades_metrics``. ``--write`` writes the "Frame oracle" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dali_pipes.sampling import SamplingConfig, target_times
from megatron_timeexpert.eval import io as eio
from megatron_timeexpert.eval.moment import charades_metrics
from tools.main_job import _durations


def oracle_window(start: float, end: float, duration: float, n: int, midpoint: bool = True) -> tuple[float, float]:
    """The best answer of an N-frame detector for the event ``[start, end]`` of a ``duration`` s video."""
    times = target_times(SamplingConfig("uniform", n), duration)
    seg = duration / n
    inside = np.flatnonzero((times >= start) & (times <= end))
    if inside.size == 0:
        i = int(np.argmin(np.abs(times - (start + end) / 2)))
        inside = np.array([i])
    i, j = int(inside[0]), int(inside[-1])
    if midpoint:
        return i * seg, min((j + 1) * seg, duration)
    return float(times[i]), float(times[j]) if j > i else float(times[i]) + 0.1


def oracle_metrics(gt: list[eio.MomentQuery], durations: dict[str, float], n: int, midpoint: bool) -> dict:
    preds = []
    for q in gt:
        duration = q.duration if q.duration is not None else durations[q.vid]
        s, e = oracle_window(*q.windows[0], duration, n, midpoint)
        preds.append(eio.MomentPrediction(qid=q.qid, vid=q.vid, query=q.query, windows=[(s, e, None)]))
    return charades_metrics(gt, preds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.frame_oracle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a synthetic VTG set (tools/make_synthetic_vtg.py)")
    ap.add_argument("--frames", default="4,8,16", help="comma-separated frame counts")
    ap.add_argument("--write", action="store_true", help="write the section of docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    gt = eio.read_moment_gt(args.data / "annotations" / "charades_sta.txt")
    durations = _durations(args.data)
    rows = ["| frames | answer | R1@0.3 | R1@0.5 | R1@0.7 | mIoU |", "| ---: | --- | ---: | ---: | ---: | ---: |"]
    for n in (int(x) for x in args.frames.split(",")):
        for midpoint, label in ((True, "midpoint rule"), (False, "first to last frame time")):
            m = oracle_metrics(gt, durations, n, midpoint)
            rows.append(
                f"| {n} | {label} | {m['R1@0.3']:.1f} | {m['R1@0.5']:.1f} | {m['R1@0.7']:.1f} | {m['mIoU']:.1f} |"
            )
    print("\n".join(rows))
    if args.write:
        from bench.report import machine_line, write_section

        body = (
            "## Frame oracle: the best a model that sees N frames can ground\n\n"
            f"Command: `python -m bench.frame_oracle --data {args.data} --frames {args.frames} --write`. "
            f"{machine_line()}. {len(gt)} Charades-STA queries of the held-out set. A perfect per-frame "
            "detector (which sampled frames lie inside the event) answering with the union of those frames' "
            "segments (midpoint rule) or with the first and last of their times (`bench/frame_oracle.py`).\n\n"
            + "\n".join(rows)
            + "\n"
        )
        write_section("frame_oracle", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
