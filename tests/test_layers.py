"""Shared layers: length masks, the CTC loss."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import asr.masks
from asr.models import layers
from asr.models.ctc import count_infeasible, ctc_loss
from asr.models.layers import lengths_to_mask


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # Tiny tensors: a second thread costs more in start-up and contention than it saves.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_lengths_to_mask_is_one_helper_re_exported_by_layers() -> None:
    assert layers.lengths_to_mask is asr.masks.lengths_to_mask
    mask = lengths_to_mask(torch.tensor([2, 0, 3]), 4)
    assert mask.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]


def test_ctc_loss_sums_over_utterances_over_batch_zeroing_infeasible_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    log_probs = torch.randn(3, 6, 5, generator=gen).log_softmax(-1)
    lengths = torch.tensor([6, 2, 4])
    targets = torch.tensor([[1, 2, 3], [4, 4, -1], [2, 2, -1]])
    target_lens = torch.tensor([3, 2, 2])
    raw = F.ctc_loss(
        log_probs.transpose(0, 1), targets.clamp(min=0), lengths, target_lens, reduction="none"
    )
    # [4, 4] needs 3 frames (a blank between the repeats) but has 2; [2, 2] fits in 4.
    assert torch.isinf(raw).tolist() == [False, True, False]
    assert count_infeasible(lengths, targets, target_lens) == 1
    loss = ctc_loss(log_probs, lengths, targets, target_lens)
    torch.testing.assert_close(loss, raw[~torch.isinf(raw)].sum() / 3)


def test_ctc_loss_of_no_frames_is_zero_with_a_gradient_path() -> None:
    log_probs = torch.zeros(2, 0, 5, requires_grad=True)
    loss = ctc_loss(log_probs, torch.tensor([0, 0]), torch.tensor([[1], [2]]), torch.tensor([1, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert (
        count_infeasible(torch.tensor([0, 0]), torch.tensor([[1], [2]]), torch.tensor([1, 1])) == 2
    )
