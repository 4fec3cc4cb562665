"""An OpenAI-compatible HTTP API beside the gRPC one (`asr serve --http-port P`): the same
process, models, engine (workers and batching), token, limits, metrics and drain.

    POST /v1/audio/transcriptions   multipart: file, model, language, prompt, response_format
                                    (json | text | srt | vtt | verbose_json),
                                    timestamp_granularities[] (word, segment), temperature
    GET  /v1/models, /v1/models/{id}

Shapes follow OpenAI's API reference and what the official `openai` client sends: `accept:
application/json` whatever the format (text, srt and vtt still come back as text/plain),
`timestamp_granularities[]` with its brackets, `temperature` as a string, the file last.
Errors are `{"error": {"message", "type", "param", "code"}}` with OpenAI's statuses: 400 bad
request or audio, 401 token, 404 unknown model or path, 413 over --max-message-bytes, 429
over --max-http-requests in flight and 503 draining (both with Retry-After, which the client
honours when it retries), 500 with a request id otherwise.

What maps how: `model` is one of this server's model names (GET /v1/models; empty: the
default); `language` must be English ("en", "english" or empty) since the models are;
`prompt` and `temperature` are accepted and ignored (our decoders have neither a text prompt
nor sampling; hotwords are the gRPC API's `speech_contexts`). verbose_json's segments are the
subtitle cues `asr transcribe` writes (split at pauses), each with its tokens, the mean log
word confidence as `avg_logprob`, whisper's gzip `compression_ratio` and `no_speech_prob` 0
(a segment exists only where words were heard).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import math
import time
import uuid
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from asr.audio import SAMPLE_RATE, AudioError, load_audio
from asr.cancel import Cancelled
from asr.decoding.options import WordTiming
from asr.tokenizer import Tokenizer
from asr.transcribe.inputs import Item
from asr.transcribe.results import FileResult, Segment
from asr.transcribe.segmentation import Cue, cues
from asr.transcribe.writers import ResultWriter, WriteSRT, WriteVTT
from server.config import ServerConfig
from server.engine import Engine, WorkerLost
from server.logs import fields, quoted
from server.metrics import Metrics
from server.servicer import Model, succeeded

log = logging.getLogger("asr.server")

TRANSCRIPTIONS = "/v1/audio/transcriptions"
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
ENGLISH = ("", "en", "english")
CUE_WORDS = 12  # words per verbose_json segment and subtitle cue at most (as asr transcribe)
RETRY_AFTER = "1"  # seconds, on 429 and 503
METHOD = "CreateTranscription"  # the metrics' method label (OpenAI's operation name)
CUT_OFF_SECONDS = 1  # after the drain's grace, requests still running get this, then cancelled
MAX_FIELDS = 32  # form fields a request may have (the client sends 7 at most)


@dataclass(frozen=True)
class ApiError(Exception):
    """An error as OpenAI shapes it: HTTP status, message, type, param, code."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    @property
    def type(self) -> str:
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def response(self) -> JSONResponse:
        body = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        headers = {"retry-after": RETRY_AFTER} if self.status in (429, 503) else None
        return JSONResponse(body, self.status, headers=headers)


class OpenAIApi:
    """The routes and their shared state (in-flight count, draining)."""

    def __init__(
        self, models: list[Model], engine: Engine, config: ServerConfig, metrics: Metrics
    ) -> None:
        self.models = {m.name: m for m in models}
        self.default = models[0].name
        self.engine, self.config, self.metrics = engine, config, metrics
        self.in_flight = 0
        self.draining = False
        self.idle = asyncio.Event()  # set while nothing is in flight (the drain waits on it)
        self.idle.set()
        routes = [
            Route(TRANSCRIPTIONS, self._counted(self.transcribe), methods=["POST"]),
            Route("/v1/models", self._counted(self.list_models, "ListModels"), methods=["GET"]),
            Route(
                "/v1/models/{model:path}",
                self._counted(self.get_model, "RetrieveModel"),
                methods=["GET"],
            ),
        ]
        self.app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: _http_error},  # type: ignore[dict-item]
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _counted(
        self, handler: Callable[[Request], Awaitable[Response]], method: str = METHOD
    ) -> Callable[[Request], Awaitable[Response]]:
        """Auth, drain and error shaping around a handler; every outcome counted by status."""

        async def endpoint(request: Request) -> Response:
            rid = request.state.request_id = uuid.uuid4().hex
            try:
                self._authorize(request)
                if self.draining:
                    raise ApiError(503, "the server is shutting down; retry", code="draining")
                response = await handler(request)
            except ApiError as err:
                log.info(
                    "%s failed: %s",
                    method,
                    err.message,
                    extra=fields(request_id=rid, rpc=method, code=str(err.status)),
                )
                response = err.response()
            except Exception:
                log.exception(
                    "%s failed", method, extra=fields(request_id=rid, rpc=method, code="500")
                )
                response = ApiError(
                    500, f"internal error; the server log has it under request_id {rid}"
                ).response()
            response.headers["x-request-id"] = rid
            self.metrics.requests.labels(method, str(response.status_code)).inc()
            return response

        return endpoint

    def _authorize(self, request: Request) -> None:
        token = self.config.auth_token
        if not token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(
                401,
                "missing or wrong bearer token (Authorization: Bearer <token>)",
                code="invalid_api_key",
            )

    def _model(self, name: str, param: str | None = "model") -> Model:
        name = name or self.default
        if name not in self.models:
            raise ApiError(
                404,
                f"the model {quoted(name)} does not exist; this server has "
                f"{', '.join(self.models)} (GET /v1/models)",
                param=param,
                code="model_not_found",
            )
        return self.models[name]

    # -- models -----------------------------------------------------------------------------

    def _model_json(self, model: Model) -> dict[str, Any]:
        training = model.recognizer.bundle.config.get("training", {})
        try:
            created = int(datetime.fromisoformat(training["exported_at"]).timestamp())
        except (KeyError, TypeError, ValueError):
            created = 0
        return {"id": model.name, "object": "model", "created": created, "owned_by": "asr"}

    async def list_models(self, request: Request) -> Response:
        data = [self._model_json(m) for m in self.models.values()]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        return JSONResponse(self._model_json(self._model(request.path_params["model"], None)))

    # -- transcriptions ---------------------------------------------------------------------

    async def transcribe(self, request: Request) -> Response:
        if self.in_flight >= self.config.max_http_requests:
            raise ApiError(
                429,
                f"too many transcriptions in flight (limit {self.config.max_http_requests}); retry",
                code="rate_limit_exceeded",
            )
        self.in_flight += 1
        self.idle.clear()
        try:
            return await self._transcribe(request)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()

    async def _transcribe(self, request: Request) -> Response:
        started = time.perf_counter()
        form = await self._form(request)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "a file is required (multipart field 'file')", param="file")
        model = self._model(_text(form.get("model")))
        language = _text(form.get("language")).lower()
        if language not in ENGLISH:
            raise ApiError(
                400,
                f"language {quoted(language)} is not supported; the models are English ('en')",
                param="language",
                code="unsupported_language",
            )
        fmt = _text(form.get("response_format")) or "json"
        if fmt not in FORMATS:
            raise ApiError(
                400,
                f"response_format {quoted(fmt)} is not one of {', '.join(FORMATS)}",
                param="response_format",
            )
        granularities = [_text(g) for g in form.getlist("timestamp_granularities[]")]
        for g in granularities:
            if g not in GRANULARITIES:
                raise ApiError(
                    400,
                    f"timestamp_granularities[] {quoted(g)} is not word or segment",
                    param="timestamp_granularities[]",
                )
        if granularities and fmt != "verbose_json":
            raise ApiError(
                400,
                "timestamp_granularities[] needs response_format verbose_json",
                param="timestamp_granularities[]",
            )
        data = await upload.read()
        name = upload.filename or "file"
        limit = self.config.max_unary_seconds
        try:  # off the event loop: a long compressed file takes a while to decode
            audio = await asyncio.to_thread(load_audio, data, name=name, max_seconds=limit)
        except AudioError as err:
            raise ApiError(400, str(err), param="file", code="invalid_audio") from err
        seconds = audio.numel() / SAMPLE_RATE
        if seconds > limit:  # a header that understated
            raise ApiError(
                400, f"{name}: audio is {seconds:.1f} s; at most {limit:.0f} s", param="file"
            )
        timed = fmt in ("srt", "vtt", "verbose_json")
        options = replace(model.recognizer.options, word_timings=timed)
        try:
            transcript, model_seconds = await self.engine.recognize(
                model.name, audio, options, cancelled=None
            )
        except WorkerLost as err:
            raise ApiError(503, f"{err}; retry", code="worker_lost") from err
        except Cancelled as err:
            raise ApiError(503, str(err)) from err
        latency = time.perf_counter() - started
        rid = request.state.request_id
        succeeded(self.metrics, METHOD, rid, model, seconds, latency, model_seconds, "200")
        segments = (Segment(0.0, seconds, transcript),) if transcript.text else ()
        result = FileResult(Item(id=name, path=Path(name)), seconds, segments)
        tokenizer = model.recognizer.bundle.tokenizer
        return RESPONSES[fmt](Heard(result, tokenizer, tuple(granularities or ["segment"])))

    async def _form(self, request: Request) -> Any:
        """The multipart form, its size bounded by --max-message-bytes before and while it
        is read (413)."""
        limit = self.config.max_message_bytes
        too_large = ApiError(
            413,
            f"the request is over this server's --max-message-bytes {limit}",
            code="request_too_large",
        )
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "the request must be multipart/form-data (fields and a file)")

        async def bounded() -> AsyncGenerator[bytes, None]:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                yield chunk

        parser = MultiPartParser(
            request.headers, bounded(), max_files=1, max_fields=MAX_FIELDS, max_part_size=limit
        )
        try:
            return await parser.parse()
        except MultiPartException as err:
            raise ApiError(400, f"bad multipart form: {err.message}") from err


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404/405 in OpenAI's error shape."""
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return ApiError(exc.status_code, message).response()


# -- response formats ---------------------------------------------------------------------


@dataclass(frozen=True)
class Heard:
    """One request's transcript, as the formats below need it."""

    result: FileResult  # one segment (none if nothing was heard), as asr transcribe has them
    tokenizer: Tokenizer
    granularities: tuple[str, ...]  # verbose_json: word, segment

    @property
    def usage(self) -> dict[str, Any]:
        return {"type": "duration", "seconds": math.ceil(self.result.duration)}


def _json(heard: Heard) -> Response:
    return JSONResponse({"text": heard.result.text, "usage": heard.usage})


def _plain(heard: Heard) -> Response:
    return PlainTextResponse(heard.result.text + "\n")


def _subtitles(writer: type[ResultWriter]) -> Callable[[Heard], Response]:
    def respond(heard: Heard) -> Response:
        out = io.StringIO()
        writer(cue_words=CUE_WORDS, nbest=False).write_result(heard.result, out)
        return PlainTextResponse(out.getvalue())

    return respond


def _verbose(heard: Heard) -> Response:
    result = heard.result
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": "english",
        "duration": round(result.duration, 3),
        "text": result.text,
    }
    if "word" in heard.granularities:
        body["words"] = [
            {"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)}
            for w in result.words
        ]
    if "segment" in heard.granularities:
        body["segments"] = [
            _segment(i, cue, words, heard.tokenizer)
            for i, (cue, words) in enumerate(_cue_words(result))
        ]
    body["usage"] = heard.usage
    return JSONResponse(body)


def _cue_words(result: FileResult) -> list[tuple[Cue, list[WordTiming]]]:
    """Each subtitle cue with its words (cues split the words in order)."""
    words, out = result.words, []
    for cue in cues(result, CUE_WORDS):
        n = len(cue.text.split())
        out.append((cue, words[:n]))
        words = words[n:]
    return out


def _segment(i: int, cue: Cue, words: list[WordTiming], tokenizer: Tokenizer) -> dict[str, Any]:
    confidences = [max(w.confidence, 1e-6) for w in words] or [1.0]
    encoded = cue.text.encode()
    return {
        "id": i,
        "seek": 0,
        "start": round(cue.start, 3),
        "end": round(cue.end, 3),
        "text": cue.text,
        "tokens": tokenizer.encode(cue.text),
        "temperature": 0.0,
        "avg_logprob": round(sum(map(math.log, confidences)) / len(confidences), 4),
        # whisper's measure of repetitive output: text bytes over their zlib size
        "compression_ratio": round(len(encoded) / len(zlib.compress(encoded)), 4),
        "no_speech_prob": 0.0,
    }


RESPONSES: dict[str, Callable[[Heard], Response]] = {
    "json": _json,
    "text": _plain,
    "srt": _subtitles(WriteSRT),
    "vtt": _subtitles(WriteVTT),
    "verbose_json": _verbose,
}


# -- serving ------------------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: `asr serve` owns SIGTERM (one drain for both
    APIs)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """The API on uvicorn, on the running event loop (the gRPC server's)."""

    def __init__(self, api: OpenAIApi, config: ServerConfig) -> None:
        self.api = api
        # uvicorn's own start-up lines repeat what `asr serve` prints; its warnings stay.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        tls = {}
        if config.tls_cert and config.tls_key:
            tls = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
        self.server = _Uvicorn(
            uvicorn.Config(
                api.app,
                host=config.host,
                port=config.http_port or 0,
                log_config=None,  # our logging (server.logs), not uvicorn's
                access_log=False,  # every request is logged by OpenAIApi
                lifespan="off",
                h11_max_incomplete_event_size=64 * 1024,  # headers: no more
                **tls,  # type: ignore[arg-type]
            )
        )
        self.task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Listen; the port (OSError if it cannot)."""
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():  # it could not bind (uvicorn exits)
                await asyncio.gather(self.task, return_exceptions=True)
                config = self.server.config
                raise OSError(f"cannot listen on {config.host}:{config.port} (HTTP API)")
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace: float) -> None:
        """New requests get 503; those in flight get `grace` seconds; then it closes."""
        self.api.draining = True
        try:
            await asyncio.wait_for(self.api.idle.wait(), grace)
        except TimeoutError:  # what still runs is cancelled, as gRPC's calls are (uvicorn
            # would otherwise wait for it without end)
            self.server.config.timeout_graceful_shutdown = CUT_OFF_SECONDS
        self.server.should_exit = True
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
