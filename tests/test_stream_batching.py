"""Streams batched by the server's engine (`Worker.stream`): concurrent streams run their
chunks together and each gets exactly its solo results, streams join and leave mid-batch, a
cancelled stream leaves nothing behind, and the batch limits hold."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import random
import signal
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import pytest
import torch

from asr.audio import SAMPLE_RATE
from asr.bundle import Bundle
from asr.decoding.options import DecodeOptions
from asr.recognizer import Recognizer
from asr.streaming import EndpointConfig, StreamingSession, StreamResult
from server.engine import Engine, Stream, Worker, WorkerLost, WorkerSettings
from server.processes import ProcessWorker
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


def serve(test: Callable[[Worker], Coroutine[Any, Any, T]], **settings: Any) -> T:
    async def main() -> T:
        engine = Worker(torch_threads=1, max_batch=8, max_wait_ms=1.0, **settings)
        engine.start()
        try:
            return await test(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


async def through(engine: Worker, session: StreamingSession, audio: torch.Tensor) -> list[Any]:
    """A stream's chunks through the engine, then its end of audio (batched with other
    streams' chunks, as the servicer sends it)."""
    results: list[StreamResult] = []
    for start in range(0, audio.numel(), CHUNK):
        out, _ = await engine.stream(session, audio[start : start + CHUNK])
        results += out
    return results + (await engine.stream(session, torch.zeros(0), last=True))[0]


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

    async def test(engine: Worker) -> list[list[Any]]:
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

    async def test(engine: Worker) -> list[int]:
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

    async def test(engine: Worker) -> tuple[list[Any], weakref.ref[StreamingSession]]:
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

    async def test(engine: Worker) -> None:
        first = asyncio.ensure_future(engine.stream(session, torch.zeros(CHUNK)))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="one at a time"):
            await engine.stream(session, torch.zeros(CHUNK))
        await first
        session.finish()
        with pytest.raises(RuntimeError, match="finished"):
            await engine.stream(session, torch.zeros(CHUNK))

    serve(test)


async def through_stream(stream: Stream, audio: torch.Tensor) -> list[Any]:
    """A stream's chunks through an engine's `Stream`, then its end of audio."""
    results: list[StreamResult] = []
    for start in range(0, audio.numel(), CHUNK):
        out, _ = await stream.accept(audio[start : start + CHUNK])
        results += out
    return results + (await stream.finish(torch.zeros(0)))[0]


@pytest.mark.parametrize("processes", [True, False])
def test_two_workers_pin_streams_balance_calls_and_give_solo_results(
    word_model: Bundle, audios: list[torch.Tensor], processes: bool
) -> None:
    recognizer = Recognizer(word_model, DecodeOptions(method="beam", beam=4))
    expected = [key(solo(recognizer, audio)) for audio in audios[:3]]
    options = recognizer.options

    async def main() -> list[list[Any]]:
        settings = WorkerSettings(max_wait_ms=1.0)
        engine = Engine({"words": recognizer}, workers=2, settings=settings, processes=processes)
        await engine.start()
        try:
            first, second = engine.workers
            with (
                engine.open_stream("words", options, ENDPOINT, True) as a,
                engine.open_stream("words", options, ENDPOINT, True) as b,
            ):
                assert (first.streams, second.streams) == (1, 1)
                with engine.open_stream("words", options, ENDPOINT, True) as c:
                    assert (first.streams, second.streams) == (2, 1)  # the lowest of equals
                    # the least loaded worker (one stream against two) gets the call
                    await engine.recognize("words", audios[1], options)
                    assert (list(first.batches), list(second.batches)) == ([], [1])
                    results = await asyncio.gather(
                        *(through_stream(s, x) for s, x in zip((a, b, c), audios, strict=False))
                    )
                    assert first.stream_batches and second.stream_batches
                    # Chunks that complete no encoder block are held on the stream's side
                    # (HeldAudio): about one 100 ms chunk in three reaches a worker.
                    sent = sum(math.ceil(x.numel() / CHUNK) + 1 for x in audios[:3])
                    arrived = sum(first.stream_batches) + sum(second.stream_batches)
                    assert arrived < sent / 2
            assert [w.load for w in engine.workers] == [0, 0]
            assert [w.served for w in engine.workers] == [2, 1]
            return results
        finally:
            await engine.stop()

    assert [key(r) for r in asyncio.run(main())] == expected


def test_a_dead_worker_process_fails_its_calls_and_the_rest_carry_on(
    word_model: Bundle, audios: list[torch.Tensor]
) -> None:
    recognizer = Recognizer(word_model, DecodeOptions(method="beam", beam=4))
    expected = key(solo(recognizer, audios[2]))
    options = recognizer.options
    downs: list[bool] = []

    async def main() -> list[Any]:
        engine = Engine({"words": recognizer}, workers=2, settings=WorkerSettings())
        engine.on_down = lambda: downs.append(True)
        await engine.start()
        try:
            first, second = engine.workers
            with engine.open_stream("words", options, ENDPOINT, True) as pinned:
                await pinned.accept(audios[0][:CHUNK])
                os.kill(cast(ProcessWorker, first).pid or 0, signal.SIGKILL)
                with pytest.raises(WorkerLost, match="worker 0 exited"):
                    await through_stream(pinned, audios[0])
                assert not first.alive and second.alive
                # new streams and calls go to the worker still running, and are served
                with engine.open_stream("words", options, ENDPOINT, True) as fresh:
                    assert second.streams == 1
                    results = await through_stream(fresh, audios[2])
                await engine.recognize("words", audios[1], options)
                assert list(second.batches) == [1]
            assert not downs  # one worker is still up
            os.kill(cast(ProcessWorker, second).pid or 0, signal.SIGKILL)
            while second.alive:
                await asyncio.sleep(0.01)
            assert downs == [True]
            with pytest.raises(WorkerLost, match="no model worker"):
                await engine.recognize("words", audios[1], options)
            return results
        finally:
            await engine.stop()

    assert key(asyncio.run(main())) == expected
