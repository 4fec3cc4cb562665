"""Audio input: decode anything we accept to float32 mono 16 kHz, or fail with one clear error.

Every entry point (CLI, server, recipes, data loading) goes through this module, so the rules for
what audio is acceptable live in exactly one place.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torchaudio.functional.functional import _get_sinc_resample_kernel

SAMPLE_RATE = 16_000  # Hz; every model in this toolkit consumes 16 kHz audio
MIN_INPUT_RATE = 8_000  # Hz; narrow-band telephony is the lowest rate we resample from
MAX_INPUT_RATE = 48_000  # Hz; studio audio is the highest
MAX_CHANNELS = 8  # interleaved LINEAR16 channels a stream may declare (Google's API allows 1-8)

# Samples (frames x channels) decoded per read: 1 MiB of float32, whatever the header says, so a
# forged length or an absurd channel count can never make one read allocate more.
DECODE_BLOCK_SAMPLES = 1 << 18
# The most float32 bytes a decoder may produce per input byte, checked against the header before
# decoding and against the running total while decoding. Measured worst cases of real encoders
# (libsndfile 1.2, 60 s of digital silence, the most compressible audio there is): mono FLAC
# 1381x, stereo FLAC 2204x, 8-channel FLAC 3982x, 8-channel Vorbis at 48 kHz 4672x; PCM WAV is
# 2-4x and quiet noise in FLAC ~4x. 16384 leaves 3.5x headroom over the worst, so real audio
# never trips it, and still stops a header or stream that claims gigabytes from kilobytes (a
# 1 s FLAC whose header claims 2^36 samples). A duration cap (`max_seconds`) is the primary
# guard: an hour of silence is only 1381x, so where a caller has a cap, the cap rejects first.
MAX_EXPANSION = 16_384
# libsndfile's frame count when the header does not say (FLAC total_samples 0, pipes)
_UNKNOWN_FRAMES = 2**63 - 1
# What decoding untrusted bytes can raise besides AudioError: libsndfile's errors, the cffi
# layer's, and numpy's MemoryError if a block cannot be allocated.
_DECODE_ERRORS = (sf.LibsndfileError, RuntimeError, ValueError, TypeError, SystemError, MemoryError)

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
    if isinstance(err, MemoryError):
        return AudioError(label, "too large to decode (out of memory)")
    return AudioError(label, f"cannot decode audio ({_reason(err)})")


def _open(source: AudioSource, label: str) -> tuple[sf.SoundFile, int]:
    """Open `source` for block decoding (nothing decoded yet) -> (file, its size in bytes)."""
    if isinstance(source, bytes):
        if not source:
            raise AudioError(label, "empty input (0 bytes)")
        handle: io.BytesIO | str = io.BytesIO(source)
        size = len(source)
    else:
        path = Path(source)
        _check_path(path, label)
        handle, size = str(path), path.stat().st_size
    try:
        return sf.SoundFile(handle), size
    except _DECODE_ERRORS as err:
        raise _decode_error(label, err) from err


def _check_declared(f: sf.SoundFile, size: int, max_seconds: float | None, label: str) -> None:
    """Reject a header that declares more audio than allowed, before decoding any of it."""
    if f.frames == _UNKNOWN_FRAMES:
        return  # the running checks in `_mono_blocks` still apply
    seconds = f.frames / f.samplerate
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(
            label, f"declares {seconds:.0f} s of audio, more than the {max_seconds:g} s allowed"
        )
    if f.frames * f.channels * 4 > MAX_EXPANSION * size:
        raise AudioError(
            label,
            f"declares {seconds:.0f} s of audio ({f.channels} channels), more than "
            f"{size} bytes can hold",
        )


def _mono_blocks(
    f: sf.SoundFile,
    label: str,
    *,
    max_seconds: float | None = None,
    max_bytes: int | None = None,
    frames: int | None = None,
) -> Iterator[np.ndarray]:
    """Decode `f` a block at a time -> finite float32 mono blocks (n,) at the file's rate.

    A header can understate or not know the length, so the caps are checked on what is actually
    decoded: `max_seconds`, and `max_bytes` (float32 bytes decoded across channels). A read
    decodes `frames` frames, but never more than `DECODE_BLOCK_SAMPLES` samples, nor more than
    one frame past the cap.
    """
    block = max(1, DECODE_BLOCK_SAMPLES // f.channels)
    if frames is not None:
        block = min(block, frames)
    max_frames = None if max_seconds is None else math.floor(max_seconds * f.samplerate)
    decoded = 0  # frames
    try:
        while True:
            want = block if max_frames is None else min(block, max_frames + 1 - decoded)
            samples = f.read(frames=want, dtype="float32", always_2d=True)  # (n, C)
            if samples.shape[0] == 0:
                return
            decoded += samples.shape[0]
            if max_frames is not None and decoded > max_frames:
                raise AudioError(label, f"is longer than the {max_seconds:g} s allowed")
            if max_bytes is not None and decoded * f.channels * 4 > max_bytes:
                raise AudioError(
                    label, f"decodes to more than {MAX_EXPANSION}x its size: not real audio"
                )
            if not np.isfinite(samples).all():
                raise AudioError(label, "contains NaN or infinite samples")
            yield samples.mean(axis=1, dtype=np.float32)  # (n,)
    except AudioError:
        raise
    except _DECODE_ERRORS as err:
        raise _decode_error(label, err) from err


def load_audio(
    source: AudioSource,
    *,
    name: str | None = None,
    declared_rate: int | None = None,
    max_seconds: float | None = None,
) -> torch.Tensor:
    """Decode a WAV/FLAC/OGG file or in-memory bytes to mono float32 at `SAMPLE_RATE`.

    Returns a tensor of shape (N,). Raises `AudioError` for anything unusable, and when the
    caller declared a sample rate (`declared_rate`) that the file's header contradicts: one of
    the two is wrong, and guessing which would silently transcribe garbage.

    Untrusted input cannot exhaust memory: audio longer than `max_seconds` is rejected from its
    header or, if the header understates, as soon as decoding passes the cap; decoding is in
    blocks, never sized by the header; and output over `MAX_EXPANSION` times the input's size
    is rejected even without a cap.
    """
    label = _describe(source, name)
    f, size = _open(source, label)
    with f:
        rate = int(f.samplerate)
        if declared_rate and declared_rate != rate:
            raise AudioError(label, f"declared sample rate {declared_rate} Hz, but it is {rate} Hz")
        check_sample_rate(rate, label)
        _check_declared(f, size, max_seconds, label)
        blocks = list(
            _mono_blocks(f, label, max_seconds=max_seconds, max_bytes=MAX_EXPANSION * size)
        )
    if not blocks:
        raise AudioError(label, "contains no samples (zero-length audio)")
    try:  # within MAX_EXPANSION but more than this machine holds
        return resample(torch.from_numpy(np.concatenate(blocks)), rate)  # (N,)
    except MemoryError as err:
        raise _decode_error(label, err) from err


def decode_pcm16(
    data: bytes, sample_rate: int, *, channels: int = 1, name: str | None = None
) -> torch.Tensor:
    """Decode raw little-endian signed 16-bit PCM (interleaved if `channels` > 1).

    Returns mono float32 at `SAMPLE_RATE`, shape (N,).
    """
    label = _describe(data, name)
    if not data:
        raise AudioError(label, "empty input (0 bytes)")
    check_channels(channels, label)
    frame_bytes = 2 * channels
    if len(data) % frame_bytes:
        raise AudioError(
            label,
            f"{len(data)} bytes is not a whole number of {channels}-channel 16-bit frames",
        )
    return _finish(_pcm16_frames(data, channels), sample_rate, label)


def _pcm16_frames(data: bytes, channels: int) -> np.ndarray:
    """Whole frames of little-endian int16 PCM -> float32 (n, C) in [-1, 1)."""
    pcm = np.frombuffer(data, dtype="<i2").reshape(-1, channels)
    return pcm.astype(np.float32) / 32768.0


def _finish(samples: np.ndarray, rate: int, label: str) -> torch.Tensor:
    """Validate (N, C) float samples, mix to mono and resample to 16 kHz."""
    if samples.shape[0] == 0:
        raise AudioError(label, "contains no samples (zero-length audio)")
    check_sample_rate(rate, label)
    if not np.isfinite(samples).all():
        raise AudioError(label, "contains NaN or infinite samples")
    mono = torch.from_numpy(np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32)))
    return resample(mono, rate)


def check_channels(channels: int, label: str) -> None:
    """Raise `AudioError` unless raw PCM may interleave `channels` channels."""
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(label, f"invalid channel count {channels} (supported: 1-{MAX_CHANNELS})")


def check_sample_rate(rate: int, label: str) -> None:
    """Raise `AudioError` unless `rate` is one we resample from."""
    if not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
        raise AudioError(
            label,
            f"unsupported sample rate {rate} Hz (supported: {MIN_INPUT_RATE}-{MAX_INPUT_RATE} Hz)",
        )


# Sinc resampling builds one filter per output phase: (16000 / g) filters of about (rate / g)
# taps, g = gcd(rate, 16000). Every standard rate (8, 11.025, 12, 22.05, 24, 32, 44.1, 48 kHz) has
# g >= 25, at most 640 x 1958 taps (5 MB); a header claiming 22051 Hz has g = 1 and would need
# 16000 x 22071 taps (1.4 GB, half a minute to build). So rates with g < 25 are resampled as the
# nearest multiple of 25 Hz: at most 12.5 Hz off (0.16 % at 8 kHz, well inside the 10 % speed
# perturbation models train with), and the output is that much longer or shorter.
_RATE_STEP = 25  # Hz


def _filter_rate(rate: int) -> int:
    """The rate the resampling filter is designed for (see `_RATE_STEP`)."""
    if math.gcd(rate, SAMPLE_RATE) >= _RATE_STEP:
        return rate
    return round(rate / _RATE_STEP) * _RATE_STEP


def resample(wave: torch.Tensor, rate: int) -> torch.Tensor:
    """Resample (..., N) audio from `rate` to `SAMPLE_RATE` (a no-op at 16 kHz)."""
    rate = _filter_rate(rate)
    if rate == SAMPLE_RATE:
        return wave
    return AF.resample(wave, orig_freq=rate, new_freq=SAMPLE_RATE)


@functools.lru_cache(maxsize=16)
def _resampling_kernel(rate: int) -> tuple[torch.Tensor, int]:
    """`AF.resample`'s own filter for float32 input from `rate` (so the two cannot drift apart;
    tests/test_audio.py pins the equality) -> (kernel (n, 1, K), width). Cached, and never
    written to, so concurrent streams at one rate share it (up to 5 MB, see `_RATE_STEP`)."""
    return _get_sinc_resample_kernel(
        rate,
        SAMPLE_RATE,
        math.gcd(rate, SAMPLE_RATE),
        6,
        0.99,
        "sinc_interp_hann",
        None,
        torch.device("cpu"),
        torch.float32,
    )


class StreamingResampler:
    """`resample` for audio that arrives in pieces: (N,) chunks at `orig_rate` in, float32
    (M,) chunks at `SAMPLE_RATE` out.

    Joining the outputs of `accept` for any chunking, then `flush`, gives `resample(whole,
    orig_rate)` (to float rounding, same length): resampling each chunk on its own would
    filter every chunk edge as if the audio stopped there, and a stream's result would depend
    on how its client happened to chunk it. This is torchaudio's `resample` (sinc, Hann window,
    width 6, rolloff 0.99) run incrementally: with the rates reduced by their gcd to o -> n,
    output block k (n samples) is the kernel applied to padded input [k*o, k*o + K), K = 2*width
    + o, where the input is padded with `width` zeros before and `width + o` after. So a block is
    computed once its K inputs have arrived, and only the fewer than K samples that later blocks
    still need are kept.
    """

    def __init__(self, orig_rate: int) -> None:
        check_sample_rate(orig_rate, "resampler")
        self.rate = orig_rate
        rate = _filter_rate(orig_rate)  # as `resample` does
        self._identity = rate == SAMPLE_RATE
        gcd = math.gcd(rate, SAMPLE_RATE)
        self._orig, self._new = rate // gcd, SAMPLE_RATE // gcd
        self._kernel, self._width = _resampling_kernel(rate)  # (n, 1, K)
        self._reset()

    def _reset(self) -> None:
        self._pending: list[torch.Tensor] = [torch.zeros(self._width)]  # the left padding
        self._held = self._width  # samples in `_pending`
        self._received = 0  # input samples since the start of the stream
        self._emitted = 0  # output samples since the start of the stream

    def accept(self, chunk: torch.Tensor) -> torch.Tensor:
        """Next input chunk (N,) -> the output (M,) it completes (possibly none)."""
        chunk = torch.as_tensor(chunk, dtype=torch.float32).reshape(-1)
        if self._identity:
            return chunk
        self._received += chunk.numel()
        self._pending.append(chunk)
        self._held += chunk.numel()
        return self._convolve()

    def flush(self) -> torch.Tensor:
        """End of the stream: the output (M,) still owed; the resampler is then ready to
        start a new stream."""
        if self._identity:
            return torch.zeros(0)
        total = -(-self._new * self._received // self._orig)  # ceil: `AF.resample`'s length
        owed = total - self._emitted
        self._pending.append(torch.zeros(self._width + self._orig))  # the right padding
        self._held += self._width + self._orig
        out = self._convolve()[:owed]  # the padding's last block may run past the end
        self._reset()
        return out

    def _convolve(self) -> torch.Tensor:
        size = self._kernel.shape[-1]
        if self._held < size:
            return torch.zeros(0)  # cheap: tiny chunks only queue up until a block completes
        buffer = torch.cat(self._pending)  # (L,)
        blocks = (buffer.numel() - size) // self._orig + 1
        out = torch.nn.functional.conv1d(buffer[None, None], self._kernel, stride=self._orig)
        out = out[0].T.reshape(-1)  # (blocks * n,): block-major, as `AF.resample` orders it
        rest = buffer[blocks * self._orig :].clone()  # clone: do not keep `buffer` alive
        self._pending, self._held = [rest], rest.numel()
        self._emitted += out.numel()
        return out


class PCMStream:
    """A stream of LINEAR16 chunks (little-endian int16, `channels` interleaved, at
    `sample_rate`) -> float32 mono (M,) at `SAMPLE_RATE` per chunk.

    A chunk may end in the middle of a frame (an odd byte, or part of a multi-channel frame):
    the rest is carried over to the next chunk, and resampling carries its state too, so the
    output does not depend on how the stream is chunked. `seconds` counts the audio received.
    """

    def __init__(
        self,
        sample_rate: int,
        channels: int,
        *,
        max_pending_bytes: int = 2 * MAX_CHANNELS - 1,
        name: str = "audio_content",
    ) -> None:
        self.name = name
        check_channels(channels, name)
        check_sample_rate(sample_rate, name)
        self.rate, self.channels = sample_rate, channels
        self._frame = 2 * channels  # bytes per frame
        # What is carried between chunks is less than a frame; refuse a bound it would break.
        if max_pending_bytes < self._frame - 1:
            raise ValueError(
                f"max_pending_bytes={max_pending_bytes} cannot hold a partial "
                f"{channels}-channel frame ({self._frame - 1} bytes)"
            )
        self.max_pending_bytes = max_pending_bytes
        self.pending = b""  # the start of a frame the next chunk completes
        self.frames = 0  # whole frames received
        self._resampler = StreamingResampler(sample_rate)

    @property
    def seconds(self) -> float:
        """Audio received so far, in seconds."""
        return self.frames / self.rate

    def decode(self, chunk: bytes) -> torch.Tensor:
        """The next chunk's bytes -> the 16 kHz mono samples (M,) they complete."""
        data = self.pending + chunk if self.pending else chunk
        usable = len(data) - len(data) % self._frame
        self.pending = data[usable:]
        assert len(self.pending) <= self.max_pending_bytes  # less than a frame, by construction
        if usable == 0:
            return torch.zeros(0)
        self.frames += usable // self._frame
        frames = _pcm16_frames(data[:usable], self.channels)  # (n, C)
        # One channel is already mono (the mean of one is itself; this runs for every chunk).
        mono = frames[:, 0] if self.channels == 1 else frames.mean(axis=1, dtype=np.float32)
        return self._resampler.accept(torch.from_numpy(np.ascontiguousarray(mono)))

    def flush(self) -> torch.Tensor:
        """End of the stream -> the last samples (M,) resampling held back. A trailing partial
        frame (under one sample period) is dropped: there is no sample to make of it."""
        self.pending = b""
        return self._resampler.flush()


def audio_duration(path: str | Path) -> float:
    """Duration in seconds from the file header (cheap: nothing is decoded)."""
    _check_path(Path(path), str(path))
    try:
        info = sf.info(str(path))
    except _DECODE_ERRORS as err:
        raise AudioError(str(path), f"cannot read audio header ({_reason(err)})") from err
    return float(info.frames) / float(info.samplerate)


def as_samples(
    audio: AudioInput, *, name: str | None = None, max_seconds: float | None = None
) -> torch.Tensor:
    """A file path, a file's bytes, or mono samples already at `SAMPLE_RATE` (a float numpy
    array or tensor of shape (N,)) -> float32 samples (N,) at `SAMPLE_RATE`.

    Files and bytes go through `load_audio`; samples get the same checks (not empty, finite,
    no longer than `max_seconds`).
    """
    if isinstance(audio, str | Path | bytes):
        return load_audio(audio, name=name, max_seconds=max_seconds)
    wave = torch.as_tensor(audio)
    label = name or f"<{type(audio).__name__} of shape {tuple(wave.shape)}>"
    if wave.dim() != 1 or not wave.is_floating_point():
        raise AudioError(
            label,
            f"expected float mono samples of shape (N,) at {SAMPLE_RATE} Hz, got "
            f"{wave.dtype} of shape {tuple(wave.shape)} (pass a path or bytes to decode a file)",
        )
    if max_seconds is not None and wave.numel() > max_seconds * SAMPLE_RATE:
        raise AudioError(label, f"is longer than the {max_seconds:g} s allowed")
    samples = wave.detach().cpu().to(torch.float32).numpy()
    return _finish(samples[:, None], SAMPLE_RATE, label)


def read_blocks(path: str | Path, block_seconds: float = 10.0) -> Iterator[torch.Tensor]:
    """Decode a file a block at a time: float32 mono pieces (N,) at `SAMPLE_RATE`, each about
    `block_seconds` long, so memory stays bounded however long the file is.

    Resampling carries its filter state across blocks (`StreamingResampler`), so the pieces
    joined are `load_audio`'s result (to float rounding) whatever `block_seconds` is. Pieces
    of a 16 kHz file are exactly `block_seconds` long, but the last. Raises `AudioError`
    (possibly after some blocks) for unusable audio.
    """
    label = str(path)
    f, _ = _open(path, label)
    with f:
        check_sample_rate(f.samplerate, label)
        resampler = StreamingResampler(f.samplerate)
        size = max(1, round(block_seconds * f.samplerate))  # frames per piece, at the file's rate
        pending: list[np.ndarray] = []  # decoded mono blocks not yet yielded
        held = 0  # their frames
        received = 0
        for block in _mono_blocks(f, label, frames=size):  # (n,), n <= size
            pending.append(block)
            held += block.size
            received += block.size
            if held >= size:
                out = resampler.accept(torch.from_numpy(np.concatenate(pending)))
                pending, held = [], 0
                if out.numel():  # a piece shorter than the filter completes nothing yet
                    yield out
    if received == 0:
        raise AudioError(label, "contains no samples (zero-length audio)")
    tail = torch.from_numpy(np.concatenate(pending)) if pending else torch.zeros(0)
    last = torch.cat([resampler.accept(tail), resampler.flush()])
    if last.numel():
        yield last


def save_flac(path: str | Path, wave: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> None:
    """Write (N,) float audio in [-1, 1] as 16-bit FLAC."""
    sf.write(str(path), wave.clamp(-1.0, 1.0).numpy(), sample_rate, format="FLAC", subtype="PCM_16")
