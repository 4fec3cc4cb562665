"""Build and run the gRPC server: models, the Recognizer service, health, reflection, and a
graceful stop on SIGTERM/SIGINT (health NOT_SERVING, new calls refused, in-flight calls get
`grace_seconds` to finish)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from asr import load_model
from asr.v1 import asr_pb2, asr_pb2_grpc
from server import capacity, google_speech
from server.auth import Continuation, TokenAuth
from server.config import ServerConfig
from server.engine import Engine, WorkerSettings
from server.logs import fields
from server.metrics import CountOutcomes, Metrics
from server.openai_http import HttpServer, OpenAIApi
from server.servicer import Model, RecognizerServicer, RequestError

log = logging.getLogger("asr.server")
SERVICE = asr_pb2.DESCRIPTOR.services_by_name["Recognizer"].full_name


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    health: health.HealthServicer
    engine: Engine
    servicer: RecognizerServicer
    metrics_port: int | None
    http: HttpServer | None = None  # the OpenAI-compatible HTTP API, if on
    capacity: capacity.Capacity | None = None  # the start-up probe, if it sized the limit

    async def stop(self, grace: float) -> None:
        """Stop taking calls, let in-flight ones finish within `grace` seconds, then exit."""
        self.health.enter_graceful_shutdown()  # every service NOT_SERVING
        stopping = [self.server.stop(grace)]
        if self.http is not None:
            stopping.append(self.http.stop(grace))
        await asyncio.gather(*stopping)
        await self.engine.stop()


# gRPC itself refuses a message over its receive limit before any of our code sees it, so the
# call would go uncounted and its message would not name our flag. Our own limit is checked
# in `CheckRequests`; gRPC's is this many times larger, bounding what it buffers per message.
CORE_LIMIT_FACTOR = 2
MAX_CORE_LIMIT = 2**31 - 1  # gRPC's channel arguments are C ints


@dataclass(frozen=True)
class _Refused:
    """What a request deserializer returns in place of a message it will not decode."""

    code: grpc.StatusCode
    message: str


class CheckRequests(grpc.aio.ServerInterceptor):
    """Request messages of `services` are decoded only if at most `max_bytes` long (else
    RESOURCE_EXHAUSTED) and well-formed (else INVALID_ARGUMENT). A deserializer's exception
    would reach the client as UNKNOWN, so it returns `_Refused` instead: a unary handler is
    then not called, and a stream's requests raise `RequestError` when that message is read.

    Inside auth: a caller without the token gets UNAUTHENTICATED, whatever it sent."""

    def __init__(self, max_bytes: int, services: tuple[str, ...]) -> None:
        self.max_bytes = max_bytes
        self.services = services

    async def intercept_service(
        self,
        continuation: Continuation,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.strip("/").partition("/")[0] not in self.services:
            return handler
        parse = handler.request_deserializer

        def deserialize(raw: bytes) -> Any:
            if len(raw) > self.max_bytes:
                return _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"a request message of {len(raw)} bytes is more than this server's "
                    f"--max-message-bytes {self.max_bytes}",
                )
            try:
                return parse(raw)
            except Exception as err:  # protobuf's DecodeError, or anything a parser raises
                return _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"malformed request message for {details.method} ({type(err).__name__})",
                )

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _unary_to_stream(handler.unary_stream),
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            stream_unary = handler.stream_unary

            async def stream_in(requests: AsyncIterator[Any], context: Any) -> Any:
                return await stream_unary(_checked(requests), context)

            return grpc.stream_unary_rpc_method_handler(
                stream_in,
                request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        stream_stream = handler.stream_stream

        async def streams(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for response in stream_stream(_checked(requests), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            streams,
            request_deserializer=deserialize,
            response_serializer=handler.response_serializer,
        )


def _unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Refused):
            await context.abort(request.code, request.message)
        return await behavior(request, context)

    return checked


def _unary_to_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, _Refused):
            await context.abort(request.code, request.message)
        async for response in behavior(request, context):
            yield response

    return checked


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Refused):
            raise RequestError(request.code, request.message)
        yield request


def load_models(config: ServerConfig) -> list[Model]:
    rescorers, lms = dict(config.rescorers), dict(config.lms)
    return [
        Model(
            name,
            load_model(
                path,
                rescorer=rescorers.get(name),
                lm=lms.get(name),
                chunking=config.chunking,
                quantize=config.quantize,
            ),
        )
        for name, path in config.models
    ]


def _read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read the TLS {what} ({err.strerror})") from err
    if b"-----BEGIN" not in data:
        raise ValueError(f"{path}: the TLS {what} is not PEM")
    return data


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when configured, read before anything slow so a bad file fails fast."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    key = _read_pem(config.tls_key, "private key")
    cert = _read_pem(config.tls_cert, "certificate")
    return grpc.ssl_server_credentials([(key, cert)])


async def start(config: ServerConfig, models: list[Model] | None = None) -> Running:
    """Load the models (unless given), then listen; health turns SERVING only after that."""
    credentials = _credentials(config)
    models = models if models is not None else load_models(config)
    metrics = Metrics()
    # Model workers start (processes fork) before the gRPC server exists.
    engine = Engine(
        {m.name: m.recognizer for m in models},
        workers=config.worker_count,
        settings=WorkerSettings(
            torch_threads=config.torch_threads,
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            max_stream_batch=config.max_stream_batch,
            stream_wait_ms=config.stream_wait_ms,
        ),
        on_batch=metrics.batch,
    )
    await engine.start()
    try:
        measured = None
        if not config.max_concurrent_streams:
            measured = await _stream_capacity(config, models, engine)
            streams = DEFAULT_STREAMS if measured is None else measured.streams
            config = replace(config, max_concurrent_streams=streams)
        running = await _listen(config, credentials, models, engine, metrics)
    except BaseException:  # e.g. the port is taken: no worker left behind
        await engine.stop()
        raise
    return replace(running, capacity=measured)


# The stream limit when no model can stream (streams are refused anyway: it bounds the calls
# open at once to hear so).
DEFAULT_STREAMS = 64


async def _stream_capacity(
    config: ServerConfig, models: list[Model], engine: Engine
) -> capacity.Capacity | None:
    """The start-up probe of the first model that streams (`server.capacity`), logged."""
    model = next((m for m in models if m.streams), None)
    if model is None:
        return None
    measured = await capacity.measure(engine, model.name, model.recognizer, config.endpoint)
    log.info(
        "stream capacity",
        extra=fields(
            model=model.name,
            max_streams=measured.streams,
            realtime_streams=round(measured.realtime, 1),
            stream_bytes=measured.stream_bytes,
        ),
    )
    return measured


async def _listen(
    config: ServerConfig,
    credentials: grpc.ServerCredentials | None,
    models: list[Model],
    engine: Engine,
    metrics: Metrics,
) -> Running:
    size = config.max_message_bytes
    core_limit = min(CORE_LIMIT_FACTOR * size, MAX_CORE_LIMIT)
    services = (SERVICE, google_speech.SERVICE, google_speech.OPERATIONS)
    # Outermost first: every outcome is counted, auth's refusals included; auth answers
    # before a request is looked at.
    interceptors: list[grpc.aio.ServerInterceptor] = [CountOutcomes(metrics.requests, services)]
    if config.auth_token:
        interceptors.append(TokenAuth(config.auth_token))
    interceptors.append(CheckRequests(size, services))
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", core_limit),
            ("grpc.max_send_message_length", size),
        ],
        interceptors=interceptors,
    )
    servicer = RecognizerServicer(models, engine, config, metrics)
    metrics.max_streams.set(config.max_concurrent_streams)
    asr_pb2_grpc.add_RecognizerServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(google_speech.GoogleSpeech(servicer).handlers())
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Not Google's services: google-cloud-speech builds message descriptors only (no service
    # in the pool), so reflection could list them but not describe them.
    reflection.enable_server_reflection(
        (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = metrics.serve(config.host, config.metrics_port)

    def down() -> None:  # every model worker died: take this replica out of rotation
        log.error("no model worker is left: health NOT_SERVING")
        for name in ("", SERVICE):
            health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    engine.on_down = down
    http = None
    if config.http_port is not None:
        http = HttpServer(OpenAIApi(models, engine, config, metrics), config)
        try:
            await http.start()
        except BaseException:
            await server.stop(0)
            raise
    for name in ("", SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, port, health_servicer, engine, servicer, metrics_port, http)


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    running = await start(config)
    names = ", ".join(f"{n}={p}" for n, p in config.models)
    scheme = "TLS" if config.tls_cert else "plaintext"
    log.info(
        "serving",
        extra=fields(models=names, host=config.host, port=running.port, transport=scheme),
    )
    print(
        f"asr serve: listening on {config.host}:{running.port} ({scheme}) with {names}",
        flush=True,
    )
    if running.capacity is not None:
        print(f"asr serve: admitting {running.capacity.describe()}")
    if running.http is not None:
        scheme = "https" if config.tls_cert else "http"
        print(
            f"asr serve: OpenAI-compatible API on {scheme}://{config.host}:{running.http.port}/v1"
        )
    if running.metrics_port is not None:
        print(f"asr serve: metrics on http://{config.host}:{running.metrics_port}/metrics")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"asr serve: stopping (up to {config.grace_seconds:.0f} s for calls in flight)")
    await running.stop(config.grace_seconds)
