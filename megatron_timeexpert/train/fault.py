"""What the training loop does when a job is pre-empted or a rank dies (contract 8: bounded waits).

One :class:`StepGuard` per run, called by the loop at step boundaries::

    guard = StepGuard(timeout_s=cfg.parallel.collective_timeout_s).start()
    while ...:
        with guard.step(n):            # a failed/timed-out collective -> RankFailureError naming step n
            ...one optimizer step...
        if guard.should_stop(n):       # SIGUSR1 on any rank -> every rank stops after the same step
            break                      # (the loop then writes its final checkpoint)
    guard.close()

It owns:
- **Pre-emption.** SLURM sends ``SIGUSR1`` before the time limit (``--signal=USR1@120``; the batch
  scripts in ``launch/`` forward ``B:USR1`` to every task). The handler only sets a flag. At each step
  boundary :meth:`should_stop` all-reduces the flag (MAX, one int over the default group), so all
  ranks stop after the same step even though the signal reaches them at slightly different times.
- **Dead ranks.** Every collective is bounded by the process-group timeout
  (``parallel.collective_timeout_s``). When a collective inside a step raises (a peer's connection
  closed, or the timeout expired), :meth:`step` turns it into :class:`RankFailureError` whose message
  names the step and the ranks that stopped responding (any other error of the step passes through
  unchanged). The ranks are found from heartbeats: a thread increments ``timeexpert/hb/<rank>`` in
  the rendezvous store every ``heartbeat_s``; a rank whose counter does not move over a short window
  and that did not report a failure itself is named as missing (1.5 s; up to ~7 s when the store's
  host is gone). A timer armed when the failure is caught hard-exits the process if it has not ended
  ``exit_grace_s`` later (the diagnosis runs inside that grace; a torn-down group can block in
  destructors), so a survivor ends within ``collective_timeout_s + exit_grace_s`` of the death.
- **Fault injection** for tests: ``TIMEEXPERT_FAULT_KILL_AT_STEP=RANK:STEP[:DELAY_S[:SIGNAL]]`` makes that
  rank send itself ``SIGNAL`` (default KILL; STOP freezes it: a hung rather than a dead rank)
  ``DELAY_S`` seconds (default 0.2) after step ``STEP`` begins, i.e. mid-step.

Communication: the per-step flag all-reduce; store traffic (one ``add`` per heartbeat) outside the
process groups.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from parallel.env import collective_device

log = logging.getLogger(__name__)

KILL_AT_STEP_ENV = "TIMEEXPERT_FAULT_KILL_AT_STEP"
PREEMPT_SIGNALS = (signal.SIGUSR1,)
EXIT_RANK_FAILURE = 17
"""Exit status of a rank that hard-exits after a peer failure (the traceback was printed first)."""


class RankFailureError(RuntimeError):
    """A collective of a training step failed or timed out; the message names the step and the
    ranks that stopped responding."""


class StepGuard:
    """Pre-emption flag, heartbeats and failure diagnosis of one run (see module docstring).

    Args:
        timeout_s: the process groups' collective timeout (only quoted in messages here; the groups
            are created with it by ``parallel.env.init_distributed`` and ``ParallelLayout.initialize``).
        heartbeat_s: period of the heartbeat thread.
        exit_grace_s: after a failure, hard-exit with :data:`EXIT_RANK_FAILURE` if the process is still
            alive this many seconds later.
    """

    def __init__(self, timeout_s: float, heartbeat_s: float = 0.5, exit_grace_s: float = 15.0):
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.exit_grace_s = exit_grace_s
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.stop_signal: int | None = None
        """The pre-emption signal received by this process (None: none yet)."""
        self.stopped_at: int | None = None
        """Step after which every rank agreed to stop (None: not stopped)."""
        self._previous: dict[int, object] = {}
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._store_addr: tuple[str, int] | None = None
        self._kill_step, self._kill_delay, self._kill_signal = self._parse_kill_env()

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> StepGuard:
        """Install the pre-emption handler (main thread only) and start the heartbeat thread."""
        if threading.current_thread() is threading.main_thread():
            for sig in PREEMPT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        self._store_addr = _store_address()
        if self._store_addr is not None and self.world > 1:
            self._thread = threading.Thread(target=self._heartbeat, name="timeexpert-heartbeat", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Restore the previous signal handlers and stop the heartbeat thread."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.heartbeat_s + 1)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.stop_signal = signum

    # -- the two calls of the loop --------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Run one step; a failing collective becomes :class:`RankFailureError` naming ``step``."""
        if self._kill_step == step:
            _kill_later(self._kill_delay, self._kill_signal, self.rank, step)
        try:
            yield
        except RuntimeError as e:  # dist.DistError is one too; other errors of the step pass unchanged
            if not _is_comm_failure(e):
                raise
            raise self._failure(step, "training step", e) from e

    def should_stop(self, step: int) -> bool:
        """True on every rank once any rank received a pre-emption signal (collective, after ``step``)."""
        device = collective_device()
        flag = torch.tensor([0 if self.stop_signal is None else 1], dtype=torch.int32, device=device)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        except (RuntimeError, dist.DistError) as e:
            raise self._failure(step, "pre-emption check", e) from e
        if int(flag.item()) == 0:
            return False
        self.stopped_at = step
        if self.rank == 0:
            got = signal.Signals(self.stop_signal).name if self.stop_signal else "another rank"
            log.warning("pre-emption signal (%s): stopping after step %d and writing a checkpoint", got, step)
        return True

    # -- failure diagnosis ----------------------------------------------------------------------

    def _failure(self, step: int, where: str, error: BaseException) -> RankFailureError:
        _exit_later(self.exit_grace_s)
        missing = self.unresponsive_ranks(step)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        msg = (
            f"rank {self.rank}: step {step} ({where}) failed: {missing}; collective timeout "
            f"{self.timeout_s:.0f}s. Cause: {first_line}. Relaunch with --resume to continue from the newest "
            f"complete checkpoint (on fewer ranks too: docs/LAUNCH.md)."
        )
        log.error("%s", msg)
        return RankFailureError(msg)

    def unresponsive_ranks(self, step: int) -> str:
        """Words naming the ranks whose heartbeat stopped and that reported no failure of their own."""
        if self._store_addr is None or self.world == 1:
            return "no rendezvous store to ask which rank is missing"
        host, port = self._store_addr
        try:
            store = _client(host, port, timeout_s=3.0)
            store.set(f"timeexpert/failed/{self.rank}", str(step))
            before = [store.add(f"timeexpert/hb/{r}", 0) for r in range(self.world)]
            time.sleep(3 * self.heartbeat_s)
            after = [store.add(f"timeexpert/hb/{r}", 0) for r in range(self.world)]
            reported = [r for r in range(self.world) if store.check([f"timeexpert/failed/{r}"])]
        except (RuntimeError, dist.DistError, OSError) as e:
            return (
                f"the rendezvous store at {host}:{port} is unreachable ({type(e).__name__}); the process hosting "
                f"it (rank 0 unless an agent such as torchrun hosts it) has probably died"
            )
        stalled = [r for r in range(self.world) if r != self.rank and after[r] == before[r] and r not in reported]
        if stalled:
            return f"rank(s) {stalled} stopped responding (no heartbeat for {3 * self.heartbeat_s:.1f}s)"
        others = [r for r in reported if r != self.rank]
        return f"every rank still has a heartbeat; ranks {others} reported failures too"

    def _heartbeat(self) -> None:
        assert self._store_addr is not None
        key = f"timeexpert/hb/{self.rank}"
        try:
            store = _client(*self._store_addr, timeout_s=max(self.timeout_s, 5.0))
            while not self._done.wait(self.heartbeat_s):
                store.add(key, 1)
        except (RuntimeError, dist.DistError, OSError) as e:
            # The store went away (its host died or the job is ending): nothing to beat for.
            log.debug("heartbeat of rank %d stopped: %s", self.rank, e)

    def _parse_kill_env(self) -> tuple[int | None, float, signal.Signals]:
        spec = os.environ.get(KILL_AT_STEP_ENV)
        parts = spec.split(":") if spec else []
        if not parts or int(parts[0]) != self.rank:
            return None, 0.0, signal.SIGKILL
        delay = float(parts[2]) if len(parts) > 2 else 0.2
        return int(parts[1]), delay, signal.Signals[f"SIG{parts[3]}"] if len(parts) > 3 else signal.SIGKILL


_COMM_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset)|timed out|timeout|broken pipe", re.IGNORECASE)


def _is_comm_failure(error: RuntimeError) -> bool:
    """A collective's failure (torch raises gloo's as plain RuntimeError), not a bug in the step."""
    return isinstance(error, dist.DistError) or bool(_COMM_FAILURE.search(str(error)))


def _store_address() -> tuple[str, int] | None:
    """The rendezvous store every launcher we support points MASTER_ADDR/MASTER_PORT at."""
    from parallel.env import LaunchEnvError, discover

    try:
        env = discover()
    except LaunchEnvError:
        return None
    return env.master_addr, env.master_port


def _client(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(
        host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False
    )


def _kill_later(delay_s: float, sig: signal.Signals, rank: int, step: int) -> None:
    def kill() -> None:
        log.error("fault injection: %s to rank %d %.2fs into step %d", sig.name, rank, delay_s, step)
        os.kill(os.getpid(), sig)

    threading.Timer(delay_s, kill).start()


def _exit_later(grace_s: float) -> None:
    """Hard-exit this process if it is still alive ``grace_s`` from now (teardown must not hang)."""

    def bail() -> None:
        log.error("rank failure: process still alive %.0fs after the error; exiting hard", grace_s)
        logging.shutdown()
        os._exit(EXIT_RANK_FAILURE)

    t = threading.Timer(grace_s, bail)
    t.daemon = True
    t.start()
