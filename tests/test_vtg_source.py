"""The VTG training data source (integration interface 1) on really generated and decoded synthetic videos:
microbatch shapes and dtypes, targets, the same global batch at DP 1 and 2, resume from consumed_samples,
frame TIME tokens = decoded presentation times, a corrupt video skipped and counted, the frame cache,
the held-out split by video, overflow errors."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dali_pipes import DecoderConfig, SamplingConfig, VideoDecoder
from megatron_timeexpert.data import events as E
from megatron_timeexpert.data import vtg
from megatron_timeexpert.data.stats import BadInputs
from megatron_timeexpert.data.tokenizer import TextTokenizer, TokenizerTrainConfig
from megatron_timeexpert.data.vtg_source import (
    MICROBATCH_KEYS,
    VTGSource,
    VTGSourceConfig,
    load_samples,
    resize_frames,
)
from megatron_timeexpert.moe.types import TokenType
from tools.make_synthetic_vtg import GeneratorConfig, generate

pytestmark = pytest.mark.timeout(120)
F_ = 4
SIZE = 16
SEQ = 256
PER_FRAME = 8 + E.TIME_WIDTH + 1


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vtg_src")
    generate(GeneratorConfig(out, 4, seed=3, width=32, height=24, min_duration=4, max_duration=6, progress=False))
    return out


@pytest.fixture(scope="module")
def tok(root, tmp_path_factory) -> TextTokenizer:
    d = tmp_path_factory.mktemp("vtg_src_tok")
    vtg.write_corpus(load_samples(VTGSourceConfig(root=str(root)), BadInputs()), d / "corpus.txt")
    return TextTokenizer.train([d / "corpus.txt"], d / "tok", TokenizerTrainConfig(vocab_size=384))


def make(root, tok, dp_rank=0, dp_size=1, gbs=4, mbs=2, seq=SEQ, **kw) -> VTGSource:
    kw = {"num_frames": F_, "image_size": SIZE, **kw}
    cfg = VTGSourceConfig(root=str(root), **kw)
    return VTGSource(cfg, seq, tok, gbs, mbs, dp_rank, dp_size)


def steps(src: VTGSource, first: int, n: int) -> list[list[dict]]:
    return [src.microbatches(first + k * src.global_batch_size) for k in range(n)]


def global_batch(sources: list[VTGSource], consumed: int) -> dict:
    """The ranks' microbatches of one step, concatenated in rank order."""
    mbs = [mb for s in sources for mb in s.microbatches(consumed)]
    out = {k: torch.cat([mb[k] for mb in mbs]) for k in MICROBATCH_KEYS if k != "sample_ids"}
    out["sample_ids"] = [i for mb in mbs for i in mb["sample_ids"]]
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a["sample_ids"] == b["sample_ids"]
    for k in MICROBATCH_KEYS:
        if k != "sample_ids":
            assert torch.equal(a[k], b[k]), k


def test_microbatch_interface(root, tok):
    with make(root, tok, gbs=4, mbs=2) as src:
        mbs = src.microbatches(0)
        assert len(mbs) == 2
        for mb in mbs:
            assert list(mb) == list(MICROBATCH_KEYS)
            for k in ("ids", "types", "position_ids", "labels", "label_types"):
                assert mb[k].dtype == torch.long and mb[k].shape == (2, SEQ), k
            assert mb["loss_mask"].dtype == torch.float32 and mb["loss_mask"].shape == (2, SEQ)
            assert mb["frames"].dtype == torch.uint8 and mb["frames"].shape == (2 * F_, SIZE, SIZE, 3)
            assert len(mb["sample_ids"]) == 2 and all(isinstance(i, str) for i in mb["sample_ids"])
            assert torch.equal(mb["position_ids"][1], torch.arange(SEQ))
            # next-token targets: labels are ids shifted left, the mask sits on the predicting position
            assert torch.equal(mb["labels"][:, :-1], mb["ids"][:, 1:])
            assert torch.equal(mb["label_types"][:, :-1], mb["types"][:, 1:])
            for row in range(2):
                on = mb["loss_mask"][row].nonzero().flatten()
                first, last = int(on[0]), int(on[-1])
                assert torch.equal(on, torch.arange(first, last + 1))  # one contiguous response
                assert (int(mb["labels"][row, first]), int(mb["label_types"][row, first])) == (
                    tok.sync_id,
                    int(TokenType.TEXT),
                )
                assert (int(mb["labels"][row, last]), int(mb["label_types"][row, last])) == (
                    tok.eos_id,
                    int(TokenType.TEXT),
                )
                assert (mb["ids"][row, last + 2 :] == tok.pad_id).all()
                first_vis = int((mb["types"][row] == int(TokenType.VISUAL)).nonzero()[0])
                assert first_vis > 1  # the query first
                assert int(mb["types"][row, first_vis + 8]) == int(TokenType.TIME)  # frame 0's time after its 8 slots
            assert mb["frame_times"].dtype == torch.float32 and mb["frame_times"].shape == (2, F_)
            assert mb["frame_targets"].dtype == torch.float32 and mb["frame_targets"].shape == (2, SEQ)
            assert ((mb["frame_targets"] >= 0).sum(1) == F_).all()
        m = src.metrics()
        assert m["data/samples_delivered"] == 4 and m["data/decode_timeouts"] == 0


def test_global_batch_same_for_dp1_and_dp2(root, tok):
    one = [make(root, tok, gbs=4, mbs=1)]
    two = [make(root, tok, r, 2, gbs=4, mbs=1) for r in range(2)]
    n = len(one[0])
    try:
        seen = []
        for consumed in range(0, 2 * n + 4, 4):  # crosses two epoch boundaries
            a, b = global_batch(one, consumed), global_batch(two, consumed)
            assert_same(a, b)
            seen += a["sample_ids"]
        assert set(seen[:n]) == {s.sample_id for s in one[0].samples}  # an epoch visits every sample once
        assert seen[:n] != seen[n : 2 * n]  # and the next epoch has another order
    finally:
        for s in one + two:
            s.close()


def test_resume_continues_with_the_next_samples(root, tok):
    with make(root, tok) as a:
        steps(a, 0, 3)
        state = a.state_dict()
        assert state["consumed_samples"] == 12
        expected = steps(a, 12, 2)
    with make(root, tok) as b:
        b.load_state_dict(state)
        with pytest.raises(ValueError, match="resumed at consumed_samples=12"):
            b.microbatches(8)
        got = steps(b, 12, 2)
    for ma, mb in zip(expected, got, strict=True):
        for x, y in zip(ma, mb, strict=True):
            assert_same(x, y)
    with make(root, tok, seed=1) as c, pytest.raises(ValueError, match="seed"):
        c.load_state_dict(state)
    with make(root, tok, tasks=("moment_retrieval",)) as d, pytest.raises(ValueError, match="data set or seed"):
        d.load_state_dict(state)


def test_time_tokens_are_the_decoded_presentation_times(root, tok):
    ref = VideoDecoder(DecoderConfig(backend="pyav", sampling=SamplingConfig("uniform", F_), transform=None))
    with make(root, tok, backend="pyav") as src:
        video = {s.sample_id: s.video for s in src.samples}
        src_sample = {s.sample_id: s for s in src.samples}
        rows = 0
        for mbs in steps(src, 0, 2):
            for mb in mbs:
                for r, sid in enumerate(mb["sample_ids"]):
                    clip = ref.read(video[sid])
                    times = clip.timestamps.tolist()
                    assert len(set(times)) == F_ and times[-1] > 1.0  # real, distinct, non-trivial times
                    visual = (mb["types"][r] == int(TokenType.VISUAL)).nonzero().flatten().tolist()
                    assert len(visual) == 8 * F_ and visual[0] > 1  # the query comes first (default layout)
                    events = [(e.start, e.end) for e in src_sample[sid].events if e.saliency is None or e.saliency > 0]
                    for f in range(F_):
                        at = visual[8 * f] + 8
                        assert (mb["types"][r, at : at + E.TIME_WIDTH + 1] == int(TokenType.TIME)).all()
                        chars = E.number_chars(mb["ids"][r, at : at + E.TIME_WIDTH].tolist())
                        assert chars == E.format_time(times[f]), (sid, f)
                        assert int(mb["ids"][r, at + E.TIME_WIDTH]) == E.NUM_SEP
                        # the frame head's target sits on the frame's <sep>: inside one of the sample's events?
                        inside = any(a - 1e-6 <= times[f] <= b + 1e-6 for a, b in events)
                        assert float(mb["frame_targets"][r, at + E.TIME_WIDTH]) == float(inside), (sid, f)
                    assert int((mb["frame_targets"][r] >= 0).sum()) == F_
                    assert mb["frame_times"][r].tolist() == pytest.approx(times, abs=1e-6)
                    frames = mb["frames"][r * F_ : (r + 1) * F_]
                    assert torch.equal(frames, resize_frames(clip.frames, SIZE))
                    rows += 1
        assert rows == 8


def test_corrupt_video_is_skipped_and_counted(root, tok, tmp_path):
    bad_root = tmp_path / "bad"
    shutil.copytree(root, bad_root)
    victim = sorted((bad_root / "videos").iterdir())[1]
    victim.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    one = [make(bad_root, tok, gbs=4, mbs=2, decode_timeout_s=30)]
    two = [make(bad_root, tok, r, 2, gbs=4, mbs=2, decode_timeout_s=30) for r in range(2)]
    n = len(one[0])
    by_video = {s.sample_id: Path(s.video).name for s in one[0].samples}
    try:
        ids = []
        for consumed in range(0, 2 * n, 4):
            a, b = global_batch(one, consumed), global_batch(two, consumed)
            assert_same(a, b)  # replacements are the same whatever the layout
            ids += a["sample_ids"]
        assert victim.name not in {by_video[i] for i in ids}
        m = one[0].metrics()
        assert m["data/bad/corrupt_file"] == 1, m
        visits = sum(Path(s.video).name == victim.name for s in one[0].samples)
        assert visits >= 1 and m["data/skipped"] >= 2 * visits - 1  # counted at every visit, 2 epochs
        assert m["data/replaced"] >= 1 and m["data/decode_timeouts"] == 0
    finally:
        for s in one + two:
            s.close()


def test_frame_cache(root, tok, tmp_path):
    with make(root, tok, cache_memory_mb=0) as plain, make(root, tok, cache_dir=str(tmp_path / "fc")) as cached:
        n = len(cached)
        ref = steps(plain, 0, n // 2)
        first = steps(cached, 0, n // 2)
        misses = cached.metrics()["data/cache_misses"]
        assert misses == 4  # one decode per video
        again = steps(cached, 0, n // 2)
        m = cached.metrics()
        assert m["data/cache_misses"] == misses and m["data/cache_hits"] >= n
        assert plain.metrics()["data/cache_hits"] == 0
    assert len(list((tmp_path / "fc").glob("*.npy"))) == 4
    with make(root, tok, cache_dir=str(tmp_path / "fc")) as disk:
        from_disk = steps(disk, 0, n // 2)
        assert disk.metrics()["data/cache_misses"] == 0
    for step in zip(ref, first, again, from_disk, strict=True):
        for x, *others in zip(*step, strict=True):
            for y in others:
                assert_same(x, y)


def test_held_out_split_is_by_video(root, tok):
    def videos(split):
        return {Path(s.video).name for s in load_samples(VTGSourceConfig(root=str(root), split=split), BadInputs())}

    train, test, every = videos("train"), videos("test"), videos("all")
    assert test and train and not train & test and train | test == every
    with make(root, tok, split="test") as src:
        assert {Path(s.video).name for s in src.samples} == test
        assert src.state_dict()["samples_sha1"] != make(root, tok).state_dict()["samples_sha1"]


def test_overflow_error_names_the_sample(root, tok):
    with make(root, tok, seq=1 + F_ * PER_FRAME + 12) as src, pytest.raises(vtg.SequenceTooLong, match=r":\d|syn"):
        src.microbatches(0)
    with pytest.raises(ValueError, match="VTGSourceConfig.num_frames"):
        make(root, tok, num_frames=0)


def test_config_from_yaml_shapes(root, tok):
    cfg = VTGSourceConfig(root=str(root), annotations={"charades_sta": "charades_sta.txt"}, tasks=["moment_retrieval"])
    samples = load_samples(cfg, BadInputs())
    assert samples and all(s.dataset == "charades_sta" for s in samples)
    cfg.tasks = ["dense_captioning"]  # set after construction, as a YAML loader does
    with pytest.raises(ValueError, match="no training sample"):
        VTGSource(cfg, SEQ, tok, 2, 1, 0, 1)
    with pytest.raises(ValueError, match="VTGSourceConfig.annotations"):
        VTGSource(VTGSourceConfig(root=str(root), annotations={"nope": "x.txt"}), SEQ, tok, 2, 1, 0, 1)


class HangingDecoder(VideoDecoder):
    """A fault hook (as tests/test_data_deadline.py): ``read`` of one file blocks until released (at most a
    minute), like a decoder stuck in C code on a pathological file."""

    def __init__(self, cfg: DecoderConfig, hang_on: str) -> None:
        super().__init__(cfg)
        self.hang_on = hang_on
        self.release = threading.Event()

    def read(self, path, *args, **kwargs):
        if path == self.hang_on:
            self.release.wait(timeout=60)
        return super().read(path, *args, **kwargs)


def test_hanging_decode_is_skipped_at_the_deadline(root, tok):
    cfg = VTGSourceConfig(root=str(root), num_frames=F_, image_size=SIZE, decode_timeout_s=1.0, cache_memory_mb=0)
    probe_src = VTGSource(cfg, SEQ, tok, 4, 2, 0, 1)
    first = probe_src.samples[next(probe_src.candidates(0))].video  # the video of the step's first sample
    probe_src.close()
    dec = HangingDecoder(DecoderConfig(backend="pyav", sampling=SamplingConfig("uniform", F_), transform=None), first)
    try:
        with VTGSource(cfg, SEQ, tok, 4, 2, 0, 1, decoder=dec) as src:
            video = {s.sample_id: s.video for s in src.samples}
            t0 = time.monotonic()
            ids = [i for c in range(0, len(src), 4) for mb in src.microbatches(c) for i in mb["sample_ids"]]
            elapsed = time.monotonic() - t0
            m = src.metrics()
        assert first not in {video[i] for i in ids} and len(ids) == 4 * len(range(0, len(video), 4))
        assert m["data/decode_timeouts"] == 1 and m["data/bad/decode_timeout"] == 1, m
        assert elapsed < 15, elapsed  # one deadline of 1 s, not the minute the decode hangs
    finally:
        dec.release.set()
