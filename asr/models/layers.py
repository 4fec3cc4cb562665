"""Recurrent building blocks: masks, pyramidal BiLSTM, location-aware attention.

Length convention: every module that changes the frame rate also maps (B,) valid lengths, and
outputs beyond a row's valid length are never read downstream, so an utterance gives the same
result alone as in a padded batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from asr.masks import lengths_to_mask as lengths_to_mask  # re-exported: its home until it moved


def stack_frame_pairs(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Halve the frame rate by concatenating frames 2i and 2i+1 (Chan et al. 2016, pBLSTM).

    x: (B, T, D), lengths: (B,) -> (B, T // 2, 2D), lengths // 2. An odd final frame is dropped
    (at most one 1/rate interval of trailing audio, normally silence); padding it instead would
    give the last output a half-real, half-zero input that differs from every other frame.
    """
    batch, frames, dim = x.shape
    pairs = frames // 2
    return (
        x[:, : 2 * pairs].reshape(batch, pairs, 2 * dim),
        lengths.div(2, rounding_mode="floor"),
    )


def reversal_index(lengths: torch.Tensor, frames: int, device: torch.device) -> torch.Tensor:
    """(B, T) time index that reverses each row's first lengths[b] frames and leaves padding in
    place; an involution, so the same index also undoes the reversal."""
    t = torch.arange(frames, device=device)  # (T,)
    ends = lengths.to(device).unsqueeze(1)  # (B, 1)
    return torch.where(t < ends, ends - 1 - t, t)


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first lengths[b] frames in time, leaving padding in place.

    x: (B, T, D), lengths: (B,) -> (B, T, D). Its own inverse.
    """
    index = reversal_index(lengths, x.shape[1], x.device)  # (B, T)
    return x.gather(1, index.unsqueeze(2).expand_as(x))


class BiLSTM(nn.Module):
    """One bidirectional LSTM layer over padded batches, exact for every row's own length.

    The forward direction runs on the padded batch as is (trailing padding cannot reach earlier
    outputs); the backward direction runs forward over each row reversed within its length.
    This replaces `pack_padded_sequence`, whose CPU backward pass zero-fills the whole packed
    gradient at every time step: O(T^2), 3-11x slower than this at 100-400 frames.

    (B, T, D), lengths (B,) -> (B, T, 2H), zero beyond each row's length.
    """

    def __init__(self, input_dim: int, hidden: int) -> None:
        super().__init__()
        self.forward_rnn = nn.LSTM(input_dim, hidden, batch_first=True)
        self.backward_rnn = nn.LSTM(input_dim, hidden, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        ahead, _ = self.forward_rnn(x)  # (B, T, H)
        behind, _ = self.backward_rnn(reverse_padded(x, lengths))  # (B, T, H), reversed time
        out = torch.cat([ahead, reverse_padded(behind, lengths)], dim=2)  # (B, T, 2H)
        return out * lengths_to_mask(lengths.to(x.device), x.shape[1]).unsqueeze(2).to(out.dtype)


class PyramidalBiLSTM(nn.Module):
    """A stack of BiLSTM layers; layer i first halves the frame rate when `reduce[i]` is set.

    (B, T, input_dim) -> (B, T', 2 * hidden), each reduction mapping lengths to lengths // 2
    and T to T // 2. Outputs are zero beyond each row's length. Dropout follows every layer.
    """

    def __init__(
        self, input_dim: int, hidden: int, reduce: Sequence[bool], dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.reduce = tuple(reduce)
        self.layers = nn.ModuleList()
        dim = input_dim
        for halve in self.reduce:
            self.layers.append(BiLSTM(2 * dim if halve else dim, hidden))
            dim = 2 * hidden
        self.output_dim = dim
        self.dropout = nn.Dropout(dropout)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for halve in self.reduce:
            if halve:
                lengths = lengths.div(2, rounding_mode="floor")
        return lengths

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D), lengths: (B,) -> (B, T', 2H), (B,)."""
        out, out_lens, _, _ = self.forward_tap(x, lengths, len(self.layers))
        return out, out_lens

    def forward_tap(
        self, x: torch.Tensor, lengths: torch.Tensor, tap: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward`, plus the output and lengths of layer `tap` (1-based) on the way."""
        tapped, tapped_lens = x, lengths
        for i, (halve, layer) in enumerate(zip(self.reduce, self.layers, strict=True), start=1):
            if halve:
                x, lengths = stack_frame_pairs(x, lengths)  # (B, T/2, 2D)
            x = self.dropout(layer(x, lengths))  # (B, T, 2H)
            if i == tap:
                tapped, tapped_lens = x, lengths
        return x, lengths, tapped, tapped_lens


class LocationAwareAttention(nn.Module):
    """Additive attention with location features (Chorowski et al. 2015, ESPnet's AttLoc).

    e_{t,j} = w^T tanh(W s_t + V h_j + U (F * a_{t-1})_j + b);  a_t = softmax_j(e_t) over valid
    frames;  c_t = sum_j a_{t,j} h_j. The convolution F over the previous weights lets the
    score depend on where the model attended last, which keeps the alignment moving forward
    monotonically and stops it from jumping between similar-sounding frames.

    `V h_j + b` does not depend on the decoder step, so callers compute `keys(memory)` once per
    utterance and pass it to every step.
    """

    def __init__(
        self,
        query_dim: int,
        memory_dim: int,
        attention_dim: int,
        location_channels: int,
        location_kernel: int,
    ) -> None:
        super().__init__()
        if location_kernel % 2 == 0:
            raise ValueError(f"location_kernel must be odd (centred filter), got {location_kernel}")
        self.key = nn.Linear(memory_dim, attention_dim)  # V, b
        self.query = nn.Linear(query_dim, attention_dim, bias=False)  # W
        # Zero padding of the conv matches the zero weights on padded frames, so a batched
        # utterance sees the same location features as it does alone.
        self.location_conv = nn.Conv1d(
            1, location_channels, location_kernel, padding=location_kernel // 2, bias=False
        )  # F
        self.location = nn.Linear(location_channels, attention_dim, bias=False)  # U
        self.score = nn.Linear(attention_dim, 1, bias=False)  # w; a bias would cancel in softmax

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """memory: (B, T, D) -> precomputed V h + b: (B, T, A)."""
        return self.key(memory)

    def forward(
        self,
        query: torch.Tensor,  # (N, Q) decoder state s_t
        memory: torch.Tensor,  # (N, T, D) encoder output h
        keys: torch.Tensor,  # (N, T, A) from `keys(memory)`
        mask: torch.Tensor,  # (N, T) bool, True on valid frames; every row has one
        previous: torch.Tensor,  # (N, T) a_{t-1}, zero on padding
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> context c_t (N, D), weights a_t (N, T) (zero on padding, sum 1 per row)."""
        location = self.location_conv(previous.unsqueeze(1)).transpose(1, 2)  # (N, T, C)
        energy = torch.tanh(
            keys + self.location(location) + self.query(query).unsqueeze(1)
        )  # (N, T, A)
        scores = self.score(energy).squeeze(2).float()  # (N, T); float32 softmax under AMP
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=1).to(memory.dtype)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)  # (N, D)
        return context, weights
