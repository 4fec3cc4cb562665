"""asr: a small, complete speech recognition toolkit (BiLSTM-CTC and LAS) and gRPC service.

    import asr

    recognizer = asr.load_model("exp/ctc/bundle", beam=8)
    print(recognizer.transcribe("utt.flac").text)
    for t in recognizer.transcribe(["a.flac", "b.wav"], method="greedy"):
        print(t.text, [(w.word, w.start, w.end) for w in t.words])

`Recognizer.transcribe` takes paths, file bytes or 16 kHz samples; `asr transcribe` is the CLI.
"""

__version__ = "0.1.0"

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from asr.bundle import Bundle, load_bundle
from asr.decoding.options import DecodeOptions, Transcript, WordTiming
from asr.language_model import load_language_model
from asr.models.bilstm_ctc import BiLSTMCTC
from asr.quantize import check_quantization, quantize_model
from asr.recognizer import Recognizer


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    rescorer: str | Path | None = None,
    lm: str | Path | None = None,
    chunking: tuple[int, int] | None = None,
    quantize: str = "none",
    **decode_options: Any,
) -> Recognizer:
    """A `Recognizer` for the bundle directory at `path` (written by `asr export`): the one
    place the CLI, the server and the benchmarks build theirs.

    rescorer: a LAS bundle directory a BiLSTM-CTC bundle decodes with: method "joint" (the
    LAS's attention beam search scored with the CTC posteriors; the default then) or "rescore"
    (the CTC n-best rescored by attention).
    lm: a language model every beam search fuses: an LM bundle directory (`asr lm export`,
    same tokenizer as the model), a word n-gram ARPA file, or an LM mix file of several (`asr
    lm mix`); at `lm_weight` (default: the weight and bonus the bundle was exported with for
    this LM, `asr export --lm --lm-weight`, else `asr.language_model.DEFAULT_LM_WEIGHT`, 1 for
    a mix, with the length bonus that goes with the LM).
    chunking: (chunk_size, right_context) LC blocks in encoder frames for a BiLSTM-CTC model,
    in place of those it was trained with ((0, 0) runs it offline); other models have no
    blocks and ignore it, so one server setting can cover a mixed set of models.
    quantize: "int8" runs the model (and the rescorer, and an LSTM LM's steps) with int8 LSTM
    and Linear weights on CPU (`asr.quantize`); "none" (the default) keeps float weights.
    QuantizationError (a ValueError) if it cannot run here.
    decode_options: `DecodeOptions` fields (method="beam", beam=8, nbest=3, ...) over the
    bundle's defaults (an `lm_weight` without `length_bonus` brings the LM's bonus for it);
    an unknown name is a TypeError, a bad value a ValueError.
    """
    check_quantization(quantize, device)
    bundle = load_bundle(path, device)
    if chunking is not None and isinstance(bundle.model, BiLSTMCTC):
        bundle = replace(bundle, model=bundle.model.with_chunking(*chunking))
    second = load_bundle(rescorer, device) if rescorer is not None else None
    if quantize != "none":  # after the chunking, which rebuilds the float model
        bundle = replace(bundle, model=quantize_model(bundle.model, quantize, device))
        if second is not None:
            second = replace(second, model=quantize_model(second.model, quantize, device))
    fused = (
        load_language_model(lm, bundle.tokenizer, device, quantize=quantize)
        if lm is not None
        else None
    )
    recognizer = Recognizer(bundle, rescorer=second, lm=fused)
    if fused is not None and "lm_weight" in decode_options:
        # A weight without a bonus gets the bonus that goes with it.
        weight = decode_options["lm_weight"]
        decode_options.setdefault("length_bonus", fused.length_bonus(weight))
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
