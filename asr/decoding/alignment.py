"""Word timings and confidences from a CTC forced alignment of a chosen hypothesis.

Any hypothesis (CTC beam search output, or LAS output aligned with its auxiliary CTC head) is
aligned to the CTC posteriors with Viterbi forced alignment (torchaudio's `forced_align`).
Each token gets the frames of its CTC path; a word spans its tokens (sentencepiece marks word
starts with "▁"). A word's confidence is the mean posterior of its tokens over their frames.

CTC posteriors are peaky: a token often owns one frame somewhere inside its sound, so spans
alone put word ends too early and single-token words at a point. Given the feature frames'
energy, each span is therefore widened to the speech around it (never into a neighbour), and a
span that landed in silence moves to the nearest speech between its neighbours.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchaudio.functional import forced_align, merge_tokens

from asr.decoding.options import WordTiming
from asr.tokenizer import BLANK_ID, Tokenizer

WORD_START = "\u2581"  # sentencepiece's word-boundary mark


@dataclass
class _Word:
    text: str
    start: int  # feature frames, [start, end)
    end: int
    confidence: float


def ctc_frames_needed(tokens: Sequence[int]) -> int:
    """Frames a CTC path for `tokens` needs: one per token plus a blank between repeats."""
    return len(tokens) + sum(1 for a, b in itertools.pairwise(tokens) if a == b)


def speech_frames(energy: torch.Tensor, ratio: float = 0.25) -> torch.Tensor:
    """Frames louder than the utterance's quiet floor: energy (T,) log-mel frame means -> (T,)
    bool. The threshold sits `ratio` of the way from the 5th to the 99th energy percentile."""
    if energy.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    low, high = torch.quantile(energy.float(), torch.tensor([0.05, 0.99]))
    return energy > low + ratio * (high - low)


def _refine(words: list[_Word], speech: torch.Tensor) -> None:
    """Fit each word's [start, end) to the speech frames around it, between its neighbours."""
    total = speech.numel()
    for i, w in enumerate(words):
        lo = words[i - 1].end if i > 0 else 0
        hi = words[i + 1].start if i + 1 < len(words) else total
        lo, hi = min(lo, w.start), max(hi, w.end)
        inside = speech[w.start : w.end].nonzero()
        if inside.numel():
            start, end = w.start + int(inside[0]), w.start + int(inside[-1]) + 1
        else:  # aligned in silence: take the nearest speech between the neighbours
            around = speech[lo:hi].nonzero()[:, 0] + lo
            if around.numel() == 0:
                continue
            nearest = int(around[(around - w.start).abs().argmin()])
            start = end = nearest
            end += 1
        while start > lo and speech[start - 1]:
            start -= 1
        while end < hi and speech[end]:
            end += 1
        w.start, w.end = start, end


def word_timings(
    log_probs: torch.Tensor,
    tokens: Sequence[int],
    tokenizer: Tokenizer,
    frame_seconds: float,
    time_reduction: int,
    energy: torch.Tensor | None = None,
    offset: float = 0.0,
) -> tuple[WordTiming, ...]:
    """Words of `tokens` with start/end seconds and confidence.

    log_probs: (T', V) CTC log-probs of one utterance (valid frames only); time_reduction:
    feature frames per frame of log_probs; frame_seconds: seconds per feature frame; energy:
    (T,) per-feature-frame loudness (e.g. mean log-mel) to refine boundaries with; offset:
    seconds added to every time (a segment's start). Returns () when the tokens cannot be
    aligned (more tokens than the frames allow).
    """
    ids = [t for t in tokens if t != BLANK_ID]
    if not ids or ctc_frames_needed(ids) > log_probs.shape[0]:
        return ()
    targets = torch.tensor([ids], dtype=torch.int32, device=log_probs.device)
    path, scores = forced_align(log_probs[None].float(), targets, blank=BLANK_ID)
    spans = merge_tokens(path[0].cpu(), scores[0].exp().cpu(), blank=BLANK_ID)
    groups: list[list] = []
    for span in spans:
        if not groups or tokenizer.piece(span.token).startswith(WORD_START):
            groups.append([])
        groups[-1].append(span)
    words = [
        _Word(
            text=tokenizer.decode([s.token for s in group]).strip(),
            start=group[0].start * time_reduction,
            end=group[-1].end * time_reduction,
            confidence=sum(s.score for s in group) / len(group),
        )
        for group in groups
    ]
    words = [w for w in words if w.text]
    if energy is not None:
        _refine(words, speech_frames(energy.cpu()))
    return tuple(
        WordTiming(
            word=w.text,
            start=round(offset + w.start * frame_seconds, 3),
            end=round(offset + w.end * frame_seconds, 3),
            confidence=round(w.confidence, 4),
        )
        for w in words
    )
