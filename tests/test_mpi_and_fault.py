"""The MPI launch for real, and a job that survives a dead rank.

All runs are the CLI (``python -m megatron_timeexpert.cli pretrain``) in separate OS processes, on the
tiny TimeExpert recipe at TP=1 PP=1 EP=4 (DP=4) with 5 steps, one rank per process:

1. ``launch/mpirun.sh`` with ``mpirun -np 4 --oversubscribe --allow-run-as-root``: ranks come from
   Open MPI's variables. Its losses are the uninterrupted reference for the runs below.
2. The same job launched as 4 plain processes (what srun or a custom launcher does, with no torchrun
   agent killing the others), checkpointing every 2 steps; rank 2 SIGKILLs itself mid-step 3
   (fault injection). Every other rank must exit non-zero within the stated bound
   (``collective_timeout_s`` + the StepGuard's exit grace + its diagnosis window) with an error naming
   step 3 and rank 2.
3. Relaunch on 4 processes with ``--resume``: starts at step 2 and the losses of steps 3..5 equal the
   uninterrupted run's bit for bit.
4. Relaunch on 2 processes (EP 4 -> 2, expert slots re-spread two per rank) from the same step-2
   checkpoint: the expert set (active mask, placement map) is the one saved, the losses match the
   uninterrupted run to float tolerance (a different layout reorders sums) and keep falling.
5. A HUNG rank (SIGSTOP mid-step, 2 processes, timeout 8 s): its sockets stay open, so only the
   collective timeout ends the survivor's wait; the error still names the step and the rank.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from megatron_timeexpert.train.checkpoint import latest_checkpoint
from megatron_timeexpert.train.fault import KILL_AT_STEP_ENV
from parallel.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5
TIMEOUT_S = 20.0  # parallel.collective_timeout_s of these runs
BOUND_S = TIMEOUT_S + 15.0 + 5.0  # collective timeout + StepGuard's exit grace + slack for a loaded machine
RUN_LIMIT_S = 300


def _args(tmp: Path, *extra: str) -> list[str]:
    return [
        "--config",
        "configs/tiny_timeexpert.yaml",
        "parallel.tp=1",
        "parallel.pp=1",
        "parallel.ep=4",
        f"parallel.collective_timeout_s={TIMEOUT_S}",
        f"training.train_steps={STEPS}",
        "training.save_interval=0",  # only the final save; the killed run saves every 2 steps
        f"training.save_dir={tmp / 'ckpt'}",
        f"logging.run_dir={tmp / 'run'}",
        "logging.log_interval=1",
        "logging.wandb=false",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        *extra,
    ]


def _losses(tmp: Path) -> dict[int, float]:
    lines = (tmp / "run" / "metrics.jsonl").read_text().splitlines()
    return {d["step"]: d["loss"] for d in map(json.loads, filter(None, lines))}


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


@dataclass
class RankExit:
    rank: int
    code: int
    at_s: float
    """Seconds after the launch when the process was seen to end."""
    log: str
    end_wall: float
    """Wall-clock time (epoch s) when the process was seen to end."""


def launch_ranks(
    world: int, args: list[str], tmp: Path, env: dict[str, str] | None = None, wait_for: set[int] | None = None
) -> list[RankExit]:
    """Start ``world`` CLI processes joined through RANK/WORLD_SIZE (like srun: no agent that kills the
    others when one dies); wait for the ranks in ``wait_for`` (default all), then SIGKILL every process
    group still alive (also on RUN_LIMIT_S)."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs, logs = [], []
    t0 = time.monotonic()
    for r in range(world):
        renv = {**_base_env(), **(env or {})}
        renv.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(tmp / f"rank{r}.log", "wb")  # noqa: SIM115 - closed below
        cmd = [sys.executable, "-m", "megatron_timeexpert.cli", "pretrain", *args]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=renv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
        logs.append(log)
    ended: dict[int, float] = {}
    walls: dict[int, float] = {}
    wait_for = set(range(world)) if wait_for is None else wait_for
    try:
        while not wait_for <= set(ended):
            for r, p in enumerate(procs):
                if r not in ended and p.poll() is not None:
                    ended[r], walls[r] = time.monotonic() - t0, time.time()
            if time.monotonic() - t0 > RUN_LIMIT_S:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(ended))} still running after {RUN_LIMIT_S}s")
            time.sleep(0.1)
    finally:
        for r, p in enumerate(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
                ended[r], walls[r] = time.monotonic() - t0, time.time()
        for log in logs:
            log.close()
    return [
        RankExit(r, p.returncode, ended[r], (tmp / f"rank{r}.log").read_text(errors="replace"), walls[r])
        for r, p in enumerate(procs)
    ]


def _ok(exits: list[RankExit]) -> None:
    bad = [e for e in exits if e.code != 0]
    assert not bad, "\n".join(f"--- rank {e.rank} exit {e.code} ---\n{e.log[-3000:]}" for e in bad)


def _checkpoint_tensors(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """A megatron torch_dist checkpoint read back in one process (its DCP files), flattened."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    flat: dict[str, torch.Tensor] = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, torch.Tensor):
                flat[prefix + k] = v

    walk(torch.load(out, weights_only=False))
    return flat


@dataclass
class Reference:
    losses: dict[int, float]
    """Step -> loss of the uninterrupted run."""
    mpi_log: str | None
    """mpirun's output (None: launched as plain processes because mpirun is absent)."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """The uninterrupted run, launched through launch/mpirun.sh (falls back to plain processes only
    when mpirun is absent, so that the fault tests still run; the MPI test then skips)."""
    tmp = tmp_path_factory.mktemp("mpi")
    if shutil.which("mpirun") is None:
        _ok(launch_ranks(4, _args(tmp, "training.save_dir=null"), tmp))
        return Reference(_losses(tmp), None)
    env = {**_base_env(), "NP": "4", "MPIRUN_ARGS": "--oversubscribe --allow-run-as-root", "PYTHON": sys.executable}
    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run(
        ["bash", "launch/mpirun.sh", *_args(tmp, "training.save_dir=null")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT_S,
    )
    (tmp / "mpirun.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return Reference(_losses(tmp), proc.stdout + proc.stderr)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed (.ci/run installs it)")
def test_mpirun_launch(reference):
    log = reference.mpi_log
    assert "mpi launch, world 4" in log, "ranks must come from Open MPI's environment"
    assert f"timeexpert: finished {STEPS} steps" in log
    assert sorted(reference.losses) == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> tuple[Path, list[RankExit]]:
    tmp = tmp_path_factory.mktemp("killed")
    args = _args(tmp, "training.save_interval=2")
    return tmp, launch_ranks(4, args, tmp, env={KILL_AT_STEP_ENV: "2:3:0.02"})


@pytest.mark.slow
def test_dead_rank_ends_every_rank_with_an_error_naming_the_step(killed):
    tmp, exits = killed
    victim = exits[2]
    assert victim.code == -signal.SIGKILL, victim.log[-2000:]
    for e in exits:
        if e.rank == 2:
            continue
        assert e.code != 0, f"rank {e.rank} exited 0 after its peer died"
        waited = e.at_s - victim.at_s
        print(f"rank {e.rank} exited with {e.code} {waited:.1f}s after rank 2 was killed (bound {BOUND_S:.0f}s)")
        assert waited < BOUND_S, f"rank {e.rank} took {waited:.1f}s (> {BOUND_S:.0f}s) to notice the dead rank"
        assert "step 3 (training step) failed" in e.log, e.log[-3000:]
        assert "rank(s) [2] stopped responding" in e.log, e.log[-3000:]
    assert latest_checkpoint(tmp / "ckpt").name == "iter_0000002"


@pytest.mark.slow
def test_relaunch_resumes_exactly(killed, reference):
    tmp, _ = killed
    _ok(launch_ranks(4, [*_args(tmp), "--resume"], tmp))
    resumed = _losses(tmp)
    assert "(step 2)" in (tmp / "rank0.log").read_text()
    assert [resumed[s] for s in range(3, STEPS + 1)] == [reference.losses[s] for s in range(3, STEPS + 1)]


@pytest.mark.slow
def test_relaunch_on_fewer_ranks_keeps_experts_and_trains(killed, reference, tmp_path):
    src, _ = killed
    start = src / "ckpt" / "iter_0000002"  # the checkpoint the dead job left (also used above)
    args = [*_args(tmp_path), "parallel.ep=2", f"training.load_dir={start}"]
    exits = launch_ranks(2, args, tmp_path)
    _ok(exits)
    assert "world=2 tp=1 pp=1 ep=2" in exits[0].log and "(step 2)" in exits[0].log
    losses = _losses(tmp_path)
    assert sorted(losses) == list(range(3, STEPS + 1)), "the step counter continues from the checkpoint"
    for s in range(3, STEPS + 1):
        assert losses[s] == pytest.approx(reference.losses[s], rel=1e-4), (s, losses, reference.losses)
    assert losses[STEPS] < losses[3], losses
    before = _checkpoint_tensors(start, tmp_path)
    after = _checkpoint_tensors(latest_checkpoint(tmp_path / "ckpt"), tmp_path)
    keys = [k for k in before if k.endswith(("router.active", "placement.logical_to_physical"))]
    assert keys, sorted(before)[:20]
    for k in keys:
        assert torch.equal(before[k], after[k]), k


def _logged_at(log: str, needle: str) -> float:
    """Wall-clock time (epoch s, 1 s resolution) of the first log line containing ``needle``."""
    line = next(line for line in log.splitlines() if needle in line)
    h, m, sec = (int(x) for x in line.split()[0].split(":"))
    now = time.localtime()
    return time.mktime((now.tm_year, now.tm_mon, now.tm_mday, h, m, sec, 0, 0, -1))


@pytest.mark.slow
def test_hung_rank_is_bounded_by_the_collective_timeout(tmp_path):
    """A rank frozen mid-step (SIGSTOP: its connections stay open, so only the collective timeout can
    end the others' wait): the survivor fails after about the timeout, naming the step and the rank."""
    timeout_s = 8.0
    args = [*_args(tmp_path, "parallel.ep=2", f"parallel.collective_timeout_s={timeout_s}"), "training.save_dir=null"]
    exits = launch_ranks(2, args, tmp_path, env={KILL_AT_STEP_ENV: "1:2:0.02:STOP"}, wait_for={0})
    survivor, frozen = exits
    assert survivor.code != 0, survivor.log[-3000:]
    assert "step 2 (training step) failed" in survivor.log, survivor.log[-3000:]
    assert "rank(s) [1] stopped responding" in survivor.log, survivor.log[-3000:]
    waited = survivor.end_wall - _logged_at(frozen.log, "fault injection: SIGSTOP")
    bound = timeout_s + 15.0 + 5.0
    print(f"rank 0 exited with {survivor.code} {waited:.1f}s after rank 1 froze (timeout {timeout_s:.0f}s)")
    assert timeout_s - 1.5 <= waited < bound, f"waited {waited:.1f}s; expected the {timeout_s:.0f}s timeout to end it"
