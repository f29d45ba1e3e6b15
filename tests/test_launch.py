"""Launch pieces that need no scheduler: layout fitting for smaller relaunches, launcher precedence,
the collective-timeout setting, the pre-emption flag agreed over ranks, and the scripts' syntax."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from launch.fit_layout import fit_overrides
from megatron_timeexpert.config import ConfigError, load_config
from parallel.env import discover
from parallel.testing import run_distributed

ROOT = Path(__file__).resolve().parent.parent


def test_fit_layout_shrinks_expert_parallelism_only_when_needed():
    cfg = load_config(ROOT / "configs/tiny_timeexpert.yaml", ["parallel.tp=1", "parallel.pp=1", "parallel.ep=4"])
    assert fit_overrides(cfg, 4) == []
    assert fit_overrides(cfg, 2) == ["parallel.ep=2"]
    assert fit_overrides(cfg, 1) == ["parallel.ep=1"]
    with pytest.raises(ConfigError, match="tp\\*pp"):
        fit_overrides(load_config(ROOT / "configs/tiny_timeexpert.yaml"), 2)  # TP2 x PP2 needs 4 ranks


def test_mpi_variables_win_over_the_batch_shells_slurm_ones():
    # mpirun inside an sbatch job: every rank inherits SLURM_PROCID=0 from the batch shell.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n[1-2]", "MASTER_ADDR": "10.0.0.1"}
    e = discover({**env, "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"})
    assert (e.rank, e.world_size, e.launcher, e.master_addr) == (3, 4, "mpi", "10.0.0.1")
    assert discover(env).launcher == "slurm"


def test_collective_timeout_is_a_validated_setting():
    cfg = load_config(ROOT / "configs/tiny_moe.yaml", ["parallel.collective_timeout_s=45"])
    assert cfg.parallel.collective_timeout_s == 45.0
    with pytest.raises(ConfigError, match="collective_timeout_s"):
        load_config(ROOT / "configs/tiny_moe.yaml", ["parallel.collective_timeout_s=0"]).validate(4)


def _guard_on_two_ranks() -> tuple:
    """Rank 1 alone gets SIGUSR1; then rank 0 diagnoses with every rank alive, and with a lost store."""
    import torch.distributed as dist

    from megatron_timeexpert.train.fault import StepGuard
    from parallel.testing import free_port

    guard = StepGuard(timeout_s=30).start()
    try:
        first = guard.should_stop(1)
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only one rank gets the pre-emption signal
        second = guard.should_stop(2)
        stop = (first, second, guard.stopped_at)
        if dist.get_rank() == 1:
            dist.barrier()  # keeps beating while rank 0 asks
            return stop, None, None
        alive = guard.unresponsive_ranks(step=7)
        guard._store_addr = ("127.0.0.1", free_port())  # a store whose host is gone
        gone = guard.unresponsive_ranks(step=7)
        dist.barrier()
        return stop, alive, gone
    finally:
        guard.close()


def test_step_guard_agrees_on_preemption_and_diagnoses_failures():
    (stop0, alive, gone), (stop1, _, _) = run_distributed(_guard_on_two_ranks, 2, timeout=120)
    assert stop0 == stop1 == (False, True, 2), "a signal on one rank stops every rank after the same step"
    assert "every rank still has a heartbeat" in alive, alive
    assert "is unreachable" in gone and "probably died" in gone, gone


def test_only_collective_failures_become_rank_failures():
    import torch.distributed as dist

    from megatron_timeexpert.train.fault import _is_comm_failure

    assert _is_comm_failure(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [1.2.3.4]:5"))
    assert _is_comm_failure(RuntimeError("Timed out waiting 8000ms for send operation to complete"))
    assert _is_comm_failure(dist.DistBackendError("NCCL error"))
    assert not _is_comm_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))


@pytest.mark.parametrize(
    "script",
    [
        "launch/slurm_pretrain.sh",
        "launch/pretrain_1node.sbatch",
        "launch/pretrain_multinode.sbatch",
        "launch/mpirun.sh",
    ],
)
def test_launch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True, timeout=30)
