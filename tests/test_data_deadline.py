"""Every decode wait is bounded: a sample whose decode hangs is skipped within the loader's deadline,
counted as ``decode_timeout`` with its file, its thread replaced, and the run keeps delivering."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dali_pipes import DecoderConfig, SamplingConfig, TransformConfig, VideoDecoder, VideoError, probe
from dali_pipes.pyav_backend import decode_frames
from megatron_timeexpert.data.dataset import VTGDataset
from megatron_timeexpert.data.loader import LoaderConfig, VTGLoader
from megatron_timeexpert.data.stats import BadInputs, DataError
from megatron_timeexpert.data.types import Event, Task, VTGSample
from tools.make_synthetic_vtg import GeneratorConfig, generate

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("deadline")
    generate(GeneratorConfig(out, 4, seed=3, width=64, height=48, min_duration=2, max_duration=3, progress=False))
    return sorted((out / "videos").iterdir())


class HangingDecoder(VideoDecoder):
    """A fault hook: ``read`` of one file blocks until released (at most a minute, so even this test
    double never waits forever), like a decoder stuck in C code on a pathological file."""

    def __init__(self, cfg: DecoderConfig, hang_on: str) -> None:
        super().__init__(cfg)
        self.hang_on = hang_on
        self.release = threading.Event()
        self.entered = threading.Event()

    def read(self, path, *args, **kwargs):
        if path == self.hang_on:
            self.entered.set()
            self.release.wait(timeout=60)
        return super().read(path, *args, **kwargs)


def _samples(videos: list[Path]) -> list[VTGSample]:
    return [
        VTGSample(f"s{i}", str(v), None, Task.MOMENT_RETRIEVAL, "q", (Event(0.0, 1.0),), f"ann.txt:{i + 1}")
        for i, v in enumerate(videos)
    ]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_hanging_decode_is_skipped_within_the_deadline_and_the_run_goes_on(videos, num_workers):
    samples = _samples(videos)
    hang = samples[1].video
    cfg = DecoderConfig(sampling=SamplingConfig(num_frames=2), transform=TransformConfig(size=16))
    dec = HangingDecoder(cfg, hang)
    bad = BadInputs("skip")
    deadline = 1.0
    loader = VTGLoader(
        VTGDataset(samples, dec, bad),
        LoaderConfig(
            batch_size=1, shuffle=False, num_workers=num_workers, prefetch_batches=2, decode_timeout_s=deadline
        ),
    )
    try:
        t0 = time.monotonic()
        delivered = []
        for batch in loader:
            delivered += batch.sample_ids
            if len(delivered) == 2 * (len(samples) - 1):  # two epochs of every other sample
                break
        elapsed = time.monotonic() - t0
    finally:
        dec.release.set()
    # With one worker, nothing after the stuck sample could come unless its thread was replaced.
    assert delivered == [s.sample_id for s in samples if s.video != hang] * 2
    assert dec.entered.is_set()
    summary = loader.metrics()
    assert summary["bad/decode_timeout"] == 1  # counted once per file, though met in both epochs
    assert summary["skipped"] == 2 and summary["loader/workers_replaced"] == 2
    (rec,) = bad.by_reason("decode_timeout")
    assert rec.file == hang and "ann.txt:2" in rec.detail and "replaced" in rec.detail
    assert elapsed < 2 * deadline + 20, elapsed  # two hangs, each cut at the deadline (plus slow-machine slack)


def test_decode_timeout_under_the_fail_policy_stops_the_run_naming_the_file(videos):
    samples = _samples(videos)
    dec = HangingDecoder(DecoderConfig(sampling=SamplingConfig(num_frames=2), transform=None), samples[0].video)
    loader = VTGLoader(
        VTGDataset(samples, dec, BadInputs("fail")), LoaderConfig(shuffle=False, num_workers=1, decode_timeout_s=0.5)
    )
    try:
        with pytest.raises(DataError, match=rf"{samples[0].video}: decode_timeout"):
            next(iter(loader))
    finally:
        dec.release.set()


def test_pyav_decode_stops_by_itself_at_its_deadline(videos):
    info = probe(videos[0])
    with pytest.raises(VideoError) as err:
        decode_frames(info, np.arange(info.num_frames), deadline=time.monotonic() - 1.0)
    assert err.value.reason == "decode_timeout" and err.value.path == str(videos[0])


def test_deadline_must_be_positive():
    with pytest.raises(ValueError, match="decode_timeout_s"):
        LoaderConfig(decode_timeout_s=0)
