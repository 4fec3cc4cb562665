from __future__ import annotations

import pytest
import torch

from asr.decoding.ctc import ctc_greedy
from asr.metrics import error_rates


def test_error_rates_are_corpus_level_percentages() -> None:
    rates = error_rates(["HELLO WORLD", "A B C"], ["hello, word!", "A B C D"])
    # 1 substitution + 1 insertion over 5 reference words.
    assert rates.wer == pytest.approx(40.0)
    assert rates.utterances == 2 and rates.words == 5
    assert error_rates(["SAME TEXT"], ["same text"]).wer == 0.0
    assert error_rates(["HELLO WORLD"], [""]).wer == 100.0


def test_error_rates_reject_mismatched_or_empty_input() -> None:
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_rates(["A", "B"], ["A"])
    with pytest.raises(ValueError, match="no non-empty references"):
        error_rates(["..."], ["A"])


def test_ctc_greedy_merges_repeats_drops_blanks_and_respects_lengths() -> None:
    frames = [[0, 5, 5, 0, 5, 7, 7, 0], [3, 3, 0, 4, 4, 4, 9, 9]]
    log_probs = torch.nn.functional.one_hot(torch.tensor(frames), 10).float().log()
    assert ctc_greedy(log_probs, torch.tensor([8, 5])) == [[5, 5, 7], [3, 4]]
