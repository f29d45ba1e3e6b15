"""ExpertPlacement: the logical -> (rank, slot) map as a fixed-shape buffer (pure logic, no groups)."""

from __future__ import annotations

import pytest
import torch

from parallel.placement import ExpertPlacement


def test_default_map_is_contiguous():
    p = ExpertPlacement(ep_size=2, slots_per_rank=3)
    assert p.num_slots == 6
    assert p.expert_rank().tolist() == [0, 0, 0, 1, 1, 1]
    assert p.expert_slot().tolist() == [0, 1, 2, 0, 1, 2]
    assert p.local_experts(1) == [3, 4, 5]


def test_permuted_map_routes_through_the_map():
    perm = torch.tensor([5, 0, 3, 1, 4, 2])  # logical e lives in physical slot perm[e]
    p = ExpertPlacement(2, 3, perm)
    assert p.expert_rank().tolist() == [1, 0, 1, 0, 1, 0]
    assert p.expert_slot().tolist() == [2, 0, 0, 1, 1, 2]
    assert p.local_experts(0) == [1, 3, 5]
    assert p.local_experts(1) == [2, 4, 0]
    per_logical = torch.arange(6.0) * 10  # value 10*e for logical e
    phys = p.to_physical(per_logical).view(2, 3)
    assert phys.tolist() == [[10.0, 30.0, 50.0], [20.0, 40.0, 0.0]]


def test_swapping_the_map_keeps_the_buffer_and_its_shape():
    p = ExpertPlacement(2, 2)
    buf = p.logical_to_physical
    p.set_map(torch.tensor([3, 2, 1, 0]))
    assert p.logical_to_physical is buf and buf.tolist() == [3, 2, 1, 0]
    assert p.local_experts(0) == [3, 2]
    state = p.state_dict()
    assert state["logical_to_physical"].tolist() == [3, 2, 1, 0]  # checkpointed
    q = ExpertPlacement(2, 2)
    q.load_state_dict(state)
    assert q.local_experts(1) == [1, 0]


@pytest.mark.parametrize("bad", [[0, 0, 1, 2], [0, 1, 2], [0, 1, 2, 4]])
def test_rejects_maps_that_are_not_permutations(bad):
    p = ExpertPlacement(2, 2)
    with pytest.raises(ValueError):
        p.set_map(torch.tensor(bad))
    assert p.logical_to_physical.tolist() == [0, 1, 2, 3]
