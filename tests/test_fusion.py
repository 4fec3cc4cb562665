"""Shallow fusion: LSTM LM, word n-gram (ARPA) and hotword scorers in the CTC prefix and the
attention beam searches, through the scorer interface and through a Recognizer."""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from asr.audio import AudioInput
from asr.bundle import Bundle, BundleError, write_lm_bundle
from asr.cli import main, read_hotwords
from asr.decoding.attention import attention_beam_search
from asr.decoding.ctc import CTCPrefixBeamSearch
from asr.decoding.options import DEFAULT_BOOST, DecodeOptions
from asr.decoding.scorers import (
    Fusion,
    HotwordScorer,
    LengthBonus,
    LSTMLMScorer,
    NGramScorer,
    PooledLMState,
    compile_hotwords,
)
from asr.language_model import LanguageModel, load_language_model
from asr.models.base import ATTENTION, CTC
from asr.models.las import LAS, EncoderOutput, las
from asr.models.lm import LSTMLM, LSTMLMConfig
from asr.models.ngram import LN10, ARPAError, NGramLM, write_arpa
from asr.quantize import quantize_model
from asr.recognizer import Recognizer
from asr.streaming import tensor_bytes
from asr.tokenizer import BLANK_ID, SOS_EOS_ID, Tokenizer
from tests.test_decoding_attention import _Frames
from tests.test_decoding_ctc import assert_same, exhaustive, peaky
from tests.test_las import TINY_PYRAMID
from tests.word_corpus import untrained_las

SENTENCE = "THE CAT SAT ON THE MAT"
TEXTS = [SENTENCE, "A DOG RAN HOME", "SHE SAW THE SEA", "WE WENT OUT AT NOON", "HE HAD A RED HAT"]
BEAM = DecodeOptions(beam=8, prune_top_k=None, prune_threshold=None, blank_skip=None)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    Tokenizer.train(TEXTS * 4, "char", 40).save(path)
    return Tokenizer.load(path)


@pytest.fixture(scope="module")
def sentence_lm(tokenizer: Tokenizer) -> LSTMLM:
    """An LSTM LM that knows one sentence by heart: trained to a per-unit NLL < 0.05, so every
    wrong unit costs it more than 3 nats, far more than the 0.22 nats the posteriors below
    favour the wrong unit by."""
    torch.manual_seed(0)
    config = LSTMLMConfig(tokenizer.vocab_size, 64, 64, num_layers=1, dropout=0.0)
    model = LSTMLM(config)
    units = torch.tensor([tokenizer.encode(SENTENCE)])
    lengths = torch.tensor([units.shape[1]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        loss = model(units, lengths).loss
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert float(model(units, lengths).loss) < 0.05
    return model


def confusable(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    """The units of `text` and, for each, a different unit (not a neighbour's, so CTC never
    merges it): the unit the posteriors below prefer."""
    units = tokenizer.encode(text)
    letters = [i for i in range(3, tokenizer.vocab_size) if i not in units]
    return units, [letters[i % len(letters)] for i in range(len(units))]


def ambiguous_posteriors(units: list[int], wrong: list[int], vocab: int) -> torch.Tensor:
    """(1, 2U, V) CTC log-probs: per unit, a frame with P(wrong) 0.5 > P(right) 0.4, then a
    blank frame. The most probable labeling is all wrong units."""
    probs = torch.full((2 * len(units), vocab), 1e-4)
    for i, (right, bad) in enumerate(zip(units, wrong, strict=True)):
        probs[2 * i, right], probs[2 * i, bad], probs[2 * i, BLANK_ID] = 0.4, 0.5, 0.1
        probs[2 * i + 1, BLANK_ID] = 1.0
    return (probs / probs.sum(dim=-1, keepdim=True)).log()[None]


def ctc_search(log_probs: torch.Tensor, fusion: Fusion | None) -> tuple[int, ...]:
    search = CTCPrefixBeamSearch(BEAM, fusion)
    return search(log_probs, torch.tensor([log_probs.shape[1]]))[0][0].tokens


def test_the_lstm_lm_recovers_its_sentence_from_ambiguous_ctc_posteriors(
    tokenizer: Tokenizer, sentence_lm: LSTMLM
) -> None:
    units, wrong = confusable(tokenizer, SENTENCE)
    log_probs = ambiguous_posteriors(units, wrong, tokenizer.vocab_size)
    assert ctc_search(log_probs, None) == tuple(wrong)
    assert ctc_search(log_probs, Fusion([(0.0, LSTMLMScorer(sentence_lm))])) == tuple(wrong)
    fused = ctc_search(log_probs, Fusion([(1.0, LSTMLMScorer(sentence_lm))]))
    assert tokenizer.decode(fused) == SENTENCE
    # Stepped on int8 weights (`--quantize int8`) its log-probs move by hundredths of a nat,
    # far less than the 3 nats a wrong unit costs it: it recovers the sentence as well.
    int8 = LSTMLMScorer(sentence_lm.stepper("int8"))
    assert tokenizer.decode(ctc_search(log_probs, Fusion([(1.0, int8)]))) == SENTENCE


@dataclass
class _Position:
    attention: torch.Tensor  # (N, 1)
    steps: torch.Tensor  # (N,)

    def select(self, rows: torch.Tensor) -> _Position:
        return _Position(self.attention[rows], self.steps[rows])


class _Ambiguous:
    """An attention decoder that, whatever came before, prefers the wrong unit at step i
    (0.5 against the right one's 0.4) and eos after the last unit."""

    def __init__(self, units: list[int], wrong: list[int], vocab: int) -> None:
        rows = []
        for right, bad in [*zip(units, wrong, strict=True), (SOS_EOS_ID, SOS_EOS_ID)]:
            p = torch.full((vocab,), 1e-3)
            p[right], p[bad] = (0.4, 0.5) if right != bad else (0.9, 0.9)
            rows.append((p / p.sum()).log())
        self.table = torch.stack(rows)  # (U + 1, V)

    def init_state(self, enc: _Frames) -> _Position:
        n = enc.lengths.shape[0]
        return _Position(torch.ones(n, 1), torch.zeros(n, dtype=torch.long))

    def step(
        self, enc: _Frames, state: _Position, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, _Position]:
        at = state.steps.clamp(max=self.table.shape[0] - 1)
        return self.table[at].clone(), _Position(state.attention, state.steps + 1)


def test_the_lstm_lm_recovers_its_sentence_in_attention_beam_search(
    tokenizer: Tokenizer, sentence_lm: LSTMLM
) -> None:
    units, wrong = confusable(tokenizer, SENTENCE)
    model = _Ambiguous(units, wrong, tokenizer.vocab_size)
    enc = _Frames(torch.tensor([len(units) * 2]))
    options = DecodeOptions(beam=4, length_penalty=0.0)
    plain = attention_beam_search(model, enc, options)[0][0].tokens
    assert plain == tuple(wrong)
    fusion = Fusion([(1.0, LSTMLMScorer(sentence_lm))])
    fused = attention_beam_search(model, enc, options, fusion=fusion)[0][0].tokens
    assert tokenizer.decode(fused) == SENTENCE


def random_fusion(tokenizer: Tokenizer, seed: int = 0) -> Fusion:
    """An untrained LSTM LM, a 3-gram of the test texts, a length bonus and a hotword."""
    torch.manual_seed(seed)
    lm = LSTMLM(LSTMLMConfig(tokenizer.vocab_size, embed_dim=16, hidden_size=16)).eval()
    graph = compile_hotwords([(tokenizer.encode("THE CAT"), 1.5)], tokenizer.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        ngram = NGramLM.load(write_arpa(TEXTS, Path(tmp) / "3.arpa"))
    return Fusion(
        [
            (0.5, LSTMLMScorer(lm)),
            (0.4, NGramScorer(ngram, tokenizer)),
            (0.3, LengthBonus(tokenizer.vocab_size)),
            (1.0, HotwordScorer(graph, tokenizer.vocab_size)),
        ]
    )


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_a_fused_search_streamed_in_chunks_equals_the_whole_utterance(
    tokenizer: Tokenizer, chunk: int
) -> None:
    log_probs = peaky(3, 24, tokenizer.vocab_size, seed=chunk)
    lengths = torch.tensor([24, 17, 9])
    options = replace(DecodeOptions(beam=6, nbest=3), blank_skip=0.95)
    search = CTCPrefixBeamSearch(options, random_fusion(tokenizer))
    whole = search(log_probs, lengths)
    state = search.init(3)
    for start in range(0, 24, chunk):
        piece = log_probs[:, start : start + chunk]
        left = (lengths - start).clamp(min=0, max=piece.shape[1])
        search.advance(state, piece, left)
    assert_same(search.finalize(state), whole)
    # And batched equals one utterance at a time.
    for b in range(3):
        one = search(log_probs[b : b + 1, : int(lengths[b])], lengths[b : b + 1])
        assert_same(one, whole[b : b + 1])


@pytest.mark.parametrize("fused", [False, True])
def test_streams_searched_together_end_as_each_alone(tokenizer: Tokenizer, fused: bool) -> None:
    # Four streams of different lengths, fed chunks of different sizes, joining late and
    # leaving early: at each round the streams with frames left advance in one advance_many.
    vocab = tokenizer.vocab_size
    log_probs = peaky(4, 30, vocab, seed=5)
    lengths, chunks, starts = [30, 21, 12, 26], [4, 3, 7, 5], [0, 2, 0, 5]
    options = replace(DecodeOptions(beam=6, nbest=3), blank_skip=0.95)
    search = CTCPrefixBeamSearch(options, random_fusion(tokenizer) if fused else None)
    states = [search.init(1) for _ in range(4)]
    taken = [0] * 4
    for round_ in range(40):
        now = [
            b for b in range(4) if round_ >= starts[b] and taken[b] < lengths[b]
        ]  # streams in the batch this round
        pieces = []
        for b in now:
            pieces.append(log_probs[b, taken[b] : min(taken[b] + chunks[b], lengths[b])])
            taken[b] += pieces[-1].shape[0]
        search.advance_many([states[b] for b in now], pieces)
    assert taken == lengths
    for b in range(4):
        alone = search(log_probs[b : b + 1, : lengths[b]], torch.tensor([lengths[b]]))
        assert_same(search.finalize(states[b]), alone)
        # Each stream keeps back-pointers for the frames it searched, not the batch's, one
        # folded step per chunk.
        rounds = -(-lengths[b] // chunks[b])
        assert len(states[b].parents) <= rounds
        assert sum(e.shape[2] for e in states[b].emitted) <= lengths[b]


def test_fused_scores_are_exact_ctc_plus_the_weighted_scorers() -> None:
    # Few enough labelings (of units 1, 3, 4 over 4 frames) for the beam to hold them all, so
    # CTC probabilities are exact: the search's scores are those plus the scorers'.
    torch.manual_seed(2)
    vocab = 5
    log_probs = peaky(1, 4, vocab, seed=9)
    log_probs[..., SOS_EOS_ID] = -math.inf  # eos is not a CTC unit
    lm = LSTMLM(LSTMLMConfig(vocab, embed_dim=8, hidden_size=8)).eval()
    graph = compile_hotwords([([3, 4], 0.7)], vocab)
    fusion = Fusion(
        [(0.6, LSTMLMScorer(lm)), (0.2, LengthBonus(vocab)), (1.0, HotwordScorer(graph, vocab))]
    )
    options = DecodeOptions(
        beam=128, nbest=10, prune_top_k=None, prune_threshold=None, blank_skip=None
    )
    hyps = CTCPrefixBeamSearch(options, fusion)(log_probs, torch.tensor([4]))[0]
    exact = exhaustive(log_probs[0])
    extra = fusion.sequence_scores([h.tokens for h in hyps], "cpu").tolist()
    expected = sorted((exact[h.tokens] + f for h, f in zip(hyps, extra, strict=True)), reverse=True)
    assert [h.score for h in hyps] == pytest.approx(expected, abs=1e-4)
    best = max(exact, key=lambda t: exact[t] + float(fusion.sequence_scores([t], "cpu")[0]))
    assert hyps[0].tokens == best


# --------------------------------------------------------------------------------------------
# Hotwords


def test_a_hotword_turns_a_near_miss_into_the_phrase_and_nothing_else(
    tokenizer: Tokenizer,
) -> None:
    vocab = tokenizer.vocab_size
    units = tokenizer.encode("THE CAT SAT")
    near = list(units)
    near[units.index(tokenizer.encode("CAT")[1])] = tokenizer.encode("DAT")[1]
    # Sure of every unit (0.83) but at "C", where the audio leans to "D" (0.5 against 0.4).
    log_probs = ambiguous_posteriors(units, near, vocab)
    graph = compile_hotwords([(tokenizer.encode("CAT"), 1.0)], vocab)
    hotwords = Fusion([(1.0, HotwordScorer(graph, vocab))])
    assert tokenizer.decode(ctc_search(log_probs, None)) == "THE DAT SAT"
    assert tokenizer.decode(ctc_search(log_probs, hotwords)) == "THE CAT SAT"
    # Audio that clearly says something else is left alone: "DOG" at 0.9 per unit.
    dog = tokenizer.encode("THE DOG SAT")
    sure = ambiguous_posteriors(dog, dog, vocab)
    assert tokenizer.decode(ctc_search(sure, hotwords)) == "THE DOG SAT"


def test_an_unfinished_hotword_earns_nothing(tokenizer: Tokenizer) -> None:
    vocab = tokenizer.vocab_size
    phrase = tokenizer.encode("CAT")  # the word-start unit, C, A, T
    graph = compile_hotwords([(phrase, 2.0), (tokenizer.encode("SEA"), 1.0)], vocab)
    fusion = Fusion([(1.0, HotwordScorer(graph, vocab))])

    def score(text: str) -> float:
        return float(fusion.sequence_scores([tokenizer.encode(text)], "cpu")[0])

    assert score("CAT") == pytest.approx(2.0 * len(phrase))
    assert score("THE CAT SAT") == pytest.approx(2.0 * len(phrase))
    assert score("CAT CAT") == pytest.approx(4.0 * len(phrase))  # fires each time
    assert score("CA") == pytest.approx(0.0)  # ends mid-phrase: withdrawn
    assert score("CAR") == pytest.approx(0.0)  # breaks off: withdrawn
    # SEA shares CAT's word-start unit, which earns the larger boost of the two.
    assert score("CAT SEA") == pytest.approx(2.0 * len(phrase) + 2.0 + 1.0 * 3)
    assert score("HE HAD A RED HAT") == pytest.approx(0.0)


def test_hotwords_reach_the_recognizer_per_request(word_model: Bundle) -> None:
    recognizer = Recognizer(word_model, DecodeOptions(method="beam"))
    assert recognizer.fusion(recognizer.options) is None
    opts = recognizer.options.override(hotwords=(("hello world", 2.0),))
    fusion = recognizer.fusion(opts)
    assert fusion is not None and len(fusion.weighted) == 1
    units = word_model.tokenizer.encode("HELLO WORLD")
    scores = fusion.sequence_scores([units], "cpu")
    assert float(scores[0]) == pytest.approx(2.0 * len(units))
    with pytest.raises(ValueError, match="hotwords"):
        recognizer.options.override(hotwords=(("x", 0.0),))


# --------------------------------------------------------------------------------------------
# ARPA n-gram

TINY_ARPA = """Some toolkit header text is allowed here.

\\data\\
ngram 1=5
ngram 2=3

\\1-grams:
-1.0 <s> -0.5
-0.7 </s>
-0.5 THE -0.3
-0.8 CAT -0.2
-1.2 <unk>

\\2-grams:
-0.2 <s> THE
-0.1 THE CAT
-0.4 CAT </s>

\\end\\
"""


@pytest.fixture
def arpa(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.arpa"
    path.write_text(TINY_ARPA)
    return path


def test_arpa_scores_match_hand_computed_backoff(arpa: Path) -> None:
    lm = NGramLM.load(arpa)
    assert lm.order == 2
    cases = {
        (("<s>",), "THE"): -0.2,  # listed bigram
        (("<s>",), "CAT"): -0.5 - 0.8,  # bow(<s>) + p(CAT)
        (("THE",), "</s>"): -0.3 - 0.7,  # bow(THE) + p(</s>)
        (("THE",), "DOG"): -0.3 - 1.2,  # an unknown word is <unk>
        (("CAT",), "THE"): -0.2 - 0.5,
        (("DOG",), "THE"): -0.5,  # unlisted history: backoff 0
    }
    for (context, word), log10 in cases.items():
        assert lm.log_prob(context, word) == pytest.approx(log10 * LN10)
    assert lm.sentence_log_prob(["THE", "CAT"]) == pytest.approx((-0.2 - 0.1 - 0.4) * LN10)


def test_the_ngram_scorer_scores_words_and_spells_unknown_ones(
    arpa: Path, tokenizer: Tokenizer
) -> None:
    lm = NGramLM.load(arpa)
    scorer = NGramScorer(lm, tokenizer)
    fusion = Fusion([(1.0, scorer)])
    for words in (["THE", "CAT"], ["THE", "DOG", "SAT"], ["CAT"], [], ["THECAT"]):
        units = tokenizer.encode(" ".join(words))
        got = float(fusion.sequence_scores([units], "cpu")[0])
        # An unknown word is <unk> to the n-gram, and each of its units pays for its spelling.
        spelt = sum(len(tokenizer.encode(w)) for w in words if w not in ("THE", "CAT"))
        assert got == pytest.approx(lm.sentence_log_prob(words) + scorer.oov_unit * spelt, abs=1e-4)
    # Gluing two known words into one unknown word costs more than saying them.
    glued = float(fusion.sequence_scores([tokenizer.encode("THECAT")], "cpu")[0])
    assert glued < float(fusion.sequence_scores([tokenizer.encode("THE CAT")], "cpu")[0]) - 3


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("no data section at all\n", "no \\\\data\\\\ section"),
        (TINY_ARPA.replace("\\end\\\n", ""), "truncated"),
        (TINY_ARPA.replace("ngram 2=3", "ngram 2=4"), "counts 4 2-grams"),
        (TINY_ARPA.replace("-0.1 THE CAT", "x THE CAT"), "tiny.arpa:16"),
    ],
)
def test_a_broken_arpa_file_is_a_clear_error(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "tiny.arpa"
    path.write_text(text)
    with pytest.raises(ARPAError, match=error):
        NGramLM.load(path)


# --------------------------------------------------------------------------------------------
# Internal LM estimate (ILME), subtracted


@pytest.fixture(scope="module")
def las_model() -> LAS:
    torch.manual_seed(0)
    return las(TINY_PYRAMID).eval()


def _las_batch(model: LAS, lengths: list[int], seed: int) -> EncoderOutput:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), max(lengths), TINY_PYRAMID.input_dim, generator=gen)
    with torch.no_grad():
        return model.encode(feats, torch.tensor(lengths))


def test_the_internal_lm_is_the_decoder_with_the_attention_context_removed(
    las_model: LAS,
) -> None:
    # Over a memory of zeros every attention context is zero whatever the weights: the
    # decoder is then exactly its internal LM (renormalised without blank, never a unit).
    enc = _las_batch(las_model, [96, 80, 64], seed=3)
    memory = torch.zeros_like(enc.memory)
    silent = replace(enc, memory=memory, keys=las_model.speller.attention.keys(memory))
    ilm = las_model.internal_lm()
    gen = torch.Generator().manual_seed(4)
    tokens = torch.full((3,), SOS_EOS_ID)
    state, heard, ilm_state = las_model.init_state(silent), las_model.init_state(enc), None
    with torch.no_grad():
        for _ in range(6):
            log_probs, state = las_model.step(silent, state, tokens)
            listening, heard = las_model.step(enc, heard, tokens)
            ilm_state = ilm.init_state(3) if ilm_state is None else ilm(ilm_state, tokens)
            assert bool((ilm_state.log_probs[:, BLANK_ID] == -math.inf).all())
            expected = log_probs[:, 1:].log_softmax(dim=-1)
            torch.testing.assert_close(ilm_state.log_probs[:, 1:], expected)
            # ... and not the decoder listening to audio.
            assert not torch.allclose(listening[:, 1:].log_softmax(dim=-1), expected, atol=1e-3)
            tokens = torch.randint(3, TINY_PYRAMID.vocab_size, (3,), generator=gen)


def test_the_internal_lm_runs_on_an_int8_decoder(las_model: LAS) -> None:
    tokens = torch.tensor([5, 7, 3])
    float_ilm, int8_ilm = las_model.internal_lm(), quantize_model(las_model, "int8").internal_lm()
    expected = float_ilm(float_ilm.init_state(3), tokens).log_probs
    got = int8_ilm(int8_ilm.init_state(3), tokens).log_probs
    assert bool((got[:, BLANK_ID] == -math.inf).all())
    torch.testing.assert_close(got[:, 1:], expected[:, 1:], atol=0.05, rtol=0.0)


def test_a_search_subtracting_the_internal_lm_scores_attention_less_the_weighted_ilm(
    las_model: LAS,
) -> None:
    enc = _las_batch(las_model, [160, 96], seed=5)
    options = DecodeOptions(beam=3, nbest=3, length_penalty=0.0, max_len_ratio=1.0)
    ilm = LSTMLMScorer(las_model.internal_lm())
    hyps = attention_beam_search(las_model, enc, options, fusion=Fusion([(-0.4, ilm)]))
    limits = (enc.lengths.double() * options.max_len_ratio).ceil().long().tolist()
    for b, utt in enumerate(hyps):
        one = enc.select(torch.tensor([b]))
        for h in utt:
            # Teacher-forced: the decoder's log-prob of each unit (and of eos, unless the
            # hypothesis ran to the length limit) less 0.4 x the internal LM's.
            ended = [SOS_EOS_ID] if len(h.tokens) < limits[b] else []
            state, prior, previous, expected = (
                las_model.init_state(one),
                ilm.init(1, "cpu"),
                SOS_EOS_ID,
                0.0,
            )
            with torch.no_grad():
                for unit in [*h.tokens, *ended]:
                    log_probs, state = las_model.step(one, state, torch.tensor([previous]))
                    expected += float(log_probs[0, unit] - 0.4 * ilm.scores(prior)[0, unit])
                    prior = ilm.advance(prior, torch.tensor([0]), torch.tensor([unit]))
                    previous = unit
            assert h.score == pytest.approx(expected, abs=1e-4)


def test_subtracting_a_scorer_does_not_reward_what_it_rules_out(
    tokenizer: Tokenizer, sentence_lm: LSTMLM
) -> None:
    scorer = LSTMLMScorer(sentence_lm)
    fusion = Fusion([(-0.5, scorer)])
    state = fusion.init(2, "cpu")
    scores, own = fusion.scores(state), scorer.scores(state[0])
    assert bool((scores[:, BLANK_ID] == -math.inf).all())  # the LM's blank: still impossible
    units = own[:, 3:]
    torch.testing.assert_close(scores[:, 3:], -0.5 * units)
    with pytest.raises(ValueError, match="ilm_weight"):
        DecodeOptions(ilm_weight=-0.1)


def test_pooled_lm_states_equal_stepping_each_prefix_alone(tokenizer: Tokenizer) -> None:
    """The scorer keeps prefixes' states as slots into a pool that it compacts when full:
    through many reorders, repeats, extensions, a state advanced twice (the pool is shared)
    and joins, every row's scores stay those of its own unit history stepped from scratch."""
    torch.manual_seed(5)
    vocab = tokenizer.vocab_size
    lm = LSTMLM(LSTMLMConfig(vocab, embed_dim=8, hidden_size=8, num_layers=2)).eval()
    scorer, step = LSTMLMScorer(lm), lm.stepper()

    def expected(history: list[int]) -> torch.Tensor:
        state = step.init_state(1)
        for unit in history:
            state = step(state, torch.tensor([unit]))
        return state.log_probs[0]

    def check(state: PooledLMState, histories: list[list[int]]) -> None:
        scores = scorer.scores(state)
        assert scores.shape == (len(histories), vocab)
        for row, history in zip(scores, histories, strict=True):
            torch.testing.assert_close(row, expected(history), atol=1e-5, rtol=1e-5)

    gen = torch.Generator().manual_seed(0)
    n = 6
    state = scorer.init(n, "cpu")
    histories: list[list[int]] = [[] for _ in range(n)]
    branches: list[tuple[PooledLMState, list[list[int]]]] = []
    sizes = set()
    for t in range(40):  # a pool of 2n + 4 entries: it compacts many times
        rows = torch.randint(0, n, (n,), generator=gen)
        tokens = torch.randint(3, vocab, (n,), generator=gen)
        tokens[torch.rand(n, generator=gen) < 0.3] = -1
        if t == 10:  # a second advance of the same state, kept to the end
            other = torch.randint(3, vocab, (n,), generator=gen)
            branches.append(
                (
                    scorer.advance(state, torch.arange(n), other),
                    [h + [int(u)] for h, u in zip(histories, other, strict=True)],
                )
            )
        state = scorer.advance(state, rows, tokens)
        sizes.add(tensor_bytes(state))
        histories = [
            histories[int(r)] + ([int(u)] if u >= 0 else [])
            for r, u in zip(rows, tokens, strict=True)
        ]
    check(state, histories)
    # A stream's state keeps one size (the server extrapolates its growth from two points).
    assert len(sizes) == 1
    for branch, branch_histories in branches:
        check(branch, branch_histories)
    joined = scorer.join([state, branches[0][0], scorer.init(2, "cpu")])
    check(joined, histories + branches[0][1] + [[], []])
    extended = scorer.advance(joined, torch.tensor([0, n]), torch.tensor([5, 6]))
    check(extended, [histories[0] + [5], branches[0][1][0] + [6]])


# --------------------------------------------------------------------------------------------
# Through a Recognizer


def test_lm_weight_zero_equals_no_lm(word_model: Bundle, tmp_path: Path) -> None:
    torch.manual_seed(3)
    vocab = word_model.tokenizer.vocab_size
    lm = LSTMLM(LSTMLMConfig(vocab, embed_dim=16, hidden_size=16)).eval()
    language_model = LanguageModel(tmp_path, "lstm", LSTMLMScorer(lm), unit_cost=2.0)
    gen = torch.Generator().manual_seed(0)
    audio: list[AudioInput] = [
        torch.randn(16000, generator=gen) * 0.1,
        torch.randn(9000, generator=gen) * 0.1,
    ]
    plain = Recognizer(word_model, DecodeOptions(method="beam"))
    zero = Recognizer(word_model, DecodeOptions(method="beam", lm_weight=0.0), lm=language_model)
    assert zero.fusion(zero.options) is None
    assert [t.to_dict() for t in zero.transcribe(audio)] == [
        t.to_dict() for t in plain.transcribe(audio)
    ]
    # Without options the LM is used at the default weight.
    fused = Recognizer(word_model, lm=language_model)
    assert fused.options.lm_weight > 0 and fused.fusion(fused.options) is not None
    assert fused.options.length_bonus == pytest.approx(fused.options.lm_weight * 2.0)
    for t in fused.transcribe(audio):
        assert math.isfinite(t.score)


def test_ilm_weight_subtracts_the_attention_decoders_internal_lm_only(
    word_model: Bundle,
) -> None:
    las_bundle = untrained_las(word_model, word_model.tokenizer)
    joint = DecodeOptions(method="joint", beam=3, ilm_weight=0.3)
    with pytest.raises(ValueError, match="ilm_weight subtracts an attention decoder"):
        Recognizer(word_model, joint.override(method="beam"))  # CTC alone has none
    with pytest.raises(ValueError, match="method 'beam' of this CTC model"):
        Recognizer(word_model, joint.override(method="beam"), las_bundle)
    two_pass = Recognizer(word_model, joint, las_bundle)
    fusion = two_pass.fusion(joint, ATTENTION)
    assert fusion is not None and [w for w, _ in fusion.weighted] == [-0.3]
    assert two_pass.fusion(joint, CTC) is None  # a CTC search never subtracts it
    gen = torch.Generator().manual_seed(0)
    audio: list[AudioInput] = [torch.randn(16000, generator=gen) * 0.1]
    for method in ("joint", "rescore"):
        zero = two_pass.transcribe(audio, method=method, ilm_weight=0.0)
        plain = Recognizer(word_model, joint.override(ilm_weight=0.0), las_bundle)
        assert [t.to_dict() for t in zero] == [
            t.to_dict() for t in plain.transcribe(audio, method=method)
        ]
        assert all(math.isfinite(t.score) for t in two_pass.transcribe(audio, method=method))
    own = Recognizer(las_bundle, DecodeOptions(method="beam", beam=3, ilm_weight=0.3))
    assert own.fusion(own.options) is not None  # a LAS's own beam search subtracts it


def test_an_lm_needs_the_acoustic_models_units(
    word_model: Bundle, tokenizer: Tokenizer, tmp_path: Path, arpa: Path
) -> None:
    with pytest.raises(BundleError, match="no such language model"):
        load_language_model(tmp_path / "missing", word_model.tokenizer)
    (tmp_path / "junk.arpa").write_text("not an lm")
    with pytest.raises(BundleError, match=r"junk\.arpa"):
        load_language_model(tmp_path / "junk.arpa", word_model.tokenizer)
    assert load_language_model(arpa, word_model.tokenizer).kind == "ngram"


def test_an_estimated_arpa_file_is_a_normalised_backoff_model(tmp_path: Path) -> None:
    sentences = ["THE CAT SAT", "THE DOG SAT", "A CAT RAN", "THE CAT RAN HOME"]
    lm = NGramLM.load(write_arpa(sentences, tmp_path / "3.arpa", order=3))
    assert lm.order == 3
    vocab = ["THE", "CAT", "SAT", "DOG", "A", "RAN", "HOME", "</s>", "<unk>"]
    for context in [("<s>",), ("<s>", "THE"), ("THE", "CAT"), ("CAT", "RAN"), ("ZEBRA", "X")]:
        total = sum(math.exp(lm.log_prob(context, w)) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-4)
    seen, unseen = (
        lm.sentence_log_prob(["THE", "CAT", "SAT"]),
        lm.sentence_log_prob(["CAT", "THE", "SAT"]),
    )
    assert seen > unseen + 3.0


def test_lm_text_and_hotword_files_from_the_command_line(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("1-2-3 the cat sat\nthe cat sat\nA dog, ran!\nheld out words\n")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "x", "text": "A NEW ONE"}\n')
    test = tmp_path / "test.txt"
    test.write_text("HELD OUT WORDS\n")
    out = tmp_path / "lm" / "text.txt"
    args = ["lm", "text", str(text), str(manifest), "--exclude", str(test), "--unique"]
    assert main([*args, "--out", str(out)]) == 0
    assert out.read_text().splitlines() == ["THE CAT SAT", "A DOG RAN", "A NEW ONE"]
    hotwords = tmp_path / "hot.txt"
    hotwords.write_text("# names\nnew york\t3\n\nsherpa\n")
    assert read_hotwords(hotwords) == (("new york", 3.0), ("sherpa", DEFAULT_BOOST))
    hotwords.write_text("ok\nbad\tlots\n")
    with pytest.raises(ValueError, match=r"hot\.txt:2"):
        read_hotwords(hotwords)
    assert main(["lm", "text", str(tmp_path / "missing.txt"), "--out", str(out)]) != 0


# --------------------------------------------------------------------------------------------
# LM mixes: several LMs fused together (`asr lm mix`)


def test_an_lm_mix_scores_its_parts_at_their_weights(
    tokenizer: Tokenizer, sentence_lm: LSTMLM, tmp_path: Path
) -> None:
    made = tmp_path / "made"
    lm_dir = write_lm_bundle(
        made / "lm",
        model_config=sentence_lm.config.to_dict(),
        weights=sentence_lm.state_dict(),
        tokenizer=tokenizer,
        training={},
        results={"dev": {"perplexity": 2.0}},
    )
    arpa = write_arpa(TEXTS, made / "3gram.arpa", order=3)
    tokenizer.save(made / "tokenizer.model")
    mix_file = made / "exp" / "mix.json"
    command = ["lm", "mix", "--part", str(lm_dir), "0.5", "--part", str(arpa), "0.25"]
    assert (
        main([*command, "--out", str(mix_file), "--tokenizer", str(made / "tokenizer.model")]) == 0
    )
    before = load_language_model(mix_file, tokenizer).fingerprint
    # Paths are relative to the mix file: the experiment moves as a whole.
    moved = made.rename(tmp_path / "moved")
    mix = load_language_model(moved / "exp" / "mix.json", tokenizer)
    lstm = load_language_model(moved / "lm", tokenizer)
    ngram = load_language_model(moved / "3gram.arpa", tokenizer)
    assert mix.kind == "mix" and mix.default_weight == 1.0 and lstm.default_weight < 1.0
    assert [(w, lm.kind) for w, lm in mix.parts] == [(0.5, "lstm"), (0.25, "ngram")]
    assert "lstm LM lm" in mix.describe() and "ngram LM 3gram.arpa" in mix.describe()
    # Each part's bonus at its share of the weight: 2 x 0.5 x ln 2 for the LSTM LM, the
    # n-gram's own 1.0.
    assert mix.length_bonus(2.0) == pytest.approx(math.log(2.0) + 1.0)
    # The same LMs at the same weights, wherever they lie; other weights, another LM.
    assert mix.fingerprint == before != lstm.fingerprint
    other = [{"path": "lm", "weight": 0.5}, {"path": "3gram.arpa", "weight": 0.3}]
    (moved / "other.json").write_text(json.dumps({"language_models": other}))
    assert load_language_model(moved / "other.json", tokenizer).fingerprint != before

    units = tokenizer.encode(SENTENCE)
    scorers = (mix.scorer, lstm.scorer, ngram.scorer)
    states = [s.init(2, "cpu") for s in scorers]
    rows = torch.arange(2)
    for step in range(len(units)):
        # Row 0 reads the sentence, row 1 repeats its first unit: both LMs in and out of
        # what they know, across word boundaries (the n-gram scores words as they end).
        tokens = torch.tensor([units[step], units[0]])
        mixed, alone_lstm, alone_ngram = (
            s.scores(st) for s, st in zip(scorers, states, strict=True)
        )
        expected = 0.5 * alone_lstm + 0.25 * alone_ngram
        assert torch.equal(mixed == -math.inf, expected == -math.inf)
        finite = expected > -math.inf
        assert torch.allclose(mixed[finite], expected[finite], atol=1e-5)
        states = [s.advance(st, rows, tokens) for s, st in zip(scorers, states, strict=True)]


def test_a_bad_lm_mix_is_a_clear_error(
    word_model: Bundle, arpa: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokenizer = word_model.tokenizer
    two = tmp_path / "two.json"
    arpa_copy = str(shutil.copy(arpa, tmp_path / "copy.arpa"))
    command = ["lm", "mix", "--part", str(arpa), "1", "--part", arpa_copy, "0.5"]
    assert main([*command, "--out", str(two)]) == 0
    # Without decoding options a recognizer fuses a mix at weight 1, with the sum of its
    # parts' bonuses (each n-gram's 1.0).
    fused = Recognizer(word_model, lm=load_language_model(two, tokenizer))
    assert (fused.options.lm_weight, fused.options.length_bonus) == (1.0, 2.0)
    bad = {
        "garbage.json": ("not json", "not an LM mix"),
        "empty.json": ('{"language_models": []}', "at least one LM"),
        "shape.json": ('{"language_models": 3}', "not an LM mix"),
        "negative.json": ('{"language_models": [{"path": "tiny.arpa", "weight": -1}]}', "positive"),
        "nan.json": ('{"language_models": [{"path": "tiny.arpa", "weight": NaN}]}', "positive"),
        "self.json": ('{"language_models": [{"path": "self.json", "weight": 1}]}', "is an LM mix"),
        "missing.json": ('{"language_models": [{"path": "gone.arpa", "weight": 1}]}', "no such"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(BundleError, match=message) as err:
            load_language_model(tmp_path / name, tokenizer)
        assert name in str(err.value) or "gone.arpa" in str(err.value)
    for args, message in [
        (["--part", str(arpa), "heavy", "--out", str(tmp_path / "m.json")], "is not a number"),
        (["--part", str(tmp_path / "gone"), "1", "--out", str(tmp_path / "m.json")], "no such LM"),
        (["--part", str(arpa), "1", "--out", str(tmp_path / "m.txt")], r"ends in \.json"),
    ]:
        assert main(["lm", "mix", *args]) == 2
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "m.txt").exists()
