"""Language model training, perplexity and export, on the acoustic models' Trainer.

`LMTrainer` is the same loop (AMP, DDP, exact resume, atomic checkpoints, JSONL/TensorBoard
logs, progress bar) over sentences instead of utterances: the batch budget (`max_frames`)
counts units, validation reports perplexity. Text comes as plain text, one sentence per line
(an utterance ID first is dropped, as in LibriSpeech transcripts; librispeech-lm-norm.txt has
none), or as JSONL manifests, whose `text` is used.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from asr.bundle import write_lm_bundle
from asr.config import Config
from asr.models.lm import LSTMLM, LSTMLMConfig
from asr.text import normalize_text
from asr.tokenizer import Tokenizer
from asr.training.config import TrainConfig
from asr.training.export import average_checkpoints
from asr.training.trainer import Experiment, Trainer, TrainingSet

MODEL_TYPE = "lstm-lm"

# Training settings of the LM presets (asr.models.lm.PRESETS); `max_frames` counts units.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "cpu-small": TrainConfig(
        epochs=10,
        max_frames=2_000,  # about 120 steps per epoch of the synthetic text
        lr=2e-3,
        warmup_steps=100,
        weight_decay=1e-2,
        num_workers=0,
        speed_perturb=False,
        spec_augment=None,
        checkpoint_every=500,
        log_every=20,
    ),
    # librispeech-lm-norm.txt (40 M sentences, ~0.8 G units at 5k vocab): a few epochs on GPUs.
    "librispeech": TrainConfig(
        epochs=4,
        max_frames=60_000,
        lr=1e-3,
        warmup_steps=5_000,
        num_workers=0,
        speed_perturb=False,
        spec_augment=None,
        checkpoint_every=5_000,
        log_every=200,
    ),
}

_UTTERANCE_ID = re.compile(r"^\d+(-\d+)+$")


def read_sentences(path: str | Path) -> list[str]:
    """Normalised sentences of a text file or JSONL manifest (see the module docstring)."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: text file not found")
    sentences = []
    with source.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if source.suffix == ".jsonl":
                try:
                    line = str(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"{source}:{number}: not a manifest line ({err})") from err
            else:
                first, _, rest = line.partition(" ")
                if _UTTERANCE_ID.match(first):
                    line = rest
            text = normalize_text(line)
            if text:
                sentences.append(text)
    if not sentences:
        raise ValueError(f"{source}: no sentences")
    return sentences


# GCIDE (the Collaborative International Dictionary of English: Webster's 1913 and more;
# Debian's dict-gcide, /usr/share/dictd/gcide.dict.dz) is 5 M words (3 M kept as prose here), with
# the vocabulary of the 19th-century books LibriSpeech reads: definitions, usage notes and
# about 6,500 quotations from literature. Its markup: \Ab"so*lute\ pronunciations (a stress
# mark is a double quote, in run-on entries such as {A*dul"ter*ate*ly} too), {Absolute}
# cross-references, [L. absolutus] etymologies and [1913 Webster] sources, (Geom.) labels.
_GCIDE_STRESS = re.compile(r"(?<=[\w*`'])\"(?=[\w*`\\})])")  # a stress mark inside a word
_GCIDE_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")
_GCIDE_ASIDE = re.compile(r"\[[^\]]*\]|\([^)]*\)")
_GCIDE_BREAK = re.compile(r'[.;:?!"]|--|\n\s*\n')  # sentence, clause, quote or entry ends


def gcide_sentences(text: str, min_words: int = 4, min_lower: float = 0.6) -> list[str]:
    """The normalised prose of GCIDE dictionary text (`text`: its decompressed gcide.dict.dz):
    its pieces between sentence and clause marks, quotes and blank lines that have at least
    `min_words` words, of which at least `min_lower` begin in lower case (prose, not headwords,
    synonym lists or abbreviations)."""
    text = _GCIDE_PRONUNCIATION.sub(" ", _GCIDE_STRESS.sub("", text))
    text = _GCIDE_ASIDE.sub(" ", text).replace("{", "").replace("}", "")
    sentences = []
    for piece in _GCIDE_BREAK.split(text):
        words = piece.split()
        if len(words) < min_words or sum(w[0].islower() for w in words) < min_lower * len(words):
            continue
        sentence = normalize_text(piece)
        if len(sentence.split()) >= min_words:
            sentences.append(sentence)
    return sentences


def read_gcide(path: str | Path) -> list[str]:
    """`gcide_sentences` of a dictd file (gcide.dict.dz, gzip-compatible) or plain text."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: dictionary file not found (apt install dict-gcide)")
    raw = source.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    sentences = gcide_sentences(raw.decode("utf-8", errors="replace"))
    if not sentences:
        raise ValueError(f"{source}: no sentences (not GCIDE dictionary text?)")
    return sentences


class OverlapFilter:
    """Drops sentences that share a run of `n` words with any excluded sentence, or equal one
    (n = 0: only equal ones): outside text may quote a test sentence inside a longer one, as
    a dictionary's citation of the same book would. Keeps n-gram hashes, 8 bytes each."""

    def __init__(self, excluded: Sequence[str], n: int = 0) -> None:
        self.n = n
        self.sentences = {hash(s) for s in excluded}
        self.grams = {g for s in excluded for g in self._grams(s)}

    def _grams(self, sentence: str) -> set[int]:
        if self.n <= 0:
            return set()
        words = sentence.split()
        return {hash(tuple(words[i : i + self.n])) for i in range(len(words) - self.n + 1)}

    def __call__(self, sentence: str) -> bool:
        """Whether `sentence` may be kept."""
        return hash(sentence) not in self.sentences and not (self._grams(sentence) & self.grams)


class TextDataset(Dataset["TextExample"]):
    """Tokenised sentences, stored flat (int32 units + offsets) so corpora of hundreds of
    millions of units fit in memory."""

    def __init__(self, sentences: Sequence[str], tokenizer: Tokenizer) -> None:
        encoded = [tokenizer.encode(s) for s in sentences]
        self.lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.units = np.fromiter(
            (u for e in encoded for u in e), dtype=np.int32, count=int(self.offsets[-1])
        )

    def set_epoch(self, epoch: int) -> None:
        """Text needs no per-epoch randomness (the sampler shuffles)."""

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> TextExample:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return TextExample(str(index), torch.from_numpy(self.units[start:end].astype(np.int64)))


@dataclass(frozen=True)
class TextExample:
    id: str
    tokens: torch.Tensor  # (U,) int64


@dataclass(frozen=True)
class TextBatch:
    ids: list[str]
    tokens: torch.Tensor  # (B, U) int64, padded with 0
    lengths: torch.Tensor  # (B,) int64

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.tokens, self.lengths

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextBatch:
        return TextBatch(
            self.ids,
            self.tokens.to(device, non_blocking=non_blocking),
            self.lengths.to(device, non_blocking=non_blocking),
        )


def collate_text(examples: Sequence[TextExample]) -> TextBatch:
    lengths = torch.tensor([len(e.tokens) for e in examples], dtype=torch.long)
    tokens = torch.zeros((len(examples), max(int(lengths.max()), 1)), dtype=torch.long)
    for i, e in enumerate(examples):
        tokens[i, : len(e.tokens)] = e.tokens
    return TextBatch([e.id for e in examples], tokens, lengths)


@torch.no_grad()
def perplexity(
    model: LSTMLM, data: TextDataset, *, max_units: int = 20_000, device: str = "cpu"
) -> dict[str, float]:
    """Per-unit perplexity (eos counted as a unit) of `data`, in batches of `max_units`."""
    was_training = model.training
    model.eval()
    order = np.argsort(data.lengths, kind="stable")
    total, units, batch = 0.0, 0, []
    for index in [*order.tolist(), None]:
        if index is not None:
            batch.append(data[index])
            padded = len(batch) * (int(data.lengths[index]) + 1)
            if padded < max_units:
                continue
        if batch:
            b = collate_text(batch).to(device)
            total -= float(model.sentence_log_probs(b.tokens, b.lengths).sum())
            units += int(b.lengths.sum()) + len(batch)
            batch = []
    model.train(was_training)
    nll = total / max(units, 1)
    return {"valid_loss": nll, "perplexity": math.exp(nll), "units": float(units)}


class LMTrainer(Trainer):
    """`Trainer` over text: sentences in, per-unit cross-entropy, dev perplexity."""

    unit = "sentence"
    throughput = "units_per_s"

    def __init__(
        self, exp_dir: str | Path, experiment: Experiment, tokenizer_path: str | Path, **kwargs: Any
    ) -> None:
        super().__init__(exp_dir, experiment, tokenizer_path, None, **kwargs)

    def _build_model(self) -> nn.Module:
        return LSTMLM(LSTMLMConfig.from_dict(self.exp.model_config))

    def _model_config(self, config: Mapping[str, Any]) -> Config:
        return LSTMLMConfig.from_dict(config)

    def _training_data(self) -> tuple[TrainingSet, Sequence[int]]:
        train = TextDataset(read_sentences(self.exp.train_manifest), self.tokenizer)
        self.dev_set = TextDataset(read_sentences(self.exp.dev_manifest), self.tokenizer)
        return train, (train.lengths + 1).tolist()

    def _collate(self, examples: Sequence[Any]) -> Any:
        return collate_text(examples)

    def _amount(self, batch: Any) -> float:
        return float(batch.lengths.sum()) + len(batch.ids)

    def _epoch_summary(self, result: dict[str, float]) -> str:
        return f"valid loss {result['valid_loss']:.3f}, perplexity {result['perplexity']:.2f}"

    def validate(self) -> dict[str, float]:
        assert isinstance(self.model, LSTMLM)
        return perplexity(
            self.model, self.dev_set, max_units=self.cfg.max_frames, device=str(self.device)
        )


def export_lm(exp_dir: str | Path, out_dir: str | Path, *, average: int = 1) -> Path:
    """An LM bundle from the newest `average` checkpoints of `exp_dir`, with the averaged
    weights' dev perplexity."""
    exp_path = Path(exp_dir)
    experiment, weights, training = average_checkpoints(exp_path, average)
    if experiment.model_type != MODEL_TYPE:
        raise ValueError(f"{exp_path}: not a language model experiment ({experiment.model_type})")
    tokenizer = Tokenizer.load(exp_path / "tokenizer.model")
    model = LSTMLM(LSTMLMConfig.from_dict(experiment.model_config))
    model.load_state_dict(weights)
    dev = perplexity(model, TextDataset(read_sentences(experiment.dev_manifest), tokenizer))
    return write_lm_bundle(
        out_dir,
        model_config=experiment.model_config,
        weights=weights,
        tokenizer=tokenizer,
        training=training,
        results={"dev": dev | {"text": experiment.dev_manifest}},
    )
