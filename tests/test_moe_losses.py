"""Router loss values on hand-computed examples (megatron_timeexpert/moe/losses.py)."""

import math

import pytest
import torch

from megatron_timeexpert.moe import losses as L


def _rates():
    # visual row has a history; text row has none (skipped); time/score unused.
    return torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_task_concentration_hand_value():
    gates = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    token_type = torch.tensor([0, 0, 1])  # two visual tokens, one text token
    active = torch.ones(3, dtype=torch.bool)
    # visual: p = [1/2, 1/4, 1/4], N = [2, 1, 0] -> q = [2/3, 1/3, 0]
    # sum (p - q)^2 = 1/36 + 1/144 + 1/16 = 14/144, weighted by the visual share 2/3; text has no history.
    expected = 14 / 144 * 2 / 3
    got = L.task_concentration_loss(gates, token_type, _rates(), active)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_task_concentration_ignores_inactive_experts():
    gates = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    token_type = torch.tensor([0, 0, 1])
    active = torch.tensor([True, True, False])
    # over experts {0, 1}: p = [2/3, 1/3] and q = [2/3, 1/3]: no loss
    assert L.task_concentration_loss(gates, token_type, _rates(), active).item() == pytest.approx(0.0, abs=1e-7)


def test_task_concentration_gradient_is_that_of_the_counts():
    d = torch.tensor([[0.3, 0.1, -0.2], [0.2, -0.1, -0.3]], requires_grad=True)
    fired = d.detach() > 0
    gates = L.straight_through_gates(fired, d)
    token_type = torch.tensor([0, 0])
    loss = L.task_concentration_loss(gates, token_type, _rates(), torch.ones(3, dtype=torch.bool))
    loss.backward()
    # dL/dN_e = 2w/S * ((q_e - p_e) - sum_j (q_j - p_j) q_j), w = 1, N = [2, 1, 0], S = 3; every token sees it
    p = torch.tensor([0.5, 0.25, 0.25])
    q = torch.tensor([2.0, 1.0, 0.0]) / 3
    dn = 2 / 3 * ((q - p) - ((q - p) * q).sum())
    torch.testing.assert_close(d.grad, dn.expand(2, 3))
    assert d.grad.abs().sum() > 0


def test_straight_through_forward_is_exact():
    d = torch.tensor([[0.3, -0.1, 1e-9, -1e-9]], requires_grad=True)
    g = L.straight_through_gates(d.detach() > 0, d)
    assert g.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    (g * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert d.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_expert_norm_loss_counts_active_rows_only():
    w = torch.tensor([[1.0, 2.0], [3.0, 0.0], [10.0, 10.0]], requires_grad=True)
    active = torch.tensor([True, True, False])
    loss = L.expert_norm_loss(w, active)
    assert loss.item() == pytest.approx(5.0 + 9.0)
    loss.backward()
    assert w.grad[2].abs().sum() == 0
    torch.testing.assert_close(w.grad[:2], 2 * w.detach()[:2])


def test_z_loss_hand_value():
    logits = torch.tensor([[0.0, 0.0, 50.0], [1.0, 2.0, -50.0]])
    active = torch.tensor([True, True, False])
    expected = (math.log(2.0) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert L.z_loss(logits, active).item() == pytest.approx(expected, rel=1e-6)


def test_switch_loss_hand_values():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    active = torch.ones(2, dtype=torch.bool)
    balanced = torch.tensor([[True, False], [False, True]])
    skewed = torch.tensor([[True, False], [True, False]])
    # f = [1/2, 1/2], P = [0.55, 0.45] -> 2 * (0.275 + 0.225) = 1.0
    assert L.switch_load_balancing_loss(probs, balanced, 1, active).item() == pytest.approx(1.0)
    # f = [1, 0] -> 2 * 0.55
    assert L.switch_load_balancing_loss(probs, skewed, 1, active).item() == pytest.approx(1.1)
