"""The training loader: sharding over data-parallel ranks, per-epoch shuffles from a seed, exact
resume on every rank (also in a real 2-process gloo group), prefetching, padding."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest
import torch

from dali_pipes import DecoderConfig, SamplingConfig, TransformConfig, VideoDecoder
from megatron_timeexpert.data.annotations import ReaderConfig, read_annotations
from megatron_timeexpert.data.dataset import VTGDataset
from megatron_timeexpert.data.loader import LoaderConfig, VTGLoader
from megatron_timeexpert.data.stats import BadInputs
from megatron_timeexpert.data.types import Event, Task, VTGSample
from parallel.testing import run_distributed
from tools.make_synthetic_vtg import GeneratorConfig, generate

# Every decode wait in the suite is bounded (DESIGN contract 8): a hang fails the test instead.
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth_loader")
    generate(GeneratorConfig(out, 6, seed=5, width=64, height=48, min_duration=3, max_duration=4, progress=False))
    return out


def make_dataset(root: Path, sampling: SamplingConfig | None = None, with_bad: bool = True) -> VTGDataset:
    bad = BadInputs("skip")
    samples = read_annotations(
        "charades_sta", root / "annotations/charades_sta.txt", ReaderConfig(root / "videos"), bad
    )
    if with_bad:  # a missing video in the middle: resume must count its position the same way
        missing = VTGSample(
            "missing", str(root / "videos/gone.mp4"), None, Task.MOMENT_RETRIEVAL, "q", (Event(0, 1),), "x:1"
        )
        samples.insert(len(samples) // 2, missing)
    cfg = DecoderConfig(sampling=sampling or SamplingConfig(num_frames=4), transform=TransformConfig(size=16))
    return VTGDataset(samples, VideoDecoder(cfg), bad)


def ids(batches) -> list[list[str]]:
    return [b.sample_ids for b in batches]


def test_shards_cover_every_sample_once_per_epoch(synth_dir):
    ds = make_dataset(synth_dir)
    n = len(ds)
    for world in (1, 2, 3, 4):
        loaders = [VTGLoader(ds, LoaderConfig(dp_rank=r, dp_world=world, seed=1)) for r in range(world)]
        for epoch in (0, 1):
            shards = [ld.shard(epoch) for ld in loaders]
            assert len({len(s) for s in shards}) == 1  # equal steps on every rank
            flat = torch.tensor([int(i) for s in shards for i in s])
            assert set(flat.tolist()) == set(range(n))
            assert len(flat) - n == (-n) % world  # only the wrap-around padding repeats


def test_order_is_deterministic_per_seed_and_changes_per_epoch(synth_dir):
    ds = make_dataset(synth_dir)
    a, b, c = (VTGLoader(ds, LoaderConfig(seed=s)) for s in (7, 7, 8))
    assert a.shard(0).tolist() == b.shard(0).tolist()
    assert a.shard(0).tolist() != c.shard(0).tolist()
    assert a.shard(0).tolist() != a.shard(1).tolist()
    assert sorted(VTGLoader(ds, LoaderConfig(shuffle=False)).shard(0).tolist()) == list(range(len(ds)))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_resume_continues_with_exactly_the_next_sample_on_every_rank(synth_dir, world):
    ds = make_dataset(synth_dir)
    for rank in range(world):
        cfg = LoaderConfig(batch_size=2, seed=4, dp_rank=rank, dp_world=world, num_workers=2)
        reference = ids(itertools.islice(VTGLoader(ds, cfg), 9))  # runs past the end of epoch 0
        first = VTGLoader(ds, cfg)
        head = list(itertools.islice(first, 3))
        state = first.state_dict()
        assert state == head[-1].position and json.loads(json.dumps(state)) == state  # small, plain dict
        resumed = VTGLoader(ds, cfg)
        resumed.load_state_dict(state)
        tail = ids(itertools.islice(resumed, 6))
        assert ids(head) + tail == reference, f"rank {rank}/{world}"
    assert ds.bad.summary()["bad/missing_file"] >= 1  # the bad sample was met and skipped on the way


def test_load_state_dict_refuses_a_different_setup(synth_dir):
    ds = make_dataset(synth_dir)
    state = VTGLoader(ds, LoaderConfig(seed=1, dp_world=2)).state_dict()
    with pytest.raises(ValueError, match="checkpoint has seed=1 but this loader has 2"):
        VTGLoader(ds, LoaderConfig(seed=2, dp_world=2)).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_world=2"):
        VTGLoader(ds, LoaderConfig(seed=1, dp_world=4)).load_state_dict(state)


def test_prefetch_keeps_the_consumer_from_waiting(synth_dir):
    """Against a synchronous loader measured in the same test: decoding the same 4 batches one
    sample after another (what a loader without prefetching makes the consumer wait) takes
    ``sync`` seconds; with prefetching, a consumer whose step is longer than a batch's decode waits
    under a quarter of that. A synchronous loader fails this by construction."""
    ds = make_dataset(synth_dir, with_bad=False)
    ds.get(0)  # warm the probe cache, as the loader's first batch below does
    t0 = time.perf_counter()
    for i in range(8):  # 4 batches of 2
        ds.get(i % len(ds))
    sync = time.perf_counter() - t0
    loader = VTGLoader(ds, LoaderConfig(batch_size=2, num_workers=2, prefetch_batches=3))
    it = iter(loader)
    next(it)  # the first batch has to be decoded while we wait
    waited_first = loader.wait_seconds
    step = max(0.15, sync / 2)  # a "training step" slower than decoding one batch
    for _ in range(4):
        time.sleep(step)
        next(it)
    assert loader.wait_seconds - waited_first < 0.25 * sync, (sync, loader.metrics())


def test_variable_frame_counts_are_padded_and_masked(synth_dir):
    ds = make_dataset(synth_dir, sampling=SamplingConfig(mode="fps", fps=2.0, num_frames=0), with_bad=False)
    batch = next(iter(VTGLoader(ds, LoaderConfig(batch_size=4, seed=0))))
    counts = batch.frame_mask.sum(1)
    assert batch.frames.shape[:2] == batch.timestamps.shape == batch.frame_mask.shape
    for b, sample in enumerate(batch.samples):
        k = int(counts[b])
        assert k == len(sample.timestamps) and torch.equal(batch.timestamps[b, :k], sample.timestamps)
        assert (batch.timestamps[b, k:] == -1).all() and (batch.frames[b, k:] == 0).all()
    assert batch.tasks == [Task.MOMENT_RETRIEVAL] * 4 and all(isinstance(t, str) and t for t in batch.texts)


def _rank_resume(root: str) -> dict:
    """One data-parallel rank: rank/world come from torch.distributed, the loader only sees ints."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    ds = make_dataset(Path(root))
    cfg = LoaderConfig(batch_size=2, seed=9, dp_rank=rank, dp_world=world)
    reference = ids(itertools.islice(VTGLoader(ds, cfg), 5))
    first = VTGLoader(ds, cfg)
    head = ids(itertools.islice(first, 2))
    state = first.state_dict()
    resumed = VTGLoader(ds, cfg)
    resumed.load_state_dict(state)
    tail = ids(itertools.islice(resumed, 3))
    epoch0 = [int(i) for i in first.shard(0)]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, epoch0)
    return {"exact": head + tail == reference, "state": state, "shards": everyone}


@pytest.mark.slow
def test_resume_in_a_real_two_rank_group(synth_dir):
    results = run_distributed(_rank_resume, 2, args=(str(synth_dir),), timeout=120)
    assert [r["exact"] for r in results] == [True, True]
    assert [r["state"]["dp_rank"] for r in results] == [0, 1]
    shards = results[0]["shards"]
    assert not set(shards[0]) & set(shards[1]) or len(shards[0]) * 2 > len(set(shards[0]) | set(shards[1]))
    assert results[1]["shards"] == shards  # both ranks computed the same global order


def test_bounded_probe_cache_gives_the_same_samples(synth_dir):
    big, small = make_dataset(synth_dir), make_dataset(synth_dir)
    small.probe_cache_size = 2
    for i in list(range(len(big))) * 2:
        a, b = big.get(i), small.get(i)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.timestamps, b.timestamps) and torch.equal(a.frames, b.frames)
    assert len(small._probed) == 2 and len(big._probed) == len({s.video for s in big.samples})
