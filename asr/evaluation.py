"""Scoring on a manifest: a model during training (greedy, loss, WER/CER), and a recognizer
(any decoding method, whole utterances or streamed) for `asr decode`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from asr.audio import SAMPLE_RATE, load_audio
from asr.data.dataset import Batch, SpeechDataset, collate
from asr.data.manifest import Utterance
from asr.data.sampler import BucketingBatchSampler
from asr.decoding.options import DecodeOptions, Transcript
from asr.features import FeatureConfig
from asr.metrics import ErrorRates, error_rates
from asr.models import greedy_decode
from asr.recognizer import Recognizer
from asr.streaming import EndpointConfig, StreamingSession, join_finals
from asr.tokenizer import Tokenizer


@dataclass(frozen=True)
class Evaluation:
    hypotheses: dict[str, str]  # utterance id -> transcript
    loss: float  # mean per batch (the training objective)
    rates: ErrorRates

    def summary(self) -> dict[str, float]:
        return {"valid_loss": self.loss} | self.rates.to_dict()


def _in_order(data: SpeechDataset, max_frames: int) -> Iterable[Batch]:
    """Length-bucketed batches of every utterance, without shuffling or augmentation.

    An utterance longer than the budget simply forms a batch of its own.
    """
    sampler = BucketingBatchSampler(
        [min(n, max_frames) for n in data.num_frames], max_frames=max_frames, shuffle=False
    )
    return DataLoader(data, batch_sampler=sampler, collate_fn=collate)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    model_type: str,
    utterances: list[Utterance],
    tokenizer: Tokenizer,
    feature_config: FeatureConfig,
    device: torch.device,
    *,
    max_frames: int = 20_000,
) -> Evaluation:
    """Greedy-decode every utterance (no augmentation), with loss and corpus WER/CER."""
    model.eval()
    data = SpeechDataset(utterances, tokenizer, feature_config)
    loss, batches = 0.0, 0
    hyps: dict[str, str] = {}
    for batch in _in_order(data, max_frames):
        b = batch.to(device)
        out = model(b.feats, b.feat_lens, b.targets, b.target_lens)
        if out.loss is not None and torch.isfinite(out.loss):
            loss += float(out.loss)
            batches += 1
        decoded = greedy_decode(model_type, model, b.feats, b.feat_lens)
        for utt_id, ids in zip(batch.ids, decoded, strict=True):
            hyps[utt_id] = tokenizer.decode(ids)
    refs = [u.text for u in utterances]
    rates = error_rates(refs, [hyps[u.id] for u in utterances])
    return Evaluation(hyps, loss / max(batches, 1), rates)


@torch.no_grad()
def transcribe_manifest(
    recognizer: Recognizer,
    utterances: list[Utterance],
    options: DecodeOptions | None = None,
    *,
    max_frames: int = 20_000,
) -> dict[str, Transcript]:
    """Decode every utterance of a manifest in length-sorted batches: id -> Transcript."""
    data = SpeechDataset(utterances, recognizer.bundle.tokenizer, recognizer.bundle.feature_config)
    out: dict[str, Transcript] = {}
    for batch in _in_order(data, max_frames):
        for utt_id, transcript in zip(
            batch.ids, recognizer.decode(batch.feats, batch.feat_lens, options), strict=True
        ):
            out[utt_id] = transcript
    return out


@torch.no_grad()
def stream_manifest(
    recognizer: Recognizer,
    utterances: list[Utterance],
    options: DecodeOptions | None = None,
    endpoint: EndpointConfig | None = None,
    *,
    chunk_seconds: float = 0.1,
) -> dict[str, Transcript]:
    """Each utterance through a `StreamingSession` in `chunk_seconds` pieces, as a live client
    sends it (endpointing included): id -> the segments' finals joined. Comparing this with
    `transcribe_manifest` measures what streaming costs in accuracy."""
    chunk = max(1, round(chunk_seconds * SAMPLE_RATE))
    out: dict[str, Transcript] = {}
    for utt in utterances:
        audio = load_audio(utt.path)
        session = StreamingSession(recognizer, options, endpoint, interim_results=False)
        finals = [
            r
            for at in range(0, audio.numel(), chunk)
            for r in session.accept(audio[at : at + chunk])
        ]
        finals += session.finish()
        out[utt.id] = join_finals([r for r in finals if r.is_final])
    return out
