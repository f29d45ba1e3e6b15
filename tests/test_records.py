"""Routing records: single-process bookkeeping and the global reduction over 4 gloo ranks."""

import pytest
import torch
import torch.distributed as dist

from megatron_timeexpert.moe.records import RoutingRecords
from megatron_timeexpert.moe.router import RouterConfig
from parallel.testing import run_distributed

E, H = 4, 6


def test_update_counts_types_unrouted_and_last_active():
    rec = RoutingRecords(E, H, rate_decay=0.5)
    fired = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    tt = torch.tensor([0, 1, 1, 2])
    hidden = torch.arange(4 * H, dtype=torch.float32).reshape(4, H)
    rec.update(fired, tt, hidden)
    assert rec.step.item() == 1
    assert rec.total_counts.tolist() == [2, 1, 0, 0]
    assert rec.window_type_counts[1].tolist() == [1, 1, 0, 0]
    assert rec.total_type_tokens.tolist() == [1, 2, 1, 0]
    assert rec.total_type_unrouted.tolist() == [0, 1, 1, 0]
    assert rec.total_unrouted_count.item() == 2
    torch.testing.assert_close(rec.total_unrouted_sum, (hidden[2] + hidden[3]).double())
    assert rec.last_active_step.tolist() == [1, 1, 0, 0]
    torch.testing.assert_close(
        rec.unrouted_mean(), torch.nn.functional.normalize(hidden[2] + hidden[3], dim=0).double()
    )
    assert rec.unrouted_fraction().item() == 0.5
    # first observation of a type: A_t = its batch rate; absent types stay 0
    torch.testing.assert_close(rec.type_rate[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert rec.type_rate[3].abs().sum() == 0

    fired2 = torch.tensor([[0, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    rec.update(fired2, torch.tensor([1, 1]), hidden[:2])
    assert rec.last_active_step.tolist() == [1, 2, 2, 0]
    # EMA with decay 0.5 for the present type; type 0 and 2 unchanged
    torch.testing.assert_close(
        rec.type_rate[1], 0.5 * torch.tensor([0.5, 0.5, 0.0, 0.0]) + 0.5 * torch.tensor([0, 0.5, 1, 0])
    )
    torch.testing.assert_close(rec.type_rate[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(rec.window_rates(), torch.tensor([2, 2, 2, 0], dtype=torch.float64) / 6)


def test_reset_window_keeps_totals():
    rec = RoutingRecords(E, H)
    fired = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    rec.update(fired, torch.tensor([0, 0]), torch.ones(2, H))
    rec.reset_window()
    assert rec.window_counts.sum() == 0 and rec.window_unrouted_count == 0 and rec.window_type_tokens.sum() == 0
    assert rec.window_start_step.item() == 1
    assert rec.total_counts.tolist() == [1, 0, 0, 0] and rec.total_unrouted_count.item() == 1
    rec.update(fired, torch.tensor([0, 0]), torch.ones(2, H))
    assert rec.window_counts.tolist() == [1, 0, 0, 0] and rec.total_counts.tolist() == [2, 0, 0, 0]
    rec.reset_expert(0)
    assert rec.window_counts[0] == 0 and rec.type_rate[:, 0].abs().sum() == 0 and rec.last_active_step[0] == 2
    assert rec.total_counts[0] == 2


def test_records_round_trip_through_state_dict():
    rec = RoutingRecords(E, H)
    rec.update(torch.rand(5, E) > 0.5, torch.randint(0, 4, (5,)), torch.randn(5, H))
    sd = rec.state_dict()
    assert {"step", "type_rate", "last_active_step", "total_unrouted_sum", "window_counts"} <= set(sd)
    fresh = RoutingRecords(E, H)
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_bad_arguments():
    with pytest.raises(ValueError, match="rate_decay"):
        RoutingRecords(E, H, rate_decay=1.5)
    with pytest.raises(ValueError, match="hidden has size 5"):
        RoutingRecords(E, H).update(
            torch.zeros(2, E, dtype=torch.bool), torch.zeros(2, dtype=torch.long), torch.zeros(2, 5)
        )


# ---------------------------------------------------------------- multi-process
STEPS = 3
WORLD = 4
HID = 8


def _cfg() -> RouterConfig:
    return RouterConfig(num_experts=5, num_initial_experts=4, threshold_init=0.05, alpha=1.0, rate_decay=0.8)


def _rank_data(step: int, rank: int):
    """Different data, and a different number of tokens, on every rank and step."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    t = 5 + 3 * rank + step
    return torch.randn(t, HID, generator=g), torch.randint(0, 4, (t,), generator=g)


def _distributed_records(steps: int):
    rank = dist.get_rank()
    torch.manual_seed(0)  # identical router weights on every rank
    router = _cfg().build(HID, group=dist.group.WORLD).train()
    rates_used, maps = [], []
    for step in range(steps):
        x, tt = _rank_data(step, rank)
        rates_used.append(router.records.type_rate.clone())
        maps.append(router(x, tt).routing_map)
    # numpy, not tensors: torch would send tensors through shared memory that dies with this process
    return {
        "records": {k: v.numpy() for k, v in router.records.state_dict().items()},
        "rates_used": [r.numpy() for r in rates_used],
        "maps": [m.numpy() for m in maps],
    }


def test_records_are_identical_on_every_rank_and_equal_the_single_process_ones():
    raw = run_distributed(_distributed_records, world_size=WORLD, args=(STEPS,), timeout=120)
    results = [
        {
            "records": {k: torch.from_numpy(v) for k, v in r["records"].items()},
            "rates_used": [torch.from_numpy(a) for a in r["rates_used"]],
            "maps": [torch.from_numpy(m) for m in r["maps"]],
        }
        for r in raw
    ]

    torch.manual_seed(0)
    ref = _cfg().build(HID).train()  # group None: no reduction
    ref_rates = []
    for step in range(STEPS):
        data = [_rank_data(step, r) for r in range(WORLD)]
        x = torch.cat([d[0] for d in data])
        tt = torch.cat([d[1] for d in data])
        ref_rates.append(ref.records.type_rate.clone())
        ref_map = ref(x, tt).routing_map
        # every rank routed its tokens exactly as one process routes the concatenation
        torch.testing.assert_close(torch.cat([res["maps"][step] for res in results]), ref_map, rtol=0, atol=0)
    ref_sd = ref.records.state_dict()

    assert ref.records.total_unrouted_count > 0, "the example must have unrouted tokens"
    assert ref.records.step.item() == STEPS
    first = results[0]["records"]
    for rank, res in enumerate(results):
        for k, v in res["records"].items():
            assert torch.equal(v, first[k]), f"rank {rank} differs from rank 0 in {k}"
            if "unrouted_sum" in k:  # float64 sums of a different grouping: equal to rounding
                torch.testing.assert_close(v, ref_sd[k], rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(v, ref_sd[k]), f"rank {rank} differs from the single-process records in {k}"
        for step in range(STEPS):
            assert torch.equal(res["rates_used"][step], results[0]["rates_used"][step])
            assert torch.equal(res["rates_used"][step], ref_rates[step])
    # A_t moved during the run, so the identity above is not the trivial all-zero one
    assert results[0]["rates_used"][-1].abs().sum() > 0
