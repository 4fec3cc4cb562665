"""Language models a recognizer fuses into its searches: an LSTM LM bundle (`asr lm export`)
or a word n-gram ARPA file, loaded into one `LanguageModel` behind the `Scorer` interface."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from asr.bundle import BundleError, load_lm_bundle
from asr.decoding.scorers import LSTMLMScorer, NGramScorer, Scorer
from asr.models.ngram import ARPAError, NGramLM
from asr.tokenizer import Tokenizer

# The LM weight a recognizer uses unless told (or its bundle says) otherwise: the middle of
# what the recipes choose on dev (recipes/synthetic/README.md) and of ESPnet's RNN-LM recipes.
DEFAULT_LM_WEIGHT = 0.3


@dataclass(frozen=True)
class LanguageModel:
    """A loaded language model: `kind` is "lstm" or "ngram"; `scorer` scores unit hypotheses
    of the tokenizer it was loaded for."""

    path: Path
    kind: str
    scorer: Scorer

    def describe(self) -> str:
        return f"{self.kind} LM {self.path.name}"


def _arpa(path: Path, tokenizer: Tokenizer, device: str | torch.device) -> LanguageModel:
    try:
        return LanguageModel(path, "ngram", NGramScorer(NGramLM.load(path), tokenizer))
    except ARPAError as err:
        raise BundleError(str(err)) from err


def _lstm(path: Path, tokenizer: Tokenizer, device: str | torch.device) -> LanguageModel:
    bundle = load_lm_bundle(path, device)
    if bundle.tokenizer.pieces() != tokenizer.pieces():
        raise BundleError(
            f"{path}: the language model's units differ from the acoustic model's; fusion "
            "needs an LM trained with the same tokenizer (asr lm train --tokenizer)"
        )
    return LanguageModel(path, "lstm", LSTMLMScorer(bundle.model))


def load_language_model(
    path: str | Path, tokenizer: Tokenizer, device: str | torch.device = "cpu"
) -> LanguageModel:
    """An LM bundle directory or an ARPA file (.arpa, .arpa.gz) for a model with `tokenizer`.
    Raises BundleError naming the path for anything unusable."""
    path = Path(path)
    if path.is_dir():
        return _lstm(path, tokenizer, device)
    if path.is_file():
        return _arpa(path, tokenizer, device)
    raise BundleError(f"{path}: no such language model (an LM bundle directory or ARPA file)")
