"""Acoustic models and the registry that rebuilds any of them from (kind, config dict).

A checkpoint or bundle stores `{"type": kind, "config": config.to_dict()}`; `build_model`
turns that back into a model, so nothing needs training flags repeated to load it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from asr.config import Config
from asr.decoding.ctc import ctc_greedy
from asr.models.base import ATTENTION, CTC, offers
from asr.models.bilstm_ctc import PRESETS as CTC_PRESETS
from asr.models.bilstm_ctc import BiLSTMCTC, BiLSTMCTCConfig, bilstm_ctc
from asr.models.las import LAS, LASConfig, las
from asr.models.las import PRESETS as LAS_PRESETS


@dataclass(frozen=True)
class ModelSpec:
    """How to configure and build one kind of model."""

    config_cls: type[Config]
    build: Callable[[Any], nn.Module]
    presets: Mapping[str, Any]


MODELS: dict[str, ModelSpec] = {
    "ctc": ModelSpec(BiLSTMCTCConfig, bilstm_ctc, CTC_PRESETS),
    "las": ModelSpec(LASConfig, las, LAS_PRESETS),
}


def _spec(kind: str) -> ModelSpec:
    if kind not in MODELS:
        raise ValueError(f"unknown model type {kind!r}; choose one of {', '.join(MODELS)}")
    return MODELS[kind]


def model_config(kind: str, preset: str, **overrides: Any) -> Any:
    """A preset's config with fields replaced (e.g. vocab_size from the tokenizer); values
    may be as JSON gives them (lists for tuples, dicts for nested configs)."""
    spec = _spec(kind)
    if preset not in spec.presets:
        raise ValueError(
            f"unknown {kind} preset {preset!r}; choose one of {', '.join(spec.presets)}"
        )
    return spec.config_cls.from_dict(spec.presets[preset].to_dict() | overrides)


def config_class(kind: str) -> type[Config]:
    """The config dataclass of a kind of model."""
    return _spec(kind).config_cls


def build_model(kind: str, config: Mapping[str, Any]) -> nn.Module:
    """Rebuild a model from its kind and `config.to_dict()` output."""
    return _spec(kind).build(config_class(kind).from_dict(dict(config)))


def greedy_decode(model: nn.Module, feats: torch.Tensor, lens: torch.Tensor) -> list[list[int]]:
    """Greedy token ids per utterance, for validation during training: the model's attention
    decoder if it has one, else its CTC posteriors' best path."""
    found = offers(model)
    if ATTENTION in found:
        return cast(LAS, model).greedy_decode(feats, lens)
    if CTC in found:
        return ctc_greedy(*cast(BiLSTMCTC, model).log_probs(feats, lens))
    raise TypeError(f"{type(model).__name__} offers no decoder (pass the unwrapped model)")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
