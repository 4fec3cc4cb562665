"""BiLSTM-CTC: shapes, padding, offline and LC mode against plain reference implementations,
chunk-by-chunk streaming, the CTC loss, and memorising real LibriSpeech utterances."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import jiwer
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from asr.audio import load_audio
from asr.cancel import Cancelled
from asr.features import CMVN, FeatureConfig, log_mel
from asr.models import model_config
from asr.models.base import attach_cmvn
from asr.models.bilstm_ctc import (
    PRESETS,
    BiLSTMCTC,
    BiLSTMCTCConfig,
    BiLSTMCTCStream,
    bilstm_ctc,
    push_streams,
    run_streams,
)
from asr.models.layers import lengths_to_mask
from tests.test_decoding_ctc import CountingToken

TINY = BiLSTMCTCConfig(
    input_dim=20,
    vocab_size=11,
    subsampling="conv2d",
    subsampling_channels=4,
    hidden_size=16,
    num_layers=3,
    projection_size=12,
    chunk_size=5,
    right_context=3,
)
OFFLINE: dict[str, Any] = {"chunk_size": 0, "right_context": 0}


def tiny(**overrides: Any) -> BiLSTMCTC:
    torch.manual_seed(0)
    return bilstm_ctc(replace(TINY, **overrides)).eval()


def batch(lengths: list[int], dim: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), max(lengths) + 9, dim, generator=gen)  # extra padding
    return feats, torch.tensor(lengths)


def rnn_layers(model: BiLSTMCTC) -> list[Any]:
    """The layers, typed loosely: each has .fwd and .bwd (nn.LSTM or nn.GRU) and .proj."""
    return list(model.layers)


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_dim", 0),
        ("vocab_size", 1),
        ("hidden_size", 0),
        ("num_layers", 0),
        ("projection_size", -1),
        ("chunk_size", -1),
        ("right_context", -2),
        ("num_layers", 2.0),
        ("subsampling", "conv1d"),
        ("rnn_type", "rnn"),
        ("dropout", 1.0),
    ],
)
def test_config_rejects_bad_values(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        replace(TINY, **{field: value})


def test_config_right_context_needs_lc_mode() -> None:
    with pytest.raises(ValueError, match="right_context"):
        replace(TINY, chunk_size=0)


def test_config_round_trips_through_json() -> None:
    data = json.loads(json.dumps(TINY.to_dict()))
    assert BiLSTMCTCConfig.from_dict(data) == TINY
    with pytest.raises(ValueError, match="hidden"):
        BiLSTMCTCConfig.from_dict({**data, "hidden": 3})


def test_presets_build_and_count_parameters() -> None:
    counts = {}
    for name, config in PRESETS.items():
        assert config.chunk_size > 0 and config.right_context > 0, name  # the server streams
        with torch.device("meta"):  # sizes without allocating 960 h weights
            model = bilstm_ctc(config)
        counts[name] = sum(p.numel() for p in model.parameters())
        assert BiLSTMCTCConfig.from_dict(config.to_dict()) == config
    assert counts["cpu-small"] < 5e6 < counts["librispeech-100h"] < counts["librispeech-960h"]


def test_parameter_names_are_those_of_existing_bundles() -> None:
    names = set(tiny().state_dict())
    for i in range(TINY.num_layers):
        assert {f"layers.{i}.fwd.weight_ih_l0", f"layers.{i}.bwd.weight_hh_l0"} <= names
        assert {f"layers.{i}.proj.weight", f"layers.{i}.proj.bias"} <= names


# --- shapes and padding ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["offline", "lc"])
@pytest.mark.parametrize("subsampling", ["conv2d", "stack"])
@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize("projection_size", [0, 12])
def test_output_shapes_and_lengths(
    mode: str, subsampling: str, rnn_type: str, projection_size: int
) -> None:
    overrides = OFFLINE if mode == "offline" else {}
    model = tiny(
        subsampling=subsampling, rnn_type=rnn_type, projection_size=projection_size, **overrides
    )
    feats, lens = batch([61, 40, 3, 7])  # 3: shorter than one subsampling window
    expected = model.subsampling.output_lengths(lens)
    out = model(feats, lens)
    assert out.loss is None and out.log_probs is not None
    assert torch.equal(out.out_lens, expected)
    assert out.log_probs.shape == (4, int(expected.max()), TINY.vocab_size)
    assert out.log_probs.dtype == torch.float32
    assert torch.allclose(out.log_probs.exp().sum(-1), torch.ones(()), atol=1e-5)
    enc, enc_lens = model.encode(feats, lens)
    assert enc.shape == (4, int(expected.max()), projection_size or 2 * TINY.hidden_size)
    assert torch.equal(enc_lens, expected)

    block = torch.randn(4, 8, model.config.layer_dim)  # 5 chunk + 3 context frames
    valid = torch.tensor([8, 5, 0, 1])
    if mode == "offline":
        with pytest.raises(ValueError, match="chunk_size"):
            model.lc_block(block, valid, None)
        return
    chunk_out, states = model.lc_block(block, valid, None)
    assert chunk_out.shape == (4, 5, enc.shape[-1])
    state_size = 2 if rnn_type == "lstm" else 1
    assert states.shape == (TINY.num_layers, state_size, 4, TINY.hidden_size)
    assert model.lc_block(block, valid, states)[1].shape == states.shape


@pytest.mark.parametrize("mode", ["offline", "lc"])
def test_batch_too_short_for_any_frame(mode: str) -> None:
    model = tiny(**(OFFLINE if mode == "offline" else {}))
    feats, lens = batch([5, 6])
    out = model(feats, lens, torch.tensor([[1, 2], [3, -1]]), torch.tensor([2, 1]))
    assert out.log_probs is not None and out.log_probs.shape == (2, 0, TINY.vocab_size)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert out.metrics["ctc_infeasible"] == 2


@pytest.mark.parametrize("mode", ["offline", "lc"])
@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_padding_does_not_change_outputs(mode: str, rnn_type: str) -> None:
    model = tiny(rnn_type=rnn_type, **(OFFLINE if mode == "offline" else {}))
    feats, lens = batch([97, 150, 31, 64, 2])
    with torch.no_grad():
        padded, out_lens = model.log_probs(feats, lens)
        for b, n in enumerate(lens.tolist()):
            alone, alone_lens = model.log_probs(feats[b : b + 1, :n], lens[b : b + 1])
            assert alone_lens[0] == out_lens[b]
            valid = int(out_lens[b])
            assert alone.shape[1] == valid
            torch.testing.assert_close(alone[0], padded[b, :valid], atol=1e-5, rtol=0)


# --- offline and LC mode against reference implementations -------------------------------------


def reference_offline(model: BiLSTMCTC, feats: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """PyTorch's own bidirectional RNN on packed sequences, with the model's weights."""
    x, out_lens = model.subsampling(feats, lens)
    for i, layer in enumerate(rnn_layers(model)):
        fwd, bwd = layer.fwd, layer.bwd
        bi = type(fwd)(fwd.input_size, fwd.hidden_size, batch_first=True, bidirectional=True)
        reverse = {f"{k}_reverse": v for k, v in bwd.state_dict().items()}
        bi.load_state_dict({**fwd.state_dict(), **reverse})
        packed = pack_padded_sequence(
            x, out_lens.clamp(min=1), batch_first=True, enforce_sorted=False
        )
        x, _ = pad_packed_sequence(bi(packed)[0], batch_first=True)
        x = layer.proj(x)
        if i < len(model.layers) - 1:
            x = model.dropout(x)
    return x


def reference_lc(model: BiLSTMCTC, feats: torch.Tensor) -> torch.Tensor:
    """LC-BLSTM for one utterance (T, F), written out block by block as in Zhang et al. 2016."""
    chunk, context = model.config.chunk_size, model.config.right_context
    x, _ = model.subsampling(feats[None], torch.tensor([feats.shape[0]]))  # (1, T', D)
    carried: list[object] = [None] * len(model.layers)  # forward states after each chunk
    outputs = []
    for start in range(0, x.shape[1], chunk):
        h = x[:, start : start + chunk + context]
        n = min(chunk, h.shape[1])
        for i, layer in enumerate(rnn_layers(model)):
            fwd_chunk, carried[i] = layer.fwd(h[:, :n], carried[i])
            fwd = fwd_chunk
            if h.shape[1] > n:  # the context frames continue from the chunk's final state
                fwd = torch.cat([fwd_chunk, layer.fwd(h[:, n:], carried[i])[0]], dim=1)
            bwd = layer.bwd(h.flip(1))[0].flip(1)  # fresh state at the block's last frame
            h = layer.proj(torch.cat([fwd, bwd], dim=-1))
        outputs.append(h[0, :n])
    return torch.cat(outputs)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize("projection_size", [0, 12])
def test_offline_matches_pytorch_bidirectional_rnn(rnn_type: str, projection_size: int) -> None:
    model = tiny(rnn_type=rnn_type, projection_size=projection_size, **OFFLINE)
    feats, lens = batch([120, 57, 80, 3])
    with torch.no_grad():
        enc, enc_lens = model.encode(feats, lens)
        expected = reference_offline(model, feats, lens)
    mask = lengths_to_mask(enc_lens, enc.shape[1])
    torch.testing.assert_close(enc[mask], expected[mask], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize(("chunk", "context"), [(5, 3), (4, 0), (1, 2), (7, 9)])
def test_lc_matches_blockwise_reference(rnn_type: str, chunk: int, context: int) -> None:
    model = tiny(rnn_type=rnn_type, chunk_size=chunk, right_context=context)
    feats, lens = batch([150, 97, 31, 64])  # 36, 23, 6, 15 subsampled frames
    with torch.no_grad():
        enc, enc_lens = model.encode(feats, lens)
        for b, n in enumerate(lens.tolist()):
            expected = reference_lc(model, feats[b, :n])
            assert expected.shape[0] == enc_lens[b]
            torch.testing.assert_close(enc[b, : expected.shape[0]], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("context", [0, 4])
def test_lc_with_one_chunk_covering_the_utterance_is_offline(context: int) -> None:
    # One block holds every frame: the forward direction starts at the first frame, the
    # backward one at the last, exactly the offline computation.
    model = tiny(**OFFLINE)
    feats, lens = batch([150, 97, 31])
    lc = model.with_chunking(40, context)  # 36 subsampled frames at most
    with torch.no_grad():
        assert torch.equal(lc.log_probs(feats, lens)[0], model.log_probs(feats, lens)[0])
        short_chunks = model.with_chunking(5, context)
        diff = (short_chunks.log_probs(feats, lens)[0] - model.log_probs(feats, lens)[0]).abs()
    assert diff.max() > 1e-3  # short chunks do limit what each frame sees
    # Rechunked models share the parameters rather than copying them.
    assert lc.head.weight.data_ptr() == model.head.weight.data_ptr()
    assert lc.config == replace(model.config, chunk_size=40, right_context=context)


def test_lc_lookahead_is_right_context_whatever_the_depth() -> None:
    model = tiny(num_layers=4, chunk_size=4, right_context=2, rnn_type="gru")
    feats = torch.randn(1, 200, 20, requires_grad=True)
    enc, _ = model.encode(feats, torch.tensor([200]))
    enc[:, :4].sum().backward()  # first chunk: subsampled frames 0-3, context frames 4-5
    assert feats.grad is not None
    seen = feats.grad.abs().sum(-1)[0].nonzero().max().item()
    # Subsampled frame j reads feature frames [4j, 4j + 7): frame 5 reads up to feature 26.
    assert seen == 4 * 5 + 6


@pytest.mark.parametrize(
    "blocks", [((0, 2),), ((3, -1),), ((3,),)], ids=["no chunk", "negative context", "no pair"]
)
def test_config_rejects_bad_train_blocks(blocks: Any) -> None:
    with pytest.raises(ValueError, match="train_blocks"):
        replace(TINY, train_blocks=blocks)
    with pytest.raises(ValueError, match="train_blocks"):  # an offline model has no blocks
        replace(TINY, **OFFLINE, train_blocks=((3, 1),))


def test_train_blocks_round_trip_through_json_and_preset_overrides() -> None:
    config = replace(TINY, train_blocks=((5, 3), (2, 1)))
    assert BiLSTMCTCConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # `asr train --model-set train_blocks=[[6,4],[4,2]]` hands model_config JSON lists.
    built = model_config("ctc", "cpu-small", train_blocks=[[6, 4], [4, 2]])
    assert built.train_blocks == ((6, 4), (4, 2))


def test_training_forward_draws_one_of_train_blocks() -> None:
    # Dropout 0 so that a training forward equals an eval forward over the same blocks.
    model = tiny(train_blocks=((2, 1), (7, 0)))
    feats, lens = batch([150, 97])
    with torch.no_grad():
        configured = model.log_probs(feats, lens)[0]  # eval: the config's 5 + 3
        each = [model.with_chunking(*b).log_probs(feats, lens)[0] for b in ((2, 1), (7, 0))]
        model.train()
        drawn = [model.log_probs(feats, lens)[0] for _ in range(12)]
    assert not torch.equal(each[0], configured) and not torch.equal(each[1], configured)
    matches = [[torch.equal(d, e) for e in each] for d in drawn]
    assert all(sum(m) == 1 for m in matches)  # every training forward ran one of the blocks
    assert {m.index(True) for m in matches} == {0, 1}  # and both get drawn (p = 1 - 2^-11)
    # Drawn from torch's global generator, so a seeded (or resumed) run draws the same.
    torch.manual_seed(3)
    first = [model.log_probs(feats, lens)[0] for _ in range(4)]
    torch.manual_seed(3)
    assert all(torch.equal(a, model.log_probs(feats, lens)[0]) for a in first)


def test_lc_gradients_reach_both_directions_and_cross_blocks() -> None:
    model = tiny(dropout=0.1).train()
    feats, lens = batch([150, 97])
    feats.requires_grad_(True)
    out = model(feats, lens, torch.randint(1, 11, (2, 8)), torch.tensor([8, 6]))
    assert out.loss is not None
    out.loss.backward()
    for i, layer in enumerate(rnn_layers(model)):
        for direction in (layer.fwd, layer.bwd):
            for name, p in direction.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, (i, name)
    # The forward state carried across blocks passes gradient back to the first frames.
    model.zero_grad()
    feats.grad = None
    enc, _ = model.encode(feats, lens)
    enc[0, -5:].sum().backward()
    assert feats.grad is not None and feats.grad[0, :8].abs().sum() > 0


# --- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("subsampling", ["conv2d", "stack"])
@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_matches_whole_utterance_lc(subsampling: str, rnn_type: str, seed: int) -> None:
    model = tiny(subsampling=subsampling, rnn_type=rnn_type)
    if seed == 1:  # a sliding-window CMVN carries history from chunk to chunk
        attach_cmvn(model, CMVN(mean=(0.5,) * 20, std=(2.0,) * 20, frames=1, window=50))
    chunk, context = model.config.chunk_size, model.config.right_context
    rng = random.Random(seed)
    stream = BiLSTMCTCStream(model)
    for frames in (rng.randint(150, 400), rng.randint(20, 100)):  # reused after flush
        feats = torch.randn(1, frames, 20)
        with torch.no_grad():
            whole, _ = model.log_probs(feats, torch.tensor([frames]))
        pieces, fed = [], 0
        while fed < frames:
            step = rng.randint(1, 100)
            pieces.append(stream.accept(feats[:, fed : fed + step]))
            fed = min(fed + step, frames)
            # A block is emitted as soon as its right context has arrived, not later.
            available = int(model.subsampling.output_lengths(torch.tensor(fed)))
            emitted = sum(p.shape[1] for p in pieces)
            assert emitted == chunk * max(0, (available - context) // chunk)
        pieces.append(stream.flush())
        streamed = torch.cat(pieces, dim=1)
        assert streamed.shape == whole.shape
        # Not bit-exact: the subsampling's Linear (and conv) run on a few frames at a time
        # while streaming and on the whole utterance offline; oneDNN/MKL choose their blocking
        # from the matrix sizes, so sums round in a different order (~1e-7). The LC blocks
        # themselves are the same tensors going through the same `lc_block`.
        torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("rnn_type", "subsampling"), [("lstm", "conv2d"), ("gru", "stack")])
def test_streams_run_batched_equal_each_alone(rnn_type: str, subsampling: str) -> None:
    # Five streams at different points, fed different amounts each round (some nothing, some
    # under a subsampling window, some several blocks, one joining late and one flushed
    # early): batched subsampling (push_streams) and batched blocks give each stream what it
    # gets alone.
    model = tiny(rnn_type=rnn_type, subsampling=subsampling)
    rng = random.Random(3)
    feats = [torch.randn(1, rng.randint(120, 300), 20) for _ in range(5)]
    alone = []
    with torch.no_grad():
        for f in feats:
            whole, _ = model.log_probs(f, torch.tensor([f.shape[1]]))
            alone.append(whole)
    streams = [BiLSTMCTCStream(model) for _ in feats]
    fed = [0] * 5
    pieces: list[list[torch.Tensor]] = [[] for _ in feats]
    for round_ in range(200):
        active = [i for i in range(5) if fed[i] < feats[i].shape[1] and (i != 4 or round_ > 5)]
        if not active:
            break
        steps = [rng.choice([0, 3, 17, 60]) for _ in active]
        push_streams(
            [streams[i] for i in active],
            [feats[i][:, fed[i] : fed[i] + step] for i, step in zip(active, steps, strict=True)],
        )
        for i, step in zip(active, steps, strict=True):
            fed[i] = min(fed[i] + step, feats[i].shape[1])
        # Half of them read a look-ahead too (the partials of a server's streams, some of
        # which ask for none): their outputs are the same.
        lookahead = [i % 2 == 0 for i in active]
        outputs = run_streams([streams[i] for i in active], lookahead=lookahead)
        for i, out in zip(active, outputs, strict=True):
            pieces[i].append(out)
    for i, stream in enumerate(streams):
        streamed = torch.cat([*pieces[i], stream.flush()], dim=1)
        torch.testing.assert_close(streamed, alone[i], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="same model"):
        run_streams([BiLSTMCTCStream(model), BiLSTMCTCStream(tiny())])
    with pytest.raises(ValueError, match="same module"):
        push_streams([BiLSTMCTCStream(model), BiLSTMCTCStream(tiny())], [feats[0]] * 2)


def test_a_lookahead_reads_the_right_context_as_if_the_audio_ended_there() -> None:
    # After each block, a stream's look-ahead holds the log-probs that the whole-utterance LC
    # forward gives its right-context frames on the audio cut at the block's end (forward
    # state from the chunk, backward from the cut): the provisional reading a partial result
    # shows before the next block has the context to confirm it. What the stream returns is
    # the same with and without it (up to float rounding: the top layer's projection and the
    # head then multiply more rows).
    model = tiny()
    context = model.config.right_context
    field, stride = model.subsampling.receptive_field, model.subsampling.stride
    feats = torch.randn(1, 260, 20)
    plain, ahead = BiLSTMCTCStream(model), BiLSTMCTCStream(model)
    rng = random.Random(5)
    fed, checked = 0, 0
    while fed < feats.shape[1]:
        piece = feats[:, fed : fed + rng.choice([5, 19, 40])]
        fed += piece.shape[1]
        plain.push(piece)
        ahead.push(piece)
        [out] = run_streams([plain])
        [out_ahead] = run_streams([ahead], lookahead=[True])
        torch.testing.assert_close(out_ahead, out, atol=1e-6, rtol=0)
        if not out.shape[1]:
            continue
        assert ahead.lookahead is not None and ahead.lookahead.shape[1] == context
        seen = ahead.frames_emitted + context  # subsampled frames up to the block's end
        cut = field + (seen - 1) * stride  # the fewest feature frames that give them
        with torch.no_grad():
            whole, _ = model.log_probs(feats[:, :cut], torch.tensor([cut]))
        assert whole.shape[1] == seen
        torch.testing.assert_close(ahead.lookahead, whole[:, -context:], atol=1e-5, rtol=0)
        checked += 1
    assert checked >= 3 and plain.lookahead is None
    ahead.flush()
    assert ahead.lookahead is None  # reset
    with pytest.raises(ValueError, match="look-ahead flags"):
        run_streams([plain], lookahead=[True, False])


def test_streams_that_end_flush_batched_with_those_that_go_on() -> None:
    # Streams whose input ends with different amounts left (none, under a chunk, between a
    # chunk and a block, several blocks) flush in one batched call beside a stream that goes
    # on: each gets what it gets alone, the short blocks padded in the batch.
    model = tiny()
    width = model.config.chunk_size + model.config.right_context
    streams = [BiLSTMCTCStream(model) for _ in range(6)]
    feats = [torch.randn(1, n, 20) for n in (0, 13, 30, 75, 210, 300)]
    alone = []
    with torch.no_grad():
        for f in feats[1:]:
            alone.append(model.log_probs(f, torch.tensor([f.shape[1]]))[0])
    for stream, f in zip(streams, feats, strict=True):
        stream.push(f)
    going_on = streams[-1]
    outputs = run_streams(streams, flush=[True] * 5 + [False])
    assert outputs[0].shape[1] == 0  # nothing was pushed: nothing comes out
    for out, whole in zip(outputs[1:5], alone[:4], strict=True):
        torch.testing.assert_close(out, whole, atol=1e-5, rtol=0)
    assert all(s._pending is None and s.frames_emitted == 0 for s in streams[:5])  # reset
    assert going_on._pending is not None and 0 < going_on._pending.shape[1] < width
    rest = run_streams([going_on], flush=[True])[0]
    torch.testing.assert_close(torch.cat([outputs[5], rest], dim=1), alone[4], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="flush flags"):
        run_streams(streams, flush=[True])


def test_streaming_needs_lc_model() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        BiLSTMCTCStream(tiny(**OFFLINE))


def test_streaming_flush_without_input() -> None:
    stream = BiLSTMCTCStream(tiny())
    assert stream.flush().shape == (1, 0, TINY.vocab_size)
    assert stream.accept(torch.randn(1, 3, 20)).shape == (1, 0, TINY.vocab_size)
    assert stream.flush().shape == (1, 0, TINY.vocab_size)  # too short for a window


# --- loss and training -------------------------------------------------------------------------


def test_loss_is_ctc_sum_over_batch_and_counts_infeasible() -> None:
    model = tiny()
    feats, lens = batch([150, 11, 11, 60])  # 36, 2, 2, 14 subsampled frames
    targets = torch.tensor([[1, 2, 3, 4], [5, 5, -1, -1], [5, 6, -1, -1], [1, 2, 3, -1]])
    target_lens = torch.tensor([4, 2, 2, 3])
    out = model(feats, lens, targets, target_lens)
    assert out.loss is not None and out.log_probs is not None
    # [5, 5] needs 3 frames (a blank between the repeats) but has 2; [5, 6] fits in 2.
    raw = F.ctc_loss(
        out.log_probs.transpose(0, 1),
        targets.clamp(min=0),
        out.out_lens,
        target_lens,
        reduction="none",
    )
    assert torch.isinf(raw).tolist() == [False, True, False, False]
    assert out.metrics["ctc_infeasible"] == 1
    expected = raw[~torch.isinf(raw)].sum() / 4
    torch.testing.assert_close(out.loss, expected)
    assert out.metrics["ctc_loss"] == pytest.approx(out.loss.item())
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", ["offline", "lc"])
def test_loss_decreases(mode: str) -> None:
    model = tiny(dropout=0.0, **(OFFLINE if mode == "offline" else {})).train()
    feats, lens = batch([120, 90, 100])
    targets = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, -1, -1], [9, 10, 1, 2, -1]])
    target_lens = torch.tensor([5, 3, 4])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(feats, lens, targets, target_lens)
        assert out.loss is not None and torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_autocast_keeps_log_probs_float32() -> None:
    model = tiny()
    feats, lens = batch([80, 60])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(feats, lens, torch.tensor([[1, 2], [3, -1]]), torch.tensor([2, 1]))
    assert out.log_probs is not None and out.log_probs.dtype == torch.float32
    assert out.loss is not None and torch.isfinite(out.loss)


LETTERS = " 'ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # ids 1..28; 0 is the CTC blank
SHORT_UTTERANCES = [  # the five shortest real clips, 2-3.3 s
    "1089-134691-0000",
    "3752-4944-0002",
    "1089-134686-0001",
    "1988-24833-0000",
    "3752-4944-0000",
]


def greedy_text(log_probs: torch.Tensor) -> str:
    """Best path: argmax per frame, collapse repeats, drop blanks."""
    ids = torch.unique_consecutive(log_probs.argmax(-1))
    return "".join(LETTERS[i - 1] for i in ids.tolist() if i != 0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"subsampling": "stack", **OFFLINE},
        {"subsampling": "conv2d", "subsampling_channels": 8, "chunk_size": 8, "right_context": 4},
    ],
    ids=["offline-stack", "lc-conv2d"],
)
def test_memorises_real_utterances(librispeech_root: Path, overrides: dict[str, Any]) -> None:
    texts = {}
    for path in librispeech_root.rglob("*.trans.txt"):
        for line in path.read_text().splitlines():
            key, text = line.split(" ", 1)
            texts[key] = text
    feats, refs = [], []
    for key in SHORT_UTTERANCES:
        mel = log_mel(load_audio(next(librispeech_root.rglob(f"{key}.flac"))), FeatureConfig())
        feats.append((mel - mel.mean(0)) / mel.std(0))  # per-utterance CMVN: faster to fit
        refs.append(texts[key])
    lens = torch.tensor([f.shape[0] for f in feats])
    targets = pad_sequence(
        [torch.tensor([LETTERS.index(c) + 1 for c in r]) for r in refs],
        batch_first=True,
        padding_value=-1,
    )
    target_lens = torch.tensor([len(r) for r in refs])
    padded = pad_sequence(feats, batch_first=True)

    torch.manual_seed(0)
    config = BiLSTMCTCConfig(
        vocab_size=len(LETTERS) + 1, hidden_size=128, num_layers=2, **overrides
    )
    model = bilstm_ctc(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    cer = 1.0
    for step in range(1, 301):
        out = model(padded, lens, targets, target_lens)
        assert out.loss is not None
        optimizer.zero_grad()
        out.loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step % 20 == 0:
            model.eval()
            with torch.no_grad():
                log_probs, out_lens = model.log_probs(padded, lens)
            model.train()
            hyps = [greedy_text(lp[:n]) for lp, n in zip(log_probs, out_lens, strict=True)]
            cer = jiwer.cer(refs, hyps)
            if cer < 0.05:
                break
    assert cer < 0.05, f"CER {cer:.3f} after {step} steps"


def test_lc_encoder_checks_a_cancel_token_between_blocks() -> None:
    model = tiny().eval()
    feats, lens = batch([200, 120])
    blocks = math.ceil(int(model.encode(feats, lens)[1].max()) / model.config.chunk_size)
    token = CountingToken()
    with torch.no_grad():
        assert torch.equal(model.log_probs(feats, lens, token)[0], model.log_probs(feats, lens)[0])
    assert token.checks == blocks
    with pytest.raises(Cancelled), torch.no_grad():
        model.log_probs(feats, lens, CountingToken(stop_after=2))
