"""Word and character error rates, after the one text normalisation of `asr.text`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import jiwer

from asr.text import normalize_text


@dataclass(frozen=True)
class ErrorRates:
    wer: float  # percent
    cer: float  # percent
    utterances: int
    words: int  # reference words
    substitutions: int = 0  # word errors by kind
    deletions: int = 0
    insertions: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class UtteranceErrors:
    id: str
    reference: str  # normalised
    hypothesis: str  # normalised
    errors: int  # word substitutions + deletions + insertions
    words: int  # reference words

    @property
    def wer(self) -> float:
        return 100.0 * self.errors / max(self.words, 1)


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
        substitutions=words.substitutions,
        deletions=words.deletions,
        insertions=words.insertions,
    )


def utterance_errors(
    ids: Sequence[str], references: Sequence[str], hypotheses: Sequence[str]
) -> list[UtteranceErrors]:
    """Word errors of each utterance with a non-empty reference, worst (most errors) first."""
    rows = [
        (i, normalize_text(r), normalize_text(h))
        for i, r, h in zip(ids, references, hypotheses, strict=True)
    ]
    rows = [row for row in rows if row[1]]
    if not rows:
        return []
    out = jiwer.process_words([r for _, r, _ in rows], [h for _, _, h in rows])
    result = []
    for (utt, ref, hyp), chunks in zip(rows, out.alignments, strict=True):
        errors = sum(
            max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx)
            for c in chunks
            if c.type != "equal"
        )
        result.append(UtteranceErrors(utt, ref, hyp, errors, len(ref.split())))
    result.sort(key=lambda u: (-u.errors, -u.wer, u.id))
    return result
