"""Shared fixtures. Real data lives in ../shared beside the repository and is read in place."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from asr.bundle import Bundle
from asr.data.librispeech import prepare
from asr.data.manifest import read_manifest
from asr.data.synth import Sentence, Voice, synthesize_corpus
from asr.tokenizer import Tokenizer
from tests.word_corpus import WordCorpus, synthesize_clips, train_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
LIBRISPEECH_REAL = SHARED_DATA / "librispeech-real" / "LibriSpeech"
MINI_TEXT = SHARED_DATA / "text" / "librispeech-mini.txt"


@pytest.fixture(scope="session")
def librispeech_root() -> Path:
    if not LIBRISPEECH_REAL.is_dir():
        pytest.skip(f"real LibriSpeech sample not found at {LIBRISPEECH_REAL} (../shared absent)")
    return LIBRISPEECH_REAL


@pytest.fixture(scope="session")
def mini_text() -> Path:
    if not MINI_TEXT.is_file():
        pytest.skip(f"LibriSpeech text not found at {MINI_TEXT} (../shared absent)")
    return MINI_TEXT


@pytest.fixture(scope="session")
def real_flac(librispeech_root: Path) -> Path:
    return librispeech_root / "dev-clean" / "1988" / "24833" / "1988-24833-0000.flac"


@pytest.fixture(scope="session")
def word_corpus() -> WordCorpus:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (make system-deps installs it)")
    return synthesize_clips()


@pytest.fixture(scope="session")
def word_model(word_corpus: WordCorpus) -> Bundle:
    """A BiLSTM-CTC trained on the word corpus (about a minute on two cores)."""
    return train_model(word_corpus)


# The training tests' corpus: short sentences in one voice.
SENTENCES = [
    "THE CAT SAT ON THE MAT",
    "A DOG RAN HOME",
    "SHE SAW THE SEA",
    "WE WENT OUT AT NOON",
    "HE HAD A RED HAT",
    "IT WAS A COLD DAY",
    "THEY ATE SOME BREAD",
    "THE SUN IS HOT",
    "MY BOAT IS SLOW",
    "OPEN THE DOOR",
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ten-sentence espeak-ng corpus with manifest, character tokenizer and CMVN (the
    training tests')."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (make setup installs it)")
    root = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(
        [Sentence(s) for s in SENTENCES],
        [Voice.parse("espeak:en-us")],
        root / "LibriSpeech",
        "train-tiny",
        progress=False,
    )
    prepare(root / "LibriSpeech", ["train-tiny"], root / "manifests")
    manifest = root / "manifests" / "train-tiny.jsonl"
    texts = [u.text for u in read_manifest(manifest)]
    Tokenizer.train(texts, "char", 40).save(root / "tok.model")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run(
        [sys.executable, "-m", "asr.cli", "cmvn", "--manifest", str(manifest)]
        + ["--out", str(root / "cmvn.json"), "--jobs", "1"],
        check=True,
        env=env,
        capture_output=True,
    )
    return {"manifest": manifest, "tokenizer": root / "tok.model", "cmvn": root / "cmvn.json"}
