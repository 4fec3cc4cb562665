"""Cutting audio and transcripts into pieces: long audio into segments at pauses, and a file's
segments into subtitle cues."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from asr.audio import SAMPLE_RATE
from asr.decoding.options import Transcript, WordTiming
from asr.transcribe.results import FileResult

CUT_WINDOW = 5.0  # seconds at the end of a too-long piece searched for a place to cut it
FRAME = SAMPLE_RATE // 100  # 10 ms of samples
CUE_PAUSE = 1.0  # seconds of silence between words that start a new subtitle cue
CUE_SECONDS = 6.0  # longest subtitle cue: longer is more than a reader follows


def quietest_cut(samples: torch.Tensor, window: float = CUT_WINDOW) -> int:
    """Where to cut samples (N,): the middle of the quietest 10 ms frame in the last `window`
    seconds, measured over 90 ms around it (a pause between words, not a stop consonant)."""
    frames = samples.numel() // FRAME
    first = max(1, frames - round(window * 100))
    if frames <= first:
        return samples.numel()
    energy = samples[: frames * FRAME].reshape(frames, FRAME).pow(2).mean(dim=1)  # (frames,)
    smooth = F.avg_pool1d(energy[None, None], 9, stride=1, padding=4, count_include_pad=False)
    return (first + int(smooth[0, 0, first:].argmin())) * FRAME + FRAME // 2


def cut_at_pauses(
    blocks: Iterable[torch.Tensor], max_seconds: float
) -> Iterator[tuple[float, torch.Tensor]]:
    """Consecutive blocks of samples -> (start seconds, piece (N,)) pieces of at most
    `max_seconds`, each cut at `quietest_cut`. Holds at most one piece plus one block."""
    limit = round(max_seconds * SAMPLE_RATE)
    buffer, start = torch.zeros(0), 0
    for block in blocks:
        buffer = torch.cat([buffer, block])
        while buffer.numel() > limit:
            cut = quietest_cut(buffer[:limit])
            yield start / SAMPLE_RATE, buffer[:cut]
            buffer, start = buffer[cut:], start + cut
    if buffer.numel():
        yield start / SAMPLE_RATE, buffer


def shifted(transcript: Transcript, seconds: float) -> Transcript:
    """`transcript` with its word times moved `seconds` later."""
    words = tuple(
        replace(w, start=w.start + seconds, end=w.end + seconds) for w in transcript.words
    )
    return replace(transcript, words=words)


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str


def cues(result: FileResult, max_words: int, offset: float = 0.0) -> list[Cue]:
    """A cue per segment, split after `max_words` words, at a pause of `CUE_PAUSE` or before
    `CUE_SECONDS`; a segment without word times is one cue."""
    out = []
    for segment in result.segments:
        words = segment.transcript.words
        if not words:
            out.append(Cue(segment.start + offset, segment.end + offset, segment.transcript.text))
            continue
        group = [words[0]]
        for word in words[1:]:
            full = len(group) >= max_words or word.end - group[0].start > CUE_SECONDS
            if full or word.start - group[-1].end > CUE_PAUSE:
                out.append(_cue(group, offset))
                group = []
            group.append(word)
        out.append(_cue(group, offset))
    return out


def _cue(words: list[WordTiming], offset: float) -> Cue:
    start = words[0].start + offset
    # Players need a cue to last; a one-frame word gets a tenth of a second.
    end = max(words[-1].end + offset, start + 0.1)
    return Cue(start, end, " ".join(w.word for w in words))
