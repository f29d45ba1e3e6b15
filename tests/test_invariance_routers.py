"""Layout invariance of the real pretraining loop with OUR MoE layer (``moe.router=timeexpert`` and
``moe.router=topk``) on gloo, and a TimeExpert training run at EP = 2.

Layout invariance (DESIGN.md): an init checkpoint written once by a single process at (TP,PP,EP) =
(1,1,1) with ``training.train_steps=0`` is loaded (``training.finetune=true``) into each layout,
which then trains 3 steps on the same data; the per-step losses must equal those of the
single-process run. The TimeExpert gate reads the per-type activation rates A_t, which are updated
once per optimizer step from the counts of the whole global batch (``finish_step``), so a layout
with one microbatch per rank (dp 2) and one with four (dp 1) route with the same A_t.

Switched off: ``moe.aux_loss_coeff=0`` (Switch load balancing for top-k, the task-concentration
term of eq. 9 for TimeExpert) and ``moe.z_loss_coeff=0``. Both are means over ONE rank's tokens of
ONE microbatch, so their values (and gradients) depend on how the global batch is cut into
microbatches and ranks by definition, not by a bug. The TimeExpert expert-norm term (λ2 Σ||w_g||²)
stays on: it does not depend on the tokens, so its mean over microbatches and ranks is the same in
every layout.

Tolerance: rtol 2e-5 on fp32 losses of ~5.5, as in tests/test_invariance.py. TP splits every matmul
into partial sums that are all-reduced and DP/microbatch splits regroup the per-token loss sums, so
results differ by reordered fp32 additions (~1e-7 relative per op); three Adam steps amplify that to
~1e-6. A layout bug (a wrong shard, a wrong expert in a slot, a missing all-reduce, per-microbatch
A_t) moves the loss by far more: with A_t updated after every microbatch (the old behaviour), the
TimeExpert run at (1,2,2) differs from the reference by 4e-4 relative already at step 1 (and the
expert checkpoint loaded at another EP size failed outright before the layer had its own
sharded_state_dict). The TimeExpert gate is a hard threshold (fires iff the margin is > 0), so a
token whose margin is within fp32 noise of 0 could fire differently in two layouts; the test also
asserts that the runs' routing agrees (same mean experts per token and type), so such a flip would
be reported as what it is.

Run: ``pytest -q tests/test_invariance_routers.py`` (about 75 s on 2 cores).
"""

from __future__ import annotations

import math

import pytest

from tests.dist_runs import from_checkpoint, init_checkpoint, tiny_config, train

pytestmark = pytest.mark.slow

STEPS = 3
RTOL = 2e-5
NUM_EXPERTS = 4  # configs/tiny_moe.yaml
TYPES = ("VISUAL", "TEXT", "TIME", "SCORE")


def _router_overrides(router: str) -> list[str]:
    return [f"moe.router={router}", "moe.aux_loss_coeff=0.0", "moe.z_loss_coeff=0.0"]


def _init_ckpt(tmp, router: str) -> str:
    """Random initial weights (and empty routing records) written by one process at (1,1,1)."""
    return init_checkpoint(tmp, f"moe.router={router}")


def _from_init(tmp, init_ckpt: str, router: str, tp: int, pp: int, ep: int):
    return from_checkpoint(tmp, init_ckpt, tp, pp, ep, STEPS, *_router_overrides(router), "logging.log_interval=1")


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per router, built on first use: (init checkpoint, the single-process run from it)."""
    cache: dict[str, tuple] = {}

    def get(router: str):
        if router not in cache:
            init = _init_ckpt(tmp_path_factory.mktemp(f"init-{router}"), router)
            cache[router] = init, train(_from_init(tmp_path_factory.mktemp(f"ref-{router}"), init, router, 1, 1, 1), 1)
        return cache[router]

    return get


# (2,2,2) for both routers; (1,2,2) in addition for TimeExpert, whose routing reads A_t: there dp = 2
# (one microbatch of 2 per rank and step) against dp = 1 with 4 microbatches in the reference.
LAYOUTS = {"timeexpert": [(2, 2, 2), (1, 2, 2)], "topk": [(2, 2, 2)]}
CASES = [(router, layout) for router, layouts in LAYOUTS.items() for layout in layouts]


@pytest.mark.parametrize("router,layout", CASES, ids=[f"{r}-tp{t[0]}-pp{t[1]}-ep{t[2]}" for r, t in CASES])
def test_layout_invariance_with_our_moe_layer(router, layout, references, tmp_path):
    """Same initial weights and data give the same per-step losses (and the same routing: mean
    experts per token, per type) at ``layout`` on 4 processes as on one process at (1,1,1)."""
    init, ref = references(router)
    run = train(_from_init(tmp_path, init, router, *layout), 4)
    assert len(run.losses) == len(ref.losses) == STEPS
    assert ref.losses[-1] < ref.losses[0], "the reference run does not learn"
    for step, (got, want) in enumerate(zip(run.losses, ref.losses)):
        assert math.isclose(got, want, rel_tol=RTOL), f"step {step}: {router} at {layout}: {got!r} != {want!r}"
    # The routing agrees, token type by token type (a hard-threshold flip would show here first).
    for step, (got, want) in enumerate(zip(run.metrics, ref.metrics)):
        for t in TYPES:
            key = f"moe/experts_per_token/{t}"
            assert math.isclose(got[key], want[key], rel_tol=1e-9, abs_tol=1e-9), (step, key, got[key], want[key])


def test_timeexpert_router_trains_at_ep2(tmp_path):
    """The pretraining loop with the TimeExpert router at (TP,PP,EP) = (1,1,2) on 2 processes, with
    the default task-dependent aux loss on, learns (the loss falls clearly within 10 steps) and rank
    0 logs the mean number of activated experts per token for every token type, within [0, E]."""
    cfg = tiny_config(tmp_path, 1, 1, 2, "moe.router=timeexpert", "training.train_steps=10", "logging.log_interval=1")
    assert cfg.moe.aux_loss_coeff > 0
    run = train(cfg, 2)
    assert len(run.losses) == 10 and all(math.isfinite(x) for x in run.losses)
    assert run.losses[-1] < run.losses[0] - 0.1, run.losses
    assert len(run.metrics) == 10
    for step, m in enumerate(run.metrics):
        for t in TYPES:
            k = m[f"moe/experts_per_token/{t}"]
            assert 0.0 <= k <= NUM_EXPERTS, (step, t, k)
        assert m["moe/loss/aux"] > 0, "the aux loss is not on"
    assert any(m["moe/experts_per_token/ALL"] > 0 for m in run.metrics), "no token fired any expert"
