"""What transcribing a file gives: its segments (`FileResult`), or why it could not be used
(`Failure`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from asr.decoding.options import Transcript, WordTiming, mean_confidence
from asr.transcribe.inputs import Item


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the file
    end: float
    transcript: Transcript  # word times from the start of the file


@dataclass(frozen=True)
class FileResult:
    item: Item
    duration: float  # seconds
    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return " ".join(s.transcript.text for s in self.segments if s.transcript.text)

    @property
    def words(self) -> list[WordTiming]:
        return [w for s in self.segments for w in s.transcript.words]

    def to_json(self, nbest: bool) -> dict[str, Any]:
        """id, path, duration, text, confidence, words, segments; with `nbest`, the n-best
        list of a file decoded as one segment, or of each segment of a longer one."""
        words = self.words
        row: dict[str, Any] = {
            "id": self.item.id,
            "path": str(self.item.path),
            "duration": round(self.duration, 3),
            "text": self.text,
            "confidence": mean_confidence(words),
            "words": [_word_json(w) for w in words],
            "segments": [_segment_json(s) for s in self.segments],
        }
        if nbest and len(self.segments) == 1:
            row["nbest"] = _nbest_json(self.segments[0].transcript)
        elif nbest:
            for segment, out in zip(self.segments, row["segments"], strict=True):
                out["nbest"] = _nbest_json(segment.transcript)
        return row


def _segment_json(s: Segment) -> dict[str, Any]:
    return {
        "start": round(s.start, 3),
        "end": round(s.end, 3),
        "text": s.transcript.text,
        "confidence": s.transcript.confidence,
    }


def _word_json(w: WordTiming) -> dict[str, Any]:
    return {
        "word": w.word,
        "start": round(w.start, 3),
        "end": round(w.end, 3),
        "confidence": w.confidence,
    }


def _nbest_json(t: Transcript) -> list[dict[str, Any]]:
    # A server returns no scores: null, not NaN (which is not JSON).
    return [{"text": a.text, "score": a.score if math.isfinite(a.score) else None} for a in t.nbest]


@dataclass(frozen=True)
class Failure:
    item: Item
    reason: str


Outcome = FileResult | Failure
