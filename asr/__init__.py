"""asr: a small, complete speech recognition toolkit (BiLSTM-CTC and LAS) and gRPC service.

    import asr

    recognizer = asr.load_model("exp/ctc/bundle", beam=8)
    print(recognizer.transcribe("utt.flac").text)
    for t in recognizer.transcribe(["a.flac", "b.wav"], method="greedy"):
        print(t.text, [(w.word, w.start, w.end) for w in t.words])

`Recognizer.transcribe` takes paths, file bytes or 16 kHz samples; `asr transcribe` is the CLI.
"""

__version__ = "0.1.0"

from pathlib import Path
from typing import Any

import torch

from asr.bundle import Bundle, load_bundle
from asr.decoding.options import DecodeOptions, Transcript, WordTiming
from asr.recognizer import Recognizer


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    rescorer: str | Path | None = None,
    **decode_options: Any,
) -> Recognizer:
    """A `Recognizer` for the bundle directory at `path` (written by `asr export`).

    rescorer: a LAS bundle directory a BiLSTM-CTC bundle decodes with: method "joint" (the
    LAS's attention beam search scored with the CTC posteriors; the default then) or "rescore"
    (the CTC n-best rescored by attention).
    decode_options: `DecodeOptions` fields (method="beam", beam=8, nbest=3, ...) over the
    bundle's defaults; an unknown name is a TypeError, a bad value a ValueError.
    """
    second = load_bundle(rescorer, device) if rescorer is not None else None
    recognizer = Recognizer(load_bundle(path, device), rescorer=second)
    recognizer.options = recognizer.options.override(**decode_options)
    recognizer.check(recognizer.options)
    return recognizer


__all__ = [
    "Bundle",
    "DecodeOptions",
    "Recognizer",
    "Transcript",
    "WordTiming",
    "__version__",
    "load_bundle",
    "load_model",
]
