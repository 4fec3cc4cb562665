"""The asr.v1.Recognizer service: Recognize, StreamingRecognize, ListModels.

Every failure a client can cause ends the call with a status code and a message naming the
problem (INVALID_ARGUMENT, NOT_FOUND, OUT_OF_RANGE, RESOURCE_EXHAUSTED); anything else is
logged and returned as INTERNAL. No request can stop the server, nor make it do unbounded
work: every field that drives cost (beam, alternatives, audio length, channels, endpoint
durations) is checked against the server's limits before any audio is decoded, and a
request's text fields are echoed only through `quoted`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import NoReturn

import grpc
import soundfile as sf
import torch

from asr.audio import (
    MAX_CHANNELS,
    SAMPLE_RATE,
    AudioError,
    PCMStream,
    check_sample_rate,
    decode_pcm16,
    load_audio,
)
from asr.cancel import Cancelled, DeadlineExceeded
from asr.client import to_alternatives, to_duration, to_seconds
from asr.decoding.options import DEFAULT_BOOST, DecodeOptions
from asr.models import count_parameters
from asr.recognizer import METHODS, Recognizer
from asr.streaming import EndpointConfig, StreamResult
from asr.v1 import asr_pb2, asr_pb2_grpc
from server.config import ServerConfig
from server.engine import Engine, WorkerLost
from server.logs import fields, quoted
from server.metrics import Metrics

log = logging.getLogger("asr.server")
Config = asr_pb2.RecognitionConfig

# Every model we train is US English (ListModels reports it). A request may name it in any
# case, with "_" for "-", or by its language alone ("en"); another region ("en-GB") is
# refused rather than silently served by a model that was not trained for it.
LANGUAGE = "en-US"
ACCEPTED_LANGUAGES = frozenset({"en-us", "en"})
# The container each explicit encoding names, as soundfile reports it (`sf.info().format`).
CONTAINERS = {
    Config.FLAC: frozenset({"FLAC"}),
    Config.WAV: frozenset({"WAV", "WAVEX", "RF64"}),  # WAVEX, RF64: WAV's extended forms
    Config.OGG_VORBIS: frozenset({"OGG"}),
}
# A request id is echoed verbatim in responses and logs so a client can find its call; one
# we would have to alter (cut, escaped) would no longer match the client's own records, so
# an over-long or unprintable one is refused (INVALID_ARGUMENT) instead of sanitized.
MAX_REQUEST_ID = 128
# The whole of a status message, whatever it quotes: it travels in a trailer, and gRPC
# turns a trailer over its metadata limit into RESOURCE_EXHAUSTED.
MAX_STATUS_MESSAGE = 1000


class RequestError(Exception):
    """A problem with the request: ends the call with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def request_id(given: str) -> str:
    """The call's id: the client's (checked, see MAX_REQUEST_ID) or a new one."""
    if not given:
        return uuid.uuid4().hex
    if len(given) > MAX_REQUEST_ID or not given.isprintable():
        raise _invalid(
            f"request_id {quoted(given)} must be at most {MAX_REQUEST_ID} printable characters"
        )
    return given


def check_audio_format(config: Config) -> None:
    """The audio fields of a config, checked alike for Recognize and StreamingRecognize and
    before any audio is read: a stream declaring 2**31 channels would otherwise never
    complete a frame, and its bytes would pile up uncounted."""
    if config.encoding not in Config.AudioEncoding.values():
        raise _invalid(f"unknown encoding {config.encoding}")
    channels = config.audio_channel_count
    if not 0 <= channels <= MAX_CHANNELS:
        raise _invalid(f"audio_channel_count {channels} is not supported (1-{MAX_CHANNELS})")
    if config.encoding == Config.LINEAR16:
        if not config.sample_rate_hertz:
            raise _invalid("LINEAR16 audio needs sample_rate_hertz")
        try:
            check_sample_rate(config.sample_rate_hertz, "sample_rate_hertz")
        except AudioError as err:
            raise _invalid(str(err)) from err
    if config.language_code:
        tag = config.language_code.replace("_", "-").lower()
        if tag not in ACCEPTED_LANGUAGES:
            raise _invalid(
                f"language_code {quoted(config.language_code)} is not supported: "
                f"this server recognizes {LANGUAGE} (or leave it empty)"
            )


def check_container(audio: bytes, encoding: Config.AudioEncoding) -> None:
    """An explicit container encoding must be what the audio is. Undetectable bytes pass,
    for the decoder to reject with its own message."""
    expected = CONTAINERS.get(encoding)
    if expected is None:
        return
    try:
        found = sf.info(io.BytesIO(audio)).format
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return
    if found not in expected:
        name = Config.AudioEncoding.Name(encoding)
        raise _invalid(f"encoding {name}, but the audio is {found}")


@dataclass
class Model:
    name: str
    recognizer: Recognizer

    @property
    def streams(self) -> bool:
        return self.recognizer.can_stream


def succeeded(
    metrics: Metrics,
    method: str,
    rid: str,
    model: Model,
    audio_seconds: float,
    latency: float,
    model_seconds: float,
    code: str = "OK",
) -> None:
    """Metrics and the log line of a call that ended well (the HTTP API's too, `code` its
    status). latency: Recognize: request to response; StreamingRecognize: last audio to
    final result (queueing included)."""
    rtf = model_seconds / max(audio_seconds, 1e-3)
    metrics.audio_seconds.labels(method).inc(audio_seconds)
    metrics.latency.labels(method).observe(latency)
    metrics.rtf.labels(method).observe(rtf)
    log.info(
        "%s done",
        method,
        extra=fields(
            request_id=rid,
            rpc=method,
            code=code,
            model=model.name,
            audio_s=round(audio_seconds, 3),
            latency_ms=round(latency * 1000, 1),
            rtf=round(rtf, 4),
        ),
    )


class RecognizerServicer(asr_pb2_grpc.RecognizerServicer):
    def __init__(
        self, models: list[Model], engine: Engine, config: ServerConfig, metrics: Metrics
    ) -> None:
        self.models = {m.name: m for m in models}
        self.default = models[0].name
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.active_streams = 0
        for m in models:  # a request that leaves the beam alone must be within the limit too
            if m.recognizer.options.beam > config.max_beam:
                raise ValueError(
                    f"model {m.name!r} decodes with beam {m.recognizer.options.beam}, more "
                    f"than --max-beam {config.max_beam}"
                )

    # -- helpers ----------------------------------------------------------------------------

    def _model(self, config: Config) -> Model:
        name = config.model or self.default
        if name not in self.models:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {quoted(name)}; this server has {', '.join(self.models)}",
            )
        return self.models[name]

    def _options(self, model: Model, config: Config) -> DecodeOptions:
        options = model.recognizer.options
        values: dict[str, object] = {"word_timings": config.enable_word_time_offsets}
        if config.decoding_method:
            if config.decoding_method not in METHODS:
                raise _invalid(
                    f"unknown decoding method {quoted(config.decoding_method)}; "
                    f"choose one of {', '.join(model.recognizer.methods)}"
                )
            values["method"] = config.decoding_method
        if config.beam_size < 0 or config.max_alternatives < 0:
            raise _invalid("beam_size and max_alternatives must not be negative")
        limits = (
            ("beam_size", config.beam_size, "--max-beam", self.config.max_beam),
            (
                "max_alternatives",
                config.max_alternatives,
                "--max-alternatives",
                self.config.max_alternatives,
            ),
        )
        for field, value, flag, limit in limits:
            if value > limit:
                raise _invalid(f"{field} {value} is more than this server's {flag} {limit}")
        if config.beam_size:
            values["beam"] = config.beam_size
        hotwords = tuple(
            (phrase, context.boost or DEFAULT_BOOST)
            for context in config.speech_contexts
            for phrase in context.phrases
        )
        if hotwords:
            values["hotwords"] = hotwords
        beam = int(values.get("beam", options.beam))  # type: ignore[call-overload]
        values["nbest"] = max(1, min(config.max_alternatives or 1, beam))
        try:
            options = replace(options, **values)  # type: ignore[arg-type]
            model.recognizer.check(options)
        except ValueError as err:
            raise _invalid(str(err)) from err
        return options

    def _endpoint(self, requested: asr_pb2.EndpointConfig) -> EndpointConfig:
        """The stream's endpoint rules: the server's, with the durations the stream set.
        The server's --max-segment caps both: it bounds a segment's decoding state and its
        final's second pass, and a longer trailing silence could never end a segment."""
        server = self.config.endpoint
        values: dict[str, float] = {}
        for field, name in (
            ("trailing_silence", "trailing_silence"),
            ("max_segment_duration", "max_segment"),
        ):
            seconds = to_seconds(getattr(requested, field))
            if seconds < 0:
                raise _invalid(f"endpoint.{field} must not be negative ({seconds:g} s)")
            if seconds > server.max_segment:
                raise _invalid(
                    f"endpoint.{field} {seconds:g} s is more than this server's "
                    f"--max-segment {server.max_segment:g} s"
                )
            if seconds:  # 0 or unset: the server's
                values[name] = seconds
        return replace(server, **values)

    def _audio(self, audio: bytes, config: Config) -> torch.Tensor:
        """Decoded audio, refused before decoding when it is longer than Recognize takes."""
        limit = self.config.max_unary_seconds
        try:
            if config.encoding == Config.LINEAR16:
                seconds = len(audio) / (2 * (config.audio_channel_count or 1))
                seconds /= config.sample_rate_hertz
                if seconds > limit:
                    raise _invalid(
                        f"audio is {seconds:.1f} s; Recognize takes at most {limit:.0f} s "
                        "(use StreamingRecognize)"
                    )
                return decode_pcm16(
                    audio,
                    config.sample_rate_hertz,
                    channels=config.audio_channel_count or 1,
                    name="audio",
                )
            check_container(audio, config.encoding)
            return load_audio(
                audio, name="audio", declared_rate=config.sample_rate_hertz, max_seconds=limit
            )
        except AudioError as err:
            raise _invalid(str(err)) from err

    async def _fail(
        self, context: grpc.aio.ServicerContext, err: Exception, rid: str, method: str
    ) -> NoReturn:
        if isinstance(err, Cancelled):  # the caller's own doing: not a server error
            code = grpc.StatusCode.CANCELLED
            if isinstance(err, DeadlineExceeded):
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            err = RequestError(code, str(err))
        elif isinstance(err, WorkerLost):  # not the request's doing, and worth a retry
            err = RequestError(grpc.StatusCode.UNAVAILABLE, f"{err}; retry the call")
        if isinstance(err, RequestError):
            message = err.message
            if len(message) > MAX_STATUS_MESSAGE:  # what it quotes is cut already; a backstop
                message = message[:MAX_STATUS_MESSAGE] + f"... ({len(err.message)} characters)"
            log.info(
                "%s failed: %s",
                method,
                message,
                extra=fields(request_id=rid, rpc=method, code=err.code.name),
            )
            await context.abort(err.code, message)
        log.exception(
            "%s failed", method, extra=fields(request_id=rid, rpc=method, code="INTERNAL")
        )
        # An exception's text may quote the request (and its size is anyone's guess): the
        # client gets its type and where to find the rest.
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error ({type(err).__name__}); the server log has it under request_id {rid}",
        )
        raise AssertionError("context.abort returned")  # it always raises

    # -- RPCs -------------------------------------------------------------------------------

    async def Recognize(  # noqa: N802 (gRPC method name)
        self, request: asr_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.RecognizeResponse:
        rid = "-"  # until the request's is checked
        started = time.perf_counter()
        try:
            rid = request_id(request.request_id)
            check_audio_format(request.config)
            model = self._model(request.config)
            options = self._options(model, request.config)
            # Off the event loop (a long compressed file takes a while to decode and resample),
            # and not on the model worker, whose one thread batches every model call.
            audio = await asyncio.to_thread(self._audio, request.audio, request.config)
            seconds = audio.numel() / SAMPLE_RATE
            if seconds > self.config.max_unary_seconds:  # a header that understated
                raise _invalid(
                    f"audio is {seconds:.1f} s; Recognize takes at most "
                    f"{self.config.max_unary_seconds:.0f} s (use StreamingRecognize)"
                )
            transcript, model_seconds = await self.engine.recognize(
                model.name,
                audio,
                options,
                timeout=context.time_remaining(),
                cancelled=context.cancelled,
            )
        except Exception as err:
            await self._fail(context, err, rid, "Recognize")
        latency = time.perf_counter() - started
        succeeded(self.metrics, "Recognize", rid, model, seconds, latency, model_seconds)
        result = asr_pb2.SpeechRecognitionResult(
            alternatives=to_alternatives(
                transcript, word_time_offsets=request.config.enable_word_time_offsets
            ),
            result_end_time=to_duration(seconds),
        )
        return asr_pb2.RecognizeResponse(
            results=[result] if transcript.text else [],
            request_id=rid,
            model=model.name,
            audio_duration=to_duration(seconds),
        )

    async def StreamingRecognize(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[asr_pb2.StreamingRecognizeRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[asr_pb2.StreamingRecognizeResponse]:
        rid = "-"
        if self.active_streams >= self.config.max_concurrent_streams:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many concurrent streams (limit {self.config.max_concurrent_streams})",
            )
        self.active_streams += 1
        self.metrics.active_streams.inc()
        model_seconds = 0.0
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None:
                raise _invalid("empty stream: the first message must be streaming_config")
            rid = request_id(first.request_id)
            if first.WhichOneof("streaming_request") != "streaming_config":
                raise _invalid("audio before config: the first message must be streaming_config")
            settings = first.streaming_config
            config = settings.config
            check_audio_format(config)
            model = self._model(config)
            if not model.streams:
                raise _invalid(
                    f"model {model.name!r} cannot stream (a latency-controlled BiLSTM-CTC can)"
                )
            options = self._options(model, config)
            if config.encoding != Config.LINEAR16:
                raise _invalid("streaming audio must be LINEAR16 (raw 16-bit PCM)")
            endpoint = self._endpoint(settings.endpoint)
            try:  # stateful resampling: the result does not depend on how audio is chunked
                pcm = PCMStream(config.sample_rate_hertz, config.audio_channel_count or 1)
            except AudioError as err:
                raise _invalid(str(err)) from err
            # the stream's session lives on one model worker, for its lifetime
            with self.engine.open_stream(
                model.name, options, endpoint, settings.interim_results
            ) as stream:
                async for request in request_iterator:
                    kind = request.WhichOneof("streaming_request")
                    if kind == "streaming_config":
                        raise _invalid("a second streaming_config: send it once, first")
                    if kind != "audio_content":
                        continue
                    try:
                        samples = pcm.decode(request.audio_content)
                    except AudioError as err:
                        raise _invalid(str(err)) from err
                    if pcm.seconds > self.config.max_stream_seconds:
                        raise RequestError(
                            grpc.StatusCode.OUT_OF_RANGE,
                            f"stream longer than {self.config.max_stream_seconds:.0f} s of audio",
                        )
                    results, spent = await stream.accept(samples)
                    model_seconds += spent
                    for response in self._responses(results, rid, config):
                        yield response
                        if settings.single_utterance and response.results[0].is_final:
                            yield asr_pb2.StreamingRecognizeResponse(
                                speech_event_type=asr_pb2.StreamingRecognizeResponse.END_OF_SINGLE_UTTERANCE,
                                request_id=rid,
                            )
                            return
                started = time.perf_counter()
                # the samples the resampler held back for its filter, then the last segment
                results, spent = await stream.finish(pcm.flush())
                latency = time.perf_counter() - started  # last audio to final result
                for response in self._responses(results, rid, config):
                    yield response
                succeeded(
                    self.metrics,
                    "StreamingRecognize",
                    rid,
                    model,
                    pcm.seconds,
                    latency,
                    model_seconds + spent,
                )
        except Exception as err:
            await self._fail(context, err, rid, "StreamingRecognize")
        finally:
            self.active_streams -= 1
            self.metrics.active_streams.dec()

    def _responses(
        self, results: list[StreamResult], rid: str, config: Config
    ) -> list[asr_pb2.StreamingRecognizeResponse]:
        responses = []
        for r in results:
            alternatives = (
                to_alternatives(r.transcript, word_time_offsets=config.enable_word_time_offsets)
                if r.is_final
                else [asr_pb2.SpeechRecognitionAlternative(transcript=r.transcript.text)]
            )
            event = (
                asr_pb2.StreamingRecognizeResponse.END_OF_SEGMENT
                if r.is_final
                else asr_pb2.StreamingRecognizeResponse.SPEECH_EVENT_UNSPECIFIED
            )
            responses.append(
                asr_pb2.StreamingRecognizeResponse(
                    results=[
                        asr_pb2.StreamingRecognitionResult(
                            alternatives=alternatives,
                            is_final=r.is_final,
                            stability=r.stability,
                            result_end_time=to_duration(r.end),
                        )
                    ],
                    speech_event_type=event,
                    request_id=rid,
                )
            )
        return responses

    async def ListModels(  # noqa: N802 (gRPC method name)
        self, request: asr_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.ListModelsResponse:
        return asr_pb2.ListModelsResponse(
            models=[
                asr_pb2.ModelInfo(
                    name=m.name,
                    type=m.recognizer.bundle.model_type,
                    is_default=m.name == self.default,
                    streaming=m.streams,
                    decoding_methods=list(m.recognizer.methods),
                    default_decoding_method=m.recognizer.options.method,
                    parameters=count_parameters(m.recognizer.bundle.model),
                    language_code=LANGUAGE,
                    language_model="" if m.recognizer.lm is None else m.recognizer.lm.describe(),
                )
                for m in self.models.values()
            ]
        )
