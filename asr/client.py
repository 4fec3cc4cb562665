"""A hand-written client facade over the generated asr.v1 stubs (like riva's `ASRService`).

    client = AsrClient("localhost:50051")
    response = client.recognize(Path("utt.flac").read_bytes(), word_time_offsets=True)
    for response in client.stream(samples_16k, realtime=True):
        ...

Audio for `stream` is float samples at 16 kHz (`asr.audio.load_audio`), sent as LINEAR16 chunks.

The conversions between `Transcript` and the API's messages live here too, both directions in
one place: the server builds its responses with `to_alternatives`, and clients read them back
with `to_transcript` / `to_segments`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import grpc
import torch
from google.protobuf.duration_pb2 import Duration

from asr.audio import SAMPLE_RATE
from asr.decoding.options import Alternative, Transcript, WordTiming
from asr.v1 import asr_pb2, asr_pb2_grpc

Config = asr_pb2.RecognitionConfig


def _config(model: str, alternatives: int, word_time_offsets: bool, **fields: object) -> Config:
    return Config(
        model=model,
        max_alternatives=alternatives,
        enable_word_time_offsets=word_time_offsets,
        **fields,  # type: ignore[arg-type]
    )


class AsrClient:
    """Recognize, StreamingRecognize and ListModels against one server."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        timeout: float | None = 300.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ) -> None:
        """tls: connect over TLS, trusting the system's CAs or `root_certificates` (PEM)."""
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, credentials)
        else:
            self.channel = grpc.insecure_channel(target)
        self.stub = asr_pb2_grpc.RecognizerStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AsrClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_models(self) -> list[asr_pb2.ModelInfo]:
        response = self.stub.ListModels(
            asr_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata
        )
        return list(response.models)

    def recognize(
        self,
        audio: bytes,
        *,
        model: str = "",
        alternatives: int = 1,
        word_time_offsets: bool = False,
        request_id: str = "",
    ) -> asr_pb2.RecognizeResponse:
        """Transcribe a WAV/FLAC/OGG file's bytes."""
        request = asr_pb2.RecognizeRequest(
            config=_config(model, alternatives, word_time_offsets),
            audio=audio,
            request_id=request_id,
        )
        return self.stub.Recognize(request, timeout=self.timeout, metadata=self.metadata)

    def stream(
        self,
        samples: torch.Tensor,
        *,
        model: str = "",
        interim_results: bool = True,
        realtime: bool = False,
        chunk_ms: int = 100,
        word_time_offsets: bool = False,
        request_id: str = "",
    ) -> Iterator[asr_pb2.StreamingRecognizeResponse]:
        """Stream (N,) 16 kHz samples in `chunk_ms` pieces (at real-time pace if asked)."""
        config = _config(
            model,
            1,
            word_time_offsets,
            encoding=Config.LINEAR16,
            sample_rate_hertz=SAMPLE_RATE,
        )
        settings = asr_pb2.StreamingRecognitionConfig(
            config=config, interim_results=interim_results
        )
        pcm = (samples.clamp(-1.0, 1.0) * 32767).round().to(torch.int16).numpy().tobytes()
        step = 2 * SAMPLE_RATE * chunk_ms // 1000

        def requests() -> Iterator[asr_pb2.StreamingRecognizeRequest]:
            yield asr_pb2.StreamingRecognizeRequest(
                streaming_config=settings, request_id=request_id
            )
            start = time.monotonic()
            for i, at in enumerate(range(0, len(pcm), step)):
                if realtime:  # the chunk is sent once its audio would have been spoken
                    time.sleep(max(0.0, start + (i + 1) * chunk_ms / 1000 - time.monotonic()))
                yield asr_pb2.StreamingRecognizeRequest(audio_content=pcm[at : at + step])

        yield from self.stub.StreamingRecognize(
            requests(), timeout=self.timeout, metadata=self.metadata
        )


def read_token(path: Path | None) -> str | None:
    """A bearer token from a file (not the command line, where `ps` would show it)."""
    if path is None:
        return None
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path}: the token file is empty")
    return token


def connect(
    target: str,
    *,
    token_file: Path | None = None,
    tls: bool = False,
    tls_ca: Path | None = None,
    timeout: float | None = 300.0,
) -> AsrClient:
    """An `AsrClient` from command-line style settings: token and CA bundle as files."""
    return AsrClient(
        target,
        token=read_token(token_file),
        timeout=timeout,
        tls=tls,
        root_certificates=None if tls_ca is None else tls_ca.read_bytes(),
    )


# ---------------------------------------------------------------------------------------------
# Transcript <-> asr.v1 messages


def to_duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def to_seconds(duration: Duration) -> float:
    return duration.ToNanoseconds() / 1e9


def to_alternatives(
    transcript: Transcript, *, word_time_offsets: bool
) -> list[asr_pb2.SpeechRecognitionAlternative]:
    """A transcript's n-best as the API's alternatives: the best one with the transcript's
    confidence (and its words, when asked), the others with text only."""
    alternatives = []
    for i, alt in enumerate(transcript.nbest or ()):
        words = []
        if i == 0 and word_time_offsets:
            words = [
                asr_pb2.WordInfo(
                    start_offset=to_duration(w.start),
                    end_offset=to_duration(w.end),
                    word=w.word,
                    confidence=w.confidence,
                )
                for w in transcript.words
            ]
        alternatives.append(
            asr_pb2.SpeechRecognitionAlternative(
                transcript=alt.text,
                confidence=transcript.confidence if i == 0 else 0.0,
                words=words,
            )
        )
    return alternatives


def to_transcript(alternatives: Sequence[asr_pb2.SpeechRecognitionAlternative]) -> Transcript:
    """A server's alternatives as a Transcript; the API carries no scores or tokens (NaN and
    empty), and confidences come back as float32, rounded here to the 4 places they hold."""
    best = alternatives[0]
    words = tuple(
        WordTiming(
            w.word,
            to_seconds(w.start_offset),
            to_seconds(w.end_offset),
            round(w.confidence, 4),
        )
        for w in best.words
    )
    nbest = tuple(Alternative(a.transcript, (), math.nan) for a in alternatives)
    return Transcript(best.transcript, (), math.nan, words, nbest, round(best.confidence, 4))


def to_segments(
    results: Iterable[asr_pb2.SpeechRecognitionResult | asr_pb2.StreamingRecognitionResult],
) -> Iterator[tuple[float, float, Transcript]]:
    """Results in order (each covering the audio up to its `result_end_time`) -> (start
    seconds, end seconds, transcript) of those with alternatives."""
    start = 0.0
    for result in results:
        end = to_seconds(result.result_end_time)
        if result.alternatives:
            yield start, end, to_transcript(result.alternatives)
        start = end
