"""The gRPC server over a real localhost socket, with the trained word model: every RPC, the
error paths, micro-batching, health and reflection."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import random
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import soundfile as sf
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asr.audio import SAMPLE_RATE
from asr.bundle import Bundle
from asr.client import AsrClient
from asr.language_model import write_mix
from asr.models.bilstm_ctc import BiLSTMCTC
from asr.recognizer import Recognizer
from asr.streaming import StreamingSession
from asr.v1 import asr_pb2, asr_pb2_grpc
from server import servicer
from server.app import Running, load_models, start
from server.config import ServerConfig
from server.logs import JsonFormatter, TextFormatter
from server.servicer import Model
from tests.certs import make_tls_files
from tests.word_corpus import Utterance, WordCorpus, save_bundle, untrained_las

Config = asr_pb2.RecognitionConfig


class Server:
    """The server on its own event loop in a thread, as `asr serve` runs it."""

    def __init__(self, config: ServerConfig, models: list[Model]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: Running = self.call(start(config, models))
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def stop(self, grace: float = 1.0) -> None:
        self.call(self.running.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def pcm16(audio: torch.Tensor) -> bytes:
    return (audio.clamp(-1, 1) * 32767).to(torch.int16).numpy().tobytes()


def flac(audio: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio.numpy(), SAMPLE_RATE, format="FLAC")
    return buf.getvalue()


@pytest.fixture(scope="module")
def utterances(word_corpus: WordCorpus) -> list[Utterance]:
    rng = random.Random(31)
    return [word_corpus.utterance(rng) for _ in range(4)]


@pytest.fixture(scope="module")
def server(word_model: Bundle) -> Iterator[Server]:
    config = ServerConfig(
        models=(("words", "<memory>"), ("offline", "<memory>")),
        port=0,
        max_concurrent_streams=2,
        max_stream_seconds=20.0,
        max_unary_seconds=30.0,
        max_message_bytes=2_000_000,
        max_wait_ms=50.0,
        metrics_port=0,
        workers=2,
    )
    assert isinstance(word_model.model, BiLSTMCTC)
    offline_model = word_model.model.with_chunking(0, 0)
    models = [
        Model("words", Recognizer(word_model)),
        Model("offline", Recognizer(replace(word_model, model=offline_model))),
    ]
    srv = Server(config, models)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[asr_pb2_grpc.RecognizerStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield asr_pb2_grpc.RecognizerStub(channel)


def recognize(
    stub: asr_pb2_grpc.RecognizerStub, audio: bytes, **config: Any
) -> asr_pb2.RecognizeResponse:
    return stub.Recognize(
        asr_pb2.RecognizeRequest(config=Config(**config), audio=audio), timeout=60
    )


def test_request_audio_is_decoded_off_the_event_loop(
    stub: asr_pb2_grpc.RecognizerStub,
    utterances: list[Utterance],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One request's slow decode (a long compressed file) does not stall the other calls."""
    decoding, release = threading.Event(), threading.Event()
    real = servicer.load_audio

    def slow(*args: Any, **kwargs: Any) -> torch.Tensor:
        decoding.set()
        release.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(servicer, "load_audio", slow)
    request = asr_pb2.RecognizeRequest(config=Config(), audio=flac(utterances[0].audio))
    pending = stub.Recognize.future(request, timeout=60)
    assert decoding.wait(20)
    stub.ListModels(asr_pb2.ListModelsRequest(), timeout=5)  # answered while the decode runs
    assert not pending.done()
    release.set()
    assert pending.result().results[0].alternatives[0].transcript == utterances[0].text


def test_recognize_flac_and_linear16(
    stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]
) -> None:
    utt = utterances[0]
    response = recognize(stub, flac(utt.audio), enable_word_time_offsets=True, max_alternatives=3)
    assert response.model == "words" and response.request_id
    [result] = response.results
    assert result.alternatives[0].transcript == utt.text
    assert 1 <= len(result.alternatives) <= 3
    words = result.alternatives[0].words
    assert [w.word for w in words] == utt.text.split()
    assert abs(words[0].start_offset.ToNanoseconds() / 1e9 - utt.words[0][1]) < 0.1
    raw = recognize(stub, pcm16(utt.audio), encoding=Config.LINEAR16, sample_rate_hertz=16000)
    assert raw.results[0].alternatives[0].transcript == utt.text
    assert not raw.results[0].alternatives[0].words  # only when asked for


def test_concurrent_recognize_calls_are_batched(
    server: Server, stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]
) -> None:
    workers = server.running.engine.workers
    for worker in workers:
        worker.batches.clear()
    futures = [
        stub.Recognize.future(asr_pb2.RecognizeRequest(config=Config(), audio=flac(u.audio)))
        for u in utterances * 3
    ]
    texts = [f.result(timeout=60).results[0].alternatives[0].transcript for f in futures]
    assert texts == [u.text for u in utterances * 3]
    # 12 calls in flight together, balanced over 2 workers: batches on each
    assert max(b for w in workers for b in w.batches) > 1


def test_two_workers_serve_streams_on_both(
    server: Server, stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]
) -> None:
    # `--workers 2` (processes): two streams open at once are pinned one to each worker, and
    # each gets its own transcript.
    workers = server.running.engine.workers
    assert len(workers) == 2
    served = [w.served for w in workers]

    def both_open(audio: torch.Tensor) -> Iterator[asr_pb2.StreamingRecognizeRequest]:
        requests = stream_requests(audio)
        yield next(requests)  # the config: the server pins the stream to a worker
        yield next(requests)
        deadline = time.monotonic() + 30
        while sum(w.streams for w in workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        yield from requests

    def finals(audio: torch.Tensor) -> list[str]:
        responses = stub.StreamingRecognize(both_open(audio), timeout=60)
        return [
            r.results[0].alternatives[0].transcript
            for r in responses
            if r.results and r.results[0].is_final
        ]

    def alone(audio: torch.Tensor) -> list[str]:  # the stream's results in this process
        recognizer = server.running.servicer.models["words"].recognizer
        session = StreamingSession(recognizer, endpoint=server.running.servicer.config.endpoint)
        pcm = np.frombuffer(pcm16(audio), np.int16).astype(np.float32) / 32768  # as sent
        results = session.accept(torch.from_numpy(pcm)) + session.finish()
        return [r.transcript.text for r in results if r.is_final]

    audios = [u.audio for u in utterances[:2]]
    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(finals, audios))
    assert texts == [alone(a) for a in audios]
    assert [" ".join(t) for t in texts] == [u.text for u in utterances[:2]]
    assert [w.served - s for w, s in zip(workers, served, strict=True)] == [1, 1]
    assert [w.streams for w in workers] == [0, 0]  # let go of at the end


def stream_requests(
    audio: torch.Tensor, **config: object
) -> Iterator[asr_pb2.StreamingRecognizeRequest]:
    settings = asr_pb2.StreamingRecognitionConfig(
        config=Config(encoding=Config.LINEAR16, sample_rate_hertz=16000, **config),  # type: ignore[arg-type]
        interim_results=True,
    )
    yield asr_pb2.StreamingRecognizeRequest(streaming_config=settings, request_id="stream-1")
    data = pcm16(audio)
    for at in range(0, len(data), 3201):  # odd sizes: samples split across messages
        yield asr_pb2.StreamingRecognizeRequest(audio_content=data[at : at + 3201])


def test_streaming_final_equals_recognize(
    stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]
) -> None:
    utt = utterances[1]
    unary = recognize(stub, flac(utt.audio)).results[0].alternatives[0].transcript
    responses = list(stub.StreamingRecognize(stream_requests(utt.audio), timeout=60))
    assert all(r.request_id == "stream-1" for r in responses)
    finals = [r.results[0] for r in responses if r.results and r.results[0].is_final]
    interim = [r.results[0] for r in responses if r.results and not r.results[0].is_final]
    assert interim and [f.alternatives[0].transcript for f in finals] == [unary] == [utt.text]


def test_list_models(stub: asr_pb2_grpc.RecognizerStub) -> None:
    models = stub.ListModels(asr_pb2.ListModelsRequest()).models
    assert [m.name for m in models] == ["words", "offline"]
    assert models[0].is_default and models[0].streaming and not models[1].streaming
    assert "beam" in models[0].decoding_methods and models[0].parameters > 0


def test_health_and_reflection(server: Server) -> None:
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "asr.v1.Recognizer"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [answer] = list(reflect.ServerReflectionInfo(iter([request])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"asr.v1.Recognizer", "grpc.health.v1.Health"} <= names
        # not Google's: its package builds message descriptors only, so reflection could
        # list the service but not describe it
        assert "google.cloud.speech.v1.Speech" not in names


def _code(call: object) -> grpc.StatusCode:
    assert isinstance(call, grpc.RpcError)
    return call.code()


@pytest.mark.parametrize(
    ("audio", "config", "code", "message"),
    [
        (
            b"\x01\x02\x03",
            {"encoding": Config.LINEAR16, "sample_rate_hertz": 16000},
            grpc.StatusCode.INVALID_ARGUMENT,
            "whole number",
        ),
        (
            b"\x00\x00" * 100,
            {"encoding": Config.LINEAR16},
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs sample_rate_hertz",
        ),
        (
            b"\x00\x00" * 100,
            {"encoding": Config.LINEAR16, "sample_rate_hertz": 1000},
            grpc.StatusCode.INVALID_ARGUMENT,
            "unsupported sample rate",
        ),
        (
            b"\x00\x00" * 100,
            {"decoding_method": "nope"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "choose one of",
        ),
        (
            b"\x00\x00" * 100,
            {"decoding_method": "joint"},  # a CTC model served without a LAS
            grpc.StatusCode.INVALID_ARGUMENT,
            "needs a LAS bundle",
        ),
        (
            b"\x00\x00" * 16000 * 31,
            {"encoding": Config.LINEAR16, "sample_rate_hertz": 16000},
            grpc.StatusCode.INVALID_ARGUMENT,
            "Recognize takes at most 30 s",
        ),
    ],
)
def test_recognize_errors(
    stub: asr_pb2_grpc.RecognizerStub,
    audio: bytes,
    config: dict[str, Any],
    code: grpc.StatusCode,
    message: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        recognize(stub, audio, **config)
    assert _code(info.value) == code
    assert message in info.value.details()


def _stream_error(
    stub: asr_pb2_grpc.RecognizerStub, requests: list[asr_pb2.StreamingRecognizeRequest]
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamingRecognize(iter(requests), timeout=60))
    return info.value


def test_an_offline_model_cannot_stream(stub: asr_pb2_grpc.RecognizerStub) -> None:
    err = _stream_error(stub, [next(stream_requests(torch.zeros(10), model="offline"))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot stream" in err.details()


def test_too_many_streams(server: Server, stub: asr_pb2_grpc.RecognizerStub) -> None:
    config = next(stream_requests(torch.zeros(10)))
    gates = [threading.Event() for _ in range(2)]

    def held(gate: threading.Event) -> Iterator[asr_pb2.StreamingRecognizeRequest]:
        yield config
        gate.wait(30)

    calls = [stub.StreamingRecognize(held(g), timeout=60) for g in gates]
    try:
        for _ in range(100):  # wait until both streams are open on the server
            if server.running.servicer.active_streams == 2:
                break
            threading.Event().wait(0.05)
        err = _stream_error(stub, [config])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for g, c in zip(gates, calls, strict=True):
            g.set()
            c.cancel()
    for _ in range(100):  # cancellation frees the slots
        if server.running.servicer.active_streams == 0:
            break
        threading.Event().wait(0.05)
    assert server.running.servicer.active_streams == 0


def test_deadline_ends_a_stream_and_frees_it(
    server: Server, stub: asr_pb2_grpc.RecognizerStub
) -> None:
    config = next(stream_requests(torch.zeros(10)))
    gate = threading.Event()

    def slow() -> Iterator[asr_pb2.StreamingRecognizeRequest]:
        yield config
        gate.wait(10)

    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamingRecognize(slow(), timeout=1.0))
    gate.set()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if server.running.servicer.active_streams == 0:
            break
        threading.Event().wait(0.05)
    assert server.running.servicer.active_streams == 0


def test_shutdown_drains_in_flight_calls(word_model: Bundle, utterances: list[Utterance]) -> None:
    srv = Server(
        ServerConfig(models=(("words", "<memory>"),), port=0),
        [Model("words", Recognizer(word_model))],
    )
    with grpc.insecure_channel(srv.target) as channel:
        stub = asr_pb2_grpc.RecognizerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        utt = utterances[2]
        requests = list(stream_requests(utt.audio))
        gate = threading.Event()

        def held() -> Iterator[asr_pb2.StreamingRecognizeRequest]:
            yield requests[0]
            yield requests[1]
            gate.wait(20)  # the rest is sent after the server starts stopping
            yield from requests[2:]

        call = stub.StreamingRecognize(held(), timeout=60)
        for _ in range(100):
            if srv.running.servicer.active_streams == 1:
                break
            threading.Event().wait(0.05)
        stopping = asyncio.run_coroutine_threadsafe(srv.running.stop(10.0), srv.loop)
        for _ in range(100):  # health flips first
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service="")).status
            except grpc.RpcError:
                break  # already refusing new calls
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            threading.Event().wait(0.05)
        with pytest.raises(grpc.RpcError) as info:
            recognize(stub, flac(utt.audio))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        gate.set()  # the in-flight stream finishes within the grace period
        finals = [r.results[0] for r in call if r.results and r.results[0].is_final]
        assert " ".join(f.alternatives[0].transcript for f in finals) == utt.text
        stopping.result(timeout=30)
    srv.loop.call_soon_threadsafe(srv.loop.stop)
    srv.thread.join(timeout=10)


def test_bearer_token_is_required_when_configured(
    word_model: Bundle, utterances: list[Utterance]
) -> None:
    config = ServerConfig(models=(("words", "<memory>"),), port=0, auth_token="s3cret")
    srv = Server(config, [Model("words", Recognizer(word_model))])
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = asr_pb2_grpc.RecognizerStub(channel)
            request = asr_pb2.RecognizeRequest(config=Config(), audio=flac(utterances[0].audio))
            for metadata in (
                None,
                [("authorization", "Bearer wrong")],
                [("authorization", "s3cret")],
            ):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Recognize(request, metadata=metadata, timeout=60)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                list(stub.StreamingRecognize(stream_requests(utterances[0].audio), timeout=60))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = [("authorization", "Bearer s3cret")]
            response = stub.Recognize(request, metadata=good, timeout=60)
            assert response.results[0].alternatives[0].transcript == utterances[0].text
            # Health checks stay open: load balancers probe without credentials.
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service="")).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        srv.stop()


def test_metrics_count_requests_errors_and_audio(
    server: Server, stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]
) -> None:
    recognize(stub, flac(utterances[0].audio))
    with pytest.raises(grpc.RpcError):
        recognize(stub, b"not audio")
    list(stub.StreamingRecognize(stream_requests(utterances[1].audio), timeout=60))
    port = server.running.metrics_port
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['asr_requests_total{code="OK",method="Recognize"}'] >= 1
    assert values['asr_requests_total{code="INVALID_ARGUMENT",method="Recognize"}'] >= 1
    assert values['asr_requests_total{code="OK",method="StreamingRecognize"}'] >= 1
    assert values['asr_audio_seconds_total{method="StreamingRecognize"}'] > 1.0
    assert values['asr_real_time_factor_count{method="Recognize"}'] >= 1
    assert values["asr_active_streams"] == 0
    assert values["asr_max_streams"] == 2  # the fixture's --max-streams


def _nan_wav() -> bytes:
    buf = io.BytesIO()
    sf.write(
        buf, np.full(1600, np.nan, dtype=np.float32), SAMPLE_RATE, format="WAV", subtype="FLOAT"
    )
    return buf.getvalue()


def test_bad_input_matrix(word_model: Bundle, utterances: list[Utterance]) -> None:
    """Every kind of bad request gets its documented status code (DESIGN §3), and the server
    answers a good request after each one."""
    config = ServerConfig(
        models=(("words", "<memory>"),),
        port=0,
        max_stream_seconds=10.0,
        max_message_bytes=1_000_000,
        auth_token="s3cret",
    )
    srv = Server(config, [Model("words", Recognizer(word_model))])
    token = [("authorization", "Bearer s3cret")]
    assert utterances[0].audio.numel() < 10 * SAMPLE_RATE
    good = flac(utterances[0].audio)
    ok_stream = list(stream_requests(utterances[0].audio))
    stream_config = ok_stream[0]
    pcm_chunk = asr_pb2.StreamingRecognizeRequest(audio_content=b"\x00\x00" * 1600)
    second_of_pcm = asr_pb2.StreamingRecognizeRequest(audio_content=b"\x00\x00" * 16000)
    wrong_rate = asr_pb2.StreamingRecognizeRequest(
        streaming_config=asr_pb2.StreamingRecognitionConfig(
            config=Config(encoding=Config.LINEAR16, sample_rate_hertz=1000)
        )
    )

    def unary(audio: bytes, **fields: Any) -> Any:
        return lambda stub, metadata: stub.Recognize(
            asr_pb2.RecognizeRequest(config=Config(**fields), audio=audio),
            metadata=metadata,
            timeout=60,
        )

    def stream(requests: list[asr_pb2.StreamingRecognizeRequest]) -> Any:
        return lambda stub, metadata: list(
            stub.StreamingRecognize(iter(requests), metadata=metadata, timeout=60)
        )

    code = grpc.StatusCode
    cases: dict[str, tuple[Any, grpc.StatusCode, str]] = {
        "undecodable bytes": (unary(b"not audio at all"), code.INVALID_ARGUMENT, "cannot decode"),
        "truncated FLAC": (unary(good[: len(good) // 2]), code.INVALID_ARGUMENT, "cannot decode"),
        "FLAC with a wrong declared rate": (
            unary(good, sample_rate_hertz=8000),
            code.INVALID_ARGUMENT,
            "declared sample rate 8000 Hz, but it is 16000 Hz",
        ),
        "stream with an unsupported rate": (
            stream([wrong_rate, pcm_chunk]),
            code.INVALID_ARGUMENT,
            "unsupported sample rate",
        ),
        "empty audio": (unary(b""), code.INVALID_ARGUMENT, "empty input"),
        "NaN float samples": (unary(_nan_wav()), code.INVALID_ARGUMENT, "NaN"),
        "audio before config": (
            stream([pcm_chunk, stream_config]),
            code.INVALID_ARGUMENT,
            "audio before config",
        ),
        "two configs": (
            stream([stream_config, pcm_chunk, stream_config]),
            code.INVALID_ARGUMENT,
            "second streaming_config",
        ),
        "oversized message": (
            unary(b"\x00\x00" * 600_000, encoding=Config.LINEAR16, sample_rate_hertz=16000),
            code.RESOURCE_EXHAUSTED,
            "",
        ),
        "over-long stream": (
            stream([stream_config, *[second_of_pcm] * 11]),
            code.OUT_OF_RANGE,
            "longer than 10 s",
        ),
        "unknown model": (unary(good, model="nope"), code.NOT_FOUND, "unknown model 'nope'"),
    }
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = asr_pb2_grpc.RecognizerStub(channel)
            answered = {}
            for name, (call, _, message) in cases.items():
                with pytest.raises(grpc.RpcError) as info:
                    call(stub, token)
                answered[name] = (_code(info.value), message in info.value.details())
                after = unary(good)(stub, token)  # still serving
                assert after.results[0].alternatives[0].transcript == utterances[0].text, name
            with pytest.raises(grpc.RpcError) as info:
                unary(good)(stub, None)
            answered["missing token"] = (_code(info.value), "bearer token" in info.value.details())
            expected_codes = {name: (case[1], True) for name, case in cases.items()}
            expected_codes["missing token"] = (code.UNAUTHENTICATED, True)
            assert answered == expected_codes
            streamed = stream(ok_stream)(stub, token)
            finals = [r.results[0] for r in streamed if r.results and r.results[0].is_final]
            assert " ".join(f.alternatives[0].transcript for f in finals) == utterances[0].text
    finally:
        srv.stop()


def test_tls_serves_tls_clients_only(
    word_model: Bundle, utterances: list[Utterance], tmp_path: Path
) -> None:
    ca, cert, key = make_tls_files(tmp_path)
    config = ServerConfig(
        models=(("words", "<memory>"),), port=0, tls_cert=str(cert), tls_key=str(key)
    )
    srv = Server(config, [Model("words", Recognizer(word_model))])
    target = f"localhost:{srv.running.port}"
    try:
        with AsrClient(target, root_certificates=ca.read_bytes()) as client:
            response = client.recognize(flac(utterances[0].audio))
            assert response.results[0].alternatives[0].transcript == utterances[0].text
        with AsrClient(target, timeout=10) as plaintext, pytest.raises(grpc.RpcError) as info:
            plaintext.list_models()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()


def test_tls_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both a certificate and a private key"):
        ServerConfig(models=(("m", "dir"),), tls_cert="cert.pem")
    not_pem = tmp_path / "key.pem"
    not_pem.write_text("hello")
    config = ServerConfig(models=(("m", "dir"),), port=0, tls_cert=str(not_pem), tls_key="nope")
    with pytest.raises(ValueError, match="nope: cannot read the TLS private key"):
        asyncio.run(start(config, []))


def test_configured_rescorer_and_chunking(
    word_model: Bundle, utterances: list[Utterance], tmp_path: Path
) -> None:
    words = save_bundle(word_model, tmp_path / "words")
    rescorer = save_bundle(untrained_las(word_model, word_model.tokenizer), tmp_path / "las")
    config = ServerConfig(
        models=(("words", str(words)), ("plain", str(words))),
        rescorers=(("words", str(rescorer)),),
        chunking=(4, 2),  # shorter blocks than the word model's 8 + 4, as asr serve allows
        port=0,
    )
    models = load_models(config)
    assert models[0].recognizer.rescorer is not None and models[1].recognizer.rescorer is None
    model = models[0].recognizer.bundle.model
    assert isinstance(model, BiLSTMCTC) and model.config.chunk_size == 4
    assert model.config.right_context == 2
    srv = Server(config, models)
    try:
        with AsrClient(srv.target) as client:
            listed = {m.name: m.default_decoding_method for m in client.list_models()}
            assert listed == {"words": "joint", "plain": "beam"}
            audio = utterances[2].audio
            finals = [
                r.alternatives[0].transcript
                for response in client.stream(audio)
                for r in response.results
                if r.is_final
            ]
        # The server's streaming finals are the in-process session's (joint CTC/attention
        # decoding of each segment with the LAS).
        session = StreamingSession(models[0].recognizer)
        expected = [r.transcript.text for r in session.accept(audio) if r.is_final]
        expected += [r.transcript.text for r in session.finish() if r.is_final]
        assert finals == expected
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="rescorer for unknown model 'nope'"):
        ServerConfig(models=(("m", "dir"),), rescorers=(("nope", "dir"),))


def test_json_logs_carry_request_fields(
    stub: asr_pb2_grpc.RecognizerStub,
    utterances: list[Utterance],
    caplog: pytest.LogCaptureFixture,
) -> None:
    request = asr_pb2.RecognizeRequest(
        config=Config(), audio=flac(utterances[0].audio), request_id="r-7"
    )
    with caplog.at_level(logging.INFO, logger="asr.server"):
        stub.Recognize(request, timeout=60)
        with pytest.raises(grpc.RpcError):
            recognize(stub, b"junk")

    def logged(**match: str) -> list[dict[str, Any]]:
        entries = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
        return [e for e in entries if match.items() <= e.items()]

    [done] = logged(request_id="r-7")
    assert done["rpc"] == "Recognize" and done["code"] == "OK" and done["level"] == "INFO"
    assert done["model"] == "words" and done["audio_s"] > 0 and done["latency_ms"] > 0
    failed = logged(rpc="Recognize", code="INVALID_ARGUMENT")
    assert failed and "cannot decode audio" in failed[-1]["message"]
    record = next(r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "r-7")
    text = TextFormatter().format(record)
    assert "request_id=r-7" in text and "rpc=Recognize" in text


def test_hotwords_in_speech_contexts_fix_a_near_miss_and_leave_other_audio_alone(
    server: Server, stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]
) -> None:
    recognizer = server.running.servicer.models["words"].recognizer
    utt, other = utterances[0], utterances[3]
    # A near miss: the best alternative the search found that is not what was said.
    best, *rest = recognizer.transcribe(utt.audio, nbest=10).nbest
    assert best.text == utt.text
    alt = next(a for a in rest if a.text and a.text != utt.text)
    units = len(alt.tokens)
    boost = min(20.0, (best.score - alt.score) / units + 1.0)  # enough to lift it over
    context = asr_pb2.SpeechContext(phrases=[alt.text.lower()], boost=boost)
    hinted = recognize(stub, flac(utt.audio), speech_contexts=[context])
    assert hinted.results[0].alternatives[0].transcript == alt.text
    assert recognize(stub, flac(utt.audio)).results[0].alternatives[0].transcript == utt.text
    # Audio that says something else is left alone: unfinished matches earn nothing.
    elsewhere = recognize(stub, flac(other.audio), speech_contexts=[context])
    assert elsewhere.results[0].alternatives[0].transcript == other.text
    # Bad hints are the request's fault.
    for bad in (
        asr_pb2.SpeechContext(phrases=[""]),
        asr_pb2.SpeechContext(phrases=["a"], boost=99),
    ):
        with pytest.raises(grpc.RpcError) as err:
            recognize(stub, flac(utt.audio), speech_contexts=[bad])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hotwords" in (err.value.details() or "")


def unigram_arpa(path: Path, words: list[str]) -> Path:
    """A uniform unigram ARPA file over `words`."""
    entries = ["<s>", "</s>", *words]
    p = math.log10(1.0 / (len(entries) - 1))
    lines = ["\\data\\", f"ngram 1={len(entries)}", "", "\\1-grams:"]
    lines += [f"{-99 if w == '<s>' else p:.4f} {w}" for w in entries]
    path.write_text("\n".join([*lines, "", "\\end\\", ""]))
    return path


def test_a_language_model_fuses_into_recognize_and_streaming(
    word_model: Bundle, utterances: list[Utterance], tmp_path: Path
) -> None:
    from tests.word_corpus import WORDS

    words = save_bundle(word_model, tmp_path / "words")
    arpa = unigram_arpa(tmp_path / "words.arpa", [w.upper() for w in WORDS])
    # An LM mix (asr lm mix) serves the same way: here the unigram twice, at two weights.
    mix = tmp_path / "mix.json"
    write_mix(mix, [(0.2, arpa), (0.1, Path(shutil.copy(arpa, tmp_path / "copy.arpa")))])
    config = ServerConfig(
        models=(("words", str(words)), ("plain", str(words)), ("mixed", str(words))),
        lms=(("words", str(arpa)), ("mixed", str(mix))),
        port=0,
    )
    models = load_models(config)
    fused, mixed = models[0].recognizer, models[2].recognizer
    assert fused.lm is not None and fused.lm.kind == "ngram" and models[1].recognizer.lm is None
    assert mixed.lm is not None and mixed.lm.kind == "mix"
    srv = Server(config, models)
    try:
        with AsrClient(srv.target) as client:
            listed = {m.name: m.language_model for m in client.list_models()}
            assert listed == {
                "words": "ngram LM words.arpa",
                "plain": "",
                "mixed": "mix mix.json (0.2 x ngram LM words.arpa + 0.1 x ngram LM copy.arpa)",
            }
            audio = utterances[2].audio
            responses = {
                name: list(client.stream(audio, model=name)) for name in ("words", "mixed")
            }
            unary = client.recognize(flac(audio)).results[0].alternatives[0].transcript
        for name, recognizer in (("words", fused), ("mixed", mixed)):
            session = StreamingSession(recognizer)
            expected = [r.transcript.text for r in session.accept(audio) if r.is_final]
            expected += [r.transcript.text for r in session.finish() if r.is_final]
            finals = [
                r.alternatives[0].transcript
                for x in responses[name]
                for r in x.results
                if r.is_final
            ]
            assert any(not r.is_final for x in responses[name] for r in x.results)
            assert finals == expected  # as the in-process session with the LM
        assert unary == fused.transcribe(audio).text
    finally:
        srv.stop()
    with pytest.raises(ValueError, match="language model for unknown model 'nope'"):
        ServerConfig(models=(("m", "dir"),), lms=(("nope", "dir"),))
