"""Word and character error rates, after the one text normalisation of `asr.text`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jiwer

from asr.text import normalize_text


@dataclass(frozen=True)
class ErrorRates:
    wer: float  # percent
    cer: float  # percent
    utterances: int
    words: int  # reference words

    def to_dict(self) -> dict[str, float | int]:
        return {
            "wer": self.wer,
            "cer": self.cer,
            "utterances": self.utterances,
            "words": self.words,
        }


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> ErrorRates:
    """Corpus-level WER and CER in percent (errors summed over utterances, then divided).

    Both sides are normalised with `asr.text.normalize_text` (upper case, A-Z and apostrophes),
    so punctuation or casing in a reference never counts as an error.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    kept = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    if not kept:
        raise ValueError("no non-empty references to score against")
    ref_list, hyp_list = [r for r, _ in kept], [h for _, h in kept]
    words = jiwer.process_words(ref_list, hyp_list)
    chars = jiwer.process_characters(ref_list, hyp_list)
    return ErrorRates(
        wer=100.0 * words.wer,
        cer=100.0 * chars.cer,
        utterances=len(kept),
        words=sum(len(r.split()) for r in ref_list),
    )
