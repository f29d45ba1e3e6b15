"""The text tokenizer of the TimeExpert model: a sentencepiece model with ``<sync>``, PAD, BOS and EOS.

Train one from a corpus (one text per line; :func:`~.vtg.write_corpus` dumps the instructions and
captions of annotation files), or load one from a ``.model`` file::

    timeexpert tokenizer corpus --annotations qvhighlights=DIR/annotations/qvhighlights.jsonl \\
        --video-root DIR/videos --out corpus.txt
    timeexpert tokenizer train --corpus corpus.txt --vocab-size 512 --out tok     # writes tok.model, tok.vocab

Fixed ids (every model this module trains; a loaded model is checked for its own, see below):
PAD = 0, UNK = 1, BOS = 2, EOS = 3, ``<sync>`` = 4 (a user-defined symbol: the text ``<sync>`` always
becomes this one id). Training is deterministic (one thread, no sentence sampling or shuffling, the
lines fed from memory so no file name is stored): the same corpus text and options give the same
model bytes. Defaults: BPE, byte fallback (no text is ever
UNK, decode(encode(s)) == s up to whitespace runs, which sentencepiece collapses), identity
normalisation. The vocabulary size is a soft limit: a corpus too small for it gives fewer pieces
(:attr:`TextTokenizer.vocab_size` is the real size); with byte fallback it is at least 262.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

SYNC_PIECE = "<sync>"
"""The text piece that opens an event (switches to the time head)."""
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
"""Ids of the special pieces in the models this module trains."""


@dataclass
class TokenizerTrainConfig:
    """How :meth:`TextTokenizer.train` builds a sentencepiece model."""

    vocab_size: int = 512
    """Wanted number of pieces (a soft limit: a small corpus may give fewer)."""
    model_type: str = "bpe"
    """Sentencepiece algorithm: ``bpe`` or ``unigram``."""
    byte_fallback: bool = True
    """Spell characters outside the vocabulary as UTF-8 byte pieces instead of UNK (adds 256 pieces)."""
    character_coverage: float = 1.0
    """Fraction of the corpus' characters that get their own piece."""

    def __post_init__(self) -> None:
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"TokenizerTrainConfig.model_type: {self.model_type!r} is not 'bpe' or 'unigram'")
        low = 5 + (256 if self.byte_fallback else 0) + 1
        if self.vocab_size < low:
            raise ValueError(
                f"TokenizerTrainConfig.vocab_size: {self.vocab_size} is too small; at least {low} "
                f"with byte_fallback={self.byte_fallback}"
            )


class TextTokenizer:
    """A loaded sentencepiece model with the ids the token contract needs (picklable: it carries its bytes)."""

    def __init__(self, model_bytes: bytes, path: str = "<bytes>") -> None:
        self.path = str(path)
        """Where the model came from (for error messages)."""
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as exc:
            raise ValueError(f"{self.path}: not a sentencepiece model ({exc})") from None
        self._bytes = bytes(model_bytes)
        sp = self._sp
        self.vocab_size: int = sp.get_piece_size()
        self.pad_id: int = sp.pad_id()
        self.unk_id: int = sp.unk_id()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.sync_id: int = sp.piece_to_id(SYNC_PIECE)
        for name in ("pad_id", "bos_id", "eos_id"):
            if getattr(self, name) < 0:
                raise ValueError(f"{self.path}: the model defines no {name[:-3].upper()} piece")
        if self.sync_id == self.unk_id or sp.id_to_piece(self.sync_id) != SYNC_PIECE:
            raise ValueError(f"{self.path}: the model has no {SYNC_PIECE!r} piece (a user-defined symbol is needed)")
        if self.sync_id not in sp.encode(f"x{SYNC_PIECE}x"):  # a user-defined symbol is cut out of any text
            raise ValueError(f"{self.path}: {SYNC_PIECE!r} is a piece but not a user-defined symbol")

    # ---- construction ----

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a ``.model`` file; ValueError naming the file if it is missing or lacks the special pieces."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{p}: tokenizer model file not found")
        return cls(p.read_bytes(), str(p))

    @classmethod
    def train(
        cls, corpus: Sequence[str | Path], out_prefix: str | Path, cfg: TokenizerTrainConfig | None = None
    ) -> TextTokenizer:
        """Train on the corpus files (one text per line), write ``<out_prefix>.model`` and ``.vocab``."""
        cfg = cfg or TokenizerTrainConfig()
        files = [Path(c) for c in corpus]
        if not files:
            raise ValueError("tokenizer training: no corpus file given")
        lines: list[str] = []
        for f in files:
            if not f.is_file():
                raise ValueError(f"{f}: corpus file not found")
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{f}: corpus is not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not text.strip():
                raise ValueError(f"{f}: corpus file is empty")
            lines += [x for x in text.splitlines() if x.strip()]
        prefix = Path(out_prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                # lines, not file names: the model then holds no path, so its bytes depend on the text only
                sentence_iterator=iter(lines),
                model_writer=model,
                vocab_size=cfg.vocab_size,
                model_type=cfg.model_type,
                character_coverage=cfg.character_coverage,
                byte_fallback=cfg.byte_fallback,
                hard_vocab_limit=False,
                normalization_rule_name="identity",
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                user_defined_symbols=[SYNC_PIECE],
                num_threads=1,
                input_sentence_size=0,
                shuffle_input_sentence=False,
                minloglevel=2,
            )
        except RuntimeError as exc:
            raise ValueError(f"tokenizer training on {[str(f) for f in files]} failed: {exc}") from None
        data = model.getvalue()
        tok = cls(data, f"{prefix}.model")
        Path(f"{prefix}.model").write_bytes(data)
        vocab = "".join(f"{tok.id_to_piece(i)}\t{tok._sp.get_score(i)}\n" for i in range(tok.vocab_size))
        Path(f"{prefix}.vocab").write_text(vocab, encoding="utf-8")
        return tok

    def __reduce__(self):
        return (TextTokenizer, (self._bytes, self.path))

    # ---- use ----

    @property
    def model_bytes(self) -> bytes:
        """The serialized sentencepiece model (what the ``.model`` file holds)."""
        return self._bytes

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no BOS/EOS). ValueError if it holds ``<sync>`` (that id is reserved for events)."""
        if SYNC_PIECE in text:
            raise ValueError(f"text {text[:80]!r} holds the reserved piece {SYNC_PIECE!r}")
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special pieces are dropped)."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return f"TextTokenizer({self.path!r}, vocab_size={self.vocab_size}, sync_id={self.sync_id})"


# ---- command line ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="timeexpert tokenizer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True)
    tr = sub.add_parser("train", help="train a sentencepiece model: writes PREFIX.model and PREFIX.vocab")
    tr.add_argument("--corpus", nargs="+", required=True, metavar="FILE", help="text files, one text per line")
    tr.add_argument("--vocab-size", type=int, default=TokenizerTrainConfig.vocab_size)
    tr.add_argument("--out", required=True, metavar="PREFIX", help="output prefix (PREFIX.model, PREFIX.vocab)")
    tr.add_argument("--model-type", choices=("bpe", "unigram"), default=TokenizerTrainConfig.model_type)
    tr.add_argument("--no-byte-fallback", action="store_true", help="unknown characters become UNK")
    co = sub.add_parser("corpus", help="write the instructions and captions of annotation files, one per line")
    co.add_argument(
        "--annotations", nargs="+", required=True, metavar="FORMAT=FILE",
        help="annotation files with their reader: charades_sta, qvhighlights, youcook2, activitynet, instruction",
    )  # fmt: skip
    co.add_argument("--video-root", required=True, help="directory of the videos the annotations name")
    co.add_argument("--out", required=True, metavar="FILE")
    return p


def main(argv: list[str] | None = None) -> int:
    """``timeexpert tokenizer {train,corpus} ...``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.action == "train":
            cfg = TokenizerTrainConfig(args.vocab_size, args.model_type, not args.no_byte_fallback)
            tok = TextTokenizer.train(args.corpus, args.out, cfg)
            print(
                f"timeexpert tokenizer: wrote {args.out}.model ({tok.vocab_size} pieces; pad {tok.pad_id}, "
                f"bos {tok.bos_id}, eos {tok.eos_id}, <sync> {tok.sync_id})"
            )
            return 0
        from megatron_timeexpert.data.annotations import ReaderConfig, read_annotations
        from megatron_timeexpert.data.stats import BadInputs, DataError
        from megatron_timeexpert.data.vtg import write_corpus

        samples = []
        bad = BadInputs(policy="skip")
        for spec in args.annotations:
            fmt, sep, path = spec.partition("=")
            if not sep:
                raise ValueError(f"--annotations {spec!r}: expected FORMAT=FILE")
            try:
                samples += read_annotations(fmt, path, ReaderConfig(args.video_root), bad)
            except DataError as exc:
                raise ValueError(str(exc)) from None
        lines = write_corpus(samples, args.out)
        print(f"timeexpert tokenizer: wrote {lines} lines from {len(samples)} samples to {args.out}")
        return 0
    except ValueError as exc:
        print(f"timeexpert tokenizer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
