"""Model bundles: the self-describing directory that export writes and the server and CLI load.

    config.json        model type and config, features, tokenizer, decoding defaults,
                       word confidence calibration (optional), training provenance and
                       dev results
    model.safetensors  weights (safetensors: loading never unpickles anything)
    tokenizer.model    sentencepiece model
    cmvn.json          global feature normalisation

Loading rebuilds the model from config.json alone; no training code or flags are involved.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from asr.calibration import KEY, LM_FINGERPRINT, LM_FUSION, LM_KEY, Calibration
from asr.features import CMVN, FeatureConfig
from asr.models import build_model, count_parameters
from asr.models.base import attach_cmvn
from asr.models.lm import LSTMLM, LSTMLMConfig
from asr.tokenizer import Tokenizer

FORMAT = "asr-bundle"
FORMAT_VERSION = 1
FILES = ("config.json", "model.safetensors", "tokenizer.model", "cmvn.json")


class BundleError(ValueError):
    """A bundle directory is missing files or holds something we cannot load."""


@dataclass
class Bundle:
    """A loaded model with everything needed to turn audio into text."""

    path: Path
    model_type: str
    model: nn.Module
    tokenizer: Tokenizer
    cmvn: CMVN
    feature_config: FeatureConfig
    config: dict[str, Any]  # the whole config.json

    def __post_init__(self) -> None:
        # The model normalises its input with these statistics (asr.models.base): set here, so
        # any bundle, loaded or built with dataclasses.replace(bundle, model=...), takes raw
        # log-mel features.
        attach_cmvn(self.model, self.cmvn)

    @property
    def calibration(self) -> Calibration | None:
        """The word confidence calibration export fitted (None: confidences are raw)."""
        return Calibration.from_bundle(self.config, KEY)

    @property
    def lm_calibration(self) -> Calibration | None:
        """The one fitted on decodes with a language model fused (`asr export --lm`)."""
        return Calibration.from_bundle(self.config, LM_KEY)

    @property
    def _lm_entry(self) -> dict[str, Any]:
        """config.json's "lm_calibration" entry ({} without one)."""
        entry = self.config.get(LM_KEY)
        return entry if isinstance(entry, dict) else {}

    @property
    def lm_fingerprint(self) -> str | None:
        """The sha256 of the LM `lm_calibration` was fitted with (`LanguageModel.fingerprint`)."""
        return self._lm_entry.get(LM_FINGERPRINT)

    @property
    def lm_fusion(self) -> dict[str, float]:
        """The `lm_weight` and `length_bonus` that LM was fused at (`asr export --lm-weight
        --length-bonus`; chosen on dev): where a recognizer fuses the same LM without
        options of its own, it decodes with these, which its calibration matches. Empty
        for a bundle written before they were recorded."""
        entry = self._lm_entry
        return {name: float(entry[name]) for name in LM_FUSION if name in entry}


def git_commit() -> str:
    """The source revision, recorded as provenance (\"unknown\" outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def write_bundle(
    out_dir: str | Path,
    *,
    model_type: str,
    model_config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    cmvn: CMVN,
    feature_config: FeatureConfig,
    training: dict[str, Any],
    results: dict[str, Any],
    decoding: dict[str, Any] | None = None,
    calibration: Calibration | None = None,
    lm_calibration: Calibration | None = None,
    lm_fingerprint: str | None = None,
    lm_fusion: dict[str, float] | None = None,
) -> Path:
    """Write a bundle; the weights are checked to load into the rebuilt model first."""
    model = build_model(model_type, model_config)
    model.load_state_dict(weights)  # fail before writing anything if they do not match
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; clone into plain tensors.
    save_file({k: v.detach().contiguous().clone() for k, v in weights.items()}, out / FILES[1])
    tokenizer.save(out / FILES[2])
    cmvn.save(out / FILES[3])
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {
            "type": model_type,
            "config": model_config,
            "parameters": count_parameters(model),
        },
        "features": asdict(feature_config),
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        "decoding": decoding or {},
        # Absent without one: such bundles report raw confidences, as before calibration.
        **({KEY: calibration.to_bundle()} if calibration is not None else {}),
        **(
            {LM_KEY: lm_calibration.to_bundle(lm_fingerprint, lm_fusion)}
            if lm_calibration is not None
            else {}
        ),
        "training": {
            **training,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "exported_by_commit": git_commit(),
        },
        "results": results,
    }
    (out / FILES[0]).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _read_config(root: Path, files: tuple[str, ...], fmt: str, what: str) -> dict[str, Any]:
    """config.json (files[0]) of the `what` in `root`, once every file is there and the
    format is `fmt` at FORMAT_VERSION; BundleError saying what is wrong otherwise."""
    if not root.is_dir():
        raise BundleError(f"{root}: {what} directory not found")
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise BundleError(f"{root}: not a {what} (missing {', '.join(missing)})")
    try:
        config: dict[str, Any] = json.loads((root / files[0]).read_text())
    except ValueError as err:
        raise BundleError(f"{root / files[0]}: invalid JSON ({err})") from err
    if config.get("format") != fmt or config.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{root}: unsupported {what.removesuffix(' bundle')} bundle format "
            f"{config.get('format')!r} version {config.get('format_version')!r} "
            f"(expected {fmt} {FORMAT_VERSION})"
        )
    return config


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Load a bundle directory written by `asr export`; the model is in eval mode."""
    root = Path(path)
    config = _read_config(root, FILES, FORMAT, "model bundle")
    try:
        model_type = config["model"]["type"]
        model = build_model(model_type, config["model"]["config"])
        model.load_state_dict(load_file(str(root / FILES[1]), device=str(device)))
        feature_config = FeatureConfig.from_dict(config["features"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise BundleError(f"{root}: cannot rebuild the model ({err})") from err
    try:
        for key in (KEY, LM_KEY):
            Calibration.from_bundle(config, key)
    except ValueError as err:
        raise BundleError(f"{root / FILES[0]}: {err}") from err
    model.to(device).eval()
    return Bundle(
        path=root,
        model_type=model_type,
        model=model,
        tokenizer=Tokenizer.load(root / FILES[2]),
        cmvn=CMVN.load(root / FILES[3]),
        feature_config=feature_config,
        config=config,
    )


# ---------------------------------------------------------------- language models
# An LM bundle: config.json (format asr-lm-bundle, model config, tokenizer, training
# provenance, dev perplexity), model.safetensors, tokenizer.model. No features, no CMVN.

LM_FORMAT = "asr-lm-bundle"
LM_FILES = ("config.json", "model.safetensors", "tokenizer.model")


@dataclass
class LMBundle:
    """A loaded language model and the tokenizer its units come from."""

    path: Path
    model: LSTMLM
    tokenizer: Tokenizer
    config: dict[str, Any]

    @property
    def perplexity(self) -> float | None:
        """Dev perplexity of the exported weights (None: unknown)."""
        value = self.config.get("results", {}).get("dev", {}).get("perplexity")
        return None if value is None else float(value)


def write_lm_bundle(
    out_dir: str | Path,
    *,
    model_config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    training: dict[str, Any],
    results: dict[str, Any],
) -> Path:
    """Write an LM bundle; the weights are checked to load into the rebuilt model first."""
    model = LSTMLM(LSTMLMConfig.from_dict(model_config))
    model.load_state_dict(weights)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Tied embeddings are one tensor under two names: store it once, as the embedding.
    tied = {"out.weight"} if model.config.tie_embeddings else set()
    stored = {k: v.detach().contiguous().clone() for k, v in weights.items() if k not in tied}
    save_file(stored, out / LM_FILES[1])
    tokenizer.save(out / LM_FILES[2])
    config = {
        "format": LM_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {"type": "lstm-lm", "config": model_config, "parameters": count_parameters(model)},
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
        "training": {
            **training,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "exported_by_commit": git_commit(),
        },
        "results": results,
    }
    (out / LM_FILES[0]).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_lm_bundle(path: str | Path, device: str | torch.device = "cpu") -> LMBundle:
    """Load a directory written by `asr lm export`; the model is in eval mode."""
    root = Path(path)
    config = _read_config(root, LM_FILES, LM_FORMAT, "language model bundle")
    try:
        model = LSTMLM(LSTMLMConfig.from_dict(config["model"]["config"]))
        state = load_file(str(root / LM_FILES[1]), device=str(device))
        if model.config.tie_embeddings:
            state["out.weight"] = state["embed.weight"]
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise BundleError(f"{root}: cannot rebuild the language model ({err})") from err
    model.to(device).eval()
    return LMBundle(root, model, Tokenizer.load(root / LM_FILES[2]), config)
