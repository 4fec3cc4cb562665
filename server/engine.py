"""The model side of the server: one worker thread runs every model call (torch off the event
loop, one thread count to tune), and concurrent Recognize calls are decoded in micro-batches."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from asr.decoding.options import DecodeOptions, Transcript
from asr.recognizer import Recognizer

T = TypeVar("T")
log = logging.getLogger("asr.server")


@dataclass
class _Job:
    recognizer: Recognizer
    options: DecodeOptions
    audio: torch.Tensor  # (N,) 16 kHz
    # the transcript and this job's share of its batch's model time (by audio length)
    future: asyncio.Future[tuple[Transcript, float]] = field(repr=False)


class Engine:
    """Runs model work on a single worker thread; batches Recognize requests."""

    def __init__(self, *, torch_threads: int, max_batch: int, max_wait_ms: float) -> None:
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asr-model")
        # Intra-op threads apply to the calling thread's pool: set them on the worker.
        self._executor.submit(torch.set_num_threads, torch_threads).result()
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None
        # sizes of the latest batches decoded (for tests); bounded: the server runs for months
        self.batches: deque[int] = deque(maxlen=1000)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._batch_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Call fn(*args) on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run_timed(self, fn: Callable[..., T], *args: object) -> tuple[T, float]:
        """fn(*args) on the model thread, and the seconds it took there (not queueing)."""

        def timed() -> tuple[T, float]:
            start = time.perf_counter()
            return fn(*args), time.perf_counter() - start

        return await self.run(timed)

    async def recognize(
        self, recognizer: Recognizer, audio: torch.Tensor, options: DecodeOptions
    ) -> tuple[Transcript, float]:
        """The transcript of `audio`, decoded in a micro-batch, and its share of the batch's
        model seconds (in proportion to its length)."""
        assert self._queue is not None, "Engine.start() first"
        future: asyncio.Future[tuple[Transcript, float]] = (
            asyncio.get_running_loop().create_future()
        )
        await self._queue.put(_Job(recognizer, options, audio, future))
        return await future

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(jobs) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            # Only calls for the same model and options decode together.
            groups: dict[tuple[int, DecodeOptions], list[_Job]] = {}
            for job in jobs:
                if not job.future.cancelled():
                    groups.setdefault((id(job.recognizer), job.options), []).append(job)
            for group in groups.values():
                await self._decode(group)

    async def _decode(self, jobs: list[_Job]) -> None:
        self.batches.append(len(jobs))
        try:
            transcripts, seconds = await self.run_timed(_decode_batch, jobs)
        except Exception as err:  # a model failure fails these calls, not the server
            log.exception("decoding a batch of %d failed", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        total = sum(job.audio.numel() for job in jobs)
        for job, transcript in zip(jobs, transcripts, strict=True):
            if not job.future.done():
                job.future.set_result((transcript, seconds * job.audio.numel() / max(total, 1)))


def _decode_batch(jobs: list[_Job]) -> list[Transcript]:
    recognizer, options = jobs[0].recognizer, jobs[0].options
    feats = [recognizer.features(job.audio) for job in jobs]
    lengths = torch.tensor([f.shape[0] for f in feats])
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    return recognizer.decode(padded, lengths, options)
