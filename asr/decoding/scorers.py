"""Scorers that a beam search adds to its model's scores: language models, hotwords, a length
bonus (shallow fusion, as ESPnet's `BeamSearch` scorers and whisper's logit filters).

Every scorer is token-synchronous with the acoustic model's units (the LM is trained on the same
tokenizer) and batched over N hypotheses. It keeps its own state for them, and a search needs
only three calls:

- `init(n, device)`: the state of n empty prefixes;
- `scores(state)`: (N, V) float32 log-scores of every next unit, where column `SOS_EOS_ID`
  scores ending the sentence (a language model's P(eos), a hotword's withdrawn partial match);
- `advance(state, rows, tokens)`: the state of prefixes `rows` (M,) (rows of the old state,
  repeated or reordered as the beam is) extended by `tokens` (M,), -1 meaning "not extended".
  With all tokens -1 it is a reorder: that is how a search drops finished utterances;
- `join(states)`: the states of several searches as one, their rows one after another (how
  streams of a server search together: a row selection splits them again).

`Fusion` holds the scorers with their weights (those of weight 0 are left out, so weight 0 is
exactly no fusion) and is itself a scorer, so a search sees one object. A negative weight
subtracts a scorer (an internal LM estimate, `asr.models.las.InternalLM`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import torch

from asr.models.lm import LSTMLM, LMState, LMStep
from asr.models.ngram import NGramLM
from asr.tokenizer import BLANK_ID, SOS_EOS_ID, Tokenizer

WORD_START = "\u2581"  # sentencepiece marks a unit that begins a word with it


class Scorer(Protocol):
    """See the module docstring."""

    def init(self, n: int, device: torch.device | str) -> Any: ...

    def scores(self, state: Any) -> torch.Tensor: ...

    def advance(self, state: Any, rows: torch.Tensor, tokens: torch.Tensor) -> Any: ...

    def join(self, states: Sequence[Any]) -> Any: ...


class Fusion:
    """Weighted scorers as one: scores are sum_i w_i * scores_i, the state a tuple of theirs."""

    def __init__(self, weighted: Sequence[tuple[float, Scorer]]) -> None:
        self.weighted = tuple((w, s) for w, s in weighted if w != 0.0)

    def __bool__(self) -> bool:
        return bool(self.weighted)

    def init(self, n: int, device: torch.device | str) -> tuple[Any, ...]:
        return tuple(s.init(n, device) for _, s in self.weighted)

    def scores(self, state: tuple[Any, ...]) -> torch.Tensor:
        """(N, V): the weighted sum; a scorer's -inf (an LM's blank) stays -inf, whatever the
        sign of its weight (what a scorer rules out, subtracting it does not reward)."""
        total: torch.Tensor | None = None
        for (w, s), st in zip(self.weighted, state, strict=True):
            scores = s.scores(st)
            part = w * scores
            if w < 0:
                part = part.masked_fill(scores == -math.inf, -math.inf)
            total = part if total is None else total + part
        assert total is not None, "an empty Fusion has no scores (check bool(fusion))"
        return total

    def advance(
        self, state: tuple[Any, ...], rows: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[Any, ...]:
        return tuple(
            s.advance(st, rows, tokens) for (_, s), st in zip(self.weighted, state, strict=True)
        )

    def join(self, states: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
        return tuple(s.join([st[i] for st in states]) for i, (_, s) in enumerate(self.weighted))

    def sequence_scores(
        self, hyps: Sequence[Sequence[int]], device: torch.device | str
    ) -> torch.Tensor:
        """The weighted score of each whole sentence y1 .. yU eos (M,), for rescoring."""
        m = len(hyps)
        if m == 0 or not self:
            return torch.zeros(m, device=device)
        width = max(len(h) for h in hyps) + 1
        targets = torch.full((m, width), -1, dtype=torch.long, device=device)
        for i, h in enumerate(hyps):
            targets[i, : len(h)] = torch.tensor(list(h), dtype=torch.long, device=device)
        lengths = torch.tensor([len(h) for h in hyps], device=device)
        targets = targets.scatter(1, lengths[:, None], SOS_EOS_ID)
        state = self.init(m, device)
        rows = torch.arange(m, device=device)
        total = torch.zeros(m, device=device)
        for t in range(width):
            target = targets[:, t]
            picked = self.scores(state).gather(1, target.clamp(min=0)[:, None])[:, 0]
            total += torch.where(target >= 0, picked, 0.0)
            state = self.advance(state, rows, target.masked_fill(target == SOS_EOS_ID, -1))
        return total


def _extended(tokens: torch.Tensor) -> torch.Tensor:
    """Indices of the rows that `advance` extends (M',)."""
    return (tokens >= 0).nonzero()[:, 0]


class _Pool:
    """LM states computed so far, in tensors with room to append: entries are appended and
    never overwritten, so every search state that points into the pool stays valid (a search
    may advance one state twice); when it is full, `compacted` copies the live entries into
    a new pool."""

    def __init__(self, state: LMState, capacity: int) -> None:
        n = state.log_probs.shape[0]
        capacity = max(capacity, n)
        h, c, lp = state.h, state.c, state.log_probs
        self.h = h.new_empty(h.shape[0], capacity, h.shape[2])  # (L, P, H)
        self.c = c.new_empty(self.h.shape)
        self.log_probs = lp.new_empty(capacity, lp.shape[1])  # (P, V)
        self.filled = 0
        self.append(state)

    @property
    def capacity(self) -> int:
        return self.log_probs.shape[0]

    def append(self, state: LMState) -> torch.Tensor:
        """Store the M states of `state` (there must be room): their slots (M,)."""
        start, end = self.filled, self.filled + state.log_probs.shape[0]
        self.h[:, start:end], self.c[:, start:end] = state.h, state.c
        self.log_probs[start:end] = state.log_probs
        self.filled = end
        return torch.arange(start, end, device=self.log_probs.device)

    def take(self, slot: torch.Tensor) -> LMState:
        return LMState(self.h[:, slot], self.c[:, slot], self.log_probs[slot])

    @staticmethod
    def compacted(parts: Sequence[tuple[_Pool, torch.Tensor]], capacity: int) -> PooledLMState:
        """The entries of pools `parts` (pool, slots (N_i,)) that the slots point at, in one
        new pool of `capacity` entries (at least the live ones): rows one part after another."""
        taken, slots, offset = [], [], 0
        for pool, slot in parts:
            live, inverse = torch.unique(slot, return_inverse=True)
            taken.append(pool.take(live))
            slots.append(inverse + offset)
            offset += live.shape[0]
        joined = LMState(
            torch.cat([t.h for t in taken], dim=1),
            torch.cat([t.c for t in taken], dim=1),
            torch.cat([t.log_probs for t in taken]),
        )
        return PooledLMState(torch.cat(slots), _Pool(joined, capacity))


@dataclass
class PooledLMState:
    """N prefixes' LM states as slots (N,) into a pool of computed states. A search reorders
    and repeats its rows every step: moving an index instead of every row's (L, H) LSTM
    state made a fused CTC search with the 2 x 256 cpu-small LM 4-5 % faster with pools of
    2N entries, 7-9 % with 4N (2-core machine, 2026-12-07; more for LMs of more layers). A
    stream's state costs those 2N entries instead of N (110 against 46 KB for beam 10 and
    cpu-small). States derived from one another share their pool: advance them from one
    thread at a time (a server worker runs one model call at a time)."""

    slot: torch.Tensor  # (N,) int64
    pool: _Pool


def _capacity(rows: int) -> int:
    """Pool entries for a state of N rows: 2N, so that compaction (which keeps at most N
    live entries) comes every few frames of a CTC search (which extends about N / 4 rows a
    frame), not every frame, at twice the memory of the live entries."""
    return 2 * rows + 4


class LSTMLMScorer:
    """An LSTM language model over the units: scores are its next-unit log-probabilities
    (cached in the state, so `scores` is a gather; `advance` runs one LSTM step for the
    extended rows only: a CTC search extends a few of its prefixes per frame). It steps a
    snapshot of an LSTM LM's weights (`LSTMLM.stepper`), or any other `LMStep` (an attention
    decoder's internal LM)."""

    def __init__(self, model: LSTMLM | LMStep) -> None:
        self.step: LMStep = model.stepper() if isinstance(model, LSTMLM) else model

    def init(self, n: int, device: torch.device | str) -> PooledLMState:
        # Every empty prefix has the same state: one entry.
        pool = _Pool(self.step.init_state(1, device), _capacity(n))
        return PooledLMState(torch.zeros(n, dtype=torch.long, device=pool.h.device), pool)

    def scores(self, state: PooledLMState) -> torch.Tensor:
        return state.pool.log_probs[state.slot]

    def advance(
        self, state: PooledLMState, rows: torch.Tensor, tokens: torch.Tensor
    ) -> PooledLMState:
        slot, pool = state.slot[rows], state.pool
        ext = _extended(tokens)
        if not ext.numel():
            return PooledLMState(slot, pool)
        stepped = self.step(pool.take(slot[ext]), tokens[ext])
        if pool.filled + ext.numel() > pool.capacity:
            # Live entries and new ones are at most N each: the same capacity again holds
            # them, so a stream's state keeps one size (`server.capacity` extrapolates
            # `StreamingSession.state_bytes`' growth).
            compact = _Pool.compacted([(pool, slot)], _capacity(slot.numel()))
            slot, pool = compact.slot, compact.pool
        slot[ext] = pool.append(stepped)
        return PooledLMState(slot, pool)

    def join(self, states: Sequence[PooledLMState]) -> PooledLMState:
        # The capacity of one state of all the rows, so that a stream's state keeps one
        # size through joins too (a server joins its streams' states every batched step).
        size = _capacity(sum(s.slot.numel() for s in states))
        return _Pool.compacted([(s.pool, s.slot) for s in states], size)


class LengthBonus:
    """A constant score per emitted unit (an insertion bonus): offsets the LM's and the
    attention decoder's preference for short hypotheses."""

    def __init__(self, vocab_size: int) -> None:
        row = torch.ones(1, vocab_size)
        row[0, SOS_EOS_ID] = 0.0
        row[0, BLANK_ID] = 0.0
        self.row = row

    def init(self, n: int, device: torch.device | str) -> int:
        self.row = self.row.to(device)
        return n

    def scores(self, state: int) -> torch.Tensor:
        return self.row.expand(state, -1)

    def advance(self, state: int, rows: torch.Tensor, tokens: torch.Tensor) -> int:
        return rows.shape[0]

    def join(self, states: Sequence[int]) -> int:
        return sum(states)


# --------------------------------------------------------------------------------------------
# Word n-gram over subword hypotheses


@dataclass
class NGramState:
    """Per hypothesis: the words before the current one (the n-gram context), the current
    word's units so far and whether it has already been charged as out of vocabulary; and
    what each next unit would score (see `NGramScorer`)."""

    context: list[tuple[str, ...]]
    word: list[str]
    units: list[int]  # units in the current word
    charged: list[bool]  # the current word left the vocabulary and paid for it
    word_score: torch.Tensor  # (N,) score of ending the current word (a word-start unit)
    end_score: torch.Tensor  # (N,) ... and then the sentence (eos)
    leave: torch.Tensor  # (N,) score of a unit inside the word that is no known word's prefix
    start_leave: torch.Tensor  # (N,) ... of a word-start unit that begins no known word
    known: torch.Tensor  # (N, V) bool: units inside the word that keep it a known prefix


class NGramScorer:
    """A word n-gram (ARPA) over subword hypotheses. A unit that starts a word
    (sentencepiece's leading U+2581) or eos completes the current word and scores it given
    the words before it. Inside a word, units cost nothing while the word is still the prefix
    of a word the LM knows; the unit that leaves them pays for an unknown word at once
    (P(<unk> | context)) and every unit of it pays `oov_unit` (a uniform spelling model), so
    gluing words together into one unknown word is never free, which word-boundary scoring
    alone would make it (and did: the fused search ran words together)."""

    def __init__(self, lm: NGramLM, tokenizer: Tokenizer, *, oov_unit: float | None = None) -> None:
        self.lm = lm
        pieces = tokenizer.pieces()
        self.pieces = pieces
        self.starts = torch.tensor([p.startswith(WORD_START) for p in pieces])  # (V,)
        self.starts[[BLANK_ID, SOS_EOS_ID]] = False
        self.inner = [i for i in range(len(pieces)) if not self.starts[i] and i > SOS_EOS_ID]
        self.oov_unit = -math.log(len(pieces)) if oov_unit is None else oov_unit
        words = [g[0] for g in lm.ngrams if len(g) == 1]
        self.vocab = frozenset(words) - {lm.START, lm.END, lm.UNK}
        self.prefixes = frozenset(w[:i] for w in self.vocab for i in range(1, len(w) + 1))
        # Word-start units whose first letters begin a known word (or none: a lone U+2581).
        self.starts_known = (
            torch.tensor([not p[1:] or p[1:] in self.prefixes for p in pieces]) | ~self.starts
        )
        self._known = lru_cache(maxsize=1 << 16)(self._known_uncached)
        self._scored = lru_cache(maxsize=1 << 16)(self._scored_uncached)

    def _known_uncached(self, word: str) -> torch.Tensor:
        known = torch.zeros(len(self.pieces), dtype=torch.bool)
        known[[i for i in self.inner if word + self.pieces[i] in self.prefixes]] = True
        return known

    def _scored_uncached(
        self, context: tuple[str, ...], word: str, units: int, charged: bool
    ) -> tuple[float, float, float, float, tuple[str, ...]]:
        """(ending the word, ending it and the sentence, leaving the vocabulary inside it,
        starting an unknown word after it, the context after it)."""
        unk = self.lm.log_prob(context, self.lm.UNK)
        after: tuple[str, ...]
        if units == 0 and context == (self.lm.START,):
            ending, after = 0.0, context  # nothing said yet
        elif charged:
            ending, after = 0.0, self.lm.context_after(context, self.lm.UNK)
        elif word in self.vocab:
            ending, after = self.lm.log_prob(context, word), self.lm.context_after(context, word)
        else:  # a prefix that is no word, or an empty one: unknown, all its units spelt
            ending = unk + self.oov_unit * units
            after = self.lm.context_after(context, self.lm.UNK)
        leave = self.oov_unit if charged else unk + self.oov_unit * (units + 1)
        start_leave = self.lm.log_prob(after, self.lm.UNK) + self.oov_unit
        return ending, ending + self.lm.log_prob(after, self.lm.END), leave, start_leave, after

    def init(self, n: int, device: torch.device | str) -> NGramState:
        self.starts = self.starts.to(device)
        self.starts_known = self.starts_known.to(device)
        start = (self.lm.START,)
        ending, end, leave, start_leave, _ = self._scored(start, "", 0, False)
        return NGramState(
            context=[start] * n,
            word=[""] * n,
            units=[0] * n,
            charged=[False] * n,
            word_score=torch.full((n,), ending, device=device),
            end_score=torch.full((n,), end, device=device),
            leave=torch.full((n,), leave, device=device),
            start_leave=torch.full((n,), start_leave, device=device),
            known=self._known("").to(device).expand(n, -1).clone(),
        )

    def scores(self, state: NGramState) -> torch.Tensor:
        inside = torch.where(state.known, 0.0, state.leave[:, None])  # (N, V)
        starting = state.word_score[:, None] + torch.where(
            self.starts_known[None], 0.0, state.start_leave[:, None]
        )
        out = torch.where(self.starts[None], starting, inside)
        out[:, SOS_EOS_ID] = state.end_score
        return out

    def advance(self, state: NGramState, rows: torch.Tensor, tokens: torch.Tensor) -> NGramState:
        picked = rows.tolist()
        new = NGramState(
            context=[state.context[r] for r in picked],
            word=[state.word[r] for r in picked],
            units=[state.units[r] for r in picked],
            charged=[state.charged[r] for r in picked],
            word_score=state.word_score[rows],
            end_score=state.end_score[rows],
            leave=state.leave[rows],
            start_leave=state.start_leave[rows],
            known=state.known[rows],
        )
        ext = _extended(tokens)
        if not ext.numel():
            return new
        values, known = [], []
        for i, tok in zip(ext.tolist(), tokens[ext].tolist(), strict=True):
            piece = self.pieces[tok]
            if piece.startswith(WORD_START):
                *_, new.context[i] = self._scored(
                    new.context[i], new.word[i], new.units[i], new.charged[i]
                )
                new.word[i], new.units[i], new.charged[i] = piece[1:], 1, False
                new.charged[i] = bool(new.word[i]) and new.word[i] not in self.prefixes
            else:
                new.charged[i] = new.charged[i] or (new.word[i] + piece) not in self.prefixes
                new.word[i] += piece
                new.units[i] += 1
            ending, end, leave, start_leave, _ = self._scored(
                new.context[i], new.word[i], new.units[i], new.charged[i]
            )
            values.append((ending, end, leave, start_leave))
            known.append(self._known(new.word[i]))
        device = new.word_score.device
        table = torch.tensor(values, device=device)  # (M', 4)
        new.word_score[ext], new.end_score[ext], new.leave[ext], new.start_leave[ext] = (
            table.unbind(dim=1)
        )
        new.known[ext] = torch.stack(known).to(device)
        return new

    def join(self, states: Sequence[NGramState]) -> NGramState:
        return NGramState(
            context=[c for s in states for c in s.context],
            word=[w for s in states for w in s.word],
            units=[u for s in states for u in s.units],
            charged=[c for s in states for c in s.charged],
            word_score=torch.cat([s.word_score for s in states]),
            end_score=torch.cat([s.end_score for s in states]),
            leave=torch.cat([s.leave for s in states]),
            start_leave=torch.cat([s.start_leave for s in states]),
            known=torch.cat([s.known for s in states]),
        )


# --------------------------------------------------------------------------------------------
# Hotwords


@dataclass(frozen=True)
class HotwordGraph:
    """Phrases as a prefix tree over units with Aho-Corasick failure links, stored as tables.

    A hypothesis sits at a node (0: the root): the longest phrase prefix its last units match.
    Every unit matched earns the phrase's boost; a unit that breaks the match moves to the
    node its failure links reach and withdraws the boost of the units left behind; finishing a
    phrase keeps its boost and returns to the root (sherpa/icefall's "strict mode", so a
    phrase inside a longer one fires once: "NEW" before "NEW YORK" is matched as "NEW").
    For each node, only the units that lead somewhere other than the root are listed
    (padded with the dummy unit V); any other unit goes to the root.
    """

    pending: torch.Tensor  # (nodes,) boost earned on the way to the node, not yet kept
    units: torch.Tensor  # (nodes, C) long: units that lead off the root, V for padding
    delta: torch.Tensor  # (nodes, C) float: the score of taking that unit
    target: torch.Tensor  # (nodes, C) long: the node it leads to

    def to(self, device: torch.device | str) -> HotwordGraph:
        return HotwordGraph(*(t.to(device) for t in vars(self).values()))


def compile_hotwords(
    phrases: Sequence[tuple[Sequence[int], float]], vocab_size: int
) -> HotwordGraph:
    """Build the graph of (units, boost per unit) phrases; phrases sharing a prefix share its
    nodes (taking the larger boost)."""
    children: list[dict[int, int]] = [{}]
    score = [0.0]
    end = [False]
    for units, boost in phrases:
        node = 0
        for u in units:
            if u not in children[node]:
                children[node][u] = len(children)
                children.append({})
                score.append(-math.inf)
                end.append(False)
            parent, node = node, children[node][u]
            score[node] = max(score[node], score[parent] + boost)
        end[node] = node != 0
    # Failure links, breadth first: the longest proper suffix of a node that is also a node.
    fail = [0] * len(children)
    queue = list(children[0].values())
    for node in queue:
        for u, child in children[node].items():
            f = fail[node]
            while f and u not in children[f]:
                f = fail[f]
            fail[child] = children[f][u] if u in children[f] and children[f][u] != child else 0
            queue.append(child)
    rows: list[dict[int, tuple[float, int]]] = []
    for node in range(len(children)):
        moves: dict[int, tuple[float, int]] = {}
        f = node
        while True:  # the node's own children win over those of its suffixes
            for u, child in children[f].items():
                if u not in moves:
                    kept = 0 if end[child] else child
                    moves[u] = (score[child] - score[node], kept)
            if f == 0:
                break
            f = fail[f]
        rows.append(moves)
    width = max(1, max(len(m) for m in rows))
    table = torch.full((len(rows), width), vocab_size, dtype=torch.long)
    delta = torch.zeros(len(rows), width)
    target = torch.zeros(len(rows), width, dtype=torch.long)
    for node, moves in enumerate(rows):
        for j, (u, (d, t)) in enumerate(sorted(moves.items())):
            table[node, j], delta[node, j], target[node, j] = u, d, t
    return HotwordGraph(torch.tensor(score).clamp(min=0.0), table, delta, target)


class HotwordScorer:
    """Boosts the phrases of a `HotwordGraph`; the state is each hypothesis' node (N,)."""

    def __init__(self, graph: HotwordGraph, vocab_size: int) -> None:
        self.graph = graph
        self.vocab_size = vocab_size

    def init(self, n: int, device: torch.device | str) -> torch.Tensor:
        self.graph = self.graph.to(device)
        return torch.zeros(n, dtype=torch.long, device=device)

    def scores(self, state: torch.Tensor) -> torch.Tensor:
        g = self.graph
        withdraw = -g.pending[state]  # (N,) leaving the match
        out = withdraw[:, None].expand(-1, self.vocab_size + 1).clone()
        out.scatter_(1, g.units[state], g.delta[state])
        out[:, SOS_EOS_ID] = withdraw  # a sentence that ends mid-phrase earns nothing of it
        return out[:, : self.vocab_size]

    def advance(
        self, state: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        g = self.graph
        node = state[rows]
        ext = _extended(tokens)
        if ext.numel():
            at = node[ext]
            hit = g.units[at] == tokens[ext, None]  # (M', C)
            moved = (g.target[at] * hit).sum(dim=1)  # at most one hit; none: the root
            node[ext] = moved
        return node

    def join(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(states))
