"""Length masks, in a module of their own so that models and decoders can share them without
`asr.decoding` importing `asr.models` (whose package imports `asr.decoding`)."""

from __future__ import annotations

import torch


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True on valid frames; on the lengths' device."""
    return torch.arange(max_len, device=lengths.device) < lengths.unsqueeze(1)
