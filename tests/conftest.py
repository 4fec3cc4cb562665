"""Shared fixtures. Real data lives in ../shared beside the repository and is read in place."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from asr.bundle import Bundle
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
