"""A client written by others: Node.js @grpc/grpc-js with @grpc/proto-loader (from npm) runs
Recognize and a streaming call against the server and gets the transcript."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from asr.audio import save_flac
from asr.bundle import Bundle
from asr.recognizer import Recognizer
from server.config import ServerConfig
from server.servicer import Model
from tests.conftest import REPO
from tests.test_server import Server
from tests.word_corpus import WordCorpus

NODE_DIR = REPO / "tests" / "node"


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (make system-deps installs them)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"npm ci failed: {done.stderr[-2000:]}"
    return NODE_DIR / "node_modules"


@pytest.fixture(scope="module")
def server(word_model: Bundle) -> Iterator[Server]:
    config = ServerConfig(models=(("words", "<memory>"),), port=0)
    srv = Server(config, [Model("words", Recognizer(word_model))])
    yield srv
    srv.stop()


def test_node_client_recognizes_and_streams(
    node_modules: Path, server: Server, word_corpus: WordCorpus, tmp_path: Path
) -> None:
    utt = word_corpus.utterance(random.Random(12))
    flac, pcm = tmp_path / "utt.flac", tmp_path / "utt.pcm"
    save_flac(flac, utt.audio)
    pcm.write_bytes((utt.audio.clamp(-1, 1) * 32767).to(torch.int16).numpy().tobytes())
    done = subprocess.run(
        ["node", "client.mjs", server.target, str(REPO / "proto"), str(flac), str(pcm)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["recognize"] == utt.text
    assert result["words"] == len(utt.words)
    assert " ".join(result["stream_finals"]) == utt.text
    assert result["interim"] > 0
