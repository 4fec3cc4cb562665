"""What every acoustic model shares: the output type of `forward`, input normalisation, and
what it offers decoders. (Configs share `asr.config.Config`.)

One training loop serves every model because each one implements
`forward(feats (B, T, F), feat_lens (B,), targets (B, U) | None, target_lens (B,) | None)
-> ModelOutput`, with `loss` set when targets are given.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from asr.features import CMVN

# What a model offers its decoders (`offers`); searches are defined over these, not over
# model types (asr.recognizer.METHODS).
CTC = "ctc"  # CTC posteriors: `log_probs`, or a LAS's CTC head in `encode`
ATTENTION = "attention"  # an attention decoder: `encode` -> `EncoderOutput`, then `step`


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model` runs: its first parameter's or buffer's device; an int8 model (its weights
    packed by asr.quantize, not parameters) runs on CPU."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


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


class NormalizesInput:
    """A model normalises its own input features with the global CMVN of its training set, so
    every caller (training, decoding, streaming, the server) hands it raw log-mel features and
    none can forget the step or do it twice. The statistics are not weights (cmvn.json keeps
    them beside the weights), so whoever loads the weights sets `cmvn`: `Bundle` for a bundle's
    model, the trainer for the model it trains. Without statistics features pass unchanged.
    """

    cmvn: CMVN | None = None

    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., T, F) log-mel features -> the same, normalised to zero mean and unit variance."""
        return feats if self.cmvn is None else self.cmvn.apply(feats)

    def stream_normalizer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """`normalize` for one stream's consecutive (..., n, F) chunks (a sliding-window CMVN
        carries history from chunk to chunk); the outputs joined equal `normalize` of the
        joined input."""
        return (lambda feats: feats) if self.cmvn is None else self.cmvn.stream()


def attach_cmvn(model: object, cmvn: CMVN) -> None:
    """Have `model` (any of ours) normalise its input with `cmvn`."""
    if not isinstance(model, NormalizesInput):
        raise TypeError(f"{type(model).__name__} does not normalise its input")
    model.cmvn = cmvn


def offers(model: object) -> frozenset[str]:
    """What `model` offers its decoders: a subset of {CTC, ATTENTION}."""
    return frozenset(getattr(model, "offers", ()))
