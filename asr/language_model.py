"""Language models a recognizer fuses into its searches: an LSTM LM bundle (`asr lm export`)
or a word n-gram ARPA file, loaded into one `LanguageModel` behind the `Scorer` interface."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from asr.bundle import LM_FILES, BundleError, load_lm_bundle
from asr.decoding.scorers import LSTMLMScorer, NGramScorer, Scorer
from asr.models.ngram import ARPAError, NGramLM
from asr.tokenizer import Tokenizer

# The LM weight a recognizer uses unless told otherwise (ESPnet's RNN-LM recipes use 0.3-0.6;
# the recipes choose theirs on dev, recipes/librispeech/run.sh stage 7).
DEFAULT_LM_WEIGHT = 0.3
# The length bonus that goes with a 3-gram, per unit (chosen on dev: bench/lm_fusion.py).
NGRAM_LENGTH_BONUS = 1.0


@dataclass(frozen=True)
class LanguageModel:
    """A loaded language model: `kind` is "lstm" or "ngram"; `scorer` scores unit hypotheses
    of the tokenizer it was loaded for."""

    path: Path
    kind: str
    scorer: Scorer
    # Per unit at weight 1 (scaled by the weight for an LSTM LM): what offsets the LM's
    # cost of every unit, so fusion does not turn errors into deletions.
    unit_cost: float

    def describe(self) -> str:
        return f"{self.kind} LM {self.path.name}"

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of what it was loaded from (the ARPA file, an LM bundle's weights): a
        calibration fitted with this LM (`asr export --lm`) applies to it, wherever it lies."""
        source = self.path / LM_FILES[1] if self.path.is_dir() else self.path
        digest = hashlib.sha256()
        with source.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    def length_bonus(self, weight: float) -> float:
        """The length bonus to fuse with at `weight` (recipes/librispeech/run.sh stage 7)."""
        return weight * self.unit_cost if self.kind == "lstm" else self.unit_cost


def _arpa(path: Path, tokenizer: Tokenizer) -> LanguageModel:
    try:
        scorer = NGramScorer(NGramLM.load(path), tokenizer)
        return LanguageModel(path, "ngram", scorer, NGRAM_LENGTH_BONUS)
    except ARPAError as err:
        raise BundleError(str(err)) from err


def _lstm(
    path: Path, tokenizer: Tokenizer, device: str | torch.device, quantize: str
) -> LanguageModel:
    bundle = load_lm_bundle(path, device)
    if bundle.tokenizer.pieces() != tokenizer.pieces():
        raise BundleError(
            f"{path}: the language model's units differ from the acoustic model's; fusion "
            "needs an LM trained with the same tokenizer (asr lm train --tokenizer)"
        )
    # Its mean cost per unit on dev: ln of its perplexity.
    cost = math.log(bundle.perplexity) if bundle.perplexity else 0.0
    return LanguageModel(path, "lstm", LSTMLMScorer(bundle.model.stepper(quantize)), cost)


def load_language_model(
    path: str | Path,
    tokenizer: Tokenizer,
    device: str | torch.device = "cpu",
    *,
    quantize: str = "none",
) -> LanguageModel:
    """An LM bundle directory or an ARPA file (.arpa, .arpa.gz) for a model with `tokenizer`;
    `quantize="int8"` steps an LSTM LM with int8 weights (`LMStepper`; an n-gram has no
    weights to quantize). Raises BundleError naming the path for anything unusable."""
    path = Path(path)
    if path.is_dir():
        return _lstm(path, tokenizer, device, quantize)
    if path.is_file():
        return _arpa(path, tokenizer)  # a dict of n-grams: no device
    raise BundleError(f"{path}: no such language model (an LM bundle directory or ARPA file)")
