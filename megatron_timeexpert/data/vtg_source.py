"""The VTG training data source of the TimeExpert video LLM: decoded frames + event token sequences per DP rank.

::

    src = VTGSource(VTGSourceConfig(root="ROOT", tokenizer="tok.model", num_frames=8, image_size=64),
                    seq_length=512, tokenizer=None, global_batch_size=8, micro_batch_size=2, dp_rank=r, dp_size=dp)
    mbs = src.microbatches(consumed_samples)   # this rank's microbatches of the step starting there

``ROOT`` is what ``python -m tools.make_synthetic_vtg --out ROOT`` writes (``ROOT/videos``,
``ROOT/annotations``; real data laid out the same way works too). Each microbatch is a dict
(docs/DATA.md "Training data source", integration interface 1), tensors on CPU:
``ids, types, position_ids, labels, label_types`` long ``[b, S]``, ``loss_mask`` float ``[b, S]``
(:func:`~megatron_timeexpert.model.timeexpert.next_token_targets` of data/vtg.py's target mask, so
aligned with the predicting position), ``frames`` uint8 ``[b*F, H, W, 3]`` (sample-major, frame
order), ``frame_times`` float32 ``[b, F]`` (presentation times, seconds), ``frame_targets`` float32
``[b, S]`` (per-frame relevance at each frame's last position, -1 elsewhere; NOT shifted: the frame
head scores the position itself) and ``sample_ids`` (list of str).

Order (layout-invariant, resumable): the samples are one list (annotation files in config order,
filtered by task and split). Epoch ``e`` is a permutation drawn from ``(seed, e)``; global sample
``g`` is entry ``g mod N`` of epoch ``g div N``'s permutation. The global batch of the step starting
at ``consumed_samples = c`` is ``[c, c + G)``; DP rank ``r`` takes the contiguous block
``[c + r*G/dp, c + (r+1)*G/dp)`` and cuts it into microbatches (as train/synthetic.py), so the
global batch is the same whatever the DP size, and the position is ``consumed_samples`` itself.

Bad inputs: a sample whose video is unusable (missing, corrupt, truncated, shorter than its
annotation, a decode error, a decode past ``decode_timeout_s``) is counted through
:class:`~.stats.BadInputs` and replaced by the next entry of the same epoch's permutation whose
video works (wrapping around). Badness of a file is a property of the file, so the replacement is
the same on every rank and every layout; only a decode *timeout* (machine load) can differ between
runs. A whole epoch without a usable sample raises :class:`~.stats.DataError`.

Decoding runs on ``num_workers`` threads (:mod:`.workers`, every wait bounded by the deadline); the
next step's videos are prefetched after each call. Frames are decoded raw (``transform=None``) with
``dali_pipes.VideoDecoder`` (backend ``auto``: DALI where installed and trusted for the codec, else
PyAV; logged once per codec) and resized on the CPU to ``image_size`` square the way the vision
tower resizes (bicubic, antialiased, aspect ratio not kept), so the tower's own resize is a no-op.

Frame cache: decoded (resized) frames of a video are kept keyed by the file (path, size, mtime),
the frame presentation times and ``image_size``: in memory (LRU bounded by ``cache_memory_mb``) and,
with ``cache_dir``, as ``<key>.npy`` files shared by ranks and runs. Repeated epochs over a small set
then decode nothing. Nothing here touches torch.distributed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dali_pipes import DecoderConfig, SamplingConfig, VideoDecoder, VideoError, dali_backend
from dali_pipes.sampling import select_frames
from megatron_timeexpert.data import stats as S
from megatron_timeexpert.data import vtg
from megatron_timeexpert.data.annotations import READERS, ReaderConfig, read_annotations
from megatron_timeexpert.data.dataset import VTGDataset
from megatron_timeexpert.data.stats import BadInputs, DataError
from megatron_timeexpert.data.tokenizer import TextTokenizer
from megatron_timeexpert.data.types import Task, VTGSample
from megatron_timeexpert.data.workers import DecodeTask, TaskTimeout, WorkerPool

log = logging.getLogger(__name__)

TASKS = tuple(t.value for t in Task)
SPLITS = ("all", "train", "test")
DEFAULT_ANNOTATIONS = (
    ("charades_sta", "charades_sta.txt"),
    ("qvhighlights", "qvhighlights.jsonl"),
    ("activitynet", "activitynet_captions.json"),
)
"""(reader, file under ``ROOT/annotations``) read by default: Charades-STA (moment retrieval),
QVHighlights (its windows for moment retrieval and its saliency for highlight detection) and the
ActivityNet Captions file (dense captioning). ``youcook2.json`` is the same videos' dense captions
in the other format (use one of the two, not both, or each caption set is trained twice)."""
SPLIT_SALT = b"timeexpert-vtg-split"
MICROBATCH_KEYS = (
    "ids", "types", "position_ids", "labels", "label_types", "loss_mask", "frames", "frame_times", "frame_targets",
    "sample_ids",
)  # fmt: skip


@dataclass
class VTGSourceConfig:
    """Where the VTG training data is and how a sample becomes frames + a token sequence."""

    root: str = ""
    """Data directory as ``tools.make_synthetic_vtg --out ROOT`` writes it: ``ROOT/videos`` holds the videos
    and ``ROOT/annotations`` the annotation files named in ``annotations``."""
    annotations: tuple[tuple[str, str], ...] = DEFAULT_ANNOTATIONS
    """``(reader, file)`` pairs; ``reader`` is a key of data/annotations.py READERS (``charades_sta``,
    ``qvhighlights``, ``youcook2``, ``activitynet``, ``instruction``); a relative ``file`` is under
    ``ROOT/annotations``. Also accepted as a mapping ``{reader: file}`` (YAML)."""
    tasks: tuple[str, ...] = TASKS
    """Tasks kept: any of ``moment_retrieval``, ``highlight_detection``, ``dense_captioning``."""
    split: str = "all"
    """``all``, or ``train`` / ``test``: a deterministic split BY VIDEO (no video in both; see ``test_fraction``)."""
    test_fraction: float = 0.1
    """Share of the videos in the ``test`` split (at least one video when there are two or more): the videos
    ranked first by SHA-1 of their file name (stem) form it; independent of ``seed``."""
    num_frames: int = 8
    """F: frames per sample, at the centres of F equal segments of the video, snapped to the nearest shown
    frame; their presentation times (from the decoder) are the TIME tokens of the video block."""
    image_size: int = 64
    """Frames are resized to ``image_size x image_size`` (bicubic, antialiased, aspect ratio not kept, like the
    vision tower); 0 keeps the decoded size (then all videos of a microbatch must have the same size)."""
    tokenizer: str = ""
    """Path of the sentencepiece ``.model`` (data/tokenizer.py); used when no tokenizer object is passed."""
    backend: str = "auto"
    """Decoder backend (dali_pipes): ``auto`` (DALI where installed and cross-checked for the codec, PyAV
    otherwise; logged once per codec), or force ``pyav``, ``dali-cpu``, ``dali-mixed``."""
    decode_timeout_s: float = 120.0
    """Longest wait for one video's decode once a thread has started it; past it the video is skipped and
    counted as ``decode_timeout`` (the thread is replaced)."""
    num_workers: int = 2
    """Decoding threads per rank."""
    seed: int = 0
    """Seed of the per-epoch permutation (the same on every rank)."""
    overflow: str = "error"
    """A sample longer than the sequence length: ``error`` (SequenceTooLong naming the sample) or
    ``drop_events`` (its last events are dropped until it fits; counted in ``data/dropped_events``)."""
    bad_policy: str = "skip"
    """``skip``: bad inputs are counted and replaced; ``fail``: the first one raises DataError naming it."""
    cache_memory_mb: int = 512
    """In-memory frame cache bound (MiB of uint8 frames, least recently used evicted); 0 disables it."""
    cache_dir: str = ""
    """Directory of the on-disk frame cache (``<key>.npy`` per video and frame set, shared by ranks and runs;
    written atomically); empty: no disk cache."""
    time_tolerance: float = 0.5
    """Seconds an annotation may run past the video before the sample counts as bad (data/dataset.py)."""
    query_first: bool = True
    """The instruction comes before the video block (data/vtg.py ``SequenceConfig.query_first``)."""
    frame_time_tokens: bool = True
    """Each frame's block ends with its time as TIME tokens (``SequenceConfig.frame_time_tokens``)."""
    time_digits: int = 4
    """Integer digits of every time token (``SequenceConfig.time_digits``; 2 for videos under 100 s)."""

    def sequence_config(self) -> vtg.SequenceConfig:
        """The token layout these settings give (data/vtg.py)."""
        return vtg.SequenceConfig(
            query_first=self.query_first, frame_time_tokens=self.frame_time_tokens, time_digits=self.time_digits
        )

    def __post_init__(self) -> None:
        self._normalise()

    def _normalise(self) -> None:
        """Lists and mappings (as YAML gives them) to the tuples the fields hold."""
        if isinstance(self.annotations, dict):
            self.annotations = tuple(self.annotations.items())
        try:
            self.annotations = tuple((str(r), str(f)) for r, f in self.annotations)
        except (TypeError, ValueError):
            raise ValueError(
                f"VTGSourceConfig.annotations={self.annotations!r}: must be (reader, file) pairs or {{reader: file}}"
            ) from None
        self.tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)

    def validate(self) -> None:
        """Raise ValueError naming the field at fault (fields set after construction are normalised first)."""
        self._normalise()

        def bad(name: str, rule: str) -> None:
            raise ValueError(f"VTGSourceConfig.{name}={getattr(self, name)!r}: {rule}")

        if not self.root:
            bad("root", "set it to a directory written by tools.make_synthetic_vtg")
        if not self.annotations:
            bad("annotations", "needs at least one (reader, file)")
        for reader, _ in self.annotations:
            if reader not in READERS:
                bad("annotations", f"reader {reader!r} is not one of {sorted(READERS)}")
        if not self.tasks or any(t not in TASKS for t in self.tasks):
            bad("tasks", f"must be a non-empty subset of {TASKS}")
        if self.split not in SPLITS:
            bad("split", f"must be one of {SPLITS}")
        if not 0.0 < self.test_fraction < 1.0:
            bad("test_fraction", "must be in (0, 1)")
        if self.num_frames < 1:
            bad("num_frames", "must be >= 1")
        if self.image_size < 0:
            bad("image_size", "must be >= 0 (0 keeps the decoded size)")
        if not self.decode_timeout_s > 0:
            bad("decode_timeout_s", "must be > 0 (every wait is bounded)")
        if self.num_workers < 1:
            bad("num_workers", "must be >= 1")
        if self.overflow not in vtg.OVERFLOW_POLICIES:
            bad("overflow", f"must be one of {vtg.OVERFLOW_POLICIES}")
        if self.bad_policy not in S.POLICIES:
            bad("bad_policy", f"must be one of {S.POLICIES}")
        if self.cache_memory_mb < 0:
            bad("cache_memory_mb", "must be >= 0")
        try:
            self.sequence_config()
        except ValueError as exc:
            bad("time_digits", str(exc))


# ---- the sample list ---------------------------------------------------------------------------------


def split_videos(videos: list[str], test_fraction: float) -> set[str]:
    """The test videos among ``videos`` (paths): the first ``max(1, round(f * n))`` by SHA-1 of the file stem
    (none when there is a single video). Depends on the set of videos only, not on seeds or order."""
    names = sorted(set(videos), key=lambda v: (hashlib.sha1(SPLIT_SALT + Path(v).stem.encode()).hexdigest(), v))
    if len(names) < 2:
        return set()
    return set(names[: max(1, round(test_fraction * len(names)))])


def load_samples(cfg: VTGSourceConfig, bad: BadInputs) -> list[VTGSample]:
    """The training samples: every annotation file read in config order, samples with a wanted task and at
    least one target event (query-only samples are prediction inputs, not training data), then the split."""
    root = Path(cfg.root)
    video_root = root / "videos"
    if not video_root.is_dir():
        raise DataError(f"VTGSourceConfig.root={cfg.root!r}: no videos directory {video_root}")
    rcfg = ReaderConfig(video_root, time_tolerance=cfg.time_tolerance)
    wanted = {Task(t) for t in cfg.tasks}
    samples: list[VTGSample] = []
    for reader, name in cfg.annotations:
        path = Path(name) if Path(name).is_absolute() else root / "annotations" / name
        for s in read_annotations(reader, path, rcfg, bad):
            if s.task in wanted and s.events:
                samples.append(s)
    if cfg.split != "all":
        test = split_videos([s.video for s in samples], cfg.test_fraction)
        samples = [s for s in samples if (s.video in test) == (cfg.split == "test")]
    if not samples:
        raise DataError(
            f"VTGSourceConfig: no training sample under {root} for tasks {list(cfg.tasks)}, split {cfg.split!r} "
            f"(annotations {[f for _, f in cfg.annotations]}); bad inputs: {bad.summary()}"
        )
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"VTGSourceConfig.annotations: sample id {dup!r} occurs twice (a file listed twice?)")
    return samples


def samples_digest(samples: list[VTGSample]) -> str:
    """SHA-1 of what the sample list trains on (ids, video file names, tasks, queries, events), in order;
    independent of where ROOT lives."""
    h = hashlib.sha1()
    for s in samples:
        h.update(repr((s.sample_id, Path(s.video).name, s.task.value, s.query, s.events)).encode())
    return h.hexdigest()


# ---- frames --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Clip:
    frames: torch.Tensor  # uint8 [F, H, W, 3]
    times: torch.Tensor  # float64 [F]
    duration: float
    backend: str


def resize_frames(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> uint8 ``[N, size, size, 3]`` (bicubic, antialiased, aspect ratio not kept)."""
    if size == 0 or tuple(frames.shape[1:3]) == (size, size):
        return frames.contiguous()
    x = frames.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class FrameCache:
    """Decoded frames by key: an LRU in memory (bounded in bytes) and optionally ``<key>.npy`` files. Thread-safe."""

    def __init__(self, memory_mb: int, cache_dir: str = "") -> None:
        self.limit = memory_mb * 2**20
        self.dir = Path(cache_dir) if cache_dir else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            got = self._mem.get(key)
            if got is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return got
        if self.dir is not None:
            path = self.dir / f"{key}.npy"
            if path.is_file():
                try:
                    got = torch.from_numpy(np.load(path))
                except (OSError, ValueError) as exc:
                    log.warning("frame cache: unreadable %s (%s); decoding again", path, exc)
                    got = None
                if got is not None:
                    self._remember(key, got)
                    with self._lock:
                        self.hits += 1
                    return got
        with self._lock:
            self.misses += 1
        return None

    def put(self, key: str, frames: torch.Tensor) -> None:
        self._remember(key, frames)
        if self.dir is not None:
            path = self.dir / f"{key}.npy"
            if not path.exists():
                tmp = self.dir / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp.npy"
                np.save(tmp, frames.numpy())
                os.replace(tmp, path)

    def _remember(self, key: str, frames: torch.Tensor) -> None:
        n = frames.numel() * frames.element_size()
        if n > self.limit:
            return
        with self._lock:
            if key in self._mem:
                return
            self._mem[key] = frames
            self._bytes += n
            while self._bytes > self.limit:
                _, old = self._mem.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()


# ---- the source ----------------------------------------------------------------------------------------


class VTGSource:
    """This DP rank's microbatches of VTG samples for each step (see the module docstring)."""

    def __init__(
        self,
        cfg: VTGSourceConfig,
        seq_length: int,
        tokenizer: TextTokenizer | None,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        *,
        decoder: VideoDecoder | None = None,
    ) -> None:
        """``decoder``: a ready ``dali_pipes.VideoDecoder`` to use instead of building one from ``cfg`` (it must
        return raw frames, ``transform=None``, sampled ``uniform`` with ``num_frames``); for tests and sharing."""
        cfg.validate()
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"VTGSource: dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if micro_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"VTGSource: global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                f"{micro_batch_size} x dp_size {dp_size}"
            )
        self.cfg = cfg
        self.seq_length = seq_length
        self.tokenizer = tokenizer if tokenizer is not None else self._load_tokenizer(cfg)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.bad = BadInputs(cfg.bad_policy)
        self.samples = load_samples(cfg, self.bad)
        self.digest = samples_digest(self.samples)
        self.seq_cfg = cfg.sequence_config()
        min_len = 1 + cfg.num_frames * self.seq_cfg.frame_length + 2
        if seq_length < min_len:
            raise ValueError(
                f"VTGSource: seq_length {seq_length} cannot hold {cfg.num_frames} frames "
                f"({cfg.num_frames} x {self.seq_cfg.frame_length} positions) plus BOS and EOS"
            )
        self.decoder = decoder or VideoDecoder(
            DecoderConfig(backend=cfg.backend, sampling=SamplingConfig("uniform", cfg.num_frames), transform=None)
        )
        dc = self.decoder.cfg
        if dc.transform is not None or dc.sampling.mode != "uniform" or dc.sampling.num_frames != cfg.num_frames:
            raise ValueError(
                f"VTGSource: the decoder must return raw frames sampled uniform x {cfg.num_frames}, got transform "
                f"{dc.transform} and sampling {dc.sampling}"
            )
        # Probing (cached per video) and the annotation-vs-video check are data/dataset.py's.
        self.dataset = VTGDataset(self.samples, self.decoder, self.bad, time_tolerance=cfg.time_tolerance)
        self.cache = FrameCache(cfg.cache_memory_mb, cfg.cache_dir)
        self._pool = WorkerPool(cfg.num_workers, f"vtg-source-r{dp_rank}")
        self._pending: dict[str, DecodeTask] = {}
        self._done: dict[str, _Clip] = {}  # clips of the current call (a video shared by samples is decoded once)
        self._bad_videos: dict[str, tuple[str, str]] = {}
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()  # the last two epochs' permutations
        self._lock = threading.Lock()
        self._consumed = 0
        self._expect: int | None = None
        self.wait_seconds = 0.0
        """Seconds the last :meth:`microbatches` call blocked on decoding."""
        self.total_wait_seconds = 0.0
        self.decode_timeouts = 0
        self.replaced = 0
        self.dropped_events = 0
        self.samples_delivered = 0
        self.backends: dict[str, int] = {}
        dali = dali_backend.version()
        log.info(
            "VTGSource rank %d/%d: %d samples (%s, split %s) from %s; decoder backend %s (%s, %s); %d frames of %s",
            dp_rank, dp_size, len(self.samples), ",".join(cfg.tasks), cfg.split, cfg.root, cfg.backend,
            f"DALI {dali}" if dali else "DALI not installed: PyAV",
            "CUDA" if torch.cuda.is_available() else "no CUDA", cfg.num_frames,
            f"{cfg.image_size}x{cfg.image_size}" if cfg.image_size else "native size",
        )  # fmt: skip

    @staticmethod
    def _load_tokenizer(cfg: VTGSourceConfig) -> TextTokenizer:
        if not cfg.tokenizer:
            raise ValueError("VTGSourceConfig.tokenizer: no tokenizer path set and no tokenizer object passed")
        return TextTokenizer.load(cfg.tokenizer)

    def __len__(self) -> int:
        return len(self.samples)

    # ---- order ----

    def permutation(self, epoch: int) -> np.ndarray:
        """Sample indices of ``epoch`` in order (a pure function of ``(seed, epoch)`` and the list size)."""
        with self._lock:
            if epoch not in self._perms:
                self._perms[epoch] = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.samples))
                while len(self._perms) > 2:
                    self._perms.popitem(last=False)
            return self._perms[epoch]

    def rank_positions(self, consumed_samples: int, dp_rank: int | None = None) -> range:
        """Global sample positions rank ``dp_rank`` (default: this one) takes in the step at ``consumed_samples``."""
        per_rank = self.global_batch_size // self.dp_size
        first = consumed_samples + (self.dp_rank if dp_rank is None else dp_rank) * per_rank
        return range(first, first + per_rank)

    def candidates(self, g: int):
        """Sample indices for global position ``g``: its own, then the next ones of its epoch (wrapping)."""
        n = len(self.samples)
        perm = self.permutation(g // n)
        i = g % n
        for j in range(n):
            yield int(perm[(i + j) % n])

    # ---- checkpointing ----

    def state_dict(self) -> dict:
        """Where the next step starts: ``consumed_samples`` (the position; the same on every rank) plus what
        identifies the sample order (seed, list size and digest)."""
        return {
            "consumed_samples": self._consumed,
            "seed": self.cfg.seed,
            "num_samples": len(self.samples),
            "samples_sha1": self.digest,
        }

    def load_state_dict(self, state: dict) -> None:
        """Check that ``state`` was saved over the same samples and order; the next :meth:`microbatches` call
        must then start at its ``consumed_samples`` (the trainer's own counter)."""
        mine = self.state_dict()
        for key in ("seed", "num_samples", "samples_sha1"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"VTGSource.load_state_dict: the checkpoint's {key}={state[key]!r} differs from this source's "
                    f"{mine[key]!r} (root {self.cfg.root}, tasks {list(self.cfg.tasks)}, split {self.cfg.split}): the "
                    "data set or seed changed, so resuming would not continue with the next samples"
                )
        self._consumed = int(state["consumed_samples"])
        self._expect = self._consumed

    # ---- decoding ----

    def _frame_key(self, path: str, times: np.ndarray) -> str:
        st = os.stat(path)
        ident = (os.path.abspath(path), st.st_size, st.st_mtime_ns, self.cfg.image_size, np.round(times, 6).tolist())
        return hashlib.sha1(repr(ident).encode()).hexdigest()

    def _decode_video(self, path: str, deadline: float) -> _Clip:
        """Frames of ``path`` (from the cache or decoded); raises VideoError or anything the decoder raises."""
        info = self.dataset._info(path)
        times = np.asarray(info.pts, dtype=np.float64)[
            select_frames(self.decoder.cfg.sampling, info.pts, info.duration)
        ]
        key = self._frame_key(path, times)
        frames = self.cache.get(key)
        if frames is not None:
            return _Clip(frames, torch.from_numpy(times.copy()), info.duration, "cache")
        clip = self.decoder.read(path, info=info, deadline=deadline)
        frames = resize_frames(clip.frames.cpu(), self.cfg.image_size)
        got = clip.timestamps.to(torch.float64)
        if got.shape == (len(times),) and np.allclose(got.numpy(), times, rtol=0, atol=1e-9):
            self.cache.put(key, frames)
        else:
            log.warning("%s: decoder times %s differ from the probe's %s; frames not cached", path, got, times)
        return _Clip(frames, got, clip.duration, clip.backend)

    def _submit(self, path: str) -> None:
        if path not in self._pending and path not in self._bad_videos:
            self._pending[path] = self._pool.submit(self._decode_video, path, self.cfg.decode_timeout_s)

    def _clip(self, sample: VTGSample) -> _Clip | None:
        """The sample's clip, or None after counting its video as bad (each visit is a skip)."""
        path = sample.video
        if path in self._bad_videos:
            reason, detail = self._bad_videos[path]
            self.bad.report(reason, path, "", detail)
            return None
        if path in self._done:
            return self._done[path]
        self._submit(path)
        task = self._pending[path]
        t0 = time.perf_counter()
        try:
            clip = task.wait()
            self._done[path] = clip
            return clip
        except TaskTimeout as exc:
            self._pool.abandon(task)
            self.decode_timeouts += 1
            reason, detail = S.DECODE_TIMEOUT, f"{exc} (deadline {self.cfg.decode_timeout_s}s); decode thread replaced"
        except VideoError as exc:
            reason, detail = exc.reason, exc.detail
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - an unforeseen decoder failure on one file must not end the run
            log.warning("unexpected %s decoding %s", type(exc).__name__, path, exc_info=exc)
            reason, detail = S.DECODE_ERROR, f"{type(exc).__name__}: {exc}"
        finally:
            self.wait_seconds += time.perf_counter() - t0
            self._pending.pop(path, None)
        self._bad_videos[path] = (reason, detail)
        self.bad.report(reason, path, "", f"{detail}; annotation {sample.source}" if detail else sample.source)
        return None

    def _item(self, g: int) -> tuple[vtg.TokenizedSample, torch.Tensor]:
        """Tokenized sample and frames for global position ``g`` (a bad sample replaced by the next good one)."""
        for j, k in enumerate(self.candidates(g)):
            sample = self.samples[k]
            clip = self._clip(sample)
            if clip is None:
                continue
            checked = self.dataset._check_times(sample, clip.duration)
            if checked is None:
                continue
            try:
                tok = vtg.tokenize_sample(checked, clip.times, self.tokenizer, self.seq_cfg)
            except ValueError as exc:
                self.bad.report("bad_sample", sample.source, "", str(exc))
                continue
            self.bad.add_good(sample.sample_id)
            self.backends[clip.backend] = self.backends.get(clip.backend, 0) + 1
            self.replaced += j > 0
            return tok, clip.frames
        raise DataError(
            f"VTGSource: no usable sample in a whole epoch of {len(self.samples)} (position {g}); "
            f"bad inputs: {self.bad.summary()}"
        )

    # ---- the step ----

    def microbatches(self, consumed_samples: int) -> list[dict]:
        """This rank's microbatches (integration interface 1) of the step starting at ``consumed_samples``."""
        if self._expect is not None and consumed_samples != self._expect:
            raise ValueError(
                f"VTGSource.microbatches: resumed at consumed_samples={self._expect} (checkpoint) but asked for "
                f"{consumed_samples}"
            )
        self._expect = None
        self.wait_seconds = 0.0
        self._done.clear()
        positions = self.rank_positions(consumed_samples)
        wanted = [self.samples[next(self.candidates(g))].video for g in positions]
        for path in list(self._pending):
            if path not in wanted:
                self._pending.pop(path).cancelled = True
        for path in wanted:
            self._submit(path)
        items = [self._item(g) for g in positions]
        for g in self.rank_positions(consumed_samples + self.global_batch_size):  # prefetch the next step
            self._submit(self.samples[next(self.candidates(g))].video)
        out = [self._collate(items[i : i + self.micro_batch_size]) for i in range(0, len(items), self.micro_batch_size)]
        self._done.clear()
        self._consumed = consumed_samples + self.global_batch_size
        self.samples_delivered += len(items)
        self.total_wait_seconds += self.wait_seconds
        return out

    def _collate(self, items: list[tuple[vtg.TokenizedSample, torch.Tensor]]) -> dict:
        from megatron_timeexpert.model.timeexpert import next_token_targets

        tok = self.tokenizer
        batch = vtg.collate([t for t, _ in items], self.seq_length, tok.pad_id, tok.eos_id, self.cfg.overflow)
        self.dropped_events += sum(batch.dropped_events)
        shape = items[0][1].shape
        for t, fr in items[1:]:
            if fr.shape != shape:
                raise DataError(
                    f"VTGSource: frames of {t.sample_id} {tuple(fr.shape)} and {items[0][0].sample_id} {tuple(shape)} "
                    "differ in size; set VTGSourceConfig.image_size > 0"
                )
        targets = next_token_targets(batch.ids, batch.types, batch.loss_mask, pad_id=tok.pad_id)
        b = batch.ids.shape[0]
        return {
            "ids": batch.ids,
            "types": batch.types,
            "position_ids": torch.arange(self.seq_length).unsqueeze(0).expand(b, -1).contiguous(),
            "labels": targets.labels,
            "label_types": targets.label_types,
            "loss_mask": targets.loss_mask,
            "frames": torch.cat([fr for _, fr in items]),
            "frame_times": batch.frame_times.to(torch.float32),
            "frame_targets": batch.frame_targets,
            "sample_ids": list(batch.sample_ids),
        }

    # ---- reporting ----

    def metrics(self) -> dict:
        """Flat counters for the trainer's metrics line (``data/...``): bad inputs (data/stats.py, e.g.
        ``data/bad/corrupt_file``, ``data/skipped``), decode timeouts, replacements, dropped events, the frame
        cache, decodes per backend and the wait."""
        out = {f"data/{k}": v for k, v in self.bad.summary().items()}
        out.update(
            {
                "data/decode_timeouts": self.decode_timeouts,
                "data/replaced": self.replaced,
                "data/dropped_events": self.dropped_events,
                "data/samples_delivered": self.samples_delivered,
                "data/cache_hits": self.cache.hits,
                "data/cache_misses": self.cache.misses,
                "data/wait_seconds": round(self.wait_seconds, 4),
                "data/total_wait_seconds": round(self.total_wait_seconds, 4),
            }
        )
        out.update({f"data/backend/{k}": v for k, v in sorted(self.backends.items())})
        return out

    def close(self) -> None:
        """Stop the decode threads (pending decodes are dropped)."""
        self._pool.shutdown(list(self._pending.values()))
        self._pending.clear()

    def __enter__(self) -> VTGSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "MICROBATCH_KEYS",
    "FrameCache",
    "VTGSource",
    "VTGSourceConfig",
    "load_samples",
    "resize_frames",
    "samples_digest",
    "split_videos",
]
