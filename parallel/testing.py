"""Run a function in N local processes joined in one torch.distributed group.

This is the single entry point every multi-process test and CPU benchmark uses::

    from parallel.testing import run_distributed
    results = run_distributed(my_fn, world_size=4, args=(cfg,))

Each child gets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` set
(torchrun's contract), joins the default process group (gloo on CPU, NCCL when asked and CUDA is
present), calls ``fn(*args)`` and sends the return value back to the parent. Communication: the
children talk to each other only through the process group ``fn`` uses; results and
tracebacks travel to the parent through a multiprocessing queue.

Start-up: children are forked from a forkserver that has imported torch, megatron-core and the
trainer once (:data:`PRELOAD`), so a run pays those imports once per test session instead of once per
rank per run (about 3 s of CPU each on the 2-core CI machine). A forkserver child gets the parent's
environment as it is at the call (copied into the child), like a spawned one.
``MTE_TEST_START_METHOD=spawn`` starts every child from scratch instead.

Failure is loud: if any rank raises, the parent raises :class:`DistributedRunError` holding that
rank's traceback; if the run outlives ``timeout`` seconds every child is killed and the error names
the ranks that had not finished (a hung collective shows up as exactly that).
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.multiprocessing as mp

from parallel.env import free_port  # noqa: F401 - tests import it from here

PRELOAD = (
    "torch",
    "torch.distributed",
    "megatron.core",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel",
    "megatron_timeexpert.train.pretrain",
    "megatron_timeexpert.model.video_llm",
)
"""Modules the forkserver imports before it forks children (each must import without side effects)."""


def _context():
    """The multiprocessing context children start from: a preloaded forkserver, or spawn."""
    method = os.environ.get("MTE_TEST_START_METHOD", "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"MTE_TEST_START_METHOD={method!r}: use forkserver or spawn")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


class DistributedRunError(RuntimeError):
    """A rank raised, or the run timed out; the message carries each failing rank's traceback."""


@dataclass
class _ChildSpec:
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    world_size: int
    port: int
    backend: str
    env: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    parent_env: dict[str, str] = field(default_factory=dict)


def _child(rank: int, spec: _ChildSpec, results: Any) -> None:
    # Own process group: the parent can then kill this rank together with anything it started
    # (megatron's checkpoint writer starts a multiprocessing manager) instead of orphaning it.
    os.setpgrp()
    # A forkserver child inherits the server's environment, not the caller's: restore the caller's.
    os.environ.clear()
    os.environ.update(spec.parent_env)
    os.environ.update(spec.env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(spec.world_size),
            "LOCAL_WORLD_SIZE": str(spec.world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(spec.port),
        }
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(spec.threads)
        if spec.backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(spec.backend, rank=rank, world_size=spec.world_size)
        try:
            out = spec.fn(*spec.args, **spec.kwargs)
        finally:
            # megatron-core keeps extra groups alive; destroying the default group ends them all.
            if dist.is_initialized():
                dist.destroy_process_group()
        # Plain pickle copies tensors by value; torch's queue pickler would share them through file
        # descriptors that vanish when this child exits.
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    backend: str = "gloo",
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks; return the per-rank results in rank order.

    ``fn`` and its arguments must be picklable (a module-level function). ``threads`` caps each
    child's intra-op threads so several ranks share a small machine without oversubscribing it.
    """
    ctx = _context()
    results = ctx.Queue()
    spec = _ChildSpec(
        fn,
        tuple(args),
        dict(kwargs or {}),
        world_size,
        free_port(),
        backend,
        dict(env or {}),
        threads,
        parent_env=dict(os.environ),
    )
    # Not daemonic: megatron dist_checkpointing starts writer processes of its own.
    procs = [ctx.Process(target=_child, args=(r, spec, results), daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    name = getattr(fn, "__name__", repr(fn))
    outs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outs) - set(errors))
                raise DistributedRunError(
                    f"{getattr(fn, '__name__', fn)}: timed out after {timeout:.0f}s; ranks {missing} "
                    f"did not finish (a collective that not every rank entered hangs like this)."
                    + _format_errors(errors)
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                done = set(outs) | set(errors)
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in done]
                if dead:
                    # A child died without reporting (segfault, OOM kill); give peers a moment to report.
                    time.sleep(0.5)
                    while not results.empty():
                        rank, status, payload = results.get()
                        if status == "ok":
                            outs[rank] = pickle.loads(payload)
                        else:
                            errors[rank] = payload
                    for r in dead:
                        errors.setdefault(r, f"process exited with code {procs[r].exitcode} without a result")
                    raise DistributedRunError(f"{name} failed" + _format_errors(errors)) from None
                continue
            if status == "ok":
                outs[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                # One failing rank usually leaves the others blocked in a collective, or failing on the
                # broken connection before the culprit's report arrives: collect what else comes in a
                # short grace period, then stop, so the root cause is in the message.
                settle = time.monotonic() + 3.0
                while time.monotonic() < settle and len(outs) + len(errors) < world_size:
                    try:
                        rank, status, payload = results.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    if status == "ok":
                        outs[rank] = pickle.loads(payload)
                    else:
                        errors[rank] = payload
                break
        if errors:
            raise DistributedRunError(f"{getattr(fn, '__name__', fn)} failed" + _format_errors(errors))
        return [outs[r] for r in range(world_size)]
    finally:
        # On success the ranks are already leaving: let them run their exit handlers (which shut
        # down helper processes such as multiprocessing managers). Then kill each rank's whole
        # process group so nothing outlives the run holding our stdout open.
        grace = time.monotonic() + (30.0 if len(outs) == world_size else 0.0)
        for p in procs:
            p.join(timeout=max(0.0, grace - time.monotonic()))
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.join(timeout=10)


def _format_errors(errors: dict[int, str]) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
