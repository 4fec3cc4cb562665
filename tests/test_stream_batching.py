"""Streams batched by the server's engine (`Engine.stream`): concurrent streams run their
chunks together and each gets exactly its solo results, streams join and leave mid-batch, a
cancelled stream leaves nothing behind, and the batch limits hold."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import torch

from asr.audio import SAMPLE_RATE
from asr.bundle import Bundle
from asr.decoding.options import DecodeOptions
from asr.recognizer import Recognizer
from asr.streaming import EndpointConfig, StreamingSession, StreamResult
from server.engine import Engine
from tests.word_corpus import Utterance, WordCorpus

T = TypeVar("T")
CHUNK = SAMPLE_RATE // 10
ENDPOINT = EndpointConfig(trailing_silence=1.0)


@pytest.fixture(scope="module")
def audios(word_corpus: WordCorpus) -> list[torch.Tensor]:
    """Eight streams of different lengths, some with a pause (two segments)."""
    rng = random.Random(5)
    utts: list[Utterance] = [word_corpus.utterance(rng) for _ in range(8)]
    pause = torch.zeros(int(1.5 * SAMPLE_RATE))
    return [
        torch.cat([u.audio, pause, utts[(i + 3) % 8].audio]) if i % 3 == 0 else u.audio
        for i, u in enumerate(utts)
    ]


def key(results: list[StreamResult]) -> list[tuple[object, ...]]:
    return [(r.is_final, r.transcript.text, r.transcript.tokens, r.start, r.end) for r in results]


def solo(recognizer: Recognizer, audio: torch.Tensor) -> list[StreamResult]:
    session = StreamingSession(recognizer, endpoint=ENDPOINT)
    results = []
    for start in range(0, audio.numel(), CHUNK):
        results += session.accept(audio[start : start + CHUNK])
    return results + session.finish()


def serve(test: Callable[[Engine], Coroutine[Any, Any, T]], **settings: Any) -> T:
    async def main() -> T:
        engine = Engine(torch_threads=1, max_batch=8, max_wait_ms=1.0, **settings)
        engine.start()
        try:
            return await test(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


async def through(engine: Engine, session: StreamingSession, audio: torch.Tensor) -> list[Any]:
    """A stream's chunks through the engine, then its final alone (as the servicer does)."""
    results: list[StreamResult] = []
    for start in range(0, audio.numel(), CHUNK):
        out, _ = await engine.stream(session, audio[start : start + CHUNK])
        results += out
    return results + await engine.run(session.finish)


@pytest.mark.parametrize("max_stream_batch", [64, 3, 1])
def test_concurrent_streams_are_batched_and_get_their_solo_results(
    word_model: Bundle, audios: list[torch.Tensor], max_stream_batch: int
) -> None:
    # Two option sets (two batch groups), streams of different lengths (leaving at different
    # times), two joining late.
    beam = Recognizer(word_model, DecodeOptions(method="beam", beam=4))
    greedy = Recognizer(word_model, DecodeOptions(method="greedy"))
    recognizers = [beam if i % 4 else greedy for i in range(len(audios))]
    expected = [key(solo(r, a)) for r, a in zip(recognizers, audios, strict=True)]

    async def test(engine: Engine) -> list[list[Any]]:
        async def one(i: int) -> list[Any]:
            if i >= 6:
                await asyncio.sleep(0.3)  # joins streams already under way
            session = StreamingSession(recognizers[i], endpoint=ENDPOINT)
            return await through(engine, session, audios[i])

        return await asyncio.gather(*(one(i) for i in range(len(audios))))

    got = serve(test, max_stream_batch=max_stream_batch, stream_wait_ms=20.0)
    assert [key(r) for r in got] == expected
    assert sum(r.is_final for r in got[0]) == 2  # a segment ended mid-stream


def test_batches_hold_many_streams_up_to_the_limit(
    word_model: Bundle, audios: list[torch.Tensor]
) -> None:
    recognizer = Recognizer(word_model, DecodeOptions(method="beam", beam=4))

    async def test(engine: Engine) -> list[int]:
        sessions = [StreamingSession(recognizer, endpoint=ENDPOINT) for _ in audios]
        await asyncio.gather(
            *(through(engine, s, a) for s, a in zip(sessions, audios, strict=True))
        )
        return list(engine.stream_batches)

    batched = serve(test, max_stream_batch=5, stream_wait_ms=20.0)
    assert max(batched) == 5  # eight streams sending together fill batches to the limit
    per_stream = serve(test, max_stream_batch=1, stream_wait_ms=0.0)
    assert per_stream == []  # each chunk its own model call, none through the batcher


def test_a_cancelled_stream_leaves_nothing_in_the_engine(
    word_model: Bundle, audios: list[torch.Tensor]
) -> None:
    recognizer = Recognizer(word_model, DecodeOptions(method="beam", beam=4))
    expected = key(solo(recognizer, audios[1]))
    gate, held = threading.Event(), threading.Event()

    def hold() -> None:  # keeps the model busy, so the cancelled chunk waits in the queue
        held.set()
        gate.wait(30)

    async def test(engine: Engine) -> tuple[list[Any], weakref.ref[StreamingSession]]:
        session = StreamingSession(recognizer, endpoint=ENDPOINT)
        gone = weakref.ref(session)
        await engine.stream(session, audios[0][:CHUNK])
        blocker = asyncio.ensure_future(engine.run(hold))
        assert await asyncio.to_thread(held.wait, 30)
        chunk = asyncio.ensure_future(engine.stream(session, audios[0][CHUNK : 2 * CHUNK]))
        await asyncio.sleep(0.05)  # queued behind the blocker
        chunk.cancel()
        with pytest.raises(asyncio.CancelledError):
            await chunk
        del session, chunk
        gc.collect()
        alive = gone() is not None  # freed at once: the queue still holds the chunk
        gate.set()
        await blocker
        assert not alive
        other = StreamingSession(recognizer, endpoint=ENDPOINT)
        return await through(engine, other, audios[1]), gone

    results, gone = serve(test, stream_wait_ms=5.0)
    assert gone() is None
    assert key(results) == expected  # the engine goes on as if nothing happened


def test_one_chunk_of_a_session_at_a_time(word_model: Bundle) -> None:
    session = StreamingSession(Recognizer(word_model), endpoint=ENDPOINT)

    async def test(engine: Engine) -> None:
        first = asyncio.ensure_future(engine.stream(session, torch.zeros(CHUNK)))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="one at a time"):
            await engine.stream(session, torch.zeros(CHUNK))
        await first
        session.finish()
        with pytest.raises(RuntimeError, match="finished"):
            await engine.stream(session, torch.zeros(CHUNK))

    serve(test)
