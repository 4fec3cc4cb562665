"""Scoring on a manifest: a model during training (greedy, loss, WER/CER), and a recognizer
(any decoding method, whole utterances or streamed) for `asr decode`, with the report that
command writes (hypotheses, worst utterances, wer.json, a recipe's results.json), and the
calibration of word confidences export fits on dev."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from asr.audio import SAMPLE_RATE, load_audio
from asr.calibration import Calibration, expected_calibration_error, fit, word_labels
from asr.data.dataset import Batch, SpeechDataset, collate
from asr.data.manifest import Utterance
from asr.data.sampler import BucketingBatchSampler
from asr.decoding.options import DecodeOptions, Transcript
from asr.features import FeatureConfig
from asr.language_model import LanguageModel
from asr.metrics import ErrorRates, error_rates, utterance_errors
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
        decoded = greedy_decode(model, b.feats, b.feat_lens)
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


# ---------------------------------------------------------------------------------------------
# Word confidence: how well it is calibrated, and fitting its calibration


@dataclass(frozen=True)
class ConfidenceScores:
    """Per utterance (with words), the confidences a recognizer reported for its words, their
    raw confidences (before calibration; the same without one) and whether each is right."""

    reported: list[list[float]]
    raw: list[list[float]]
    right: list[list[bool]]

    @property
    def words(self) -> int:
        return sum(map(len, self.right))

    def ece(self, confidences: list[list[float]] | None = None) -> float | None:
        """Word-confidence ECE of `confidences` (default: the reported ones); None without
        words."""
        chosen = self.reported if confidences is None else confidences
        if not self.words:
            return None
        flat = [c for cs in chosen for c in cs]
        return round(expected_calibration_error(flat, [y for ys in self.right for y in ys]), 4)


def confidence_scores(
    utterances: list[Utterance], transcripts: dict[str, Transcript]
) -> ConfidenceScores:
    """The word confidences of `transcripts` against the utterances' references."""
    reported, raw, right = [], [], []
    for utt in utterances:
        words = transcripts[utt.id].words
        if words:
            reported.append([w.confidence for w in words])
            raw.append(
                [w.confidence if w.raw_confidence is None else w.raw_confidence for w in words]
            )
            right.append(word_labels(utt.text, [w.word for w in words]))
    return ConfidenceScores(reported, raw, right)


def spread(utterances: list[Utterance], limit: int) -> list[Utterance]:
    """At most `limit` utterances evenly spaced through the list (manifests are often in
    speaker order, so the first `limit` would miss voices)."""
    if len(utterances) <= limit:
        return list(utterances)
    return [utterances[i * len(utterances) // limit] for i in range(limit)]


def fit_calibration(
    recognizer: Recognizer,
    utterances: list[Utterance],
    options: DecodeOptions | None = None,
    *,
    max_utterances: int = 300,
    max_frames: int = 20_000,
) -> tuple[Calibration | None, dict[str, Any]]:
    """Fit word confidence calibration on (at most `max_utterances`, evenly spaced)
    `utterances` decoded by `recognizer` with `options` (default: its own), and report it:
    utterances and words used, the words' accuracy, and their ECE before and after. No
    calibration (None, with the reason as "skipped") when the decode gives no words or
    confidences that do not rank right words higher."""
    chosen = spread(utterances, max_utterances)
    transcripts = transcribe_manifest(recognizer, chosen, options, max_frames=max_frames)
    scores = confidence_scores(chosen, transcripts)
    report: dict[str, Any] = {"utterances": len(chosen), "words": scores.words}
    try:
        calibration = fit(scores.raw, scores.right)
    except ValueError as err:
        return None, report | {"skipped": str(err)}
    calibrated = [calibration.confidences(c) for c in scores.raw]
    report |= {
        "word_accuracy": round(sum(map(sum, scores.right)) / scores.words, 4),
        "ece_before": scores.ece(scores.raw),
        "ece_after": scores.ece(calibrated),
    }
    return calibration, report


# ---------------------------------------------------------------------------------------------
# The `asr decode` report


def score_decode(
    utterances: list[Utterance],
    transcripts: dict[str, Transcript],
    options: DecodeOptions,
    *,
    streaming: bool,
    manifest: Path,
    seconds: float,
    rescore_model: Path | None = None,
    lm: LanguageModel | None = None,
) -> tuple[ErrorRates, dict[str, Any]]:
    """Corpus WER/CER of a decode, and its summary (wer.json, a results.json entry): the
    rates, the word confidences' ECE as reported (`ece`) and before calibration (`raw_ece`;
    the same for a bundle without one; both None without words), the method
    (`streaming-METHOD` when streamed), options, speed. `seconds`: the decoding wall time;
    `rescore_model`: the LAS bundle a CTC model decoded with, if any; `lm`: the language model
    it fused (filed as method METHOD+KIND, e.g. beam+lstm, when its weight is not 0; with
    -ilm after it when the internal LM was subtracted)."""
    rates = error_rates([u.text for u in utterances], [transcripts[u.id].text for u in utterances])
    audio_seconds = sum(u.duration for u in utterances)
    confidence = confidence_scores(utterances, transcripts)
    method = f"streaming-{options.method}" if streaming else options.method
    fused = lm is not None and options.lm_weight > 0 and options.method != "greedy"
    if fused:
        assert lm is not None
        method += f"+{lm.kind}"
    if options.ilm_weight > 0 and options.method != "greedy":
        method += "-ilm"  # beam+lstm-ilm: the LSTM LM fused, the internal LM subtracted
    summary = rates.to_dict() | {
        "ece": confidence.ece(),
        "raw_ece": confidence.ece(confidence.raw),
        "confidence_words": confidence.words,
        "method": method,
        "beam": 1 if options.method == "greedy" else options.beam,
        "options": asdict(options),
        "manifest": str(manifest),
        "decode_seconds": round(seconds, 2),
        "rtf": round(seconds / max(audio_seconds, 1e-9), 4),
    }
    if rescore_model is not None:
        summary["rescore_model"] = str(rescore_model)
    if fused:
        assert lm is not None
        summary["lm"] = str(lm.path)
    return rates, summary


def decode_line(
    name: str, rates: ErrorRates, summary: dict[str, Any], seconds: float, out: Path
) -> str:
    """The one line `asr decode` prints: a test set's rates, their counts, the word
    confidences' ECE (and before calibration, where it differs) and the speed."""
    ece, raw = summary.get("ece"), summary.get("raw_ece")
    calibration = "" if ece is None else f", ECE {ece:.3f}"
    if ece is not None and raw != ece:
        calibration += f" (raw {raw:.3f})"
    return (
        f"{name}: {summary['method']} WER {rates.wer:.2f} % CER {rates.cer:.2f} % "
        f"(S {rates.substitutions} D {rates.deletions} I {rates.insertions} over "
        f"{rates.words} words, {rates.utterances} utterances{calibration}, {seconds:.1f} s, "
        f"RTF {summary['rtf']:.3f}) -> {out}"
    )


def write_decode(
    out: Path,
    utterances: list[Utterance],
    transcripts: dict[str, Transcript],
    rates: ErrorRates,
    summary: dict[str, Any],
    worst: int,
) -> None:
    """hyps.tsv, hyps.jsonl (with words and n-best), errors.txt and wer.json in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "hyps.tsv").open("w") as tsv, (out / "hyps.jsonl").open("w") as jsonl:
        tsv.write("id\treference\thypothesis\n")
        for utt in utterances:
            t = transcripts[utt.id]
            tsv.write(f"{utt.id}\t{utt.text}\t{t.text}\n")
            jsonl.write(json.dumps({"id": utt.id, "reference": utt.text} | t.to_dict()) + "\n")
    per_utt = utterance_errors(
        [u.id for u in utterances],
        [u.text for u in utterances],
        [transcripts[u.id].text for u in utterances],
    )
    lines = [
        f"WER {rates.wer:.2f} % ({rates.substitutions} substitutions, {rates.deletions} "
        f"deletions, {rates.insertions} insertions over {rates.words} reference words)",
        f"CER {rates.cer:.2f} %, {rates.utterances} utterances, "
        f"{sum(u.errors == 0 for u in per_utt)} without errors",
        "",
        f"Worst {min(worst, len(per_utt))} utterances (errors / words):",
    ]
    for u in per_utt[:worst]:
        lines += [
            f"{u.id}  {u.errors}/{u.words}",
            f"  REF: {u.reference}",
            f"  HYP: {u.hypothesis}",
        ]
    (out / "errors.txt").write_text("\n".join(lines) + "\n")
    (out / "wer.json").write_text(json.dumps(summary, indent=2) + "\n")


def add_results(path: Path, config: dict[str, Any], name: str, summary: dict[str, Any]) -> None:
    """Merge one test set's numbers into a recipe's results.json (`config`: the bundle's)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    training = config["training"]
    results.update(
        model=config["model"]["type"],
        preset=config["model"].get("preset") or training["experiment"]["model"].get("preset"),
        data=training["experiment"]["data"]["train"],
        parameters=config["model"]["parameters"],
        train_hours=training["train_hours"],
        train_wall_seconds=training.get("wall_seconds"),
    )
    # tests.<set>: greedy figures (the recipe table's first column); methods.<method>.<set>:
    # every method decoded.
    if summary["method"] == "greedy":
        results.setdefault("tests", {})[name] = summary
    results.setdefault("methods", {}).setdefault(summary["method"], {})[name] = summary
    path.write_text(json.dumps(results, indent=2) + "\n")
