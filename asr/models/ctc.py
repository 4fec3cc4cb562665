"""The CTC loss every model and benchmark trains with, and the count of utterances it cannot fit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from asr.masks import lengths_to_mask
from asr.tokenizer import BLANK_ID


def ctc_loss(
    log_probs: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    target_lens: torch.Tensor,
) -> torch.Tensor:
    """Summed CTC loss over the batch / batch size: a scalar.

    log_probs: (B, T, V) float32, blank = `BLANK_ID`; lengths: (B,) valid frames; targets:
    (B, U) padded with anything (-1 by convention) beyond target_lens (B,).

    Summed per utterance rather than normalised by its length (as ESPnet), so long utterances
    weigh more, as they would if the batch were one long utterance. An infeasible utterance
    (see `count_infeasible`) has infinite loss, which `zero_infinity` turns into 0 (with zero
    gradient) so one bad utterance cannot make a whole batch NaN.
    """
    if log_probs.shape[1] == 0:  # no frames at all: ctc_loss refuses empty input
        return log_probs.sum() * 0.0
    losses = F.ctc_loss(
        log_probs.transpose(0, 1),  # (T, B, V)
        targets.clamp(min=0),  # the -1 padding is never read, but must be a valid index
        lengths,
        target_lens,
        blank=BLANK_ID,
        reduction="none",
        zero_infinity=True,
    )  # (B,)
    return losses.sum() / targets.shape[0]


def count_infeasible(
    lengths: torch.Tensor, targets: torch.Tensor, target_lens: torch.Tensor
) -> int:
    """How many utterances have fewer frames than their target needs (one per token plus a
    blank between repeated tokens), the ones `ctc_loss` scores 0.

    lengths: (B,) frames, targets: (B, U) padded beyond target_lens (B,). Counted from the
    lengths rather than from the loss values, so it needs no second loss evaluation.
    """
    in_target = lengths_to_mask(target_lens.to(targets.device), targets.shape[1])  # (B, U)
    repeats = (targets[:, 1:] == targets[:, :-1]) & in_target[:, 1:]  # (B, U - 1)
    needed = target_lens.to(lengths.device) + repeats.sum(dim=1).to(lengths.device)
    return int((lengths < needed).sum())
