"""What every acoustic model shares: the output type of `forward` and the model registry.

One training loop serves every model because each one implements
`forward(feats (B, T, F), feat_lens (B,), targets (B, U) | None, target_lens (B,) | None)
-> ModelOutput`, with `loss` set when targets are given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch

ConfigT = TypeVar("ConfigT")


@dataclass
class ModelOutput:
    """Result of a model's forward pass.

    `log_probs` are CTC log-probabilities over the vocabulary (blank = 0), the BiLSTM-CTC
    output or the LAS auxiliary CTC head; None for a LAS model without one.
    """

    loss: torch.Tensor | None  # scalar training objective; None without targets
    log_probs: torch.Tensor | None  # (B, T', V)
    out_lens: torch.Tensor  # (B,) valid frames of log_probs / encoder output
    metrics: dict[str, float] = field(default_factory=dict)  # loss parts, for logging only


def config_from_dict(cls: type[ConfigT], data: Mapping[str, Any]) -> ConfigT:
    """Rebuild a config dataclass from `asdict` output, rejecting keys it does not have (a
    bundle from a newer version must fail loudly, not drop settings silently)."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)})  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**data)
