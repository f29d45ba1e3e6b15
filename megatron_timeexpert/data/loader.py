"""The training data loader: sharded across data-parallel ranks, resumable, prefetching.

Ranks are plain ints (``dp_rank``, ``dp_world``); nothing here touches torch.distributed. Each
epoch the sample order is a permutation drawn from ``(seed, epoch)``; it is padded by wrapping to
a multiple of ``dp_world`` and rank ``r`` takes every ``dp_world``-th entry from ``r``, so every
rank has the same number of positions per epoch. The loader is an endless stream (epoch after
epoch); the trainer decides how many batches to take.

Position and resume: ``state_dict()`` is ``{epoch, index, seed, dp_rank, dp_world, num_samples}``
where ``(epoch, index)`` is the first shard position not yet delivered in a batch. Store it in the
checkpoint; ``load_state_dict()`` on a fresh loader continues with exactly the next sample.

Prefetching: ``num_workers`` threads decode up to ``prefetch_batches`` batches ahead, in order.
A sample whose video is bad is reported to :class:`~.stats.BadInputs` and replaced by the next
position, so batches stay full; a shard with no usable sample at all raises
:class:`~.stats.DataError`. ``wait_seconds`` is the time the consumer spent blocked on decoding.

Deadline: decoding one sample may take at most ``decode_timeout_s`` once a thread has started it.
Past that the sample is skipped and counted as ``decode_timeout`` with its file, the thread is
replaced by a fresh one (:mod:`.workers`), and the run goes on with the next position; samples
already decoding on other threads are kept. No wait in the loader is unbounded.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from megatron_timeexpert.data import stats as S
from megatron_timeexpert.data.dataset import FrameSample, VTGDataset
from megatron_timeexpert.data.stats import DataError
from megatron_timeexpert.data.types import Event, Task
from megatron_timeexpert.data.workers import TaskTimeout, WorkerPool


@dataclass
class LoaderConfig:
    """Batching, sharding, order and prefetching of the training loader."""

    batch_size: int = 1
    """Samples per batch on each rank."""
    seed: int = 0
    """Seed of the per-epoch shuffle (the same on every rank)."""
    dp_rank: int = 0
    """This rank's index among the data-parallel ranks."""
    dp_world: int = 1
    """Number of data-parallel ranks."""
    shuffle: bool = True
    """Shuffle each epoch (False: annotation order)."""
    num_workers: int = 2
    """Decoding threads."""
    prefetch_batches: int = 2
    """Batches decoded ahead of the consumer."""
    decode_timeout_s: float = 120.0
    """Hard limit (seconds) on decoding one sample once a thread has started it; past it the sample is
    skipped and counted as ``decode_timeout`` (file named) and the thread is replaced."""

    def __post_init__(self) -> None:
        if not self.decode_timeout_s > 0:
            raise ValueError(
                f"LoaderConfig.decode_timeout_s: must be > 0 (every wait is bounded), got {self.decode_timeout_s}"
            )
        if self.batch_size < 1:
            raise ValueError(f"LoaderConfig.batch_size: must be >= 1, got {self.batch_size}")
        if not 0 <= self.dp_rank < self.dp_world:
            raise ValueError(f"LoaderConfig.dp_rank: {self.dp_rank} is not in [0, dp_world={self.dp_world})")
        if self.num_workers < 1 or self.prefetch_batches < 1:
            raise ValueError("LoaderConfig.num_workers and prefetch_batches must be >= 1")


@dataclass
class VTGBatch:
    """A batch of samples; frame tensors are padded to the longest sample (see ``frame_mask``)."""

    frames: torch.Tensor
    """``[B, N, ...]`` frames, zero-padded along N."""
    timestamps: torch.Tensor
    """float64 ``[B, N]`` presentation times in seconds; -1 at padding."""
    frame_mask: torch.Tensor
    """bool ``[B, N]``: True for real frames."""
    tasks: list[Task]
    """Task of each sample."""
    texts: list[str]
    """Query / instruction of each sample."""
    events: list[tuple[Event, ...]]
    """Target events of each sample."""
    sample_ids: list[str]
    """Annotation sample ids (for logging and exact-resume checks)."""
    samples: list[FrameSample]
    """The full per-sample records (answers, sources, backends)."""
    position: dict
    """The loader state right after this batch (what ``state_dict()`` returns once it is yielded)."""


def collate(items: list[FrameSample], position: dict) -> VTGBatch:
    """Stack samples into a :class:`VTGBatch`, padding frames and timestamps to the longest sample."""
    n = max(len(it.timestamps) for it in items)
    f0 = items[0].frames
    for it in items[1:]:
        if it.frames.shape[1:] != f0.shape[1:] or it.frames.dtype != f0.dtype:
            raise DataError(
                f"cannot batch frames of {it.sample.video} ({tuple(it.frames.shape[1:])}, {it.frames.dtype}) with "
                f"those of {items[0].sample.video} ({tuple(f0.shape[1:])}, {f0.dtype}): videos of different sizes "
                "need a transform (DecoderConfig.transform) or batch_size=1"
            )
    frames = torch.zeros((len(items), n, *f0.shape[1:]), dtype=f0.dtype, device=f0.device)
    ts = torch.full((len(items), n), -1.0, dtype=torch.float64)
    mask = torch.zeros((len(items), n), dtype=torch.bool)
    for b, it in enumerate(items):
        k = len(it.timestamps)
        frames[b, :k] = it.frames
        ts[b, :k] = it.timestamps
        mask[b, :k] = True
    return VTGBatch(
        frames, ts, mask, [it.task for it in items], [it.text for it in items], [it.events for it in items],
        [it.sample.sample_id for it in items], items, position,
    )  # fmt: skip


class VTGLoader:
    """Endless, sharded, resumable, prefetching iterator of :class:`VTGBatch` (see module docstring)."""

    def __init__(self, dataset: VTGDataset, cfg: LoaderConfig) -> None:
        if len(dataset) == 0:
            raise DataError("VTGLoader: the data set has no samples")
        self.dataset = dataset
        self.cfg = cfg
        self._epoch = 0
        self._index = 0
        self.wait_seconds = 0.0
        self.samples_delivered = 0
        self.workers_replaced = 0

    # ---- order and sharding ----

    @property
    def shard_len(self) -> int:
        """Positions per rank per epoch (the same on every rank)."""
        return math.ceil(len(self.dataset) / self.cfg.dp_world)

    def shard(self, epoch: int) -> np.ndarray:
        """Dataset indices of this rank's positions in ``epoch``, in order."""
        n, world = len(self.dataset), self.cfg.dp_world
        order = (
            np.random.default_rng([self.cfg.seed, epoch]).permutation(n) if self.cfg.shuffle else np.arange(n)
        )  # fmt: skip
        padded = np.resize(order, self.shard_len * world)  # wraps around to fill the last round
        return padded[self.cfg.dp_rank :: world]

    # ---- checkpointing ----

    def state_dict(self) -> dict:
        """Small dict for the trainer's checkpoint: where the next batch starts."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self.cfg.seed,
            "dp_rank": self.cfg.dp_rank,
            "dp_world": self.cfg.dp_world,
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the seed, world size and data set size must match the checkpoint."""
        mine = self.state_dict()
        for key in ("seed", "dp_rank", "dp_world", "num_samples"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"VTGLoader.load_state_dict: checkpoint has {key}={state[key]} but this loader has {mine[key]}; "
                    "resuming would not continue at the next sample"
                )
        if not 0 <= int(state["index"]) < self.shard_len:
            raise ValueError(f"VTGLoader.load_state_dict: index {state['index']} outside shard of {self.shard_len}")
        self._epoch, self._index = int(state["epoch"]), int(state["index"])

    # ---- iteration ----

    def _positions(self, epoch: int, index: int) -> Iterator[tuple[int, int, int]]:
        while True:
            shard = self.shard(epoch)
            for i in range(index, len(shard)):
                yield epoch, i, int(shard[i])
            epoch, index = epoch + 1, 0

    def _decode(self, index: int, deadline: float) -> FrameSample | None:
        return self.dataset.get(index, deadline=deadline)

    def _result(self, pool: WorkerPool, task, index: int) -> FrameSample | None:
        """The decoded sample, or None after counting a ``decode_timeout`` (and replacing the thread)."""
        try:
            return task.wait()
        except TaskTimeout as exc:
            pool.abandon(task)
            self.workers_replaced += 1
            sample = self.dataset.samples[index]
            self.dataset.bad.report(
                S.DECODE_TIMEOUT, sample.video, "",
                f"{exc} (deadline {self.cfg.decode_timeout_s}s), decode thread replaced; annotation {sample.source}",
            )  # fmt: skip
            return None

    def __iter__(self) -> Iterator[VTGBatch]:
        cfg = self.cfg
        window = cfg.batch_size * cfg.prefetch_batches
        positions = self._positions(self._epoch, self._index)
        pool = WorkerPool(cfg.num_workers, f"vtg-loader-r{cfg.dp_rank}")
        pending: deque = deque()

        def submit() -> None:
            e, i, k = next(positions)
            pending.append((e, i, k, pool.submit(self._decode, k, cfg.decode_timeout_s)))

        try:
            for _ in range(window):
                submit()
            batch: list[FrameSample] = []
            bad_streak = 0
            while True:
                e, i, k, task = pending.popleft()
                t0 = time.perf_counter()
                item = self._result(pool, task, k)
                self.wait_seconds += time.perf_counter() - t0
                submit()
                if item is None:
                    bad_streak += 1
                    if bad_streak >= self.shard_len:
                        raise DataError(
                            f"VTGLoader rank {cfg.dp_rank}: no usable sample in a whole shard of {self.shard_len}; "
                            f"bad inputs: {self.dataset.bad.summary()}"
                        )
                    continue
                bad_streak = 0
                batch.append(item)
                if len(batch) == cfg.batch_size:
                    nxt = (e, i + 1) if i + 1 < self.shard_len else (e + 1, 0)
                    self._epoch, self._index = nxt
                    self.samples_delivered += len(batch)
                    yield collate(batch, self.state_dict())
                    batch = []
        finally:
            pool.shutdown([task for *_, task in pending])

    def metrics(self) -> dict:
        """Bad-input counters plus loader counters, flat, for the trainer's metrics."""
        out = dict(self.dataset.bad.summary())
        out["loader/samples_delivered"] = self.samples_delivered
        out["loader/wait_seconds"] = round(self.wait_seconds, 4)
        out["loader/workers_replaced"] = self.workers_replaced
        return out
