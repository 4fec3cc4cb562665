"""Training augmentation (asr.data.augment): every transform keeps audio finite and its length,
is deterministic per generator seed, and does what it says (SNR, pitch, band limits, warp)."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import soundfile as sf
import torch

from asr.audio import SAMPLE_RATE
from asr.data.augment import (
    NARROWBAND_CODECS,
    WIDEBAND_CODECS,
    AugmentConfig,
    Augmenter,
    Codec,
    add_noise,
    apply_gain,
    codec_round_trip,
    coloured_noise,
    equalize,
    pitch_shift,
    reverberate,
    simulated_rir,
    telephone,
    vtlp,
)
from asr.data.dataset import SpeechDataset
from asr.data.manifest import Utterance
from asr.features import FeatureConfig, log_mel
from asr.training.config import TrainConfig


def _power(x: torch.Tensor) -> float:
    return float(x.double().square().mean())


def _speechlike(seconds: float = 1.5, seed: int = 0) -> torch.Tensor:
    """A harmonic tone with a syllable-rate envelope: voiced-speech-like, cheap, exact."""
    t = torch.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 140 + 20 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / SAMPLE_RATE
    wave = sum(torch.sin(k * phase) / k for k in range(1, 20))
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t).abs()
    gen = torch.Generator().manual_seed(seed)
    return (0.1 * wave * envelope + 1e-3 * torch.randn(t.shape, generator=gen)).float()


def _band_power(wave: torch.Tensor, low: float, high: float) -> float:
    spec = torch.fft.rfft(wave.double()).abs().square()
    freqs = torch.fft.rfftfreq(wave.numel(), 1 / SAMPLE_RATE)
    return float(spec[(freqs >= low) & (freqs < high)].sum())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


WAVE = _speechlike()


def _line(codec: Codec, wave: torch.Tensor, _: torch.Generator) -> torch.Tensor:
    return telephone(wave, codec)


def _codec(codec: Codec, wave: torch.Tensor, _: torch.Generator) -> torch.Tensor:
    return codec_round_trip(wave, codec)


# Each transform as the chain calls it, drawing whatever it needs from the generator.
TRANSFORMS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "pitch": lambda w, g: pitch_shift(w, float(torch.empty(()).uniform_(-3, 3, generator=g))),
    "reverb": lambda w, g: reverberate(w, simulated_rir(0.5, g)),
    "white": lambda w, g: add_noise(w, coloured_noise(w.numel(), 0.0, g), 10.0),
    "pink": lambda w, g: add_noise(w, coloured_noise(w.numel(), 1.0, g), 10.0),
    "brown": lambda w, g: add_noise(w, coloured_noise(w.numel(), 2.0, g), 10.0),
    "equalizer": lambda w, g: equalize(w, [(800.0, 9.0, 1.0), (3000.0, -9.0, 0.7)], 4000.0),
    "telephone": lambda w, g: telephone(w),
    **{f"telephone-{c}": functools.partial(_line, c) for c in NARROWBAND_CODECS},
    **{c: functools.partial(_codec, c) for c in WIDEBAND_CODECS},
    "gain": lambda w, g: apply_gain(w, 12.0),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transform_keeps_length_is_finite_and_deterministic(name: str) -> None:
    first = TRANSFORMS[name](WAVE.clone(), _gen(3))
    again = TRANSFORMS[name](WAVE.clone(), _gen(3))
    assert first.shape == WAVE.shape and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.equal(first, WAVE)  # it did something


@pytest.mark.parametrize("colour", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("snr", [0.0, 7.5, 20.0])
def test_noise_hits_the_requested_snr(colour: float, snr: float) -> None:
    noise = coloured_noise(WAVE.numel(), colour, _gen(1))
    noisy = add_noise(WAVE, noise, snr)
    measured = 10 * math.log10(_power(WAVE) / _power(noisy - WAVE))
    assert abs(measured - snr) < 1.0


def test_coloured_noise_slopes_down_with_its_exponent() -> None:
    # Power in 4-8 kHz relative to 125-250 Hz: white has far more on top, brown far less.
    ratios = [
        _band_power(n, 4000, 8000) / _band_power(n, 125, 250)
        for n in (coloured_noise(32000, e, _gen(0)) for e in (0.0, 1.0, 2.0))
    ]
    assert ratios[0] > 10 * ratios[1] > 100 * ratios[2]


@pytest.mark.parametrize("semitones", [-3.0, 2.0, 4.0])
def test_pitch_shift_moves_a_tone_and_keeps_duration(semitones: float) -> None:
    t = torch.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = 0.3 * torch.sin(2 * math.pi * 200 * t)
    shifted = pitch_shift(tone, semitones)
    spectrum = torch.fft.rfft(shifted[2000:-2000]).abs()
    peak = float(spectrum.argmax()) * SAMPLE_RATE / (tone.numel() - 4000)
    assert peak == pytest.approx(200 * 2 ** (semitones / 12), rel=0.02)
    assert shifted.numel() == tone.numel()
    assert _power(shifted) == pytest.approx(_power(tone), rel=1e-3)


def test_simulated_rir_decays_at_its_rt60() -> None:
    rir = simulated_rir(0.4, _gen(0))
    assert rir[0] == 1.0 and int(rir.abs().argmax()) == 0  # the direct path leads
    energy = rir[1:].square().flip(0).cumsum(0).flip(0)  # Schroeder backward integral
    db = 10 * torch.log10(energy / energy[0])
    t_20 = int((db < -20).nonzero()[0]) / SAMPLE_RATE  # time to fall 20 dB
    assert 3 * t_20 == pytest.approx(0.4, rel=0.25)


def test_reverb_smears_in_time_at_the_same_level() -> None:
    click = torch.zeros(8000)
    click[1000] = 1.0
    wet = reverberate(click, simulated_rir(0.5, _gen(0)))
    assert int(wet.abs().argmax()) == 1000  # aligned on the direct path
    assert float(wet[3000:].abs().sum()) > 0  # a tail 125 ms later
    assert _power(wet) == pytest.approx(_power(click), rel=1e-4)


def test_telephone_removes_the_band_above_4khz() -> None:
    noise = coloured_noise(32000, 0.0, _gen(0))
    line = telephone(noise)
    assert _band_power(line, 4200, 8000) < 1e-3 * _band_power(noise, 4200, 8000)
    assert _band_power(line, 1000, 3000) > 0.3 * _band_power(noise, 1000, 3000)


def test_equalizer_lowpass_cuts_the_top() -> None:
    noise = coloured_noise(32000, 0.0, _gen(0))
    out = equalize(noise, [], 3000.0)
    assert _band_power(out, 6000, 8000) < 0.05 * _band_power(noise, 6000, 8000)


def test_gain_scales_and_clips_at_full_scale() -> None:
    assert torch.allclose(apply_gain(WAVE, -6.0), WAVE * 10 ** (-6 / 20))
    loud = apply_gain(WAVE, 40.0)
    assert float(loud.abs().max()) == 1.0


def test_vtlp_moves_formants_in_the_right_direction() -> None:
    config = FeatureConfig()
    feats = log_mel(_speechlike(), config)
    assert torch.equal(vtlp(feats, 1.0, config), feats)
    centroid = torch.arange(feats.shape[1], dtype=torch.float32)

    def mean_bin(f: torch.Tensor) -> float:
        weights = f.exp()
        return float((weights * centroid).sum() / weights.sum())

    up, down = vtlp(feats, 1.15, config), vtlp(feats, 0.85, config)
    assert up.shape == feats.shape and torch.isfinite(up).all()
    assert mean_bin(down) < mean_bin(feats) < mean_bin(up)


def _write(path: Path, wave: torch.Tensor, rate: int = SAMPLE_RATE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave.numpy(), rate)
    return str(path)


def test_augmenter_chain_is_deterministic_and_keeps_shape(tmp_path: Path) -> None:
    babble = [_write(tmp_path / f"b{i}.flac", _speechlike(1.0 + i / 3, seed=i)) for i in range(4)]
    # Every augmentation on, to exercise the whole chain.
    config = AugmentConfig.from_dict(
        {name: 1.0 for name in vars(AugmentConfig()) if name.endswith("prob")}
    )
    augmenter = Augmenter(config, FeatureConfig(), babble=babble)
    outs = [augmenter.wave(WAVE.clone(), _gen(seed)) for seed in (0, 0, 1)]
    assert all(o.shape == WAVE.shape and torch.isfinite(o).all() for o in outs)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    feats = log_mel(outs[0], FeatureConfig())
    assert torch.equal(augmenter.features(feats, _gen(0)), augmenter.features(feats, _gen(0)))


def test_noise_and_rir_directories(tmp_path: Path) -> None:
    # A long 8 kHz stereo noise recording (read in segments) and a measured RIR at 22.05 kHz.
    noise = torch.stack([coloured_noise(80000, 1.0, _gen(0))] * 2, dim=1) * 0.1
    _write(tmp_path / "noise" / "street" / "n1.wav", noise, 8000)
    rir = torch.zeros(4410)
    rir[100], rir[900] = 1.0, 0.5
    _write(tmp_path / "rirs" / "hall.wav", rir, 22050)
    config = AugmentConfig(
        prob=1.0,
        noise_prob=1.0,
        noise_kinds=("file",),
        noise_dir=str(tmp_path / "noise"),
        snr_db=(10.0, 10.0),
        reverb_prob=1.0,
        rir_dir=str(tmp_path / "rirs"),
        pitch_prob=0.0,
        eq_prob=0.0,
        telephone_prob=0.0,
        codec_prob=0.0,
        gain_prob=0.0,
    )
    augmenter = Augmenter(config, FeatureConfig())
    out = augmenter.wave(WAVE, _gen(0))
    assert out.shape == WAVE.shape and torch.isfinite(out).all()
    assert torch.equal(out, augmenter.wave(WAVE, _gen(0)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"noise_prob": 1.5}, "noise_prob"),
        ({"prob": -0.1}, "prob"),
        ({"snr_db": (20.0, 5.0)}, "snr_db"),
        ({"noise_kinds": ("file",)}, "noise_kinds"),
        ({"noise_kinds": ("hum",)}, "noise_kinds"),
        ({"lowpass_hz": (3000.0, 9000.0)}, "lowpass_hz"),
        ({"rt60": (0.0, 0.5)}, "rt60"),
        ({"babble_talkers": (5, 2)}, "babble_talkers"),
        ({"vtlp_alpha": (1.2, 0.9)}, "vtlp_alpha"),
    ],
)
def test_bad_config_is_named(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AugmentConfig(**overrides)  # type: ignore[arg-type]


def test_bad_directories_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"noise_dir .* is not a directory"):
        Augmenter(AugmentConfig(noise_dir=str(tmp_path / "missing")), FeatureConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"rir_dir .* holds no audio"):
        Augmenter(AugmentConfig(rir_dir=str(tmp_path / "empty")), FeatureConfig())
    with pytest.raises(ValueError, match="babble"):
        Augmenter(AugmentConfig(noise_kinds=("babble",)), FeatureConfig())


def test_train_config_reads_augment_from_json() -> None:
    """`--set augment={...}` and checkpoints give JSON, where tuples are lists."""
    config = TrainConfig(augment=AugmentConfig(snr_db=(0.0, 10.0)))
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.augment is not None
    assert again.augment.snr_db == (0.0, 10.0)
    assert TrainConfig.from_dict({"augment": {}}).augment == AugmentConfig()


class _Chars:
    """The smallest tokenizer SpeechDataset needs."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 32 + 1 for c in text]


def test_dataset_items_repeat_per_seed_epoch_and_index(tmp_path: Path) -> None:
    paths = [_write(tmp_path / f"u{i}.flac", _speechlike(1.0, seed=i)) for i in range(3)]
    utts = [Utterance(f"u{i}", path, 1.0, "HI", "s") for i, path in enumerate(paths)]
    dataset = SpeechDataset(
        utts,
        _Chars(),  # type: ignore[arg-type]
        FeatureConfig(),
        train=True,
        augment=AugmentConfig(),
        seed=7,
    )
    first = dataset[1].feats
    assert torch.equal(first, dataset[1].feats)
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[1].feats)
    dataset.set_epoch(0)
    assert torch.equal(first, dataset[1].feats)
    plain = SpeechDataset(utts, _Chars(), FeatureConfig(), train=False, augment=AugmentConfig())  # type: ignore[arg-type]
    assert plain.augmenter is None  # evaluation data is never augmented
