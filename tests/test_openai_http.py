"""The OpenAI-compatible HTTP API (`asr serve --http-port`) driven by the official `openai`
client and by curl as the README shows them: every response format, OpenAI's error shapes
and statuses, and a server that keeps serving after bad requests."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import random
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, cast

import openai
import pytest
import soundfile as sf
import srt
import torch

from asr.audio import SAMPLE_RATE
from asr.bundle import Bundle
from asr.recognizer import Recognizer
from server import openai_http
from server.config import ServerConfig
from server.servicer import Model
from tests.test_server import Server
from tests.word_corpus import Utterance, WordCorpus

TOKEN = "s3cret"
README = Path(__file__).resolve().parents[1] / "README.md"


def wav(audio: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio.numpy(), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def utterances(word_corpus: WordCorpus) -> list[Utterance]:
    rng = random.Random(17)
    return [word_corpus.utterance(rng) for _ in range(2)]


@pytest.fixture(scope="module")
def server(word_model: Bundle) -> Iterator[Server]:
    config = ServerConfig(
        models=(("words", "<memory>"),),
        port=0,
        http_port=0,
        auth_token=TOKEN,
        max_message_bytes=1_000_000,
        max_unary_seconds=20.0,
        max_concurrent_streams=4,
        metrics_port=0,
        workers=1,
    )
    srv = Server(config, [Model("words", Recognizer(word_model))])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def base_url(server: Server) -> str:
    assert server.running.http is not None
    return f"http://127.0.0.1:{server.running.http.port}/v1"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0)


@pytest.fixture(scope="module")
def audio_file(tmp_path_factory: pytest.TempPathFactory, utterances: list[Utterance]) -> Path:
    path = tmp_path_factory.mktemp("http") / "utterance.wav"
    path.write_bytes(wav(utterances[0].audio))
    return path


def transcribe(client: openai.OpenAI, path: Path, **kwargs: Any) -> Any:
    with path.open("rb") as f:
        return client.audio.transcriptions.create(file=f, **kwargs)


def test_every_response_format_through_the_openai_client(
    client: openai.OpenAI, audio_file: Path, utterances: list[Utterance]
) -> None:
    text = utterances[0].text
    assert transcribe(client, audio_file, model="words").text == text
    assert transcribe(client, audio_file, model="", response_format="text") == text + "\n"
    cues = list(
        srt.parse(str(transcribe(client, audio_file, model="words", response_format="srt")))
    )
    assert " ".join(c.content for c in cues) == text
    vtt = str(transcribe(client, audio_file, model="words", response_format="vtt"))
    assert vtt.startswith("WEBVTT\n\n") and " --> " in vtt
    verbose = transcribe(
        client,
        audio_file,
        model="words",
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
        temperature=0.0,
        language="en",
        prompt="ignored",
    )
    assert verbose.text == text
    assert verbose.language == "english"
    duration = utterances[0].audio.numel() / SAMPLE_RATE
    assert verbose.duration == pytest.approx(duration, abs=0.01)
    words = verbose.words
    assert " ".join(w.word for w in words) == text
    for word, (expected, start, end) in zip(words, utterances[0].words, strict=True):
        assert word.word == expected
        assert word.start <= word.end
        assert abs((word.start + word.end) / 2 - (start + end) / 2) < 0.3  # where it was said
    segments = verbose.segments
    assert " ".join(s.text for s in segments) == text
    assert [s.id for s in segments] == list(range(len(segments)))
    assert all(s.tokens and s.avg_logprob <= 0 and s.start < s.end for s in segments)
    # segment granularity alone (the default): no words
    plain = transcribe(client, audio_file, model="words", response_format="verbose_json")
    assert plain.words is None and plain.segments


def test_models_are_listed_and_retrieved(client: openai.OpenAI) -> None:
    listed = client.models.list()
    assert [m.id for m in listed.data] == ["words"]
    assert listed.data[0].object == "model" and listed.data[0].owned_by == "asr"
    assert client.models.retrieve("words").id == "words"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("whisper-1")


def test_errors_come_in_openais_shape_and_the_server_carries_on(
    client: openai.OpenAI, base_url: str, audio_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(openai.AuthenticationError) as auth:
        transcribe(
            openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0),
            audio_file,
            model="words",
        )
    assert auth.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as unknown:
        transcribe(client, audio_file, model="whisper-1")
    assert unknown.value.code == "model_not_found"
    assert "words" in str(unknown.value.body)  # it says what there is
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"RIFF not a wav at all")
    with pytest.raises(openai.BadRequestError) as audio:
        transcribe(client, bad, model="words")
    assert audio.value.code == "invalid_audio" and "noise.wav" in str(audio.value.body)
    with pytest.raises(openai.BadRequestError) as fmt:
        transcribe(client, audio_file, model="words", response_format="mp3")
    body = cast(dict[str, Any], fmt.value.body)  # the client unwraps {"error": ...}
    assert body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as language:
        transcribe(client, audio_file, model="words", language="fr")
    assert language.value.code == "unsupported_language"
    with pytest.raises(openai.BadRequestError):  # timestamps need verbose_json, as OpenAI's
        transcribe(client, audio_file, model="words", timestamp_granularities=["word"])
    big = tmp_path / "big.wav"
    big.write_bytes(wav(torch.zeros(SAMPLE_RATE * 40)))  # 1.3 MB > --max-message-bytes
    with pytest.raises(openai.APIStatusError) as large:
        transcribe(client, big, model="words")
    assert large.value.status_code == 413
    # still serving
    assert transcribe(client, audio_file, model="words").text


def http(url: str, *, token: str | None = TOKEN) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def test_over_capacity_and_draining_ask_the_client_to_retry(
    server: Server, base_url: str, client: openai.OpenAI, audio_file: Path
) -> None:
    assert server.running.http is not None
    api = server.running.http.api
    api.in_flight = server.running.servicer.config.max_http_requests
    try:
        with pytest.raises(openai.RateLimitError) as limited:
            transcribe(client, audio_file, model="words")
        assert limited.value.response.headers["retry-after"] == "1"
    finally:
        api.in_flight = 0
    api.draining = True
    try:
        status, headers, body = http(f"{base_url}/models")
        assert status == 503 and headers["retry-after"] == "1"
        assert body["error"]["type"] == "server_error"
    finally:
        api.draining = False
    status, _, body = http(f"{base_url}/nowhere")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    assert http(f"{base_url}/models", token=None)[0] == 401


def test_requests_are_counted_in_the_metrics(server: Server, client: openai.OpenAI) -> None:
    client.models.list()
    port = server.running.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    assert re.search(r'asr_requests_total\{code="200",method="ListModels"\} [1-9]', text)
    assert re.search(r'asr_requests_total\{code="200",method="CreateTranscription"\} [1-9]', text)


def readme_curl() -> list[str]:
    """The README's curl commands for the HTTP API (its "Drop-in" section)."""
    section = README.read_text().split("<!-- openai-curl -->")[1]
    block = section.split("```")[1]
    commands = " ".join(line.rstrip("\\") for line in block.splitlines()[1:])
    return [c.strip() for c in commands.split("curl ") if c.strip()]


def readme_python() -> str:
    """The README's Python example for the HTTP API."""
    section = README.read_text().split("### Drop-in: the OpenAI transcription API")[1]
    return section.split("```python")[1].split("```")[0]


def test_the_readmes_python_example_runs_as_written(
    base_url: str, utterances: list[Utterance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sf.write(tmp_path / "audio.flac", utterances[0].audio.numpy(), SAMPLE_RATE)
    monkeypatch.chdir(tmp_path)
    code = readme_python().replace("http://localhost:8000/v1", base_url)
    code = code.replace('api_key="unused"', f"api_key={TOKEN!r}").replace('"ctc"', '"words"')
    printed = io.StringIO()
    monkeypatch.setattr("sys.stdout", printed)
    exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue().startswith(utterances[0].text + " ")


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_the_readmes_curl_examples_run_as_written(
    base_url: str, utterances: list[Utterance], tmp_path: Path
) -> None:
    # The README's commands against `make demo`'s server, with this test's port, file, model
    # and token in their places.
    sf.write(tmp_path / "audio.flac", utterances[0].audio.numpy(), SAMPLE_RATE)
    outputs = []
    for command in readme_curl():
        command = command.replace("http://localhost:8000/v1", base_url)
        command = command.replace("model=ctc", "model=words")
        run = subprocess.run(
            f"curl --fail-with-body -sS -H 'authorization: Bearer {TOKEN}' {command}",
            shell=True,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, (command, run.stdout, run.stderr)
        outputs.append(run.stdout)
    assert len(outputs) >= 3
    assert any('"object":"list"' in out for out in outputs)
    assert any(" --> " in out for out in outputs)
    assert any(utterances[0].text in out for out in outputs)


def post(base_url: str, body: bytes | Iterator[bytes], headers: dict[str, str]) -> tuple[int, Any]:
    """A raw POST to the transcriptions route (chunked when `body` is an iterator)."""
    url = urllib.parse.urlsplit(base_url)
    connection = HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        chunked = not isinstance(body, bytes)
        connection.request(
            "POST",
            f"{url.path}/audio/transcriptions",
            body=body,
            headers={"authorization": f"Bearer {TOKEN}", **headers},
            encode_chunked=chunked,
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_hostile_forms_get_clear_errors(base_url: str, audio_file: Path) -> None:
    boundary = "b0undary"
    multipart = {"content-type": f"multipart/form-data; boundary={boundary}"}

    def part(name: str, data: bytes, filename: str | None = None) -> bytes:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        return (
            f"--{boundary}\r\ncontent-disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
        )

    audio = audio_file.read_bytes()
    two_files = (
        part("file", audio, "a.wav") + part("file", audio, "b.wav") + f"--{boundary}--\r\n".encode()
    )
    status, body = post(base_url, two_files, multipart)
    assert status == 400 and "files" in body["error"]["message"]
    status, body = post(base_url, b"garbage", multipart)
    assert status == 400 and body["error"]["message"].startswith("bad multipart form")
    status, body = post(base_url, b'{"file": "x"}', {"content-type": "application/json"})
    assert status == 400 and "multipart/form-data" in body["error"]["message"]
    # no content-length: the limit holds while the body streams in
    head = part("file", b"", "big.wav")[:-2]  # one file part whose data keeps coming
    endless = itertools.chain([head], (b"\0" * 100_000 for _ in range(30)))
    status, body = post(base_url, endless, multipart)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    ok = part("file", audio, "a.wav") + f"--{boundary}--\r\n".encode()
    status, body = post(base_url, ok, multipart)
    assert status == 200 and body["text"]


def test_a_drain_answers_503_then_cuts_off_what_outlives_the_grace(
    word_model: Bundle, audio_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real = openai_http.load_audio

    def slow(*args: Any, **kwargs: Any) -> Any:  # a request that outlives the grace
        gate.wait(20)
        return real(*args, **kwargs)

    monkeypatch.setattr(openai_http, "load_audio", slow)
    config = ServerConfig(
        models=(("words", "<memory>"),), port=0, http_port=0, max_concurrent_streams=2, workers=1
    )
    srv = Server(config, [Model("words", Recognizer(word_model))])
    assert srv.running.http is not None
    api, base = srv.running.http.api, f"http://127.0.0.1:{srv.running.http.port}/v1"
    client = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=20)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(transcribe, client, audio_file, model="words")
        for _ in range(200):
            if api.in_flight:
                break
            time.sleep(0.05)
        began = time.monotonic()
        stopping = asyncio.run_coroutine_threadsafe(srv.running.stop(1.0), srv.loop)
        while not api.draining:
            time.sleep(0.01)
        status, headers, _ = http(f"{base}/models", token=None)
        assert status == 503 and headers["retry-after"] == "1"
        stopping.result(timeout=20)
        assert time.monotonic() - began < 5  # the grace and the cut-off, not the request
        gate.set()
        with pytest.raises(openai.APIError):  # cut off: no transcript
            pending.result(timeout=30)
    srv.loop.call_soon_threadsafe(srv.loop.stop)
    srv.thread.join(timeout=10)
