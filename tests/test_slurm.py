"""The real batch script (launch/pretrain_multinode.sbatch) against a real SLURM on localhost.

A session-scoped cluster (tests/slurm_harness.py: slurmctld + two slurmd emulating nodes n1, n2 with 2
CPUs each) runs three jobs of the tiny TimeExpert recipe at TP=2 PP=2 EP=2 on 2 nodes x 2 tasks:
1. a fresh run of 2 steps: COMPLETED, ranks on both nodes, a complete checkpoint;
2. a second submission of the same run: resumes at step 2 and continues to step 4;
3. a third submission, sent SIGUSR1 through the batch shell (as ``--signal=B:USR1@120`` does)
   mid-run: it stops after an agreed step and writes a complete checkpoint; the script requeues the
   job, and the requeued run resumes from that checkpoint and COMPLETES.
Skipped only when the SLURM binaries are absent (.ci/run installs them).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from megatron_timeexpert.train.checkpoint import MARKER, latest_checkpoint
from parallel.testing import free_port
from tests.slurm_harness import LocalSlurm, missing_binaries

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "launch/pretrain_multinode.sbatch"
JOB_TIMEOUT_S = 240
# The script's GPU/partition/time lines are for a GPU cluster; a CPU user overrides them like this.
CPU_ALLOCATION = [
    "--partition=debug",
    "--nodes=2",
    "--ntasks-per-node=2",
    "--gpus-per-node=0",
    "--cpus-per-task=1",
    "--time=10",
]
RECIPE_OVERRIDES = [
    "logging.wandb=false",
    "logging.tensorboard=false",
    "logging.log_interval=1",
    "parallel.collective_timeout_s=120",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"SLURM binaries missing: {missing_binaries()}"),
]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


class Run:
    """One RUN_NAME under a temp RUNS_ROOT: submits the batch script and reads what a job left."""

    def __init__(self, slurm: LocalSlurm, runs_root: Path, name: str = "tiny"):
        self.slurm, self.root, self.name = slurm, runs_root, name

    @property
    def ckpt_dir(self) -> Path:
        return self.root / self.name / "checkpoints"

    def log_dir(self, job: int) -> Path:
        return self.root / self.name / "logs" / f"job-{job}.0"

    def submit(self, *overrides: str, **env: str) -> int:
        # A free MASTER_PORT: the script's default (20000 + job id) would collide between two local
        # clusters that both number their jobs from 1.
        exports = {"RUNS_ROOT": str(self.root), "RUN_NAME": self.name, "PYTHONWARNINGS": "ignore"}
        exports.update(MASTER_PORT=str(free_port()), **env)
        export = "ALL," + ",".join(f"{k}={v}" for k, v in exports.items())
        out = str(self.root / "slurm-%j.out")
        args = [*CPU_ALLOCATION, f"--output={out}", f"--export={export}", SCRIPT, *RECIPE_OVERRIDES, *overrides]
        return self.slurm.sbatch(args, cwd=ROOT)

    def wait(self, job: int) -> dict[str, str]:
        info = self.slurm.wait(job, JOB_TIMEOUT_S)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), self.report(job, info)
        return info

    def rank_logs(self, job: int) -> dict[int, str]:
        return {int(p.stem.split("-")[1]): p.read_text() for p in self.log_dir(job).glob("rank-*.log")}

    def steps(self, job: int) -> list[int]:
        lines = (self.log_dir(job) / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["step"] for line in lines if line.strip()]

    def report(self, job: int, info: dict[str, str]) -> str:
        out = self.root / f"slurm-{job}.out"
        text = [f"job {job}: {info.get('JobState')} {info.get('ExitCode')}"]
        text.append(out.read_text() if out.exists() else "(no batch output)")
        for rank, log in sorted(self.rank_logs(job).items()):
            text.append(f"--- rank {rank} ---\n" + "\n".join(log.splitlines()[-15:]))
        return "\n".join(text) + "\n" + self.slurm.daemon_logs(10)


@pytest.fixture(scope="module")
def run(slurm, tmp_path_factory):
    return Run(slurm, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def first_job(run):
    job = run.submit("training.train_steps=2")
    return job, run.wait(job)


def test_batch_script_runs_on_both_nodes_and_checkpoints(run, first_job):
    job, info = first_job
    logs = run.rank_logs(job)
    assert sorted(logs) == [0, 1, 2, 3], run.report(job, info)
    nodes = {r: re.search(r"on node (\S+)", text).group(1) for r, text in logs.items()}
    assert sorted(set(nodes.values())) == ["n1", "n2"], nodes
    assert "slurm launch, world 4" in logs[0], "rank 0 must find its rank through SLURM's variables"
    assert "world=4 tp=2 pp=2 ep=2" in logs[0]
    assert run.steps(job) == [1, 2]
    ckpt = latest_checkpoint(run.ckpt_dir)
    assert ckpt is not None and ckpt.name == "iter_0000002" and (ckpt / MARKER).is_file()


def test_resubmission_resumes(run, first_job):
    job = run.submit("training.train_steps=4")
    run.wait(job)
    assert "loaded checkpoint" in run.rank_logs(job)[0] and "(step 2)" in run.rank_logs(job)[0]
    assert run.steps(job) == [3, 4], "the step counter continues from the checkpoint"
    assert latest_checkpoint(run.ckpt_dir).name == "iter_0000004"


def test_preemption_signal_writes_checkpoint_and_the_requeued_job_resumes(run, first_job):
    start_step = int(latest_checkpoint(run.ckpt_dir).name.split("_")[1])
    end = start_step + 12  # enough steps left that the signal lands mid-run on a fast machine too
    job = run.submit(f"training.train_steps={end}")
    # Wait until it has trained a step of its own, then signal the batch shell as SLURM would.
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        path = run.log_dir(job) / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 1:
            break
        info = run.slurm.show_job(job)
        assert info["JobState"] in ("PENDING", "RUNNING"), run.report(job, info)
        assert time.monotonic() < deadline, run.report(job, info)
        time.sleep(0.2)
    run.slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])

    # The script checkpoints and requeues the job; SLURM holds a requeued job ~2 min (BeginTime),
    # which the test skips. Meanwhile the checkpoint of the step it stopped after is complete.
    info = run.slurm.wait(job, JOB_TIMEOUT_S, states={"PENDING", "COMPLETED", "FAILED", "CANCELLED"})
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", run.report(job, info)
    stopped = re.search(r"stopping after step (\d+)", run.rank_logs(job)[0])
    assert stopped, run.report(job, info)
    saved = int(stopped.group(1))
    assert start_step + 1 <= saved < end and run.steps(job)[-1] == saved
    ckpt = latest_checkpoint(run.ckpt_dir)
    assert ckpt.name == f"iter_{saved:07d}" and (ckpt / MARKER).is_file()
    run.slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])

    run.wait(job)
    batch_out = (run.root / f"slurm-{job}.out").read_text()
    assert "pre-emption signal received" in batch_out and "requeueing job" in batch_out, batch_out
    restarted = run.log_dir(job).with_name(f"job-{job}.1")
    assert f"loaded checkpoint {ckpt} (step {saved})" in (restarted / "rank-0.log").read_text()
    steps = [json.loads(line)["step"] for line in (restarted / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(saved + 1, end + 1)), "the requeued job continues from the checkpoint"
    assert latest_checkpoint(run.ckpt_dir).name == f"iter_{end:07d}"
