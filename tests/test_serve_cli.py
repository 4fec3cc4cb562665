"""`asr serve` and `asr client` as a user runs them: a real server process, a streamed file
with interim and final results, and a graceful stop on SIGTERM."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from asr.audio import save_flac
from asr.bundle import Bundle
from tests.certs import make_tls_files
from tests.word_corpus import WordCorpus, save_bundle, untrained_las


def test_serve_stream_and_stop(word_model: Bundle, word_corpus: WordCorpus, tmp_path: Path) -> None:
    bundle = save_bundle(word_model, tmp_path / "bundle")
    utt = word_corpus.utterance(random.Random(8))
    audio = tmp_path / "utt.flac"
    save_flac(audio, utt.audio)
    server = subprocess.Popen(
        [sys.executable, "-m", "asr.cli", "serve", "--model", f"words={bundle}", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stderr is not None
        line = server.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert match, (line, server.stderr.read() if server.poll() is not None else "")
        target = f"127.0.0.1:{match.group(1)}"
        client = [sys.executable, "-m", "asr.cli", "client", "--server", target]
        streamed = subprocess.run(
            [*client, "--stream", "--words", str(audio)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert streamed.returncode == 0, streamed.stderr
        assert "interim (stability" in streamed.stdout
        finals = [
            line.split("final: ", 1)[1]
            for line in streamed.stdout.splitlines()
            if "final: " in line
        ]
        assert " ".join(finals) == utt.text  # long pauses end segments: one final each
        unary = subprocess.run([*client, str(audio)], capture_output=True, text=True, timeout=120)
        assert unary.stdout.strip() == f"{audio}: {utt.text}"
        missing = subprocess.run(
            [*client, "--model", "nope", str(audio)], capture_output=True, text=True, timeout=120
        )
        assert missing.returncode == 1 and "NOT_FOUND: unknown model 'nope'" in missing.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            out, _ = server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            pytest.fail("the server did not stop within 30 s of SIGTERM")
    assert server.returncode == 0
    assert "stopping" in out


def test_serve_rejects_a_bad_model_argument(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "asr.cli", "serve", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "is not NAME=BUNDLE_DIR" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "asr.cli", "serve", "--model", f"x={tmp_path / 'none'}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "model bundle directory not found" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "asr.cli", "serve", "--model", "x=dir", "--right-context", "4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--right-context needs --chunk-size" in done.stderr


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
    server = subprocess.Popen(
        [
            *[sys.executable, "-m", "asr.cli", "serve", "--port", "0", "--log-format", "json"],
            *["--model", f"words={bundle}", "--rescore-model", f"words={las}"],
            *["--tls-cert", str(cert), "--tls-key", str(key)],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)", line)
        assert match, line
        client = [sys.executable, "-m", "asr.cli", "client", "--server", f"localhost:{match[1]}"]
        secure = subprocess.run(
            [*client, "--tls-ca", str(ca), "--stream", str(audio)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert secure.returncode == 0 and "final: " in secure.stdout, secure.stderr
        plain = subprocess.run([*client, str(audio)], capture_output=True, text=True, timeout=120)
        assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    serving = next(e for e in entries if e["message"] == "serving")
    assert serving["transport"] == "TLS" and serving["level"] == "INFO"
    streams = [e for e in entries if e.get("rpc") == "StreamingRecognize" and e["code"] == "OK"]
    assert streams and streams[0]["request_id"] and streams[0]["audio_s"] > 0
