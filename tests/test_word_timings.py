"""Word timings against known boundaries, and our CTC beam search against flashlight-text, on
a small model trained on single-word clips joined by silences of known length."""

from __future__ import annotations

import random

import pytest
import torch

from asr.bundle import Bundle
from asr.decoding.alignment import _runs, speech_frames, word_timings
from asr.decoding.ctc import CTCPrefixBeamSearch
from asr.decoding.options import DecodeOptions
from asr.models.bilstm_ctc import BiLSTMCTC
from asr.recognizer import Recognizer
from tests.word_corpus import Utterance, WordCorpus

TOLERANCE_S = 0.1


@pytest.fixture(scope="module")
def held_out(word_corpus: WordCorpus) -> list[Utterance]:
    rng = random.Random(1234)  # training used seed 0: new arrangements and silences
    return [word_corpus.utterance(rng) for _ in range(40)]


def _log_probs(
    bundle: Bundle, feats: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    assert isinstance(bundle.model, BiLSTMCTC)
    with torch.no_grad():
        return bundle.model.log_probs(feats, lengths)


def _batch(rec: Recognizer, utterances: list[Utterance]) -> tuple[torch.Tensor, torch.Tensor]:
    feats = [rec.features(u.audio) for u in utterances]
    lengths = torch.tensor([f.shape[0] for f in feats])
    return torch.nn.utils.rnn.pad_sequence(feats, batch_first=True), lengths


def test_word_timings_match_known_boundaries(word_model: Bundle, held_out: list[Utterance]) -> None:
    rec = Recognizer(word_model, DecodeOptions(method="beam"))
    transcripts = rec.decode(*_batch(rec, held_out))
    correct = [(u, t) for u, t in zip(held_out, transcripts, strict=True) if t.text == u.text]
    assert len(correct) >= 0.9 * len(held_out), "the test model should transcribe these"
    for utt, transcript in correct:
        assert [w.word for w in transcript.words] == [w for w, _, _ in utt.words]
        for timing, (word, start, end) in zip(transcript.words, utt.words, strict=True):
            assert timing.start == pytest.approx(start, abs=TOLERANCE_S), (word, utt.words)
            assert timing.end == pytest.approx(end, abs=TOLERANCE_S), (word, utt.words)
            assert 0.0 <= timing.confidence <= 1.0


def test_forced_alignment_of_the_reference_text(
    word_model: Bundle, held_out: list[Utterance]
) -> None:
    rec = Recognizer(word_model)
    feats, lengths = _batch(rec, held_out)
    log_probs, out_lens = _log_probs(word_model, feats, lengths)
    for b, utt in enumerate(held_out):
        words = word_timings(
            log_probs[b, : int(out_lens[b])],
            word_model.tokenizer.encode(utt.text),
            word_model.tokenizer,
            rec.frame_seconds,
            4,  # the model's x4 subsampling
            feats[b, : int(lengths[b])].mean(dim=-1),
        )
        starts = [w.start for w in words]
        assert starts == sorted(starts)
        for timing, (_, start, end) in zip(words, utt.words, strict=True):
            assert abs(timing.start - start) <= TOLERANCE_S
            assert abs(timing.end - end) <= TOLERANCE_S


def test_beam_search_agrees_with_flashlight(word_model: Bundle, word_corpus: WordCorpus) -> None:
    decoder_module = pytest.importorskip("torchaudio.models.decoder")
    pytest.importorskip("flashlight.lib.text", reason="flashlight-text not installed")
    rng = random.Random(99)
    utterances = [word_corpus.utterance(rng) for _ in range(100)]
    rec = Recognizer(word_model)
    feats, lengths = _batch(rec, utterances)
    log_probs, out_lens = _log_probs(word_model, feats, lengths)
    tokenizer = word_model.tokenizer
    pieces = tokenizer.pieces()
    peer = decoder_module.ctc_decoder(
        lexicon=None,
        tokens=pieces,
        beam_size=10,
        blank_token=pieces[tokenizer.blank_id],
        sil_token=pieces[tokenizer.unk_id],
        log_add=True,
    )
    theirs = [
        [t for t in r[0].tokens.tolist() if t != tokenizer.unk_id]
        for r in peer(log_probs.contiguous(), out_lens.int())
    ]
    search = CTCPrefixBeamSearch(DecodeOptions(beam=10))
    ours = [list(h[0].tokens) for h in search(log_probs, out_lens)]
    agree = sum(a == b for a, b in zip(ours, theirs, strict=True))
    assert agree >= 99


def test_speech_runs() -> None:
    speech = torch.tensor([False] * 10 + [True] * 10 + [False] * 10)
    assert _runs(speech) == [(10, 20)]
    assert _runs(torch.ones(3, dtype=torch.bool)) == [(0, 3)]
    assert _runs(torch.zeros(3, dtype=torch.bool)) == []


def test_short_pauses_inside_words_count_as_speech() -> None:
    energy = torch.full((100,), -20.0)
    energy[20:40] = -3.0
    energy[45:60] = -3.0  # a 5-frame closure: bridged
    energy[75:90] = -3.0  # a 15-frame pause: kept
    assert _runs(speech_frames(energy)) == [(20, 60), (75, 90)]
