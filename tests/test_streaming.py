"""StreamingSession on the trained word model: streamed finals equal whole-utterance decoding,
endpoints split segments at pauses with stream-relative times, and buffers stay bounded."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from asr.audio import SAMPLE_RATE
from asr.bundle import Bundle
from asr.decoding.options import DecodeOptions
from asr.models.bilstm_ctc import BiLSTMCTC
from asr.recognizer import Recognizer
from asr.streaming import EndpointConfig, StreamingSession, StreamResult
from tests.word_corpus import Utterance, WordCorpus, untrained_las

CHUNK = SAMPLE_RATE // 10  # 100 ms of audio per message, as a client would send


def stream(session: StreamingSession, audio: torch.Tensor) -> list[StreamResult]:
    results = []
    for start in range(0, audio.numel(), CHUNK):
        results += session.accept(audio[start : start + CHUNK])
    return results + session.finish()


@pytest.fixture(scope="module")
def utterances(word_corpus: WordCorpus) -> list[Utterance]:
    rng = random.Random(77)
    return [word_corpus.utterance(rng) for _ in range(6)]


def test_final_equals_whole_utterance_decoding(
    word_model: Bundle, utterances: list[Utterance]
) -> None:
    rec = Recognizer(word_model, DecodeOptions(method="beam"))
    for utt in utterances:
        feats = rec.features(utt.audio)
        [offline] = rec.decode(feats[None], torch.tensor([feats.shape[0]]))
        # Endpoint after 4 s: longer than any pause in these utterances.
        session = StreamingSession(rec, endpoint=EndpointConfig(trailing_silence=4.0))
        results = stream(session, utt.audio)
        finals = [r for r in results if r.is_final]
        assert len(finals) == 1
        assert finals[0].transcript.text == offline.text == utt.text
        assert finals[0].transcript.tokens == offline.tokens
        partials = [r for r in results if not r.is_final]
        assert partials and all(0.0 <= p.stability <= 1.0 for p in partials)
        # The last partial lacks only what the look-ahead holds back until the end.
        assert offline.text.startswith(partials[-1].transcript.text)
        ends = [r.end for r in results]
        assert ends == sorted(ends)


def test_second_pass_rescores_the_streamed_nbest_with_the_las(
    word_model: Bundle, utterances: list[Utterance]
) -> None:
    las = untrained_las(word_model, word_model.tokenizer)
    endpoint = EndpointConfig(trailing_silence=4.0)
    vocab = word_model.tokenizer.vocab_size
    # CTC weight 1: the untrained LAS's scores drop out, so a second pass that reads the
    # streamed posteriors and n-best of the right segment gives the first pass's result.
    second = {
        "rescore": DecodeOptions(method="rescore", ctc_weight=1.0, beam=4),
        "joint": DecodeOptions(
            method="joint", ctc_weight=1.0, joint_candidates=vocab, length_penalty=0.0, beam=4
        ),
    }
    first = Recognizer(word_model, DecodeOptions(method="beam", beam=4))
    for utt in utterances[:3]:
        [expected] = stream(
            StreamingSession(first, endpoint=endpoint, interim_results=False), utt.audio
        )
        for options in second.values():
            rec = Recognizer(word_model, options, rescorer=las)
            session = StreamingSession(rec, endpoint=endpoint, interim_results=False)
            [final] = stream(session, utt.audio)
            assert final.transcript.text == expected.transcript.text == utt.text
            assert final.transcript.words  # aligned to the streamed posteriors


def test_pauses_close_segments_with_stream_times(
    word_model: Bundle, utterances: list[Utterance]
) -> None:
    pause = torch.zeros(int(3.0 * SAMPLE_RATE))
    first, second = utterances[0], utterances[1]
    audio = torch.cat([first.audio, pause, second.audio])
    shift = (first.audio.numel() + pause.numel()) / SAMPLE_RATE
    session = StreamingSession(
        Recognizer(word_model), endpoint=EndpointConfig(trailing_silence=1.5)
    )
    finals = [r for r in stream(session, audio) if r.is_final]
    assert [f.transcript.text for f in finals] == [first.text, second.text]
    assert finals[0].end <= finals[1].start
    expected = [(w, s + shift, e + shift) for w, s, e in second.words]
    for timing, (word, start, end) in zip(finals[1].transcript.words, expected, strict=True):
        assert timing.word == word
        assert abs(timing.start - start) <= 0.1 and abs(timing.end - end) <= 0.1


def test_silence_before_speech_is_not_buffered(
    word_model: Bundle, utterances: list[Utterance]
) -> None:
    session = StreamingSession(Recognizer(word_model), interim_results=False)
    for _ in range(100):  # 10 s of silence
        assert session.accept(torch.zeros(CHUNK)) == []
    buffered = sum(r.shape[0] for r in session.raw)
    assert buffered <= 150  # about one trailing-silence window of 10 ms frames, not 1000
    finals = stream(session, utterances[2].audio)
    assert [f.transcript.text for f in finals] == [utterances[2].text]
    assert finals[0].start >= 9.0


def test_max_segment_cuts_long_speech(word_model: Bundle, utterances: list[Utterance]) -> None:
    audio = torch.cat([u.audio for u in utterances[:3]])
    session = StreamingSession(
        Recognizer(word_model),
        endpoint=EndpointConfig(trailing_silence=5.0, max_segment=2.0),
        interim_results=False,
    )
    finals = stream(session, audio)
    # Pauses are shorter than 5 s: only the 2 s limit cuts, and it does.
    assert any(abs(f.end - f.start - 2.0) < 1e-6 for f in finals)
    assert all(f.end - f.start <= 2.0 + 1e-6 for f in finals), [(f.start, f.end) for f in finals]


def test_streaming_needs_a_latency_controlled_ctc_model(word_model: Bundle) -> None:
    assert isinstance(word_model.model, BiLSTMCTC)
    offline = BiLSTMCTC(replace(word_model.model.config, chunk_size=0, right_context=0))
    bundle = replace(word_model, model=offline)
    assert Recognizer(word_model).can_stream and not Recognizer(bundle).can_stream
    with pytest.raises(ValueError, match="latency-controlled"):
        StreamingSession(Recognizer(bundle))
    session = StreamingSession(Recognizer(word_model))
    session.finish()
    with pytest.raises(RuntimeError, match="finished"):
        session.accept(torch.zeros(10))
