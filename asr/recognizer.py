"""Recognizer: audio -> features -> model -> decoder -> Transcript. The CLI and server hold one.

A decoding method (`METHODS`, by `DecodeOptions.method`) is a search over what the models
offer, not over model types: CTC posteriors and an attention decoder (`asr.models.base`), read
from a batch's `Evidence`. Greedy and beam search use the model's own decoder; joint and
rescore need both, a CTC model getting its attention decoder from a LAS bundle beside it.
Streaming runs its second pass through the same methods.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from typing import Any, Protocol, cast, overload

import torch
from torch.nn.utils.rnn import pad_sequence

from asr.audio import AudioInput, as_samples
from asr.bundle import Bundle, BundleError
from asr.calibration import Calibration
from asr.cancel import CancelToken
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
from asr.decoding.scorers import (
    Fusion,
    HotwordGraph,
    HotwordScorer,
    LengthBonus,
    LSTMLMScorer,
    Scorer,
    compile_hotwords,
)
from asr.features import log_mel
from asr.language_model import LanguageModel
from asr.masks import lengths_to_mask
from asr.models.base import ATTENTION, CTC, model_device, offers
from asr.models.bilstm_ctc import BiLSTMCTC
from asr.models.las import LAS, EncoderOutput
from asr.text import normalize_text
from asr.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class CTCModel(Protocol):
    """What decoding needs from a model whose own decoder is CTC (BiLSTM-CTC)."""

    @property
    def time_reduction(self) -> int: ...  # feature frames per output frame

    def log_probs(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, cancel: CancelToken | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Posteriors:
    """CTC posteriors of a batch, the frames word timings are aligned to."""

    log_probs: torch.Tensor  # (B, T', V) float32
    lengths: torch.Tensor  # (B,) valid frames
    time_reduction: int  # feature frames per frame


class Evidence:
    """What a recognizer's models say about one batch, each part computed on first use so a
    method pays only for what it reads.

    The CTC posteriors always come from the recognizer's own model (a BiLSTM-CTC's output or a
    LAS's CTC head); the attention decoder is the model's own, or else the LAS bundle beside
    it (`Recognizer.rescorer`). A stream hands in the posteriors it computed chunk by chunk and
    its first-pass n-best, so its second pass is this same code. The searches check `cancel`
    (when given) between blocks of their work.

    raw: (B, T, F) log-mel features, lengths (B,).
    """

    def __init__(
        self,
        recognizer: Recognizer,
        raw: torch.Tensor,
        lengths: torch.Tensor,
        *,
        ctc: Posteriors | None = None,
        ctc_nbest: list[list[Hypothesis]] | None = None,
        cancel: CancelToken | None = None,
    ) -> None:
        model = recognizer.bundle.model
        self.own = recognizer.own_decoder  # greedy/beam's decoder
        self.attention = recognizer.attention_decoder
        self.ctc_model = cast(CTCModel, model) if self.own == CTC else None
        self.raw, self.lengths = raw, lengths
        self.fusion = recognizer.fusion
        self._ctc = ctc
        self._ctc_nbest = ctc_nbest
        self.cancel = cancel

    @cached_property
    def encoded(self) -> EncoderOutput:
        """The attention decoder's encoder output of the batch."""
        if self.attention is None:
            raise ValueError("this recognizer has no attention decoder")  # Recognizer.check
        return self.attention.encode(self.raw, self.lengths)

    @property
    def ctc(self) -> Posteriors | None:
        """The model's CTC posteriors; None for a LAS without a CTC head."""
        if self._ctc is None and self.ctc_model is not None:
            log_probs, lengths = self.ctc_model.log_probs(self.raw, self.lengths, self.cancel)
            self._ctc = Posteriors(log_probs, lengths, self.ctc_model.time_reduction)
        elif self._ctc is None and self.attention is not None:
            enc = self.encoded  # a CTC head runs inside the attention model's encoder
            if enc.ctc_log_probs is not None:
                reduction = self.attention.ctc_time_reduction
                self._ctc = Posteriors(enc.ctc_log_probs, enc.ctc_lengths, reduction)
        return self._ctc

    def needed_ctc(self) -> Posteriors:
        if (ctc := self.ctc) is None:
            raise ValueError("this model has no CTC posteriors")  # Recognizer.check
        return ctc

    def ctc_nbest(self, opts: DecodeOptions) -> list[list[Hypothesis]]:
        """First pass: CTC prefix beam search, `opts.beam` alternatives per utterance."""
        if self._ctc_nbest is None:
            ctc = self.needed_ctc()
            wide = replace(opts, nbest=opts.beam)
            search = CTCPrefixBeamSearch(wide, self.fusion(opts, CTC))
            self._ctc_nbest = search(ctc.log_probs, ctc.lengths, cancel=self.cancel)
        return self._ctc_nbest


def _greedy(ev: Evidence, opts: DecodeOptions) -> list[list[Hypothesis]]:
    if ev.own == ATTENTION:  # beam search with one beam is greedy decoding (tested)
        return _beam(ev, replace(opts, beam=1, nbest=1))
    ctc = ev.needed_ctc()
    # Scored by the best path's log-probability.
    best = ctc.log_probs.max(dim=-1).values  # (B, T')
    scores = (best * lengths_to_mask(ctc.lengths, best.shape[1])).sum(dim=1).tolist()
    paths = ctc_greedy(ctc.log_probs, ctc.lengths)
    return [[Hypothesis(tuple(p), score)] for p, score in zip(paths, scores, strict=True)]


def _beam(ev: Evidence, opts: DecodeOptions) -> list[list[Hypothesis]]:
    if ev.own == ATTENTION:
        assert ev.attention is not None
        return attention_beam_search(
            ev.attention, ev.encoded, opts, fusion=ev.fusion(opts), cancel=ev.cancel
        )
    ctc = ev.needed_ctc()
    search = CTCPrefixBeamSearch(opts, ev.fusion(opts))
    return search(ctc.log_probs, ctc.lengths, cancel=ev.cancel)


def _joint(ev: Evidence, opts: DecodeOptions) -> list[list[Hypothesis]]:
    """Attention beam search scored jointly with the model's CTC posteriors (prefix scores need
    only the posteriors' own frames, so another model's at another frame rate serve): the two
    decoders' errors differ, so together they beat either (recipes/synthetic/README.md)."""
    assert ev.attention is not None
    ctc = ev.needed_ctc()
    enc = replace(
        ev.encoded,
        ctc_log_probs=ctc.log_probs.float(),
        ctc_lengths=ctc.lengths.to(ev.encoded.lengths),
    )
    return attention_beam_search(
        ev.attention, enc, opts, joint=True, fusion=ev.fusion(opts, ATTENTION), cancel=ev.cancel
    )


def _rescore(ev: Evidence, opts: DecodeOptions) -> list[list[Hypothesis]]:
    """The CTC n-best re-ranked by the attention decoder."""
    assert ev.attention is not None
    nbest = ev.ctc_nbest(opts)
    fusion = ev.fusion(opts, ATTENTION)  # the first pass's scorers, and the attention ILM
    return rescore(ev.attention, ev.encoded, nbest, opts, ev.cancel, fusion)


@dataclass(frozen=True)
class Method:
    """A search, and what it needs beyond the model's own decoder."""

    search: Callable[[Evidence, DecodeOptions], list[list[Hypothesis]]]
    needs: frozenset[str] = frozenset()


# Greedy and beam search use the model's own decoder (attention if it has one, else CTC);
# joint and rescore need both CTC posteriors and an attention decoder.
METHODS: dict[str, Method] = {
    "greedy": Method(_greedy),
    "beam": Method(_beam),
    "rescore": Method(_rescore, frozenset({CTC, ATTENTION})),
    "joint": Method(_joint, frozenset({CTC, ATTENTION})),
}

# How a recognizer comes to offer what a method needs, for the error when it does not.
_HOW_TO_OFFER = {
    ATTENTION: "an attention decoder (a CTC model needs a LAS bundle for it: --rescore-model)",
    CTC: "CTC posteriors (a LAS model has them when trained with ctc_weight > 0)",
}

# Padded feature frames per decoded batch: 200 s of audio at a 10 ms hop (as `asr decode`).
BATCH_FRAMES = 20_000


def default_options(offers: frozenset[str]) -> DecodeOptions:
    """What a model decodes with unless told otherwise: the most accurate method it can run."""
    return DecodeOptions(method="joint" if METHODS["joint"].needs <= offers else "beam")


class Recognizer:
    """A loaded bundle (plus, for two-pass CTC decoding, a LAS bundle) and decoding options.

    `calibration` (the bundle's; None reports raw confidences) maps the raw word confidences
    of every transcript it makes, whole-utterance or a stream's final, to calibrated ones;
    `lm_calibration` those of transcripts decoded with the LM fused (`calibration_for`).
    `lm`: a language model every search fuses at `options.lm_weight` (without options, at
    the weight and bonus the bundle's LM calibration was fitted with when it is this LM,
    `Bundle.lm_fusion`; else the LM's `default_weight` with the length bonus that goes with it).
    """

    def __init__(
        self,
        bundle: Bundle,
        options: DecodeOptions | None = None,
        rescorer: Bundle | None = None,
        *,
        lm: LanguageModel | None = None,
    ) -> None:
        self.bundle = bundle
        self.rescorer = rescorer
        self.lm = lm
        # Hotword graphs of recent requests (a server sees the same phrase lists again).
        self._hotwords = lru_cache(maxsize=64)(self._compile_hotwords)
        self.calibration: Calibration | None = bundle.calibration
        # Fitted with this very LM (its fingerprint), or none: another LM's does not carry over.
        self.lm_calibration: Calibration | None = None
        fitted_with = bundle.lm_fingerprint  # hash the LM only if there is one to compare
        if lm is not None and fitted_with is not None and fitted_with == lm.fingerprint:
            self.lm_calibration = bundle.lm_calibration
        if lm is not None and self.calibration is not None and self.lm_calibration is None:
            log.warning(
                "%s has no word confidence calibration for decoding with %s (asr export --lm "
                "with it fits one): LM-fused words keep their raw confidences",
                bundle.path,
                lm.path,
            )
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
        stored = bundle.config.get("decoding") or {}
        best = default_options(self.offers)
        self.options = options or (DecodeOptions.from_dict(stored) if stored else best)
        if options is None and rescorer is not None:  # given the LAS, decode with both
            self.options = replace(self.options, method=best.method)
        if options is None and lm is not None and self.options.lm_weight == 0:
            # The weight and bonus this very LM was calibrated at (chosen on dev at export),
            # else the default weight with the LM's bonus for it.
            fused_at = bundle.lm_fusion if self.lm_calibration is not None else {}
            weight = fused_at.get("lm_weight", lm.default_weight)
            bonus = fused_at.get("length_bonus", lm.length_bonus(weight))
            self.options = replace(self.options, lm_weight=weight, length_bonus=bonus)
        self.check(self.options)

    def calibration_for(self, options: DecodeOptions) -> Calibration | None:
        """The calibration of transcripts decoded with `options`: the one fitted with a
        language model when the LM is fused (the other does not carry over, `asr.calibration`)."""
        if self.lm is not None and options.lm_weight != 0:
            return self.lm_calibration
        return self.calibration

    def fusion(self, options: DecodeOptions, decoder: str | None = None) -> Fusion | None:
        """The scorers `options` asks a search over `decoder` (CTC or ATTENTION; default the
        model's own) to add (None: none). Only an attention decoder's search subtracts the
        internal LM, which is that decoder's."""
        vocab = self.bundle.tokenizer.vocab_size
        weighted: list[tuple[float, Scorer]] = []
        if self.lm is not None:
            weighted.append((options.lm_weight, self.lm.scorer))
        if (decoder or self.own_decoder) == ATTENTION and options.ilm_weight:
            weighted.append((-options.ilm_weight, self.internal_lm))
        if options.length_bonus:
            weighted.append((options.length_bonus, LengthBonus(vocab)))
        if options.hotwords:
            weighted.append((1.0, HotwordScorer(self._hotwords(options.hotwords), vocab)))
        fusion = Fusion(weighted)
        return fusion if fusion else None

    def _compile_hotwords(self, hotwords: tuple[tuple[str, float], ...]) -> HotwordGraph:
        tokenizer = self.bundle.tokenizer
        units = [(tokenizer.encode(normalize_text(p)), boost) for p, boost in hotwords]
        return compile_hotwords([(u, b) for u, b in units if u], tokenizer.vocab_size)

    @property
    def own_decoder(self) -> str:
        """The decoder greedy and beam search use: ATTENTION if the model has one, else CTC."""
        return ATTENTION if ATTENTION in offers(self.bundle.model) else CTC

    @property
    def attention_decoder(self) -> LAS | None:
        """The model whose attention decoder the searches use: the model's own, else the LAS
        bundle beside it (None: neither)."""
        if self.own_decoder == ATTENTION:
            return cast(LAS, self.bundle.model)
        return None if self.rescorer is None else cast(LAS, self.rescorer.model)  # checked

    @cached_property
    def internal_lm(self) -> LSTMLMScorer:
        """The attention decoder's internal LM estimate as a scorer (`InternalLM`)."""
        if (attention := self.attention_decoder) is None:
            raise ValueError("this recognizer has no attention decoder")  # check() says so
        return LSTMLMScorer(attention.internal_lm())

    @property
    def offers(self) -> frozenset[str]:
        """What this recognizer's searches can use: its model's CTC posteriors and/or attention
        decoder, plus the attention decoder of the LAS bundle beside it."""
        extra = frozenset({ATTENTION}) if self.rescorer is not None else frozenset()
        return offers(self.bundle.model) | extra

    @property
    def can_stream(self) -> bool:
        """Whether `StreamingSession` can run this model: a latency-controlled BiLSTM-CTC, whose
        cost per stream is linear in its length (an offline BiLSTM would re-read the whole
        stream at every chunk)."""
        model = self.bundle.model
        return isinstance(model, BiLSTMCTC) and model.config.chunk_size > 0

    @property
    def methods(self) -> tuple[str, ...]:
        """The decoding methods this recognizer can run (ListModels reports them)."""
        return tuple(name for name, m in METHODS.items() if m.needs <= self.offers)

    def check(self, options: DecodeOptions) -> None:
        """Raise ValueError if `options` cannot be used with this recognizer."""
        method = METHODS.get(options.method)
        if method is None:
            raise ValueError(
                f"unknown decoding method {options.method!r}; choose one of {', '.join(METHODS)}"
            )
        missing = sorted(method.needs - self.offers)
        if missing:
            raise ValueError(
                f"method {options.method!r} needs "
                + " and ".join(_HOW_TO_OFFER[m] for m in missing)
            )
        if options.ilm_weight and ATTENTION not in method.needs | {self.own_decoder}:
            raise ValueError(
                f"ilm_weight subtracts an attention decoder's internal LM, and method "
                f"{options.method!r} of this CTC model searches without one: use joint or "
                "rescore (with a LAS bundle beside it, --rescore-model), or ilm_weight 0"
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
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        options: DecodeOptions | None = None,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Transcript]:
        """A batch of log-mel features (B, T, F), lengths (B,) -> transcripts.

        With `cancel`, the searches and word alignment check it between blocks of frames,
        steps and utterances (and a latency-controlled BiLSTM-CTC between its blocks), and
        raise `asr.cancel.Cancelled` once it says stop. Other forward passes run whole."""
        opts = options or self.options
        self.check(opts)
        if cancel is not None:
            cancel.check()
        device = model_device(self.bundle.model)
        evidence = Evidence(self, feats.to(device), lengths.to(device), cancel=cancel)
        hyps = METHODS[opts.method].search(evidence, opts)
        # Word boundaries are refined with the loudness of each 10 ms frame.
        energy = feats.mean(dim=-1)  # (B, T)
        ctc = evidence.ctc if opts.word_timings else None
        transcripts = []
        for b in range(len(hyps)):
            if cancel is not None and ctc is not None:  # a forced alignment per utterance
                cancel.check()
            transcripts.append(self.transcript(hyps[b], opts, ctc, b, energy[b, : int(lengths[b])]))
        return transcripts

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

    def transcript(
        self,
        hyps: Sequence[Hypothesis],
        opts: DecodeOptions,
        ctc: Posteriors | None,
        b: int,
        energy: torch.Tensor | None,
        *,
        offset: float = 0.0,
    ) -> Transcript:
        """Utterance `b`'s n-best (best first) as a Transcript, with the best's words aligned
        to row b of the CTC posteriors (when given) and refined with energy (T,); word times
        count from `offset` seconds. The one place word confidences are made: calibrated here,
        the utterance's confidence the mean of its calibrated words."""
        hyps = list(hyps) or [Hypothesis((), float("-inf"))]
        words: tuple[WordTiming, ...] = ()
        if opts.word_timings and ctc is not None:
            words = word_timings(
                ctc.log_probs[b, : int(ctc.lengths[b])],
                hyps[0].tokens,
                self.bundle.tokenizer,
                self.frame_seconds,
                ctc.time_reduction,
                energy,
                offset=offset,
            )
            if (calibration := self.calibration_for(opts)) is not None:
                words = calibration.apply(words)
        return build_transcript(self.bundle.tokenizer, hyps[: opts.nbest], words)


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
