"""x4 time subsampling in front of recurrent encoders: a 2-layer strided conv, or frame stacking.

Neither pads in time, so output frame t depends only on input frames
[t * stride, t * stride + receptive_field): a streaming caller that buffers feature frames and
feeds complete windows gets exactly the offline output (see `SubsamplingStream`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

SubsamplingKind = Literal["conv2d", "stack"]


class Subsampling(nn.Module):
    """(B, T, F) features -> (B, T', D) with T' = (T - receptive_field) // 4 + 1."""

    stride = 4

    def __init__(
        self, kind: SubsamplingKind, input_dim: int, output_dim: int, channels: int = 32
    ) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv2d":
            # Two 3x3 stride-2 convs: 7 input frames per output frame.
            self.receptive_field = 7
            self.conv: nn.Module = nn.Sequential(
                nn.Conv2d(1, channels, 3, stride=2),
                nn.ReLU(),
                nn.Conv2d(channels, channels, 3, stride=2),
                nn.ReLU(),
            )
            freq = ((input_dim - 3) // 2 + 1 - 3) // 2 + 1
            self.out = nn.Linear(channels * freq, output_dim)
        elif kind == "stack":
            self.receptive_field = 4
            self.conv = nn.Identity()
            self.out = nn.Linear(4 * input_dim, output_dim)
        else:
            raise ValueError(f"unknown subsampling {kind!r}; choose conv2d or stack")

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Valid output frames for (B,) valid input frames."""
        return ((lengths - self.receptive_field).div(self.stride, rounding_mode="floor") + 1).clamp(
            min=0
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, F), lengths: (B,) -> (B, T', D), (B,)."""
        batch, frames, _ = x.shape
        out_frames = max((frames - self.receptive_field) // self.stride + 1, 0)
        if out_frames == 0:  # shorter than one window (the conv would refuse the input)
            return x.new_zeros(batch, 0, self.out.out_features), self.output_lengths(lengths)
        if self.kind == "conv2d":
            y = self.conv(x.unsqueeze(1))  # (B, C, T', F')
            y = y.transpose(1, 2).flatten(2)  # (B, T', C * F')
        else:
            y = x[:, : out_frames * self.stride].reshape(batch, out_frames, -1)  # (B, T', 4F)
        return self.out(y), self.output_lengths(lengths)


class SubsamplingStream:
    """Feeds a `Subsampling` chunk by chunk; outputs concatenate to the offline output."""

    def __init__(self, module: Subsampling) -> None:
        self.module = module
        self._buffer: torch.Tensor | None = None  # (1, T_buffered, F)

    def outputs_after(self, frames: int) -> int:
        """The output frames `accept` would return given `frames` more input frames."""
        buffered = (0 if self._buffer is None else self._buffer.shape[1]) + frames
        return max((buffered - self.module.receptive_field) // self.module.stride + 1, 0)

    def accept(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: (1, T, F) new frames -> (1, T', D) newly complete output frames."""
        return accept_subsampled([self], [feats])[0]


def accept_subsampled(
    streams: Sequence[SubsamplingStream], feats: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """`streams[i].accept(feats[i])` for every stream (all of one module), the windows of all
    of them through the module in one batched call: rows are zero-padded at the end, and an
    output frame sees only its own window, so padding changes no frame (the batched conv
    and matrix products round ~1e-7 differently)."""
    if len(streams) != len(feats):
        raise ValueError(f"accept_subsampled: {len(streams)} streams, {len(feats)} chunks")
    if not streams:
        return []
    module = streams[0].module
    if any(s.module is not module for s in streams):
        raise ValueError("accept_subsampled: every stream must run the same module")
    window, stride = module.receptive_field, module.stride
    buffers = [
        x if s._buffer is None else torch.cat([s._buffer, x], dim=1)
        for s, x in zip(streams, feats, strict=True)
    ]  # (1, T_i, F)
    counts = [max((b.shape[1] - window) // stride + 1, 0) for b in buffers]
    out = [buffers[i].new_zeros(1, 0, module.out.out_features) for i in range(len(streams))]
    due = [i for i, n in enumerate(counts) if n]
    if due:
        used = [(counts[i] - 1) * stride + window for i in due]
        windows = [buffers[i][0, :n] for i, n in zip(due, used, strict=True)]  # (n, F)
        outputs, _ = module(pad_sequence(windows, batch_first=True), torch.tensor(used))
        for row, i in enumerate(due):  # a copy: a view would keep the whole batch alive
            own = outputs[row : row + 1, : counts[i]]
            out[i] = own if len(due) == 1 else own.clone()
    for s, buffer, n in zip(streams, buffers, counts, strict=True):
        s._buffer = buffer[:, n * stride :]  # overlap of later windows
    return out
