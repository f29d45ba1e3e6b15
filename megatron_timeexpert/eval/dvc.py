"""Dense video captioning: localisation P/R/F1, CIDEr, METEOR (densevid / TRACE) and SODA_c (Fujita et al. 2020).

All metrics are per video and then averaged over the ground-truth videos; a video without a
prediction (or with an empty one) scores 0 in every metric and is counted. Details and the
differences to each reference evaluator are in docs/EVAL.md.

- IoU (densevid, SODA): ``inter / (min(hull, len_a + len_b) + 1e-8)``.
- Localisation at each tIoU in {0.3, 0.5, 0.7, 0.9}: a prediction (ground-truth event) is covered
  when some ground-truth event (prediction) has IoU STRICTLY above the threshold; precision =
  covered predictions / predictions, recall = covered events / events, per video; each averaged
  over the thresholds. F1 is TRACE's: per video from its mean P and R, then averaged over videos
  (``F1_of_mean_PR`` is the ActivityNet-challenge style 2PR/(P+R) of the averaged P and R).
- CIDEr (pycocoevalcap's ``Cider``, i.e. CIDEr-D: sigma 6, clipped counts, x10) and METEOR 1.5
  (pycocoevalcap's jar, corpus-level over the pairs): at each tIoU every prediction is paired with
  every ground-truth event with IoU >= tIoU, or, with none, with a reference that matches nothing
  (densevid's random string; here a unique token), and the pairs of ONE video are scored together
  (so CIDEr's document frequencies come from that video's references). Mean over tIoUs, then videos.
- SODA_c: predictions and ground truth each in time order (by start, stable); weight of an
  (event, prediction) pair = IoU x METEOR with the event's caption as METEOR's hypothesis and the
  prediction as its reference (the reference code's argument order); the best order-preserving one-to-one
  matching (dynamic programming) gives S; precision S / #predictions, recall S / #events,
  F = 2PR / (P + R), per video, then averaged. Written from the paper's description.
- Captions are cleaned as densevid does (non-ASCII characters become spaces) and tokenised with
  pycocoevalcap's PTBTokenizer (lowercase, punctuation tokens removed) before any caption metric.
- At most 1000 predictions per video count (densevid's ``max_proposals``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_timeexpert.eval.io import DenseVideo

TIOUS = (0.3, 0.5, 0.7, 0.9)
"""tIoU thresholds averaged over by the localisation and caption metrics."""
MAX_PROPOSALS = 1000
"""densevid's ``max_proposals``: predictions per video beyond this are ignored."""


def dvc_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """densevid / SODA IoU: intersection over ``min(hull, len_a + len_b) + 1e-8``."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = min(max(a[1], b[1]) - min(a[0], b[0]), (a[1] - a[0]) + (b[1] - b[0]))
    return inter / (union + 1e-8)


def _truncate(p: DenseVideo | None) -> DenseVideo | None:
    if p is None:
        return None
    return DenseVideo(p.vid, p.segments[:MAX_PROPOSALS], p.captions[:MAX_PROPOSALS], p.duration, p.where)


# ---- localisation ---------------------------------------------------------------------------------


def detection_scores(gt: DenseVideo, pred: DenseVideo | None) -> tuple[list[float], list[float]]:
    """Per-threshold (precision, recall) lists of one video."""
    segs = [] if pred is None else pred.segments
    precision, recall = [], []
    for thr in TIOUS:
        p_cov, g_cov = set(), set()
        for j, g in enumerate(gt.segments):
            for i, s in enumerate(segs):
                if dvc_iou(s, g) > thr:
                    p_cov.add(i)
                    g_cov.add(j)
        precision.append(len(p_cov) / max(len(segs), 1))
        recall.append(len(g_cov) / len(gt.segments))
    return precision, recall


def localisation_metrics(gt: list[DenseVideo], preds: list[DenseVideo | None]) -> dict[str, float]:
    """Precision/recall per threshold and averaged, F1 (TRACE) and F1_of_mean_PR, in percent."""
    n = len(gt)
    p_thr = [0.0] * len(TIOUS)
    r_thr = [0.0] * len(TIOUS)
    f1s = []
    for g, p in zip(gt, preds):
        prec, rec = detection_scores(g, p)
        for t in range(len(TIOUS)):
            p_thr[t] += prec[t] / n
            r_thr[t] += rec[t] / n
        mp, mr = sum(prec) / len(prec), sum(rec) / len(rec)
        f1s.append(2 * mp * mr / (mp + mr) if mp + mr > 0 else 0.0)
    out = {}
    for t, thr in enumerate(TIOUS):
        out[f"Precision@{thr}"] = 100.0 * p_thr[t]
        out[f"Recall@{thr}"] = 100.0 * r_thr[t]
    P, R = sum(p_thr) / len(TIOUS), sum(r_thr) / len(TIOUS)
    out["Precision"] = 100.0 * P
    out["Recall"] = 100.0 * R
    out["F1"] = 100.0 * sum(f1s) / n
    out["F1_of_mean_PR"] = 100.0 * (2 * P * R / (P + R) if P + R > 0 else 0.0)
    return out


# ---- caption scoring (pycocoevalcap; needs Java) ----------------------------------------------------


def java_available() -> bool:
    """True when a ``java`` executable is on PATH (PTBTokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def clean_caption(text: str) -> str:
    """densevid's ``remove_nonascii``: every non-ASCII character becomes a space."""
    return "".join(c if ord(c) < 128 else " " for c in text)


class CocoScorers:
    """PTBTokenizer, METEOR 1.5 and CIDEr-D from pycocoevalcap, behind three small calls.

    The METEOR jar runs as one Java process for the scorer's lifetime; call :meth:`close` (or use
    ``with``) to end it.
    """

    def __init__(self) -> None:
        if not java_available():
            raise RuntimeError("caption metrics need Java (PTBTokenizer, METEOR): no `java` on PATH")
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        self._tokenizer = PTBTokenizer()
        self._cider = Cider()
        self._meteor = Meteor()

    def tokenize(self, captions: Sequence[str]) -> list[str]:
        """PTB-tokenised, lowercased captions without punctuation tokens (one Java run for all)."""
        if not captions:
            return []
        tok = self._tokenizer.tokenize({i: [{"caption": clean_caption(c)}] for i, c in enumerate(captions)})
        return [tok[i][0] for i in range(len(captions))]

    def meteor(self, pairs: Sequence[tuple[str, str]]) -> tuple[float, list[float]]:
        """METEOR of ``(hypothesis, reference)`` pairs: (corpus-level score, per-pair scores)."""
        gts = {i: [r] for i, (_, r) in enumerate(pairs)}
        res = {i: [h] for i, (h, _) in enumerate(pairs)}
        score, scores = self._meteor.compute_score(gts, res)
        return float(score), [float(s) for s in scores]

    def cider(self, pairs: Sequence[tuple[str, str]]) -> float:
        """CIDEr-D (pycocoevalcap) of ``(hypothesis, reference)`` pairs, document frequencies from these refs."""
        gts = {i: [r] for i, (_, r) in enumerate(pairs)}
        res = {i: [h] for i, (h, _) in enumerate(pairs)}
        score, _ = self._cider.compute_score(gts, res)
        return float(score)

    def close(self) -> None:
        """Stop the METEOR Java process."""
        m = getattr(self, "_meteor", None)
        if m is not None:
            with m.lock:
                m.meteor_p.stdin.close()
                m.meteor_p.kill()
                m.meteor_p.wait()
            self._meteor = None  # pycocoevalcap's own __del__ is then a no-op

    def __enter__(self) -> CocoScorers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _garbage_refs(vocab: set[str], count: int) -> list[str]:
    """``count`` distinct one-word references that share no token with ``vocab`` (densevid's random strings)."""
    out, k = [], 0
    while len(out) < count:
        word, n = "", k
        for _ in range(8):
            word += "qxzjvkwy"[n % 8]
            n //= 8
        word = "zq" + word
        if word not in vocab:
            out.append(word)
        k += 1
    return out


@dataclass
class TokenisedVideo:
    """A video's segments with PTB-tokenised captions."""

    segments: list[tuple[float, float]]
    """Spans in the order given."""
    captions: list[str]
    """Tokenised captions, one per span."""


def caption_pairs(gt: TokenisedVideo, pred: TokenisedVideo, thr: float) -> list[tuple[str, str]]:
    """densevid's pairs at one tIoU: each prediction with every event of IoU >= thr, or with a garbage reference."""
    vocab = {w for c in gt.captions + pred.captions for w in c.split()}
    pairs, lonely = [], []
    for s, cap in zip(pred.segments, pred.captions):
        hits = [g for gs, g in zip(gt.segments, gt.captions) if dvc_iou(s, gs) >= thr]
        if hits:
            pairs.extend((cap, g) for g in hits)
        else:
            lonely.append(cap)
    pairs.extend(zip(lonely, _garbage_refs(vocab, len(lonely))))
    return pairs


def soda_c_video(gt: TokenisedVideo, pred: TokenisedVideo, pair_score: Callable[[list[tuple[str, str]]], list[float]]):
    """SODA_c F-measure of one video; ``pair_score`` gives METEOR per ``(hypothesis, reference)`` pair."""
    if not pred.segments:
        return 0.0
    g_order = sorted(range(len(gt.segments)), key=lambda i: gt.segments[i][0])
    p_order = sorted(range(len(pred.segments)), key=lambda i: pred.segments[i][0])
    # As the reference SODA code calls pycocoevalcap: the event's caption is METEOR's hypothesis and the
    # prediction its reference (METEOR is not symmetric).
    pairs = [(gt.captions[g], pred.captions[p]) for g in g_order for p in p_order]
    scores = pair_score(pairs)
    n_g, n_p = len(g_order), len(p_order)
    weight = [
        [dvc_iou(pred.segments[p], gt.segments[g]) * scores[a * n_p + b] for b, p in enumerate(p_order)]
        for a, g in enumerate(g_order)
    ]
    # Best order-preserving one-to-one matching: dp[a][b] over the first a events and b predictions.
    dp = [[0.0] * (n_p + 1) for _ in range(n_g + 1)]
    for a in range(1, n_g + 1):
        for b in range(1, n_p + 1):
            dp[a][b] = max(dp[a - 1][b], dp[a][b - 1], dp[a - 1][b - 1] + weight[a - 1][b - 1])
    total = dp[n_g][n_p]
    p, r = total / n_p, total / n_g
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def caption_metrics(gt: list[DenseVideo], preds: list[DenseVideo | None], scorers: CocoScorers) -> dict[str, float]:
    """CIDEr, METEOR (densevid-style, per video) and SODA_c, in percent."""
    texts = sorted({c for v in gt for c in v.captions} | {c for p in preds if p is not None for c in p.captions})
    tok = dict(zip(texts, scorers.tokenize(texts)))

    def tokenised(v: DenseVideo | None) -> TokenisedVideo:
        if v is None:
            return TokenisedVideo([], [])
        return TokenisedVideo(list(v.segments), [tok[c] for c in v.captions])

    cider, meteor, soda = [], [], []
    for g, p in zip(gt, preds):
        tg, tp = tokenised(g), tokenised(p)
        if not tp.segments:
            cider.append(0.0)
            meteor.append(0.0)
            soda.append(0.0)
            continue
        c_vals, m_vals = [], []
        for thr in TIOUS:
            pairs = caption_pairs(tg, tp, thr)
            c_vals.append(scorers.cider(pairs))
            m_vals.append(scorers.meteor(pairs)[0])
        cider.append(sum(c_vals) / len(c_vals))
        meteor.append(sum(m_vals) / len(m_vals))
        soda.append(soda_c_video(tg, tp, lambda pairs: scorers.meteor(pairs)[1]))
    n = len(gt)
    return {"CIDEr": 100.0 * sum(cider) / n, "METEOR": 100.0 * sum(meteor) / n, "SODA_c": 100.0 * sum(soda) / n}


def match_videos(gt: list[DenseVideo], preds: dict[str, DenseVideo]) -> tuple[list[DenseVideo | None], list[str]]:
    """Predictions in ground-truth order (None where missing; at most MAX_PROPOSALS each) and the unmatched ids."""
    gt_ids = {v.vid for v in gt}
    return [_truncate(preds.get(v.vid)) for v in gt], sorted(k for k in preds if k not in gt_ids)


def dvc_metrics(
    gt: list[DenseVideo], preds: dict[str, DenseVideo], scorers: CocoScorers | None = None
) -> dict[str, float]:
    """All dense-captioning metrics; caption metrics only when ``scorers`` is given."""
    if not gt:
        raise ValueError("dvc_metrics: no ground-truth video")
    matched, unmatched = match_videos(gt, preds)
    out = localisation_metrics(gt, matched)
    if scorers is not None:
        out.update(caption_metrics(gt, matched, scorers))
    out["num_videos"] = float(len(gt))
    out["num_missing_predictions"] = float(sum(p is None for p in matched))
    out["num_empty_predictions"] = float(sum(p is not None and not p.segments for p in matched))
    out["num_unmatched_predictions"] = float(len(unmatched))
    return out
