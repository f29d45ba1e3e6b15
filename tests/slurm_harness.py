"""A real SLURM cluster on localhost for tests: one ``slurmctld`` and two ``slurmd`` (emulated nodes).

    with LocalSlurm(tmp_dir) as slurm:              # or the session fixture in tests/test_slurm.py
        job = slurm.sbatch(["launch/pretrain_multinode.sbatch"], cwd=repo)
        info = slurm.wait(job, timeout=180)         # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}

It owns the daemons' whole life: it writes ``slurm.conf`` under a temp dir (its own ports, spool and
state folders, ``AuthType=auth/none`` + ``CredType=cred/none`` so no munge daemon, ``proctrack/pgid``,
``task/none``, no accounting), starts the daemons in the foreground as children, waits until both
nodes are idle, and stops every daemon it started by PID (SIGTERM, then SIGKILL) in ``stop()``, which
also runs from ``__exit__`` and on a failed start. Job state and exit code come from
``scontrol show job`` (``sacct`` would need accounting). Every wait here has a timeout.

Needs Debian's ``slurmctld``, ``slurmd`` and ``slurm-client`` (Slurm 22.05); :func:`missing_binaries`
says which are absent so callers can skip.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
NODES = ("n1", "n2")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL"}


def missing_binaries() -> list[str]:
    """The SLURM programs this harness needs that are not on PATH."""
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class LocalSlurm:
    """Controller plus two emulated nodes of ``cpus_per_node`` CPUs each, all under ``root``."""

    root: Path
    cpus_per_node: int = 2
    start_timeout_s: float = 60.0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment for client commands (and jobs): SLURM_CONF points at this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    # -- start / stop ---------------------------------------------------------------------------

    def write_conf(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "state").mkdir(exist_ok=True)
        for node in NODES:
            (self.root / f"spool-{node}").mkdir(exist_ok=True)
        self.ports = _free_ports(2 + len(NODES))
        host = socket.gethostname().split(".")[0]
        user = getpass.getuser()
        r = self.root
        lines = [
            "ClusterName=timeexpert-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ports[0]}",
            f"SlurmdPort={self.ports[1]}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/none",
            "CredType=cred/none",
            "ProctrackType=proctrack/pgid",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0",
            "SlurmdParameters=config_overrides",  # node CPUs below need not match `slurmd -C`
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=10",
            "InactiveLimit=0",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool-%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd-%n.log'}",
        ]
        for node, port in zip(NODES, self.ports[2:]):
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory=1000 State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> LocalSlurm:
        """Write the config, start the daemons and wait until both nodes are idle."""
        self.write_conf()
        try:
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            for node in NODES:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            deadline = time.monotonic() + self.start_timeout_s
            while True:
                out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=10).stdout
                states = dict(line.split() for line in out.splitlines() if line.strip())
                if all(states.get(n, "").startswith("idle") for n in NODES):
                    return self
                for name, p in self.procs.items():
                    if p.poll() is not None:
                        raise RuntimeError(f"{name} exited with {p.returncode} at start-up:\n{self.daemon_logs()}")
                if time.monotonic() > deadline:
                    waited = f"{self.start_timeout_s:.0f}s"
                    raise RuntimeError(f"nodes not idle after {waited}: {out!r}\n{self.daemon_logs()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def stop(self) -> None:
        """Stop every daemon this object started: SIGTERM by PID, SIGKILL after 10 s."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.procs.clear()

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def daemon_logs(self, tail: int = 30) -> str:
        out = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path.name} ---\n" + "\n".join(lines))
        return "\n".join(out)

    # -- client commands ------------------------------------------------------------------------

    def run(self, cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        env = self.env(kw.pop("env", None))
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=check, timeout=timeout, **kw)

    def sbatch(self, args: list[str], cwd: str | Path, env: dict[str, str] | None = None) -> int:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env).stdout.strip()
        return int(out.split(";")[0])

    def show_job(self, job: int) -> dict[str, str]:
        """``scontrol show job`` as a dict of its Key=Value fields."""
        out = self.run(["scontrol", "show", "job", "-o", str(job)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job: int, timeout: float, states: set[str] | None = None) -> dict[str, str]:
        """Poll until the job reaches one of ``states`` (default: any final state); its fields."""
        want = states or FINISHED
        deadline = time.monotonic() + timeout
        while True:
            info = self.show_job(job)
            if info.get("JobState") in want:
                return info
            if time.monotonic() > deadline:
                self.run(["scancel", str(job)], check=False)
                raise TimeoutError(f"job {job} still {info.get('JobState')} after {timeout:.0f}s: {info}")
            time.sleep(0.5)
