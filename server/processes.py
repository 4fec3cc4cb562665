"""Model workers in processes of their own, so that N workers use N cores.

A worker's batching (sessions, features, the search's bookkeeping) is Python-heavy: as threads,
two workers would share one core through the GIL. Each `ProcessWorker` forks a child that runs
an ordinary `Worker` (turns, Recognize micro-batching, cross-stream batching: server.engine)
on its own event loop, over the models forked with it: the weights' pages are shared with
the server process copy-on-write, never written, so N workers do not hold N copies.

The server process keeps the gRPC side (calls, audio decoding, responses) and sends each
worker requests over a pipe; the child holds the streams' sessions. Messages are tuples:

    server -> worker   ("open", sid, model, options, endpoint, interim_results)
                       ("accept" | "finish", key, sid, samples)   samples: float32 ndarray
                       ("close", sid)
                       ("recognize", key, model, audio, options, timeout)
                       ("cancel", key)   the caller is gone: its task is cancelled
                       ("stop",)
    worker -> server   ("done", key, value) | ("error", key, exception)
                       value of "accept" | "finish": (results, model seconds, samples the
                       stream needs before its next chunk does work: `HeldAudio`)
                       ("batch", kind, size, waits)   a batch it ran, for the metrics

Arrays, not tensors, cross the pipe: torch pickles tensors through shared memory, which
costs a file descriptor per tensor. A thread on each side reads the pipe, and the server's
writes go through a writer thread, so a long Recognize request never blocks the event loop.

Forking is done from a thread with no event loop running (the child runs its own), before
the gRPC server is created (the child must not touch gRPC's state). The child ignores
SIGINT and SIGTERM: the server drains its calls, then stops its workers. If the server
process dies, the child reads end-of-file on its pipe and exits. If a child dies, its calls
fail and the engine stops sending it work.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from asr.cancel import Cancelled
from asr.decoding.options import DecodeOptions, Transcript
from asr.recognizer import Recognizer
from asr.streaming import EndpointConfig, StreamingSession, StreamResult
from server.engine import HeldAudio, ModelWorker, Worker, WorkerLost, WorkerSettings

log = logging.getLogger("asr.server")
STOP_SECONDS = 10.0  # a child that has not exited this long after "stop" is killed


class ProcessWorker(ModelWorker):
    """A `Worker` in a forked child process (module docstring)."""

    def __init__(
        self,
        index: int,
        recognizers: dict[str, Recognizer],
        settings: WorkerSettings,
        on_batch: Callable[[str, int, list[float]], None] | None = None,
    ) -> None:
        super().__init__(index, on_batch)
        self.recognizers = recognizers
        self.settings = settings
        self._keys = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._lost: str | None = None  # why the child is gone, once it is
        self._stopping = False

    @property
    def alive(self) -> bool:
        return self._lost is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("fork")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_child_main,
            args=(theirs, ours, self.index, self.recognizers, self.settings),
            name=f"asr-worker-{self.index}",
            daemon=True,
        )
        await asyncio.to_thread(process.start)  # forked from a thread without a running loop
        theirs.close()
        self._conn, self._process = ours, process
        threading.Thread(
            target=self._read, name=f"asr-worker-{self.index}-read", daemon=True
        ).start()
        threading.Thread(
            target=self._write, name=f"asr-worker-{self.index}-write", daemon=True
        ).start()

    async def stop(self) -> None:
        if self._process is None:
            return
        self._stopping = True
        self._outbox.put(("stop",))
        self._outbox.put(None)  # then the writer ends
        await asyncio.to_thread(self._process.join, STOP_SECONDS)
        if self._process.is_alive():
            log.error("model worker %d did not stop in %.0f s: killed", self.index, STOP_SECONDS)
            self._process.kill()
            await asyncio.to_thread(self._process.join)
        self._fail_all(Cancelled("the server is stopping"))

    # The server's side of the pipe.

    def _write(self) -> None:
        assert self._conn is not None
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the child is gone: the reader reports it
                return

    def _read(self) -> None:
        assert self._conn is not None
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                self._loop.call_soon_threadsafe(self._on_lost)
                return
            self._loop.call_soon_threadsafe(self._on_message, message)

    def _on_message(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "batch":
            self._record(*message[1:])
            return
        future = self._pending.pop(message[1], None)
        if future is None or future.done():  # its caller went away
            return
        if kind == "done":
            future.set_result(message[2])
        else:
            future.set_exception(message[2])

    def _on_lost(self) -> None:
        code = None if self._process is None else self._process.exitcode
        self._lost = f"model worker {self.index} exited (exit code {code})"
        self._fail_all(WorkerLost(self._lost))
        if not self._stopping:
            log.error("%s: its calls fail, new ones go to the other workers", self._lost)
            if self.on_lost is not None:
                self.on_lost()

    def _fail_all(self, err: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(err)

    def _send(self, *message: Any) -> None:
        if self._lost is not None:
            raise WorkerLost(self._lost)
        self._outbox.put(message)

    async def _call(self, kind: str, *payload: Any) -> Any:
        """Send a request and wait for its answer; a cancelled wait cancels it there too."""
        key = next(self._keys)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._send(kind, key, *payload)  # answered on this thread's loop, so not before:
        self._pending[key] = future
        try:
            return await future
        except asyncio.CancelledError:
            self._pending.pop(key, None)
            with contextlib.suppress(WorkerLost):  # a lost child has nothing to cancel
                self._send("cancel", key)
            raise

    # The engine's interface.

    def open_stream(
        self, model: str, options: DecodeOptions, endpoint: EndpointConfig, interim_results: bool
    ) -> _RemoteStream:
        sid = next(self._keys)
        self._send("open", sid, model, options, endpoint, interim_results)
        return _RemoteStream(self, sid)

    async def recognize(
        self,
        model: str,
        audio: torch.Tensor,
        options: DecodeOptions,
        *,
        timeout: float | None,
        cancelled: Callable[[], bool] | None,
    ) -> tuple[Transcript, float]:
        # `cancelled` is not polled across processes: a cancelled call's await is cancelled
        # (gRPC cancels the handler), which cancels the decode in the child.
        result: tuple[Transcript, float] = await self._call(
            "recognize", model, _array(audio), options, timeout
        )
        return result


class _RemoteStream:
    def __init__(self, worker: ProcessWorker, sid: int) -> None:
        self.worker, self.sid = worker, sid
        self.held = HeldAudio()  # chunks that complete no block never cross the pipe
        self.closed = False

    async def accept(self, samples: torch.Tensor) -> tuple[list[StreamResult], float]:
        return await self._send("accept", samples)

    async def finish(self, samples: torch.Tensor) -> tuple[list[StreamResult], float]:
        return await self._send("finish", samples)

    async def _send(self, kind: str, samples: torch.Tensor) -> tuple[list[StreamResult], float]:
        if self.closed:
            raise RuntimeError("the stream is closed")
        if (audio := self.held.take(samples, last=kind == "finish")) is None:
            return [], 0.0
        answer: tuple[list[StreamResult], float, int] = await self.worker._call(
            kind, self.sid, _array(audio)
        )
        results, seconds, self.held.due = answer
        return results, seconds

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(WorkerLost):  # a lost child holds no session any more
            self.worker._send("close", self.sid)


def _array(samples: torch.Tensor) -> np.ndarray:
    return samples.detach().to(torch.float32).numpy()


# The child's side.


def _child_main(
    conn: Connection,
    server_end: Connection,
    index: int,
    recognizers: dict[str, Recognizer],
    settings: WorkerSettings,
) -> None:
    server_end.close()  # so that the server's end closing is an end-of-file here
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(ValueError):  # the server's event loop's wakeup pipe is not ours
        signal.set_wakeup_fd(-1)
    torch.set_num_threads(settings.torch_threads)
    asyncio.run(_Child(conn, index, recognizers, settings).run())


class _Child:
    def __init__(
        self,
        conn: Connection,
        index: int,
        recognizers: dict[str, Recognizer],
        settings: WorkerSettings,
    ) -> None:
        self.conn = conn
        self.recognizers = recognizers
        self.worker = Worker(index=index, **asdict(settings))
        self.worker.on_batch = self._batch
        # a stream's session, or why it could not be opened (raised at its first call)
        self.sessions: dict[int, StreamingSession | Exception] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopped: asyncio.Future[None] = loop.create_future()
        self.worker.start()
        threading.Thread(target=self._read, args=(loop,), daemon=True).start()
        await self.stopped
        for task in list(self.tasks.values()):
            task.cancel()
        await self.worker.stop()
        self.conn.close()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the server is gone
                message = ("stop",)
            loop.call_soon_threadsafe(self._handle, message)
            if message[0] == "stop":
                return

    def _send(self, *message: Any) -> None:
        with contextlib.suppress(OSError, ValueError):  # the server is gone: the reader stops us
            self.conn.send(message)

    def _batch(self, kind: str, size: int, waits: list[float]) -> None:
        self._send("batch", kind, size, waits)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "stop":
            if not self.stopped.done():
                self.stopped.set_result(None)
        elif kind == "open":
            sid, model, options, endpoint, interim = message[1:]
            try:
                session = StreamingSession(
                    self.recognizers[model], options, endpoint, interim_results=interim
                )
                self.sessions[sid] = session
            except Exception as err:
                self.sessions[sid] = err
        elif kind == "close":
            self.sessions.pop(message[1], None)
        elif kind == "cancel":
            task = self.tasks.get(message[1])
            if task is not None:
                task.cancel()
        else:
            key = message[1]
            self.tasks[key] = asyncio.get_running_loop().create_task(
                self._answer(key, self._work(kind, *message[2:]))
            )

    async def _work(self, kind: str, *payload: Any) -> Any:
        if kind == "recognize":
            model, audio, options, timeout = payload
            return await self.worker.recognize(
                self.recognizers[model], torch.from_numpy(audio), options, timeout=timeout
            )
        sid, samples = payload
        session = self.sessions.get(sid)
        if session is None:
            raise RuntimeError("the stream is closed")
        if isinstance(session, Exception):
            raise session
        last = kind == "finish"
        results, seconds = await self.worker.stream(session, torch.from_numpy(samples), last=last)
        return results, seconds, session.samples_until_due()  # the server holds audio till then

    async def _answer(self, key: int, work: Any) -> None:
        try:
            self._send("done", key, await work)
        except asyncio.CancelledError:  # the caller is gone: nobody to answer
            pass
        except Exception as err:
            self._send("error", key, _portable(err))
        finally:
            self.tasks.pop(key, None)


def _portable(err: Exception) -> Exception:
    """`err` if it survives pickling, else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
