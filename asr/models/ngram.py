"""A word n-gram language model read from an ARPA file (the format of the official LibriSpeech
3-/4-gram LMs and of every n-gram toolkit's output: SRILM, KenLM's lmplz, IRSTLM).

The reader is plain Python: n-grams in one dict from word tuples to (log10 prob, log10
backoff). KenLM's Python module would query faster and in less memory, but it is built from
C++ source on install (no wheels on PyPI) and the pruned ARPA files a decoder fuses are a few
million n-grams at most, which a dict holds in a few hundred MB. Probabilities come back as
natural logs, like every other score in search.
"""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

LN10 = math.log(10.0)
_COUNT = re.compile(r"ngram\s+(\d+)\s*=\s*(\d+)")
_SECTION = re.compile(r"\\(\d+)-grams:")


class ARPAError(ValueError):
    """A file that is not a valid ARPA language model (the message names file and line)."""


class NGramLM:
    """Backoff n-gram probabilities: P(w | h) = p(h w) if listed, else bow(h) * P(w | h'),
    h' being h without its first word; unigrams are always listed (`<unk>` stands for a word
    the model lacks, or `unk_log10` when it has no `<unk>` either)."""

    START, END, UNK = "<s>", "</s>", "<unk>"

    def __init__(
        self, ngrams: dict[tuple[str, ...], tuple[float, float]], order: int, unk_log10: float
    ) -> None:
        self.ngrams = ngrams
        self.order = order
        unk = ngrams.get((self.UNK,))
        self.unk_log10 = unk[0] if unk is not None else unk_log10

    @classmethod
    def load(cls, path: str | Path, *, unk_log10: float = -10.0) -> NGramLM:
        """Read an ARPA file (gzip-compressed if it ends in .gz). Words are kept as written;
        our transcripts are upper case, like the LibriSpeech LMs'."""
        path = Path(path)
        try:
            with _open(path) as lines:
                ngrams, order = _parse(path, lines)
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
            raise ARPAError(f"{path}: cannot read an ARPA file: {exc}") from exc
        return cls(ngrams, order, unk_log10)

    def log_prob(self, context: tuple[str, ...], word: str) -> float:
        """ln P(word | context), context being the words before it (only the last order - 1
        count), `<s>` first at the start of a sentence."""
        if (word,) not in self.ngrams:
            word = self.UNK
        context = context[len(context) - self.order + 1 :] if self.order > 1 else ()
        backoff = 0.0
        for start in range(len(context) + 1):
            hist = context[start:]
            entry = self.ngrams.get((*hist, word))
            if entry is not None:
                return (entry[0] + backoff) * LN10
            bow = self.ngrams.get(hist)
            if bow is not None:
                backoff += bow[1]
        return (self.unk_log10 + backoff) * LN10  # <unk> unlisted too

    def context_after(self, context: tuple[str, ...], word: str) -> tuple[str, ...]:
        """The context for the next word once `word` follows `context`."""
        keep = max(self.order - 1, 0)
        return (*context, word)[-keep:] if keep else ()

    def sentence_log_prob(self, words: list[str]) -> float:
        """ln P(<s> words </s>)."""
        context: tuple[str, ...] = (self.START,)
        total = 0.0
        for word in [*words, self.END]:
            total += self.log_prob(context, word)
            context = self.context_after(context, word)
        return total


def _open(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _parse(
    path: Path, lines: Iterator[str]
) -> tuple[dict[tuple[str, ...], tuple[float, float]], int]:
    counts: dict[int, int] = {}
    ngrams: dict[tuple[str, ...], tuple[float, float]] = {}
    section: int | None = None  # None: before \data\; 0: in \data\
    seen: dict[int, int] = {}
    ended = False
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or ended:
            continue
        where = f"{path}:{number}"
        if line == "\\data\\":
            section = 0
            continue
        if line == "\\end\\":
            ended = True
            continue
        if section is None:
            continue  # text before \data\ is a comment
        if match := _SECTION.fullmatch(line):
            section = int(match.group(1))
            if section not in counts:
                raise ARPAError(f"{where}: {section}-grams are not counted in \\data\\")
            seen[section] = 0
            continue
        if section == 0:
            if not (match := _COUNT.fullmatch(line)):
                raise ARPAError(f"{where}: expected 'ngram N=COUNT', got {line[:60]!r}")
            counts[int(match.group(1))] = int(match.group(2))
            continue
        fields = line.split()
        if len(fields) not in (section + 1, section + 2):
            raise ARPAError(
                f"{where}: a {section}-gram needs a log10 prob, {section} words and "
                f"an optional backoff; got {line[:60]!r}"
            )
        try:
            prob = float(fields[0])
            bow = float(fields[section + 1]) if len(fields) == section + 2 else 0.0
        except ValueError:
            raise ARPAError(f"{where}: not a number in {line[:60]!r}") from None
        ngrams[tuple(fields[1 : section + 1])] = (prob, bow)
        seen[section] += 1
    if not counts:
        raise ARPAError(f"{path}: no \\data\\ section: not an ARPA file")
    if not ended:
        raise ARPAError(f"{path}: no \\end\\ line: the file is truncated")
    for n, count in counts.items():
        if seen.get(n, 0) != count:
            raise ARPAError(
                f"{path}: \\data\\ counts {count} {n}-grams, the file has {seen.get(n, 0)}"
            )
    return ngrams, max(counts)


def write_arpa(
    sentences: Iterable[str], path: str | Path, *, order: int = 3, discount: float = 0.75
) -> Path:
    """Estimate a word n-gram with interpolated absolute discounting (Ney et al. 1994; the
    `discount` D is subtracted from every seen count) and write it as ARPA: what a recipe
    needs when no n-gram toolkit is installed (KenLM's lmplz gives modified Kneser-Ney and is
    better for large text). Every seen n-gram is listed with its interpolated probability;
    a history's backoff weight is the mass left for the words it was not seen with."""
    if order < 1 or not 0 < discount < 1:
        raise ValueError(f"order must be >= 1 and discount in (0, 1), got {order}, {discount}")
    counts: list[dict[tuple[str, ...], int]] = [{} for _ in range(order + 1)]
    for sentence in sentences:
        words = [NGramLM.START, *sentence.split(), NGramLM.END]
        for n in range(1, order + 1):
            for i in range(1 if n == 1 else 0, len(words) - n + 1):  # <s> is never predicted
                gram = tuple(words[i : i + n])
                counts[n][gram] = counts[n].get(gram, 0) + 1
    if not counts[1]:
        raise ValueError("no sentences to estimate an n-gram from")
    # Per history: total count and number of distinct followers.
    history: list[dict[tuple[str, ...], tuple[int, int]]] = [{} for _ in range(order + 1)]
    followers: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for n in range(2, order + 1):
        for gram, c in counts[n].items():
            total, types = history[n].get(gram[:-1], (0, 0))
            history[n][gram[:-1]] = (total + c, types + 1)
            followers.setdefault(gram[:-1], []).append(gram)
    vocab = [w for (w,) in counts[1]]
    unigram_total = sum(counts[1].values())
    unk = 1.0 / (len(vocab) + 1)  # <unk> gets a share as if seen once more than none
    prob: list[dict[tuple[str, ...], float]] = [{} for _ in range(order + 1)]
    prob[1] = {(w,): (1 - unk) * counts[1][(w,)] / unigram_total for w in vocab}
    prob[1][(NGramLM.UNK,)] = unk
    prob[1][(NGramLM.START,)] = 0.0  # never predicted

    def lower(gram: tuple[str, ...]) -> float:
        """The interpolated probability of gram's word given its shorter history."""
        n = len(gram)
        if n == 1:
            return prob[1].get(gram, unk)
        if gram in prob[n]:
            return prob[n][gram]
        total, types = history[n].get(gram[:-1], (0, 0))
        back = lower(gram[1:])
        return back if total == 0 else discount * types / total * back

    for n in range(2, order + 1):
        for gram, c in counts[n].items():
            total, types = history[n][gram[:-1]]
            prob[n][gram] = (c - discount) / total + discount * types / total * lower(gram[1:])
    lines = ["\\data\\", *(f"ngram {n}={len(prob[n])}" for n in range(1, order + 1)), ""]
    for n in range(1, order + 1):
        lines.append(f"\\{n}-grams:")
        for gram, p in prob[n].items():
            log_p = -99.0 if p <= 0 else math.log10(p)
            entry = f"{log_p:.6f}\t{' '.join(gram)}"
            if n < order and gram in history[n + 1]:
                seen = followers[gram]
                left = 1.0 - sum(prob[n + 1][g] for g in seen)
                denominator = 1.0 - sum(lower(g[1:]) for g in seen)
                bow = left / denominator if denominator > 0 and left > 0 else 1.0
                entry += f"\t{math.log10(bow):.6f}"
            lines.append(entry)
        lines.append("")
    lines.append("\\end\\")
    out = Path(path)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
