"""Subword and character tokenizers over sentencepiece, with fixed ids for special symbols.

Every kind (unigram, BPE, character) is a sentencepiece model, so a tokenizer is always one
self-contained `.model` file and loading never depends on how it was trained.

Reserved ids, the same for every tokenizer, so models and decoders can rely on them:
    0  <blank>    CTC blank (sentencepiece's pad slot, never produced by encode)
    1  <unk>      unknown
    2  <sos/eos>  attention start and end of sentence (one symbol for both, as in ESPnet)
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb

BLANK_ID = 0
UNK_ID = 1
SOS_EOS_ID = 2
TokenizerKind = Literal["unigram", "bpe", "char"]
KINDS: tuple[TokenizerKind, ...] = ("unigram", "bpe", "char")


class Tokenizer:
    """Text <-> token ids. Build with `Tokenizer.train` or `Tokenizer.load`."""

    blank_id = BLANK_ID
    unk_id = UNK_ID
    sos_id = SOS_EOS_ID
    eos_id = SOS_EOS_ID

    def __init__(self, model_proto: bytes) -> None:
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        pieces = [self._sp.id_to_piece(i) for i in range(3)]
        if pieces != ["<blank>", "<unk>", "<sos/eos>"]:
            raise ValueError(f"not an asr tokenizer: reserved ids 0-2 are {pieces}")
        self._special = {BLANK_ID, UNK_ID, SOS_EOS_ID}

    @classmethod
    def train(cls, texts: Iterable[str], kind: TokenizerKind, vocab_size: int) -> Tokenizer:
        """Train on normalised sentences. `vocab_size` counts the three reserved symbols;
        for `char` it is an upper bound (the vocabulary is the characters seen)."""
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
        sentences = [t for t in texts if t.strip()]
        if not sentences:
            raise ValueError("no text to train a tokenizer on")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                model_type=kind,
                vocab_size=vocab_size,
                pad_id=BLANK_ID,
                pad_piece="<blank>",
                unk_id=UNK_ID,
                bos_id=-1,
                eos_id=-1,
                control_symbols=["<sos/eos>"],
                # Text is normalised before it gets here; identity keeps decode(encode(x)) == x.
                normalization_rule_name="identity",
                character_coverage=1.0,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                num_threads=1,  # deterministic output for the same input
                minloglevel=2,
            )
        except RuntimeError as err:
            raise ValueError(
                f"cannot train a {kind} tokenizer with vocab size {vocab_size} on "
                f"{len(sentences)} sentences: {err}"
            ) from err
        return cls(model.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        try:
            proto = Path(path).read_bytes()
            return cls(proto)
        except (OSError, RuntimeError, ValueError) as err:
            raise ValueError(f"{path}: cannot load tokenizer ({err})") from err

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self._proto)

    @property
    def kind(self) -> str:
        """ "unigram", "bpe" or "char", read from the model's own trainer spec."""
        proto = sp_pb.ModelProto.FromString(self._proto)  # type: ignore[attr-defined]
        spec = sp_pb.TrainerSpec  # type: ignore[attr-defined]
        return str(spec.ModelType.Name(proto.trainer_spec.model_type)).lower()

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; blank and sos/eos are skipped (a CTC or attention output may hold them)."""
        kept = [int(i) for i in ids if int(i) not in self._special or int(i) == UNK_ID]
        return str(self._sp.decode(kept))

    def piece(self, token_id: int) -> str:
        return str(self._sp.id_to_piece(token_id))

    def pieces(self) -> list[str]:
        """Every unit, by id (two tokenizers with equal pieces give the same ids)."""
        return [self.piece(i) for i in range(self.vocab_size)]
