from __future__ import annotations

import pytest

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
