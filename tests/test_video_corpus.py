"""Real-world files made by ffmpeg (tools/make_test_corpus.py): the frame returned for time t is the
frame a player shows at t, with the time of that frame (seconds from the first shown frame), on every
backend this machine has, through the probe, the decoder and the loader (1 and 2 ranks).

Every frame carries its frame number as a block code; the truth is ffmpeg's own decode of each file
(edit lists, start offsets and display rotation applied). Every test has a time limit: a decoder that
loops forever fails here instead of hanging the suite.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from dali_pipes import DecoderConfig, SamplingConfig, TransformConfig, VideoDecoder, probe
from dali_pipes.dali_backend import CPU_CODECS, MIXED_CODECS
from dali_pipes.dali_backend import version as dali_version
from megatron_timeexpert.data.dataset import VTGDataset
from megatron_timeexpert.data.loader import LoaderConfig, VTGLoader
from megatron_timeexpert.data.stats import BadInputs
from megatron_timeexpert.data.types import Event, Task, VTGSample
from parallel.testing import run_distributed
from tests.video_corpus import Corpus, video_corpus  # noqa: F401
from tools.make_test_corpus import RECIPES, read_code

HAS_DALI = dali_version() is not None
NAMES = sorted(RECIPES)
TIME_TOL = 1.5e-3  # container time bases round to the millisecond (Matroska) or finer
pytestmark = pytest.mark.timeout(120)


def _backends(codec: str) -> list[str]:
    return ["pyav"] + (["dali-cpu"] if HAS_DALI and codec in CPU_CODECS else [])


CASES = [(n, b) for n in NAMES for b in _backends(RECIPES[n].codec)]


def check_frames(corpus: Corpus, name: str, frames: np.ndarray, times: np.ndarray, wanted=None) -> None:
    """Each returned frame is a shown frame stamped with its own time; for a wanted time t it is the
    shown frame nearest to t (so within one frame period of t); it is displayed upright, full size."""
    codes, truth_t = corpus.truth(name)
    w, h = corpus.manifest[name]["display_size"]
    assert frames.shape[1:] == (h, w, 3), f"{name}: frames {frames.shape[1:]}, displayed as {(h, w, 3)}"
    by_code = dict(zip(codes.tolist(), truth_t.tolist()))
    for i, (frame, t) in enumerate(zip(frames, times)):
        code = read_code(frame)
        assert code in by_code, f"{name}: frame {i} (t={t:.3f}) shows no frame of the file (code {code})"
        assert abs(by_code[code] - t) <= TIME_TOL, f"{name}: frame {code} is shown at {by_code[code]} not {t}"
        if wanted is not None:
            best = np.abs(truth_t - wanted[i]).min()
            assert abs(by_code[code] - wanted[i]) <= best + TIME_TOL, (
                f"{name}: for t={wanted[i]:.3f} got frame {code} at {by_code[code]}, the nearest is {best:.3f} away"
            )


@pytest.mark.parametrize("name", NAMES)
def test_probe_lists_exactly_the_shown_frames(video_corpus, name):  # noqa: F811
    info = probe(video_corpus.path(name))
    codes, truth_t = video_corpus.truth(name)
    assert info.codec == RECIPES[name].codec
    assert info.num_frames == len(truth_t), f"probe lists {info.num_frames} frames, {len(truth_t)} are shown"
    np.testing.assert_allclose(info.pts, truth_t, atol=TIME_TOL)
    assert (info.display_width, info.display_height) == tuple(video_corpus.manifest[name]["display_size"])


@pytest.mark.parametrize("name,backend", CASES)
def test_frame_for_every_time_is_the_frame_shown_then(video_corpus, name, backend):  # noqa: F811
    _, truth_t = video_corpus.truth(name)
    mids = (truth_t[1:] + truth_t[:-1]) / 2 + 0.01
    wanted = np.concatenate([truth_t, mids, [-0.5, 0.0, truth_t[-1] + 1.0]])
    dec = VideoDecoder(DecoderConfig(backend=backend, sampling=SamplingConfig(mode="timestamps"), transform=None))
    clip = dec.read(video_corpus.path(name), timestamps=wanted.tolist())
    assert clip.backend == backend and clip.codec == RECIPES[name].codec
    check_frames(video_corpus, name, clip.frames.numpy(), clip.timestamps.numpy(), wanted)
    # Every shown frame is reachable: asking for its time returns it.
    assert sorted({read_code(f) for f in clip.frames.numpy()[: len(truth_t)]}) == sorted(video_corpus.truth(name)[0])


@pytest.mark.parametrize("mode", ["uniform", "fps"])
@pytest.mark.parametrize("name", NAMES)
def test_sampling_modes_return_shown_frames_with_their_times(video_corpus, name, mode):  # noqa: F811
    sampling = SamplingConfig(mode=mode, num_frames=5, fps=3.0)
    for backend in _backends(RECIPES[name].codec) + ["auto"]:
        clip = VideoDecoder(DecoderConfig(backend=backend, sampling=sampling, transform=None)).read(
            video_corpus.path(name)
        )
        check_frames(video_corpus, name, clip.frames.numpy(), clip.timestamps.numpy())
        assert clip.timestamps[0] >= 0


@pytest.mark.parametrize("name", ["long_gop.mp4", "cut_h264.mp4", "midgop.mkv", "offset.mkv", "hevc.mkv", "vfr.mkv"])
def test_seeking_back_and_forth_gives_the_same_frames(video_corpus, name):  # noqa: F811
    _, truth_t = video_corpus.truth(name)
    last = truth_t[-1]
    wanted = [0.9 * last, 0.1, 0.5 * last, 0.52 * last, 0.0, 0.3 * last, last, 0.05]
    dec = VideoDecoder(
        DecoderConfig(backend="pyav", sampling=SamplingConfig(mode="timestamps"), transform=None, seek_threshold_s=0.3)
    )
    clip = dec.read(video_corpus.path(name), timestamps=wanted)
    check_frames(video_corpus, name, clip.frames.numpy(), clip.timestamps.numpy(), np.asarray(wanted))


@pytest.mark.parametrize("world", [1, 2])
def test_loader_delivers_every_corpus_file_with_the_right_frames(video_corpus, world):  # noqa: F811
    samples = [
        VTGSample(name, video_corpus.path(name), None, Task.MOMENT_RETRIEVAL, "q", (Event(0.0, 0.1),), f"corpus:{name}")
        for name in NAMES
    ]
    bad = BadInputs("skip")
    dec = VideoDecoder(DecoderConfig(sampling=SamplingConfig(mode="fps", fps=4.0, num_frames=0), transform=None))
    ds = VTGDataset(samples, dec, bad)
    seen = []
    for rank in range(world):
        loader = VTGLoader(ds, LoaderConfig(batch_size=1, dp_rank=rank, dp_world=world, seed=1, decode_timeout_s=60))
        for batch in loader:
            (item,) = batch.samples
            name = item.sample.sample_id
            check_frames(video_corpus, name, item.frames.numpy(), item.timestamps.numpy())
            seen.append(name)
            if loader.state_dict()["epoch"] == 1:
                break
    assert sorted(set(seen)) == NAMES and len(seen) == world * -(-len(NAMES) // world)  # no sample lost
    assert bad.summary()["bad/total"] == 0, bad.summary()


def _rank_delivers_corpus(root: str, manifest: dict) -> list[str]:
    """One data-parallel rank in its own process: rank and world from torch.distributed."""
    import torch.distributed as dist

    corpus = Corpus(Path(root), manifest)
    rank, world = dist.get_rank(), dist.get_world_size()
    samples = [
        VTGSample(name, corpus.path(name), None, Task.MOMENT_RETRIEVAL, "q", (Event(0.0, 0.1),), f"corpus:{name}")
        for name in NAMES
    ]
    bad = BadInputs("skip")
    dec = VideoDecoder(DecoderConfig(sampling=SamplingConfig(mode="fps", fps=4.0, num_frames=0), transform=None))
    loader = VTGLoader(VTGDataset(samples, dec, bad), LoaderConfig(dp_rank=rank, dp_world=world, seed=2))
    seen = []
    for batch in loader:
        (item,) = batch.samples
        check_frames(corpus, item.sample.sample_id, item.frames.numpy(), item.timestamps.numpy())
        seen.append(item.sample.sample_id)
        if loader.state_dict()["epoch"] == 1:
            break
    assert bad.summary()["bad/total"] == 0, bad.summary()
    return seen


@pytest.mark.slow
def test_loader_in_a_real_two_rank_group_delivers_every_corpus_file(video_corpus):  # noqa: F811
    results = run_distributed(
        _rank_delivers_corpus, 2, args=(str(video_corpus.root), video_corpus.manifest), timeout=120
    )
    assert sorted(set(results[0]) | set(results[1])) == NAMES
    assert len(results[0]) == len(results[1]) == -(-len(NAMES) // 2)


def test_rotated_file_with_transform_matches_on_every_backend(video_corpus):  # noqa: F811
    path = video_corpus.path("rotated_vp9.mp4")
    sampling, t = SamplingConfig(num_frames=4), TransformConfig(size=32)
    clips = [
        VideoDecoder(DecoderConfig(backend=b, sampling=sampling, transform=t)).read(path)
        for b in _backends("vp9") + ["auto"]
    ]
    ref = clips[0]
    assert ref.frames.shape == (4, 3, 32, 32)
    for clip in clips[1:]:
        assert (clip.frames - ref.frames).abs().mean() < 0.1, clip.backend
        np.testing.assert_allclose(clip.timestamps.numpy(), ref.timestamps.numpy())


@pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI not installed")
def test_auto_backend_uses_dali_only_where_it_agrees_with_pyav(video_corpus, caplog):  # noqa: F811
    """DALI counts the frames an MP4 edit list discards (it decodes a frame past the last shown one), so
    the first VP9 MP4 cut sends that kind of file to PyAV, with the reason logged; other kinds stay on DALI."""
    dec = VideoDecoder(DecoderConfig(sampling=SamplingConfig(num_frames=6), transform=None))
    backends = {}
    with caplog.at_level(logging.INFO, logger="dali_pipes.decoder"):
        for name in [n for n in NAMES if RECIPES[n].codec in CPU_CODECS]:
            clip = dec.read(video_corpus.path(name))
            check_frames(video_corpus, name, clip.frames.numpy(), clip.timestamps.numpy())
            backends[name] = clip.backend
    assert backends["cut_vp9.mp4"] == "pyav"
    assert {backends[n] for n in ("vp8.webm", "mjpeg.avi", "offset.webm", "rotated_vp9.mp4")} == {"dali-cpu"}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("vp9 in mov,mp4" in m and "edit list: pyav (fallback: dali-cpu disagrees" in m for m in warned), warned


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI not installed")
@pytest.mark.parametrize("name", [n for n in NAMES if RECIPES[n].codec in MIXED_CODECS])
def test_dali_mixed_returns_the_frame_shown_at_each_time(video_corpus, name):  # noqa: F811
    """On a GPU: NVDEC where the cross-check trusts it (H.264, HEVC, AV1, ...), PyAV where it does not;
    either way the frame for each time is the frame shown then."""
    _, truth_t = video_corpus.truth(name)
    dec = VideoDecoder(DecoderConfig(sampling=SamplingConfig(mode="timestamps"), transform=None))
    clip = dec.read(video_corpus.path(name), timestamps=truth_t.tolist())
    assert clip.backend in ("dali-mixed", "pyav")
    check_frames(video_corpus, name, clip.frames.cpu().numpy(), clip.timestamps.numpy(), truth_t)
    if name in ("h264_bframes.mp4", "hevc.mkv", "long_gop.mp4"):
        assert clip.backend == "dali-mixed" and clip.frames.is_cuda
