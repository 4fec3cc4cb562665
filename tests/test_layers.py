"""Shared layers: the padding-exact bidirectional RNN (offline and LC blocks with carried state),
its old parameter names, the pyramidal BiLSTM's zeroed padding, length masks, the CTC loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import asr.masks
from asr.models import layers
from asr.models.ctc import count_infeasible, ctc_loss
from asr.models.layers import BiRNN, PyramidalBiLSTM, RNNType, lengths_to_mask


def make(rnn_type: RNNType, projection: int = 0) -> BiRNN:
    torch.manual_seed(0)
    return BiRNN(6, 5, rnn_type, projection).eval()


LENGTHS = [23, 9, 17, 1, 0]  # 0: a stream that has already ended, as in a batched LC block


def padded_batch(lengths: list[int] = LENGTHS) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(len(lengths), max(lengths) + 4, 6, generator=gen), torch.tensor(lengths)


def test_lengths_to_mask_is_one_helper_re_exported_by_layers() -> None:
    assert layers.lengths_to_mask is asr.masks.lengths_to_mask
    mask = lengths_to_mask(torch.tensor([2, 0, 3]), 4)
    assert mask.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize("projection", [0, 4])
def test_each_row_alone_equals_its_row_in_a_padded_batch(
    rnn_type: RNNType, projection: int
) -> None:
    rnn = make(rnn_type, projection)
    x, lengths = padded_batch()
    with torch.no_grad():
        together, state = rnn(x, lengths)
        assert together.shape == (5, x.shape[1], rnn.output_dim)
        assert state.shape == (2 if rnn_type == "lstm" else 1, 5, 5)
        for b, n in enumerate(LENGTHS):
            if n == 0:
                continue
            alone, alone_state = rnn(x[b : b + 1, :n], lengths[b : b + 1])
            torch.testing.assert_close(alone[0], together[b, :n], atol=1e-6, rtol=0)
            if n == x.shape[1]:  # only then is "after all T frames" the row's own end
                torch.testing.assert_close(alone_state[:, 0], state[:, b], atol=1e-6, rtol=0)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_offline_matches_pytorch_packed_bidirectional_rnn(rnn_type: RNNType) -> None:
    rnn = make(rnn_type)
    x, lengths = padded_batch([23, 9, 17, 1])
    peer = type(rnn.fwd)(6, 5, batch_first=True, bidirectional=True)
    reverse = {f"{k}_reverse": v for k, v in rnn.bwd.state_dict().items()}
    peer.load_state_dict({**rnn.fwd.state_dict(), **reverse})
    with torch.no_grad():
        ours, _ = rnn(x, lengths)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        theirs, _ = pad_packed_sequence(peer(packed)[0], batch_first=True)
    mask = lengths_to_mask(lengths, theirs.shape[1])
    torch.testing.assert_close(ours[:, : theirs.shape[1]][mask], theirs[mask], atol=1e-6, rtol=0)


def lc_blocks(
    rnn: BiRNN, x: torch.Tensor, lengths: torch.Tensor, chunk: int, context: int
) -> torch.Tensor:
    """x (B, T, D) through LC blocks of `chunk` frames + `context` right context, the forward
    state carried from chunk to chunk -> the chunk frames' outputs (B, T, 2H)."""
    outputs, state = [], None
    for start in range(0, x.shape[1], chunk):
        block = x[:, start : start + chunk + context]
        valid = (lengths - start).clamp(min=0, max=block.shape[1])
        out, state = rnn(block, valid, state, carry=chunk)
        outputs.append(out[:, :chunk])
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize(("chunk", "context"), [(4, 2), (3, 0), (1, 5)])
def test_lc_blocks_with_carried_state_are_padding_exact(
    rnn_type: RNNType, chunk: int, context: int
) -> None:
    rnn = make(rnn_type)
    x, lengths = padded_batch()
    with torch.no_grad():
        together = lc_blocks(rnn, x, lengths, chunk, context)
        for b, n in enumerate(LENGTHS):
            if n == 0:
                continue
            alone = lc_blocks(rnn, x[b : b + 1, :n], lengths[b : b + 1], chunk, context)
            torch.testing.assert_close(alone[0], together[b, :n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_carry_returns_the_state_after_the_chunk_and_continues_over_context(
    rnn_type: RNNType,
) -> None:
    rnn = make(rnn_type)
    x, lengths = padded_batch([12, 12])
    x = x[:, :12]
    with torch.no_grad():
        _, state0 = rnn(x[:, :3], torch.tensor([3, 3]))  # a non-zero state to start from
        out, carried = rnn(x, lengths, state0, carry=7)
        # The forward direction over all 12 frames from state0, in one run ...
        full = rnn.fwd(x, state0 if rnn_type == "gru" else (state0[0:1], state0[1:2]))
        torch.testing.assert_close(out[..., :5], full[0], atol=1e-6, rtol=0)
        # ... but the state it hands on is the one after frame 7, not 12.
        _, after7 = rnn(x[:, :7], torch.tensor([7, 7]), state0)
        torch.testing.assert_close(carried, after7, atol=1e-6, rtol=0)
        # The backward direction starts afresh whatever the forward state.
        fresh, _ = rnn(x, lengths)
        torch.testing.assert_close(out[..., 5:], fresh[..., 5:], atol=0, rtol=0)


def test_old_parameter_names_load_and_give_the_same_output() -> None:
    rnn = make("lstm")
    old_names = {
        k.replace("fwd.", "forward_rnn.").replace("bwd.", "backward_rnn."): v
        for k, v in rnn.state_dict().items()
    }
    assert any(k.startswith("forward_rnn.") for k in old_names)
    torch.manual_seed(7)
    loaded = BiRNN(6, 5).eval()
    loaded.load_state_dict(old_names)  # strict: every old name must find its parameter
    x, lengths = padded_batch()
    with torch.no_grad():
        assert torch.equal(loaded(x, lengths)[0], rnn(x, lengths)[0])


def test_pyramidal_bilstm_zeroes_padding_and_halves_lengths() -> None:
    torch.manual_seed(0)
    stack = PyramidalBiLSTM(6, 5, [False, True]).eval()
    x, lengths = padded_batch([23, 9, 17, 2])
    with torch.no_grad():
        out, out_lens = stack(x, lengths)
    assert out.shape == (4, x.shape[1] // 2, 10)
    assert out_lens.tolist() == [11, 4, 8, 1]
    assert torch.equal(out_lens, stack.output_lengths(lengths))
    assert (out[~lengths_to_mask(out_lens, out.shape[1])] == 0).all()


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
