"""A hand-written client facade over the generated asr.v1 stubs (like riva's `ASRService`).

    client = AsrClient("localhost:50051")
    response = client.recognize(Path("utt.flac").read_bytes(), word_time_offsets=True)
    for response in client.stream(samples_16k, realtime=True):
        ...

Audio for `stream` is float samples at 16 kHz (`asr.audio.load_audio`), sent as LINEAR16 chunks.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import torch

from asr.audio import SAMPLE_RATE
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
