"""The server image's run steps without Docker: docker/entrypoint.sh serving the bundles under a
models directory, the HEALTHCHECK command (`python -m asr.healthcheck`), a client, and a
graceful stop. `make docker-check` runs these against a fresh `make install-runtime` virtualenv
(ASR_DEPLOY_VENV); otherwise they use the current one."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asr.audio import save_flac
from asr.bundle import Bundle
from tests.test_serve_cli import serving, streamed_text
from tests.word_corpus import WordCorpus, save_bundle

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
BIN = Path(os.environ.get("ASR_DEPLOY_VENV", Path(sys.executable).parent.parent)) / "bin"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASR_")}
    return env | {"PATH": f"{BIN}:{env.get('PATH', '')}"} | extra


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd outside the repository: `python -m` must import the installed package, not ./asr.
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)


def test_the_package_comes_from_the_tested_environment(tmp_path: Path) -> None:
    done = _run([str(BIN / "python"), "-c", "import asr, server; print(asr.__file__)"], tmp_path)
    assert done.returncode == 0, done.stderr
    if "ASR_DEPLOY_VENV" in os.environ:  # the installed wheel, not the source tree
        assert done.stdout.startswith(os.environ["ASR_DEPLOY_VENV"]), done.stdout


def test_healthcheck_without_a_server(tmp_path: Path) -> None:
    done = _run(
        [str(BIN / "python"), "-m", "asr.healthcheck", "--server", "127.0.0.1:1", "--timeout", "2"],
        tmp_path,
    )
    assert done.returncode == 1 and "UNAVAILABLE" in done.stdout


def test_entrypoint_needs_a_bundle(tmp_path: Path) -> None:
    done = subprocess.run(
        ["sh", str(ENTRYPOINT)],
        cwd=tmp_path,
        env=_env(ASR_MODELS=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and f"no model bundle under {tmp_path}" in done.stderr


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_entrypoint_serves_mounted_bundles(
    word_model: Bundle, word_corpus: WordCorpus, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    save_bundle(word_model, models / "words")
    (models / "a-copy").symlink_to(models / "words")
    (models / "not-a-bundle").mkdir()
    utt = word_corpus.utterance(random.Random(3))
    audio = tmp_path / "utt.flac"
    save_flac(audio, utt.audio)
    env = _env(
        ASR_MODELS=str(models), ASR_DEFAULT_MODEL="words", ASR_HOST="127.0.0.1", ASR_PORT="0"
    )
    with serving(["sh", str(ENTRYPOINT), "--max-streams", "4"], cwd=tmp_path, env=env) as server:
        # the default model first, then the others by name; directories without a bundle skipped
        names = server.listening.split(" with ", 1)[1].strip()
        assert names == f"words={models / 'words'}, a-copy={models / 'a-copy'}"
        target = server.target
        health = _run(
            [str(BIN / "python"), "-m", "asr.healthcheck", "--server", target, "--wait", "60"],
            tmp_path,
        )
        assert health.returncode == 0 and health.stdout.strip() == f"{target}: SERVING"
        streamed = _run(
            [str(BIN / "asr"), "client", "--server", target, "--stream", str(audio)], tmp_path
        )
        assert streamed.returncode == 0, streamed.stderr
        assert streamed_text(streamed.stdout) == utt.text
    # exec: the signal reached `asr serve` itself, not a shell
    assert server.process.returncode == 0
