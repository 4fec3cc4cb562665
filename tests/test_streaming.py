"""StreamingSession on the trained word model: streamed finals equal whole-utterance decoding,
endpoints split segments at pauses with stream-relative times, and buffers stay bounded."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from asr.audio import SAMPLE_RATE
from asr.bundle import Bundle
from asr.decoding.options import DecodeOptions
from asr.models.bilstm_ctc import BiLSTMCTC
from asr.recognizer import Recognizer
from asr.streaming import EndpointConfig, StreamingSession, StreamResult, accept_streams
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
        # The last partial lacks only what the right context holds back until the end.
        last = partials[-1]
        committed = last.transcript.tokens[: len(last.transcript.tokens) - last.provisional]
        assert offline.tokens[: len(committed)] == committed
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


def test_streams_accepted_together_get_their_results_alone(
    word_model: Bundle, utterances: list[Utterance]
) -> None:
    # Six streams (two recognizer options, so two batches; pauses, so segments end inside
    # the batch; different chunk sizes; two joining late, the shortest leaving early) fed
    # through accept_streams side by side give each the results it gets alone.
    pause = torch.zeros(int(1.5 * SAMPLE_RATE))
    beam = Recognizer(word_model, DecodeOptions(method="beam", beam=4))
    greedy = Recognizer(word_model, DecodeOptions(method="greedy"))
    endpoint = EndpointConfig(trailing_silence=1.0)
    audios = [
        torch.cat([utterances[i].audio, pause, utterances[(i + 1) % 6].audio])
        if i % 2
        else utterances[i].audio
        for i in range(6)
    ]
    chunks = [CHUNK, CHUNK // 2, 3 * CHUNK, CHUNK, 2 * CHUNK, CHUNK]
    starts = [0, 0, 3, 0, 7, 1]  # the round a stream's first chunk comes in
    recognizers = [beam, greedy, beam, beam, greedy, beam]

    def session(i: int) -> StreamingSession:
        return StreamingSession(recognizers[i], endpoint=endpoint)

    def key(results: list[StreamResult]) -> list[tuple[object, ...]]:
        return [
            (r.is_final, r.transcript.text, r.transcript.tokens, r.start, r.end) for r in results
        ]

    alone = []
    for i, audio in enumerate(audios):
        one, results = session(i), []
        for start in range(0, audio.numel(), chunks[i]):
            results += one.accept(audio[start : start + chunks[i]])
        alone.append(results + one.finish())
    sessions = [session(i) for i in range(6)]
    together: list[list[StreamResult]] = [[] for _ in range(6)]
    fed, round_ = [0] * 6, 0
    while any(not s.finished for s in sessions):
        now = [i for i in range(6) if round_ >= starts[i] and not sessions[i].finished]
        feeding = [i for i in now if fed[i] < audios[i].numel()]
        pieces = [audios[i][fed[i] : fed[i] + chunks[i]] for i in feeding]
        batched = accept_streams([sessions[i] for i in feeding], pieces)
        for i, results in zip(feeding, batched, strict=True):
            together[i] += results
            fed[i] += chunks[i]
        for i in set(now) - set(feeding):  # out of audio: leaves the batch
            together[i] += sessions[i].finish()
        round_ += 1
    for i in range(6):
        assert key(together[i]) == key(alone[i]), i
        stabilities = [r.stability for r in together[i]]
        assert stabilities == pytest.approx([r.stability for r in alone[i]], abs=1e-3)
    assert sum(r.is_final for r in together[1]) == 2  # a segment ended mid-stream
    with pytest.raises(ValueError, match="once"):
        twice = session(0)
        accept_streams([twice, twice], [torch.zeros(CHUNK), torch.zeros(CHUNK)])


def test_partials_read_the_right_context_ahead_of_the_search(
    word_model: Bundle, utterances: list[Utterance]
) -> None:
    # With the look-ahead, a partial is the search's best prefix followed by
    # the best path through the encoder's provisional right-context frames: the prefix is
    # the partial a session without it gives at that point, the finals are the same, and no
    # word of the final shows complete (another word after it) later, some sooner.
    recognizer = Recognizer(word_model, DecodeOptions(method="beam", beam=4))
    assert isinstance(word_model.model, BiLSTMCTC)
    context = word_model.model.config.right_context
    endpoint = EndpointConfig(trailing_silence=4.0)
    sooner = 0

    def shown(log: list[tuple[int, StreamResult]], words: list[str]) -> list[int | None]:
        """The chunk at which each word of the final (but the last) first shows complete."""
        said = [(i, r.transcript.text.split()) for i, r in log]
        return [
            next((i for i, w in said if w[: k + 1] == words[: k + 1] and len(w) > k + 1), None)
            for k in range(len(words) - 1)
        ]

    for utt in utterances:
        runs = []
        for lookahead in (False, True):
            # one segment: an endpoint longer than any pause in these utterances
            session = StreamingSession(recognizer, endpoint=endpoint, lookahead=lookahead)
            log = []  # (chunk index, result)
            for i, start in enumerate(range(0, utt.audio.numel(), CHUNK)):
                log += [(i, r) for r in session.accept(utt.audio[start : start + CHUNK])]
            runs.append((log, session.finish()))
        (plain, plain_finals), (ahead, ahead_finals) = runs
        assert [f.transcript for f in ahead_finals] == [f.transcript for f in plain_finals]
        assert all(r.provisional == 0 for _, r in plain)
        for i, result in ahead:
            tokens, extra = result.transcript.tokens, result.provisional
            assert 0 <= extra <= context and 0.0 <= result.stability <= 1.0
            # (before the best path has speech, the session without it shows nothing)
            if before := [r.transcript.tokens for j, r in plain if j <= i]:
                assert tokens[: len(tokens) - extra] == before[-1]
        words = " ".join(f.transcript.text for f in plain_finals).split()
        for without, with_ in zip(shown(plain, words), shown(ahead, words), strict=True):
            if without is not None:
                assert with_ is not None and with_ <= without
                sooner += with_ < without
    assert sooner > 0


def test_streams_ending_in_a_batch_get_their_finals_alone(
    word_model: Bundle, utterances: list[Utterance]
) -> None:
    # Five streams of different lengths, each sending its last chunk flagged `last` in a
    # batch with the others (two in the same call, one whose last chunk is empty): each gets
    # the results it gets alone, the final's superseded partial aside, and ends finished.
    recognizer = Recognizer(word_model, DecodeOptions(method="beam", beam=4))
    audios = [utterances[i].audio for i in range(5)]
    lengths = [a.numel() for a in audios]
    rounds = [math.ceil(n / CHUNK) for n in lengths]
    ends = [r - 1 for r in rounds]
    ends[1] = ends[2] = max(ends[1], ends[2])  # two streams end in the same call
    ends[3] += 1  # an empty last chunk

    def alone(audio: torch.Tensor) -> list[StreamResult]:
        session, results = StreamingSession(recognizer), []
        for start in range(0, audio.numel(), CHUNK):
            out = session.accept(audio[start : start + CHUNK])
            last = start + CHUNK >= audio.numel()
            results += [r for r in out if r.is_final] if last else out
        return results + session.finish()

    def key(results: list[StreamResult]) -> list[tuple[object, ...]]:
        return [(r.is_final, r.transcript.text, r.transcript.tokens, r.end) for r in results]

    expected = [key(alone(a)) for a in audios]
    sessions = [StreamingSession(recognizer) for _ in audios]
    got: list[list[StreamResult]] = [[] for _ in audios]
    for round_ in range(max(ends) + 1):
        now = [i for i in range(5) if round_ <= ends[i]]
        pieces = [audios[i][round_ * CHUNK : (round_ + 1) * CHUNK] for i in now]
        last = [round_ == ends[i] for i in now]
        batched = accept_streams([sessions[i] for i in now], pieces, last)
        for i, results, ending in zip(now, batched, last, strict=True):
            got[i] += results
            assert not ending or all(r.is_final for r in results)  # no partial at the end
    assert [key(g) for g in got] == expected
    assert all(s.finished for s in sessions)
    assert sessions[0].finish() == []
    with pytest.raises(ValueError, match="flags"):
        accept_streams([StreamingSession(recognizer)], [torch.zeros(CHUNK)], [True, False])


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


def test_samples_until_due_is_the_least_audio_that_makes_accept_work(
    word_model: Bundle, utterances: list[Utterance]
) -> None:
    # Fed one sample short of it, a session does nothing and asks for one more; fed that one,
    # its encoder runs. So the server may hold that much audio and lose nothing.
    audio = torch.cat([u.audio for u in utterances[:2]])
    held = StreamingSession(Recognizer(word_model))
    whole = StreamingSession(Recognizer(word_model))
    results: list[StreamResult] = []
    fed, runs = 0, 0
    while (due := held.samples_until_due()) and fed + due <= audio.numel():
        frames = held.frames
        if due > 1:
            assert held.accept(audio[fed : fed + due - 1]) == []
            assert held.frames == frames and held.samples_until_due() == 1
        results += held.accept(audio[fed + due - 1 : fed + due])
        assert held.frames > frames  # a block came out
        fed, runs = fed + due, runs + 1
    assert runs >= audio.numel() / SAMPLE_RATE * 2  # a block (8 frames, 320 ms) at a time
    results += held.accept(audio[fed:]) + held.finish()
    assert held.samples_until_due() == 0  # finished: the next accept fails at once
    assert [(r.is_final, r.transcript.text) for r in results] == [
        (r.is_final, r.transcript.text) for r in stream(whole, audio)
    ]
