"""Expert migration (parallel/migration.py, train/expert_moves.py): every tensor keyed to a slot
moves with its expert, in one exchange per layer, and a training run that moves experts between
ranks every few steps gives the same losses, grad norms and state (by logical expert) as one that
never does: placement invariance (DESIGN.md), with megatron's plain optimizer in fp32.

Run: ``pytest -q tests/test_migration.py`` (about 1.5 minutes on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.migration import migrate_slots
from parallel.testing import run_distributed
from tests.dist_runs import from_checkpoint, init_checkpoint, mismatches, train_checked

SLOTS = 3


def _slot_rows(rank: int, ep: int) -> list[torch.Tensor]:
    """Three slot tensors of different dtypes whose rows name (rank, slot) of their first home."""
    base = torch.arange(SLOTS) + 100 * rank
    return [
        base.float().view(SLOTS, 1).expand(SLOTS, 5).contiguous(),
        base.double().view(SLOTS, 1, 1).expand(SLOTS, 2, 3).contiguous() * -1,
        base.to(torch.bfloat16).view(SLOTS, 1).expand(SLOTS, 4).contiguous(),
    ]


def _migrate_random_maps(seeds: tuple[int, ...]) -> list[dict]:
    return [_migrate_once(seed) for seed in seeds]


def _migrate_once(seed: int) -> dict:
    rank, ep = dist.get_rank(), dist.get_world_size()
    e = ep * SLOTS
    g = torch.Generator().manual_seed(seed)
    old, new = torch.randperm(e, generator=g), torch.randperm(e, generator=g)
    tensors = _slot_rows(rank, ep)
    stats = migrate_slots(old, new, tensors, SLOTS, dist.group.WORLD)
    # Where each logical expert's rows must be now: slot new[e] holds what slot old[e] held.
    inv_new = torch.empty_like(new)
    inv_new[new] = torch.arange(e)
    expected_origin = [int(old[inv_new[rank * SLOTS + s]]) for s in range(SLOTS)]
    got_origin = [int(tensors[0][s, 0]) // 100 * SLOTS + int(tensors[0][s, 0]) % 100 for s in range(SLOTS)]
    consistent = all(
        float(tensors[1][s, 0, 0]) == -float(tensors[0][s, 0]) and float(tensors[2][s, 0]) == float(tensors[0][s, 0])
        for s in range(SLOTS)
    )
    return {"expected": expected_origin, "got": got_origin, "consistent": consistent, "stats": vars(stats)}


@pytest.mark.parametrize("ep", [1, 2, 3])
def test_rows_of_every_slot_tensor_follow_their_expert(ep):
    per_rank = run_distributed(_migrate_random_maps, ep, args=((0, 1, 2),), timeout=60)
    for res in zip(*per_rank):  # one seed: every rank's result
        row_bytes = 5 * 4 + 6 * 8 + 4 * 2
        for r in res:
            assert r["got"] == r["expected"] and r["consistent"], r
            assert r["stats"]["bytes_per_expert"] == row_bytes
        # Bytes moved = rows of the experts that changed rank, no more.
        assert sum(r["stats"]["bytes_sent"] for r in res) == res[0]["stats"]["remote_experts"] * row_bytes
        assert sum(r["stats"]["bytes_received"] for r in res) == res[0]["stats"]["remote_experts"] * row_bytes


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match="new_map must be a permutation"):
        migrate_slots(torch.arange(3), torch.tensor([0, 0, 1]), [torch.zeros(3, 2)], 3, None)


# --- placement invariance of the training loop --------------------------------------------------

STEPS = 6
RUN = (
    "moe.router=timeexpert",
    "moe.aux_loss_coeff=0.01",
    "moe.z_loss_coeff=0.001",
    "training.lr_warmup_steps=0",
    "training.clip_grad=0.3",
)
MAP = "placement.logical_to_physical"
# bf16 runs: relative tolerance on losses and on grad norms, measured on two CPU machines (the max
# over 6 steps of the moving-vs-still run): losses 1.5e-4 and 1.7e-4, grad norms 1.3e-3 and 3.3e-3.
# The twin that leaves the fp32 main copies behind is off by >= 8.4e-3 (losses) and >= 2.0e-2 (grad
# norms) from step 4 on both, so each bound sits between the two with a factor >= 2 on either side.
BF16_RTOL = 2e-3
BF16_GRAD_RTOL = 1e-2
STATE = ("",)  # every state tensor (bf16 runs compare losses and grad norms)


def _rotate_every_two_steps(trainer) -> None:
    """After steps 2 and 4, move every expert of every MoE layer by one and two slots (so experts
    change EP rank), with weights and Adam state; record the bytes moved."""
    from megatron_timeexpert.train.expert_moves import install_placement, slot_tensors
    from megatron_timeexpert.train.pretrain import _moe_layers

    if trainer.state.step not in (2, 4):
        return
    shift = 1 if trainer.state.step == 2 else 2  # 3 in all: never back to the identity for E = 4
    for model in trainer.models:
        for layer in _moe_layers(model):
            e = layer.placement.num_slots
            new_map = (layer.placement.logical_to_physical + shift) % e
            expected_row = sum(t[0].numel() * t.element_size() for t in slot_tensors(layer, trainer.optimizer))
            stats = install_placement(layer, trainer.optimizer, new_map)
            assert stats.bytes_per_expert == expected_row
            # weights w1, w2, both Adam moments of each and the per-slot Adam step base: 7 slot tensors;
            # bf16: also the fp32 main copies of w1 and w2
            expected = 9 if trainer.cfg.training.precision == "bf16" else 7
            assert len(slot_tensors(layer, trainer.optimizer)) == expected


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory.mktemp("init"), *RUN)


@pytest.mark.slow
@pytest.mark.parametrize("ep,precision", [(2, "fp32"), (4, "fp32"), (2, "bf16")])
def test_placement_invariance_with_migration(ep, precision, init_ckpt, tmp_path):
    """Migrating every two steps changes no loss, grad norm or (logical) state beyond reordering.
    bf16: the plain bf16 optimizer; the fp32 main copy of every slot moves too (8 slot tensors)."""
    run = (*RUN, f"training.precision={precision}")
    still = train_checked(from_checkpoint(tmp_path / "still", init_ckpt, 1, 1, ep, STEPS, *run), ep)
    moving = train_checked(
        from_checkpoint(tmp_path / "moving", init_ckpt, 1, 1, ep, STEPS, *run), ep, after_build=_add_rotation
    )
    if precision == "bf16":
        # bf16 partial sums of the experts a rank holds round differently once the experts are
        # grouped differently, and a threshold router turns that into a few flipped routing
        # decisions (how many depends on the CPU's bf16 kernels; BF16_RTOL's comment has the
        # numbers). A migration that leaves the fp32 main copies behind fails both bounds (twin below).
        assert mismatches(moving, still, rtol=BF16_RTOL, ignore=STATE, grad_rtol=BF16_GRAD_RTOL) == []
        return
    assert mismatches(moving, still, rtol=2e-5, ignore=(MAP,)) == []
    assert any(MAP in b for b in mismatches(moving, still, rtol=2e-5)), "the placement never changed"


def _add_rotation(trainer) -> None:
    trainer.step_hooks.append(_rotate_every_two_steps)


def _rotation_without_adam_state(trainer) -> None:
    """Twin: move the weights but leave the optimizer state in place (a migration that forgets it)."""
    from megatron_timeexpert.train.pretrain import _moe_layers
    from parallel.migration import migrate_slots as move

    def hook(tr):
        if tr.state.step != 2:
            return
        for model in tr.models:
            for layer in _moe_layers(model):
                new_map = (layer.placement.logical_to_physical + 1) % layer.placement.num_slots
                weights = [p.data for p in layer.experts.parameters()]
                move(
                    layer.placement.logical_to_physical,
                    new_map,
                    weights,
                    layer.placement.slots_per_rank,
                    layer.ep_group,
                )
                layer.placement.set_map(new_map)

    trainer.step_hooks.append(hook)


@pytest.mark.slow
def test_placement_comparison_catches_forgotten_optimizer_state(init_ckpt, tmp_path):
    still = train_checked(from_checkpoint(tmp_path / "still", init_ckpt, 1, 1, 2, STEPS, *RUN), 2)
    bad = train_checked(
        from_checkpoint(tmp_path / "bad", init_ckpt, 1, 1, 2, STEPS, *RUN), 2, after_build=_rotation_without_adam_state
    )
    assert mismatches(bad, still, rtol=2e-5, ignore=(MAP,))


def _rotation_without_main_copies(trainer) -> None:
    """bf16 twin: migrate weights, Adam moments and per-slot steps but not the fp32 main copies."""
    from megatron_timeexpert.train import expert_moves
    from megatron_timeexpert.train.pretrain import _moe_layers

    def hook(tr):
        if tr.state.step not in (2, 4):
            return
        shift = 1 if tr.state.step == 2 else 2
        for model in tr.models:
            for layer in _moe_layers(model):
                mains = {
                    expert_moves._main_param(sub, p).data_ptr()
                    for sub in expert_moves._sub_optimizers(tr.optimizer)
                    for p in layer.experts.parameters()
                }
                mains -= {p.data_ptr() for p in layer.experts.parameters()}
                assert mains, "no fp32 main copies found: not a bf16 run"
                tensors = [t for t in expert_moves.slot_tensors(layer, tr.optimizer) if t.data_ptr() not in mains]
                new_map = (layer.placement.logical_to_physical + shift) % layer.placement.num_slots
                place = layer.placement
                migrate_slots(place.logical_to_physical, new_map, tensors, place.slots_per_rank, layer.ep_group)
                place.set_map(new_map)

    trainer.step_hooks.append(hook)


@pytest.mark.slow
def test_bf16_comparison_catches_main_copies_left_behind(init_ckpt, tmp_path):
    run = (*RUN, "training.precision=bf16")
    still = train_checked(from_checkpoint(tmp_path / "still", init_ckpt, 1, 1, 2, STEPS, *run), 2)
    bad = train_checked(
        from_checkpoint(tmp_path / "bad", init_ckpt, 1, 1, 2, STEPS, *run), 2, after_build=_rotation_without_main_copies
    )
    bad_steps = mismatches(bad, still, rtol=BF16_RTOL, ignore=STATE, grad_rtol=BF16_GRAD_RTOL)
    assert any("loss" in b for b in bad_steps) and any("grad norm" in b for b in bad_steps), bad_steps
