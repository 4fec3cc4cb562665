"""The asr.v1.Recognizer service: Recognize, StreamingRecognize, ListModels.

Every failure a client can cause ends the call with a status code and a message naming the
problem (INVALID_ARGUMENT, NOT_FOUND, OUT_OF_RANGE, RESOURCE_EXHAUSTED); anything else is
logged and returned as INTERNAL. No request can stop the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import NoReturn

import grpc
import torch

from asr.audio import SAMPLE_RATE, AudioError, check_sample_rate, decode_pcm16, load_audio
from asr.cancel import Cancelled, DeadlineExceeded
from asr.client import to_alternatives, to_duration
from asr.decoding.options import DecodeOptions
from asr.models import count_parameters
from asr.recognizer import Recognizer
from asr.streaming import StreamingSession, StreamResult
from asr.v1 import asr_pb2, asr_pb2_grpc
from server.config import ServerConfig
from server.engine import Engine
from server.logs import fields
from server.metrics import Metrics

log = logging.getLogger("asr.server")
Config = asr_pb2.RecognitionConfig


class RequestError(Exception):
    """A problem with the request: ends the call with `code` and `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass
class Model:
    name: str
    recognizer: Recognizer

    @property
    def streams(self) -> bool:
        return self.recognizer.can_stream


class PCMStream:
    """LINEAR16 chunks -> 16 kHz float samples, carrying an odd trailing byte or channel
    frame over to the next chunk."""

    def __init__(self, sample_rate: int, channels: int) -> None:
        self.rate, self.channels = sample_rate, channels
        self.pending = b""
        self.seconds = 0.0

    def decode(self, chunk: bytes) -> torch.Tensor:
        data = self.pending + chunk
        frame = 2 * self.channels
        usable = len(data) - len(data) % frame
        self.pending = data[usable:]
        if usable == 0:
            return torch.zeros(0)
        self.seconds += usable / frame / self.rate
        return decode_pcm16(data[:usable], self.rate, channels=self.channels, name="audio_content")


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

    # -- helpers ----------------------------------------------------------------------------

    def _model(self, config: Config) -> Model:
        name = config.model or self.default
        if name not in self.models:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown model {name!r}; this server has {', '.join(self.models)}",
            )
        return self.models[name]

    def _options(self, model: Model, config: Config) -> DecodeOptions:
        options = model.recognizer.options
        values: dict[str, object] = {"word_timings": config.enable_word_time_offsets}
        if config.decoding_method:
            values["method"] = config.decoding_method
        if config.beam_size < 0 or config.max_alternatives < 0:
            raise _invalid("beam_size and max_alternatives must not be negative")
        if config.beam_size:
            values["beam"] = config.beam_size
        beam = int(values.get("beam", options.beam))  # type: ignore[call-overload]
        values["nbest"] = max(1, min(config.max_alternatives or 1, beam))
        try:
            options = replace(options, **values)  # type: ignore[arg-type]
            model.recognizer.check(options)
        except ValueError as err:
            raise _invalid(str(err)) from err
        return options

    def _audio(self, audio: bytes, config: Config) -> torch.Tensor:
        encoding = config.encoding
        try:
            if encoding == Config.LINEAR16:
                if not config.sample_rate_hertz:
                    raise _invalid("LINEAR16 audio needs sample_rate_hertz")
                return decode_pcm16(
                    audio,
                    config.sample_rate_hertz,
                    channels=config.audio_channel_count or 1,
                    name="audio",
                )
            samples = load_audio(audio, name="audio", declared_rate=config.sample_rate_hertz)
        except AudioError as err:
            raise _invalid(str(err)) from err
        return samples

    async def _fail(
        self, context: grpc.aio.ServicerContext, err: Exception, rid: str, method: str
    ) -> NoReturn:
        if isinstance(err, Cancelled):  # the caller's own doing: not a server error
            code = grpc.StatusCode.CANCELLED
            if isinstance(err, DeadlineExceeded):
                code = grpc.StatusCode.DEADLINE_EXCEEDED
            err = RequestError(code, str(err))
        if isinstance(err, RequestError):
            log.info(
                "%s failed: %s",
                method,
                err.message,
                extra=fields(request_id=rid, rpc=method, code=err.code.name),
            )
            self.metrics.requests.labels(method, err.code.name).inc()
            await context.abort(err.code, err.message)
        log.exception(
            "%s failed", method, extra=fields(request_id=rid, rpc=method, code="INTERNAL")
        )
        self.metrics.requests.labels(method, "INTERNAL").inc()
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {err}")
        raise AssertionError("context.abort returned")  # it always raises

    def _succeeded(
        self,
        method: str,
        rid: str,
        model: Model,
        audio_seconds: float,
        latency: float,
        model_seconds: float,
    ) -> None:
        """Metrics and the log line of a call that ended OK. latency: Recognize: request to
        response; StreamingRecognize: last audio to final result (queueing included)."""
        rtf = model_seconds / max(audio_seconds, 1e-3)
        self.metrics.requests.labels(method, "OK").inc()
        self.metrics.audio_seconds.labels(method).inc(audio_seconds)
        self.metrics.latency.labels(method).observe(latency)
        self.metrics.rtf.labels(method).observe(rtf)
        log.info(
            "%s done",
            method,
            extra=fields(
                request_id=rid,
                rpc=method,
                code="OK",
                model=model.name,
                audio_s=round(audio_seconds, 3),
                latency_ms=round(latency * 1000, 1),
                rtf=round(rtf, 4),
            ),
        )

    # -- RPCs -------------------------------------------------------------------------------

    async def Recognize(  # noqa: N802 (gRPC method name)
        self, request: asr_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> asr_pb2.RecognizeResponse:
        rid = request.request_id or uuid.uuid4().hex
        started = time.perf_counter()
        try:
            model = self._model(request.config)
            options = self._options(model, request.config)
            # Off the event loop (a long compressed file takes a while to decode and resample),
            # and not on the model worker, whose one thread batches every model call.
            audio = await asyncio.to_thread(self._audio, request.audio, request.config)
            seconds = audio.numel() / SAMPLE_RATE
            if seconds > self.config.max_unary_seconds:
                raise _invalid(
                    f"audio is {seconds:.1f} s; Recognize takes at most "
                    f"{self.config.max_unary_seconds:.0f} s (use StreamingRecognize)"
                )
            transcript, model_seconds = await self.engine.recognize(
                model.recognizer,
                audio,
                options,
                timeout=context.time_remaining(),
                cancelled=context.cancelled,
            )
        except Exception as err:
            await self._fail(context, err, rid, "Recognize")
        latency = time.perf_counter() - started
        self._succeeded("Recognize", rid, model, seconds, latency, model_seconds)
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
            self.metrics.requests.labels("StreamingRecognize", "RESOURCE_EXHAUSTED").inc()
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
            rid = first.request_id or uuid.uuid4().hex
            if first.WhichOneof("streaming_request") != "streaming_config":
                raise _invalid("audio before config: the first message must be streaming_config")
            settings = first.streaming_config
            config = settings.config
            model = self._model(config)
            if not model.streams:
                raise _invalid(
                    f"model {model.name!r} cannot stream (a latency-controlled BiLSTM-CTC can)"
                )
            options = self._options(model, config)
            if config.encoding != Config.LINEAR16:
                raise _invalid("streaming audio must be LINEAR16 (raw 16-bit PCM)")
            if not config.sample_rate_hertz:
                raise _invalid("LINEAR16 audio needs sample_rate_hertz")
            try:
                check_sample_rate(config.sample_rate_hertz, "sample_rate_hertz")
            except AudioError as err:
                raise _invalid(str(err)) from err
            pcm = PCMStream(config.sample_rate_hertz, config.audio_channel_count or 1)
            session = StreamingSession(
                model.recognizer,
                options,
                self.config.endpoint,
                interim_results=settings.interim_results,
            )
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
                results, spent = await self.engine.run_timed(session.accept, samples)
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
            results, spent = await self.engine.run_timed(session.finish)
            latency = time.perf_counter() - started  # last audio to final result
            for response in self._responses(results, rid, config):
                yield response
            self._succeeded(
                "StreamingRecognize", rid, model, pcm.seconds, latency, model_seconds + spent
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
                    language_code="en-US",
                )
                for m in self.models.values()
            ]
        )
