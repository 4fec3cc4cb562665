"""LAS: length bookkeeping, padding invariance, the step interface, losses, and memorisation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from asr.audio import load_audio
from asr.features import FeatureConfig, log_mel
from asr.models.base import ModelOutput
from asr.models.las import (
    LAS,
    PRESETS,
    EncoderOutput,
    LASConfig,
    ListenerKind,
    add_sos_eos,
    las,
)
from asr.tokenizer import SOS_EOS_ID
from asr.training.checkpoint import transfer

VOCAB = 12  # ids 0-2 reserved, 3-11 "characters"
TINY = LASConfig(
    vocab_size=VOCAB,
    input_dim=20,
    listener="conv-pyramid",
    listener_hidden=16,
    listener_layers=2,
    dropout=0.0,
    attention_dim=16,
    location_channels=3,
    location_kernel=5,
    speller_hidden=24,
    speller_layers=2,  # exercises (L, N, H) state with L > 1
    embedding_dim=8,
)
TINY_PYRAMID = replace(TINY, listener="pyramid", listener_layers=4)  # 1 plain + 3 pyramidal


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # These tensors are tiny: OpenMP start-up and, on a shared 2-core runner, thread
    # contention cost far more than a second thread saves (20-100x slower when loaded).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(config: LASConfig = TINY, seed: int = 0) -> LAS:
    torch.manual_seed(seed)
    return las(config).eval()


def batch(
    feat_lens: list[int], target_lens: list[int], input_dim: int = 20, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random features (B, T, F) and targets (B, U) padded with -1 beyond their lengths."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(feat_lens), max(feat_lens), input_dim, generator=gen)
    targets = torch.randint(3, VOCAB, (len(target_lens), max(target_lens)), generator=gen)
    for b, (n, u) in enumerate(zip(feat_lens, target_lens, strict=True)):
        feats[b, n:] = 0.0
        targets[b, u:] = -1
    return feats, torch.tensor(feat_lens), targets, torch.tensor(target_lens)


def edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


# --- config -----------------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    config = replace(TINY, scheduled_sampling=0.2, ctc_weight=0.5)
    assert LASConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown LASConfig fields: nope"):
        LASConfig.from_dict({**config.to_dict(), "nope": 1})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("vocab_size", 3),
        ("listener", "transformer"),
        ("listener_layers", 2),  # pyramid needs its 3 pyramidal layers
        ("location_kernel", 4),
        ("dropout", 1.0),
        ("label_smoothing", -0.1),
        ("scheduled_sampling", 1.5),
        ("ctc_weight", -0.5),
        ("speller_layers", 0),
        ("ctc_upsample", 3),
        ("ctc_layer", 5),  # TINY_PYRAMID has 4 listener layers
        ("ctc_layer", 0),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"invalid LASConfig: (.*; )?{field} must be"):
        replace(TINY_PYRAMID, **{field: value})


def test_presets_build_with_published_sizes() -> None:
    counts = {}
    for name, config in PRESETS.items():
        with torch.device("meta"):  # sizes only: no memory or init time for 150M parameters
            model = las(config)
        counts[name] = sum(p.numel() for p in model.parameters())
    assert 100e6 < counts["librispeech-960h"] < 250e6
    assert 20e6 < counts["librispeech-100h"] < 60e6
    assert counts["cpu-small"] < 6e6


# --- listener -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "feat_lens", "expected"),
    [
        # n // 8: the odd frame before each pyramidal layer is dropped
        (TINY_PYRAMID, [64, 63, 17, 9, 8], [8, 7, 2, 1, 1]),
        # ((n - 7) // 4 + 1) // 2
        (TINY, [71, 64, 15, 14, 11], [8, 7, 1, 1, 1]),
    ],
    ids=["pyramid", "conv-pyramid"],
)
def test_listener_reduces_time_by_8(
    config: LASConfig, feat_lens: list[int], expected: list[int]
) -> None:
    model = make_model(config)
    feats, lens, _, _ = batch(feat_lens, [1] * len(feat_lens))
    enc = model.encode(feats, lens)
    assert enc.lengths.tolist() == expected
    assert enc.memory.shape == (len(feat_lens), max(expected), 2 * config.listener_hidden)
    assert enc.keys.shape == (len(feat_lens), max(expected), config.attention_dim)
    assert enc.ctc_log_probs is not None
    assert enc.ctc_log_probs.shape == (len(feat_lens), max(expected), VOCAB)
    assert enc.mask.sum(1).tolist() == expected
    assert (enc.memory[~enc.mask] == 0).all()
    assert torch.equal(model.listener.output_lengths(lens), enc.lengths)


@pytest.mark.parametrize(("config", "too_short"), [(TINY_PYRAMID, 7), (TINY, 10)])
def test_listener_rejects_utterances_with_no_output_frame(
    config: LASConfig, too_short: int
) -> None:
    feats, lens, _, _ = batch([too_short + 20, too_short], [1, 1])
    with pytest.raises(ValueError, match=f"{too_short} feature frames is too short"):
        make_model(config).encode(feats, lens)


# --- padding invariance and the step interface ----------------------------------------------


@pytest.mark.parametrize("config", [TINY, TINY_PYRAMID], ids=["conv-pyramid", "pyramid"])
def test_padded_batch_matches_each_utterance_alone(config: LASConfig) -> None:
    model = make_model(config)
    feats, lens, targets, target_lens = batch([90, 61, 40], [7, 3, 5])
    together = model(feats, lens, targets, target_lens)
    enc = model.encode(feats, lens)
    ys_in, _ = add_sos_eos(targets, target_lens)
    logits = model.teacher_forced_logits(enc, ys_in)  # (B, U + 1, V)
    losses = []
    for b in range(3):
        n, u = int(lens[b]), int(target_lens[b])
        alone = model(
            feats[b : b + 1, :n], lens[b : b + 1], targets[b : b + 1, :u], target_lens[b : b + 1]
        )
        assert together.log_probs is not None and alone.log_probs is not None
        t = int(together.out_lens[b])
        torch.testing.assert_close(alone.log_probs[0], together.log_probs[b, :t], atol=1e-5, rtol=0)
        enc_b = model.encode(feats[b : b + 1, :n], lens[b : b + 1])
        ys_b, _ = add_sos_eos(targets[b : b + 1, :u], target_lens[b : b + 1])
        torch.testing.assert_close(
            model.teacher_forced_logits(enc_b, ys_b)[0], logits[b, : u + 1], atol=1e-5, rtol=0
        )
        assert alone.loss is not None
        losses.append(alone.loss)
    # Losses are per-utterance sums averaged over the batch.
    assert together.loss is not None
    torch.testing.assert_close(together.loss, torch.stack(losses).mean(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [TINY, TINY_PYRAMID], ids=["conv-pyramid", "pyramid"])
def test_weights_saved_with_the_old_listener_names_still_load(config: LASConfig) -> None:
    # Bundles written before the listener used the shared BiRNN name its directions
    # listener.rnn.layers.N.forward_rnn / backward_rnn; BiRNN renames them on load.
    model = make_model(config)
    old = {
        k.replace(".fwd.", ".forward_rnn.").replace(".bwd.", ".backward_rnn."): v
        for k, v in model.state_dict().items()
    }
    assert "listener.rnn.layers.0.forward_rnn.weight_ih_l0" in old
    assert not any(".fwd." in k or ".bwd." in k for k in old)
    loaded = make_model(config, seed=1)
    loaded.load_state_dict(old)  # strict
    feats, lens, targets, target_lens = batch([90, 61], [7, 3])
    with torch.no_grad():
        expected, got = (
            model(feats, lens, targets, target_lens),
            loaded(feats, lens, targets, target_lens),
        )
    assert expected.loss is not None and got.loss is not None
    assert torch.equal(got.loss, expected.loss)
    assert torch.equal(loaded.encode(feats, lens).memory, model.encode(feats, lens).memory)
    # Fine-tuning from such weights (asr train --init) matches names itself: it too renames.
    tuned = make_model(config, seed=2)
    assert transfer(tuned, old) == []
    assert torch.equal(tuned.encode(feats, lens).memory, model.encode(feats, lens).memory)


def test_add_sos_eos_builds_decoder_input_and_output() -> None:
    targets = torch.tensor([[5, 6, 7, -1], [8, -1, -1, -1]])
    ys_in, ys_out = add_sos_eos(targets, torch.tensor([3, 1]))
    eos = SOS_EOS_ID
    assert ys_in.tolist() == [[eos, 5, 6, 7], [eos, 8, eos, eos]]
    assert ys_out.tolist() == [[5, 6, 7, eos], [8, eos, -1, -1]]


def test_step_reproduces_teacher_forcing_position_by_position() -> None:
    model = make_model()
    feats, lens, targets, target_lens = batch([90, 61, 40], [7, 3, 5])
    enc = model.encode(feats, lens)
    ys_in, _ = add_sos_eos(targets, target_lens)
    expected = model.teacher_forced_logits(enc, ys_in).log_softmax(dim=-1)  # (B, U + 1, V)
    state = model.init_state(enc)
    for u in range(ys_in.shape[1]):
        log_probs, state = model.step(enc, state, ys_in[:, u])
        assert log_probs.shape == (3, VOCAB) and log_probs.dtype == torch.float32
        torch.testing.assert_close(log_probs, expected[:, u], atol=1e-5, rtol=0)


def test_beams_of_copies_match_and_select_gathers_rows() -> None:
    model = make_model()
    beam = 3
    feats, lens, targets, target_lens = batch([90, 61], [4, 4])
    ys_in, _ = add_sos_eos(targets, target_lens)
    enc = model.encode(feats, lens)
    wide = enc.repeat_interleave(beam)
    assert isinstance(wide, EncoderOutput) and wide.memory.shape[0] == 2 * beam
    assert wide.ctc_log_probs is not None and enc.ctc_log_probs is not None
    assert torch.equal(wide.ctc_log_probs[beam], enc.ctc_log_probs[1])

    # A beam search expands the B-row state after the first step: copies behave identically.
    narrow = model.init_state(enc)
    log_probs, narrow = model.step(enc, narrow, ys_in[:, 0])
    expand = torch.arange(2).repeat_interleave(beam)  # (B * beam,)
    state = narrow.select(expand)
    assert state.hidden.shape == (TINY.speller_layers, 2 * beam, TINY.speller_hidden)
    for u in (1, 2):
        log_probs, narrow = model.step(enc, narrow, ys_in[:, u])
        wide_log_probs, state = model.step(wide, state, ys_in[:, u].repeat_interleave(beam))
        torch.testing.assert_close(wide_log_probs, log_probs[expand], atol=1e-6, rtol=0)

    # Different tokens per hypothesis make rows differ; re-ranking within each utterance's
    # beam must carry every row's state along with it.
    tokens = torch.arange(3, 3 + 2 * beam)
    _, state = model.step(wide, state, tokens)
    order = torch.tensor([2, 0, 1, 4, 5, 3])  # stays within each utterance's rows
    next_tokens = torch.full((2 * beam,), 7)
    reference, _ = model.step(wide, state, next_tokens)
    reordered, _ = model.step(wide, state.select(order), next_tokens)
    torch.testing.assert_close(reordered, reference[order], atol=1e-6, rtol=0)


def test_attention_weights_are_a_distribution_over_valid_frames() -> None:
    model = make_model()
    feats, lens, targets, target_lens = batch([90, 61, 40], [7, 3, 5])
    enc = model.encode(feats, lens)
    state = model.init_state(enc)
    ys_in, _ = add_sos_eos(targets, target_lens)
    for u in range(5):  # the initial uniform weights, then each step's
        weights = state.attention  # (B, T')
        assert (weights >= 0).all()
        assert (weights[~enc.mask] == 0).all()
        torch.testing.assert_close(weights.sum(1), torch.ones(3), atol=1e-6, rtol=0)
        if u < 4:
            _, state = model.step(enc, state, ys_in[:, u])
    assert not torch.allclose(state.attention, model.init_state(enc).attention)


def test_greedy_decode_stops_at_the_length_limit() -> None:
    model = make_model()
    feats, lens, _, _ = batch([90, 61, 40], [1, 1, 1])
    hyps = model.greedy_decode(feats, lens, max_len_ratio=0.5)
    limits = (model.listener.output_lengths(lens) * 0.5).ceil().long().tolist()
    assert len(hyps) == 3
    for hyp, limit in zip(hyps, limits, strict=True):
        assert len(hyp) <= limit and SOS_EOS_ID not in hyp


# --- losses -------------------------------------------------------------------------------------


def test_forward_without_targets_returns_ctc_log_probs_only() -> None:
    model = make_model()
    feats, lens, _, _ = batch([90, 61], [1, 1])
    out = model(feats, lens)
    assert isinstance(out, ModelOutput) and out.loss is None
    assert out.log_probs is not None and out.log_probs.shape == (2, 10, VOCAB)
    torch.testing.assert_close(out.log_probs.exp().sum(-1), torch.ones(2, 10))
    assert out.out_lens.tolist() == [10, 7]
    with pytest.raises(ValueError, match="together"):
        model(feats, lens, torch.ones(2, 3, dtype=torch.long))


def test_upsampled_ctc_head_fits_more_tokens_than_listener_frames() -> None:
    feats, lens, _, _ = batch([90, 61], [1, 1])  # 10 and 7 listener frames
    targets = torch.arange(3, 15).repeat(2, 1)  # 12 distinct tokens: more than 10 frames
    target_lens = torch.tensor([12, 12])
    ctc_only = replace(TINY, ctc_weight=1.0)
    plain = make_model(ctc_only)(feats[:1], lens[:1], targets[:1], target_lens[:1]).loss
    assert plain is not None and plain.item() == 0.0  # no CTC path: zero_infinity gives 0

    model = make_model(replace(ctc_only, ctc_upsample=2))
    assert model.ctc_time_reduction == 4
    out = model(feats, lens)
    assert out.log_probs is not None and out.log_probs.shape == (2, 20, VOCAB)
    assert out.out_lens.tolist() == [20, 14]
    torch.testing.assert_close(out.log_probs.exp().sum(-1), torch.ones(2, 20))
    loss = model(feats[:1], lens[:1], targets[:1], target_lens[:1]).loss
    assert loss is not None and 0.0 < loss.item() < float("inf")


@pytest.mark.parametrize(
    ("listener", "layers", "layer", "reduction", "frames"),
    [
        ("conv-pyramid", 2, 1, 4, [21, 14]),  # conv x4, first BiLSTM at 40 ms
        ("pyramid", 4, 2, 2, [45, 30]),  # 1 plain + 3 pyramidal layers: layer 2 halved once
        ("pyramid", 4, 3, 4, [22, 15]),
    ],
)
def test_ctc_head_on_a_shallower_listener_layer(
    listener: ListenerKind, layers: int, layer: int, reduction: int, frames: list[int]
) -> None:
    feats, lens, _, _ = batch([90, 61], [1, 1])
    config = replace(TINY, listener=listener, listener_layers=layers, ctc_layer=layer)
    model = make_model(replace(config, ctc_weight=1.0))
    assert model.ctc_time_reduction == reduction
    out = model(feats, lens)
    assert out.log_probs is not None and out.log_probs.shape == (2, max(frames), VOCAB)
    assert out.out_lens.tolist() == frames
    torch.testing.assert_close(out.log_probs.exp().sum(-1), torch.ones(2, max(frames)))
    # The head reads that layer: the CTC loss trains it and the layers below, none above.
    targets = torch.arange(3, 15).repeat(2, 1)
    loss = model.train()(feats, lens, targets, torch.tensor([12, 9])).loss
    assert loss is not None and 0.0 < loss.item() < float("inf")
    loss.backward()
    rnn_layers = model.listener.rnn.layers
    assert all(p.grad is not None for p in rnn_layers[layer - 1].parameters())
    assert all(p.grad is None for p in rnn_layers[layer:].parameters())
    # The attention decoder still reads the last layer.
    enc = model.eval().encode(feats, lens)
    assert enc.lengths.tolist() == make_model(config).encode(feats, lens).lengths.tolist()


def test_loss_weights_ctc_and_attention() -> None:
    feats, lens, targets, target_lens = batch([90, 61], [5, 3])
    joint = make_model(replace(TINY, ctc_weight=0.3))(feats, lens, targets, target_lens)
    assert joint.loss is not None and torch.isfinite(joint.loss)
    m = joint.metrics
    assert set(m) == {"att_loss", "ctc_loss", "att_acc"} and 0.0 <= m["att_acc"] <= 1.0
    assert joint.loss.item() == pytest.approx(0.7 * m["att_loss"] + 0.3 * m["ctc_loss"], rel=1e-5)

    attention_only = make_model(replace(TINY, ctc_weight=0.0))
    assert attention_only.ctc is None
    out = attention_only(feats, lens, targets, target_lens)
    assert out.log_probs is None and "ctc_loss" not in out.metrics
    assert out.loss is not None and out.loss.item() == pytest.approx(out.metrics["att_loss"])

    ctc_only = make_model(replace(TINY, ctc_weight=1.0))(feats, lens, targets, target_lens)
    assert set(ctc_only.metrics) == {"ctc_loss"}
    assert ctc_only.loss is not None
    assert ctc_only.loss.item() == pytest.approx(ctc_only.metrics["ctc_loss"])


def test_scheduled_sampling_applies_in_training_only() -> None:
    feats, lens, targets, target_lens = batch([90, 61], [6, 4])
    model = make_model(replace(TINY, scheduled_sampling=1.0))
    teacher = make_model(TINY)  # same seed, same weights
    evaluated = model(feats, lens, targets, target_lens).loss
    assert evaluated is not None
    torch.testing.assert_close(evaluated, teacher(feats, lens, targets, target_lens).loss)
    model.train()
    sampled = model(feats, lens, targets, target_lens).loss
    assert sampled is not None and torch.isfinite(sampled)
    assert not torch.allclose(sampled, evaluated)  # an untrained model's argmax != targets
    sampled.backward()


@pytest.mark.parametrize("config", [TINY, TINY_PYRAMID], ids=["conv-pyramid", "pyramid"])
def test_loss_decreases_under_adam(config: LASConfig) -> None:
    model = make_model(config).train()
    feats, lens, targets, target_lens = batch([90, 75, 61, 40], [6, 5, 4, 3])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(feats, lens, targets, target_lens).loss
        assert loss is not None and torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]  # about 0.45 and 0.3 for the two listeners


# --- memorisation -------------------------------------------------------------------------------


def train_until_memorised(
    model: LAS,
    feats: torch.Tensor,
    lens: torch.Tensor,
    targets: list[list[int]],
    max_steps: int,
    lr: float,
) -> float:
    """Adam on one fixed batch until greedy decoding reproduces it; returns the final CER."""
    padded = pad_sequence([torch.tensor(t) for t in targets], batch_first=True, padding_value=-1)
    target_lens = torch.tensor([len(t) for t in targets])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    cer = 1.0
    for step in range(1, max_steps + 1):
        model.train()
        loss = model(feats, lens, padded, target_lens).loss
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step % 10 == 0:
            model.eval()
            hyps = model.greedy_decode(feats, lens)
            errors = sum(edit_distance(h, t) for h, t in zip(hyps, targets, strict=True))
            cer = errors / int(target_lens.sum())
            if cer == 0.0:
                break
    return cer


def test_memorises_two_random_utterances() -> None:
    model = make_model(replace(TINY, label_smoothing=0.0))
    feats, lens, _, _ = batch([80, 60], [1, 1])
    targets = [[3, 4, 5, 6, 7], [8, 9, 10]]
    assert train_until_memorised(model, feats, lens, targets, max_steps=150, lr=1e-2) == 0.0


@pytest.fixture(scope="module")
def shortest_clips(librispeech_root: Path) -> list[tuple[Path, str]]:
    clips = []
    for listing in librispeech_root.rglob("*.trans.txt"):
        for line in listing.read_text().splitlines():
            utt, text = line.split(" ", 1)
            clips.append((listing.parent / f"{utt}.flac", text))
    return sorted(clips, key=lambda clip: len(clip[1]))[:5]  # 2-4.5 s, 23-50 characters


@pytest.mark.slow  # 30-40 s on 2 cores; test_memorises_two_random_utterances is the quick one
def test_memorises_five_real_utterances(shortest_clips: list[tuple[Path, str]]) -> None:
    config = FeatureConfig()
    feats = [log_mel(load_audio(path), config) for path, _ in shortest_clips]  # (T, 80) each
    frames = torch.cat(feats)
    mean, std = frames.mean(0), frames.std(0)
    padded = pad_sequence([(f - mean) / std for f in feats], batch_first=True)
    lens = torch.tensor([f.shape[0] for f in feats])
    texts = [text for _, text in shortest_clips]
    chars = {c: i + 3 for i, c in enumerate(sorted(set("".join(texts))))}
    targets = [[chars[c] for c in text] for text in texts]
    torch.manual_seed(0)
    model = las(
        LASConfig(
            vocab_size=len(chars) + 3,
            listener_hidden=96,
            listener_layers=2,
            dropout=0.0,
            attention_dim=64,
            location_channels=4,
            location_kernel=15,
            speller_hidden=128,
            embedding_dim=32,
            label_smoothing=0.0,
        )
    )
    cer = train_until_memorised(model, padded, lens, targets, max_steps=300, lr=3e-3)
    assert cer < 0.05
