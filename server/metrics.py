"""Prometheus metrics on an HTTP port: requests and errors by status code, active streams,
audio seconds, latency and real-time factor (model time per audio second).

Requests are counted by `CountOutcomes`, an interceptor outside everything else (auth
included), so every way a call ends is counted once by its status code: a handler's return or
abort, an auth failure, a client that went away (CANCELLED), a deadline.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from server.auth import Continuation

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RTF_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """One registry per server, so tests and several servers in a process stay apart."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "asr_requests",
            "Finished RPCs by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.active_streams = Gauge(
            "asr_active_streams", "Open StreamingRecognize calls", registry=r
        )
        self.max_streams = Gauge(
            "asr_max_streams",
            "Concurrent streams admitted (--max-streams, or sized at start-up from the measured "
            "capacity): with asr_active_streams, how full this replica is",
            registry=r,
        )
        self.audio_seconds = Counter(
            "asr_audio_seconds", "Seconds of audio recognized", ["method"], registry=r
        )
        self.latency = Histogram(
            "asr_request_seconds",
            "Recognize: request to response; StreamingRecognize: last audio to last result",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rtf = Histogram(
            "asr_real_time_factor",
            "Model-thread seconds per second of audio (queueing excluded; a micro-batch's time "
            "shared by audio length)",
            ["method"],
            buckets=RTF_BUCKETS,
            registry=r,
        )

        self.batch_size = Histogram(
            "asr_batch_size",
            "Calls run together: Recognize calls decoded as one batch (kind=recognize); stream "
            "chunks run as one batched encoder and search call (kind=stream)",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "asr_queue_seconds",
            "Time a Recognize call or stream chunk waited for its batch to start (collection "
            "window and model busy)",
            ["kind"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )

    def batch(self, kind: str, size: int, waits: list[float]) -> None:
        """Record one batch of `kind` (recognize, stream): its size and each call's wait."""
        self.batch_size.labels(kind).observe(size)
        queue_wait = self.queue_wait.labels(kind)
        for wait in waits:
            queue_wait.observe(wait)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the port (useful with port 0)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


# gRPC cancels a handler when its deadline passes, reporting the deadline only to the client;
# a cancellation this close to the deadline is taken for it. The server's deadline is the
# client's timeout counted from when the server got the call, so it runs late by however long
# the call took to arrive and be dispatched: on a loaded single core that exceeded 0.1 s and a
# deadline was counted as a cancellation. A client cancelling in its last second is counted as
# out of time, which is what it nearly was.
DEADLINE_SLACK_S = 1.0


def outcome(context: grpc.aio.ServicerContext, err: BaseException | None) -> str:
    """The status code a call ended with, by name, from how its handler ended (`err`)."""
    if isinstance(err, asyncio.CancelledError | GeneratorExit):  # the call ended under it
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= DEADLINE_SLACK_S
        return "DEADLINE_EXCEEDED" if expired else "CANCELLED"
    code = context.code()  # set by abort() or set_code()
    if code is not None:
        return str(code.name)
    return "OK" if err is None else "UNKNOWN"  # UNKNOWN: what gRPC sends for an exception


class CountOutcomes(grpc.aio.ServerInterceptor):
    """Counts each finished call of `services` in `counter` by (method, status code): the
    first service's methods by name (Recognize), the others' by their full name
    (google.cloud.speech.v1.Speech/Recognize)."""

    def __init__(self, counter: Counter, services: tuple[str, ...]) -> None:
        self.counter = counter
        self.services = services

    async def intercept_service(
        self,
        continuation: Continuation,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service, _, method = details.method.strip("/").partition("/")
        if handler is None or service not in self.services:
            return handler
        name = method if service == self.services[0] else f"{service}/{method}"
        return _counted(handler, lambda code: self.counter.labels(name, code).inc())


def _counted(handler: grpc.RpcMethodHandler, count: Callable[[str], None]) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped to `count` the code it ends with. Our services'
    handlers (and auth's refusals) are coroutines or async generators; others pass as they are."""
    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    kind = next(k for k in kinds if getattr(handler, k) is not None)
    behavior = getattr(handler, kind)
    wrapped: Callable[..., Any]
    if inspect.isasyncgenfunction(behavior):

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            err: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as e:
                err = e
                raise
            finally:
                count(outcome(context, err))

    elif inspect.iscoroutinefunction(behavior):

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                response = await behavior(request, context)
            except BaseException as err:
                count(outcome(context, err))
                raise
            count(outcome(context, None))
            return response

    else:
        return handler
    return kinds[kind](
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
