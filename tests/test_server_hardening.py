"""The server against hostile or careless requests (issue 13's fault run): every field that
drives cost is bounded by a server limit, the stream's own settings are checked and honoured,
user text is never echoed raw into logs or status trailers, malformed messages are
INVALID_ARGUMENT, and the metrics count every way a call ends."""

from __future__ import annotations

import io
import logging
import random
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import soundfile as sf
import torch
import torchaudio
from google.protobuf.duration_pb2 import Duration

from asr.audio import SAMPLE_RATE
from asr.bundle import Bundle
from asr.recognizer import Recognizer
from asr.v1 import asr_pb2, asr_pb2_grpc
from server.config import ServerConfig
from server.logs import TextFormatter, fields
from server.servicer import Model
from tests.test_server import Server, flac, pcm16
from tests.word_corpus import Utterance, WordCorpus

Config = asr_pb2.RecognitionConfig
Request = asr_pb2.StreamingRecognizeRequest
TOKEN = [("authorization", "Bearer s3cret")]
MAX_MESSAGE = 1_000_000
code = grpc.StatusCode


@pytest.fixture(scope="module")
def utterances(word_corpus: WordCorpus) -> list[Utterance]:
    rng = random.Random(57)
    return sorted((word_corpus.utterance(rng) for _ in range(6)), key=lambda u: -len(u.audio))


@pytest.fixture(scope="module")
def server(word_model: Bundle) -> Iterator[Server]:
    config = ServerConfig(
        models=(("words", "<memory>"),),
        port=0,
        max_message_bytes=MAX_MESSAGE,
        metrics_port=0,
        auth_token="s3cret",
    )
    srv = Server(config, [Model("words", Recognizer(word_model))])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as chan:
        yield chan


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> asr_pb2_grpc.RecognizerStub:
    return asr_pb2_grpc.RecognizerStub(channel)


def recognize(
    stub: asr_pb2_grpc.RecognizerStub, audio: bytes, request_id: str = "", **config: Any
) -> asr_pb2.RecognizeResponse:
    request = asr_pb2.RecognizeRequest(config=Config(**config), audio=audio, request_id=request_id)
    return stub.Recognize(request, metadata=TOKEN, timeout=60)


def refused(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def stream_config(endpoint: asr_pb2.EndpointConfig | None = None, **config: Any) -> Request:
    settings = asr_pb2.StreamingRecognitionConfig(
        config=Config(**{"encoding": Config.LINEAR16, "sample_rate_hertz": 16000, **config}),
        endpoint=endpoint,
    )
    return Request(streaming_config=settings, request_id="hardening")


def audio_requests(audio: torch.Tensor) -> Iterator[Request]:
    data = pcm16(audio)
    for at in range(0, len(data), 3200):
        yield Request(audio_content=data[at : at + 3200])


def finals(responses: Any) -> list[str]:
    return [
        r.results[0].alternatives[0].transcript
        for r in responses
        if r.results and r.results[0].is_final
    ]


def test_beam_and_alternatives_are_bounded(
    stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]
) -> None:
    """A beam of 10**6 used to fail with INTERNAL (a 10**12-byte tensor) and 4000 took 14 s
    of the one model thread: now both are refused at once, naming the limit."""
    good = flac(utterances[0].audio)
    for beam in (1_000_000, 4000):
        started = time.perf_counter()
        err = refused(lambda beam=beam: recognize(stub, good, beam_size=beam))
        assert err.code() == code.INVALID_ARGUMENT
        assert f"beam_size {beam} is more than this server's --max-beam 64" in err.details()
        assert time.perf_counter() - started < 5
    err = refused(lambda: recognize(stub, good, max_alternatives=11))
    assert err.code() == code.INVALID_ARGUMENT
    assert "max_alternatives 11 is more than this server's --max-alternatives 10" in err.details()
    err = refused(
        lambda: list(
            stub.StreamingRecognize(iter([stream_config(beam_size=65)]), metadata=TOKEN, timeout=60)
        )
    )
    assert err.code() == code.INVALID_ARGUMENT and "--max-beam 64" in err.details()
    # The limits themselves are served, and the server is none the worse.
    response = recognize(stub, good, beam_size=64, max_alternatives=10)
    assert response.results[0].alternatives[0].transcript == utterances[0].text


def test_unknown_decoding_method_is_quoted_and_cut(stub: asr_pb2_grpc.RecognizerStub) -> None:
    err = refused(lambda: recognize(stub, b"\x00\x00" * 10, decoding_method="x" * 10_000))
    assert err.code() == code.INVALID_ARGUMENT
    assert "(10000 characters); choose one of greedy, beam" in err.details()
    assert len(err.details()) < 400


def test_stream_channels_and_rate_are_checked_before_audio(
    stub: asr_pb2_grpc.RecognizerStub,
) -> None:
    """2**31-1 channels never completed a frame, so the stream's bytes piled up unseen by
    --max-stream-seconds. The config is refused before the server reads any audio."""
    for config, message in (
        ({"audio_channel_count": 2147483647}, "audio_channel_count 2147483647 is not supported"),
        ({"audio_channel_count": -1}, "audio_channel_count -1 is not supported"),
        ({"audio_channel_count": 9}, "(1-8)"),
        ({"sample_rate_hertz": 0}, "needs sample_rate_hertz"),
        ({"sample_rate_hertz": 1000}, "unsupported sample rate"),
    ):
        gate = threading.Event()
        sent_audio: list[bool] = []

        def held(
            config: dict[str, Any] = config,
            gate: threading.Event = gate,
            sent_audio: list[bool] = sent_audio,
        ) -> Iterator[Request]:
            yield stream_config(**config)
            gate.wait(20)  # the server answers before this returns
            sent_audio.append(True)
            yield Request(audio_content=b"\x00\x00" * 1600)

        try:
            err = refused(lambda: list(stub.StreamingRecognize(held(), metadata=TOKEN, timeout=30)))
            assert not sent_audio  # answered while the client still held its audio back
        finally:
            gate.set()
        assert err.code() == code.INVALID_ARGUMENT and message in err.details(), config
        # Recognize checks the same fields with the same function.
        unary = refused(
            lambda config=config: recognize(
                stub,
                b"\x00\x00" * 16,
                encoding=Config.LINEAR16,
                **{"sample_rate_hertz": 16000, **config},
            )
        )
        assert unary.code() == code.INVALID_ARGUMENT and message in unary.details()


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


def test_stream_endpoint_is_the_streams_own(
    stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]
) -> None:
    audio = utterances[0].audio  # the longest
    assert audio.numel() > 2.5 * SAMPLE_RATE

    def run(endpoint: asr_pb2.EndpointConfig) -> list[str]:
        requests = [stream_config(endpoint), *audio_requests(audio)]
        return finals(stub.StreamingRecognize(iter(requests), metadata=TOKEN, timeout=60))

    # Silence never ends a segment here; only the stream's max_segment_duration can.
    whole = run(asr_pb2.EndpointConfig(trailing_silence=seconds(29)))
    cut = run(
        asr_pb2.EndpointConfig(trailing_silence=seconds(29), max_segment_duration=seconds(0.8))
    )
    assert len(whole) == 1 and " ".join(whole) == utterances[0].text
    assert len(cut) >= 3
    for endpoint, message in (
        (asr_pb2.EndpointConfig(trailing_silence=seconds(-1)), "must not be negative"),
        (asr_pb2.EndpointConfig(max_segment_duration=seconds(-0.5)), "must not be negative"),
        (
            asr_pb2.EndpointConfig(max_segment_duration=seconds(31)),
            "more than this server's --max-segment 30 s",
        ),
    ):
        err = refused(
            lambda endpoint=endpoint: list(
                stub.StreamingRecognize(iter([stream_config(endpoint)]), metadata=TOKEN, timeout=60)
            )
        )
        assert err.code() == code.INVALID_ARGUMENT and message in err.details()


def wav(audio: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio.numpy(), SAMPLE_RATE, format="WAV")
    return buf.getvalue()


def test_encoding_must_match_the_container(
    stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]
) -> None:
    utt = utterances[1]
    for audio, encoding, message in (
        (wav(utt.audio), Config.FLAC, "encoding FLAC, but the audio is WAV"),
        (flac(utt.audio), Config.WAV, "encoding WAV, but the audio is FLAC"),
        (flac(utt.audio), Config.OGG_VORBIS, "encoding OGG_VORBIS, but the audio is FLAC"),
        (flac(utt.audio), 77, "unknown encoding 77"),
    ):
        err = refused(
            lambda audio=audio, encoding=encoding: recognize(stub, audio, encoding=encoding)
        )
        assert err.code() == code.INVALID_ARGUMENT and message in err.details()
    for audio, encoding in (
        (wav(utt.audio), Config.WAV),
        (flac(utt.audio), Config.FLAC),
        (wav(utt.audio), Config.ENCODING_UNSPECIFIED),  # detected
    ):
        response = recognize(stub, audio, encoding=encoding)
        assert response.results[0].alternatives[0].transcript == utt.text


def test_language_code(stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]) -> None:
    good = flac(utterances[1].audio)
    for language in ("", "en-US", "en-us", "EN_us", "en"):
        response = recognize(stub, good, language_code=language)
        assert response.results[0].alternatives[0].transcript == utterances[1].text
    for language in ("de-DE", "en-GB", "english"):
        err = refused(lambda language=language: recognize(stub, good, language_code=language))
        assert err.code() == code.INVALID_ARGUMENT
        assert f"language_code {language!r} is not supported" in err.details()
        assert "en-US" in err.details()


def test_a_huge_model_name_is_not_found_with_a_short_message(
    stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]
) -> None:
    """The name used to be echoed whole: a 100 KB trailer, which gRPC turned into
    RESOURCE_EXHAUSTED."""
    err = refused(lambda: recognize(stub, flac(utterances[1].audio), model="m" * 100_000))
    assert err.code() == code.NOT_FOUND
    assert "unknown model 'mmm" in err.details() and "(100000 characters)" in err.details()
    assert len(err.details()) < 400


def test_request_ids_cannot_forge_log_lines(
    stub: asr_pb2_grpc.RecognizerStub,
    utterances: list[Utterance],
    caplog: pytest.LogCaptureFixture,
) -> None:
    forged = "r1\r\n2024-01-01 00:00:00 INFO asr.server Recognize done code=OK"
    good = flac(utterances[1].audio)
    with caplog.at_level(logging.INFO, logger="asr.server"):
        for rid in (forged, "x" * 129):  # refused rather than altered: see servicer.request_id
            err = refused(lambda rid=rid: recognize(stub, good, request_id=rid))
            assert err.code() == code.INVALID_ARGUMENT and "request_id" in err.details()
        assert recognize(stub, good, request_id="a" * 128).request_id == "a" * 128
        refused(lambda: recognize(stub, good, model="evil\nmodel", request_id="ok-1"))
    lines = [TextFormatter().format(r) for r in caplog.records]
    assert lines and all("\n" not in line and "\r" not in line for line in lines)
    assert any("\\r\\n2024-01-01" in line for line in lines)
    assert any("unknown model 'evil\\nmodel'" in line for line in lines)


def test_text_format_keeps_one_record_per_line() -> None:
    """Messages and fields escaped; a traceback below its record, indented, so an exception
    message with request text in it cannot start a line either."""
    record = logging.LogRecord(
        "asr.server", logging.INFO, __file__, 1, "bad %s", ("a\nb\x1b[2J",), None
    )
    record.fields = fields(request_id="r\r\nforged", model="m")["fields"]
    line = TextFormatter().format(record)
    assert line.endswith("bad a\\nb\\x1b[2J request_id=r\\r\\nforged model=m")
    assert "\n" not in line
    try:
        raise ValueError("first\nINFO forged")
    except ValueError:
        import sys

        failed = logging.LogRecord(
            "asr.server", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    head, *rest = TextFormatter().format(failed).split("\n")
    assert head.endswith("failed") and rest and all(r.startswith("    ") for r in rest)


def test_malformed_and_oversized_messages(channel: grpc.Channel) -> None:
    """Bytes that are not the method's request message: INVALID_ARGUMENT (gRPC's default
    was UNKNOWN). A message over --max-message-bytes: RESOURCE_EXHAUSTED naming the flag."""
    garbage = b"\xff\xff\xff\xff\x0f"
    for method in ("Recognize", "ListModels"):
        call = channel.unary_unary(f"/asr.v1.Recognizer/{method}")
        err = refused(lambda call=call: call(garbage, metadata=TOKEN, timeout=10))
        assert err.code() == code.INVALID_ARGUMENT and "malformed request" in err.details()
    stream = channel.stream_stream("/asr.v1.Recognizer/StreamingRecognize")
    first = stream_config().SerializeToString()
    for requests in ([garbage], [first, garbage]):
        err = refused(
            lambda requests=requests: list(stream(iter(requests), metadata=TOKEN, timeout=10))
        )
        assert err.code() == code.INVALID_ARGUMENT and "malformed request" in err.details()
    big = asr_pb2.RecognizeRequest(audio=b"\x00" * (MAX_MESSAGE + 10)).SerializeToString()
    err = refused(
        lambda: channel.unary_unary("/asr.v1.Recognizer/Recognize")(big, metadata=TOKEN, timeout=10)
    )
    assert err.code() == code.RESOURCE_EXHAUSTED
    assert "more than this server's --max-message-bytes 1000000" in err.details()
    # Without the token, a caller learns nothing about its request.
    err = refused(lambda: channel.unary_unary("/asr.v1.Recognizer/Recognize")(garbage, timeout=10))
    assert err.code() == code.UNAUTHENTICATED


def metrics(server: Server) -> dict[str, float]:
    port = server.running.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def requests_counted(server: Server, method: str, status: str) -> float:
    return metrics(server).get(f'asr_requests_total{{code="{status}",method="{method}"}}', 0.0)


def test_metrics_count_every_outcome(
    server: Server,
    stub: asr_pb2_grpc.RecognizerStub,
    channel: grpc.Channel,
    utterances: list[Utterance],
) -> None:
    # context.abort sends the status before the handler unwinds and is counted, so an
    # earlier test's last refusal can be counted after its caller heard it: wait until the
    # counts are still before taking them.
    snapshot = metrics(server)
    for _ in range(100):
        time.sleep(0.1)
        if (now := metrics(server)) == snapshot:
            break
        snapshot = now
    before = {
        (m, c): requests_counted(server, m, c)
        for m in ("Recognize", "StreamingRecognize", "ListModels")
        for c in (
            "UNAUTHENTICATED",
            "CANCELLED",
            "DEADLINE_EXCEEDED",
            "RESOURCE_EXHAUSTED",
            "INVALID_ARGUMENT",
            "OK",
        )
    }
    refused(lambda: stub.Recognize(asr_pb2.RecognizeRequest(), timeout=10))  # no token
    refused(lambda: list(stub.StreamingRecognize(iter([stream_config()]), timeout=10)))
    stub.ListModels(asr_pb2.ListModelsRequest(), metadata=TOKEN, timeout=10)
    big = asr_pb2.RecognizeRequest(audio=b"\x00" * (MAX_MESSAGE + 10))
    refused(lambda: stub.Recognize(big, metadata=TOKEN, timeout=10))
    refused(
        lambda: channel.unary_unary("/asr.v1.Recognizer/ListModels")(
            b"\xff", metadata=TOKEN, timeout=10
        )
    )

    gate = threading.Event()

    def held() -> Iterator[Request]:
        yield stream_config()
        gate.wait(20)

    # A deadline the decode cannot meet (~25 s of audio, under MAX_MESSAGE, in 0.1 s),
    # checked on Recognize: a stream's deadline can also end its request iterator first,
    # which the handler cannot tell from the client closing the stream, so how that is
    # counted depends on timing.
    long = pcm16(torch.cat([u.audio for u in utterances]))
    assert len(long) < MAX_MESSAGE
    hurried = asr_pb2.RecognizeRequest(
        config=Config(encoding=Config.LINEAR16, sample_rate_hertz=SAMPLE_RATE), audio=long
    )
    refused(lambda: stub.Recognize(hurried, metadata=TOKEN, timeout=0.1))
    try:
        call = stub.StreamingRecognize(held(), metadata=TOKEN, timeout=30)
        for _ in range(400):  # up to 20 s: a loaded single core dispatches slowly
            if server.running.servicer.active_streams == 1:
                break
            time.sleep(0.05)
        call.cancel()
    finally:
        gate.set()
    expected = {
        ("Recognize", "UNAUTHENTICATED"): 1,
        ("StreamingRecognize", "UNAUTHENTICATED"): 1,
        ("ListModels", "OK"): 1,
        ("Recognize", "RESOURCE_EXHAUSTED"): 1,
        ("ListModels", "INVALID_ARGUMENT"): 1,
        ("Recognize", "DEADLINE_EXCEEDED"): 1,
        ("StreamingRecognize", "CANCELLED"): 1,
    }
    counted: dict[tuple[str, str], float] = {}
    for _ in range(400):  # a cancelled call is counted once its handler has unwound
        counted = {k: requests_counted(server, *k) - before[k] for k in expected}
        if counted == expected:
            break
        time.sleep(0.05)
    assert counted == expected


def test_a_streams_result_does_not_depend_on_its_chunking(
    stub: asr_pb2_grpc.RecognizerStub, utterances: list[Utterance]
) -> None:
    # 48 kHz audio resampled chunk by chunk used to drift at 64-sample chunks (wrong words);
    # the stream's resampler keeps its state, so any chunking is the whole signal.
    utt = utterances[-1]
    audio48 = torchaudio.functional.resample(utt.audio, SAMPLE_RATE, 48_000)
    data = pcm16(audio48)

    def run(chunk_bytes: int) -> list[str]:
        def requests() -> Iterator[Request]:
            yield stream_config(sample_rate_hertz=48_000)
            for at in range(0, len(data), chunk_bytes):
                yield Request(audio_content=data[at : at + chunk_bytes])

        return finals(stub.StreamingRecognize(requests(), metadata=TOKEN, timeout=120))

    whole = run(len(data))
    assert " ".join(whole) == utt.text
    for chunk_bytes in (128, 999, 96_000):  # 64 samples, an odd cut mid-sample, 1 s
        assert run(chunk_bytes) == whole
