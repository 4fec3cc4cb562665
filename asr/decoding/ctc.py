"""CTC decoding over log-probabilities (B, T, V) with blank id 0."""

from __future__ import annotations

import torch

from asr.tokenizer import BLANK_ID


def ctc_greedy(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks.

    log_probs: (B, T, V); lengths: (B,) valid frames. Returns token ids per utterance.
    """
    best = log_probs.argmax(dim=-1)  # (B, T)
    # A token is emitted where it differs from the previous frame's and is not blank.
    changed = torch.ones_like(best, dtype=torch.bool)
    changed[:, 1:] = best[:, 1:] != best[:, :-1]
    keep = changed & (best != BLANK_ID)
    keep &= torch.arange(best.shape[1], device=best.device)[None, :] < lengths[:, None]
    return [row[mask].tolist() for row, mask in zip(best.cpu(), keep.cpu(), strict=True)]
