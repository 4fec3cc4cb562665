"""CTC decoding: prefix beam search against exhaustive search, batched against one-by-one,
incremental against whole-utterance, pruning and blank skipping, cancellation, and greedy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from asr.cancel import CHECK_FRAMES, Cancelled, CancelToken, DeadlineExceeded
from asr.decoding.ctc import CTCPrefixBeamSearch, ctc_greedy
from asr.decoding.options import DecodeOptions, Hypothesis

EXACT = DecodeOptions(beam=256, nbest=4, prune_top_k=None, prune_threshold=None, blank_skip=None)


def exhaustive(log_probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """log P(labeling) for every labeling, summing over all V**T alignments: (T, V) input."""
    frames, vocab = log_probs.shape
    scores: dict[tuple[int, ...], float] = {}
    for path in itertools.product(range(vocab), repeat=frames):
        score = sum(float(log_probs[t, c]) for t, c in enumerate(path))
        collapsed = [c for i, c in enumerate(path) if c != 0 and (i == 0 or path[i - 1] != c)]
        key = tuple(collapsed)
        scores[key] = float(np.logaddexp(scores.get(key, -math.inf), score))
    return scores


def peaky(batch: int, frames: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random log-probs with a dominant blank, shaped like a trained CTC model's: (B, T, V)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, frames, vocab, generator=gen) * 3
    logits[..., 0] += 2.5
    return logits.log_softmax(dim=-1)


def assert_same(a: list[list[Hypothesis]], b: list[list[Hypothesis]]) -> None:
    assert [[h.tokens for h in utt] for utt in a] == [[h.tokens for h in utt] for utt in b]
    for x, y in zip(itertools.chain(*a), itertools.chain(*b), strict=True):
        assert x.score == pytest.approx(y.score, abs=1e-4)


@pytest.mark.parametrize("seed", range(40))
def test_wide_beam_equals_exhaustive_search(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    frames = int(torch.randint(1, 6, (), generator=gen))
    vocab = int(torch.randint(2, 5, (), generator=gen))
    log_probs = (torch.randn(frames, vocab, generator=gen) * 2).log_softmax(dim=-1)
    truth = exhaustive(log_probs)
    hyps = CTCPrefixBeamSearch(EXACT)(log_probs[None], torch.tensor([frames]))[0]
    ranked = sorted(truth, key=lambda k: -truth[k])
    assert [h.tokens for h in hyps] == ranked[: len(hyps)]
    for h in hyps:  # the scores are the exact labeling probabilities, not path maxima
        assert h.score == pytest.approx(truth[h.tokens], abs=1e-4)


@pytest.mark.parametrize("blank_skip", [None, 0.9])
def test_batched_equals_one_by_one(blank_skip: float | None) -> None:
    log_probs = peaky(6, 60, 12)
    lengths = torch.tensor([60, 10, 33, 1, 0, 47])
    search = CTCPrefixBeamSearch(DecodeOptions(beam=8, nbest=3, blank_skip=blank_skip))
    batched = search(log_probs, lengths)
    single = [
        search(log_probs[i : i + 1, :n], lengths[i : i + 1])[0]
        for i, n in enumerate(lengths.tolist())
    ]
    assert_same(batched, single)
    assert batched[4] == [Hypothesis((), 0.0)]  # no frames: the empty labeling, probability 1


@pytest.mark.parametrize(("chunk", "blank_skip"), [(1, None), (7, None), (7, 0.9), (13, 0.5)])
def test_incremental_equals_whole_utterance(chunk: int, blank_skip: float | None) -> None:
    log_probs = peaky(5, 61, 10, seed=3)
    lengths = torch.tensor([61, 20, 0, 44, 59])
    search = CTCPrefixBeamSearch(DecodeOptions(beam=6, nbest=2, blank_skip=blank_skip))
    whole = search(log_probs, lengths)
    state = search.init(5)
    partials = []
    for start in range(0, 61, chunk):
        part = log_probs[:, start : start + chunk]
        state = search.advance(state, part, (lengths - start).clamp(0, part.shape[1]))
        partials.append(search.best(state))
    assert_same(search.finalize(state), whole)
    assert partials[-1] == [list(utt[0].tokens) for utt in whole]
    assert state.frames.tolist() == lengths.tolist()


def test_beam_search_finds_more_probable_labeling_than_greedy() -> None:
    # Two frames where "a" spread over blank paths beats the best single path "_ _".
    probs = torch.tensor([[0.4, 0.35, 0.25], [0.4, 0.35, 0.25]])
    log_probs = probs.log()[None]
    greedy = ctc_greedy(log_probs, torch.tensor([2]))[0]
    beam = CTCPrefixBeamSearch(DecodeOptions(beam=4))(log_probs, torch.tensor([2]))[0][0]
    assert greedy == []
    # P(a) = .35*.35 + .35*.4 + .4*.35 = .4025 > P(empty) = .16
    assert beam.tokens == (1,)
    assert beam.score == pytest.approx(math.log(0.4025), abs=1e-5)


def test_pruning_keeps_the_best_path_on_peaky_output() -> None:
    log_probs = peaky(4, 80, 30, seed=5)
    lengths = torch.full((4,), 80)
    exact = CTCPrefixBeamSearch(
        DecodeOptions(beam=10, prune_top_k=None, prune_threshold=None, blank_skip=None)
    )
    pruned = CTCPrefixBeamSearch(
        DecodeOptions(beam=10, prune_top_k=4, prune_threshold=8.0, blank_skip=None)
    )
    skipping = CTCPrefixBeamSearch(DecodeOptions(beam=10, prune_top_k=4, blank_skip=0.999))
    best = [h[0].tokens for h in exact(log_probs, lengths)]
    assert [h[0].tokens for h in pruned(log_probs, lengths)] == best
    assert [h[0].tokens for h in skipping(log_probs, lengths)] == best


def test_nbest_is_sorted_distinct_and_bounded_by_beam() -> None:
    log_probs = peaky(3, 30, 8, seed=7)
    hyps = CTCPrefixBeamSearch(DecodeOptions(beam=5, nbest=9))(log_probs, torch.full((3,), 30))
    for utt in hyps:
        assert len(utt) == 5
        scores = [h.score for h in utt]
        assert scores == sorted(scores, reverse=True)
        assert len({h.tokens for h in utt}) == 5


def test_greedy_merges_repeats_and_drops_blanks() -> None:
    ids = torch.tensor([[0, 3, 3, 0, 3, 1, 1, 0, 2, 2]])
    log_probs = torch.nn.functional.one_hot(ids, 4).float().log()
    assert ctc_greedy(log_probs, torch.tensor([10])) == [[3, 3, 1, 2]]
    assert ctc_greedy(log_probs, torch.tensor([6])) == [[3, 3, 1]]


def test_state_batch_mismatch_is_an_error() -> None:
    search = CTCPrefixBeamSearch(DecodeOptions())
    with pytest.raises(ValueError, match="2 streams"):
        search.advance(search.init(2), peaky(3, 5, 4), torch.full((3,), 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    log_probs = peaky(4, 50, 16, seed=9)
    lengths = torch.tensor([50, 40, 30, 20])
    search = CTCPrefixBeamSearch(DecodeOptions(beam=8, nbest=2))
    assert_same(search(log_probs.cuda(), lengths.cuda()), search(log_probs, lengths))


class CountingToken(CancelToken):
    """A token that counts its checks and cancels after `stop_after` of them (None: never)."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.checks = 0
        self.stop_after = stop_after

    def check(self) -> None:
        self.checks += 1
        if self.stop_after is not None and self.checks > self.stop_after:
            raise Cancelled("cancelled by the test")


def test_a_token_that_never_fires_changes_nothing() -> None:
    options = DecodeOptions(beam=8, nbest=3, blank_skip=None)
    log_probs, lengths = peaky(3, 300, 12, seed=4), torch.tensor([300, 200, 90])
    token = CountingToken()
    assert_same(
        CTCPrefixBeamSearch(options)(log_probs, lengths, cancel=token),
        CTCPrefixBeamSearch(options)(log_probs, lengths),
    )
    assert token.checks == math.ceil(300 / CHECK_FRAMES)  # one per block of searched frames


def test_cancelling_stops_the_search_mid_utterance() -> None:
    log_probs, lengths = peaky(2, 400, 12, seed=5), torch.tensor([400, 300])
    search = CTCPrefixBeamSearch(DecodeOptions(beam=8, blank_skip=None))
    token = CountingToken(stop_after=3)
    state = search.init(2)
    with pytest.raises(Cancelled):
        search.advance(state, log_probs, lengths, cancel=token)
    assert token.checks == 4
    assert len(state.parents) == 3 * CHECK_FRAMES  # it stopped where it checked


def test_a_passed_deadline_raises_deadline_exceeded() -> None:
    token = CancelToken.after(-1.0)
    with pytest.raises(DeadlineExceeded):
        CTCPrefixBeamSearch(DecodeOptions())(peaky(1, 50, 5), torch.tensor([50]), cancel=token)
