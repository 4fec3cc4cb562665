"""Audio input: decode anything we accept to float32 mono 16 kHz, or fail with one clear error.

Every entry point (CLI, server, recipes, data loading) goes through this module, so the rules for
what audio is acceptable live in exactly one place.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

SAMPLE_RATE = 16_000  # Hz; every model in this toolkit consumes 16 kHz audio
MIN_INPUT_RATE = 8_000  # Hz; narrow-band telephony is the lowest rate we resample from
MAX_INPUT_RATE = 48_000  # Hz; studio audio is the highest

AudioSource = str | Path | bytes
# Anything `as_samples` accepts: a file, its bytes, or samples already at 16 kHz.
AudioInput = AudioSource | np.ndarray | torch.Tensor

# What `asr transcribe` picks out of directories: containers libsndfile decodes (MP3 from
# libsndfile 1.1 on).
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".flac", ".ogg", ".oga", ".opus", ".aiff", ".aif", ".au", ".caf", ".w64", ".rf64"}
    | ({".mp3"} if "MP3" in sf.available_formats() else set())
)


class AudioError(ValueError):
    """Audio could not be used. The message names the input and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def _describe(source: AudioSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, bytes):
        return f"<{len(source)} bytes of audio>"
    return str(source)


def _check_path(path: Path, label: str) -> None:
    """Name the common reasons a path is not audio before libsndfile's vaguer error would."""
    if not path.exists():
        raise AudioError(label, "file not found")
    if path.is_dir():
        raise AudioError(label, "is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(label, "empty file (0 bytes)")


def _reason(err: Exception) -> str:
    # libsndfile's own words, without the Python object repr soundfile wraps them in
    return getattr(err, "error_string", None) or str(err)


def _decode_error(label: str, err: Exception) -> AudioError:
    return AudioError(label, f"cannot decode audio ({_reason(err)})")


def load_audio(
    source: AudioSource, *, name: str | None = None, declared_rate: int | None = None
) -> torch.Tensor:
    """Decode a WAV/FLAC/OGG file or in-memory bytes to mono float32 at `SAMPLE_RATE`.

    Returns a tensor of shape (N,). Raises `AudioError` for anything unusable, and when the
    caller declared a sample rate (`declared_rate`) that the file's header contradicts: one of
    the two is wrong, and guessing which would silently transcribe garbage.
    """
    label = _describe(source, name)
    if isinstance(source, bytes):
        if not source:
            raise AudioError(label, "empty input (0 bytes)")
        handle: io.BytesIO | str = io.BytesIO(source)
    else:
        path = Path(source)
        _check_path(path, label)
        handle = str(path)
    try:
        samples, rate = sf.read(handle, dtype="float32", always_2d=True)  # (N, C)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise _decode_error(label, err) from err
    if declared_rate and declared_rate != rate:
        raise AudioError(label, f"declared sample rate {declared_rate} Hz, but it is {rate} Hz")
    return _finish(samples, int(rate), label)


def decode_pcm16(
    data: bytes, sample_rate: int, *, channels: int = 1, name: str | None = None
) -> torch.Tensor:
    """Decode raw little-endian signed 16-bit PCM (interleaved if `channels` > 1).

    Returns mono float32 at `SAMPLE_RATE`, shape (N,).
    """
    label = _describe(data, name)
    if not data:
        raise AudioError(label, "empty input (0 bytes)")
    if channels < 1:
        raise AudioError(label, f"invalid channel count {channels}")
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        raise AudioError(
            label,
            f"{len(data)} bytes is not a whole number of {channels}-channel 16-bit frames",
        )
    pcm = np.frombuffer(data, dtype="<i2").reshape(-1, channels)
    samples = pcm.astype(np.float32) / 32768.0
    return _finish(samples, sample_rate, label)


def _finish(samples: np.ndarray, rate: int, label: str) -> torch.Tensor:
    """Validate (N, C) float samples, mix to mono and resample to 16 kHz."""
    if samples.shape[0] == 0:
        raise AudioError(label, "contains no samples (zero-length audio)")
    check_sample_rate(rate, label)
    if not np.isfinite(samples).all():
        raise AudioError(label, "contains NaN or infinite samples")
    mono = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1), dtype=np.float32))
    return resample(mono, rate)


def check_sample_rate(rate: int, label: str) -> None:
    """Raise `AudioError` unless `rate` is one we resample from."""
    if not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
        raise AudioError(
            label,
            f"unsupported sample rate {rate} Hz (supported: {MIN_INPUT_RATE}-{MAX_INPUT_RATE} Hz)",
        )


def resample(wave: torch.Tensor, rate: int) -> torch.Tensor:
    """Resample (..., N) audio from `rate` to `SAMPLE_RATE` (a no-op at 16 kHz)."""
    if rate == SAMPLE_RATE:
        return wave
    return AF.resample(wave, orig_freq=rate, new_freq=SAMPLE_RATE)


def audio_duration(path: str | Path) -> float:
    """Duration in seconds from the file header (cheap: nothing is decoded)."""
    _check_path(Path(path), str(path))
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(str(path), f"cannot read audio header ({_reason(err)})") from err
    return float(info.frames) / float(info.samplerate)


def as_samples(audio: AudioInput, *, name: str | None = None) -> torch.Tensor:
    """A file path, a file's bytes, or mono samples already at `SAMPLE_RATE` (a float numpy
    array or tensor of shape (N,)) -> float32 samples (N,) at `SAMPLE_RATE`.

    Files and bytes go through `load_audio`; samples get the same checks (not empty, finite).
    """
    if isinstance(audio, str | Path | bytes):
        return load_audio(audio, name=name)
    wave = torch.as_tensor(audio)
    label = name or f"<{type(audio).__name__} of shape {tuple(wave.shape)}>"
    if wave.dim() != 1 or not wave.is_floating_point():
        raise AudioError(
            label,
            f"expected float mono samples of shape (N,) at {SAMPLE_RATE} Hz, got "
            f"{wave.dtype} of shape {tuple(wave.shape)} (pass a path or bytes to decode a file)",
        )
    samples = wave.detach().cpu().to(torch.float32).numpy()
    return _finish(samples[:, None], SAMPLE_RATE, label)


def read_blocks(path: str | Path, block_seconds: float = 10.0) -> Iterator[torch.Tensor]:
    """Decode a file a block at a time: float32 mono pieces (N,) at `SAMPLE_RATE`, each about
    `block_seconds` long, so memory stays bounded however long the file is.

    Files at another rate are resampled block by block; each block's edges are filtered as if
    the audio stopped there, a blip of a millisecond every `block_seconds` that recognition
    does not notice. Raises `AudioError` (possibly after some blocks) for unusable audio.
    """
    label = str(path)
    _check_path(Path(path), label)
    try:
        with sf.SoundFile(str(path)) as f:
            check_sample_rate(f.samplerate, label)
            if f.frames == 0:
                raise AudioError(label, "contains no samples (zero-length audio)")
            size = max(1, round(block_seconds * f.samplerate))
            for block in f.blocks(blocksize=size, dtype="float32", always_2d=True):  # (n, C)
                yield _finish(block, int(f.samplerate), label)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise _decode_error(label, err) from err


def save_flac(path: str | Path, wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> None:
    """Write (N,) float audio in [-1, 1] as 16-bit FLAC."""
    sf.write(str(path), wave.clamp(-1.0, 1.0).numpy(), sample_rate, format="FLAC", subtype="PCM_16")
