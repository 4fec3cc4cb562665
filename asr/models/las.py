"""Listen, Attend and Spell (Chan et al. 2016) with location-aware attention and joint CTC.

Listener: BiLSTM layers with x8 time reduction, either three pyramidal layers over the features
(the paper's pBLSTM) or a x4 strided conv followed by BiLSTMs with one pyramidal x2 step (cheaper:
only the conv sees the 10 ms frame rate). Speller: an LSTM stack with input feeding and
location-aware attention (Chorowski et al. 2015). An optional CTC head on the listener output
(Kim et al. 2017) speeds up alignment learning and gives the beam search a second score.

Tokens: blank = 0 is CTC's only; sos and eos share id 2. `forward` takes targets without either
and adds them itself: decoder input [sos, y_1..y_U], decoder output [y_1..y_U, eos].

The interface the attention beam search uses (and nothing else):

    enc = model.encode(feats, feat_lens)          # EncoderOutput, rows = utterances
    enc = enc.select(rows)                        # rows (N,): the utterance of each hypothesis
    state = model.init_state(enc)                 # DecoderState for N = B * beam rows
    log_probs, state = model.step(enc, state, tokens)  # tokens (N,): previous token, sos first
    state = state.select(indices)                 # reorder/gather rows after re-ranking

`step` reproduces the teacher-forced forward pass exactly (in eval mode): feeding sos, y_1, ...
gives at position u the log-probs the training loss scores for y_{u+1} (or eos).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from asr.config import Config
from asr.models.base import ATTENTION, CTC, ModelOutput, NormalizesInput
from asr.models.ctc import ctc_loss
from asr.models.layers import LocationAwareAttention, PyramidalBiLSTM, lengths_to_mask
from asr.models.lm import LMState
from asr.models.subsampling import Subsampling
from asr.tokenizer import BLANK_ID, SOS_EOS_ID

ListenerKind = Literal["pyramid", "conv-pyramid"]
_MIN_LISTENER_LAYERS: dict[str, int] = {"pyramid": 3, "conv-pyramid": 2}


@dataclass(frozen=True)
class LASConfig(Config):
    """Everything needed to rebuild a `LAS` model; stored in checkpoints and bundles.

    listener: "pyramid": `listener_layers - 3` plain BiLSTM layers, then 3 pyramidal ones (each
        concatenates frame pairs). "conv-pyramid": x4 conv subsampling, then `listener_layers`
        BiLSTM layers, the second of which first concatenates frame pairs. Both reduce time x8.
    listener_hidden: cells per direction; the listener outputs 2 * listener_hidden.
    location_channels, location_kernel: filters over the previous attention weights (odd width).
    label_smoothing: mass spread uniformly over the vocabulary in the attention loss.
    scheduled_sampling: per-step probability of feeding back the model's own argmax instead of
        the reference token during training (0 = teacher forcing). A trainer that ramps it up
        sets `LAS.scheduled_sampling`.
    ctc_weight: loss = (1 - w) * attention + w * CTC; 0 removes the CTC head, 1 trains CTC only
        (the speller then gets no gradient: DDP needs find_unused_parameters).
    ctc_layer: the listener layer (1-based) the CTC head reads; None: the last. A shallower
        layer runs at a higher frame rate and is less shaped by the attention decoder.
    ctc_upsample: CTC frames the head predicts from each frame of its layer (1, 2, 4 or 8). CTC
        needs at least one frame per token (two between repeats); small subword vocabularies
        give ~10 tokens/s against the listener's 12.5 frames/s, so such a model's head either
        reads the full-depth 80 ms memory and emits 40 ms frames (2; Libovicky & Helcl 2018
        upsample the same way) or reads a 40 ms layer.
    """

    vocab_size: int  # including the reserved ids 0-2 (blank, unk, sos/eos)
    input_dim: int = 80
    listener: ListenerKind = "conv-pyramid"
    listener_hidden: int = 256
    listener_layers: int = 3
    dropout: float = 0.1
    attention_dim: int = 256
    location_channels: int = 10
    location_kernel: int = 31
    speller_hidden: int = 320
    speller_layers: int = 1
    embedding_dim: int = 128
    label_smoothing: float = 0.1
    scheduled_sampling: float = 0.0
    ctc_weight: float = 0.3
    ctc_layer: int | None = None
    ctc_upsample: int = 1

    def validate(self) -> None:
        positive = (
            "input_dim",
            "listener_hidden",
            "attention_dim",
            "location_channels",
            "speller_hidden",
            "speller_layers",
            "embedding_dim",
        )
        conv = self.listener == "conv-pyramid"
        min_layers = _MIN_LISTENER_LAYERS.get(self.listener, 1)
        reserved = SOS_EOS_ID + 1
        self.check(
            {
                "vocab_size": (
                    self.vocab_size > reserved,
                    f"> {reserved} (ids 0-{SOS_EOS_ID} are reserved)",
                ),
            }
            | {name: (getattr(self, name) >= 1, ">= 1") for name in positive}
            | {
                "listener_layers": (
                    self.listener_layers >= min_layers,
                    f">= {min_layers} for listener {self.listener!r}",
                ),
                "location_kernel": (
                    self.location_kernel >= 1 and self.location_kernel % 2 == 1,
                    "odd and >= 1 (a centred filter)",
                ),
            }
            | {
                name: (0.0 <= getattr(self, name) < 1.0, "in [0, 1)")
                for name in ("dropout", "label_smoothing")
            }
            | {
                name: (0.0 <= getattr(self, name) <= 1.0, "in [0, 1]")
                for name in ("scheduled_sampling", "ctc_weight")
            }
        )
        # Rules over fields checked above.
        layer = self.ctc_layer
        self.check(
            {
                "input_dim": (
                    not conv or self.input_dim >= 7,
                    ">= 7 for the conv listener (two 3x3 stride-2 convs)",
                ),
                "ctc_layer": (
                    layer is None or 1 <= layer <= self.listener_layers,
                    f"None or a listener layer, 1 to {self.listener_layers}",
                ),
            }
        )
        reduction = listener_reduction(self, layer or self.listener_layers)
        self.check(
            {
                "ctc_upsample": (
                    self.ctc_upsample in (1, 2, 4, 8) and reduction % self.ctc_upsample == 0,
                    f"1, 2, 4 or 8 and a divisor of its layer's x{reduction}",
                )
            }
        )


def listener_pyramid(config: LASConfig) -> tuple[int, list[bool]]:
    """(front-end time reduction, whether each BiLSTM layer first halves the frame rate)."""
    layers = config.listener_layers
    if config.listener == "pyramid":
        return 1, [False] * (layers - 3) + [True] * 3
    # The first BiLSTM runs at 40 ms so the pyramid step merges learnt features rather than
    # raw conv outputs (which would just be a wider conv stride).
    return 4, [False, True] + [False] * (layers - 2)


def listener_reduction(config: LASConfig, layer: int) -> int:
    """Feature frames per output frame of listener layer `layer` (1-based)."""
    front, reduce = listener_pyramid(config)
    return front * 2 ** sum(reduce[:layer])


# Presets fill numbers only; set vocab_size from the tokenizer with `dataclasses.replace`.
PRESETS: dict[str, LASConfig] = {
    # Park et al. 2019 LAS-4-1024 sizes (conv front end, 4 x 1024 BiLSTM, 2 x 1024 speller),
    # with ESPnet's joint CTC/attention and 5k subwords.
    "librispeech-960h": LASConfig(
        vocab_size=5000,
        listener="conv-pyramid",
        listener_hidden=1024,
        listener_layers=4,
        dropout=0.2,
        attention_dim=1024,
        location_channels=10,
        location_kernel=51,
        speller_hidden=1024,
        speller_layers=2,
        embedding_dim=512,
    ),
    # A quarter of the width for a tenth of the data; more dropout since 100 h overfits.
    "librispeech-100h": LASConfig(
        vocab_size=1000,
        listener="conv-pyramid",
        listener_hidden=512,
        listener_layers=4,
        dropout=0.3,
        attention_dim=512,
        location_channels=10,
        location_kernel=31,
        speller_hidden=512,
        speller_layers=2,
        embedding_dim=256,
    ),
    # Small enough to train on 1-2 h of audio on a laptop CPU within an hour. A pyramid
    # listener rather than conv-pyramid: on the synthetic corpus the conv front end held the
    # CTC head on its blank plateau (loss 150 after 100 memorisation steps, against 0.05).
    # Its CTC head stays at 80 ms: from scratch with ctc_upsample=2 the CTC loss fell fast but
    # the attention had not learnt to align after 4 of 8 epochs (recipes/synthetic/README.md);
    # the synthetic LAS got its 40 ms head by fine-tuning (asr train --init).
    "cpu-small": LASConfig(
        vocab_size=256,
        listener="pyramid",
        listener_hidden=192,
        listener_layers=3,
        dropout=0.1,
        attention_dim=128,
        location_channels=10,
        location_kernel=31,
        speller_hidden=256,
        speller_layers=1,
        embedding_dim=64,
    ),
}


@dataclass
class EncoderOutput:
    """Listener output for a batch, plus what every decoder step reuses."""

    memory: torch.Tensor  # (B, T', D) listener output h
    lengths: torch.Tensor  # (B,) valid frames of memory
    ctc_log_probs: torch.Tensor | None  # (B, T_ctc, V) float32; None without a head
    ctc_lengths: torch.Tensor  # (B,) valid frames of ctc_log_probs
    keys: torch.Tensor  # (B, T', A) attention keys V h + b, computed once per utterance
    mask: torch.Tensor  # (B, T') bool, True on valid frames

    def repeat_interleave(self, beam: int) -> EncoderOutput:
        """Each row `beam` times in a row: (B, ...) -> (B * beam, ...), row b * beam + k."""
        rows = torch.arange(self.lengths.shape[0], device=self.lengths.device)
        return self.select(rows.repeat_interleave(beam))

    def select(self, rows: torch.Tensor) -> EncoderOutput:
        """Rows `rows` (N,) of this output, in that order (repeats allowed) -> N rows."""
        return EncoderOutput(
            memory=self.memory.index_select(0, rows),
            lengths=self.lengths.index_select(0, rows),
            ctc_log_probs=None
            if self.ctc_log_probs is None
            else self.ctc_log_probs.index_select(0, rows),
            ctc_lengths=self.ctc_lengths.index_select(0, rows),
            keys=self.keys.index_select(0, rows),
            mask=self.mask.index_select(0, rows),
        )


@dataclass
class DecoderState:
    """Speller state after consuming some prefix, one row per hypothesis."""

    hidden: torch.Tensor  # (L, N, H) LSTM h
    cell: torch.Tensor  # (L, N, H) LSTM c
    context: torch.Tensor  # (N, D) last attention context, fed back as input (input feeding)
    attention: torch.Tensor  # (N, T') last attention weights (location features; alignments)

    def select(self, indices: torch.Tensor) -> DecoderState:
        """Rows `indices` (N',) of this state, in that order -> a state with N' rows."""
        return DecoderState(
            hidden=self.hidden.index_select(1, indices),
            cell=self.cell.index_select(1, indices),
            context=self.context.index_select(0, indices),
            attention=self.attention.index_select(0, indices),
        )


def add_sos_eos(
    targets: torch.Tensor, target_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """targets (B, U) padded with anything beyond target_lens (B,) -> decoder input and output.

    Returns ys_in (B, U' + 1) = [sos, y_1..y_n, eos...] (padding filled with eos, a valid
    embedding index whose outputs are ignored) and ys_out (B, U' + 1) = [y_1..y_n, eos, -1...],
    with U' = max(target_lens).
    """
    width = int(target_lens.max())
    targets = targets[:, :width]
    valid = lengths_to_mask(target_lens, width)  # (B, U')
    sos = targets.new_full((targets.shape[0], 1), SOS_EOS_ID)
    ys_in = torch.cat([sos, targets.masked_fill(~valid, SOS_EOS_ID)], dim=1)
    ys_out = torch.cat([targets.masked_fill(~valid, -1), torch.full_like(sos, -1)], dim=1)
    ys_out.scatter_(1, target_lens.unsqueeze(1).long(), SOS_EOS_ID)
    return ys_in, ys_out


class Listener(nn.Module):
    """(B, T, F) features -> (B, T', 2 * listener_hidden), zero beyond each row's length.

    "pyramid" maps n -> n // 8 frames, "conv-pyramid" n -> ((n - 7) // 4 + 1) // 2 (the conv
    needs 7 frames per output), for the lengths and for the padded T alike. A trailing odd
    frame before a pyramidal layer is dropped (see `stack_frame_pairs`).
    """

    def __init__(self, config: LASConfig) -> None:
        super().__init__()
        self.subsampling: Subsampling | None
        front, reduce = listener_pyramid(config)
        if front == 1:
            self.subsampling = None
            rnn_input = config.input_dim
        else:
            self.subsampling = Subsampling("conv2d", config.input_dim, config.listener_hidden)
            rnn_input = config.listener_hidden
        self.rnn = PyramidalBiLSTM(rnn_input, config.listener_hidden, reduce, config.dropout)
        self.rnn_layers = len(reduce)
        self.output_dim = self.rnn.output_dim

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        if self.subsampling is not None:
            lengths = self.subsampling.output_lengths(lengths)
        return self.rnn.output_lengths(lengths)

    def forward(
        self, feats: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats: (B, T, F), lengths: (B,) -> (B, T', D), (B,)."""
        out, out_lens, _, _ = self.forward_tap(feats, lengths, self.rnn_layers)
        return out, out_lens

    def forward_tap(
        self, feats: torch.Tensor, lengths: torch.Tensor, tap: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward`, plus BiLSTM layer `tap`'s (1-based) output (B, T_tap, D) and lengths."""
        out_lens = self.output_lengths(lengths)
        if bool((out_lens < 1).any()):
            shortest = int(lengths.min())
            raise ValueError(
                f"utterance of {shortest} feature frames is too short for the listener "
                "(it leaves no frame after the x8 time reduction)"
            )
        if self.subsampling is not None:
            feats, lengths = self.subsampling(feats, lengths)  # (B, T/4, H)
        return self.rnn.forward_tap(feats, lengths, tap)


class Speller(nn.Module):
    """Attention decoder: s_t = LSTM([emb(y_{t-1}); c_{t-1}], s_{t-1}), c_t = Attend(s_t, h),
    P(y_t) = softmax(MLP([s_t; c_t])) (Chan et al. 2016, eqs. 4-6)."""

    def __init__(self, config: LASConfig, memory_dim: int) -> None:
        super().__init__()
        hidden = config.speller_hidden
        self.memory_dim = memory_dim
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.rnn = nn.LSTM(
            config.embedding_dim + memory_dim,
            hidden,
            config.speller_layers,
            dropout=config.dropout if config.speller_layers > 1 else 0.0,
        )
        self.attention = LocationAwareAttention(
            hidden,
            memory_dim,
            config.attention_dim,
            config.location_channels,
            config.location_kernel,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Sequential(
            nn.Linear(hidden + memory_dim, hidden),
            nn.Tanh(),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, config.vocab_size),
        )

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        layers, hidden = self.rnn.num_layers, self.rnn.hidden_size
        batch, _, dim = enc.memory.shape
        zeros = enc.memory.new_zeros(layers, batch, hidden)
        # Uniform previous weights (as ESPnet) give the location conv a neutral first input.
        uniform = enc.mask.to(enc.memory.dtype) / enc.lengths.unsqueeze(1).to(enc.memory.dtype)
        return DecoderState(zeros, zeros.clone(), enc.memory.new_zeros(batch, dim), uniform)

    def advance(
        self, enc: EncoderOutput, state: DecoderState, embedded: torch.Tensor
    ) -> tuple[torch.Tensor, DecoderState]:
        """One decoder step. embedded: (N, E) emb(y_{t-1}) -> ([s_t; c_t] (N, H + D), state)."""
        x = torch.cat([embedded, state.context], dim=1).unsqueeze(0)  # (1, N, E + D)
        out, (hidden, cell) = self.rnn(x, (state.hidden, state.cell))
        query = self.dropout(out[0])  # (N, H)
        context, weights = self.attention(query, enc.memory, enc.keys, enc.mask, state.attention)
        return torch.cat([query, context], dim=1), DecoderState(hidden, cell, context, weights)


class InternalLM:
    """The speller's internal language model estimate (ILME, Meng et al. 2021): the decoder
    run over its own units with the attention context removed (zero) at every step, so it
    scores P_ILM(y_u | y_<u) from the text prior alone. Subtracted at a weight from the
    decoder's scores (`DecodeOptions.ilm_weight`), it discounts the prior learnt from the
    training transcripts, so that an external LM fused beside it replaces that prior rather
    than doubling it. An `asr.models.lm.LMStep`: it runs the speller's own modules, float or
    int8-quantized alike. Blank, never a unit of text, gets no probability.
    """

    def __init__(self, speller: Speller) -> None:
        self.speller = speller

    def init_state(self, n: int, device: torch.device | str = "cpu") -> LMState:
        """N empty prefixes: the state after sos."""
        return self(None, torch.full((n,), SOS_EOS_ID, dtype=torch.long, device=device))

    @torch.no_grad()
    def __call__(self, state: LMState | None, tokens: torch.Tensor) -> LMState:
        """Append tokens (N,) to the N prefixes of `state` (None: fresh prefixes)."""
        speller = self.speller
        embedded = speller.embedding(tokens)  # (N, E)
        n = embedded.shape[0]
        context = embedded.new_zeros(n, speller.memory_dim)  # (N, D): no attention
        if state is None:
            zeros = embedded.new_zeros(speller.rnn.num_layers, n, speller.rnn.hidden_size)
            state = LMState(zeros, zeros, embedded.new_empty(n, 0))
        x = torch.cat([embedded, context], dim=1).unsqueeze(0)  # (1, N, E + D)
        out, (hidden, cell) = speller.rnn(x, (state.h, state.c))
        logits = speller.output(torch.cat([out[0], context], dim=1)).float()  # (N, V)
        logits[:, BLANK_ID] = -math.inf
        return LMState(hidden, cell, logits.log_softmax(dim=-1))


class LAS(NormalizesInput, nn.Module):
    """Listen, Attend and Spell; see the module docstring for the decoding interface."""

    def __init__(self, config: LASConfig) -> None:
        super().__init__()
        self.config = config
        self.listener = Listener(config)
        self.speller = Speller(config, self.listener.output_dim)
        self.ctc: nn.Linear | None = (
            nn.Linear(self.listener.output_dim, config.vocab_size * config.ctc_upsample)
            if config.ctc_weight > 0
            else None
        )
        self.scheduled_sampling = config.scheduled_sampling

    time_reduction = 8  # feature frames per encoder frame

    @property
    def offers(self) -> frozenset[str]:
        """What decoders may use (asr.models.base): the attention decoder, and CTC posteriors
        when the model has a CTC head."""
        return frozenset({ATTENTION, CTC}) if self.ctc is not None else frozenset({ATTENTION})

    @property
    def ctc_time_reduction(self) -> int:
        """Feature frames per frame of the CTC head's log-probs, for timestamps."""
        layer = self.config.ctc_layer or self.config.listener_layers
        return listener_reduction(self.config, layer) // self.config.ctc_upsample

    def encode(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> EncoderOutput:
        """feats: (B, T, F) raw log-mel, feat_lens: (B,) -> listener output and attention keys."""
        tap = self.config.ctc_layer or self.config.listener_layers
        memory, lengths, tapped, ctc_lengths = self.listener.forward_tap(
            self.normalize(feats), feat_lens, tap
        )
        lengths = lengths.to(memory.device)  # callers may keep feat_lens on the CPU
        ctc_log_probs = None
        up = self.config.ctc_upsample
        ctc_lengths = ctc_lengths.to(memory.device) * up
        if self.ctc is not None:
            batch, frames, _ = tapped.shape
            logits = self.ctc(tapped).view(batch, frames * up, -1)  # (B, T_ctc, V)
            ctc_log_probs = logits.float().log_softmax(dim=-1)
        return EncoderOutput(
            memory=memory,
            lengths=lengths,
            ctc_log_probs=ctc_log_probs,
            ctc_lengths=ctc_lengths,
            keys=self.speller.attention.keys(memory),
            mask=lengths_to_mask(lengths, memory.shape[1]),
        )

    def init_state(self, enc: EncoderOutput) -> DecoderState:
        """State before the first `step` (which takes sos): zero LSTM state and context."""
        return self.speller.init_state(enc)

    def step(
        self, enc: EncoderOutput, state: DecoderState, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, DecoderState]:
        """tokens: (N,) previous tokens (sos first) -> log-probs of the next (N, V) float32.

        `enc` and `state` must have N rows (use `repeat_interleave` / `select` for beams).
        """
        features, state = self.speller.advance(enc, state, self.speller.embedding(tokens))
        return self.speller.output(features).float().log_softmax(dim=-1), state

    def internal_lm(self) -> InternalLM:
        """The speller's internal LM estimate, for a search to subtract (`InternalLM`)."""
        return InternalLM(self.speller)

    def teacher_forced_logits(self, enc: EncoderOutput, ys_in: torch.Tensor) -> torch.Tensor:
        """ys_in: (B, S) decoder inputs from `add_sos_eos` -> logits (B, S, V).

        In training mode with `scheduled_sampling` > 0, each row feeds back its own previous
        argmax instead of ys_in[:, t] with that probability, step by step.
        """
        batch = ys_in.shape[0]
        embedded = self.speller.embedding(ys_in)  # (B, S, E), one lookup for the whole batch
        sampling = self.training and self.scheduled_sampling > 0
        state = self.init_state(enc)
        features: list[torch.Tensor] = []  # (B, H + D) per step
        # unbind: one backward op for all steps (indexing would zero-fill (B, S, E) per step)
        for t, inputs in enumerate(embedded.unbind(1)):
            if sampling and t > 0:
                with torch.no_grad():
                    predicted = self.speller.output(features[-1]).argmax(dim=-1)  # (B,)
                use_own = torch.rand(batch, device=ys_in.device) < self.scheduled_sampling
                inputs = torch.where(
                    use_own.unsqueeze(1), self.speller.embedding(predicted), inputs
                )
            out, state = self.speller.advance(enc, state, inputs)
            features.append(out)
        # The output MLP runs once over all steps: one large matmul instead of S small ones.
        return self.speller.output(torch.stack(features, dim=1))  # (B, S, V)

    def forward(
        self,
        feats: torch.Tensor,
        feat_lens: torch.Tensor,
        targets: torch.Tensor | None = None,
        target_lens: torch.Tensor | None = None,
    ) -> ModelOutput:
        """feats: (B, T, F), feat_lens: (B,), targets: (B, U) padded with -1, target_lens: (B,).

        Both loss terms are summed over an utterance and averaged over the batch (as ESPnet):
        the attention cross-entropy over its U + 1 outputs (eos included; label smoothing), the
        CTC loss over its alignment. Long utterances therefore weigh more, as they would if the
        batch were one long utterance, and the two terms stay on the same scale.
        """
        if (targets is None) != (target_lens is None):
            raise ValueError("pass targets and target_lens together, or neither")
        enc = self.encode(feats, feat_lens)
        if targets is None or target_lens is None:
            return ModelOutput(loss=None, log_probs=enc.ctc_log_probs, out_lens=enc.ctc_lengths)
        batch = feats.shape[0]
        weight = self.config.ctc_weight
        metrics: dict[str, float] = {}
        loss = feats.new_zeros((), dtype=torch.float32)
        if enc.ctc_log_probs is not None:
            # An utterance too short for its transcript adds 0.
            ctc_term = ctc_loss(enc.ctc_log_probs, enc.ctc_lengths, targets, target_lens)
            loss = loss + weight * ctc_term
            metrics["ctc_loss"] = float(ctc_term.detach())
        if weight < 1.0:
            ys_in, ys_out = add_sos_eos(targets, target_lens)
            logits = self.teacher_forced_logits(enc, ys_in).float()  # (B, U + 1, V)
            att_loss = (
                F.cross_entropy(
                    logits.flatten(0, 1),
                    ys_out.flatten(),
                    ignore_index=-1,
                    label_smoothing=self.config.label_smoothing,
                    reduction="sum",
                )
                / batch
            )
            loss = loss + (1.0 - weight) * att_loss
            valid = ys_out >= 0
            correct = (logits.detach().argmax(dim=-1) == ys_out) & valid
            metrics["att_loss"] = float(att_loss.detach())
            metrics["att_acc"] = float(correct.sum()) / max(int(valid.sum()), 1)
        return ModelOutput(
            loss=loss, log_probs=enc.ctc_log_probs, out_lens=enc.ctc_lengths, metrics=metrics
        )

    @torch.no_grad()
    def greedy_decode(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, max_len_ratio: float = 2.0
    ) -> list[list[int]]:
        """Batched argmax decoding through `step`; call `eval()` first.

        Each hypothesis ends at eos (not included) or after ceil(max_len_ratio * T'_b) tokens,
        T'_b its encoder frames (80 ms each: 2.0 leaves room for ~25 characters per second).
        """
        enc = self.encode(feats, feat_lens)
        max_lens = (enc.lengths.double() * max_len_ratio).ceil().long().clamp(min=1)  # (B,)
        state = self.init_state(enc)
        tokens = enc.lengths.new_full(enc.lengths.shape, SOS_EOS_ID)  # (B,)
        finished = torch.zeros_like(tokens, dtype=torch.bool)
        outputs: list[torch.Tensor] = []
        for t in range(int(max_lens.max())):
            log_probs, state = self.step(enc, state, tokens)
            tokens = log_probs.argmax(dim=-1)
            outputs.append(tokens)
            finished |= (tokens == SOS_EOS_ID) | (max_lens <= t + 1)
            if bool(finished.all()):
                break
        rows = torch.stack(outputs, dim=1).tolist()  # (B, steps)
        hyps = []
        for row, limit in zip(rows, max_lens.tolist(), strict=True):
            row = row[:limit]
            hyps.append(row[: row.index(SOS_EOS_ID)] if SOS_EOS_ID in row else row)
        return hyps


def las(config: LASConfig) -> LAS:
    """Build a LAS model from its config (e.g. `las(replace(PRESETS[name], vocab_size=V))`)."""
    return LAS(config)
