"""The sentencepiece text tokenizer: trained on the synthetic generator's instructions and captions,
deterministic, loadable from its file, with fixed special ids and a reserved <sync>; the
`timeexpert tokenizer` command."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm

from megatron_timeexpert.cli import main as cli_main
from megatron_timeexpert.data.annotations import ReaderConfig, read_annotations
from megatron_timeexpert.data.stats import BadInputs
from megatron_timeexpert.data.tokenizer import SYNC_PIECE, TextTokenizer, TokenizerTrainConfig
from megatron_timeexpert.data.vtg import write_corpus
from tools.make_synthetic_vtg import GeneratorConfig, generate

FORMATS = {
    "charades_sta": "charades_sta.txt",
    "qvhighlights": "qvhighlights.jsonl",
    "youcook2": "youcook2.json",
    "activitynet": "activitynet_captions.json",
    "instruction": "instruction.json",
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok_synth")
    generate(GeneratorConfig(out, 4, seed=1, width=32, height=24, progress=False))
    return out


@pytest.fixture(scope="module")
def samples(synth):
    cfg = ReaderConfig(synth / "videos")
    return [s for fmt, f in FORMATS.items() for s in read_annotations(fmt, synth / "annotations" / f, cfg, BadInputs())]


@pytest.fixture(scope="module")
def corpus(samples, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok_corpus") / "corpus.txt"
    write_corpus(samples, path)
    return path


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory) -> TextTokenizer:
    return TextTokenizer.train([corpus], tmp_path_factory.mktemp("tok") / "tok", TokenizerTrainConfig(vocab_size=384))


def test_special_ids_and_files(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.sync_id) == (0, 1, 2, 3, 4)
    assert tok.id_to_piece(tok.sync_id) == SYNC_PIECE
    assert tok.vocab_size == 384  # the corpus is big enough for the wanted size
    prefix = Path(tok.path).with_suffix("")
    assert Path(f"{prefix}.model").read_bytes() == tok.model_bytes
    vocab = Path(f"{prefix}.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == tok.vocab_size and vocab[4].split("\t")[0] == SYNC_PIECE


def test_training_is_deterministic(corpus, tmp_path, tok):
    cfg = TokenizerTrainConfig(vocab_size=384)
    a = TextTokenizer.train([corpus], tmp_path / "a" / "tok", cfg)
    b = TextTokenizer.train([corpus], tmp_path / "b" / "tok", cfg)
    assert a.model_bytes == b.model_bytes == tok.model_bytes
    lines = corpus.read_text(encoding="utf-8").splitlines()
    assert [a.encode(x) for x in lines] == [b.encode(x) for x in lines]
    # another text is another model: the byte comparison above can fail
    (tmp_path / "more.txt").write_text("\n".join(lines + ["zebras gallop"] * 20) + "\n", encoding="utf-8")
    other = TextTokenizer.train([tmp_path / "more.txt"], tmp_path / "c" / "tok", cfg)
    assert other.model_bytes != a.model_bytes and len(other.encode("zebras")) < len(a.encode("zebras"))


def test_unigram_and_no_byte_fallback(corpus, tmp_path):
    uni = TextTokenizer.train([corpus], tmp_path / "u", TokenizerTrainConfig(vocab_size=300, model_type="unigram"))
    assert uni.sync_id == 4 and uni.decode(uni.encode("a red circle appears")) == "a red circle appears"
    nob = TextTokenizer.train([corpus], tmp_path / "n", TokenizerTrainConfig(vocab_size=100, byte_fallback=False))
    assert nob.vocab_size <= 100 and nob.unk_id in nob.encode("東")  # unknown characters become UNK


def test_encode_decode_round_trip(tok, samples):
    texts = {ev.caption for s in samples for ev in s.events if ev.caption} | {s.query for s in samples}
    assert len(texts) > 10
    for text in texts:
        ids = tok.encode(text)
        assert tok.unk_id not in ids and tok.sync_id not in ids and tok.decode(ids) == text
    odd = "Zürich 東京 😀 — naïve café 12.5 s"
    assert tok.unk_id not in tok.encode(odd) and tok.decode(tok.encode(odd)) == odd  # byte fallback
    assert len(tok.encode("a red circle appears")) < 0.75 * len("a red circle appears")  # merges were learnt


def test_sync_is_reserved(tok):
    with pytest.raises(ValueError, match="reserved piece '<sync>'"):
        tok.encode("a <sync> b")
    assert tok.decode([tok.bos_id, *tok.encode("a red"), tok.eos_id, tok.pad_id]) == "a red"


def test_load_from_file_and_pickle(tok):
    loaded = TextTokenizer.load(tok.path)
    assert loaded.model_bytes == tok.model_bytes and loaded.path == tok.path
    assert loaded.encode("a blue square moves") == tok.encode("a blue square moves")
    again = pickle.loads(pickle.dumps(loaded))
    assert again.sync_id == 4 and again.encode("a blue square moves") == tok.encode("a blue square moves")


def _raw_model(corpus: Path, **kw) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_writer=out, vocab_size=100, model_type="bpe", num_threads=1, minloglevel=2, **kw
    )
    return out.getvalue()


def test_load_errors_name_the_file(tmp_path, corpus):
    with pytest.raises(ValueError, match="nope.model: tokenizer model file not found"):
        TextTokenizer.load(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="junk.model: not a sentencepiece model"):
        TextTokenizer.load(junk)
    no_sync = tmp_path / "nosync.model"
    no_sync.write_bytes(_raw_model(corpus, pad_id=0, unk_id=1, bos_id=2, eos_id=3))
    with pytest.raises(ValueError, match="nosync.model: the model has no '<sync>' piece"):
        TextTokenizer.load(no_sync)
    no_pad = tmp_path / "nopad.model"
    no_pad.write_bytes(_raw_model(corpus, user_defined_symbols=["<sync>"]))  # sentencepiece's default: no PAD
    with pytest.raises(ValueError, match="nopad.model: the model defines no PAD piece"):
        TextTokenizer.load(no_pad)
    ctrl = tmp_path / "ctrl.model"  # <sync> as a control symbol: text "<sync>" would not become it
    ctrl.write_bytes(_raw_model(corpus, pad_id=0, unk_id=1, bos_id=2, eos_id=3, control_symbols=["<sync>"]))
    with pytest.raises(ValueError, match="ctrl.model: '<sync>' is a piece but not a user-defined symbol"):
        TextTokenizer.load(ctrl)


def test_train_config_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size: 200 is too small; at least 262"):
        TokenizerTrainConfig(vocab_size=200)
    with pytest.raises(ValueError, match="model_type: 'wordpiece'"):
        TokenizerTrainConfig(model_type="wordpiece")
    with pytest.raises(ValueError, match="missing.txt: corpus file not found"):
        TextTokenizer.train([tmp_path / "missing.txt"], tmp_path / "t")
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt: corpus file is empty"):
        TextTokenizer.train([tmp_path / "empty.txt"], tmp_path / "t")


def test_command_line(synth, tmp_path, tok, capsys):
    specs = [f"{fmt}={synth / 'annotations' / f}" for fmt, f in FORMATS.items()]
    corpus = tmp_path / "corpus.txt"
    args = ["tokenizer", "corpus", "--annotations", *specs, "--video-root", str(synth / "videos"), "--out", str(corpus)]
    assert cli_main(args) == 0
    lines = corpus.read_text(encoding="utf-8").splitlines()
    assert "wrote" in capsys.readouterr().out and "Localize every event in the video and describe it." in lines
    assert (
        cli_main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "384", "--out", str(tmp_path / "t")])
        == 0
    )
    assert "384 pieces; pad 0, bos 2, eos 3, <sync> 4" in capsys.readouterr().out
    assert TextTokenizer.load(tmp_path / "t.model").model_bytes == tok.model_bytes  # same corpus, same model
    assert cli_main(["tokenizer", "train", "--corpus", str(tmp_path / "gone.txt"), "--out", str(tmp_path / "x")]) == 2
    assert "gone.txt: corpus file not found" in capsys.readouterr().err
    bad = ["tokenizer", "corpus", "--annotations", "charades_sta", "--video-root", ".", "--out", str(tmp_path / "c")]
    assert cli_main(bad) == 2 and "expected FORMAT=FILE" in capsys.readouterr().err
