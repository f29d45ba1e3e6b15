"""The multi-process test helper: results in rank order, a child's traceback surfaces, a hang times out."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from parallel.testing import DistributedRunError, run_distributed


def _sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return dist.get_rank(), t  # a tensor crosses the process boundary by value


def _rank1_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank one")
    dist.barrier()


def _rank0_hangs():
    if dist.get_rank() == 0:
        time.sleep(60)
    return dist.get_rank()


def test_results_in_rank_order():
    out = run_distributed(_sum_of_ranks, 3)
    assert [r for r, _ in out] == [0, 1, 2]
    assert all(t.item() == 3.0 for _, t in out)


def test_child_traceback_is_surfaced():
    with pytest.raises(DistributedRunError) as e:
        run_distributed(_rank1_raises, 2, timeout=60)
    assert "--- rank 1 ---" in str(e.value) and "ValueError: boom on rank one" in str(e.value)


def test_timeout_names_missing_ranks():
    t0 = time.monotonic()
    with pytest.raises(DistributedRunError, match=r"timed out after 8s; ranks \[0\] did not finish"):
        run_distributed(_rank0_hangs, 2, timeout=8)
    assert time.monotonic() - t0 < 60, "the timeout did not stop the run (8 s plus process start-up)"
