"""Language models a recognizer fuses into its searches: an LSTM LM bundle (`asr lm export`),
a word n-gram ARPA file, or a mix of them (a JSON file naming several, each with its weight,
`asr lm mix`), loaded into one `LanguageModel` behind the `Scorer` interface."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from asr.bundle import LM_FILES, BundleError, load_lm_bundle
from asr.decoding.scorers import Fusion, LSTMLMScorer, NGramScorer, Scorer
from asr.models.ngram import ARPAError, NGramLM
from asr.tokenizer import Tokenizer

# The LM weight a recognizer uses unless told otherwise (ESPnet's RNN-LM recipes use 0.3-0.6;
# the recipes choose theirs on dev, recipes/librispeech/run.sh stage 7). A mix's own weights
# are those its parts fuse at, so it defaults to 1.
DEFAULT_LM_WEIGHT = 0.3
# The length bonus that goes with a 3-gram, per unit (chosen on dev: bench/lm_fusion.py).
NGRAM_LENGTH_BONUS = 1.0
# What marks an LM mix file (the other LMs are a bundle directory or an ARPA file).
MIX_SUFFIX = ".json"


@dataclass(frozen=True)
class LanguageModel:
    """A loaded language model: `kind` is "lstm", "ngram" or "mix"; `scorer` scores unit
    hypotheses of the tokenizer it was loaded for. A mix's `parts` are its (weight, LM)
    pairs, its scorer their weighted sum (ESPnet decodes with an RNN LM and an n-gram side by
    side the same way)."""

    path: Path
    kind: str
    scorer: Scorer
    # Per unit at weight 1 (scaled by the weight for an LSTM LM): what offsets the LM's
    # cost of every unit, so fusion does not turn errors into deletions.
    unit_cost: float
    parts: tuple[tuple[float, LanguageModel], ...] = ()

    @property
    def default_weight(self) -> float:
        """The weight to fuse at unless told otherwise."""
        return 1.0 if self.parts else DEFAULT_LM_WEIGHT

    def describe(self) -> str:
        if not self.parts:
            return f"{self.kind} LM {self.path.name}"
        mixed = " + ".join(f"{w:g} x {lm.describe()}" for w, lm in self.parts)
        return f"mix {self.path.name} ({mixed})"

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of what it was loaded from (the ARPA file, an LM bundle's weights; for a
        mix, its parts' fingerprints and weights): a calibration fitted with this LM (`asr
        export --lm`) applies to it, wherever it lies."""
        digest = hashlib.sha256()
        if self.parts:
            for w, lm in self.parts:
                digest.update(f"{w!r} {lm.fingerprint}\n".encode())
            return digest.hexdigest()
        source = self.path / LM_FILES[1] if self.path.is_dir() else self.path
        with source.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()

    def length_bonus(self, weight: float) -> float:
        """The length bonus to fuse with at `weight` (recipes/librispeech/run.sh stage 7); a
        mix's is the sum of its parts' at their weights."""
        if self.parts:
            return sum(lm.length_bonus(weight * w) for w, lm in self.parts)
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


def read_mix(path: Path) -> list[tuple[float, Path]]:
    """An LM mix file's (weight, LM path) parts, paths relative to the file's folder resolved.
    BundleError names the file for anything that is not a mix of LM bundles and ARPA files
    with positive finite weights."""
    form = '{"language_models": [{"path": LM, "weight": W}, ...]}'
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["language_models"]
        parts = [(float(e["weight"]), path.parent / str(e["path"])) for e in entries]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise BundleError(f"{path}: not an LM mix ({form}): {err!r}") from err
    if not parts:
        raise BundleError(f"{path}: an LM mix names at least one LM ({form})")
    for weight, part in parts:
        if not (math.isfinite(weight) and weight > 0):
            raise BundleError(f"{path}: the weight of {part} must be a positive number")
        if part.suffix == MIX_SUFFIX:  # also keeps a file that names itself from recursing
            raise BundleError(f"{path}: {part} is an LM mix; a mix holds LM bundles and ARPA files")
    return parts


def write_mix(out: Path, parts: Sequence[tuple[float, Path]]) -> None:
    """Write an LM mix file naming `parts` (weight, LM path), paths relative to its folder
    where they can be (so a moved experiment directory keeps working)."""
    entries = [
        {"path": os.path.relpath(Path(p).absolute(), out.absolute().parent), "weight": w}
        for w, p in parts
    ]
    out.write_text(json.dumps({"language_models": entries}, indent=2) + "\n", encoding="utf-8")
    read_mix(out)  # what it wrote loads


def _mix(
    path: Path, tokenizer: Tokenizer, device: str | torch.device, quantize: str
) -> LanguageModel:
    parts = tuple(
        (w, load_language_model(p, tokenizer, device, quantize=quantize)) for w, p in read_mix(path)
    )
    scorer = Fusion([(w, lm.scorer) for w, lm in parts])
    return LanguageModel(path, "mix", scorer, 0.0, parts)


def load_language_model(
    path: str | Path,
    tokenizer: Tokenizer,
    device: str | torch.device = "cpu",
    *,
    quantize: str = "none",
) -> LanguageModel:
    """An LM bundle directory, an ARPA file (.arpa, .arpa.gz) or an LM mix file (.json) for
    a model with `tokenizer`; `quantize="int8"` steps an LSTM LM with int8 weights
    (`LMStepper`; an n-gram has no weights to quantize). Raises BundleError naming the path
    for anything unusable."""
    path = Path(path)
    if path.is_dir():
        return _lstm(path, tokenizer, device, quantize)
    if path.is_file() and path.suffix == MIX_SUFFIX:
        return _mix(path, tokenizer, device, quantize)
    if path.is_file():
        return _arpa(path, tokenizer)  # a dict of n-grams: no device
    raise BundleError(
        f"{path}: no such language model (an LM bundle directory, ARPA file or LM mix)"
    )
