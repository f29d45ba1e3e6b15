"""Rank and world discovery from the launcher's environment, and process-group start-up.

Supported launchers, tried in this order:
- torchrun (and ``parallel.testing.run_distributed``): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
- MPI: Open MPI (OMPI_COMM_WORLD_*), MPICH/Intel MPI/PMI (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID);
  MASTER_ADDR must be set (launch/mpirun.sh sets it). Before SLURM, because mpirun inside an sbatch
  job inherits the batch shell's SLURM_PROCID=0 in every rank.
- SLURM (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; master = first host of SLURM_JOB_NODELIST
  unless MASTER_ADDR is set (launch/slurm_pretrain.sh sets it to the first node's IP)
- nothing: a single process (rank 0 of 1).

``init_distributed`` joins the default group: NCCL when CUDA is present, gloo otherwise (one log
line says which). It is the only collective here.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500


class LaunchEnvError(RuntimeError):
    """The environment names a launcher but lacks a variable it needs; the message names it."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank, world size, rank on its node, rendezvous address."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def free_port() -> int:
    """An unused TCP port on localhost (the OS picks it; a tiny reuse race remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``node[03-05,07],gpu1`` -> ``node03``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LaunchEnvError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot parse a host name from it")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int(env: Mapping[str, str], key: str, launcher: str) -> int:
    if key not in env:
        raise LaunchEnvError(f"{launcher} launch detected but {key} is not set")
    try:
        return int(env[key])
    except ValueError:
        raise LaunchEnvError(f"{key}={env[key]!r} is not an integer ({launcher} launch)") from None


def discover(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables from ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            _int(env, "RANK", "torchrun"),
            _int(env, "WORLD_SIZE", "torchrun"),
            int(env.get("LOCAL_RANK", 0)),
            env.get("MASTER_ADDR", "127.0.0.1"),
            port,
            "torchrun",
        )
    # MPI before SLURM: mpirun inside an sbatch allocation inherits the batch shell's SLURM_PROCID=0
    # in every rank, while the MPI variables are per process.
    for rank_key, size_key, local_key, name in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "Open MPI"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI (PMI)"),
    ):
        if rank_key in env and size_key in env:
            if "MASTER_ADDR" not in env:
                raise LaunchEnvError(
                    f"{name} launch detected but MASTER_ADDR is not set: export MASTER_ADDR=<first host> "
                    f"(launch/mpirun.sh does this)"
                )
            return DistEnv(
                _int(env, rank_key, name),
                _int(env, size_key, name),
                int(env.get(local_key, 0)),
                env["MASTER_ADDR"],
                port,
                "mpi",
            )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR")
        if addr is None:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise LaunchEnvError("SLURM launch detected but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
            addr = first_slurm_host(nodelist)
        return DistEnv(
            _int(env, "SLURM_PROCID", "SLURM"),
            _int(env, "SLURM_NTASKS", "SLURM"),
            int(env.get("SLURM_LOCALID", 0)),
            addr,
            port,
            "slurm",
        )
    # One process has no peer to meet: without MASTER_PORT it takes a port the OS says is free, so two
    # single-process runs on one machine (a test beside a job) do not both claim DEFAULT_PORT.
    port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else free_port()
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def collective_device(group=None):
    """The ``torch.device`` a tensor must live on for a collective on ``group`` (default: the world):
    the current CUDA device under NCCL, which rejects CPU tensors, else the CPU (gloo, or no process
    group at all)."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(dist_env: DistEnv | None = None, timeout_s: float = 600.0) -> DistEnv:
    """Join the default process group (gloo on CPU, NCCL on GPU) unless already joined."""
    import datetime

    import torch
    import torch.distributed as dist

    dist_env = dist_env or discover()
    if dist.is_initialized():
        return dist_env
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(dist_env.local_rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=f"tcp://{dist_env.master_addr}:{dist_env.master_port}",
        rank=dist_env.rank,
        world_size=dist_env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    if dist_env.rank == 0:
        log.info("distributed: %s launch, world %d, backend %s", dist_env.launcher, dist_env.world_size, backend)
    return dist_env
