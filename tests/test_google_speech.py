"""Google Cloud Speech-to-Text v1 on our gRPC port, driven by Google's official
`google-cloud-speech` client unchanged: Recognize, StreamingRecognize (interim results,
single_utterance, voice activity events), LongRunningRecognize with its GetOperation polls, the
bearer token from channel credentials, and Google's error codes with the server alive after."""

from __future__ import annotations

import io
import random
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import soundfile as sf
import torch
from google.api_core import exceptions
from google.cloud import speech_v1 as speech
from google.cloud.speech_v1.services.speech.transports import SpeechGrpcTransport

from asr.audio import SAMPLE_RATE
from asr.bundle import Bundle
from asr.recognizer import Recognizer
from server.config import ServerConfig
from server.servicer import Model
from tests.certs import make_tls_files
from tests.test_server import Server, flac, pcm16
from tests.word_corpus import Utterance, WordCorpus

TOKEN = "g00gle"
Encoding = speech.RecognitionConfig.AudioEncoding
Event = speech.StreamingRecognizeResponse.SpeechEventType


@pytest.fixture(scope="module")
def utterances(word_corpus: WordCorpus) -> list[Utterance]:
    rng = random.Random(23)
    return [word_corpus.utterance(rng) for _ in range(2)]


@pytest.fixture(scope="module")
def server(word_model: Bundle) -> Iterator[Server]:
    config = ServerConfig(
        models=(("words", "<memory>"),),
        port=0,
        auth_token=TOKEN,
        max_concurrent_streams=4,
        max_unary_seconds=20.0,
        metrics_port=0,
        workers=1,
    )
    srv = Server(config, [Model("words", Recognizer(word_model))])
    yield srv
    srv.stop()


def speech_client(target: str, token: str | None = TOKEN) -> Any:
    """The client as the README shows it (Any: its proto-plus fields are typed as the
    protobuf messages they marshal): the token in channel credentials, since the
    client's streaming helper and operation polls send no per-call metadata."""
    if token is None:
        channel = grpc.insecure_channel(target)
    else:
        credentials = grpc.composite_channel_credentials(
            grpc.local_channel_credentials(), grpc.access_token_call_credentials(token)
        )
        channel = grpc.secure_channel(target, credentials)
    return speech.SpeechClient(transport=SpeechGrpcTransport(channel=channel))


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    return speech_client(server.target)


def test_recognize_with_words_and_confidences(client: Any, utterances: list[Utterance]) -> None:
    utt = utterances[0]
    config = speech.RecognitionConfig(
        language_code="en-US",
        enable_word_time_offsets=True,
        enable_word_confidence=True,
        enable_automatic_punctuation=True,  # accepted, ignored
        max_alternatives=2,
    )
    response = client.recognize(
        config=config, audio=speech.RecognitionAudio(content=flac(utt.audio))
    )
    (result,) = response.results
    best = result.alternatives[0]
    assert best.transcript == utt.text
    assert 0 < best.confidence <= 1
    assert len(result.alternatives) == 2
    assert [w.word for w in best.words] == [w for w, _, _ in utt.words]
    for word, (_, start, end) in zip(best.words, utt.words, strict=True):
        middle = (word.start_time.total_seconds() + word.end_time.total_seconds()) / 2
        assert abs(middle - (start + end) / 2) < 0.3
        assert 0 < word.confidence <= 1
    duration = utt.audio.numel() / SAMPLE_RATE
    assert result.result_end_time.total_seconds() == pytest.approx(duration, abs=0.01)
    assert result.language_code == "en-us"
    assert response.total_billed_time.total_seconds() == pytest.approx(duration, abs=0.01)
    # raw LINEAR16 with its rate, and Google's own model name for our default
    linear = speech.RecognitionConfig(
        encoding=Encoding.LINEAR16,
        sample_rate_hertz=SAMPLE_RATE,
        language_code="en-US",
        model="latest_long",
    )
    response = client.recognize(
        config=linear, audio=speech.RecognitionAudio(content=pcm16(utt.audio))
    )
    assert response.results[0].alternatives[0].transcript == utt.text
    assert not response.results[0].alternatives[0].words  # none asked for


def stream(
    client: Any, audio: torch.Tensor, **settings: Any
) -> list[speech.StreamingRecognizeResponse]:
    config = speech.StreamingRecognitionConfig(
        config=speech.RecognitionConfig(
            encoding=Encoding.LINEAR16, sample_rate_hertz=SAMPLE_RATE, language_code="en-US"
        ),
        **settings,
    )
    pcm = pcm16(audio)
    chunks = (
        speech.StreamingRecognizeRequest(audio_content=pcm[i : i + 3200])
        for i in range(0, len(pcm), 3200)
    )
    return list(client.streaming_recognize(config, chunks, timeout=60))


def test_streaming_recognize_with_interim_results_and_voice_events(
    client: Any, utterances: list[Utterance]
) -> None:
    utt = utterances[0]
    responses = stream(client, utt.audio, interim_results=True, enable_voice_activity_events=True)
    events = [r.speech_event_type for r in responses]
    assert events[0] == Event.SPEECH_ACTIVITY_BEGIN
    finals = [r for r in responses if r.results and r.results[0].is_final]
    assert [f.results[0].alternatives[0].transcript for f in finals] == [utt.text]
    assert finals[0].speech_event_type == Event.SPEECH_ACTIVITY_END
    interim = [r for r in responses if r.results and not r.results[0].is_final]
    assert interim and all(0 <= r.results[0].stability <= 1 for r in interim)
    # without interim results or events: the final alone
    (only,) = stream(client, utt.audio)
    assert only.results[0].is_final and only.results[0].alternatives[0].transcript == utt.text


def test_single_utterance_ends_the_stream_after_the_first_final(
    client: Any, utterances: list[Utterance]
) -> None:
    pause = torch.zeros(int(1.5 * SAMPLE_RATE))
    audio = torch.cat([utterances[0].audio, pause, utterances[1].audio])
    responses = stream(client, audio, single_utterance=True)
    finals = [r.results[0].alternatives[0].transcript for r in responses if r.results]
    assert finals == [utterances[0].text]
    assert responses[-1].speech_event_type == Event.END_OF_SINGLE_UTTERANCE


def test_long_running_recognize_polls_get_operation(
    client: Any, utterances: list[Utterance]
) -> None:
    utt = utterances[1]
    operation = client.long_running_recognize(
        config=speech.RecognitionConfig(language_code="en-US", enable_word_time_offsets=True),
        audio=speech.RecognitionAudio(content=flac(utt.audio)),
    )
    response = operation.result(timeout=60)
    assert response.results[0].alternatives[0].transcript == utt.text
    assert [w.word for w in response.results[0].alternatives[0].words] == utt.text.split()
    assert operation.metadata.progress_percent == 100
    # a request that fails in the background: the operation carries its error
    failing = client.long_running_recognize(
        config=speech.RecognitionConfig(language_code="en-US"),
        audio=speech.RecognitionAudio(content=b"RIFF not audio"),
    )
    with pytest.raises(exceptions.GoogleAPICallError) as failed:
        failing.result(timeout=60)
    assert failed.value.grpc_status_code == grpc.StatusCode.INVALID_ARGUMENT


def test_google_error_codes_and_the_server_carries_on(
    server: Server, client: Any, utterances: list[Utterance]
) -> None:
    content = speech.RecognitionAudio(content=flac(utterances[0].audio))
    english = speech.RecognitionConfig(language_code="en-US")
    with pytest.raises(exceptions.InvalidArgument, match="invalid model"):
        client.recognize(
            config=speech.RecognitionConfig(language_code="en-US", model="x"), audio=content
        )
    with pytest.raises(exceptions.InvalidArgument, match="MULAW"):
        client.recognize(
            config=speech.RecognitionConfig(
                encoding=Encoding.MULAW, sample_rate_hertz=8000, language_code="en-US"
            ),
            audio=content,
        )
    with pytest.raises(exceptions.InvalidArgument, match="uri"):
        client.recognize(config=english, audio=speech.RecognitionAudio(uri="gs://b/a.flac"))
    with pytest.raises(exceptions.InvalidArgument, match="language_code"):
        client.recognize(config=speech.RecognitionConfig(language_code="fr-FR"), audio=content)
    with pytest.raises(exceptions.InvalidArgument):
        client.recognize(config=english, audio=speech.RecognitionAudio(content=b"garbage"))
    with pytest.raises(exceptions.Unauthenticated):
        speech_client(server.target, token=None).recognize(config=english, audio=content)
    with pytest.raises(exceptions.Unauthenticated):
        speech_client(server.target, token="wrong").recognize(config=english, audio=content)
    with pytest.raises(exceptions.NotFound):
        client.transport.operations_client.get_operation("operations/nope")
    with pytest.raises(exceptions.InvalidArgument):  # streaming audio is LINEAR16
        config = speech.StreamingRecognitionConfig(
            config=speech.RecognitionConfig(encoding=Encoding.FLAC, language_code="en-US")
        )
        list(client.streaming_recognize(config, iter([]), timeout=30))
    # still serving
    response = client.recognize(config=english, audio=content)
    assert response.results[0].alternatives[0].transcript == utterances[0].text
    port = server.running.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    method = re.escape("google.cloud.speech.v1.Speech/Recognize")
    assert re.search(rf'asr_requests_total\{{code="OK",method="{method}"\}} [1-9]', text)
    assert re.search(rf'code="INVALID_ARGUMENT",method="{method}"\}} [1-9]', text)


def test_the_readmes_example_runs_as_written(
    server: Server,
    utterances: list[Utterance],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Drop-in: Google Cloud Speech-to-Text v1")[1]
    code = section.split("```python")[1].split("```")[0]
    # this test's server and token in place of make demo's plaintext one
    channel = (
        "grpc.secure_channel(TARGET, grpc.composite_channel_credentials("
        "grpc.local_channel_credentials(), grpc.access_token_call_credentials(TOKEN)))"
    )
    assert 'grpc.insecure_channel("localhost:50051")' in code
    code = code.replace('grpc.insecure_channel("localhost:50051")', channel)
    sf.write(tmp_path / "audio.flac", utterances[0].audio.numpy(), SAMPLE_RATE)
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    monkeypatch.setattr("sys.stdout", printed)
    exec(compile(code, "README.md", "exec"), {"TARGET": server.target, "TOKEN": TOKEN})
    lines = printed.getvalue().splitlines()
    text = utterances[0].text
    assert lines[:2] == [text, text]  # Recognize, LongRunningRecognize
    assert lines[-1] == f"final {text}" and any(line.startswith("interim ") for line in lines)


def test_over_tls_with_the_token_and_compressed_encodings(
    word_model: Bundle, utterances: list[Utterance], tmp_path: Path
) -> None:
    ca, cert, key = make_tls_files(tmp_path)
    config = ServerConfig(
        models=(("words", "<memory>"),),
        port=0,
        tls_cert=str(cert),
        tls_key=str(key),
        auth_token=TOKEN,
        max_concurrent_streams=2,
        workers=1,
    )
    srv = Server(config, [Model("words", Recognizer(word_model))])
    try:
        credentials = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(root_certificates=ca.read_bytes()),
            grpc.access_token_call_credentials(TOKEN),
        )
        channel = grpc.secure_channel(f"localhost:{srv.running.port}", credentials)
        client: Any = speech.SpeechClient(transport=SpeechGrpcTransport(channel=channel))
        utt = utterances[0]
        response = client.recognize(
            config=speech.RecognitionConfig(encoding=Encoding.FLAC, language_code="en-US"),
            audio=speech.RecognitionAudio(content=flac(utt.audio)),
        )
        assert response.results[0].alternatives[0].transcript == utt.text
        # Ogg Opus and MP3 are decoded from their containers (lossy: only that they decode
        # to the whole utterance is certain)
        duration = utt.audio.numel() / SAMPLE_RATE
        for encoding, fmt, subtype in (
            (Encoding.OGG_OPUS, "OGG", "OPUS"),
            (Encoding.MP3, "MP3", "MPEG_LAYER_III"),
        ):
            buf = io.BytesIO()
            sf.write(buf, utt.audio.numpy(), SAMPLE_RATE, format=fmt, subtype=subtype)
            response = client.recognize(
                config=speech.RecognitionConfig(encoding=encoding, language_code="en-US"),
                audio=speech.RecognitionAudio(content=buf.getvalue()),
            )
            end = response.total_billed_time.total_seconds()
            assert end == pytest.approx(duration, abs=0.1), fmt
    finally:
        srv.stop()
