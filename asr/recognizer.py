"""Recognizer: audio -> features -> model -> decoder -> Transcript. The CLI and server hold one.

A search method is a function (recognizer, features, lengths, options) -> `Search`, looked up
by model type and `DecodeOptions.method` in `METHODS`. Every search returns n-best token
sequences plus the CTC posteriors that word timings are aligned to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, overload

import torch
from torch.nn.utils.rnn import pad_sequence

from asr.audio import AudioInput, as_samples
from asr.bundle import Bundle, BundleError
from asr.data.sampler import BucketingBatchSampler
from asr.decoding.alignment import word_timings
from asr.decoding.attention import attention_beam_search, rescore
from asr.decoding.ctc import CTCPrefixBeamSearch, ctc_greedy
from asr.decoding.options import (
    Alternative,
    DecodeOptions,
    Hypothesis,
    Transcript,
    WordTiming,
    mean_confidence,
)
from asr.features import log_mel
from asr.models.bilstm_ctc import BiLSTMCTC
from asr.models.las import LAS
from asr.tokenizer import Tokenizer


@dataclass
class Search:
    """What a search method found for a batch of B utterances."""

    hyps: list[list[Hypothesis]]  # n-best per utterance, best first
    ctc_log_probs: torch.Tensor | None  # (B, T', V) posteriors to align words to, if any
    ctc_lengths: torch.Tensor | None  # (B,)
    time_reduction: int  # feature frames per frame of ctc_log_probs


SearchFn = Callable[["Recognizer", torch.Tensor, torch.Tensor, DecodeOptions], Search]


def _ctc(bundle: Bundle) -> BiLSTMCTC:
    assert isinstance(bundle.model, BiLSTMCTC)
    return bundle.model


def _las(bundle: Bundle) -> LAS:
    assert isinstance(bundle.model, LAS)
    return bundle.model


def _ctc_greedy(rec: Recognizer, raw: torch.Tensor, lens: torch.Tensor, _: DecodeOptions) -> Search:
    model = _ctc(rec.bundle)
    log_probs, out_lens = model.log_probs(raw, lens)
    # Scored by the best path's log-probability.
    best = log_probs.max(dim=-1).values  # (B, T')
    valid = torch.arange(best.shape[1], device=best.device)[None, :] < out_lens[:, None]
    scores = (best * valid).sum(dim=1).tolist()
    hyps = [
        [Hypothesis(tuple(tokens), score)]
        for tokens, score in zip(ctc_greedy(log_probs, out_lens), scores, strict=True)
    ]
    return Search(hyps, log_probs, out_lens, model.time_reduction)


def _ctc_beam(
    rec: Recognizer, raw: torch.Tensor, lens: torch.Tensor, opts: DecodeOptions
) -> Search:
    model = _ctc(rec.bundle)
    log_probs, out_lens = model.log_probs(raw, lens)
    hyps = CTCPrefixBeamSearch(opts)(log_probs, out_lens)
    return Search(hyps, log_probs, out_lens, model.time_reduction)


def _ctc_rescore(
    rec: Recognizer, raw: torch.Tensor, lens: torch.Tensor, opts: DecodeOptions
) -> Search:
    """First pass: CTC prefix beam search n-best; second pass: the LAS rescorer's attention."""
    assert rec.rescorer is not None  # Recognizer.check
    first = _ctc_beam(rec, raw, lens, replace(opts, nbest=opts.beam))
    las = _las(rec.rescorer)
    enc = las.encode(raw, lens)
    return replace(first, hyps=rescore(las, enc, first.hyps, opts))


def attention_with_ctc(
    las_bundle: Bundle,
    raw: torch.Tensor,
    lens: torch.Tensor,
    log_probs: torch.Tensor,
    out_lens: torch.Tensor,
    opts: DecodeOptions,
) -> list[list[Hypothesis]]:
    """One-pass joint decoding of two models: `las_bundle`'s attention decoder with another
    model's CTC posteriors as the prefix scorer (in place of the LAS's own CTC head).

    raw: (B, T, F) log-mel features, lens (B,); log_probs: (B, T_ctc, V) the CTC model's
    posteriors of the same audio (any frame rate: prefix scores only need its own frames).
    """
    las = _las(las_bundle)
    enc = las.encode(raw, lens)
    enc = replace(enc, ctc_log_probs=log_probs.float(), ctc_lengths=out_lens.to(enc.lengths))
    return attention_beam_search(las, enc, opts, joint=True)


def _ctc_joint(
    rec: Recognizer, raw: torch.Tensor, lens: torch.Tensor, opts: DecodeOptions
) -> Search:
    """The LAS rescorer's attention beam search scored jointly with this CTC model: the two
    models' errors differ, so together they beat either (recipes/synthetic/README.md)."""
    assert rec.rescorer is not None  # Recognizer.check
    model = _ctc(rec.bundle)
    log_probs, out_lens = model.log_probs(raw, lens)
    hyps = attention_with_ctc(rec.rescorer, raw, lens, log_probs, out_lens, opts)
    return Search(hyps, log_probs, out_lens, model.time_reduction)


def _las_search(joint: bool) -> SearchFn:
    def search(
        rec: Recognizer, raw: torch.Tensor, lens: torch.Tensor, opts: DecodeOptions
    ) -> Search:
        model = _las(rec.bundle)
        enc = model.encode(raw, lens)
        hyps = attention_beam_search(model, enc, opts, joint=joint)
        return Search(hyps, enc.ctc_log_probs, enc.ctc_lengths, model.ctc_time_reduction)

    return search


def _las_greedy(
    rec: Recognizer, raw: torch.Tensor, lens: torch.Tensor, opts: DecodeOptions
) -> Search:
    # Beam search with one beam is greedy decoding (tested), and it reports scores.
    return _las_search(joint=False)(rec, raw, lens, replace(opts, beam=1, nbest=1))


def _las_rescore(
    rec: Recognizer, raw: torch.Tensor, lens: torch.Tensor, opts: DecodeOptions
) -> Search:
    """CTC-head prefix beam search n-best, rescored by the same model's attention decoder."""
    model = _las(rec.bundle)
    enc = model.encode(raw, lens)
    if enc.ctc_log_probs is None:
        raise ValueError("method 'rescore' needs a LAS model with a CTC head (ctc_weight > 0)")
    first = CTCPrefixBeamSearch(replace(opts, nbest=opts.beam))(enc.ctc_log_probs, enc.ctc_lengths)
    hyps = rescore(model, enc, first, opts)
    return Search(hyps, enc.ctc_log_probs, enc.ctc_lengths, model.ctc_time_reduction)


METHODS: dict[str, dict[str, SearchFn]] = {
    "ctc": {"greedy": _ctc_greedy, "beam": _ctc_beam, "rescore": _ctc_rescore, "joint": _ctc_joint},
    "las": {
        "greedy": _las_greedy,
        "beam": _las_search(joint=False),
        "joint": _las_search(joint=True),
        "rescore": _las_rescore,
    },
}


# Methods of a CTC bundle that need a LAS bundle beside it (`Recognizer.rescorer`).
TWO_MODEL_METHODS = frozenset({"rescore", "joint"})

# Padded feature frames per decoded batch: 200 s of audio at a 10 ms hop (as `asr decode`).
BATCH_FRAMES = 20_000


def default_options(model_type: str, model_config: dict[str, Any]) -> DecodeOptions:
    """What a bundle decodes with unless told otherwise: the most accurate method it has."""
    if model_type == "las" and model_config.get("ctc_weight", 0) > 0:
        return DecodeOptions(method="joint")
    return DecodeOptions(method="beam")


class Recognizer:
    """A loaded bundle (plus, for two-pass CTC decoding, a LAS bundle) and decoding options."""

    def __init__(
        self, bundle: Bundle, options: DecodeOptions | None = None, rescorer: Bundle | None = None
    ) -> None:
        self.bundle = bundle
        self.rescorer = rescorer
        stored = bundle.config.get("decoding") or {}
        model_config = bundle.config.get("model", {}).get("config", {})
        self.options = options or (
            DecodeOptions(**stored) if stored else default_options(bundle.model_type, model_config)
        )
        if options is None and rescorer is not None:  # given the LAS, decode with both
            self.options = replace(self.options, method="joint")
        self.check(self.options)
        if rescorer is not None:
            if rescorer.model_type != "las":
                raise BundleError(f"{rescorer.path}: a rescoring bundle must be LAS")
            if rescorer.tokenizer.pieces() != bundle.tokenizer.pieces():
                raise BundleError(
                    f"{rescorer.path}: its tokenizer differs from {bundle.path}'s; "
                    "rescoring needs the same token inventory"
                )
            if rescorer.feature_config != bundle.feature_config:
                raise BundleError(f"{rescorer.path}: its features differ from {bundle.path}'s")

    @property
    def can_stream(self) -> bool:
        """Whether `StreamingSession` can run this model: a latency-controlled BiLSTM-CTC, whose
        cost per stream is linear in its length (an offline BiLSTM would re-read the whole
        stream at every chunk)."""
        model = self.bundle.model
        return isinstance(model, BiLSTMCTC) and model.config.chunk_size > 0

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(METHODS[self.bundle.model_type])

    def check(self, options: DecodeOptions) -> None:
        """Raise ValueError if `options` cannot be used with this model."""
        if options.method not in METHODS[self.bundle.model_type]:
            raise ValueError(
                f"unknown decoding method {options.method!r} for a {self.bundle.model_type} "
                f"model; choose one of {', '.join(self.methods)}"
            )
        two_model = options.method in TWO_MODEL_METHODS
        if two_model and self.bundle.model_type == "ctc" and not self.rescorer:
            raise ValueError(
                f"method {options.method!r} with a CTC model needs a LAS bundle for its "
                "attention decoder (--rescore-model)"
            )

    @property
    def frame_seconds(self) -> float:
        """Seconds per feature frame."""
        return self.bundle.feature_config.hop_ms / 1000.0

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """16 kHz mono float samples (S,) -> log-mel features (T, F) (models normalise them)."""
        return log_mel(audio, self.bundle.feature_config)

    @torch.no_grad()
    def decode(
        self, feats: torch.Tensor, lengths: torch.Tensor, options: DecodeOptions | None = None
    ) -> list[Transcript]:
        """A batch of log-mel features (B, T, F), lengths (B,) -> transcripts."""
        opts = options or self.options
        self.check(opts)
        device = next(self.bundle.model.parameters()).device
        search = METHODS[self.bundle.model_type][opts.method](
            self, feats.to(device), lengths.to(device), opts
        )
        # Word boundaries are refined with the loudness of each 10 ms frame.
        energy = feats.mean(dim=-1)  # (B, T)
        return [
            self._transcript(search, b, opts, energy[b, : int(lengths[b])])
            for b in range(len(search.hyps))
        ]

    @overload
    def transcribe(self, audio: AudioInput, **decode_options: Any) -> Transcript: ...

    @overload
    def transcribe(
        self, audio: list[AudioInput] | tuple[AudioInput, ...], **decode_options: Any
    ) -> list[Transcript]: ...

    def transcribe(
        self,
        audio: AudioInput | list[AudioInput] | tuple[AudioInput, ...],
        **decode_options: Any,
    ) -> Transcript | list[Transcript]:
        """Transcribe one input, or a list of them (decoded in length-sorted batches).

        An input is a file path (str or Path), a file's bytes (WAV/FLAC/OGG/...), or mono
        float samples at 16 kHz (numpy array or tensor, shape (N,)). decode_options are
        `DecodeOptions` fields over this recognizer's options (method="greedy", beam=8,
        nbest=3, ...). Raises `AudioError` for unusable audio, TypeError for an unknown option.

            recognizer.transcribe("utt.flac").text  # "HELLO WORLD"
            [t.nbest for t in recognizer.transcribe([samples, Path("b.wav")], nbest=2)]
        """
        options = self.options.override(**decode_options)
        self.check(options)
        batch = isinstance(audio, list | tuple)
        inputs = list(audio) if isinstance(audio, list | tuple) else [audio]
        feats = [self.features(as_samples(a)) for a in inputs]
        transcripts = self.transcribe_features(feats, options)
        return transcripts if batch else transcripts[0]

    def transcribe_features(
        self,
        feats: Sequence[torch.Tensor],
        options: DecodeOptions | None = None,
        *,
        max_frames: int = BATCH_FRAMES,
    ) -> list[Transcript]:
        """Log-mel features [(T_i, F)] of any number of utterances -> transcripts in
        the same order, decoded in batches of similar length under a padded-frame budget."""
        if not feats:
            return []
        lengths = [f.shape[0] for f in feats]
        # An utterance over the budget still gets a batch of its own.
        sampler = BucketingBatchSampler(
            [max(1, min(n, max_frames)) for n in lengths], max_frames=max_frames, shuffle=False
        )
        out: dict[int, Transcript] = {}
        for batch in sampler:
            padded = pad_sequence([feats[i] for i in batch], batch_first=True)  # (B, T, F)
            lens = torch.tensor([lengths[i] for i in batch])  # (B,)
            for i, transcript in zip(batch, self.decode(padded, lens, options), strict=True):
                out[i] = transcript
        return [out[i] for i in range(len(feats))]

    def _transcript(
        self, search: Search, b: int, opts: DecodeOptions, energy: torch.Tensor
    ) -> Transcript:
        tokenizer = self.bundle.tokenizer
        hyps = search.hyps[b] or [Hypothesis((), float("-inf"))]
        best = hyps[0]
        words: tuple[WordTiming, ...] = ()
        log_probs, lengths = search.ctc_log_probs, search.ctc_lengths
        if opts.word_timings and log_probs is not None and lengths is not None:
            words = word_timings(
                log_probs[b, : int(lengths[b])],
                best.tokens,
                tokenizer,
                self.frame_seconds,
                search.time_reduction,
                energy,
            )
        return build_transcript(tokenizer, hyps, words)


def build_transcript(
    tokenizer: Tokenizer, hyps: Sequence[Hypothesis], words: tuple[WordTiming, ...]
) -> Transcript:
    """The typed result of n-best `hyps` (best first, at least one) and the best's words."""
    best = hyps[0]
    return Transcript(
        text=tokenizer.decode(best.tokens),
        tokens=best.tokens,
        score=best.score,
        words=words,
        nbest=tuple(Alternative(tokenizer.decode(h.tokens), h.tokens, h.score) for h in hyps),
        confidence=mean_confidence(words),
    )
