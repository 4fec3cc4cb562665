"""The server's engine: a long decode shares the model, so short calls and stream chunks sent
behind it finish first; a caller whose deadline passes or who cancels is answered at once and
its decode stops, its batch-mates unaffected. Orders of completion, never timings."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import pytest
import torch

from asr.cancel import Cancelled, CancelToken, DeadlineExceeded
from asr.decoding.ctc import CTCPrefixBeamSearch
from asr.decoding.options import DecodeOptions, Transcript
from asr.recognizer import Recognizer
from server.engine import Engine, Worker
from tests.test_decoding_ctc import peaky

T = TypeVar("T")

VOCAB = 12
# An expensive search (a wide beam over every frame), and a cheap one.
SLOW = DecodeOptions(beam=64, prune_top_k=None, prune_threshold=None, blank_skip=None)
FAST = DecodeOptions(beam=4)
LONG = 200_000  # frames: far more than any test waits for (the slow decode is cancelled)


class FakeRecognizer:
    """Recognizer-like: `audio` (N,) stands for N frames of random CTC posteriors seeded by
    its first value, decoded by the real prefix beam search (which checks the token)."""

    def __init__(self) -> None:
        self.started = threading.Event()  # a decode is under way
        self.stopped = threading.Event()  # a decode raised Cancelled
        self.finished: list[int] = []  # frames of each decode that ran to its end, in order

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        return peaky(1, audio.numel(), VOCAB, seed=int(audio[0]))[0]  # (T, V)

    def decode(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        options: DecodeOptions,
        *,
        cancel: CancelToken | None = None,
    ) -> list[Transcript]:
        self.started.set()
        try:
            hyps = CTCPrefixBeamSearch(options)(feats, lengths, cancel=cancel)
        except Cancelled:
            self.stopped.set()
            raise
        self.finished.extend(int(n) for n in lengths)
        return [Transcript("", h[0].tokens, h[0].score) for h in hyps]

    def recognize(
        self,
        engine: Worker,
        frames: int,
        options: DecodeOptions,
        seed: int = 0,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, tuple[Transcript, float]]:
        """engine.recognize of `frames` frames of posteriors seeded by `seed`."""
        audio = torch.full((frames,), float(seed))
        return engine.recognize(cast(Recognizer, self), audio, options, **kwargs)


def alone(frames: int, seed: int, options: DecodeOptions) -> tuple[int, ...]:
    """The best tokens of one utterance decoded by itself, no engine."""
    log_probs = peaky(1, frames, VOCAB, seed=seed)
    return CTCPrefixBeamSearch(options)(log_probs, torch.tensor([frames]))[0][0].tokens


def serve(test: Callable[[Worker], Coroutine[Any, Any, T]], *, max_wait_ms: float = 1.0) -> T:
    async def main() -> T:
        engine = Worker(torch_threads=1, max_batch=8, max_wait_ms=max_wait_ms, slice_ms=5.0)
        engine.start()
        try:
            return await test(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


async def when(event: threading.Event) -> None:
    """Wait for a thread's event (the timeout only keeps a broken engine from hanging)."""
    assert await asyncio.to_thread(event.wait, 60.0)


def test_a_short_call_sent_behind_a_long_decode_finishes_first() -> None:
    fake = FakeRecognizer()

    async def test(engine: Worker) -> None:
        slow = asyncio.ensure_future(fake.recognize(engine, LONG, SLOW))
        await when(fake.started)
        transcript, _ = await fake.recognize(engine, 300, FAST, seed=3)
        assert transcript.tokens == alone(300, 3, FAST)
        chunk = await engine.run(lambda: "a stream's chunk")  # streams get their turn too
        assert chunk == "a stream's chunk"
        assert not slow.done()
        assert fake.finished == [300]
        slow.cancel()  # the caller goes away: its decode stops at its next check
        await when(fake.stopped)
        with pytest.raises(asyncio.CancelledError):
            await slow

    serve(test)


def test_two_long_decodes_share_the_model_and_give_their_own_results() -> None:
    fake = FakeRecognizer()
    wide = DecodeOptions(beam=16, prune_top_k=None, prune_threshold=None, blank_skip=None)

    async def test(engine: Worker) -> list[int]:
        results = await asyncio.gather(
            fake.recognize(engine, 3000, wide, seed=1), fake.recognize(engine, 300, SLOW, seed=2)
        )
        assert [t.tokens for t, _ in results] == [alone(3000, 1, wide), alone(300, 2, SLOW)]
        return fake.finished

    # The shorter one, sent second, is not held up until the longer one ends.
    assert serve(test) == [300, 3000]


def test_a_passed_deadline_ends_the_call_and_its_decode_and_the_worker_moves_on() -> None:
    fake = FakeRecognizer()

    async def test(engine: Worker) -> None:
        with pytest.raises(DeadlineExceeded):
            await fake.recognize(engine, LONG, SLOW, timeout=1.0)
        await when(fake.stopped)
        transcript, _ = await fake.recognize(engine, 200, FAST, seed=4)
        assert transcript.tokens == alone(200, 4, FAST)
        assert fake.finished == [200]

    serve(test)


def test_a_call_whose_deadline_passed_in_the_queue_is_not_decoded() -> None:
    fake = FakeRecognizer()

    async def test(engine: Worker) -> None:
        with pytest.raises(DeadlineExceeded):
            await fake.recognize(engine, 200, FAST, timeout=0.0)
        await fake.recognize(engine, 100, FAST)
        assert fake.finished == [100]

    serve(test)


def test_a_cancelled_call_leaves_its_batch_mates_unaffected() -> None:
    fake = FakeRecognizer()

    async def test(engine: Worker) -> None:
        # Both join one batch; the first's caller is gone once the decode has begun.
        outcomes = await asyncio.gather(
            fake.recognize(engine, 500, SLOW, seed=5, cancelled=fake.started.is_set),
            fake.recognize(engine, 500, SLOW, seed=6),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], Cancelled)
        assert not isinstance(outcomes[1], BaseException)
        assert outcomes[1][0].tokens == alone(500, 6, SLOW)
        assert list(engine.batches) == [2]
        assert fake.finished == [500, 500]  # the batch went on for the one still waiting

    serve(test, max_wait_ms=200.0)


def test_stopping_the_engine_stops_a_decode_under_way() -> None:
    fake = FakeRecognizer()

    async def main() -> None:
        engine = Worker(torch_threads=1, max_batch=8, max_wait_ms=1.0)
        engine.start()
        slow = asyncio.ensure_future(fake.recognize(engine, LONG, SLOW))
        await when(fake.started)
        await engine.stop()
        assert fake.stopped.is_set()
        with pytest.raises(Cancelled, match="stopping"):
            await slow

    asyncio.run(main())


def test_an_engine_needs_a_worker() -> None:
    with pytest.raises(ValueError, match="workers"):
        Engine({}, workers=0)
