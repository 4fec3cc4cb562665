from __future__ import annotations

import io
import math
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

import asr.audio
from asr.audio import (
    MAX_CHANNELS,
    SAMPLE_RATE,
    AudioError,
    PCMStream,
    StreamingResampler,
    as_samples,
    decode_pcm16,
    load_audio,
    read_blocks,
)


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


# -- untrusted input cannot exhaust memory ---------------------------------------------------


def _forge_flac_length(flac: bytes, total: int) -> bytes:
    """Rewrite the 36-bit total-samples field of a FLAC's STREAMINFO (FLAC format spec:
    "fLaC", a 4-byte block header, then the 34-byte STREAMINFO body whose bits 108..143 are
    total samples: the low 4 bits of body byte 13 and body bytes 14..17)."""
    data = bytearray(flac)
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    body = 8
    data[body + 13] = (data[body + 13] & 0xF0) | (total >> 32)
    data[body + 14 : body + 18] = (total & 0xFFFFFFFF).to_bytes(4, "big")
    return bytes(data)


def _traced_peak(fn: object) -> tuple[BaseException, int]:
    """Run `fn` expecting AudioError -> (the error, peak bytes tracemalloc saw, numpy's
    allocations included)."""
    tracemalloc.start()
    try:
        with pytest.raises(AudioError) as err:
            fn()  # type: ignore[operator]
        return err.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def silent_hour_flac() -> bytes:
    """One hour of 16 kHz digital silence as FLAC (~180 KB), written a minute at a time."""
    buf = io.BytesIO()
    minute = np.zeros(60 * SAMPLE_RATE, dtype=np.float32)
    with sf.SoundFile(buf, "w", SAMPLE_RATE, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(60):
            f.write(minute)
    return buf.getvalue()


def test_forged_flac_length_is_rejected_from_the_header() -> None:
    forged = _forge_flac_length(_encode(_tone(SAMPLE_RATE, 1.0), SAMPLE_RATE, "FLAC"), 2**36 - 1)
    assert sf.info(io.BytesIO(forged)).frames == 2**36 - 1  # the forgery is what libsndfile reads
    # sf.read would have allocated 2^36 float32 samples (256 GiB) for this 1 s file.
    err, peak = _traced_peak(lambda: load_audio(forged, name="forged.flac"))
    assert "declares 4294967 s of audio" in str(err) and "bytes can hold" in str(err)
    assert peak < 5_000_000
    err, peak = _traced_peak(lambda: load_audio(forged, name="forged.flac", max_seconds=600))
    assert "declares 4294967 s of audio, more than the 600 s allowed" in str(err)
    assert peak < 5_000_000


def test_hour_of_silence_is_rejected_without_decoding_it(silent_hour_flac: bytes) -> None:
    err, peak = _traced_peak(lambda: load_audio(silent_hour_flac, max_seconds=600))
    assert "declares 3600 s of audio, more than the 600 s allowed" in str(err)
    assert peak < 5_000_000
    # With the length unknown (total samples 0, as a streaming encoder writes it), decoding
    # stops as soon as it passes the cap: the full decode would be 230 MB of float32.
    unknown = _forge_flac_length(silent_hour_flac, 0)
    err, peak = _traced_peak(lambda: load_audio(unknown, name="silence.flac", max_seconds=600))
    assert str(err) == "silence.flac: is longer than the 600 s allowed"
    assert peak < 50_000_000


def test_expansion_cap_stops_a_stream_without_a_length(
    silent_hour_flac: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No real encoder reaches MAX_EXPANSION (see its comment), so lower it to see the
    # running check fire on a stream whose header gives no length.
    monkeypatch.setattr(asr.audio, "MAX_EXPANSION", 100)
    unknown = _forge_flac_length(silent_hour_flac, 0)
    err, peak = _traced_peak(lambda: load_audio(unknown))
    assert "decodes to more than 100x its size" in str(err)
    assert peak < 50_000_000


def test_compressible_real_audio_stays_under_the_expansion_cap() -> None:
    # The most compressible inputs measured for MAX_EXPANSION: digital silence, many channels.
    silence = np.zeros((10 * 48_000, 8), dtype=np.float32)
    for fmt, subtype in [("FLAC", "PCM_16"), ("OGG", "VORBIS")]:
        data = _encode(silence, 48_000, fmt, subtype)
        assert silence.size * 4 / len(data) < asr.audio.MAX_EXPANSION / 2
        assert load_audio(data).numel() == 10 * SAMPLE_RATE


def test_long_audio_decodes_across_blocks_like_one_read(
    real_flac: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(asr.audio, "DECODE_BLOCK_SAMPLES", 1000)  # many blocks
    whole, _ = sf.read(real_flac, dtype="float32")
    assert torch.equal(load_audio(real_flac), torch.from_numpy(whole))
    assert torch.equal(
        load_audio(real_flac, max_seconds=len(whole) / SAMPLE_RATE), load_audio(real_flac)
    )
    with pytest.raises(AudioError, match="longer than the 1 s allowed"):
        load_audio(_forge_flac_length(real_flac.read_bytes(), 0), max_seconds=1)


def test_as_samples_caps_arrays_too() -> None:
    with pytest.raises(AudioError, match="longer than the 1 s allowed"):
        as_samples(np.zeros(SAMPLE_RATE + 1, dtype=np.float32), max_seconds=1)
    assert as_samples(np.zeros(SAMPLE_RATE, dtype=np.float32), max_seconds=1).numel() == SAMPLE_RATE


def _mutations(data: bytes) -> Iterator[bytes]:
    """Deterministic damage: truncations, single bit flips over the header and body, and
    garbage behind the real magic bytes."""
    for end in range(1, len(data), max(1, len(data) // 40)):
        yield data[:end]
    positions = list(range(min(96, len(data)))) + list(
        range(96, len(data), max(1, len(data) // 40))
    )
    for i, pos in enumerate(positions):
        flipped = bytearray(data)
        flipped[pos] ^= 1 << (i % 8)
        yield bytes(flipped)
    rng = np.random.default_rng(0)
    for n in (16, 100, 1000):
        yield data[:12] + rng.integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.mark.parametrize(("fmt", "subtype"), [("WAV", "PCM_16"), ("FLAC", "PCM_16")])
def test_damaged_files_raise_audio_error_and_nothing_else(fmt: str, subtype: str) -> None:
    original = _encode(_tone(22_050, 0.2, channels=2), 22_050, fmt, subtype)
    failures = 0
    for damaged in _mutations(original):
        try:
            wave = load_audio(damaged, name="damaged")
        except AudioError as err:
            assert str(err).startswith("damaged: ")
            failures += 1
        else:  # damage in the samples themselves may still decode
            assert wave.dtype == torch.float32 and wave.ndim == 1 and wave.numel() > 0
    assert failures > 20  # the mutations did reach the decoder's checks


def test_read_blocks_maps_errors_and_joins_to_load_audio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tone.flac"
    sf.write(path, _tone(44_100, 2.0), 44_100)
    whole = load_audio(path)
    for seconds in (0.005, 0.013, 0.3, 1.0, 5.0):  # 0.005 s: less than the filter spans
        joined = torch.cat(list(read_blocks(path, seconds)))
        assert joined.shape == whole.shape
        assert torch.allclose(joined, whole, atol=1e-5)
    monkeypatch.setattr(asr.audio, "DECODE_BLOCK_SAMPLES", 1000)  # several reads per piece
    assert torch.allclose(torch.cat(list(read_blocks(path, 0.3))), whole, atol=1e-5)
    monkeypatch.undo()
    at_16k = tmp_path / "tone16.flac"
    sf.write(at_16k, _tone(SAMPLE_RATE, 2.5), SAMPLE_RATE)
    assert [p.numel() for p in read_blocks(at_16k, 1.0)] == [16000, 16000, 8000]
    bad = tmp_path / "bad.flac"
    bad.write_bytes(_forge_flac_length(path.read_bytes(), 2**36 - 1))
    with pytest.raises(AudioError, match=r"bad\.flac"):
        list(read_blocks(bad))
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(AudioError, match="cannot decode"):
        list(read_blocks(garbage))


# -- resampling that chunking cannot change --------------------------------------------------

CHUNKS = (1, 2, 3, 7, 64, 100, 441, 1000, 4096, 16000)


def _streamed(resampler: StreamingResampler, wave: torch.Tensor, size: int) -> torch.Tensor:
    pieces = [resampler.accept(wave[i : i + size]) for i in range(0, wave.numel(), size)]
    return torch.cat([*pieces, resampler.flush()])


@pytest.mark.parametrize("extra", [0, 1])  # lengths where the last padded block is/isn't cut
@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_streaming_resampler_matches_whole_file_resampling(rate: int, extra: int) -> None:
    wave = torch.randn(int(0.3 * rate) + extra, generator=torch.Generator().manual_seed(rate))
    # torchaudio's public resample with its defaults: pins the private kernel we reuse.
    expected = AF.resample(wave, rate, SAMPLE_RATE)
    resampler = StreamingResampler(rate)
    for size in (*CHUNKS, rate):
        # Tiny chunks over a shorter signal: the same edges, a fraction of the calls.
        part = wave if size >= 64 else wave[: rate // 20 + extra]
        want = expected if size >= 64 else AF.resample(part, rate, SAMPLE_RATE)
        got = _streamed(resampler, part, size)  # flush() readies it for the next stream
        assert got.shape == want.shape, size
        assert torch.allclose(got, want, atol=1e-5), size


def test_streaming_resampler_keeps_bounded_state_and_is_identity_at_16k() -> None:
    resampler = StreamingResampler(44_100)
    for _ in range(20):
        resampler.accept(torch.zeros(4410))
    assert resampler._held < resampler._kernel.shape[-1]
    same = StreamingResampler(SAMPLE_RATE)
    wave = torch.randn(1000)
    assert torch.equal(_streamed(same, wave, 7), wave)
    with pytest.raises(AudioError, match="unsupported sample rate"):
        StreamingResampler(96_000)


@pytest.mark.parametrize("rate", [8001, 21538, 22051, 44101, 47999])
def test_awkward_rates_resample_with_a_small_filter(rate: int) -> None:
    # gcd(22051, 16000) = 1: an exact filter would be 16000 x 22071 taps (1.4 GB).
    resampler = StreamingResampler(rate)
    assert resampler._kernel.numel() < 2_000_000
    wave = torch.randn(rate // 5, generator=torch.Generator().manual_seed(rate))
    whole = load_audio(_encode(wave.numpy(), rate, "WAV", "FLOAT"))
    assert abs(whole.numel() - SAMPLE_RATE // 5) <= SAMPLE_RATE // 5 * 0.002  # <= 12.5 Hz off
    streamed = _streamed(resampler, wave, 1000)
    assert streamed.shape == whole.shape
    assert torch.allclose(streamed, whole, atol=1e-5)


@pytest.mark.parametrize("channels", [0, -1, MAX_CHANNELS + 1, 2147483647])
def test_pcm_stream_rejects_channel_counts(channels: int) -> None:
    with pytest.raises(AudioError, match=f"invalid channel count {channels}"):
        PCMStream(SAMPLE_RATE, channels)


@pytest.mark.parametrize("rate", [0, 7999, 96_000])
def test_pcm_stream_rejects_sample_rates(rate: int) -> None:
    with pytest.raises(AudioError, match="unsupported sample rate"):
        PCMStream(rate, 1)


def test_pcm_stream_pending_bound_must_hold_a_partial_frame() -> None:
    with pytest.raises(ValueError, match="cannot hold a partial 2-channel frame"):
        PCMStream(SAMPLE_RATE, 2, max_pending_bytes=2)
    assert PCMStream(SAMPLE_RATE, 2, max_pending_bytes=3).max_pending_bytes == 3


def test_pcm_stream_carries_partial_frames_and_counts_seconds() -> None:
    stream = PCMStream(SAMPLE_RATE, 2)
    frame = np.array([[1000, 3000]], dtype="<i2").tobytes()  # one stereo frame, 4 bytes
    assert stream.decode(frame[:1]).numel() == 0 and stream.pending == frame[:1]
    assert stream.decode(frame[1:3]).numel() == 0 and stream.seconds == 0.0
    out = stream.decode(frame[3:] + frame)
    assert torch.allclose(out, torch.full((2,), 2000 / 32768))
    assert stream.pending == b"" and stream.seconds == 2 / SAMPLE_RATE
    stream.decode(frame[:3])
    assert stream.flush().numel() == 0 and stream.pending == b""  # the partial frame is dropped


def test_pcm_stream_output_does_not_depend_on_chunking() -> None:
    rate, channels = 48_000, 2
    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal((rate // 2, channels)) * 3000).astype("<i2").tobytes()
    expected = decode_pcm16(pcm, rate, channels=channels)
    cuts = np.sort(rng.choice(len(pcm), 300, replace=False))  # odd offsets included
    chunkings = {
        "64 samples": list(range(0, len(pcm), 64 * 2 * channels)),
        "1 s": list(range(0, len(pcm), rate * 2 * channels)),
        "random, mid-frame": [0, *cuts.tolist()],
    }
    for name, starts in chunkings.items():
        stream = PCMStream(rate, channels)
        ends = [*starts[1:], len(pcm)]
        got = torch.cat(
            [*(stream.decode(pcm[a:b]) for a, b in zip(starts, ends, strict=True)), stream.flush()]
        )
        assert got.shape == expected.shape, name
        assert torch.allclose(got, expected, atol=1e-5), name
        assert stream.seconds == 0.5
