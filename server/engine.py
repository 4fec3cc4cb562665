"""The model side of the server: model work runs one call at a time, in turns, off the event
loop, and concurrent Recognize calls are decoded in micro-batches.

Workers. `Worker` below is one model worker: everything that follows is about it. `Engine`
(at the end) holds N of them, each in a process of its own by default (`server.processes`),
pins each stream to one and sends new streams and Recognize calls to the least loaded.

Turns. `_Turns` is a lock on the model: whatever holds it runs torch alone (one intra-op
thread count to tune, as with a single worker thread). It goes to the waiter that has had
the least model time so far, the earliest of equals ("least attained service" scheduling).
Short work, a stream's chunk or final result (`run`, `run_timed`), holds its turn to the
end. A Recognize batch decodes on a thread of its own and holds the model only between the
checks its forward pass and searches make (`asr.cancel`: every LC-BiLSTM block, every 32
CTC frames, every attention step): at a check, once its turn has lasted `slice_ms`, it lets
anyone who has had less model time go first. So an expensive request (beam 64 over 600 s of
audio) no longer holds everyone up for its whole decode: a request or stream chunk sent
behind it waits at most one slice, then runs as if the model were idle (it has had less
time than the long one at each of its own checks); long batches share the model among
themselves slice by slice. What cannot be sliced: a forward pass that runs whole (an
offline BiLSTM or a LAS listener over an utterance, bounded by max_unary_seconds) and a word
alignment (one forced alignment per utterance). Work that keeps the model busy with short
calls can hold long batches back: under overload the long requests wait, not the short.

Why threads handing over a lock, not one worker thread running slices of resumable jobs: the
searches stay plain loops (a resumable attention search, joint scoring and rescoring would
each need rewriting as a generator), and the check that lets a decode stop early is the same
place it lets others go first.

Batching. Calls for the same model and options that arrive within `max_wait_ms` of the first
decode together. The next batch is formed while the last one decodes, and dispatched once
that one has finished or has had its first slice: a server busy with short calls gathers
them into large batches as before, and a call behind a long batch waits one slice at most
to be dispatched.

Streams. A stream's chunks go through `stream`: chunks of all streams that arrive within
`stream_wait_ms` of the first (and all that queued while the last batch ran), at most
`max_stream_batch`, run as one `accept_streams` call in one turn: the LC blocks they complete
go through the encoder as one batch and the CTC prefix searches advance as one, so the model
cost per stream falls as streams are added (a batch-1 LSTM step costs about what 10-30
batched do). Each stream gets exactly its solo results. A stream holds no row between
chunks: its encoder and search states live in its own session and are joined into a batch
for one call, so a stream that ends or is cancelled leaves nothing behind in the engine, and
a slow client's stream simply is not in the batches it has no chunk for. Finals (end of
audio) queue like any chunk: an ending stream's flush runs in the same batched block calls
as the others' blocks (`accept_streams(last=)`). With `max_stream_batch` 1 every chunk is
its own `run_timed` call (the per-stream path). Either way a chunk that completes no encoder
block never reaches the worker: the stream's side holds it (`HeldAudio`) until the audio
held does, which keeps about two 100 ms chunks in three off the queue and out of the pipe.

Cancellation. Each call carries its caller's deadline (gRPC `time_remaining`) and
cancellation in a `CancelToken`. The caller gets `DeadlineExceeded` when its deadline passes,
whatever the model is doing; its batch stops at its next check once every call in it is gone
(batch-mates still waiting are decoded as if nothing happened).
"""

from __future__ import annotations

import abc
import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Protocol, TypeVar

import torch

from asr.cancel import Cancelled, CancelToken, DeadlineExceeded
from asr.decoding.options import DecodeOptions, Transcript
from asr.recognizer import Recognizer
from asr.streaming import EndpointConfig, StreamingSession, StreamResult, accept_streams

T = TypeVar("T")
log = logging.getLogger("asr.server")

# Threads for short model calls, queued on the model lock in their order (more than one, so
# chunks of many streams wait at the lock together and all run at a long batch's next check).
RUN_THREADS = 4
# Batches that can be decoding at once (sharing the model slice by slice); a batch beyond
# them waits for one to finish.
DECODE_THREADS = 16


class _Turns:
    """A lock on the model, granted to the waiter that has had the least model time so far
    (the earliest of equals), which long work hands on at its checks."""

    def __init__(self, slice_s: float) -> None:
        self.slice = slice_s
        self._cond = threading.Condition()
        self._waiting: list[tuple[float, int]] = []  # heap of (model seconds had, arrival)
        self._arrivals = itertools.count()
        self._held = False
        self._since = 0.0  # perf_counter when the current turn began

    def acquire(self, used: float = 0.0) -> None:
        """Wait for the model, having had `used` seconds of it already."""
        me = (used, next(self._arrivals))
        with self._cond:
            heapq.heappush(self._waiting, me)
            try:
                self._cond.wait_for(lambda: not self._held and self._waiting[0] == me)
            except BaseException:  # interrupted: leave the queue, wake the next in line
                self._waiting.remove(me)
                heapq.heapify(self._waiting)
                self._cond.notify_all()
                raise
            heapq.heappop(self._waiting)
            self._held = True
            self._since = time.perf_counter()

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @contextmanager
    def turn(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def held(self) -> float:
        """Seconds the current turn has lasted (call it holding the lock)."""
        return time.perf_counter() - self._since

    def share(self, used: float) -> float | None:
        """Called holding the lock by work that has had `used` model seconds, this turn's
        included: once the turn has lasted a slice, let whoever has had less go first. Returns
        the seconds spent waiting to get the model back, None if the turn went on."""
        if self.held() < self.slice:
            return None
        with self._cond:
            if not self._waiting or self._waiting[0][0] >= used:
                return None
        start = time.perf_counter()
        self.release()
        self.acquire(used)
        return time.perf_counter() - start


@dataclass
class _Job:
    recognizer: Recognizer
    options: DecodeOptions
    audio: torch.Tensor  # (N,) 16 kHz
    cancel: CancelToken  # the caller's deadline and cancellation
    # the transcript and this job's share of its batch's model time (by audio length)
    future: asyncio.Future[tuple[Transcript, float]] = field(repr=False)
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class _Chunk:
    session: StreamingSession | None  # None once its caller has gone (`drop`)
    samples: torch.Tensor  # (N,) 16 kHz
    queued: float  # perf_counter when it was queued
    # the session's results and this chunk's share of its batch's model time (by samples)
    future: asyncio.Future[tuple[list[StreamResult], float]] = field(repr=False)
    last: bool = False  # the end of the stream's audio: its finals come back

    def drop(self) -> None:
        """Its caller is gone: let go of the session now, though the queue holds the chunk
        until the batch loop reaches it."""
        self.session, self.samples = None, torch.zeros(0)


class _BatchToken(CancelToken):
    """The token a batch decodes with: it stops once every call in the batch is gone (or the
    engine stops), and its checks are where the batch shares the model.

    on_gone(job, reason): called once per call found gone at a check (on the decode thread),
    so its caller hears at once, not when its batch-mates' transcripts are ready. on_long:
    called once, when the batch's first turn has lasted a slice.
    """

    def __init__(
        self,
        jobs: list[_Job],
        turns: _Turns,
        on_gone: Callable[[_Job, Cancelled], None],
        on_long: Callable[[], None],
    ) -> None:
        super().__init__()
        self.jobs = jobs
        self.turns = turns
        self.waited = 0.0  # seconds handed to others at checks (not this batch's model time)
        self.used = 0.0  # model seconds of this batch's turns before the current one
        self._on_gone, self._on_long = on_gone, on_long
        self._gone: set[int] = set()  # indices of jobs already reported gone
        self._long = False

    def stopped(self) -> Cancelled | None:
        if (own := super().stopped()) is not None:
            return own
        first: Cancelled | None = None
        for job in self.jobs:
            reason = job.cancel.stopped()
            if reason is None:
                return None  # someone still waits: decode on (the gone are told at check)
            first = first or reason
        return first

    def check(self) -> None:
        for i, job in enumerate(self.jobs):
            if i not in self._gone and (reason := job.cancel.stopped()) is not None:
                self._gone.add(i)
                self._on_gone(job, reason)
        super().check()
        if not self._long and self.turns.held() >= self.turns.slice:
            self._long = True
            self._on_long()
        used = self.used + self.turns.held()
        if (waited := self.turns.share(used)) is not None:
            self.used, self.waited = used, self.waited + waited


class Worker:
    """One model worker: runs model work in turns (see the module docstring), batches
    Recognize requests and stream chunks.

    slice_ms: how long a Recognize batch keeps the model while work that has had less model
    time waits for it (the latency a long batch adds to a short call sent behind it).
    """

    def __init__(
        self,
        *,
        index: int = 0,
        torch_threads: int,
        max_batch: int,
        max_wait_ms: float,
        slice_ms: float = 20.0,
        max_stream_batch: int = 128,
        stream_wait_ms: float = 10.0,
    ) -> None:
        self.index = index
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_stream_batch = max_stream_batch
        self.stream_wait = stream_wait_ms / 1000.0
        self._turns = _Turns(slice_ms / 1000.0)
        # Intra-op threads apply to the calling thread's pool: set them on every worker.
        self._executor = ThreadPoolExecutor(
            RUN_THREADS,
            f"asr-model-{index}",
            initializer=torch.set_num_threads,
            initargs=(torch_threads,),
        )
        self._decoder = ThreadPoolExecutor(
            DECODE_THREADS,
            f"asr-decode-{index}",
            initializer=torch.set_num_threads,
            initargs=(torch_threads,),
        )
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._chunks: asyncio.Queue[_Chunk] | None = None
        self._stream_task: asyncio.Task[None] | None = None
        self._streaming: set[int] = set()  # ids of the sessions with a chunk queued or running
        self._decoding: dict[asyncio.Task[None], _BatchToken] = {}
        # sizes of the latest batches decoded (for tests); bounded: the server runs for months
        self.batches: deque[int] = deque(maxlen=1000)
        self.stream_batches: deque[int] = deque(maxlen=1000)  # chunks per stream batch
        # called with each batch's kind ("recognize" or "stream"), size and its calls' queue
        # waits (metrics)
        self.on_batch: Callable[[str, int, list[float]], None] | None = None

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._batch_loop())
        self._chunks = asyncio.Queue()
        self._stream_task = asyncio.get_running_loop().create_task(self._stream_loop())

    async def stop(self) -> None:
        """Stop batching, stop the batches decoding at their next check, join the workers."""
        for task in (self._task, self._stream_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for token in self._decoding.values():
            token.cancel("the server is stopping")
        await asyncio.gather(*self._decoding, return_exceptions=True)
        self._executor.shutdown(wait=True)
        self._decoder.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Call fn(*args) in a turn on the model."""
        return (await self.run_timed(fn, *args))[0]

    async def run_timed(self, fn: Callable[..., T], *args: object) -> tuple[T, float]:
        """fn(*args) in a turn on the model, and the seconds it took (not queueing)."""

        def timed() -> tuple[T, float]:
            with self._turns.turn():
                start = time.perf_counter()
                return fn(*args), time.perf_counter() - start

        return await asyncio.get_running_loop().run_in_executor(self._executor, timed)

    async def stream(
        self, session: StreamingSession, samples: torch.Tensor, *, last: bool = False
    ) -> tuple[list[StreamResult], float]:
        """`session.accept(samples)` (last: the end of audio, so the finals of `accept` and
        `finish`), batched with other streams' chunks (module docstring), and this chunk's
        share of the batch's model seconds. One chunk of a session at a time (await each). A
        cancelled await takes the chunk out of the queue (or, if its batch is running, lets
        the batch finish without it)."""
        assert self._chunks is not None, "Engine.start() first"
        if self.max_stream_batch == 1:  # per-stream: each chunk its own turn, no queue

            def alone() -> list[StreamResult]:
                return accept_streams([session], [samples], [last])[0]

            return await self.run_timed(alone)
        if id(session) in self._streaming:
            raise RuntimeError("a session's chunks go one at a time: await the last one")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[list[StreamResult], float]] = loop.create_future()
        chunk = _Chunk(session, samples, time.perf_counter(), future, last)
        key = id(session)
        self._streaming.add(key)
        try:
            await self._chunks.put(chunk)
            return await future
        except asyncio.CancelledError:
            # Let go of the session now: the queue may hold the chunk a while, and the
            # CancelledError's traceback holds this frame (whoever keeps the error, keeps it).
            chunk.drop()
            del session, samples
            raise
        finally:
            self._streaming.discard(key)

    async def _stream_loop(self) -> None:
        while True:
            await self._stream_batch()

    async def _stream_batch(self) -> None:
        """Gather one batch of chunks and run it (a function of its own, so that nothing of
        a batch stays referenced while the loop waits for the next one)."""
        assert self._chunks is not None
        queue, loop = self._chunks, asyncio.get_running_loop()
        chunks = [await queue.get()]
        deadline = loop.time() + self.stream_wait
        while len(chunks) < self.max_stream_batch:
            if not queue.empty():  # what queued while the last batch ran: no waiting
                chunks.append(queue.get_nowait())
                continue
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                chunks.append(await asyncio.wait_for(queue.get(), timeout))
            except TimeoutError:
                break
        live = [c for c in chunks if not c.future.done()]  # not those cancelled while queued
        if live:
            await self._run_chunks(live)

    async def _run_chunks(self, chunks: list[_Chunk]) -> None:
        self.stream_batches.append(len(chunks))
        now = time.perf_counter()
        if self.on_batch is not None:
            self.on_batch("stream", len(chunks), [now - c.queued for c in chunks])
        try:
            outcomes, seconds = await self.run_timed(_accept_chunks, chunks)
        except Exception as err:  # a model failure fails these calls, not the server
            log.exception("a stream batch of %d failed", len(chunks))
            outcomes, seconds = [err] * len(chunks), 0.0
        total = sum(c.samples.numel() for c in chunks)
        for chunk, outcome in zip(chunks, outcomes, strict=True):
            if chunk.future.done():
                continue
            if isinstance(outcome, Exception):
                chunk.future.set_exception(outcome)
            else:
                share = seconds * chunk.samples.numel() / max(total, 1)
                chunk.future.set_result((outcome, share))

    async def recognize(
        self,
        recognizer: Recognizer,
        audio: torch.Tensor,
        options: DecodeOptions,
        *,
        timeout: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[Transcript, float]:
        """The transcript of `audio`, decoded in a micro-batch, and its share of the batch's
        model seconds (in proportion to its length).

        timeout: seconds the caller waits (gRPC `context.time_remaining()`; None: no limit);
        then this raises `DeadlineExceeded` and the decode stops at its next check unless
        batch-mates still wait for it. cancelled: polled at the decode's checks from a worker
        thread (gRPC `context.cancelled`); a cancelled await stops the decode the same way.
        """
        assert self._queue is not None, "Engine.start() first"
        token = CancelToken.after(timeout, cancelled=cancelled)
        future: asyncio.Future[tuple[Transcript, float]] = (
            asyncio.get_running_loop().create_future()
        )
        await self._queue.put(_Job(recognizer, options, audio, token, future))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded before the transcript was ready") from None
        except asyncio.CancelledError:
            token.cancel()
            raise

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
                if job.future.done():  # its caller stopped waiting while it queued
                    continue
                if (reason := job.cancel.stopped()) is not None:
                    job.future.set_exception(reason)
                    continue
                groups.setdefault((id(job.recognizer), job.options), []).append(job)
            for group in groups.values():
                await self._dispatch(group)

    async def _dispatch(self, jobs: list[_Job]) -> None:
        """Start decoding `jobs`; return once the batch has finished or had its first slice
        (so the next batch gathers what arrives meanwhile, up to one slice)."""
        loop = asyncio.get_running_loop()
        dispatched: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not dispatched.done():
                dispatched.set_result(None)

        def finished(task: asyncio.Task[None]) -> None:
            self._decoding.pop(task, None)
            settle()

        def gone(job: _Job, reason: Cancelled) -> None:  # on the decode thread
            loop.call_soon_threadsafe(_fail, job, reason)

        def long() -> None:  # on the decode thread
            loop.call_soon_threadsafe(settle)

        token = _BatchToken(jobs, self._turns, gone, long)
        task = loop.create_task(self._decode(jobs, token))
        self._decoding[task] = token
        task.add_done_callback(finished)
        await dispatched

    async def _decode(self, jobs: list[_Job], token: _BatchToken) -> None:
        self.batches.append(len(jobs))
        if self.on_batch is not None:
            now = time.perf_counter()
            self.on_batch("recognize", len(jobs), [now - job.queued for job in jobs])
        loop = asyncio.get_running_loop()
        try:
            transcripts, seconds = await loop.run_in_executor(
                self._decoder, self._decode_in_turns, jobs, token
            )
        except Cancelled as err:  # every caller is gone: nobody to tell but them
            for job in jobs:
                _fail(job, job.cancel.stopped() or err)
            return
        except Exception as err:  # a model failure fails these calls, not the server
            log.exception("decoding a batch of %d failed", len(jobs))
            for job in jobs:
                _fail(job, err)
            return
        total = sum(job.audio.numel() for job in jobs)
        for job, transcript in zip(jobs, transcripts, strict=True):
            if not job.future.done():
                job.future.set_result((transcript, seconds * job.audio.numel() / max(total, 1)))

    def _decode_in_turns(
        self, jobs: list[_Job], token: _BatchToken
    ) -> tuple[list[Transcript], float]:
        """On a decode thread: the batch's transcripts and its model seconds."""
        with self._turns.turn():
            start = time.perf_counter()
            transcripts = _decode_batch(jobs, token)
            return transcripts, time.perf_counter() - start - token.waited


class WorkerLost(RuntimeError):
    """The model worker serving a call is gone (its process died): the call may be retried,
    and new calls go to the workers still running."""


@dataclass(frozen=True)
class WorkerSettings:
    """How each model worker runs (`Worker`'s arguments; `ServerConfig` holds the same)."""

    torch_threads: int = 1
    max_batch: int = 16
    max_wait_ms: float = 10.0
    slice_ms: float = 20.0
    max_stream_batch: int = 128
    stream_wait_ms: float = 10.0


class Stream(Protocol):
    """One stream's model work, on the worker it is pinned to (one call at a time)."""

    async def accept(self, samples: torch.Tensor) -> tuple[list[StreamResult], float]:
        """`StreamingSession.accept` of (N,) 16 kHz samples, batched with other streams; its
        results and model seconds."""
        ...

    async def finish(self, samples: torch.Tensor) -> tuple[list[StreamResult], float]:
        """The last samples, then the end of audio: the final results, and model seconds."""
        ...

    def close(self) -> None:
        """Let go of the session (on any ending)."""
        ...


class ModelWorker(abc.ABC):
    """A model worker as the engine balances it: models by name, calls in flight counted."""

    def __init__(
        self, index: int, on_batch: Callable[[str, int, list[float]], None] | None = None
    ) -> None:
        self.index = index
        self.streams = 0  # streams pinned to this worker now
        self.calls = 0  # Recognize calls in flight here
        self.served = 0  # streams pinned here since start
        # sizes of the latest Recognize and stream batches (for tests), bounded
        self.batches: deque[int] = deque(maxlen=1000)
        self.stream_batches: deque[int] = deque(maxlen=1000)
        self.on_batch = on_batch  # as `Worker.on_batch`, for the metrics
        self.on_lost: Callable[[], None] | None = None  # called if the worker dies

    def _record(self, kind: str, size: int, waits: list[float]) -> None:
        """A batch this worker ran (`Worker.on_batch`)."""
        (self.batches if kind == "recognize" else self.stream_batches).append(size)
        if self.on_batch is not None:
            self.on_batch(kind, size, waits)

    @property
    def load(self) -> int:
        return self.streams + self.calls

    @property
    def alive(self) -> bool:
        return True

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    def open_stream(
        self, model: str, options: DecodeOptions, endpoint: EndpointConfig, interim_results: bool
    ) -> Stream: ...

    @abc.abstractmethod
    async def recognize(
        self,
        model: str,
        audio: torch.Tensor,
        options: DecodeOptions,
        *,
        timeout: float | None,
        cancelled: Callable[[], bool] | None,
    ) -> tuple[Transcript, float]: ...


class LocalWorker(ModelWorker):
    """A `Worker` on this process's threads."""

    def __init__(
        self,
        index: int,
        recognizers: dict[str, Recognizer],
        settings: WorkerSettings,
        on_batch: Callable[[str, int, list[float]], None] | None = None,
    ) -> None:
        super().__init__(index, on_batch)
        self.recognizers = recognizers
        self.worker = Worker(index=index, **asdict(settings))
        self.worker.on_batch = self._record

    async def start(self) -> None:
        self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop()

    def open_stream(
        self, model: str, options: DecodeOptions, endpoint: EndpointConfig, interim_results: bool
    ) -> Stream:
        session = StreamingSession(
            self.recognizers[model], options, endpoint, interim_results=interim_results
        )
        return _LocalStream(self.worker, session)

    async def recognize(
        self,
        model: str,
        audio: torch.Tensor,
        options: DecodeOptions,
        *,
        timeout: float | None,
        cancelled: Callable[[], bool] | None,
    ) -> tuple[Transcript, float]:
        return await self.worker.recognize(
            self.recognizers[model], audio, options, timeout=timeout, cancelled=cancelled
        )


class HeldAudio:
    """A stream's audio held where its chunks arrive until it completes an encoder block.

    Most 100 ms chunks complete no block (a block is 240-320 ms of audio), so the session
    would only hold them and answer nothing; each of them sent to the worker would still cost
    a queue entry there and, across processes, a pipe message each way. So the stream's side
    keeps them until they add up to the session's `samples_until_due` (read after each call:
    nothing but a call changes it), then sends them as one chunk. Exact: a held chunk's
    answer, no results and no model time, is the one the session would give.
    """

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.samples = 0
        self.due = 0  # samples the session needs before it works (0: send every chunk)

    def take(self, samples: torch.Tensor, last: bool = False) -> torch.Tensor | None:
        """None if `samples` are held; else the audio to send now (what was held, then them)."""
        self.parts.append(samples)
        self.samples += samples.numel()
        if self.samples < self.due and not last:
            return None
        audio = torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]
        self.parts, self.samples = [], 0
        return audio


class _LocalStream:
    def __init__(self, worker: Worker, session: StreamingSession) -> None:
        self.worker = worker
        self.session: StreamingSession | None = session
        self.held = HeldAudio()

    def _session(self) -> StreamingSession:
        if self.session is None:
            raise RuntimeError("the stream is closed")
        return self.session

    async def accept(self, samples: torch.Tensor) -> tuple[list[StreamResult], float]:
        return await self._send(samples, last=False)

    async def finish(self, samples: torch.Tensor) -> tuple[list[StreamResult], float]:
        return await self._send(samples, last=True)

    async def _send(self, samples: torch.Tensor, last: bool) -> tuple[list[StreamResult], float]:
        session = self._session()
        if (audio := self.held.take(samples, last)) is None:
            return [], 0.0
        answer = await self.worker.stream(session, audio, last=last)
        self.held.due = session.samples_until_due()
        return answer

    def close(self) -> None:
        self.session = None


class Engine:
    """The server's model workers, by name of the models they serve.

    One worker runs on this process's threads (`LocalWorker`). More run in processes of their
    own (`server.processes`: a worker's batching is Python-heavy, so threads would share one
    core through the GIL; measured on 2 cores, two threads gave 1.1-1.4x the throughput of
    one, two processes 1.7x), forked after the models are loaded so that they share the
    weights' memory. `processes=False` runs them all as threads instead (their torch kernels
    still run in parallel: for large models, whose time goes to kernels, on a GPU say).

    A stream is pinned to one worker for its lifetime (`open_stream`): its session lives
    there, and its chunks batch with that worker's other streams. New streams and Recognize
    calls go to the worker with the fewest calls in flight (streams pinned plus Recognize
    calls), the lowest-numbered of equals.
    """

    def __init__(
        self,
        recognizers: dict[str, Recognizer],
        *,
        workers: int = 1,
        settings: WorkerSettings | None = None,
        processes: bool = True,
        on_batch: Callable[[str, int, list[float]], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1: {workers}")
        settings = settings or WorkerSettings()
        self.workers: list[ModelWorker]
        if workers > 1 and processes:
            from server.processes import ProcessWorker

            self.workers = [
                ProcessWorker(i, recognizers, settings, on_batch) for i in range(workers)
            ]
        else:
            self.workers = [LocalWorker(i, recognizers, settings, on_batch) for i in range(workers)]
        # Called once no worker is left (the server then reports NOT_SERVING).
        self.on_down: Callable[[], None] | None = None
        for worker in self.workers:
            worker.on_lost = self._lost

    def _lost(self) -> None:
        if not any(w.alive for w in self.workers) and self.on_down is not None:
            self.on_down()

    async def start(self) -> None:
        """Start the workers (a process worker forks here: before the gRPC server exists)."""
        for worker in self.workers:
            await worker.start()

    async def stop(self) -> None:
        """Stop every worker: what is decoding stops at its next check."""
        await asyncio.gather(*(worker.stop() for worker in self.workers))

    def _least_loaded(self) -> ModelWorker:
        alive = [w for w in self.workers if w.alive]
        if not alive:
            raise WorkerLost("no model worker is running")
        return min(alive, key=lambda w: w.load)

    @contextmanager
    def open_stream(
        self, model: str, options: DecodeOptions, endpoint: EndpointConfig, interim_results: bool
    ) -> Iterator[Stream]:
        """A stream of `model` on the least loaded worker, pinned to it until the block ends."""
        worker = self._least_loaded()
        worker.streams += 1
        worker.served += 1
        try:
            stream = worker.open_stream(model, options, endpoint, interim_results)
            try:
                yield stream
            finally:
                stream.close()
        finally:
            worker.streams -= 1

    async def recognize(
        self,
        model: str,
        audio: torch.Tensor,
        options: DecodeOptions,
        *,
        timeout: float | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> tuple[Transcript, float]:
        """`Worker.recognize` of `model` on the least loaded worker."""
        worker = self._least_loaded()
        worker.calls += 1
        try:
            return await worker.recognize(
                model, audio, options, timeout=timeout, cancelled=cancelled
            )
        finally:
            worker.calls -= 1


def _accept_chunks(chunks: list[_Chunk]) -> list[list[StreamResult] | Exception]:
    """In a turn: the chunks through one `accept_streams` (a finished session's chunk fails
    alone, before any work; a failure inside fails the batch: its sessions' states are then
    half-advanced)."""
    outcomes: list[list[StreamResult] | Exception] = []
    run: list[int] = []
    for i, chunk in enumerate(chunks):
        if chunk.session is None or chunk.session.finished:
            outcomes.append(RuntimeError("the stream is finished"))
        else:
            outcomes.append([])
            run.append(i)
    sessions = [chunks[i].session for i in run]
    results = accept_streams(
        [s for s in sessions if s is not None],
        [chunks[i].samples for i in run],
        [chunks[i].last for i in run],
    )
    for i, result in zip(run, results, strict=True):
        outcomes[i] = result
    return outcomes


def _fail(job: _Job, err: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(err)


def _decode_batch(jobs: list[_Job], cancel: CancelToken) -> list[Transcript]:
    recognizer, options = jobs[0].recognizer, jobs[0].options
    feats = [recognizer.features(job.audio) for job in jobs]
    lengths = torch.tensor([f.shape[0] for f in feats])
    padded = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)
    return recognizer.decode(padded, lengths, options, cancel=cancel)
