from __future__ import annotations

from pathlib import Path

import pytest

from asr.text import normalize_text
from asr.tokenizer import BLANK_ID, SOS_EOS_ID, UNK_ID, Tokenizer


@pytest.fixture(scope="module")
def sentences(mini_text: Path) -> list[str]:
    return [normalize_text(line.split(" ", 1)[1]) for line in mini_text.read_text().splitlines()]


@pytest.mark.parametrize(("kind", "vocab"), [("unigram", 256), ("bpe", 500), ("char", 64)])
def test_round_trip_and_reserved_ids(sentences: list[str], kind: str, vocab: int, tmp_path: Path):
    tok = Tokenizer.train(sentences, kind, vocab)  # type: ignore[arg-type]
    assert tok.kind == kind
    assert (tok.piece(BLANK_ID), tok.piece(UNK_ID), tok.piece(SOS_EOS_ID)) == (
        "<blank>",
        "<unk>",
        "<sos/eos>",
    )
    if kind != "char":
        assert tok.vocab_size == vocab
    for text in sentences:
        ids = tok.encode(text)
        assert BLANK_ID not in ids and SOS_EOS_ID not in ids and UNK_ID not in ids
        assert tok.decode(ids) == text
    path = tmp_path / "tok.model"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.encode(sentences[0]) == tok.encode(sentences[0])
    assert loaded.vocab_size == tok.vocab_size and loaded.kind == kind


def test_decode_skips_blank_and_sos_eos(sentences: list[str]) -> None:
    tok = Tokenizer.train(sentences, "unigram", 128)
    ids = tok.encode("THE CAT")
    noisy = [BLANK_ID, SOS_EOS_ID, *ids[:1], BLANK_ID, *ids[1:], SOS_EOS_ID]
    assert tok.decode(noisy) == "THE CAT"


def test_unknown_characters_map_to_unk(sentences: list[str]) -> None:
    tok = Tokenizer.train(sentences, "char", 64)
    assert UNK_ID in tok.encode("THE Q#Z")


def test_training_is_deterministic(sentences: list[str]) -> None:
    a = Tokenizer.train(sentences[:500], "unigram", 100)
    b = Tokenizer.train(sentences[:500], "unigram", 100)
    assert [a.piece(i) for i in range(100)] == [b.piece(i) for i in range(100)]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        Tokenizer.train(["A B"], "word", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no text"):
        Tokenizer.train([], "unigram", 10)
    with pytest.raises(ValueError, match="vocab size 5000"):
        Tokenizer.train(["A TINY CORPUS"] * 10, "unigram", 5000)
    (tmp_path / "junk.model").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk\.model"):
        Tokenizer.load(tmp_path / "junk.model")
    with pytest.raises(ValueError, match=r"missing\.model"):
        Tokenizer.load(tmp_path / "missing.model")


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Hello, World!", "HELLO WORLD"),
        ("  don't   stop\tNOW ", "DON'T STOP NOW"),
        ("\u2018quoted\u2019 na\u00efve caf\u00e9", "QUOTED NAIVE CAFE"),
        ("MISTER QUILTER IS THE APOSTLE", "MISTER QUILTER IS THE APOSTLE"),
        ("--- ...", ""),
    ],
)
def test_normalize_text(raw: str, normalized: str) -> None:
    assert normalize_text(raw) == normalized
