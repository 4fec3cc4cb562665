"""Recurrent building blocks: a padding-exact bidirectional RNN, pyramidal BiLSTM, location-aware
attention.

Length convention: every module that changes the frame rate also maps (B,) valid lengths, and
outputs beyond a row's valid length are never read downstream, so an utterance gives the same
result alone as in a padded batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from asr.masks import lengths_to_mask as lengths_to_mask  # re-exported: its home until it moved

RNNType = Literal["lstm", "gru"]


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


def _run_rnn(
    rnn: nn.LSTM | nn.GRU, x: torch.Tensor, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, W, D), state: (S, B, H) or None (zeros) -> output (B, W, H), final state (S, B, H).

    S = 2 for an LSTM (h, c) and 1 for a GRU (h); one tensor shape for both keeps the carried
    LC state a single (L, S, B, H) tensor.
    """
    # `mode`, not isinstance: int8 models (asr.quantize) hold torch's dynamically quantized
    # LSTM, which is not an nn.LSTM subclass.
    if rnn.mode == "LSTM":
        hx = None if state is None else (state[0:1], state[1:2])
        out, (h, c) = rnn(x, hx)
        return out, torch.cat([h, c])
    out, h = rnn(x, state)
    return out, h


# Parameter names before the two models shared `BiRNN`: the LAS listener's BiLSTM called its
# directions forward_rnn/backward_rnn. Bundles and checkpoints saved then still load.
_LEGACY_NAMES = {"forward_rnn.": "fwd.", "backward_rnn.": "bwd."}


def _rename_legacy_keys(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """Load-state-dict pre-hook: rename this module's old parameter names in place."""
    for key in list(state_dict):
        for old, new in _LEGACY_NAMES.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old) :]] = state_dict.pop(key)


def upgrade_keys(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` with the old parameter names of `model`'s BiRNN layers renamed, as
    `load_state_dict` does through the pre-hook: for code that matches names itself first
    (`asr.training.checkpoint.transfer`)."""
    renamed = dict(weights)
    for name, module in model.named_modules():
        if isinstance(module, BiRNN):
            _rename_legacy_keys(module, renamed, f"{name}." if name else "")
    return renamed


class BiRNN(nn.Module):
    """One bidirectional LSTM/GRU layer over padded batches, exact for every row's own length,
    optionally followed by a projection of its concatenated output (ESPnet's "BLSTMP").

    The two directions are separate unidirectional RNNs, so that in a latency-controlled block
    the forward one can carry its state to the next block while the backward one starts afresh.
    The forward direction runs on the padded batch as is (it is causal and padding only follows
    valid frames); the backward direction runs forward over each row reversed within its
    length, so there too padding comes after the valid frames. Outputs beyond a row's length
    hold garbage that never reaches valid ones; callers needing zeros there mask them.

    This replaces `pack_padded_sequence`, whose CPU backward pass zero-fills the whole packed
    gradient at every time step: O(T^2), 3-11x slower than this at 100-400 frames (~5x on the
    cpu-small BiLSTM-CTC), a price the few padded frames left by the length-bucketing sampler
    do not justify.
    """

    fwd: nn.LSTM | nn.GRU
    bwd: nn.LSTM | nn.GRU

    def __init__(
        self, input_dim: int, hidden: int, rnn_type: RNNType = "lstm", projection: int = 0
    ) -> None:
        super().__init__()
        rnn: type[nn.LSTM | nn.GRU] = nn.LSTM if rnn_type == "lstm" else nn.GRU
        self.fwd = rnn(input_dim, hidden, batch_first=True)
        self.bwd = rnn(input_dim, hidden, batch_first=True)
        self.proj: nn.Module = nn.Linear(2 * hidden, projection) if projection else nn.Identity()
        self.output_dim = projection or 2 * hidden
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        state: torch.Tensor | None = None,
        carry: int | None = None,
        context_outputs: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D), lengths: (B,) valid frames (0 allowed) -> (B, T, P or 2H) and the
        forward state (S, B, H) after the first `carry` frames (None: all T).

        state: (S, B, H) forward state to start from (None: zeros); S = 2 for an LSTM (h, c),
        1 for a GRU. Frames after `carry` are an LC block's right context: the forward
        direction continues over them from the state after `carry` but does not return it.
        A row's returned state is stale if it ended before `carry`; it has no valid frames
        after that, so nothing valid reads it. Without `context_outputs` only the first
        `carry` frames' outputs are returned, (B, min(T, carry), P or 2H), the same values:
        the right context then still steers the backward direction, but the forward one
        does not run over it (an LC stack's top layer, whose context outputs nobody reads).
        """
        frames = x.shape[1]
        split = frames if carry is None else carry
        ahead, state = _run_rnn(self.fwd, x[:, :split], state)  # (B, min(T, carry), H)
        if frames > split and context_outputs:  # continue from the carried state, not carried
            context, _ = _run_rnn(self.fwd, x[:, split:], state)
            ahead = torch.cat([ahead, context], dim=1)  # (B, T, H)
        reverse = reversal_index(lengths, frames, x.device)[:, :, None]  # (B, T, 1)
        behind, _ = _run_rnn(self.bwd, x.gather(1, reverse.expand(-1, -1, x.shape[2])), None)
        behind = behind.gather(1, reverse.expand(-1, -1, behind.shape[2]))  # forward time again
        behind = behind[:, : ahead.shape[1]]
        return self.proj(torch.cat([ahead, behind], dim=2)), state  # (B, T, P or 2H)


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
            self.layers.append(BiRNN(2 * dim if halve else dim, hidden))
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
            x, _ = layer(x, lengths)  # (B, T, 2H)
            # Zero rather than BiRNN's garbage beyond each length: the listener promises it.
            valid = lengths_to_mask(lengths.to(x.device), x.shape[1]).unsqueeze(2)  # (B, T, 1)
            x = self.dropout(x * valid.to(x.dtype))
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
