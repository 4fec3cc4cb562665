"""A stream's memory stays bounded by one segment, and the server sizes its default stream
limit from a start-up probe of its engine (`server.capacity`)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from asr.audio import SAMPLE_RATE
from asr.bundle import Bundle
from asr.models.bilstm_ctc import BiLSTMCTC
from asr.recognizer import Recognizer
from asr.streaming import EndpointConfig, StreamingSession, tensor_bytes
from server import capacity
from server.app import DEFAULT_STREAMS, start
from server.config import ServerConfig
from server.engine import Engine
from server.servicer import Model

CHUNK = SAMPLE_RATE // 10


def sizes(session: StreamingSession, audio: torch.Tensor) -> list[int]:
    """The session's own state bytes after each 100 ms chunk."""
    out = []
    for at in range(0, audio.numel(), CHUNK):
        session.accept(audio[at : at + CHUNK])
        out.append(session.state_bytes())
    return out


def test_a_streams_memory_is_bounded_by_its_segment_not_its_length(word_model: Bundle) -> None:
    # Speech-like noise the model hears tokens in, with no pause: segments end only at
    # max_segment (2 s), so the state must fall back at each cut instead of growing.
    endpoint = EndpointConfig(trailing_silence=100.0, max_segment=2.0)
    session = StreamingSession(Recognizer(word_model), endpoint=endpoint)
    audio = capacity.speechlike(14.0, seed=3)
    bytes_ = sizes(session, audio)
    early, late = max(bytes_[20:60]), max(bytes_[100:140])  # 2-6 s, 10-14 s
    assert early > 0
    assert late <= 1.25 * early, (early, late)
    # whereas one unbroken segment grows with its audio
    unbroken = StreamingSession(
        Recognizer(word_model), endpoint=EndpointConfig(trailing_silence=100.0, max_segment=100.0)
    )
    grown = sizes(unbroken, audio[: 8 * SAMPLE_RATE])
    assert grown[-1] > 2 * grown[19], (grown[19], grown[-1])


def test_segment_bytes_bounds_a_whole_segment(word_model: Bundle) -> None:
    recognizer = Recognizer(word_model)
    endpoint = EndpointConfig(trailing_silence=100.0, max_segment=5.0)
    bound = capacity.segment_bytes(recognizer, endpoint)
    session = StreamingSession(recognizer, endpoint=endpoint)
    # the largest state of a stream cut at 5 s segments, over two of them
    largest = max(sizes(session, capacity.speechlike(10.0, seed=8)))
    assert largest <= 1.1 * bound, (largest, bound)
    assert bound <= 2 * largest, (largest, bound)  # and not wildly above it


def test_tensor_bytes_counts_each_tensor_once_and_views_by_their_elements() -> None:
    big = torch.zeros(1000)
    state = {
        "a": big[:10],
        "b": [big[:10], torch.zeros(5, dtype=torch.int64)],
        "m": torch.nn.Linear(4, 4),
    }
    state["again"] = state["b"]
    assert tensor_bytes(state) == 10 * 4 + 10 * 4 + 5 * 8  # two views, one int64 tensor


def test_the_probe_measures_the_engine_and_sizes_the_limit(word_model: Bundle) -> None:
    recognizer = Recognizer(word_model)

    async def probe() -> capacity.Capacity:
        engine = Engine({"words": recognizer}, workers=1)
        await engine.start()
        try:
            return await capacity.measure(engine, "words", recognizer, EndpointConfig())
        finally:
            await engine.stop()

    measured = asyncio.run(probe())
    assert measured.probe_streams == capacity.PROBE_STREAMS
    assert measured.realtime > 1.0  # a tiny model runs many times faster than real time
    assert measured.stream_bytes > 0 and measured.memory_streams > 0
    expected = min(int(capacity.HEADROOM * measured.realtime), measured.memory_streams)
    assert measured.streams == max(1, expected)
    assert f"{measured.streams} concurrent streams" in measured.describe()


def run_server(config: ServerConfig, models: list[Model]) -> tuple[int, object]:
    async def main() -> tuple[int, object]:
        running = await start(config, models)
        try:
            return running.servicer.config.max_concurrent_streams, running.capacity
        finally:
            await running.stop(0.0)

    return asyncio.run(main())


def test_the_server_sizes_its_stream_limit_unless_given(word_model: Bundle) -> None:
    models = [Model("words", Recognizer(word_model))]
    config = ServerConfig(models=(("words", "<memory>"),), port=0, workers=1)
    limit, measured = run_server(config, models)
    assert isinstance(measured, capacity.Capacity)
    assert limit == measured.streams >= 1
    limit, measured = run_server(replace(config, max_concurrent_streams=5), models)
    assert (limit, measured) == (5, None)
    # no model streams: nothing to probe, the fixed default
    assert isinstance(word_model.model, BiLSTMCTC)
    offline = Recognizer(replace(word_model, model=word_model.model.with_chunking(0, 0)))
    limit, measured = run_server(config, [Model("words", offline)])
    assert (limit, measured) == (DEFAULT_STREAMS, None)


def test_available_memory_is_positive_and_at_most_physical() -> None:
    import os

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < capacity.available_memory() <= physical


def test_max_streams_zero_means_measured_and_negative_is_refused() -> None:
    assert ServerConfig(models=(("m", "dir"),)).max_concurrent_streams == 0
    with pytest.raises(ValueError, match="max_concurrent_streams"):
        ServerConfig(models=(("m", "dir"),), max_concurrent_streams=-1)
