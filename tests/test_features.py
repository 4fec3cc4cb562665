from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from asr.audio import SAMPLE_RATE, load_audio
from asr.features import (
    CMVN,
    CMVNAccumulator,
    FeatureConfig,
    SpecAugmentConfig,
    StreamingFeatures,
    _smoothing,
    accept_features,
    log_mel,
    mel_centres,
    spec_augment,
    speed_perturb,
)

CONFIG = FeatureConfig()


@pytest.fixture(scope="module")
def speech(real_flac: Path) -> torch.Tensor:
    return load_audio(real_flac)


def test_shapes_follow_snip_edges_framing(speech: torch.Tensor) -> None:
    feats = log_mel(speech, CONFIG)
    assert feats.shape == (1 + (speech.numel() - 400) // 160, 80)
    assert CONFIG.num_frames(speech.numel()) == feats.shape[0]
    assert torch.isfinite(feats).all()
    assert log_mel(speech[:399], CONFIG).shape == (0, 80)
    assert CONFIG.num_frames(400) == 1 and CONFIG.num_frames(560) == 2


def test_matches_kaldi_fbank_framing_and_tracks_its_values(speech: torch.Tensor) -> None:
    # Same frames as Kaldi (snip_edges); values differ by window/mel conventions but must be
    # strongly correlated per frame, which catches framing or transposition mistakes.
    ours = log_mel(speech, CONFIG)
    ref = kaldi.fbank(speech[None] * 32768, num_mel_bins=80, dither=0.0, energy_floor=1e-10)
    assert ours.shape == ref.shape
    frame_energy = torch.corrcoef(torch.stack([ours.mean(1), ref.mean(1)]))[0, 1]
    assert frame_energy > 0.98


def test_batched_equals_single(speech: torch.Tensor) -> None:
    a, b = speech[:16000], speech[16000:32000]
    batch = log_mel(torch.stack([a, b]), CONFIG)
    assert torch.allclose(batch[0], log_mel(a, CONFIG), atol=1e-4)
    assert torch.allclose(batch[1], log_mel(b, CONFIG), atol=1e-4)


@pytest.mark.parametrize("chunk_ms", [20, 30, 100, 160, 250, 1000])
def test_streaming_equals_offline(speech: torch.Tensor, chunk_ms: int) -> None:
    chunk = SAMPLE_RATE * chunk_ms // 1000
    stream = StreamingFeatures(CONFIG)
    parts = [stream.accept(speech[i : i + chunk]) for i in range(0, speech.numel(), chunk)]
    streamed = torch.cat(parts)
    offline = log_mel(speech, CONFIG)
    assert streamed.shape == offline.shape
    assert (streamed - offline).abs().max() < 1e-4
    assert stream.frames_emitted == offline.shape[0]


def test_streaming_with_random_chunk_sizes(speech: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(3)
    stream, parts, pos = StreamingFeatures(CONFIG), [], 0
    while pos < speech.numel():
        size = int(torch.randint(1, 16000, (1,), generator=gen))  # 1 sample to 1 s
        parts.append(stream.accept(speech[pos : pos + size]))
        pos += size
    assert (torch.cat(parts) - log_mel(speech, CONFIG)).abs().max() < 1e-4


def test_streams_batched_equal_each_alone(speech: torch.Tensor) -> None:
    # Streams of different lengths cut at different points, one with less than a window
    # (no frames yet): batched, each gets exactly the frames it gets alone, and keeps the
    # same leftover samples for its next call.
    gen = torch.Generator().manual_seed(5)
    cuts = [(0, 1600), (7000, 7300), (20000, 23333), (41000, 41100), (50000, 58000)]
    batched = [StreamingFeatures(CONFIG) for _ in cuts]
    alone = [StreamingFeatures(CONFIG) for _ in cuts]
    for _ in range(3):
        chunks = [speech[a:b] for a, b in cuts]
        together = accept_features(batched, chunks)
        for stream, chunk, feats in zip(alone, chunks, together, strict=True):
            own = stream.accept(chunk)
            assert feats.shape == own.shape
            assert torch.allclose(feats, own, atol=1e-4)
        cuts = [(b, b + int(torch.randint(100, 3000, (1,), generator=gen))) for _, b in cuts]
    assert [s.frames_emitted for s in batched] == [s.frames_emitted for s in alone]
    assert all(torch.equal(s._buffer, t._buffer) for s, t in zip(batched, alone, strict=True))
    assert accept_features([StreamingFeatures(CONFIG)], [speech[:100]])[0].shape == (0, 80)
    with pytest.raises(ValueError, match="same feature config"):
        accept_features(
            [StreamingFeatures(CONFIG), StreamingFeatures(FeatureConfig(40))], [speech] * 2
        )


def test_dither_only_in_training() -> None:
    silence = torch.zeros(16000)
    inference = log_mel(silence, CONFIG)
    assert torch.equal(inference, torch.full_like(inference, float(torch.log(torch.tensor(1e-10)))))
    trained = log_mel(silence, CONFIG, train=True, generator=torch.Generator().manual_seed(0))
    assert trained.std() > 0.1  # dither lifts silence off the floor
    again = log_mel(silence, CONFIG, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(trained, again)


def test_cepstral_smoothing_keeps_the_envelope_and_drops_the_harmonics() -> None:
    """A 120 Hz pulse train (a voice's harmonics) through a two-formant resonator: with the
    first 20 cepstra the harmonic ripple between mel bins goes, the formant peaks stay."""
    t = torch.arange(SAMPLE_RATE) / SAMPLE_RATE
    voice = torch.zeros_like(t)
    for f in range(120, 4000, 120):
        voice += torch.sin(2 * torch.pi * f * t) * (4 * math.exp(-(((f - 700) / 150) ** 2)) + 1)
    smooth_cfg = FeatureConfig(cepstra=20)
    plain, smooth = log_mel(voice, CONFIG).mean(0), log_mel(voice, smooth_cfg).mean(0)
    assert smooth.shape == plain.shape == (80,)
    # The ripple: second differences across bins, large where harmonics are resolved.
    ripple = lambda x: (x[2:] - 2 * x[1:-1] + x[:-2]).abs()[:30].mean()  # noqa: E731
    assert ripple(smooth) < 0.3 * ripple(plain)
    # The formant (25x the power at 700 Hz: 3.2 nats) survives the smoothing.
    centres = mel_centres(CONFIG)
    peak = int((centres - 700).abs().argmin())
    assert smooth[peak] > smooth[(centres > 2000).nonzero()[0, 0]] + 2
    # It is a projection: smoothing twice changes nothing; all cepstra is the identity.
    again = log_mel(voice, smooth_cfg) @ _smoothing(smooth_cfg)
    torch.testing.assert_close(again, log_mel(voice, smooth_cfg), atol=1e-3, rtol=0)
    torch.testing.assert_close(
        log_mel(voice, FeatureConfig(cepstra=80)), log_mel(voice, CONFIG), atol=1e-3, rtol=0
    )
    # Streaming stays exact (each frame is smoothed on its own).
    stream = StreamingFeatures(smooth_cfg)
    pieces = [stream.accept(c) for c in voice.split(2777)]
    torch.testing.assert_close(torch.cat(pieces), log_mel(voice, smooth_cfg), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cepstra"):
        FeatureConfig(cepstra=81)


def test_cmvn_records_its_features_and_checks_them(tmp_path: Path) -> None:
    cmvn = CMVN(mean=(0.0,) * 80, std=(1.0,) * 80, frames=5, features=FeatureConfig(cepstra=13))
    cmvn.save(tmp_path / "cmvn.json")
    assert CMVN.load(tmp_path / "cmvn.json") == cmvn
    wrong = CMVN(mean=(0.0,) * 3, std=(1.0,) * 3, frames=5, features=FeatureConfig(cepstra=13))
    wrong.save(tmp_path / "wrong.json")
    with pytest.raises(ValueError, match="3 dimensions for 80 bins"):
        CMVN.load(tmp_path / "wrong.json")


def test_cmvn_normalises_and_round_trips(speech: torch.Tensor, tmp_path: Path) -> None:
    acc = CMVNAccumulator(80)
    for part in (speech[:50000], speech[50000:]):
        acc.add(log_mel(part, CONFIG))
    cmvn = acc.result()
    feats = torch.cat([log_mel(speech[:50000], CONFIG), log_mel(speech[50000:], CONFIG)])
    assert cmvn.frames == feats.shape[0] and len(cmvn.mean) == 80
    assert torch.allclose(torch.tensor(cmvn.mean), feats.double().mean(0).float(), atol=1e-4)
    normed = cmvn.apply(feats)
    assert normed.mean(0).abs().max() < 1e-3
    assert (normed.std(0, unbiased=False) - 1).abs().max() < 1e-3
    cmvn.save(tmp_path / "cmvn.json")
    assert CMVN.load(tmp_path / "cmvn.json") == cmvn


def test_cmvn_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no frames"):
        CMVNAccumulator(80).result()
    bad = tmp_path / "bad.json"
    bad.write_text('{"mean": [0.0], "std": [0.0], "frames": 1}')
    with pytest.raises(ValueError, match="non-positive std"):
        CMVN.load(bad)
    bad.write_text("not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        CMVN.load(bad)


SLIDING = CMVN(mean=(1.0, -2.0, 0.5), std=(2.0, 1.0, 4.0), frames=10, window=7, prior_frames=3)


def test_sliding_cmvn_subtracts_the_causal_window_mean() -> None:
    feats = torch.randn(2, 30, 3) * 3 + 5
    glob = (feats - torch.tensor(SLIDING.mean)) / torch.tensor(SLIDING.std)
    window_means = [glob[:, max(0, t - 6) : t + 1].sum(1) / (min(t + 1, 7) + 3) for t in range(30)]
    expected = glob - torch.stack(window_means, dim=1)
    torch.testing.assert_close(SLIDING.apply(feats), expected)
    # A constant offset (a channel, a level) is gone once the window has filled, but for the
    # prior's share (3 of 7 + 3 frames)...
    shifted = SLIDING.apply(feats + 4.0) - SLIDING.apply(feats)
    residual = 4.0 / torch.tensor(SLIDING.std) * 3 / 10
    torch.testing.assert_close(shifted[:, 6:], residual.expand(2, 24, 3))
    # ...and a frame never sees the future: padding a batch changes nothing before it.
    padded = torch.cat([feats, torch.zeros(2, 9, 3)], dim=1)
    torch.testing.assert_close(SLIDING.apply(padded)[:, :30], SLIDING.apply(feats))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sliding_cmvn_streams_exactly_as_the_whole(seed: int) -> None:
    rng = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, 60, 3, generator=rng)
    cuts = sorted(torch.randint(0, 61, (5,), generator=rng).tolist())
    stream = SLIDING.stream()
    pieces = [stream(feats[:, a:b]) for a, b in zip([0, *cuts], [*cuts, 60], strict=True)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), SLIDING.apply(feats), atol=1e-6, rtol=0)


def test_sliding_cmvn_round_trips_and_old_files_load(tmp_path: Path) -> None:
    SLIDING.save(tmp_path / "cmvn.json")
    assert CMVN.load(tmp_path / "cmvn.json") == SLIDING
    old = tmp_path / "old.json"
    old.write_text('{"mean": [0.0], "std": [1.0], "frames": 1}')  # written before windows
    assert CMVN.load(old).window == 0
    old.write_text('{"mean": [0.0], "std": [1.0], "frames": 1, "window": -3}')
    with pytest.raises(ValueError, match=">= 0"):
        CMVN.load(old)


def test_spec_augment_masks_within_limits() -> None:
    feats = torch.randn(500, 80) + 10.0  # offset so masked (zeroed) cells are unambiguous
    config = SpecAugmentConfig(freq_masks=2, freq_width=27, time_masks=2, time_width=40)
    for seed in range(20):
        out = spec_augment(feats, config, generator=torch.Generator().manual_seed(seed))
        zero_bins = (out == 0).all(dim=0).sum()
        zero_frames = (out == 0).all(dim=1).sum()
        assert zero_bins <= 2 * 27 and zero_frames <= 2 * 40
        assert torch.equal(out[out != 0], feats[out != 0])
    assert not torch.equal(
        spec_augment(feats, config, torch.Generator().manual_seed(1)),
        spec_augment(feats, config, torch.Generator().manual_seed(2)),
    )
    assert (feats != 0).all()  # input untouched


def test_spec_augment_time_ratio_protects_short_utterances() -> None:
    feats = torch.ones(20, 80)
    config = SpecAugmentConfig(freq_masks=0, time_masks=5, time_width=100, time_ratio=0.1)
    for seed in range(10):
        out = spec_augment(feats, config, torch.Generator().manual_seed(seed))
        assert (out == 0).all(dim=1).sum() <= 5 * 2


@pytest.mark.parametrize("factor", [0.9, 1.0, 1.1])
def test_speed_perturb_changes_length(speech: torch.Tensor, factor: float) -> None:
    out = speed_perturb(speech, factor)
    assert abs(out.numel() - speech.numel() / factor) <= 2
