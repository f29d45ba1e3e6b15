"""Rank/world discovery from torchrun, SLURM and MPI environments."""

from __future__ import annotations

import pytest

from parallel.env import LaunchEnvError, discover, first_slurm_host


def test_torchrun():
    e = discover({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (
        3,
        8,
        1,
        "n0",
        1234,
        "torchrun",
    )


def test_slurm_master_from_nodelist():
    e = discover(
        {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08,11]"}
    )
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (5, 8, 1, "gpu07", "slurm")


@pytest.mark.parametrize("nodelist, host", [("node01", "node01"), ("a[3-5],b1", "a3"), ("x[10,12]", "x10")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_open_mpi_needs_master_addr():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}
    with pytest.raises(LaunchEnvError, match="MASTER_ADDR is not set"):
        discover(env)
    e = discover({**env, "MASTER_ADDR": "h1", "OMPI_COMM_WORLD_LOCAL_RANK": "0"})
    assert (e.world_size, e.launcher) == (2, "mpi")


def test_pmi_and_bad_values_and_single():
    e = discover({"PMI_RANK": "1", "PMI_SIZE": "4", "MASTER_ADDR": "h"})
    assert (e.rank, e.world_size) == (1, 4)
    with pytest.raises(LaunchEnvError, match="SLURM_PROCID='x' is not an integer"):
        discover({"SLURM_PROCID": "x", "SLURM_NTASKS": "2", "MASTER_ADDR": "h"})
    assert discover({}).launcher == "single"


def test_single_process_without_master_port_takes_a_free_port():
    """A lone process needs no rendezvous partner: it must not claim DEFAULT_PORT, which another
    single-process run on the machine may hold (two such runs failed with EADDRINUSE)."""
    import socket

    from parallel.env import DEFAULT_PORT

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", DEFAULT_PORT))
        held.listen()
        e = discover({})
        assert e.launcher == "single" and e.master_port != DEFAULT_PORT
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", e.master_port))  # free: the process can listen there
    assert discover({"MASTER_PORT": "1234"}).master_port == 1234, "an explicit MASTER_PORT is kept"
