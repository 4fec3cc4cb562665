"""Decoding options and typed results, shared by every decoder, the CLI and the server."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from asr.config import Config

# Limits on a request's hotwords: their prefix tree is built per request.
MAX_HOTWORDS = 1000
MAX_HOTWORD_CHARS = 100
MAX_BOOST = 20.0
DEFAULT_BOOST = 1.5  # per unit matched, as sherpa's default hotwords score


@dataclass(frozen=True)
class DecodeOptions(Config):
    """Everything that changes how a transcript is searched for; override with `replace`.

    `method` picks the search by name (see `asr.recognizer.METHODS`): greedy and beam use the
    model's own decoder (CTC prefix beam search for BiLSTM-CTC, attention beam search for LAS);
    joint (attention beam search scored together with CTC posteriors) and rescore (CTC n-best
    rescored by an attention decoder) need both, from one LAS with a CTC head or from a
    BiLSTM-CTC with a LAS bundle beside it.
    """

    method: str = "beam"
    beam: int = 10
    nbest: int = 1  # alternatives returned (at most `beam`)
    # CTC prefix beam search: per-frame token pruning and blank-frame skipping.
    prune_top_k: int | None = 16  # extend each prefix by at most this many tokens per frame
    prune_threshold: float | None = 15.0  # ... and only by tokens this close (nats) to the best
    # Skip frames whose blank probability is at least this (None: search every frame). At
    # 0.999 the best hypothesis matched exact search on all 300 utterances we checked.
    blank_skip: float | None = 0.999
    # Attention beam search.
    length_penalty: float = 1.0  # rank finished hypotheses by score / length**length_penalty
    eos_threshold: float | None = None  # eos only within this many nats of the best token
    min_len_ratio: float = 0.0  # tokens per encoder frame, bounds on hypothesis length
    max_len_ratio: float = 2.0
    coverage_weight: float = 0.0  # bonus per encoder frame attended to (Chorowski et al. 2017)
    coverage_threshold: float = 0.5  # ... with cumulative attention above this
    # Joint CTC/attention scoring and two-pass rescoring.
    ctc_weight: float = 0.3
    joint_candidates: int | None = None  # tokens scored by CTC per hypothesis (None: 1.5 beam)
    # Shallow fusion (asr.decoding.scorers), in every search but greedy: the recognizer's LM
    # at this weight (0: not used), a bonus per emitted unit, and phrases to favour, each with
    # its boost per unit matched (withdrawn if the phrase is left unfinished).
    lm_weight: float = 0.0
    length_bonus: float = 0.0
    # Searches over an attention decoder (LAS beam, joint, rescore) subtract its internal LM
    # estimate at this weight (ILME, `asr.models.las.InternalLM`; 0: not subtracted), so an
    # external LM replaces the training transcripts' prior instead of adding to it.
    ilm_weight: float = 0.0
    hotwords: tuple[tuple[str, float], ...] = ()
    # Results.
    word_timings: bool = True

    def validate(self) -> None:
        k, threshold, skip = self.prune_top_k, self.prune_threshold, self.blank_skip
        eos, candidates = self.eos_threshold, self.joint_candidates
        self.check(
            {
                "beam": (self.beam >= 1, ">= 1"),
                "nbest": (self.nbest >= 1, ">= 1"),
                "prune_top_k": (k is None or k >= 1, "None or >= 1"),
                "prune_threshold": (threshold is None or threshold > 0, "None or > 0"),
                "blank_skip": (skip is None or 0.0 < skip <= 1.0, "None or in (0, 1]"),
                "length_penalty": (self.length_penalty >= 0, ">= 0"),
                "eos_threshold": (eos is None or eos >= 0, "None or >= 0"),
                "min_len_ratio": (
                    0 <= self.min_len_ratio < self.max_len_ratio,
                    "in [0, max_len_ratio)",
                ),
                "max_len_ratio": (self.max_len_ratio > 0, "> 0"),
                "coverage_threshold": (self.coverage_threshold > 0, "> 0"),
                "ctc_weight": (0.0 <= self.ctc_weight <= 1.0, "in [0, 1]"),
                "joint_candidates": (candidates is None or candidates >= 1, "None or >= 1"),
                "lm_weight": (0.0 <= self.lm_weight <= 10.0, "in [0, 10]"),
                "length_bonus": (math.isfinite(self.length_bonus), "finite"),
                "ilm_weight": (0.0 <= self.ilm_weight <= 10.0, "in [0, 10]"),
                "hotwords": (
                    len(self.hotwords) <= MAX_HOTWORDS
                    and all(
                        0 < len(p.strip()) <= MAX_HOTWORD_CHARS and 0 < b <= MAX_BOOST
                        for p, b in self.hotwords
                    ),
                    f"at most {MAX_HOTWORDS} (phrase, boost) pairs, each phrase 1-"
                    f"{MAX_HOTWORD_CHARS} characters and boost in (0, {MAX_BOOST:g}]",
                ),
            }
        )

    def override(self, **changes: Any) -> DecodeOptions:
        """`replace(self, **changes)` for options named by a user: an unknown name is a
        TypeError that lists the valid ones, a bad value the ValueError above."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(
                f"unknown decoding option(s) {', '.join(unknown)}; "
                f"DecodeOptions has {', '.join(sorted(names))}"
            )
        return replace(self, **changes)


@dataclass(frozen=True)
class Hypothesis:
    """One search result: token ids and the log-probability score the search ranked it by."""

    tokens: tuple[int, ...]
    score: float


@dataclass(frozen=True)
class WordTiming:
    word: str
    start: float  # seconds from the start of the audio
    end: float
    confidence: float  # in [0, 1]: calibrated when the bundle has a calibration
    raw_confidence: float | None = None  # before calibration (None: confidence is raw)

    def to_dict(self) -> dict[str, object]:
        """Its fields, `raw_confidence` only where calibration set it."""
        out = asdict(self)
        if self.raw_confidence is None:
            del out["raw_confidence"]
        return out


def mean_confidence(words: Sequence[WordTiming]) -> float:
    """An utterance's confidence: the mean of its words' (0 without words), to 4 places; with
    calibrated words, the expected fraction of its words that are right."""
    return round(sum(w.confidence for w in words) / len(words), 4) if words else 0.0


@dataclass(frozen=True)
class Alternative:
    """One n-best entry."""

    text: str
    tokens: tuple[int, ...]
    score: float


@dataclass(frozen=True)
class Transcript:
    """What a recognizer returns for one utterance; `nbest[0]` is the transcript itself."""

    text: str
    tokens: tuple[int, ...]
    score: float
    words: tuple[WordTiming, ...] = ()
    nbest: tuple[Alternative, ...] = ()
    confidence: float = 0.0  # utterance confidence in [0, 1] (mean word confidence)

    def to_dict(self) -> dict[str, object]:
        return {
            "text": self.text,
            "score": self.score,
            "confidence": self.confidence,
            "words": [w.to_dict() for w in self.words],
            "nbest": [{"text": a.text, "score": a.score} for a in self.nbest],
        }
