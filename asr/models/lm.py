"""LSTM language model over the acoustic models' sentencepiece units (Mikolov et al. 2010;
Sundermeyer et al. 2012), for shallow fusion in beam search.

Same tokenizer as the acoustic models, so fusion is token-synchronous: every search step asks
the LM for log P(next unit | units so far). A sentence is scored as sos y1 .. yU -> y1 .. yU eos
(one symbol for sos and eos, id 2, as the attention decoder uses). Blank (id 0) is never a
target and gets no probability.

Presets: `cpu-small` trains in minutes on a 2-core machine over the synthetic corpus' text;
`librispeech` is sized like the RNN LMs of ESPnet (2 x 1024-2048 LSTM) and icefall (3 x 2048,
tied embeddings) for librispeech-lm-norm.txt on GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from asr.config import Config
from asr.models.base import ModelOutput
from asr.quantize import check_quantization, quantize_model
from asr.tokenizer import BLANK_ID, SOS_EOS_ID

IGNORE = -100  # padding in LM targets (cross_entropy's ignore_index)


@dataclass(frozen=True)
class LSTMLMConfig(Config):
    vocab_size: int = 128
    embed_dim: int = 512
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.2
    # Share the output layer with the input embedding (Press & Wolf 2017; needs
    # embed_dim == hidden_size): fewer parameters and usually lower perplexity.
    tie_embeddings: bool = True

    def validate(self) -> None:
        self.check(
            {
                "vocab_size": (self.vocab_size > SOS_EOS_ID, f"> {SOS_EOS_ID}"),
                "embed_dim": (self.embed_dim >= 1, ">= 1"),
                "hidden_size": (self.hidden_size >= 1, ">= 1"),
                "num_layers": (self.num_layers >= 1, ">= 1"),
                "dropout": (0.0 <= self.dropout < 1.0, "in [0, 1)"),
                "tie_embeddings": (
                    not self.tie_embeddings or self.embed_dim == self.hidden_size,
                    "false unless embed_dim == hidden_size",
                ),
            }
        )


PRESETS: dict[str, LSTMLMConfig] = {
    # 2 x 256: an epoch of the synthetic recipe's 2,234 sentences (200 k units) is about a
    # minute on one core of the 2-core machine (2 x 512 managed 1,200 units/s there).
    "cpu-small": LSTMLMConfig(embed_dim=256, hidden_size=256, num_layers=2, dropout=0.2),
    "librispeech": LSTMLMConfig(
        embed_dim=2048, hidden_size=2048, num_layers=3, dropout=0.1, tie_embeddings=True
    ),
}


@dataclass
class LMState:
    """The LSTM state of N prefixes and their next-unit log-probabilities."""

    h: torch.Tensor  # (L, N, H)
    c: torch.Tensor  # (L, N, H)
    log_probs: torch.Tensor  # (N, V) log P(next unit | prefix)


class LMStep(Protocol):
    """A unit LM stepped one unit at a time for a search: `LSTMLM.stepper()`, or an attention
    decoder's internal LM (`asr.models.las.InternalLM`)."""

    def init_state(self, n: int, device: torch.device | str = "cpu") -> LMState:
        """N empty prefixes: the state after sos."""
        ...

    def __call__(self, state: LMState | None, tokens: torch.Tensor) -> LMState:
        """Append tokens (N,) to the N prefixes of `state` (None: fresh prefixes)."""
        ...


class LSTMLM(nn.Module):
    """Embedding -> N-layer LSTM -> output layer over the units.

    Training: `forward(tokens (B, U), lengths (B,))` -> ModelOutput with the mean per-unit
    negative log-likelihood (eos included) as loss. Search: `init_state(n)` then
    `step(state, tokens (N,))`, one unit per prefix at a time.
    """

    def __init__(self, config: LSTMLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.out = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_embeddings:
            self.out.weight = self.embed.weight
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        # Made once, not at every search step; not a weight, so not in the state dict.
        self.register_buffer("_blank", torch.tensor([BLANK_ID]), persistent=False)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.out(self.dropout(hidden))
        # Blank is a CTC symbol, never a unit of text.
        return logits.index_fill(-1, self._blank, -math.inf)

    @staticmethod
    def _shifted(tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Inputs sos y1 .. yU, targets y1 .. yU eos, both (B, U + 1), and where they are
        valid (B, U + 1); padding positions hold 0."""
        batch, width = tokens.shape
        lengths = lengths.to(tokens.device)
        sos = torch.full((batch, 1), SOS_EOS_ID, dtype=torch.long, device=tokens.device)
        valid = torch.arange(width + 1, device=tokens.device)[None] <= lengths[:, None]
        inputs = torch.cat([sos, tokens], dim=1).masked_fill(~valid, 0)
        targets = torch.cat([tokens, sos], dim=1).scatter(1, lengths[:, None], SOS_EOS_ID)
        return inputs, targets.masked_fill(~valid, 0), valid

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> ModelOutput:
        """tokens (B, U) unit ids (padding anything), lengths (B,) units per sentence."""
        inputs, targets, valid = self._shifted(tokens, lengths)
        hidden, _ = self.lstm(self.dropout(self.embed(inputs)))
        logits = self._logits(hidden)
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.masked_fill(~valid, IGNORE).reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        count = int(valid.sum())
        return ModelOutput(
            loss=nll / max(count, 1),
            log_probs=None,
            out_lens=valid.sum(dim=1),
        )

    @torch.no_grad()
    def sentence_log_probs(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """log P(y1 .. yU eos) of each of B sentences (B,); call in eval mode."""
        inputs, targets, valid = self._shifted(tokens, lengths)
        hidden, _ = self.lstm(self.embed(inputs))
        log_probs = self._logits(hidden).float().log_softmax(dim=-1)
        picked = log_probs.gather(2, targets[..., None])[..., 0]
        return picked.masked_fill(~valid, 0.0).sum(dim=1)

    def init_state(self, n: int, device: torch.device | str = "cpu") -> LMState:
        """N empty prefixes: the state after sos."""
        return self.step(None, torch.full((n,), SOS_EOS_ID, dtype=torch.long, device=device))

    @torch.no_grad()
    def step(self, state: LMState | None, tokens: torch.Tensor) -> LMState:
        """Append tokens (N,) to the N prefixes of `state` (None: fresh prefixes)."""
        x = self.embed(tokens)[:, None]  # (N, 1, E)
        hc = None if state is None else (state.h, state.c)
        hidden, (h, c) = self.lstm(x, hc)
        return LMState(h, c, self._logits(hidden[:, 0]).log_softmax(dim=-1).float())

    def stepper(self, quantize: str = "none") -> LMStepper:
        """`step` for search, on a snapshot of the weights (build it after training); with
        `quantize="int8"` its matrix products run on int8 weights (`asr.quantize`)."""
        return LMStepper(self, quantize)


class _Dense:
    """x @ W.T + (b or `add`) in float, W laid out once for `torch.addmm`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight_t = weight.T.contiguous()  # (in, out)
        self.bias = bias

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        base = self.bias if add is None else add
        return x @ self.weight_t if base is None else torch.addmm(base, x, self.weight_t)


class _Int8:
    """The same product through torch's dynamically quantized Linear (int8 weights,
    activations quantized per call): about 1.9x faster than `_Dense` for a few dozen
    prefixes of a 2 x 256 LM's second layer on the 2-core machine (2026-12-06)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        # Dynamic quantization swaps a module's children, not the module itself.
        self.linear = quantize_model(nn.Sequential(linear), "int8")

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out if add is None else out + add


_PRODUCTS: dict[str, type[_Dense] | type[_Int8]] = {"none": _Dense, "int8": _Int8}


class LMStepper:
    """`LSTMLM.step` for beam search: the same function, 2-3x faster on CPU.

    A search steps the LM one unit at a time for a few dozen prefixes, where `nn.LSTM` costs
    more than its arithmetic (on the 2-core machine 5.0 ms for 40 prefixes of the 2 x 256
    cpu-small LM, against 2.0 ms here: its oneDNN path prepares the weights on every call).
    Here each layer is one matrix product with weights laid out once: the first layer's input
    gates of every unit are a table (the embedding times W_ih, plus both biases), the others
    multiply [x, h] by [W_ih, W_hh] stacked. Results equal `step`'s up to float rounding;
    with `quantize="int8"` the products (not the table) use int8 weights, which changes the
    log-probs by about 1e-2 and speeds the step up 1.3-1.5x (bench/lm_fusion.py).
    """

    def __init__(self, model: LSTMLM, quantize: str = "none") -> None:
        check_quantization(quantize, model.embed.weight.device)
        product = _PRODUCTS[quantize]
        lstm = model.lstm
        with torch.no_grad():
            weights = [
                [getattr(lstm, f"{name}_l{k}").detach() for name in _LSTM_PARAMS]
                for k in range(lstm.num_layers)
            ]
            w_ih, w_hh, b_ih, b_hh = weights[0]
            self.table = model.embed.weight @ w_ih.T + b_ih + b_hh  # (V, 4H)
            self.first = product(w_hh, None)  # (H -> 4H), added to the table's row
            self.stacked = [
                product(torch.cat([w_ih, w_hh], dim=1), b_ih + b_hh)
                for w_ih, w_hh, b_ih, b_hh in weights[1:]
            ]  # (2H -> 4H) for each layer above the first
            self.out = product(model.out.weight.detach(), model.out.bias.detach())
        self.layers = lstm.num_layers
        self.hidden = lstm.hidden_size

    def init_state(self, n: int, device: torch.device | str = "cpu") -> LMState:
        """N empty prefixes: the state after sos."""
        return self(None, torch.full((n,), SOS_EOS_ID, dtype=torch.long, device=device))

    @torch.no_grad()
    def __call__(self, state: LMState | None, tokens: torch.Tensor) -> LMState:
        """Append tokens (N,) to the N prefixes of `state` (None: fresh prefixes)."""
        n = tokens.shape[0]
        if state is None:
            zeros = self.table.new_zeros(self.layers, n, self.hidden)
            state = LMState(zeros, zeros, self.table.new_empty(n, 0))
        hs, cs = [], []
        x = self.table[tokens]  # layer 1's input gates (N, 4H)
        for k in range(self.layers):
            if k == 0:
                gates = self.first(state.h[0], add=x)
            else:
                gates = self.stacked[k - 1](torch.cat([x, state.h[k]], dim=1))
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * state.c[k] + torch.sigmoid(i) * torch.tanh(g)
            x = torch.sigmoid(o) * torch.tanh(c)
            hs.append(x)
            cs.append(c)
        logits = self.out(x)
        logits[:, BLANK_ID] = -math.inf  # blank is a CTC symbol, never a unit of text
        return LMState(torch.stack(hs), torch.stack(cs), logits.log_softmax(dim=-1).float())


_LSTM_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
