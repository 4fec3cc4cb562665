"""Attention decoding over the LAS step interface: beam 1 is greedy, joint scoring with
ctc_weight 0 is plain beam search, CTC prefix scores are exact, batching changes nothing,
length limits hold, eos and coverage options do what they say (checked by teacher forcing), and
rescoring ranks by the combined score."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.nn.functional as F

from asr.cancel import Cancelled
from asr.decoding.attention import (
    CTCPrefixScorer,
    attention_beam_search,
    attention_scores,
    rescore,
)
from asr.decoding.options import DecodeOptions, Hypothesis
from asr.models.las import LAS, EncoderOutput, las
from asr.tokenizer import SOS_EOS_ID
from tests.test_decoding_ctc import CountingToken, exhaustive
from tests.test_las import TINY_PYRAMID, one_thread  # noqa: F401 (autouse fixture)

CONFIG = TINY_PYRAMID  # with its auxiliary CTC head (ctc_weight 0.3), for joint decoding


@pytest.fixture(scope="module")
def model() -> LAS:
    torch.manual_seed(0)
    return las(CONFIG).eval()


@pytest.fixture(scope="module")
def encoded(model: LAS) -> EncoderOutput:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([160, 120, 64, 96])
    feats = torch.randn(4, 160, 20, generator=gen)
    with torch.no_grad():
        return model.encode(feats, lengths)


def tokens(hyps: list[list[Hypothesis]]) -> list[list[tuple[int, ...]]]:
    return [[h.tokens for h in utt] for utt in hyps]


def test_beam_one_equals_greedy(model: LAS) -> None:
    gen = torch.Generator().manual_seed(2)
    feats, lengths = torch.randn(3, 200, 20, generator=gen), torch.tensor([200, 150, 90])
    greedy = model.greedy_decode(feats, lengths)
    enc = model.encode(feats, lengths)
    beam = attention_beam_search(model, enc, DecodeOptions(beam=1, length_penalty=0.0))
    assert [list(h[0].tokens) for h in beam] == greedy


def test_joint_with_ctc_weight_zero_equals_attention_beam_search(
    model: LAS, encoded: EncoderOutput
) -> None:
    options = DecodeOptions(beam=4, nbest=4, ctc_weight=0.0)
    plain = attention_beam_search(model, encoded, options)
    joint = attention_beam_search(model, encoded, options, joint=True)
    assert tokens(joint) == tokens(plain)
    for a, b in zip(itertools.chain(*joint), itertools.chain(*plain), strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)


@pytest.mark.parametrize("upsample", [1, 2])
def test_ctc_weight_one_scores_are_ctc_log_likelihoods(
    model: LAS, encoded: EncoderOutput, upsample: int
) -> None:
    if upsample != 1:  # the CTC head emits `upsample` frames per listener frame
        torch.manual_seed(0)
        model = las(replace(CONFIG, ctc_upsample=upsample)).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            encoded = model.encode(torch.randn(2, 160, 20, generator=gen), torch.tensor([160, 96]))
    hyps = attention_beam_search(
        model, encoded, DecodeOptions(beam=3, nbest=3, ctc_weight=1.0), joint=True
    )
    assert encoded.ctc_log_probs is not None
    for b, utt in enumerate(hyps):
        frames = int(encoded.ctc_lengths[b])
        assert frames == upsample * int(encoded.lengths[b])
        for h in utt:
            nll = F.ctc_loss(
                encoded.ctc_log_probs[b : b + 1, :frames].transpose(0, 1),
                torch.tensor([h.tokens]),
                torch.tensor([frames]),
                torch.tensor([len(h.tokens)]),
                reduction="sum",
            )
            assert h.score == pytest.approx(-float(nll), abs=1e-3)


@pytest.mark.parametrize("seed", range(6))
def test_ctc_prefix_scores_equal_exhaustive_sums(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    frames, vocab = 5, 5  # id 2 is eos: the labels are 1, 3 and 4
    log_probs = (torch.randn(frames, vocab, generator=gen) * 2).log_softmax(dim=-1)
    truth = exhaustive(log_probs)

    def prefix_score(prefix: tuple[int, ...]) -> float:
        # P(the labeling starts with prefix) = sum over all labelings that do.
        return math.log(sum(math.exp(v) for k, v in truth.items() if k[: len(prefix)] == prefix))

    scorer = CTCPrefixScorer(log_probs[None], torch.tensor([frames]))
    state = scorer.initial()
    prefix: tuple[int, ...] = ()
    labels = [1, 3, 4]
    for token in (1, 3, 3):  # includes a repeat, which needs a blank in between
        cand = torch.tensor([[*labels, SOS_EOS_ID]])
        scores, nb, bl = scorer.extend(state, cand)
        for col, c in enumerate(labels):
            assert float(scores[0, col]) == pytest.approx(prefix_score((*prefix, c)), abs=1e-4)
        complete = truth.get(prefix, -math.inf)
        assert float(scores[0, 3]) == pytest.approx(complete, abs=1e-4)  # eos: exactly prefix
        col = labels.index(token)
        state = scorer.choose(state, torch.tensor([0]), torch.tensor([col]), scores, nb, bl, cand)
        prefix = (*prefix, token)


def test_batched_equals_one_by_one(model: LAS) -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = [160, 72, 120]
    feats = torch.randn(3, 160, 20, generator=gen)
    options = DecodeOptions(beam=3, nbest=2)
    batched = attention_beam_search(
        model, model.encode(feats, torch.tensor(lengths)), options, joint=True
    )
    for b, n in enumerate(lengths):
        enc = model.encode(feats[b : b + 1, :n], torch.tensor([n]))
        single = attention_beam_search(model, enc, options, joint=True)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[b]]
        for x, y in zip(single, batched[b], strict=True):
            assert x.score == pytest.approx(y.score, abs=1e-4)


def test_length_limits(model: LAS, encoded: EncoderOutput) -> None:
    frames = encoded.lengths.tolist()
    short = attention_beam_search(model, encoded, DecodeOptions(beam=3, nbest=3, max_len_ratio=0.1))
    for utt, n in zip(short, frames, strict=True):
        assert all(len(h.tokens) <= math.ceil(0.1 * n) for h in utt)
    long = attention_beam_search(
        model, encoded, DecodeOptions(beam=3, nbest=3, min_len_ratio=0.2, max_len_ratio=0.5)
    )
    for utt, n in zip(long, frames, strict=True):
        assert utt and all(math.floor(0.2 * n) <= len(h.tokens) <= math.ceil(0.5 * n) for h in utt)


def test_nbest_is_ranked_and_distinct(model: LAS, encoded: EncoderOutput) -> None:
    options = DecodeOptions(beam=5, nbest=5, length_penalty=1.0)
    for utt in attention_beam_search(model, encoded, options):
        assert len({h.tokens for h in utt}) == len(utt) >= 2
        normalised = [h.score / (len(h.tokens) + 1) for h in utt]  # tokens + eos
        assert normalised == sorted(normalised, reverse=True)


@dataclass
class _Frames:
    """A stand-in encoder output: T' frames per utterance, no CTC head."""

    lengths: torch.Tensor  # (B,)
    ctc_log_probs: torch.Tensor | None = None
    ctc_lengths: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def select(self, rows: torch.Tensor) -> _Frames:
        return _Frames(self.lengths[rows])


@dataclass
class _Step:
    attention: torch.Tensor  # (N, T') one-hot on the frame of the step
    steps: torch.Tensor  # (N,) tokens consumed

    def select(self, indices: torch.Tensor) -> _Step:
        return _Step(self.attention[indices], self.steps[indices])


class _Scripted:
    """A decoder whose every step gives token 3 log-prob -0.5, eos -1.0 (0.5 nats below the
    best) and the others -4, and attends to frame `step`: so how each option changes where
    hypotheses end is known exactly."""

    vocab = 6

    def init_state(self, enc: _Frames) -> _Step:
        n, frames = enc.lengths.shape[0], int(enc.lengths.max())
        return _Step(torch.zeros(n, frames), torch.zeros(n, dtype=torch.long))

    def step(self, enc: _Frames, state: _Step, tokens: torch.Tensor) -> tuple[torch.Tensor, _Step]:
        n = tokens.shape[0]
        log_probs = torch.full((n, self.vocab), -4.0)
        log_probs[:, 3], log_probs[:, SOS_EOS_ID] = -0.5, -1.0
        frames = state.attention.shape[1]
        attention = F.one_hot(state.steps.clamp(max=frames - 1), frames).float()
        return log_probs, _Step(attention, state.steps + 1)


def test_eos_threshold_keeps_eos_within_that_many_nats_of_the_best_token() -> None:
    enc = _Frames(torch.tensor([10, 6]))  # max_len_ratio 0.5: at most 5 and 3 tokens
    base = DecodeOptions(beam=2, nbest=2, max_len_ratio=0.5, length_penalty=0.0)
    # eos is 0.5 nats below token 3 at every step: a threshold of 0.4 forbids it, so every
    # hypothesis runs to the length limit; 0.6 (or none) lets the search end at once.
    strict = attention_beam_search(_Scripted(), enc, replace(base, eos_threshold=0.4))
    for utt, limit in zip(strict, (5, 3), strict=True):
        assert [len(h.tokens) for h in utt] == [limit] * 2
        assert utt[0].score == pytest.approx(-0.5 * limit)  # token 3 throughout, no eos
    for threshold in (0.6, None):
        loose = attention_beam_search(_Scripted(), enc, replace(base, eos_threshold=threshold))
        for utt in loose:
            assert utt[0].tokens == () and utt[0].score == pytest.approx(-1.0)  # eos first


def test_coverage_bonus_favours_hypotheses_that_attend_to_more_frames() -> None:
    enc = _Frames(torch.tensor([8]))
    base = DecodeOptions(beam=4, nbest=4, max_len_ratio=0.5, length_penalty=0.0)
    # Without coverage, eos right away (-1.0) beats every longer hypothesis (-0.5 n - 1.0);
    # each step attends one more frame, so a bonus of 1 per frame attended (more than the 0.5
    # a token costs) ranks the longest first.
    [plain] = attention_beam_search(_Scripted(), enc, base)
    assert plain[0].tokens == ()
    [covered] = attention_beam_search(
        _Scripted(), enc, replace(base, coverage_weight=1.0, coverage_threshold=0.5)
    )
    lengths = [len(h.tokens) for h in covered]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] == 4  # the length limit
    # Coverage ranks; the scores stay log-probabilities (4 x token 3, the limit ends it).
    assert covered[0].tokens == (3, 3, 3, 3) and covered[0].score == pytest.approx(-2.0)


def test_attention_scores_equal_teacher_forcing(model: LAS, encoded: EncoderOutput) -> None:
    hyps = [[3, 4, 5], [], [7, 7, 8, 9], [3]]
    rows = torch.tensor([0, 1, 2, 2])
    scores = attention_scores(model, encoded, rows, hyps)
    for i, (row, h) in enumerate(zip(rows.tolist(), hyps, strict=True)):
        enc = encoded.select(torch.tensor([row]))
        ys_in = torch.tensor([[SOS_EOS_ID, *h]])
        with torch.no_grad():
            log_probs = model.teacher_forced_logits(enc, ys_in).log_softmax(dim=-1)[0]
        expected = sum(float(log_probs[t, y]) for t, y in enumerate([*h, SOS_EOS_ID]))
        assert float(scores[i]) == pytest.approx(expected, abs=1e-4)


def test_rescore_ranks_by_the_combined_score(model: LAS, encoded: EncoderOutput) -> None:
    nbest = [[Hypothesis((3, 4), -1.0), Hypothesis((5,), -1.5), Hypothesis((6, 6), -9.0)]] * 4
    options = DecodeOptions(nbest=3, ctc_weight=0.5)
    ranked = rescore(model, encoded, nbest, options)
    att = attention_scores(
        model, encoded, torch.arange(4).repeat_interleave(3), [h.tokens for h in nbest[0]] * 4
    ).reshape(4, 3)
    for b, utt in enumerate(ranked):
        expected = sorted(
            ((0.5 * float(att[b, i]) + 0.5 * h.score, h.tokens) for i, h in enumerate(nbest[b])),
            reverse=True,
        )
        assert [h.tokens for h in utt] == [t for _, t in expected]
        assert [h.score for h in utt] == pytest.approx([s for s, _ in expected], abs=1e-4)
    only_ctc = rescore(model, encoded, nbest, replace(options, ctc_weight=1.0))
    assert [h.tokens for h in only_ctc[0]] == [(3, 4), (5,), (6, 6)]


def test_joint_decoding_needs_a_ctc_head() -> None:
    torch.manual_seed(0)
    model = las(replace(CONFIG, ctc_weight=0.0)).eval()
    enc = model.encode(torch.randn(1, 80, 20), torch.tensor([80]))
    with pytest.raises(ValueError, match="CTC head"):
        attention_beam_search(model, enc, DecodeOptions(beam=2), joint=True)


@pytest.mark.parametrize("joint", [False, True])
def test_a_token_that_never_fires_changes_nothing(
    model: LAS, encoded: EncoderOutput, joint: bool
) -> None:
    options = DecodeOptions(beam=3, nbest=3)
    token = CountingToken()
    checked = attention_beam_search(model, encoded, options, joint=joint, cancel=token)
    plain = attention_beam_search(model, encoded, options, joint=joint)
    assert tokens(checked) == tokens(plain)
    assert [h.score for h in itertools.chain(*checked)] == [
        h.score for h in itertools.chain(*plain)
    ]
    assert token.checks > 2


@pytest.mark.parametrize("joint", [False, True])
def test_cancelling_stops_the_search_after_that_many_checks(
    model: LAS, encoded: EncoderOutput, joint: bool
) -> None:
    token = CountingToken(stop_after=2)
    with pytest.raises(Cancelled):
        attention_beam_search(model, encoded, DecodeOptions(beam=3), joint=joint, cancel=token)
    assert token.checks == 3


def test_cancelling_stops_rescoring(model: LAS, encoded: EncoderOutput) -> None:
    nbest = [[Hypothesis((3, 4, 5, 6), -1.0)]] * 4
    token = CountingToken(stop_after=1)
    with pytest.raises(Cancelled):
        rescore(model, encoded, nbest, DecodeOptions(), token)
    assert token.checks == 2
