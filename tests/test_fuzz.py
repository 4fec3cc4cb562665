"""Property-based fuzzing (hypothesis) of what users hand the library: every config and option
field with values of any type, and audio bytes mutated every way a file or a client can break
them (truncation, bit flips, header edits, garbage). The only outcomes allowed are the
documented ones: a config or a `ValueError` naming the field; samples or an `AudioError` naming
the input, within bounded memory. The example counts keep this in the default suite (seconds);
the server is fuzzed the same way in test_server_fuzz.py."""

from __future__ import annotations

import dataclasses
import io
import math
import tracemalloc
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asr.audio import SAMPLE_RATE, AudioError, PCMStream, decode_pcm16, load_audio
from asr.config import Config
from asr.decoding.options import DecodeOptions
from asr.features import FeatureConfig, SpecAugmentConfig
from asr.models.bilstm_ctc import BiLSTMCTCConfig
from asr.models.las import LASConfig
from asr.streaming import EndpointConfig
from asr.training.config import TrainConfig

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
CONFIGS: list[type[Config]] = [
    DecodeOptions,
    EndpointConfig,
    FeatureConfig,
    SpecAugmentConfig,
    TrainConfig,
    BiLSTMCTCConfig,
    LASConfig,
]
REQUIRED: dict[type[Config], dict[str, Any]] = {LASConfig: {"vocab_size": 64}}  # no default

# Values of every JSON type and the edges of each: what a config file or `--set` can hold.
WILD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@FUZZ
@given(data=st.data())
def test_any_field_values_give_a_config_or_a_value_error(cls: type[Config], data: Any) -> None:
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    chosen = data.draw(st.lists(st.sampled_from(names), unique=True, max_size=4))
    values = REQUIRED.get(cls, {}) | {name: data.draw(WILD, label=name) for name in chosen}
    try:
        config = cls.from_dict(values)
    except ValueError as err:
        assert str(err).startswith(f"invalid {cls.__name__}: ") or "fields" in str(err)
        return
    assert type(config).from_dict(config.to_dict()) == config  # what it accepts round-trips


def _wav(seconds: float = 0.5, rate: int = SAMPLE_RATE, fmt: str = "WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)
    buf = io.BytesIO()
    subtype = "VORBIS" if fmt == "OGG" else "PCM_16"
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


SEEDS = {"wav": _wav(), "flac": _wav(fmt="FLAC"), "ogg": _wav(fmt="OGG"), "wav8k": _wav(rate=8000)}


@st.composite
def mutated(draw: Any) -> bytes:
    """A real file with a few edits: bytes flipped or set (headers live in the first ~100),
    a cut, a repeat, or junk appended."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "dup", "junk"]))
        if not data:
            break
        head = min(len(data) - 1, 128)
        where = draw(st.integers(0, head if draw(st.booleans()) else len(data) - 1))
        if kind == "flip":
            data[where] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[where] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
        elif kind == "cut":
            del data[where:]
        elif kind == "dup":
            data[where:where] = data[where : where + draw(st.integers(1, 64))]
        else:
            data += draw(st.binary(max_size=64))
    return bytes(data)


@FUZZ
@given(audio=st.one_of(mutated(), st.binary(max_size=2048)))
def test_mutated_audio_gives_samples_or_an_audio_error_in_bounded_memory(audio: bytes) -> None:
    tracemalloc.start()
    try:
        samples = load_audio(audio, name="fuzz", max_seconds=5.0)
    except AudioError as err:
        assert str(err).startswith("fuzz: ")
        samples = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # 5 s of float32 is 320 KB at 16 kHz; decoding may hold a few blocks more, never a
    # header's claim.
    assert peak < 64 * 2**20
    if samples is not None:
        assert samples.dtype == torch.float32 and samples.dim() == 1
        assert 0 < samples.numel() <= 5.0 * SAMPLE_RATE + 1
        assert bool(torch.isfinite(samples).all())


@FUZZ
@given(
    data=st.binary(max_size=4096),
    rate=st.integers(-10, 200_000),
    channels=st.integers(-5, 2**31 - 1),
)
def test_raw_pcm_with_any_rate_and_channel_count(data: bytes, rate: int, channels: int) -> None:
    try:
        samples = decode_pcm16(data, rate, channels=channels, name="pcm")
    except AudioError as err:
        assert str(err).startswith("pcm: ")
        return
    assert bool(torch.isfinite(samples).all())


@FUZZ
@given(chunks=st.lists(st.binary(max_size=300), max_size=20), channels=st.integers(1, 8))
def test_pcm_streams_never_hold_more_than_a_frame(chunks: list[bytes], channels: int) -> None:
    stream = PCMStream(48_000, channels)
    received = 0
    for chunk in chunks:
        stream.decode(chunk)
        received += len(chunk)
        assert len(stream.pending) < 2 * channels  # only a partial frame waits
    assert stream.seconds == pytest.approx(received // (2 * channels) / 48_000)
