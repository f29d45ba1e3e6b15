"""Routing records: single-process bookkeeping (accumulate during a step, apply once in finish_step)
and the once-per-step global reduction over 4 gloo ranks."""

import pytest
import torch
import torch.distributed as dist

from megatron_timeexpert.moe.records import RoutingRecords
from megatron_timeexpert.moe.router import RouterConfig
from parallel.testing import run_distributed

E, H = 4, 6


def test_finish_step_counts_types_unrouted_and_last_active():
    """Counts, per-type counts, R_S, R_E and the first A_t are applied exactly at finish_step."""
    rec = RoutingRecords(E, H, rate_decay=0.5)
    fired = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    tt = torch.tensor([0, 1, 1, 2])
    hidden = torch.arange(4 * H, dtype=torch.float32).reshape(4, H)
    rec.accumulate(fired, tt, hidden)
    # accumulate changes no record (only the local pending sums)
    for k, v in rec.state_dict().items():
        assert v.abs().sum() == 0, k
    assert rec.pending.abs().sum() > 0
    rec.finish_step()
    assert rec.pending.abs().sum() == 0
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
    rec.accumulate(fired2, torch.tensor([1, 1]), hidden[:2])
    rec.finish_step()
    assert rec.last_active_step.tolist() == [1, 2, 2, 0]
    # EMA with decay 0.5 for the present type; type 0 and 2 unchanged
    torch.testing.assert_close(
        rec.type_rate[1], 0.5 * torch.tensor([0.5, 0.5, 0.0, 0.0]) + 0.5 * torch.tensor([0, 0.5, 1, 0])
    )
    torch.testing.assert_close(rec.type_rate[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(rec.window_rates(), torch.tensor([2, 2, 2, 0], dtype=torch.float64) / 6)


def test_a_step_of_several_forwards_is_one_update_of_their_concatenation():
    """However a step's tokens are split into forwards (microbatches), finish_step applies ONE update
    (one EMA step of A_t, one step of R_E) from their combined counts: the same records as one
    forward over all of them."""
    g = torch.Generator().manual_seed(3)
    split, whole = RoutingRecords(E, H, rate_decay=0.7), RoutingRecords(E, H, rate_decay=0.7)
    for step in range(3):
        fired = torch.rand(12, E, generator=g) > 0.6
        tt = torch.randint(0, 4, (12,), generator=g)
        hidden = torch.randn(12, H, generator=g)
        for part in (slice(0, 2), slice(2, 7), slice(7, 12)):
            split.accumulate(fired[part], tt[part], hidden[part])
        whole.accumulate(fired, tt, hidden)
        rate_before = split.type_rate.clone()
        split.finish_step()
        whole.finish_step()
        assert split.step.item() == step + 1
        for k, v in whole.state_dict().items():
            torch.testing.assert_close(split.state_dict()[k], v, rtol=1e-12, atol=1e-12, msg=k)
    # the last step's EMA, by hand from the last batch alone
    onehot = torch.nn.functional.one_hot(tt, 4).double()
    batch_rate = ((onehot.t() @ fired.double()) / onehot.sum(0).clamp(min=1).unsqueeze(1)).float()
    present = onehot.sum(0) > 0
    expected = torch.where(present.unsqueeze(1), 0.7 * rate_before + 0.3 * batch_rate, rate_before)
    torch.testing.assert_close(split.type_rate, expected)


def test_reset_window_keeps_totals():
    rec = RoutingRecords(E, H)
    fired = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    rec.accumulate(fired, torch.tensor([0, 0]), torch.ones(2, H))
    rec.finish_step()
    rec.reset_window()
    assert rec.window_counts.sum() == 0 and rec.window_unrouted_count == 0 and rec.window_type_tokens.sum() == 0
    assert rec.window_start_step.item() == 1
    assert rec.total_counts.tolist() == [1, 0, 0, 0] and rec.total_unrouted_count.item() == 1
    rec.accumulate(fired, torch.tensor([0, 0]), torch.ones(2, H))
    rec.finish_step()
    assert rec.window_counts.tolist() == [1, 0, 0, 0] and rec.total_counts.tolist() == [2, 0, 0, 0]
    rec.reset_expert(0)
    assert rec.window_counts[0] == 0 and rec.type_rate[:, 0].abs().sum() == 0 and rec.last_active_step[0] == 2
    assert rec.total_counts[0] == 2


def test_records_round_trip_through_state_dict():
    rec = RoutingRecords(E, H)
    rec.accumulate(torch.rand(5, E) > 0.5, torch.randint(0, 4, (5,)), torch.randn(5, H))
    rec.finish_step()
    sd = rec.state_dict()
    assert {"step", "type_rate", "last_active_step", "total_unrouted_sum", "window_counts"} <= set(sd)
    assert "pending" not in sd  # per-step scratch, zero between steps
    fresh = RoutingRecords(E, H)
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_bad_arguments():
    with pytest.raises(ValueError, match="rate_decay"):
        RoutingRecords(E, H, rate_decay=1.5)
    with pytest.raises(ValueError, match="hidden has size 5"):
        RoutingRecords(E, H).accumulate(
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
    """Each rank routes its tokens of a step in ``rank + 1`` forwards (a layout-dependent number of
    microbatches), then every rank calls finish_step once."""
    rank = dist.get_rank()
    torch.manual_seed(0)  # identical router weights on every rank
    router = _cfg().build(HID, group=dist.group.WORLD).train()
    rates_used, maps, unchanged_in_step, pending_is_local = [], [], [], []
    for step in range(steps):
        x, tt = _rank_data(step, rank)
        before = {k: v.clone() for k, v in router.records.state_dict().items()}
        step_rates, step_maps = [], []
        for xs, ts in zip(x.tensor_split(rank + 1), tt.tensor_split(rank + 1)):
            step_rates.append(router.records.type_rate.clone())
            step_maps.append(router(xs, ts).routing_map)
        rates_used.append([r.numpy() for r in step_rates])
        maps.append(torch.cat(step_maps).numpy())
        unchanged_in_step.append(all(torch.equal(v, before[k]) for k, v in router.records.state_dict().items()))
        local = router.records.local_contribution(torch.cat(step_maps), tt, x)
        pending_is_local.append(bool(torch.allclose(router.records.pending, local, rtol=1e-12, atol=1e-12)))
        router.finish_step()
    # numpy, not tensors: torch would send tensors through shared memory that dies with this process
    return {
        "records": {k: v.numpy() for k, v in router.records.state_dict().items()},
        "rates_used": rates_used,
        "maps": maps,
        "unchanged_in_step": unchanged_in_step,
        "pending_is_local": pending_is_local,
    }


def test_records_are_identical_on_every_rank_and_equal_the_single_process_ones():
    """Forwards communicate nothing and change no record (ranks run different numbers of forwards per
    step, and each rank's pending sums are its own tokens'); after each finish_step every rank holds
    the records one process gets from the concatenated data of all ranks, and every forward of a
    step routes with the A_t of the start of the step, exactly as that process does."""
    raw = run_distributed(_distributed_records, world_size=WORLD, args=(STEPS,), timeout=120)
    results = [
        {
            "records": {k: torch.from_numpy(v) for k, v in r["records"].items()},
            "rates_used": [[torch.from_numpy(a) for a in step] for step in r["rates_used"]],
            "maps": [torch.from_numpy(m) for m in r["maps"]],
        }
        for r in raw
    ]
    for rank, r in enumerate(raw):
        assert all(r["unchanged_in_step"]), f"rank {rank}: a forward changed the records"
        assert all(r["pending_is_local"]), f"rank {rank}: pending sums are not this rank's own tokens"

    torch.manual_seed(0)
    ref = _cfg().build(HID).train()  # group None: no reduction
    ref_rates = []
    for step in range(STEPS):
        data = [_rank_data(step, r) for r in range(WORLD)]
        x = torch.cat([d[0] for d in data])
        tt = torch.cat([d[1] for d in data])
        ref_rates.append(ref.records.type_rate.clone())
        ref_map = ref(x, tt).routing_map
        ref.finish_step()
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
            assert len(res["rates_used"][step]) == rank + 1
            for used in res["rates_used"][step]:  # every forward of the step: the start-of-step A_t
                assert torch.equal(used, ref_rates[step])
    # A_t moved during the run, so the identity above is not the trivial all-zero one
    assert results[0]["rates_used"][-1][0].abs().sum() > 0
