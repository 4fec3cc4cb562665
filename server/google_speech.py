"""Google Cloud Speech-to-Text v1 on the server's gRPC port: `google.cloud.speech.v1.Speech`
(Recognize, StreamingRecognize, LongRunningRecognize) and `google.longrunning.Operations`
(GetOperation), so code written for Google's `SpeechClient` runs against this server.

Wire compatibility: the handlers decode and encode with the message classes of Google's own
`google-cloud-speech` package (the protobuf classes behind its proto-plus types, generated from
the public googleapis definitions) and of `googleapis-common-protos` (longrunning, rpc
status), so field numbers and shapes are Google's by construction, not copied.

Each call is translated to the `asr.v1` request it means and served by the same servicer, so
auth, limits, batching, metrics, logs and drain are those of `asr.v1`, and errors carry the
same status codes (Google's: INVALID_ARGUMENT, OUT_OF_RANGE, RESOURCE_EXHAUSTED, ...). What
maps how:

- `encoding`: LINEAR16 (raw, needs `sample_rate_hertz`), FLAC, OGG_OPUS and MP3 (decoded from
  their container) and ENCODING_UNSPECIFIED (WAV/FLAC header); MULAW, AMR, AMR_WB,
  SPEEX_WITH_HEADER_BYTE and WEBM_OPUS are INVALID_ARGUMENT. Streaming audio is LINEAR16.
- `model`: one of this server's model names; empty or one of Google's own names
  (`GOOGLE_MODELS`: default, latest_long, phone_call, ...) is the default model; another
  name is INVALID_ARGUMENT, as Google answers it.
- `language_code` must be English (`en`, `en-US`, ...), as the models are; `max_alternatives`,
  `enable_word_time_offsets`, `enable_word_confidence` (word confidences; without it words
  carry none, as Google's), `speech_contexts` (phrases become hotwords, `boost` their weight).
- Ignored, accepted: `enable_automatic_punctuation` (our models write no punctuation),
  `profanity_filter`, `use_enhanced`, `metadata`, `diarization_config`, `adaptation`,
  spoken punctuation and emoji.
- Streaming: `interim_results`, `single_utterance` (END_OF_SINGLE_UTTERANCE after the first
  final result, then the stream ends), `enable_voice_activity_events` (SPEECH_ACTIVITY_BEGIN
  with a segment's first result, SPEECH_ACTIVITY_END with its final one).
- LongRunningRecognize runs the request as Recognize in the background (same limits:
  --max-unary-seconds); GetOperation returns the operation, once done with `response` an Any
  of LongRunningRecognizeResponse or `error` a google.rpc.Status. Operations live in this
  process's memory (the latest `MAX_OPERATIONS`): a restart loses them. `audio.uri` (Cloud
  Storage) is INVALID_ARGUMENT: send `content`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, NoReturn, cast

import grpc
from google.cloud import speech_v1
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import status_pb2

from asr.v1 import asr_pb2
from server.servicer import RecognizerServicer

SERVICE = "google.cloud.speech.v1.Speech"
OPERATIONS = "google.longrunning.Operations"
MAX_OPERATIONS = 1000  # finished operations kept for GetOperation (the oldest go first)

# Google's protobuf classes (speech_v1's proto-plus types wrap them).
G = speech_v1
RecognitionConfig: Any = G.RecognitionConfig.pb()
RecognizeRequest: Any = G.RecognizeRequest.pb()
RecognizeResponse: Any = G.RecognizeResponse.pb()
StreamingRecognizeRequest: Any = G.StreamingRecognizeRequest.pb()
StreamingRecognizeResponse: Any = G.StreamingRecognizeResponse.pb()
LongRunningRecognizeRequest: Any = G.LongRunningRecognizeRequest.pb()
LongRunningRecognizeResponse: Any = G.LongRunningRecognizeResponse.pb()
LongRunningRecognizeMetadata: Any = G.LongRunningRecognizeMetadata.pb()
SpeechRecognitionResult: Any = G.SpeechRecognitionResult.pb()
StreamingRecognitionResult: Any = G.StreamingRecognitionResult.pb()
SpeechRecognitionAlternative: Any = G.SpeechRecognitionAlternative.pb()
WordInfo: Any = G.WordInfo.pb()

Ours = asr_pb2.RecognitionConfig
# Google's encodings -> ours (None: not supported). Compressed formats are decoded from their
# container, whatever it is, so they map to "detect from the header".
ENCODINGS: dict[int, int | None] = {
    RecognitionConfig.ENCODING_UNSPECIFIED: Ours.ENCODING_UNSPECIFIED,
    RecognitionConfig.LINEAR16: Ours.LINEAR16,
    RecognitionConfig.FLAC: Ours.FLAC,
    RecognitionConfig.OGG_OPUS: Ours.ENCODING_UNSPECIFIED,
    RecognitionConfig.MP3: Ours.ENCODING_UNSPECIFIED,
    RecognitionConfig.MULAW: None,
    RecognitionConfig.AMR: None,
    RecognitionConfig.AMR_WB: None,
    RecognitionConfig.SPEEX_WITH_HEADER_BYTE: None,
    RecognitionConfig.WEBM_OPUS: None,
}
# Google's model names, served by our default model.
GOOGLE_MODELS = frozenset(
    {
        "default",
        "latest_long",
        "latest_short",
        "command_and_search",
        "phone_call",
        "video",
        "telephony",
        "telephony_short",
        "medical_dictation",
        "medical_conversation",
    }
)
Event = StreamingRecognizeResponse.SpeechEventType


class _Invalid(Exception):
    """A request Google would refuse with INVALID_ARGUMENT."""


class GoogleSpeech:
    """The two Google services over an `asr.v1` servicer."""

    def __init__(self, servicer: RecognizerServicer) -> None:
        self.servicer = servicer
        self.operations: OrderedDict[str, operations_pb2.Operation] = OrderedDict()
        self._jobs: set[asyncio.Task[None]] = set()

    def handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        speech = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Recognize": grpc.unary_unary_rpc_method_handler(
                    self.Recognize,
                    request_deserializer=RecognizeRequest.FromString,
                    response_serializer=RecognizeResponse.SerializeToString,
                ),
                "StreamingRecognize": grpc.stream_stream_rpc_method_handler(
                    self.StreamingRecognize,
                    request_deserializer=StreamingRecognizeRequest.FromString,
                    response_serializer=StreamingRecognizeResponse.SerializeToString,
                ),
                "LongRunningRecognize": grpc.unary_unary_rpc_method_handler(
                    self.LongRunningRecognize,
                    request_deserializer=LongRunningRecognizeRequest.FromString,
                    response_serializer=operations_pb2.Operation.SerializeToString,
                ),
            },
        )
        operations = grpc.method_handlers_generic_handler(
            OPERATIONS,
            {
                "GetOperation": grpc.unary_unary_rpc_method_handler(
                    self.GetOperation,
                    request_deserializer=operations_pb2.GetOperationRequest.FromString,
                    response_serializer=operations_pb2.Operation.SerializeToString,
                ),
            },
        )
        return speech, operations

    # -- requests ---------------------------------------------------------------------------

    def _config(self, config: Any) -> asr_pb2.RecognitionConfig:
        """Google's RecognitionConfig as ours (module docstring); _Invalid if it cannot be."""
        encoding = ENCODINGS.get(config.encoding)
        if encoding is None:
            name = RecognitionConfig.AudioEncoding.Name(config.encoding)
            raise _Invalid(
                f"encoding {name} is not supported; use LINEAR16, FLAC, OGG_OPUS, MP3 or "
                "ENCODING_UNSPECIFIED (WAV or FLAC)"
            )
        model = config.model
        if not model or model in GOOGLE_MODELS:
            model = ""
        elif model not in self.servicer.models:
            raise _Invalid(
                f"invalid model {model!r}; this server has {', '.join(self.servicer.models)}"
            )
        return asr_pb2.RecognitionConfig(
            encoding=encoding,  # type: ignore[arg-type]
            sample_rate_hertz=config.sample_rate_hertz,
            audio_channel_count=config.audio_channel_count,
            model=model,
            language_code=config.language_code,
            max_alternatives=config.max_alternatives,
            enable_word_time_offsets=(
                config.enable_word_time_offsets or config.enable_word_confidence
            ),
            speech_contexts=[
                asr_pb2.SpeechContext(phrases=list(c.phrases), boost=c.boost)
                for c in config.speech_contexts
            ],
        )

    @staticmethod
    def _audio(audio: Any) -> bytes:
        if audio.WhichOneof("audio_source") == "uri":
            raise _Invalid(
                "audio.uri is not supported (this server reads no Cloud Storage): send content"
            )
        return bytes(audio.content)

    def _ours(self, request: Any) -> asr_pb2.RecognizeRequest:
        return asr_pb2.RecognizeRequest(
            config=self._config(request.config), audio=self._audio(request.audio)
        )

    # -- responses --------------------------------------------------------------------------

    @staticmethod
    def _alternatives(alternatives: Any, config: Any) -> list[Any]:
        out = []
        for a in alternatives:
            words = [
                WordInfo(
                    start_time=a_word.start_offset if config.enable_word_time_offsets else None,
                    end_time=a_word.end_offset if config.enable_word_time_offsets else None,
                    word=a_word.word,
                    confidence=a_word.confidence if config.enable_word_confidence else 0.0,
                )
                for a_word in a.words
            ]
            out.append(
                SpeechRecognitionAlternative(
                    transcript=a.transcript, confidence=a.confidence, words=words
                )
            )
        return out

    def _results(self, response: asr_pb2.RecognizeResponse, config: Any) -> list[Any]:
        return [
            SpeechRecognitionResult(
                alternatives=self._alternatives(r.alternatives, config),
                result_end_time=r.result_end_time,
                language_code=_language(config),
            )
            for r in response.results
        ]

    # -- RPCs -------------------------------------------------------------------------------

    async def Recognize(  # noqa: N802 (gRPC method name)
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        try:
            ours = self._ours(request)
        except _Invalid as err:
            await _abort(context, err)
        response = await self.servicer.Recognize(ours, context)
        return RecognizeResponse(
            results=self._results(response, request.config),
            total_billed_time=response.audio_duration,
        )

    async def StreamingRecognize(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("streaming_request") != "streaming_config":
            await _abort(context, _Invalid("the first message must be streaming_config"))
        settings = first.streaming_config
        try:
            config = self._config(settings.config)
        except _Invalid as err:
            await _abort(context, err)

        async def requests() -> AsyncIterator[asr_pb2.StreamingRecognizeRequest]:
            yield asr_pb2.StreamingRecognizeRequest(
                streaming_config=asr_pb2.StreamingRecognitionConfig(
                    config=config,
                    interim_results=settings.interim_results,
                    single_utterance=settings.single_utterance,
                )
            )
            async for request in request_iterator:
                if request.WhichOneof("streaming_request") == "streaming_config":
                    yield asr_pb2.StreamingRecognizeRequest(
                        streaming_config=asr_pb2.StreamingRecognitionConfig()
                    )  # ours refuses a second config, with its message
                else:
                    yield asr_pb2.StreamingRecognizeRequest(audio_content=request.audio_content)

        events = settings.enable_voice_activity_events
        in_speech = False
        billed = 0.0
        async for response in self.servicer.StreamingRecognize(requests(), context):
            if response.speech_event_type == response.END_OF_SINGLE_UTTERANCE:
                yield StreamingRecognizeResponse(speech_event_type=Event.END_OF_SINGLE_UTTERANCE)
                continue
            results = []
            for r in response.results:
                end = r.result_end_time
                billed = max(billed, end.seconds + end.nanos / 1e9)
                results.append(
                    StreamingRecognitionResult(
                        alternatives=self._alternatives(r.alternatives, settings.config),
                        is_final=r.is_final,
                        stability=r.stability,
                        result_end_time=r.result_end_time,
                        language_code=_language(settings.config),
                    )
                )
            if events and not in_speech:
                in_speech = True
                yield StreamingRecognizeResponse(speech_event_type=Event.SPEECH_ACTIVITY_BEGIN)
            final = any(r.is_final for r in response.results)
            event = Event.SPEECH_EVENT_UNSPECIFIED
            if events and final:
                event, in_speech = Event.SPEECH_ACTIVITY_END, False
            yield StreamingRecognizeResponse(
                results=results,
                speech_event_type=event,
                total_billed_time=_duration(billed) if final else None,
            )

    async def LongRunningRecognize(  # noqa: N802 (gRPC method name)
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> operations_pb2.Operation:
        try:
            ours = self._ours(request)
        except _Invalid as err:
            await _abort(context, err)
        name = uuid.uuid4().hex
        started = _now()
        operation = operations_pb2.Operation(name=name, done=False)
        operation.metadata.Pack(
            LongRunningRecognizeMetadata(
                progress_percent=0, start_time=started, last_update_time=started
            )
        )
        self._keep(operation)
        job = asyncio.get_running_loop().create_task(self._run(name, ours, request.config))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        return operation

    async def _run(self, name: str, request: asr_pb2.RecognizeRequest, config: Any) -> None:
        context = _Detached()
        operation = operations_pb2.Operation(name=name, done=True)
        try:
            response = await self.servicer.Recognize(request, cast(Any, context))
        except _Aborted as err:
            operation.error.CopyFrom(status_pb2.Status(code=err.code.value[0], message=err.text))
        else:
            operation.response.Pack(
                LongRunningRecognizeResponse(
                    results=self._results(response, config),
                    total_billed_time=response.audio_duration,
                )
            )
        old = self.operations.get(name)
        if old is not None:
            metadata = LongRunningRecognizeMetadata()
            old.metadata.Unpack(metadata)
            metadata.progress_percent = 100
            metadata.last_update_time.CopyFrom(_now())
            operation.metadata.Pack(metadata)
        self._keep(operation)

    def _keep(self, operation: operations_pb2.Operation) -> None:
        self.operations[operation.name] = operation
        self.operations.move_to_end(operation.name)
        while len(self.operations) > MAX_OPERATIONS:
            oldest = next(iter(self.operations))
            if not self.operations[oldest].done:  # all older ones run still: keep them
                break
            del self.operations[oldest]

    async def GetOperation(  # noqa: N802 (gRPC method name)
        self, request: operations_pb2.GetOperationRequest, context: grpc.aio.ServicerContext
    ) -> operations_pb2.Operation:
        # The client may prefix the name with a resource path ("operations/NAME").
        name = request.name.rsplit("/", 1)[-1]
        operation = self.operations.get(name)
        if operation is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no operation {request.name[:200]!r} on this server"
            )
        return operation


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


class _Detached:
    """The servicer's view of a call for a background operation: no deadline, nobody to
    cancel it, and an abort that raises."""

    def time_remaining(self) -> float | None:
        return None

    def cancelled(self) -> bool:
        return False

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise _Aborted(code, details)


async def _abort(context: grpc.aio.ServicerContext, err: _Invalid) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
    raise AssertionError("context.abort returned")  # it always raises


def _language(config: Any) -> str:
    return (config.language_code or "en-US").lower()


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _now() -> timestamp_pb2.Timestamp:
    t = timestamp_pb2.Timestamp()
    t.FromNanoseconds(time.time_ns())
    return t
