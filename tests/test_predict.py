"""Structured event generation and ``timeexpert predict`` (megatron_timeexpert/predict/).

A tiny random TimeExpert model (vision tower + decoder, built as predict builds it) continues real
prompts (data/vtg.py ``tokenize_sample(..., with_response=False)``). Checked: every generated token
has the type the grammar requires at its position, is allowed there, and is the masked argmax of
THAT head's logits (recomputed independently; another head's argmax would differ); finished
responses parse; the KV cache (megatron's StaticInferenceContext) gives the tokens of full
recomputation, batched equals one by one; a too-small token budget gives counted, empty
predictions; the three output formats read back with eval/io.py; a checkpoint saved at one
process loads at TP = 2 and at EP = 2, and one saved at TP = 2 loads at TP = 1, and all generate
exactly the same ids; ``timeexpert predict`` on synthetic videos writes what ``timeexpert eval`` matches.

    .venv/bin/python -m pytest -q tests/test_predict.py
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from megatron_timeexpert.config import Config, ModelConfig, MoEConfig
from megatron_timeexpert.data import events as E
from megatron_timeexpert.data.types import Event as Span
from megatron_timeexpert.data.types import Task, VTGSample
from megatron_timeexpert.moe.types import TokenType
from parallel.layout import ParallelLayout
from parallel.testing import run_distributed

HIDDEN = 32
FRAMES = 2
SEQ = 128


class SmallVocab:
    """A text vocabulary of 9 ids (PAD 0, UNK 1, BOS 2, EOS 3, <sync> 4, words 5..8): small, so that
    a random model's sampled captions end soon. Words map to ids by their length (deterministic)."""

    pad_id, unk_id, bos_id, eos_id, sync_id = 0, 1, 2, 3, 4
    vocab_size = 9

    def encode(self, text: str) -> list[int]:
        return [5 + len(w) % 4 for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(f"w{i}" for i in ids)


def tiny_config(tp: int = 1, ep: int = 1) -> Config:
    from megatron_timeexpert.model.vision import VisionConfig

    cfg = Config()
    cfg.model = ModelConfig(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64, vocab_size=9, seq_length=SEQ
    )
    cfg.model.kind = "timeexpert"
    cfg.model.vision = VisionConfig(image_size=32, hidden_size=32, intermediate_size=64, out_hidden=HIDDEN)
    cfg.moe = MoEConfig(router="timeexpert", num_experts=4)
    cfg.parallel = ParallelLayout(tp=tp, pp=1, ep=ep)
    return cfg


def _samples() -> list[VTGSample]:
    def s(i, task, query):
        return VTGSample(f"t:{i}", f"v{i}.mp4", 30.0, task, query, (Span(1.0, 2.0, saliency=3.0),), f"t:{i}")

    return [
        s(0, Task.MOMENT_RETRIEVAL, "a man opens the door"),
        s(1, Task.HIGHLIGHT_DETECTION, "a man opens the door"),
        s(2, Task.MOMENT_RETRIEVAL, "the dog runs away fast"),  # same length as sample 0
        s(3, Task.DENSE_CAPTIONING, ""),
    ]


def _inputs(seed: int = 11) -> list[tuple[VTGSample, torch.Tensor, list[float]]]:
    """The 4 samples with random frames and their frame times."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, s in enumerate(_samples()):
        frames = torch.randint(0, 256, (FRAMES, 40, 48, 3), generator=g, dtype=torch.uint8)
        out.append((s, frames, [0.5 + k, 10.0 + k]))
    return out


def _prompts(encode, seed: int = 11):
    """Real prompts of the 4 samples with the vision tokens (predict's ``encode``) of random frames."""
    from megatron_timeexpert.data.vtg import tokenize_sample
    from megatron_timeexpert.predict.run import Prompt

    out = []
    for s, frames, times in _inputs(seed):
        with torch.no_grad():
            visual = encode(frames, torch.tensor(times))
        t = tokenize_sample(s, times, SmallVocab(), with_response=False)
        out.append(Prompt(s.sample_id, t.ids, t.types, visual))
    return out


def _fit(chunks, encode, steps: int = 40) -> list[float]:
    """A few Adam steps of teacher forcing on the 4 samples' answers, so that the model opens events
    (a random model may end every answer at once, which would leave the head and grammar checks
    below nothing to check). Returns the losses."""
    from megatron_timeexpert.data.vtg import collate, tokenize_sample
    from megatron_timeexpert.model.heads import timeexpert_loss_func
    from megatron_timeexpert.model.timeexpert import next_token_targets

    inputs = _inputs()
    batch = collate([tokenize_sample(s, t, SmallVocab()) for s, _, t in inputs], SEQ, SmallVocab.pad_id)
    tg = next_token_targets(batch.ids, batch.types, batch.loss_mask, pad_id=SmallVocab.pad_id)
    pos = torch.arange(SEQ).expand(len(inputs), -1)
    params = [p for c in chunks for p in c.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for c in chunks:
        c.train()
    for _ in range(steps):
        visual = torch.stack([encode(frames, torch.tensor(times)) for _, frames, times in inputs])
        out = chunks[0].lm(
            batch.ids, batch.types, pos, None, visual=visual, labels=tg.labels, label_types=tg.label_types,
            loss_mask=tg.loss_mask,
        )  # fmt: skip
        loss_sum, n, _ = timeexpert_loss_func(out)
        opt.zero_grad()
        (loss_sum / n).backward()
        opt.step()
        losses.append(float(loss_sum / n))
    for c in chunks:
        c.eval()
    return losses


def _init(cfg: Config, seed: int = 3) -> None:
    from parallel.cpu_compat import apply_cpu_shims

    apply_cpu_shims()
    cfg.parallel.initialize(seed)
    torch.manual_seed(seed)


SAMPLED = dict(temperature=1.0, seed=5)


def _generate_all(lm, prompts, use_cache: bool, batch_size: int = 4) -> dict:
    """Greedy and sampled generations of every prompt (ids, types, finished)."""
    from megatron_timeexpert.predict.generation import GenerationConfig
    from megatron_timeexpert.predict.run import predict_prompts

    out = {}
    for name, extra in (("greedy", {}), ("sampled", SAMPLED)):
        gcfg = GenerationConfig(max_new_tokens=32, use_cache=use_cache, **extra)
        res = predict_prompts(lm, prompts, SmallVocab(), gcfg, batch_size)
        out[name] = [(o.generated.ids, o.generated.types, o.generated.finished, o.reason) for o in res]
    return out


def _save(chunks, path) -> None:
    """A complete checkpoint of the model alone, as train/checkpoint.py lays it out."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_timeexpert.train.checkpoint import MARKER, model_sharded_state

    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        path.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model_sharded_state(chunks), str(path))
    if rank == 0:
        (path / "train_state.json").write_text(json.dumps({"step": 0, "consumed_samples": 0, "world_size": world}))
        (path / MARKER).write_text(json.dumps({"step": 0}))
    dist.barrier()


def _cli_runs(recipe: str, out_dir: str) -> dict:
    """``timeexpert predict``'s run (after process-group set-up) for the three tasks on synthetic
    videos, from a checkpoint of the recipe's model written at one process."""
    import contextlib
    import io
    from pathlib import Path

    from megatron_timeexpert.config import load_config
    from megatron_timeexpert.predict.cli import _parser, build_predict_model, run_predict

    cfg = load_config(recipe, ["parallel.pp=1", "parallel.vpp=null"])
    _init(cfg)
    chunks, _, _ = build_predict_model(cfg)
    _save(chunks, Path(out_dir) / "ckpt" / "iter_0000000")
    lines = {}
    for task in ("charades", "qvhighlights", "dvc"):
        argv = ["--config", recipe, "--checkpoint", str(Path(out_dir) / "ckpt"), "--task", task]
        argv += ["--out", str(Path(out_dir) / f"{task}.json"), "--max-new-tokens", "24", "--no-progress"]
        args = _parser().parse_args(argv)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = run_predict(args, cfg)
        lines[task] = (rc, buf.getvalue())
    return lines


def _single(ckpt_dir: str, recipe: str, cli_dir: str) -> dict:
    from pathlib import Path

    from megatron_timeexpert.predict.cli import build_predict_model
    from megatron_timeexpert.predict.generation import HEAD_OF, GenerationConfig
    from megatron_timeexpert.predict.run import PredictStats, predict_prompts

    torch.set_num_threads(1)
    cfg = tiny_config()
    _init(cfg)
    chunks, encode, lm = build_predict_model(cfg)
    fit = _fit(chunks, encode)
    _save(chunks, Path(ckpt_dir) / "iter_0000000")
    prompts = _prompts(encode)
    cached = _generate_all(lm, prompts, use_cache=True)
    recomputed = _generate_all(lm, prompts, use_cache=False)
    one_by_one = _generate_all(lm, prompts, use_cache=True, batch_size=1)
    # Independent check of the greedy tokens: recompute the sequence, take the head of each token's
    # type, mask by the grammar, argmax; also the argmax of the OTHER number head at number positions.
    grammar = E.ResponseGrammar.for_vocab(SmallVocab())
    argmax_own, argmax_other = [], []
    with torch.no_grad():
        for p, (ids, types, _, _) in zip(prompts, cached["greedy"]):
            seq_ids = torch.cat([p.ids, torch.tensor(ids, dtype=torch.long)])[None]
            seq_types = torch.cat([p.types, torch.tensor(types, dtype=torch.long)])[None]
            pos = torch.arange(seq_ids.shape[1])[None]
            hidden = lm(seq_ids, seq_types, pos, None, visual=p.visual[None])[0]
            state = grammar.initial()
            own, other = [], []
            for k, (x, t) in enumerate(zip(ids, types)):
                h = hidden[p.ids.numel() - 1 + k]
                mask = torch.tensor(grammar.allowed_mask(state))
                logits = lm.logits_for_generation(h, HEAD_OF[TokenType(t)]).masked_fill(~mask, -math.inf)
                own.append(int(logits.argmax()))
                if t in (TokenType.TIME, TokenType.SCORE):
                    swap = TokenType.SCORE if t == TokenType.TIME else TokenType.TIME
                    logits = lm.logits_for_generation(h, HEAD_OF[swap]).masked_fill(~mask, -math.inf)
                    other.append((int(logits.argmax()), x))
                state = grammar.step(state, t, x)
            argmax_own.append(own)
            argmax_other.append(other)
    stats = PredictStats()
    short = predict_prompts(lm, prompts, SmallVocab(), GenerationConfig(max_new_tokens=3, **SAMPLED), 4, stats)
    return {
        "fit": fit,
        "prompt_lengths": [int(p.ids.numel()) for p in prompts],
        "cached": cached,
        "recomputed": recomputed,
        "one_by_one": one_by_one,
        "argmax_own": argmax_own,
        "argmax_other": argmax_other,
        "short": [(o.key, o.reason, o.events, o.generated.ids) for o in short],
        "short_stats": (stats.samples, dict(stats.malformed), stats.tokens, stats.line()),
        "cli": _cli_runs(recipe, cli_dir),
    }


def _layouts(ckpt: str, ckpt_tp2: str) -> dict:
    """Load the 1-process checkpoint at TP = 2 (no cache: sequence parallel) and at EP = 2 (cache);
    save it again from TP = 2 (text vocabulary sharded over 2 ranks) and load THAT at TP = EP = 1."""
    from pathlib import Path

    from megatron_timeexpert.predict.cli import build_predict_model
    from megatron_timeexpert.train.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    out = {}
    for name, tp, ep, src in (("tp2", 2, 1, ckpt), ("ep2", 1, 2, ckpt), ("tp1_from_tp2", 1, 1, ckpt_tp2)):
        cfg = tiny_config(tp=tp, ep=ep)
        _init(cfg, seed=99)  # a different init: only the checkpoint can make the outputs agree
        chunks, encode, lm = build_predict_model(cfg)
        load_checkpoint(src, chunks)
        for c in chunks:
            c.eval()
        out[name] = _generate_all(lm, _prompts(encode), use_cache=not lm.config.sequence_parallel)
        if name == "tp2":
            _save(chunks, Path(ckpt_tp2))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tmp_path_factory.mktemp("predict_ckpt")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Two synthetic videos with their annotations, a tokenizer trained on them, a recipe for them."""
    import subprocess
    import sys

    from megatron_timeexpert.data.annotations import ReaderConfig, read_annotations
    from megatron_timeexpert.data.stats import BadInputs
    from megatron_timeexpert.data.tokenizer import TextTokenizer, TokenizerTrainConfig
    from megatron_timeexpert.data.vtg import write_corpus

    root = tmp_path_factory.mktemp("predict_data")
    subprocess.run(
        [sys.executable, "-m", "tools.make_synthetic_vtg", "--out", str(root), "--num-videos", "2", "--seed", "3"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    # A video that exists but cannot be decoded: its query must still get an (empty) prediction.
    (root / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    with open(root / "annotations" / "charades_sta.txt", "a") as f:
        f.write("broken 0.5 2.0##a square that cannot be seen.\n")
    samples = []
    for fmt, name in (("charades_sta", "charades_sta.txt"), ("qvhighlights", "qvhighlights.jsonl")):
        samples += read_annotations(fmt, root / "annotations" / name, ReaderConfig(root / "videos"), BadInputs())
    write_corpus(samples, root / "corpus.txt")
    tok = TextTokenizer.train([root / "corpus.txt"], root / "tok", TokenizerTrainConfig(vocab_size=300))
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(vocab=tok.vocab_size, root=root, tok=root / "tok.model"))
    return root, recipe


RECIPE = """
model:
  kind: timeexpert
  num_layers: 2
  hidden_size: 32
  num_attention_heads: 4
  ffn_hidden_size: 64
  vocab_size: {vocab}
  seq_length: 128
  vision: {{image_size: 32, hidden_size: 32, intermediate_size: 64, out_hidden: 32}}
moe: {{router: timeexpert, num_experts: 4}}
parallel: {{tp: 1, pp: 1, ep: 1}}
data: {{kind: synthetic_vtg, root: {root}, tokenizer: {tok}, num_frames: 2, image_size: 32}}
training: {{micro_batch_size: 1, global_batch_size: 1}}
"""


@pytest.fixture(scope="module")
def single(ckpt, synthetic):
    root, recipe = synthetic
    return run_distributed(_single, 1, args=(str(ckpt), str(recipe), str(root / "out")), timeout=240)[0]


@pytest.fixture(scope="module")
def layouts(single, ckpt):
    return run_distributed(
        _layouts, 2, args=(str(ckpt / "iter_0000000"), str(ckpt / "tp2" / "iter_0000000")), timeout=240
    )


def _replay(ids, types) -> list[str]:
    """Every place a generated token breaks the grammar (type or id), replaying it independently."""
    grammar = E.ResponseGrammar.for_vocab(SmallVocab())
    state, errors = grammar.initial(), []
    for k, (x, t) in enumerate(zip(ids, types)):
        if t != state.next_type:
            errors.append(f"token {k}: type {t}, grammar wants {state.next_type}")
            break
        if x not in grammar.allowed_ids(state):
            errors.append(f"token {k}: id {x} not allowed in {state}")
            break
        state = grammar.step(state, t, x)
    return errors


def test_prompts_have_two_equal_lengths_for_batching(single):
    lengths = single["prompt_lengths"]
    assert lengths[0] == lengths[2] and len(set(lengths)) == 3


def test_every_token_has_the_type_and_id_its_position_allows(single):
    for mode in ("greedy", "sampled"):
        for ids, types, finished, _reason in single["cached"][mode]:
            assert _replay(ids, types) == []
            assert len(ids) == len(types) >= 1
            if finished:
                assert ids[-1] == SmallVocab.eos_id and types[-1] == TokenType.TEXT


def test_generations_use_all_three_heads_and_parse(single):
    assert single["fit"][-1] < 0.5 * single["fit"][0]  # the fitted model learned the answers' form
    gens = single["cached"]["sampled"] + single["cached"]["greedy"]
    seen = {t for _, types, _, _ in gens for t in types}
    assert {int(TokenType.TEXT), int(TokenType.TIME), int(TokenType.SCORE)} <= seen
    finished = [g for g in gens if g[2]]
    assert finished, "no generation reached EOS"
    with_events = 0
    for ids, types, _, reason in finished:
        parsed = E.parse_response(ids, types, SmallVocab())
        assert parsed.ok and reason is None, parsed.problems
        with_events += bool(parsed.events)
    assert with_events >= 1


def test_each_greedy_token_is_the_masked_argmax_of_its_own_head(single):
    for (ids, _, _, _), own in zip(single["cached"]["greedy"], single["argmax_own"]):
        assert own == ids
    # The other number head would have chosen differently somewhere: the check can tell heads apart.
    pairs = [p for other in single["argmax_other"] for p in other]
    assert pairs and any(a != x for a, x in pairs)


def test_kv_cache_gives_the_tokens_of_full_recomputation(single):
    assert single["cached"] == single["recomputed"]
    assert single["cached"] == single["one_by_one"]


def test_too_few_tokens_is_counted_and_empty(single):
    reasons = Counter()
    for key, reason, events, ids in single["short"]:
        assert len(ids) <= 3
        ended = bool(ids) and ids[-1] == SmallVocab.eos_id
        assert (reason is None) == ended, (key, reason, ids)  # every cut-off generation is malformed
        if reason is not None:
            assert events == ()  # ... and gives an empty prediction
            reasons[reason] += 1
    assert sum(reasons.values()) >= 1 and set(reasons) <= {E.NO_EOS, E.NO_CLOSING_SYNC}
    samples, malformed, tokens, line = single["short_stats"]
    assert samples == 4 and malformed == dict(reasons)
    assert f"{sum(reasons.values())} empty predictions (" in line


def test_checkpoint_at_another_layout_predicts_the_same_ids(single, layouts):
    for rank_out in layouts:
        for name in ("tp2", "ep2", "tp1_from_tp2"):
            assert rank_out[name] == single["cached"], name


# --- prediction records and the public formats ------------------------------------------------------


def _outcome(events, reason=None):
    from megatron_timeexpert.predict.run import Outcome

    return Outcome("k", None, () if reason else tuple(events), reason)


def test_three_formats_read_back_with_eval_readers(tmp_path, single):
    from megatron_timeexpert.eval import io
    from megatron_timeexpert.predict.run import Query, dense_records, moment_record, qvhighlights_record

    mr = [E.Event((3.0, 7.5), (0.4,)), E.Event((12.0, 10.0), (0.9,)), E.Event((1.0, 2.0), (0.4,))]
    hd = [E.Event((1.0, 3.0, 5.0, 8.5), (4.0, 2.5, 1.0, 3.0))]
    dvc = [E.Event((0.0, 4.0), (), "w5 w6"), E.Event((4.0, 9.0), (), "w7")]
    short_outcome = single["short"][0]
    bad = _outcome((), short_outcome[1] or E.NO_EOS)  # a malformed generation: empty prediction

    q_ok = Query("vidA", "a man opens the door", "17", 9.0, _outcome(mr), _outcome(hd))
    q_bad = Query("vidB", "the dog runs", "18", 5.0, bad, bad)
    io.write_moment_predictions(tmp_path / "ch.jsonl", [moment_record(q_ok), moment_record(q_bad)])
    got = io.read_moment_predictions(tmp_path / "ch.jsonl")
    assert [p.vid for p in got] == ["vidA", "vidB"]
    assert got[0].windows == [(10.0, 12.0, 0.9), (3.0, 7.5, 0.4), (1.0, 2.0, 0.4)]
    assert got[1].windows == []

    io.write_qvhighlights_predictions(tmp_path / "qv.jsonl", [qvhighlights_record(q_ok), qvhighlights_record(q_bad)])
    got = io.read_moment_predictions(tmp_path / "qv.jsonl")
    assert [p.qid for p in got] == ["17", "18"]
    assert got[0].windows[0] == (10.0, 12.0, 0.9)
    # 9 s -> 5 clips; times 1, 3, 5, 8.5 fall in clips 0, 1, 2, 4 (centres 2i + 1)
    assert got[0].saliency == [4.0, 2.5, 1.0, 0.0, 3.0]
    assert got[1].windows == [] and got[1].saliency == [0.0, 0.0, 0.0]

    io.write_dense_predictions(
        tmp_path / "dvc.json",
        dense_records([Query("vidA", "", None, 9.0, _outcome(dvc)), Query("vidB", "", None, 5.0, bad)]),
    )
    got = io.read_dense_predictions(tmp_path / "dvc.json")
    assert got["vidA"].segments == [(0.0, 4.0), (4.0, 9.0)] and got["vidA"].captions == ["w5 w6", "w7"]
    assert got["vidB"].segments == []  # written, never dropped


def test_length_buckets_keep_every_index_once():
    from megatron_timeexpert.predict.generation import length_buckets

    b = length_buckets([5, 3, 5, 5, 3, 7], 2)
    assert b == [[1, 4], [0, 2], [3], [5]]
    assert sorted(i for x in b for i in x) == list(range(6))


def test_predict_command_writes_every_query_in_the_public_formats(single, synthetic):
    from megatron_timeexpert.eval import io
    from megatron_timeexpert.predict.outputs import num_clips

    root, _ = synthetic
    out = root / "out"
    charades = [x for x in (root / "annotations" / "charades_sta.txt").read_text().splitlines() if x.strip()]
    qv = [json.loads(x) for x in (root / "annotations" / "qvhighlights.jsonl").read_text().splitlines() if x.strip()]
    dvc = json.loads((root / "annotations" / "youcook2.json").read_text())["database"]
    for task, n_prompts in (("charades", len(charades)), ("qvhighlights", 2 * len(qv)), ("dvc", len(dvc))):
        rc, line = single["cli"][task]
        assert rc == 0 and f"timeexpert predict: {n_prompts} samples, " in line, line
        assert "tokens/s" in line and f"wrote {out / (task + '.json')}" in line
    assert "bad_video 1" in single["cli"]["charades"][1]
    got = io.read_moment_predictions(out / "charades.json")
    assert got[-1].vid == "broken" and got[-1].windows == []
    assert [(p.vid, p.query) for p in got] == [(x.split()[0], x.split("##")[1].strip()) for x in charades]
    got = io.read_moment_predictions(out / "qvhighlights.json")
    assert [p.qid for p in got] == [str(x["qid"]) for x in qv]
    assert [len(p.saliency) for p in got] == [num_clips(x["duration"]) for x in qv]
    got = io.read_dense_predictions(out / "dvc.json")
    assert sorted(got) == sorted(dvc)


def test_predictions_match_every_ground_truth_query_in_timeexpert_eval(single, synthetic):
    import contextlib
    import io

    from megatron_timeexpert.eval.cli import main as eval_main

    root, _ = synthetic
    gt = {"charades": "charades_sta.txt", "qvhighlights": "qvhighlights.jsonl", "dvc": "youcook2.json"}
    for task, name in gt.items():
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = eval_main(
                ["--task", task, "--pred", str(root / "out" / f"{task}.json"), "--gt", str(root / "annotations" / name)]
            )
        text = buf.getvalue()
        assert rc == 0 and "num_missing_predictions 0" in text and "num_unmatched_predictions 0" in text, text
