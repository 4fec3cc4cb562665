"""`asr serve` and `asr client` as a user runs them: a real server process, a streamed file
with interim and final results, and a graceful stop on SIGTERM."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asr.audio import save_flac
from asr.bundle import Bundle
from asr.cli import main
from tests.certs import make_tls_files
from tests.word_corpus import WordCorpus, save_bundle, untrained_las


@dataclass
class ServerProcess:
    """An `asr serve` process: its port once listening, its output once stopped."""

    process: subprocess.Popen[str]
    listening: str = ""  # the "listening on" line
    out: str = ""
    err: str = ""

    @property
    def target(self) -> str:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.listening)
        assert match, self.listening
        return f"127.0.0.1:{match.group(1)}"


@contextmanager
def serving(argv: list[str], **popen: Any) -> Iterator[ServerProcess]:
    """Run a server command until its "listening on" line; stop it with SIGTERM afterwards
    (it must exit within 30 s) and keep what it printed."""
    server = ServerProcess(
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    )
    process = server.process
    assert process.stdout is not None and process.stderr is not None
    try:
        server.listening = process.stdout.readline()
        if "listening on" not in server.listening:
            pytest.fail(f"no server: {server.listening}{process.stderr.read()}")
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            server.out, server.err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            pytest.fail("the server did not stop within 30 s of SIGTERM")


def streamed_text(stdout: str) -> str:
    """The final results `asr client --stream` printed, joined."""
    return " ".join(
        line.split("final: ", 1)[1] for line in stdout.splitlines() if "final: " in line
    )


def test_serve_stream_and_stop(word_model: Bundle, word_corpus: WordCorpus, tmp_path: Path) -> None:
    bundle = save_bundle(word_model, tmp_path / "bundle")
    utt = word_corpus.utterance(random.Random(8))
    audio = tmp_path / "utt.flac"
    save_flac(audio, utt.audio)
    serve = [sys.executable, "-m", "asr.cli", "serve", "--model", f"words={bundle}", "--port", "0"]
    with serving(serve) as server:
        target = server.target
        client = [sys.executable, "-m", "asr.cli", "client", "--server", target]
        streamed = subprocess.run(
            [*client, "--stream", "--words", str(audio)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert streamed.returncode == 0, streamed.stderr
        assert "interim (stability" in streamed.stdout
        assert streamed_text(streamed.stdout) == utt.text  # pauses end segments: one final each
        unary = subprocess.run([*client, str(audio)], capture_output=True, text=True, timeout=120)
        assert unary.stdout.strip() == f"{audio}: {utt.text}"
        missing = subprocess.run(
            [*client, "--model", "nope", str(audio)], capture_output=True, text=True, timeout=120
        )
        assert missing.returncode == 1 and "NOT_FOUND: unknown model 'nope'" in missing.stderr
    assert server.process.returncode == 0
    assert "stopping" in server.out


def test_serve_rejects_a_bad_model_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done = subprocess.run(  # one in a process of its own: the exit status
        [sys.executable, "-m", "asr.cli", "serve", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "is not NAME=PATH" in done.stderr
    for args, message in [
        (["--model", f"x={tmp_path / 'none'}"], "model bundle directory not found"),
        (["--model", "x=dir", "--right-context", "4"], "--right-context needs --chunk-size"),
    ]:
        code: int | str | None
        try:
            code = main(["serve", *args])
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2 and message in capsys.readouterr().err


def test_serve_rejects_an_empty_token_file(word_model: Bundle, tmp_path: Path) -> None:
    bundle = save_bundle(word_model, tmp_path / "bundle")
    empty = tmp_path / "token"
    empty.write_text("\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "asr.cli",
            "serve",
            "--model",
            f"w={bundle}",
            "--auth-token-file",
            str(empty),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "the token file is empty" in done.stderr


def test_serve_over_tls_with_json_logs_and_a_rescorer(
    word_model: Bundle, word_corpus: WordCorpus, tmp_path: Path
) -> None:
    bundle = save_bundle(word_model, tmp_path / "bundle")
    las = save_bundle(untrained_las(word_model, word_model.tokenizer), tmp_path / "las")
    ca, cert, key = make_tls_files(tmp_path)
    audio = tmp_path / "utt.flac"
    save_flac(audio, word_corpus.utterance(random.Random(9)).audio)
    serve = [
        *[sys.executable, "-m", "asr.cli", "serve", "--port", "0", "--log-format", "json"],
        *["--model", f"words={bundle}", "--rescore-model", f"words={las}"],
        *["--tls-cert", str(cert), "--tls-key", str(key)],
    ]
    with serving(serve) as server:
        assert "(TLS)" in server.listening
        port = server.target.rsplit(":", 1)[1]
        client = [sys.executable, "-m", "asr.cli", "client", "--server", f"localhost:{port}"]
        secure = subprocess.run(
            [*client, "--tls-ca", str(ca), "--stream", str(audio)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert secure.returncode == 0 and "final: " in secure.stdout, secure.stderr
        plain = subprocess.run([*client, str(audio)], capture_output=True, text=True, timeout=120)
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
    entries = [json.loads(line) for line in server.err.splitlines() if line.startswith("{")]
    started = next(e for e in entries if e["message"] == "serving")
    assert started["transport"] == "TLS" and started["level"] == "INFO"
    streams = [e for e in entries if e.get("rpc") == "StreamingRecognize" and e["code"] == "OK"]
    assert streams and streams[0]["request_id"] and streams[0]["audio_s"] > 0
