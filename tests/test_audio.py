from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from asr.audio import SAMPLE_RATE, AudioError, decode_pcm16, load_audio


def _tone(rate: int, seconds: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    mono = 0.5 * np.sin(2 * math.pi * 440.0 * t).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def _encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("WAV", "FLOAT")]
)
def test_decodes_containers_from_bytes(fmt: str, subtype: str) -> None:
    wave = load_audio(_encode(_tone(SAMPLE_RATE), SAMPLE_RATE, fmt, subtype))
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(wave.numel() - SAMPLE_RATE // 2) <= 2
    # A 440 Hz tone survives: its energy is near the encoded amplitude (lossy OGG included).
    assert 0.3 < float(wave.abs().max()) < 0.6


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 32000, 44100, 48000])
def test_resamples_every_supported_rate_to_16k(rate: int) -> None:
    wave = load_audio(_encode(_tone(rate, 1.0), rate, "WAV"))
    assert abs(wave.numel() - SAMPLE_RATE) <= 1
    spectrum = torch.fft.rfft(wave).abs()
    assert abs(int(spectrum.argmax()) - 440) <= 2  # 1 s of audio: 1 Hz per bin


def test_stereo_is_mixed_to_mono(tmp_path: Path) -> None:
    left = _tone(SAMPLE_RATE)
    stereo = np.stack([left, np.full_like(left, 0.25)], axis=1)
    path = tmp_path / "stereo.flac"
    sf.write(path, stereo, SAMPLE_RATE)
    wave = load_audio(path)
    expected = torch.from_numpy(stereo.mean(axis=1))
    assert torch.allclose(wave, expected, atol=1e-4)


def test_real_librispeech_flac(real_flac: Path) -> None:
    wave = load_audio(real_flac)
    info = sf.info(real_flac)
    assert wave.numel() == info.frames
    assert 0.01 < float(wave.abs().max()) <= 1.0


def test_pcm16_decoding_and_rate() -> None:
    samples = (np.arange(-800, 800, dtype=np.int16) * 20).astype("<i2")
    wave = decode_pcm16(samples.tobytes(), SAMPLE_RATE)
    assert torch.allclose(wave, torch.from_numpy(samples.astype(np.float32) / 32768.0))
    stereo = np.stack([samples, samples], axis=1).tobytes()
    assert decode_pcm16(stereo, 8000, channels=2).numel() == 2 * samples.size


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (b"", "empty input"),
        (b"RIFF....WAVEfmt garbage that is not audio at all", "cannot decode"),
        (bytes(range(256)) * 8, "cannot decode"),
    ],
)
def test_bad_bytes(source: bytes, reason: str) -> None:
    with pytest.raises(AudioError, match=reason) as err:
        load_audio(source, name="upload.wav")
    assert str(err.value).startswith("upload.wav: ")


def test_zero_length_audio() -> None:
    empty = _encode(np.zeros(0, dtype=np.float32), SAMPLE_RATE, "WAV")
    with pytest.raises(AudioError, match="zero-length"):
        load_audio(empty)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(bad: float) -> None:
    samples = _tone(SAMPLE_RATE)
    samples[100] = bad
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(_encode(samples, SAMPLE_RATE, "WAV", "FLOAT"))


@pytest.mark.parametrize("rate", [4000, 7999, 48001, 96000])
def test_unsupported_rates(rate: int) -> None:
    with pytest.raises(AudioError, match=f"unsupported sample rate {rate} Hz"):
        load_audio(_encode(_tone(rate, 0.1), rate, "WAV"))
    with pytest.raises(AudioError, match="unsupported sample rate"):
        decode_pcm16(b"\x00\x01" * 100, rate)


def test_missing_empty_and_directory_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nope.flac"
    with pytest.raises(AudioError, match="file not found") as err:
        load_audio(missing)
    assert str(missing) in str(err.value)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match="empty file"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)


def test_truncated_flac_is_an_audio_error(real_flac: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.flac"
    cut.write_bytes(real_flac.read_bytes()[:20000])
    with pytest.raises(AudioError, match=str(cut)):
        load_audio(cut)


def test_bad_pcm_length() -> None:
    with pytest.raises(AudioError, match="not a whole number"):
        decode_pcm16(b"\x00\x01\x02", SAMPLE_RATE)
    with pytest.raises(AudioError, match="not a whole number"):
        decode_pcm16(b"\x00\x01" * 3, SAMPLE_RATE, channels=2)
    with pytest.raises(AudioError, match="empty"):
        decode_pcm16(b"", SAMPLE_RATE)
