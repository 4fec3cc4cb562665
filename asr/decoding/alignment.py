"""Word timings and confidences from a CTC forced alignment of a chosen hypothesis.

Any hypothesis (CTC beam search output, or LAS output aligned with its auxiliary CTC head) is
aligned to the CTC posteriors with Viterbi forced alignment (torchaudio's `forced_align`).
Each token gets the frames of its CTC path; a word spans its tokens (sentencepiece marks word
starts with "▁"). A word's confidence is the mean posterior of its tokens over their frames.

CTC posteriors are peaky: a token often owns one frame somewhere inside its sound (or at the
edge of a neighbour's), so spans alone put word ends too early and one-token words at a point.
Given the feature frames' energy, each word is fitted to the runs of speech its tokens fall in
(see `_refine`).
"""

from __future__ import annotations

import itertools
from collections import Counter
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
    tokens: list[tuple[int, int]]  # feature-frame ranges [start, end) of its tokens


def ctc_frames_needed(tokens: Sequence[int]) -> int:
    """Frames a CTC path for `tokens` needs: one per token plus a blank between repeats."""
    return len(tokens) + sum(1 for a, b in itertools.pairwise(tokens) if a == b)


def speech_frames(energy: torch.Tensor, ratio: float = 0.25, bridge: int = 8) -> torch.Tensor:
    """Frames louder than the utterance's quiet floor: energy (T,) log-mel frame means -> (T,)
    bool. The threshold sits `ratio` of the way from the 5th to the 99th energy percentile."""
    if energy.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    low, high = torch.quantile(energy.float(), torch.tensor([0.05, 0.99]))
    speech = energy > low + ratio * (high - low)
    # Pauses shorter than `bridge` frames (stop closures inside words) stay speech.
    quiet = _runs(~speech)
    for a, b in quiet:
        if a > 0 and b < speech.numel() and b - a <= bridge:
            speech[a:b] = True
    return speech


def _runs(speech: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of True frames."""
    edges = torch.diff(speech.long(), prepend=torch.zeros(1), append=torch.zeros(1))
    starts = (edges == 1).nonzero()[:, 0].tolist()
    ends = (edges == -1).nonzero()[:, 0].tolist()
    return list(zip(starts, ends, strict=True))


def _refine(words: list[_Word], speech: torch.Tensor) -> None:
    """Fit each word to the runs of speech its tokens fall in.

    A word takes the runs holding its token frames. A CTC spike often lands at the edge of a
    neighbour's sound, so a run two neighbours touch belongs to the one with more token frames
    in it; a run both must keep is split midway between their tokens. A word whose tokens all
    fall in silence keeps its aligned span.
    """
    runs = _runs(speech)
    run_at = torch.full((speech.numel() + 1,), -1, dtype=torch.long)
    for r, (a, b) in enumerate(runs):
        run_at[a:b] = r
    votes: list[Counter[int]] = []  # per word: token frames in each run
    for w in words:
        frames = torch.cat([torch.arange(a, min(b, speech.numel())) for a, b in w.tokens])
        votes.append(Counter(r for r in run_at[frames].tolist() if r >= 0))
    kept = [sorted(v) for v in votes]
    for i in range(len(words) - 1):
        # A run both neighbours touch goes to the one with more token frames in it; the other
        # lets it go if it has runs of its own (else both keep it and split it).
        shared = set(kept[i]) & set(kept[i + 1])
        for r in shared:
            if votes[i][r] > votes[i + 1][r] and len(kept[i + 1]) > 1:
                kept[i + 1].remove(r)
            elif votes[i + 1][r] > votes[i][r] and len(kept[i]) > 1:
                kept[i].remove(r)
    bounds = []
    for i, (w, ids) in enumerate(zip(words, kept, strict=True)):
        if not ids:
            bounds.append((w.start, w.end))
            continue
        start, end = runs[ids[0]][0], runs[ids[-1]][1]
        if i > 0 and ids[0] in kept[i - 1]:
            start = (words[i - 1].tokens[-1][1] + w.tokens[0][0]) // 2
        if i + 1 < len(words) and ids[-1] in kept[i + 1]:
            end = (w.tokens[-1][1] + words[i + 1].tokens[0][0]) // 2
        bounds.append((start, max(end, start + 1)))
    for w, (start, end) in zip(words, bounds, strict=True):
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
            tokens=[(s.start * time_reduction, s.end * time_reduction) for s in group],
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
