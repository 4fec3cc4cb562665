"""Text normalisation: the one definition of "LibriSpeech-style" text used for training targets,
synthetic corpora and WER scoring.

LibriSpeech transcripts are upper case A-Z, apostrophes and single spaces. Anything else is
mapped into that alphabet so that training, tokenisation and scoring all agree.
"""

from __future__ import annotations

import re
import unicodedata

_DISALLOWED = re.compile(r"[^A-Z' ]+")
_SPACES = re.compile(r"\s+")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


def normalize_text(text: str) -> str:
    """Upper-case, strip accents, map curly quotes to apostrophes, turn every other character
    into a word break, collapse whitespace, and drop apostrophes that are not inside a word.

    >>> normalize_text("  It's  a Café, isn't it?  'Yes.' ")
    "IT'S A CAFE ISN'T IT YES"
    """
    ascii_text = (
        unicodedata.normalize("NFKD", text.translate(_QUOTES)).encode("ascii", "ignore").decode()
    )
    words = _SPACES.sub(" ", _DISALLOWED.sub(" ", ascii_text.upper())).split()
    return " ".join(w for w in (word.strip("'") for word in words) if w)
