"""Bad video files never kill a run and never pass silently: each is skipped and counted (file and
reason), or under the fail policy raises an error naming the file; no good sample is lost."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from dali_pipes import DecoderConfig, SamplingConfig, TransformConfig, VideoDecoder, VideoError, probe
from megatron_timeexpert.data.dataset import VTGDataset
from megatron_timeexpert.data.loader import LoaderConfig, VTGLoader
from megatron_timeexpert.data.stats import BadInputs, DataError
from megatron_timeexpert.data.types import Event, Task, VTGSample
from tools.make_synthetic_vtg import GeneratorConfig, generate

# Every decode wait in the suite is bounded (DESIGN contract 8): a hang fails the test instead.
pytestmark = pytest.mark.timeout(120)


def _encode(path: Path, codec: str, n: int = 10, **container_options) -> None:
    with av.open(str(path), "w", options=container_options) as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), (6 * i) % 256, np.uint8), format="rgb24")
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _cut(src: Path, dst: Path, frac: float) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * frac)])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Good generated videos plus one file for every kind of bad video."""
    out = tmp_path_factory.mktemp("bad_videos")
    generate(GeneratorConfig(out, 4, seed=11, width=64, height=48, min_duration=4, max_duration=5, progress=False))
    truth = json.loads((out / "events.json").read_text())
    v = out / "videos"
    webm = next(out / t["file"] for t in truth if t["codec"] == "vp9")
    mp4 = next(out / t["file"] for t in truth if t["codec"] == "h264")
    (v / "zero.mp4").write_bytes(b"")
    _cut(webm, v / "truncated.webm", 0.4)  # Matroska: clusters cut off, header still claims the full duration
    _cut(mp4, v / "truncated_moov.mp4", 0.5)  # MP4 with its index (moov) at the end: cut before it
    _encode(v / "faststart.mp4", "libx264", n=40, movflags="faststart")
    _cut(v / "faststart.mp4", v / "truncated_faststart.mp4", 0.5)  # index first, frames cut off
    (v / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    _encode(v / "ffv1.mkv", "ffv1")  # lossless intra codec nobody trains on: unsupported
    with av.open(str(v / "audio_only.mka"), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in [*s.encode(frame), *s.encode()]:
            c.mux(p)
    bad_files = {
        "missing_file": v / "does_not_exist.mp4",
        "empty_file": v / "zero.mp4",
        "truncated_file": v / "truncated.webm",
        "corrupt_file": v / "corrupt.mp4",
        "unsupported_codec": v / "ffv1.mkv",
        "no_video_stream": v / "audio_only.mka",
    }
    return out, truth, bad_files


@pytest.mark.parametrize(
    "name,reason",
    [
        ("does_not_exist.mp4", "missing_file"),
        ("zero.mp4", "empty_file"),
        ("truncated.webm", "truncated_file"),
        ("truncated_moov.mp4", "truncated_file"),
        ("truncated_faststart.mp4", "truncated_file"),
        ("corrupt.mp4", "corrupt_file"),
        ("ffv1.mkv", "unsupported_codec"),
        ("audio_only.mka", "no_video_stream"),
    ],
)
def test_probe_names_the_reason(corpus, name, reason):
    out, _, _ = corpus
    path = out / "videos" / name
    with pytest.raises(VideoError) as info:
        probe(path)
    assert info.value.reason == reason and info.value.path == str(path)
    assert str(path) in str(info.value)


def test_corrupt_packets_mid_stream_are_reported_by_the_pyav_path(corpus, tmp_path):
    out, truth, _ = corpus
    src = next(out / t["file"] for t in truth if t["codec"] == "h264")
    data = bytearray(src.read_bytes())
    mdat, moov = data.index(b"mdat"), data.index(b"moov")
    assert mdat < moov  # frames first, index after (the muxer's default)
    at = (mdat + moov) // 2
    data[at : at + 300] = bytes(300)  # zeros over compressed frames; the container index stays intact
    bad_mp4 = tmp_path / "corrupt_mid.mp4"
    bad_mp4.write_bytes(bytes(data))
    info = probe(bad_mp4)  # the container itself is fine...
    assert info.num_frames > 0
    dec = VideoDecoder(
        DecoderConfig(backend="pyav", sampling=SamplingConfig("fps", fps=10, num_frames=0), transform=None)
    )
    with pytest.raises(VideoError) as err:  # ...but decoding it is not
        dec.read(str(bad_mp4))
    assert err.value.reason == "corrupt_file" and "decode error" in err.value.detail


def _samples(out: Path, truth: list, bad_files: dict) -> tuple[list[VTGSample], list[str]]:
    """One moment sample per good event, a sample per bad file, and one annotation longer than its video."""
    good, samples = [], []
    for t in truth:
        for k, ev in enumerate(t["events"]):
            sid = f"{t['vid']}:{k}"
            good.append(sid)
            samples.append(VTGSample(sid, str(out / t["file"]), t["duration"], Task.MOMENT_RETRIEVAL, ev["caption"],
                                     (Event(ev["start"], ev["end"]),), f"ann.txt:{len(samples) + 1}"))  # fmt: skip
    for reason, path in bad_files.items():
        samples.append(VTGSample(f"bad:{reason}", str(path), None, Task.MOMENT_RETRIEVAL, "q", (Event(0, 1),),
                                 f"ann.txt:{len(samples) + 1}"))  # fmt: skip
    t0 = truth[0]
    samples.append(VTGSample("bad:short", str(out / t0["file"]), 60.0, Task.MOMENT_RETRIEVAL, "q",
                             (Event(40.0, 50.0),), f"ann.txt:{len(samples) + 1}"))  # fmt: skip
    return samples, good


def _decoder():
    return VideoDecoder(DecoderConfig(sampling=SamplingConfig(num_frames=4), transform=TransformConfig(size=16)))


def test_every_bad_video_is_skipped_and_counted_and_no_good_sample_lost(corpus):
    out, truth, bad_files = corpus
    samples, good = _samples(out, truth, bad_files)
    bad = BadInputs("skip")
    loader = VTGLoader(_decoder_dataset(samples, bad), LoaderConfig(batch_size=1, seed=3, num_workers=2))
    delivered = []
    for batch in loader:
        delivered += batch.sample_ids
        if loader.state_dict()["epoch"] == 1:
            break
    # The first epoch delivered every good sample exactly once, and nothing else.
    assert sorted(delivered[: len(good)]) == sorted(good)
    summary = loader.metrics()
    for reason, path in bad_files.items():
        assert summary[f"bad/{reason}"] >= 1, summary
        assert str(path) in {b.file for b in bad.by_reason(reason)}
    shorts = bad.by_reason("video_shorter_than_annotation")
    assert shorts and shorts[0].file == str(out / truth[0]["file"]) and "needs 60.00s" in shorts[0].detail
    assert summary["loader/samples_delivered"] == len(delivered)


def _decoder_dataset(samples, bad):
    return VTGDataset(samples, _decoder(), bad)


def test_each_bad_video_counted_once_per_sample(corpus):
    out, truth, bad_files = corpus
    samples, good = _samples(out, truth, bad_files)
    bad = BadInputs("skip")
    ds = _decoder_dataset(samples, bad)
    results = [ds.get(i) for i in range(len(ds))]
    assert [r.sample.sample_id for r in results if r is not None] == good
    expected = {f"bad/{r}": 1 for r in bad_files} | {"bad/video_shorter_than_annotation": 1}
    assert {k: v for k, v in bad.summary().items() if k.startswith("bad/") and k != "bad/total"} == expected
    assert bad.summary()["bad/total"] == len(bad_files) + 1


@pytest.mark.parametrize(
    "reason", ["missing_file", "empty_file", "truncated_file", "corrupt_file", "unsupported_codec"]
)
def test_fail_policy_raises_naming_the_file(corpus, reason):
    out, truth, bad_files = corpus
    samples, _ = _samples(out, truth, bad_files)
    ds = _decoder_dataset(samples, BadInputs("fail"))
    idx = next(i for i, s in enumerate(samples) if s.sample_id == f"bad:{reason}")
    with pytest.raises(DataError, match=rf"{bad_files[reason].name}.*{reason}.*annotation ann\.txt:{idx + 1}"):
        ds.get(idx)
    # Through the loader the error reaches the trainer too, in order, and stops the run.
    only = _decoder_dataset([samples[0], samples[idx], samples[1]], BadInputs("fail"))
    seen = []
    with pytest.raises(DataError, match=reason):
        for batch in VTGLoader(only, LoaderConfig(batch_size=1, shuffle=False, prefetch_batches=1)):
            seen += batch.sample_ids
    assert seen == [samples[0].sample_id]


def test_shard_with_only_bad_videos_raises_instead_of_spinning(corpus):
    out, truth, bad_files = corpus
    samples = [s for s in _samples(out, truth, bad_files)[0] if s.sample_id.startswith("bad:")]
    loader = VTGLoader(_decoder_dataset(samples, BadInputs()), LoaderConfig(batch_size=2))
    with pytest.raises(DataError, match="no usable sample in a whole shard"):
        next(iter(loader))


# ---- bookkeeping: counters count inputs, good counts decoded, errors name files (issue 8) ----------


def test_counters_count_bad_files_not_visits(corpus):
    out, truth, bad_files = corpus
    samples, good = _samples(out, truth, bad_files)
    bad = BadInputs("skip")
    ds = _decoder_dataset(samples, bad)
    for _ in range(3):  # three epochs over the same files
        for i in range(len(ds)):
            ds.get(i)
    summary = bad.summary()
    assert summary["bad/missing_file"] == 1 and summary["bad/total"] == len(bad_files) + 1
    assert summary["skipped"] == 3 * (len(bad_files) + 1)  # visits are counted apart, and say so
    assert summary["good"] == len(good)  # each decoded sample once


def test_good_counts_what_decoded_not_what_the_reader_accepted(corpus):
    out, truth, bad_files = corpus
    samples, good = _samples(out, truth, bad_files)
    bad = BadInputs("skip")
    bad.add_read(len(samples))  # what a reader would have counted: every sample it accepted
    ds = _decoder_dataset(samples, bad)
    assert bad.summary()["good"] == 0
    ds.get(0)
    assert bad.summary()["good"] == 1 and bad.summary()["read"] == len(samples)


def test_charades_end_past_the_decoded_video_is_clamped_and_counted(corpus):
    """Charades-STA has no duration: an end up to ~1.5 s past the video is clamped, not skipped."""
    out, truth, _ = corpus
    t = truth[0]
    late = VTGSample("ch:1", str(out / t["file"]), None, Task.MOMENT_RETRIEVAL, "q",
                     (Event(1.0, t["duration"] + 1.4),), "charades.txt:1")  # fmt: skip
    after = VTGSample("ch:2", str(out / t["file"]), None, Task.MOMENT_RETRIEVAL, "q",
                      (Event(t["duration"] + 1.0, t["duration"] + 2.0),), "charades.txt:2")  # fmt: skip
    bad = BadInputs("skip")
    ds = _decoder_dataset([late, after], bad)
    item = ds.get(0)
    assert item is not None and item.events[0].end == pytest.approx(probe(late.video).duration)
    assert ds.get(1) is None  # an event that starts after the video ends is still skipped
    summary = bad.summary()
    assert summary["repaired/clamped_time"] == 1 and summary["bad/video_shorter_than_annotation"] == 1


def test_batching_clips_of_different_sizes_names_the_files(corpus, tmp_path):
    out, truth, _ = corpus
    small = tmp_path / "small.mp4"
    _encode(small, "libx264", n=40)  # 64x48
    big = tmp_path / "big.mp4"
    with av.open(str(big), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), i, np.uint8), format="rgb24")
            frame.pts = i
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    samples = [VTGSample(f"s{i}", str(p), None, Task.MOMENT_RETRIEVAL, "q", (Event(0, 1),), f"a:{i}")
               for i, p in enumerate([small, big])]  # fmt: skip
    dec = VideoDecoder(DecoderConfig(sampling=SamplingConfig(num_frames=2), transform=None))
    loader = VTGLoader(VTGDataset(samples, dec, BadInputs()), LoaderConfig(batch_size=2, shuffle=False))
    with pytest.raises(DataError, match=r"big\.mp4.*small\.mp4.*transform"):
        next(iter(loader))
