"""BiLSTM-CTC acoustic model with an optional latency-controlled (LC-BLSTM) mode.

x4 subsampling (conv2d or frame stacking), then N bidirectional LSTM/GRU layers, each optionally
followed by a linear projection of its concatenated output (ESPnet "BLSTMP"), then a CTC head
(blank = 0). As in DeepSpeech2 and ESPnet's BLSTMP encoders.

Each layer owns two unidirectional RNNs, one per direction, so the same parameters serve two
ways of running the stack; `chunk_size` in the config picks one:

- offline (`chunk_size == 0`): each direction sees the whole utterance.
- latency-controlled (`chunk_size = Nc > 0`, `right_context = Nr`; Zhang et al. 2016, "Highway
  long short-term memory RNNs for distant speech recognition"; Chen & Huo 2016): the subsampled
  utterance is cut into blocks of Nc chunk frames plus the Nr frames that follow them. The whole
  stack runs over one block at a time; the forward direction carries its state from block to
  block (the state after the chunk frames, not after the context frames), the backward direction
  starts afresh at the block's last frame. Only the chunk frames' outputs are kept, so the
  look-ahead is Nr frames whatever the depth, and the cost per stream is linear in its length.
  `BiLSTMCTCStream` runs the same `lc_block` on audio as it arrives.

Training in LC mode makes streaming accuracy match what was trained; a model trained in one
mode runs in the other by building it with `dataclasses.replace(config, chunk_size=...)` and
loading the same state dict (the parameters do not depend on the mode). `train_blocks` trains
one model for several blocks (each training batch draws one), so it streams well at each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import nn

from asr.cancel import CancelToken
from asr.config import Config
from asr.models.base import CTC, ModelOutput, NormalizesInput, model_device
from asr.models.ctc import count_infeasible, ctc_loss
from asr.models.layers import BiRNN, RNNType
from asr.models.subsampling import (
    Subsampling,
    SubsamplingKind,
    SubsamplingStream,
    accept_subsampled,
)


@dataclass(frozen=True)
class BiLSTMCTCConfig(Config):
    """Everything needed to rebuild a `BiLSTMCTC`; stored in bundles and checkpoints.

    Frame counts (`chunk_size`, `right_context`) are in subsampled frames (40 ms at a 10 ms hop).
    """

    input_dim: int = 80  # feature bins
    vocab_size: int = 256  # CTC outputs, blank (id 0) included
    subsampling: SubsamplingKind = "stack"
    subsampling_channels: int = 32  # conv2d only
    hidden_size: int = 320  # per direction
    num_layers: int = 4
    projection_size: int = 0  # 0: none; else Linear(2H -> P) after every layer
    rnn_type: RNNType = "lstm"
    dropout: float = 0.0  # between recurrent layers
    chunk_size: int = 0  # Nc; 0 = offline, full-sequence BiLSTM
    right_context: int = 0  # Nr; LC mode only
    # Dynamic latency training (LC mode only): (Nc, Nr) blocks of which each training forward
    # draws one, uniformly, in place of (chunk_size, right_context), so that one model streams
    # well at all of them (as WeNet's dynamic chunk training does for its attention masks).
    # Inference and validation keep (chunk_size, right_context). () trains at those alone.
    train_blocks: tuple[tuple[int, int], ...] = ()

    def validate(self) -> None:
        minimums = {
            "input_dim": 1,
            "vocab_size": 2,  # blank and at least one token
            "subsampling_channels": 1,
            "hidden_size": 1,
            "num_layers": 1,
            "projection_size": 0,
            "chunk_size": 0,
            "right_context": 0,
        }
        offline_context = self.right_context and not self.chunk_size
        self.check(
            {name: (getattr(self, name) >= low, f">= {low}") for name, low in minimums.items()}
            | {"dropout": (0.0 <= self.dropout < 1.0, "in [0, 1)")}
        )
        # Second rules for fields the first dict names, so they cannot replace them there.
        self.check(
            {
                "right_context": (
                    not offline_context,
                    "0 offline (chunk_size 0 already sees the whole utterance)",
                ),
                "train_blocks": (
                    not self.train_blocks
                    or (
                        self.chunk_size > 0
                        and all(nc >= 1 and nr >= 0 for nc, nr in self.train_blocks)
                    ),
                    "(chunk_size >= 1, right_context >= 0) pairs of an LC model (chunk_size > 0)",
                ),
            }
        )

    @property
    def layer_dim(self) -> int:
        """Width of each recurrent layer's input and output (and of the subsampling output)."""
        return self.projection_size or 2 * self.hidden_size


# Sizes follow published BiLSTM-CTC/BLSTMP encoders. Every preset trains in LC mode because the
# streaming server runs LC mode and a model does best in the mode it was trained in; for an
# offline model use `replace(preset, chunk_size=0, right_context=0)`. At 40 ms per frame,
# cpu-small's Nc=16 / Nr=8 is 640 ms chunks with 320 ms look-ahead; the LibriSpeech presets
# take 960 ms / 480 ms, trading latency for context (and fewer, larger blocks on a GPU).
#
# Subsampling is frame stacking in every preset: on the synthetic corpus the conv2d front end
# (16-64 channels) kept the model on the CTC "all blank" plateau for hundreds of steps that
# stacking leaves within ~100 (6 utterances memorised in 150 Adam steps versus a loss still
# at 130 after 200), and stacking costs a single matrix product.
PRESETS: dict[str, BiLSTMCTCConfig] = {
    # Small enough to train on 2 CPU cores: tests, demos and small synthetic corpora.
    "cpu-small": BiLSTMCTCConfig(
        vocab_size=256,
        hidden_size=192,
        num_layers=3,
        projection_size=256,
        dropout=0.1,
        chunk_size=16,
        right_context=8,
    ),
    # Between EESEN's 4-5 layers x 320 per direction (Miao et al. 2015) and the 960 h model;
    # heavier dropout because 100 h overfits. Not tuned here.
    "librispeech-100h": BiLSTMCTCConfig(
        vocab_size=256,
        hidden_size=512,
        num_layers=5,
        projection_size=512,
        dropout=0.3,
        chunk_size=24,
        right_context=12,
    ),
    # ESPnet's LibriSpeech 960 h BLSTM encoder: 5 layers x 1024 units per direction, dropout 0.2
    # (egs/librispeech/asr1/RESULTS.md, "vggblstm_e5 unit1024 proj1024"); projection 512 rather
    # than 1024 takes the model from ~96M to ~69M parameters. Not tuned here.
    "librispeech-960h": BiLSTMCTCConfig(
        vocab_size=1024,
        hidden_size=1024,
        num_layers=5,
        projection_size=512,
        dropout=0.2,
        chunk_size=24,
        right_context=12,
    ),
}


class BiLSTMCTC(NormalizesInput, nn.Module):
    """Subsampling -> bidirectional LSTM/GRU stack (offline or LC) -> CTC head."""

    def __init__(self, config: BiLSTMCTCConfig) -> None:
        super().__init__()
        self.config = config
        self.subsampling = Subsampling(
            config.subsampling, config.input_dim, config.layer_dim, config.subsampling_channels
        )
        self.layers = nn.ModuleList(
            BiRNN(config.layer_dim, config.hidden_size, config.rnn_type, config.projection_size)
            for _ in range(config.num_layers)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.layer_dim, config.vocab_size)

    offers = frozenset({CTC})  # what decoders may use (asr.models.base)

    @property
    def time_reduction(self) -> int:
        """Feature frames per output frame, for timestamps."""
        return self.subsampling.stride

    def with_chunking(self, chunk_size: int, right_context: int) -> BiLSTMCTC:
        """This model run with other LC blocks (0, 0: offline), sharing its parameters.

        Blocks shorter than the trained ones give earlier streaming results for a little
        accuracy: the synthetic cpu-small model (trained 16 + 8) streams 0.1 WER points
        better at 8 + 8 and 1.2 points worse at 8 + 4, which halves the wait before a
        word's first partial.
        """
        config = replace(self.config, chunk_size=chunk_size, right_context=right_context)
        model = BiLSTMCTC(config)
        model.load_state_dict(self.state_dict(), assign=True)  # the same tensors, not copies
        model.cmvn = self.cmvn
        return model.train(self.training)

    @property
    def _stack(self) -> list[BiRNN]:
        """The recurrent layers, bottom first (typed, unlike iterating the ModuleList)."""
        return cast(list[BiRNN], list(self.layers))

    def forward(
        self,
        feats: torch.Tensor,
        feat_lens: torch.Tensor,
        targets: torch.Tensor | None = None,
        target_lens: torch.Tensor | None = None,
    ) -> ModelOutput:
        """feats (B, T, F), feat_lens (B,), targets (B, U) padded with -1, target_lens (B,)."""
        enc, enc_lens = self.encode(feats, feat_lens)
        log_probs = self.output(enc)  # (B, T', V)
        if targets is None or target_lens is None:
            return ModelOutput(loss=None, log_probs=log_probs, out_lens=enc_lens)
        loss = ctc_loss(log_probs, enc_lens, targets, target_lens)
        infeasible = count_infeasible(enc_lens, targets, target_lens)
        metrics = {"ctc_loss": loss.item(), "ctc_infeasible": float(infeasible)}
        return ModelOutput(loss=loss, log_probs=log_probs, out_lens=enc_lens, metrics=metrics)

    def log_probs(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, cancel: CancelToken | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, F), feat_lens (B,) -> CTC log-probs (B, T', V) float32, lengths (B,)."""
        enc, enc_lens = self.encode(feats, feat_lens, cancel)
        return self.output(enc), enc_lens

    def output(self, enc: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, T', D) -> float32 CTC log-probs (B, T', V)."""
        # float32 before the softmax: under AMP, fp16 log-probs lose the small differences
        # between competing tokens and make the CTC recursions inaccurate.
        return self.head(enc).float().log_softmax(dim=-1)

    def encode(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, cancel: CancelToken | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, F) raw log-mel, feat_lens (B,) -> enc (B, T', D), enc_lens (B,);
        T' = max(enc_lens). An LC model checks `cancel` (if given) between its blocks, which
        it runs one after another in Python anyway (`asr.cancel`)."""
        x, lens = self.subsampling(self.normalize(feats), feat_lens)  # (B, T', D), (B,)
        frames = int(lens.max()) if lens.numel() else 0
        x = x[:, :frames]  # drop frames that are padding for every sequence
        if frames == 0:
            return x.new_zeros(x.shape[0], 0, self.config.layer_dim), lens
        if not self.config.chunk_size:
            # Offline is the special case of one block spanning the utterance without context.
            enc, _ = self._run_block(x, lens, None, chunk=frames)
            return enc, lens
        chunk, context = self._blocks()
        outputs = []
        states: torch.Tensor | None = None
        for start in range(0, frames, chunk):
            if cancel is not None:  # a block costs milliseconds, a check microseconds
                cancel.check()
            block = x[:, start : start + chunk + context]  # (B, W, D), W <= Nc + Nr
            valid = (lens - start).clamp(min=0, max=block.shape[1])  # (B,)
            enc, states = self._run_block(block, valid, states, chunk)  # (B, min(W, Nc), D)
            outputs.append(enc)
        return torch.cat(outputs, dim=1), lens

    def _blocks(self) -> tuple[int, int]:
        """(Nc, Nr) for this forward: the config's, or in training one of `train_blocks`,
        drawn with torch's global generator (which the Trainer seeds and checkpoints, so a
        resumed run draws the same blocks)."""
        blocks = self.config.train_blocks
        if not (self.training and blocks):
            return self.config.chunk_size, self.config.right_context
        return blocks[int(torch.randint(len(blocks), ()))]

    def lc_block(
        self,
        block: torch.Tensor,
        valid: torch.Tensor,
        states: torch.Tensor | None,
        *,
        lookahead: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the whole recurrent stack over one LC block (whole-utterance LC and streaming).

        block: (B, W, D) subsampled frames: up to Nc chunk frames, then up to Nr right-context
        frames (fewer only at the end of an utterance). valid: (B,) valid frames of each
        sequence in this block (0 once the sequence has ended). states: (L, S, B, H)
        forward-direction states carried from the previous block, None at the start.
        Returns the top layer's outputs for the chunk frames (B, min(W, Nc), D_out) and the
        forward states after the chunk frames (L, S, B, H).

        lookahead: return the outputs of the right-context frames too, (B, W, D_out): the
        chunk's are the same; the right context's are provisional (their backward direction
        saw only the frames up to the block's end, which the next block will see past), as
        if the block were one chunk of W frames. A streaming partial result can read them to
        show a word one block sooner (`StreamingSession(lookahead=True)`).
        """
        if not self.config.chunk_size:
            raise ValueError("lc_block needs an LC model: build it with chunk_size > 0")
        return self._run_block(block, valid, states, self.config.chunk_size, lookahead)

    def _run_block(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        states: torch.Tensor | None,
        chunk: int,
        lookahead: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`lc_block` with an explicit chunk size: x (B, W, D) -> (B, min(W, chunk), D_out),
        or (B, W, D_out) with `lookahead`.

        Positions beyond `valid` hold garbage but never leak into valid ones (see `BiRNN`),
        so this is exact without packed sequences.
        """
        new_states = []
        top = len(self._stack) - 1
        for i, layer in enumerate(self._stack):
            state = None if states is None else states[i]  # (S, B, H)
            # (B, W, D_out), (S, B, H); the top layer's right-context outputs are read only
            # for a look-ahead
            x, state = layer(x, valid, state, carry=chunk, context_outputs=lookahead or i < top)
            new_states.append(state)
            if i < top:
                x = self.dropout(x)
        return (x if lookahead else x[:, :chunk]), torch.stack(new_states)


def bilstm_ctc(config: BiLSTMCTCConfig) -> BiLSTMCTC:
    """Build a BiLSTM-CTC model; `bilstm_ctc(PRESETS["librispeech-100h"])` for a preset."""
    return BiLSTMCTC(config)


class BiLSTMCTCStream:
    """Streaming LC inference for one utterance: feature chunks in, CTC log-probs out.

    Feature frames go through `SubsamplingStream`; every time Nc + Nr subsampled frames are
    buffered, `lc_block` runs and Nc frames of log-probs come out (the last Nr stay buffered as
    the next block's start). `flush` ends the input and processes what is left exactly as the
    whole-utterance LC forward processes its last blocks, so the concatenation of all outputs
    equals `model.log_probs` on the whole utterance, up to float rounding (~1e-7: the
    subsampling's matrix products run over fewer frames at a time). Needs `chunk_size > 0`;
    put the model in eval mode first (dropout).
    """

    def __init__(self, model: BiLSTMCTC) -> None:
        if not model.config.chunk_size:
            raise ValueError("streaming needs an LC model: build it with chunk_size > 0")
        self.model = model
        self.reset()

    def reset(self) -> None:
        """Forget the current utterance; the next `accept` starts a new one."""
        self.frames_emitted = 0  # log-prob frames returned so far (40 ms each at a 10 ms hop)
        self._subsampling = SubsamplingStream(self.model.subsampling)
        self._normalize = self.model.stream_normalizer()
        self._pending: torch.Tensor | None = None  # (1, n, D) subsampled, not yet emitted
        self._states: torch.Tensor | None = None  # (L, S, 1, H)
        # (1, n, V): provisional log-probs of the buffered right-context frames, from the
        # last block run with a look-ahead (`run_streams`); None when none is known
        self.lookahead: torch.Tensor | None = None

    @torch.no_grad()
    def accept(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (1, T, F) new raw log-mel frames -> (1, T'', V) newly final log-probs
        (T'' >= 0)."""
        self.push(feats)
        return run_streams([self])[0]

    @torch.no_grad()
    def push(self, feats: torch.Tensor) -> None:
        """Buffer feats (1, T, F) new raw log-mel frames without running the encoder on them
        (`run_streams` runs the blocks they complete, batched with other streams')."""
        push_streams([self], [feats])

    @property
    def width(self) -> int:
        """Subsampled frames a block needs: the chunk and its right context."""
        return self.model.config.chunk_size + self.model.config.right_context

    def completes_block(self, frames: int) -> bool:
        """Whether `frames` more raw feature frames would complete a block."""
        pending = 0 if self._pending is None else self._pending.shape[1]
        return pending + self._subsampling.outputs_after(frames) >= self.width

    def ready(self) -> bool:
        """Whether a whole block is buffered."""
        return self._pending is not None and self._pending.shape[1] >= self.width

    @torch.no_grad()
    def flush(self) -> torch.Tensor:
        """End of input: (1, T'', V) log-probs of the frames still buffered, then `reset`.

        Feature frames too few to complete a subsampling window are dropped, as offline.
        """
        return run_streams([self], flush=[True])[0]

    def _empty(self) -> torch.Tensor:
        return torch.zeros(1, 0, self.model.config.vocab_size, device=model_device(self.model))

    def _runnable(self, flushing: bool) -> bool:
        """Whether a block can run: a whole one, or at the end of input any frames left."""
        if flushing:
            return self._pending is not None and self._pending.shape[1] > 0
        return self.ready()

    def _take_block(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next block (1, W, D), W = Nc + Nr unless fewer frames are left at the end of
        input, and the forward states it starts from (L, S, 1, H); the chunk frames leave the
        buffer (`_runnable` first)."""
        assert self._pending is not None
        block = self._pending[:, : self.width]
        self._pending = self._pending[:, self.model.config.chunk_size :]
        if self._states is None:  # a zero state is what the LSTM starts from
            config = self.model.config
            sizes = 2 if config.rnn_type == "lstm" else 1  # (h, c) or h
            self._states = block.new_zeros(config.num_layers, sizes, 1, config.hidden_size)
        return block, self._states


@torch.no_grad()
def push_streams(streams: Sequence[BiLSTMCTCStream], feats: Sequence[torch.Tensor]) -> None:
    """`streams[i].push(feats[i])` for every stream (all of one model), the subsampling of
    all of them in one batched call (`accept_subsampled`)."""
    normalized = [s._normalize(f) for s, f in zip(streams, feats, strict=True)]
    subsampled = accept_subsampled([s._subsampling for s in streams], normalized)  # (1, n, D)
    for s, new in zip(streams, subsampled, strict=True):
        s._pending = new if s._pending is None else torch.cat([s._pending, new], dim=1)


@torch.no_grad()
def run_streams(
    streams: Sequence[BiLSTMCTCStream],
    flush: Sequence[bool] | None = None,
    lookahead: Sequence[bool] | None = None,
) -> list[torch.Tensor]:
    """Run every whole block buffered in `streams` (all of one model), one block of each
    ready stream per batched `lc_block` call: each stream's forward state is a row of the
    batch's (L, S, B, H) state, joined for the call and handed back after it, so a stream
    starts, stops or waits without the others noticing. Returns each stream's newly final
    log-probs (1, T'', V), what `accept` would return: batching changes only the float
    rounding of the matrix products (~1e-7).

    flush[i]: stream i's input has ended: it also runs its last, shorter blocks (rows padded
    to the batch's width, their valid length passed on, so padding never reaches them) and
    returns what `flush` would, then is reset. So streams that end are batched with those
    that go on, not run alone at batch 1.

    lookahead[i]: stream i also keeps, in `lookahead`, the provisional log-probs of the
    right-context frames of its last block run (`BiLSTMCTC.lc_block`'s look-ahead; empty
    after its last block); its returned log-probs are the same.
    """
    if not streams:
        return []
    model = streams[0].model
    if any(s.model is not model for s in streams):
        raise ValueError("run_streams: every stream must run the same model")
    flushing = [False] * len(streams) if flush is None else list(flush)
    if len(flushing) != len(streams):
        raise ValueError(f"run_streams: {len(streams)} streams, {len(flushing)} flush flags")
    peek = [False] * len(streams) if lookahead is None else list(lookahead)
    if len(peek) != len(streams):
        raise ValueError(f"run_streams: {len(streams)} streams, {len(peek)} look-ahead flags")
    chunk = model.config.chunk_size
    outputs: list[list[torch.Tensor]] = [[s._empty()] for s in streams]
    while ready := [i for i, s in enumerate(streams) if s._runnable(flushing[i])]:
        taken = [streams[i]._take_block() for i in ready]
        widths = [b.shape[1] for b, _ in taken]
        width = max(widths)
        block = torch.cat(  # (B, W, D)
            [torch.nn.functional.pad(b, (0, 0, 0, width - b.shape[1])) for b, _ in taken]
        )
        states = torch.cat([st for _, st in taken], dim=2)  # (L, S, B, H)
        ahead = any(peek[i] for i in ready)
        enc, states = model.lc_block(block, torch.tensor(widths), states, lookahead=ahead)
        log_probs = model.output(enc)  # (B, min(W, Nc), V), or (B, W, V) with a look-ahead
        for row, i in enumerate(ready):
            # clone: a view would keep the whole batch's state alive
            streams[i]._states = states[:, :, row : row + 1].clone()
            outputs[i].append(log_probs[row : row + 1, : min(widths[row], chunk)])
            if peek[i]:
                streams[i].lookahead = log_probs[row : row + 1, chunk : widths[row]].clone()
    results = []
    for s, out, ends in zip(streams, outputs, flushing, strict=True):
        joined = torch.cat(out, dim=1)
        s.frames_emitted += joined.shape[1]
        if ends:
            s.reset()
        results.append(joined)
    return results
