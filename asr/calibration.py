"""Word confidence that means something: Platt scaling fitted on dev, stored in the bundle.

A word's raw confidence (the mean CTC posterior of its tokens over their aligned frames,
`asr.decoding.alignment`) ranks words well but is not a probability: CTC posteriors are
peaky, so a model reading a voice or text it never learnt still reports about 0.75 for words
it gets wrong nine times in ten. Calibration maps it to the probability that the word is right
(that it matches the reference in a Levenshtein alignment, as WER counts it):

    p = sigmoid(word_weight * logit(c) + utterance_weight * logit(u) + bias)

c: the word's raw confidence; u: the mean raw confidence of the words of its utterance (a
final segment's, when streamed). A word among uncertain words is less likely right than the
same score among certain ones, and that carries over to voices and synthesizers the model
never heard, where it is wrong almost everywhere. Both weights are kept >= 0 (word_weight
> 0), so within an utterance calibration never reorders words by confidence; the identity
(1, 0, 0) leaves confidences as they were (1.0 becomes 0.9999).

Why this form: on the demo BiLSTM-CTC (fitted on its 425 dev words, WER 28 %), word ECE went
0.079 -> 0.046 on a held-out espeak voice, 0.555 -> 0.128 on four synthesizers it never heard
(WER 82 %) and 0.70 -> 0.15 on real speech (WER 105 %); c alone gave 0.059 / 0.176 / 0.22.
Adding the word's lowest token posterior, its length in tokens or the frames' entropy, or a
temperature on the posteriors before alignment, did no better on the unheard synthesizers.

`fit` finds the weights by logistic regression on dev words (export does it, see
`asr.training.export`), `expected_calibration_error` measures the result.

With a language model fused into the search, the same raw confidences mean something else:
the LM picks words the acoustics were unsure of, and they are right more often than their
posteriors say. So a bundle holds a second calibration, fitted on dev decoded with an LM
(`asr export --lm`, config.json's "lm_calibration", with the sha256 of the LM), applied to
transcripts fused with that LM only.
The one fitted without an LM does not carry over: on the demo model with its 3-gram it
took word ECE from 0.051 (raw) to 0.262 on the held-out engine, 0.082 to 0.189 on held-out
sentences, and one fitted with another LM does not either (its 3-gram's, applied to an LSTM
LM's decodes: 0.142 -> 0.193). So without a calibration for the LM fused, fused words keep
their raw confidences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jiwer
import numpy as np

from asr.config import Config
from asr.decoding.options import WordTiming
from asr.text import normalize_text

VERSION = 1  # of the "calibration" and "lm_calibration" entries of a bundle's config.json
KEY, LM_KEY = "calibration", "lm_calibration"  # their names: without and with an LM
LM_FINGERPRINT = "lm_sha256"  # in "lm_calibration": the LM it was fitted with
LM_FUSION = ("lm_weight", "length_bonus")  # ... and the DecodeOptions it was fused with
METHOD = "platt"
# Raw confidences are rounded to 4 places: 1.0 means "at least 0.99995", kept finite.
_EPS = 1e-4
_BIAS_PRIOR = 1e-3  # see _logistic


@dataclass(frozen=True)
class Calibration(Config):
    """Platt scaling of word confidences; see the module docstring."""

    word_weight: float = 1.0
    utterance_weight: float = 0.0
    bias: float = 0.0

    def validate(self) -> None:
        finite = all(map(math.isfinite, (self.word_weight, self.utterance_weight, self.bias)))
        self.check(
            {
                "word_weight": (self.word_weight > 0, "> 0 (calibration keeps the order)"),
                "utterance_weight": (self.utterance_weight >= 0, ">= 0"),
                "bias": (finite, "finite, as the weights"),
            }
        )

    def confidences(self, raw: Sequence[float]) -> list[float]:
        """One utterance's raw word confidences -> calibrated ones, to 4 places."""
        if not raw:
            return []
        z = _features(raw) @ np.array([self.word_weight, self.utterance_weight]) + self.bias
        return [round(float(p), 4) for p in _sigmoid(z)]

    def apply(self, words: Sequence[WordTiming]) -> tuple[WordTiming, ...]:
        """One utterance's words with calibrated confidences, the raw ones kept beside them
        (`raw_confidence`); words already calibrated are calibrated again from their raw."""
        raw = [w.confidence if w.raw_confidence is None else w.raw_confidence for w in words]
        return tuple(
            replace(w, confidence=p, raw_confidence=r)
            for w, r, p in zip(words, raw, self.confidences(raw), strict=True)
        )

    def to_bundle(
        self, lm_fingerprint: str | None = None, lm_fusion: Mapping[str, float] | None = None
    ) -> dict[str, Any]:
        """Its entry in a bundle's config.json ("calibration", or "lm_calibration" with the
        fingerprint of the LM it was fitted with and the `lm_weight` and `length_bonus` it
        was fused at: `Bundle.lm_fusion`)."""
        lm = {LM_FINGERPRINT: lm_fingerprint} if lm_fingerprint is not None else {}
        return {"version": VERSION, "method": METHOD} | self.to_dict() | lm | dict(lm_fusion or {})

    @classmethod
    def from_bundle(cls, config: Mapping[str, Any], key: str = KEY) -> Calibration | None:
        """The calibration under `key` in a bundle's config.json (None when it has none: its
        confidences are raw); ValueError for one this version cannot apply."""
        stored = config.get(key)
        if stored is None:
            return None
        if not isinstance(stored, Mapping):
            raise ValueError(f"{key} must be an object, got {stored!r}")
        entry = dict(stored)
        version, method = entry.pop("version", None), entry.pop("method", None)
        entry.pop(LM_FINGERPRINT, None)  # which LM (`Bundle.lm_fingerprint`): the recognizer checks
        for name in LM_FUSION:  # how it was fused (`Bundle.lm_fusion`)
            entry.pop(name, None)
        if version != VERSION or method != METHOD:
            raise ValueError(
                f"{key}: unsupported calibration {method!r} version {version!r} "
                f"(expected {METHOD!r} {VERSION})"
            )
        try:
            return cls.from_dict(entry)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from err


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return np.log(p / (1.0 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # 1 / (1 + e^-z), without overflow


def _features(raw: Sequence[float]) -> np.ndarray:
    """One utterance's raw word confidences (W,) -> (W, 2): logit of each, logit of their mean."""
    c = np.asarray(raw, dtype=np.float64)
    return np.stack([_logit(c), np.full_like(c, _logit(c.mean()))], axis=1)


def fit(
    raw: Sequence[Sequence[float]], labels: Sequence[Sequence[bool]], *, prior: float = 1.0
) -> Calibration:
    """Logistic regression of word correctness on the features above, per utterance: raw
    word confidences and whether each word is right (`word_labels`).

    `prior` pulls the weights towards the identity (an L2 penalty, in words' worth of
    log-likelihood), so a few words move confidences only a little. An utterance weight that
    comes out negative is fixed at 0 and the rest refitted. ValueError without words, or when
    higher raw confidence does not mean more often right (no order-keeping calibration fits).
    """
    if len(raw) != len(labels):
        raise ValueError(f"{len(raw)} utterances of confidences but {len(labels)} of labels")
    blocks = []
    for conf, right in zip(raw, labels, strict=True):
        if len(conf) != len(right):
            raise ValueError(f"{len(conf)} confidences but {len(right)} labels in an utterance")
        if conf:
            blocks.append((_features(conf), np.asarray(right, dtype=np.float64)))
    if not blocks:
        raise ValueError("no words to fit a calibration on")
    x = np.concatenate([b[0] for b in blocks])
    y = np.concatenate([b[1] for b in blocks])
    theta = _logistic(x, y, [1.0, 0.0], prior)
    if theta[1] < 0:  # a worse utterance must never make its words more likely right
        word, bias = _logistic(x[:, :1], y, [1.0], prior)
        theta = np.array([word, 0.0, bias])
    if not theta[0] > 0:
        raise ValueError(
            "higher raw confidence does not mean more often right on these words; "
            "no calibration keeps their order"
        )
    return Calibration(float(theta[0]), float(theta[1]), float(theta[2]))


def _logistic(x: np.ndarray, y: np.ndarray, centre: Sequence[float], prior: float) -> np.ndarray:
    """The weights and bias (K + 1,) of a logistic regression of y (N,) in {0, 1} on x
    (N, K): minimises the sum of log-losses + prior/2 * |weights - centre|^2, with a faint
    pull of the bias to 0 so that it stays finite when every word is right (or wrong). The
    objective is strictly convex; Newton steps, halved until they lower it, find its minimum."""
    x = np.column_stack([x, np.ones(len(y))])
    c = np.array([*centre, 0.0])
    pull = np.array([prior] * len(centre) + [_BIAS_PRIOR])

    def objective(theta: np.ndarray) -> float:
        z = x @ theta  # log(1 + e^z) - y z, without overflow
        return float((np.logaddexp(0.0, z) - y * z).sum() + 0.5 * (pull * (theta - c) ** 2).sum())

    theta = c.copy()
    for _ in range(100):
        p = _sigmoid(x @ theta)
        grad = x.T @ (p - y) + pull * (theta - c)
        hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(pull)
        step = np.linalg.solve(hess, grad)
        before, scale = objective(theta), 1.0
        while objective(theta - scale * step) > before and scale > 1e-6:
            scale /= 2
        theta = theta - scale * step
        if np.abs(scale * step).max() < 1e-10:
            break
    return theta


def expected_calibration_error(
    confidences: Sequence[float], labels: Sequence[bool], bins: int = 10
) -> float:
    """ECE with `bins` equal-width bins over [0, 1]: the mean over words of |mean confidence
    - fraction right| of their bin (1.0 falls in the last bin). ValueError without words."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if len(confidences) != len(labels):
        raise ValueError(f"{len(confidences)} confidences but {len(labels)} labels")
    if not len(confidences):
        raise ValueError("no confidences to measure")
    c = np.asarray(confidences, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    which = np.minimum((c * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in np.unique(which):
        inside = which == b
        total += abs(c[inside].mean() - y[inside].mean()) * inside.sum()
    return float(total / len(c))


def word_labels(reference: str, words: Sequence[str]) -> list[bool]:
    """Whether each hypothesis word is right: in an "equal" chunk of the Levenshtein
    alignment of the words to the reference (both normalised as WER normalises them).

    A word that normalises to several (ISN'T-IT) is right only if all of them are, one that
    normalises to nothing is an insertion; against an empty reference every word is wrong.
    """
    parts = [normalize_text(w).split() for w in words]
    flat = [p for ps in parts for p in ps]
    ref = normalize_text(reference)
    right = [False] * len(flat)
    if flat and ref:
        for chunk in jiwer.process_words(ref, " ".join(flat)).alignments[0]:
            if chunk.type == "equal":
                right[chunk.hyp_start_idx : chunk.hyp_end_idx] = [True] * (
                    chunk.hyp_end_idx - chunk.hyp_start_idx
                )
    out, at = [], 0
    for ps in parts:
        out.append(bool(ps) and all(right[at : at + len(ps)]))
        at += len(ps)
    return out
