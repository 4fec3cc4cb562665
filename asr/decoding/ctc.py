"""CTC decoding over log-probabilities (B, T, V) with blank id 0."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from asr.cancel import CHECK_FRAMES, CancelToken
from asr.decoding.options import DecodeOptions, Hypothesis
from asr.decoding.scorers import Fusion
from asr.masks import lengths_to_mask
from asr.tokenizer import BLANK_ID, SOS_EOS_ID


def ctc_greedy(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks.

    log_probs: (B, T, V); lengths: (B,) valid frames. Returns token ids per utterance.
    """
    best = log_probs.argmax(dim=-1)  # (B, T)
    # A token is emitted where it differs from the previous frame's and is not blank.
    changed = torch.ones_like(best, dtype=torch.bool)
    changed[:, 1:] = best[:, 1:] != best[:, :-1]
    keep = changed & (best != BLANK_ID)
    keep &= lengths_to_mask(lengths.to(best.device), best.shape[1])
    return [row[mask].tolist() for row, mask in zip(best.cpu(), keep.cpu(), strict=True)]


# Prefixes are compared by a polynomial hash mod a prime; the products stay below 2**63.
# A false merge would also need equal length and last token, so its odds are negligible.
_HASH_MOD = 2_147_483_647  # 2**31 - 1
_HASH_BASE = 1_000_003


@dataclass
class CTCBeamState:
    """The beam of each of B streams after some frames; K = options.beam rows per stream.

    Each row is a distinct prefix (label sequence) with the log-probability of all alignments
    of the frames so far that end in blank (`blank`) or in its last token (`nonblank`).
    Token sequences are kept as back-pointers, one (B, K) pair per searched frame.
    """

    blank: torch.Tensor  # (B, K) float32
    nonblank: torch.Tensor  # (B, K) float32
    last: torch.Tensor  # (B, K) int64 last token, -1 for the empty prefix
    key: torch.Tensor  # (B, K) int64 hash of the prefix
    parent_key: torch.Tensor  # (B, K) int64 hash of the prefix without its last token
    length: torch.Tensor  # (B, K) int64 tokens in the prefix
    skipped: torch.Tensor  # (B,) float32 log-prob of skipped blank frames not yet applied
    pending: torch.Tensor  # (B,) bool: blank frames were skipped after the last searched one
    frames: torch.Tensor  # (B,) int64 frames consumed
    # Shallow fusion: the weighted scorer total of each prefix (B, K) (it depends on the
    # prefix only, not on its alignment) and the scorers' state of its B * K rows.
    fused: torch.Tensor | None = None
    scorer_state: Any = None
    parents: list[torch.Tensor] = field(default_factory=list)  # (B, K) row each row came from
    # (B, K) token appended, -1 none; or (B, K, S): the tokens appended over S frames that
    # `advance_many` folded into one step (`parents` then points across all of them)
    emitted: list[torch.Tensor] = field(default_factory=list)


# The per-stream tensors of a `CTCBeamState`, row b being stream b.
_ROW_FIELDS = (
    *("blank", "nonblank", "last", "key", "parent_key", "length"),
    *("skipped", "pending", "frames", "fused"),
)


class CTCPrefixBeamSearch:
    """Batched CTC prefix beam search (Hannun et al. 2014) written with tensors.

    All streams of a batch advance together, one frame per step; per-hypothesis bookkeeping is
    (B, K) tensors and prefix merging is a hash comparison, so the Python loop runs once per
    frame, not once per hypothesis. Pruning: each prefix is extended only by the frame's
    `prune_top_k` best tokens within `prune_threshold` nats of the best one. With `blank_skip`,
    frames whose blank probability reaches it are not searched: they only move every prefix's
    probability onto its blank ending (dropping the rarely-useful repeat-through-blank paths).

    Streaming: `init`, then `advance` with each chunk of log-probs, `finalize` (or `best` for a
    partial result) at any point; the result equals one `advance` over the whole utterance.

    Fusion: with a `Fusion` of scorers (language models, hotwords, length bonus), a prefix is
    ranked by its CTC log-probability plus its weighted scorer total, which is added when a
    token extends it (and at eos in `finalize`); blank and nonblank stay pure CTC, so merging
    is unchanged and streaming stays exact.

    Cancellation: given a `CancelToken`, the search checks it every `CHECK_FRAMES` searched
    frames; `Cancelled` leaves the state half-advanced (throw it away).
    """

    def __init__(self, options: DecodeOptions, fusion: Fusion | None = None) -> None:
        self.fusion = fusion if fusion else None
        self.beam = options.beam
        self.nbest = min(options.nbest, options.beam)
        self.top_k = options.prune_top_k
        self.threshold = options.prune_threshold
        self.skip_log_prob = None if options.blank_skip is None else math.log(options.blank_skip)

    def init(self, batch: int, device: torch.device | str = "cpu") -> CTCBeamState:
        k = self.beam
        blank = torch.full((batch, k), -math.inf, device=device)
        blank[:, 0] = 0.0  # only the empty prefix is alive
        ints = torch.zeros((batch, k), dtype=torch.long, device=device)
        fusion = self.fusion
        return CTCBeamState(
            blank=blank,
            nonblank=torch.full_like(blank, -math.inf),
            last=ints - 1,
            key=ints.clone(),
            parent_key=ints - 1,  # matches no key: the empty prefix has no parent
            length=ints.clone(),
            skipped=torch.zeros(batch, device=device),
            pending=torch.zeros(batch, dtype=torch.bool, device=device),
            frames=torch.zeros(batch, dtype=torch.long, device=device),
            fused=None if fusion is None else torch.zeros((batch, k), device=device),
            scorer_state=None if fusion is None else fusion.init(batch * k, device),
        )

    def __call__(
        self,
        log_probs: torch.Tensor,
        lengths: torch.Tensor,
        *,
        cancel: CancelToken | None = None,
    ) -> list[list[Hypothesis]]:
        """Whole utterances: log_probs (B, T, V), lengths (B,) -> n-best per utterance."""
        state = self.init(log_probs.shape[0], log_probs.device)
        return self.finalize(self.advance(state, log_probs, lengths, cancel=cancel))

    @torch.inference_mode()
    def advance(
        self,
        state: CTCBeamState,
        log_probs: torch.Tensor,
        lengths: torch.Tensor,
        *,
        cancel: CancelToken | None = None,
    ) -> CTCBeamState:
        """Consume the next frames: log_probs (B, T, V) float, lengths (B,) valid frames of it."""
        self._advance(state, log_probs, lengths, cancel)
        return state

    @torch.inference_mode()
    def advance_many(self, states: Sequence[CTCBeamState], chunks: Sequence[torch.Tensor]) -> None:
        """Advance each of several searches (states of one stream each, from this search or
        an equal one: same options and scorers) over its own next frames chunks[i] (T_i, V),
        as one batched `advance`: the states are joined row-wise, advanced, and each handed
        back its row, with back-pointers for the frames it searched only. Every row of the
        search is computed on its own, so each state ends exactly as its own `advance`
        would leave it."""
        if len(states) != len(chunks):
            raise ValueError(f"{len(states)} states, {len(chunks)} chunks")
        if not states:
            return
        if any(s.blank.shape[0] != 1 for s in states):
            raise ValueError("advance_many takes states of one stream each")
        joined = self._join(states)
        lengths = torch.tensor([c.shape[0] for c in chunks])
        padded = torch.nn.utils.rnn.pad_sequence(list(chunks), batch_first=True)
        searched = self._advance(joined, padded, lengths, None)
        # The chunk's back-pointers folded into one step: each row's source row before the
        # chunk and the tokens its path appended (B, K, S) (a stream's steps after its own
        # frames are identity, appending nothing), so that a partial result's backtrack
        # walks one step per chunk, not per frame. Copied per stream: a stream's history
        # holds its own rows only, not the batch's.
        folded: tuple[torch.Tensor, torch.Tensor] | None = None
        if joined.parents:
            rows = torch.arange(self.beam).expand(len(states), -1)
            tokens = []
            for parents, emitted in zip(
                reversed(joined.parents), reversed(joined.emitted), strict=True
            ):
                tokens.append(emitted.gather(1, rows))
                rows = parents.gather(1, rows)
            folded = rows, torch.stack(tokens[::-1], dim=2)
        for b, state in enumerate(states):
            for name in _ROW_FIELDS:
                if (value := getattr(joined, name)) is not None:
                    setattr(state, name, value[b : b + 1])
            if folded is not None and (steps := int(searched[b])):
                state.parents.append(folded[0][b : b + 1].clone())
                state.emitted.append(folded[1][b : b + 1, :, :steps].clone())
            if self.fusion is not None:
                k = self.beam
                rows = torch.arange(b * k, (b + 1) * k, device=joined.blank.device)
                state.scorer_state = self.fusion.advance(
                    joined.scorer_state, rows, torch.full_like(rows, -1)
                )

    def _join(self, states: Sequence[CTCBeamState]) -> CTCBeamState:
        """The states of several searches as one batch (without back-pointers)."""
        fields: dict[str, Any] = {
            name: torch.cat([getattr(s, name) for s in states])
            for name in _ROW_FIELDS
            if getattr(states[0], name) is not None
        }
        if self.fusion is not None:
            fields["scorer_state"] = self.fusion.join([s.scorer_state for s in states])
        return CTCBeamState(**fields)

    def _advance(
        self,
        state: CTCBeamState,
        log_probs: torch.Tensor,
        lengths: torch.Tensor,
        cancel: CancelToken | None,
    ) -> torch.Tensor:
        """`advance`; returns the frames searched of each stream (B,) (the rest were blank
        frames skipped): the steps after them left that stream unchanged."""
        batch, width, vocab = log_probs.shape
        if batch != state.blank.shape[0]:
            raise ValueError(f"state has {state.blank.shape[0]} streams, log_probs {batch}")
        if width == 0:
            return torch.zeros(batch, dtype=torch.long)
        log_probs = log_probs.float()
        device = log_probs.device
        lengths = lengths.to(device)
        valid = lengths_to_mask(lengths, width)  # (B, T)
        keep = valid
        if self.skip_log_prob is not None:
            keep = valid & (log_probs[..., BLANK_ID] < self.skip_log_prob)
        skipped = valid & ~keep
        # Searched frames of each stream moved to the front, in order: (B, T2).
        counts = keep.sum(dim=1)
        steps = int(counts.max()) if batch else 0
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :steps]
        frames = log_probs.gather(1, order.unsqueeze(-1).expand(-1, -1, vocab))  # (B, T2, V)
        # Blank log-prob and count of the skipped frames just before each searched frame.
        skip_lp = torch.where(skipped, log_probs[..., BLANK_ID], 0.0).cumsum(dim=1)  # (B, T)
        skip_n = skipped.long().cumsum(dim=1)
        lp_at, n_at = skip_lp.gather(1, order), skip_n.gather(1, order)  # (B, T2)
        zero = lp_at.new_zeros(batch, 1)
        before_lp = lp_at - torch.cat([zero, lp_at[:, :-1]], dim=1)
        before_n = n_at - torch.cat([zero.long(), n_at[:, :-1]], dim=1)
        if steps:
            before_lp[:, 0] += state.skipped
            before_n[:, 0] += state.pending.long()
        # Candidate tokens of every frame at once (blank is id 0, so the rest start at 1).
        n_cand = vocab - 1 if self.top_k is None else min(self.top_k, vocab - 1)
        cand_lp, cand = frames[..., 1:].topk(n_cand, dim=-1)  # (B, T2, C), best first
        cand = cand + 1
        if self.threshold is not None:
            cand_lp = cand_lp.masked_fill(cand_lp < cand_lp[..., :1] - self.threshold, -math.inf)
        all_active = int(counts.min())
        for s in range(steps):
            if cancel is not None and s % CHECK_FRAMES == 0:
                cancel.check()
            self._step(
                state,
                frames[:, s],
                (cand[:, s], cand_lp[:, s]),
                None if s < all_active else s < counts,
                before_n[:, s] > 0,
                before_lp[:, s],
            )
        # Blank frames skipped after the last searched one stay pending for the next chunk.
        total_lp, total_n = skip_lp[:, -1], skip_n[:, -1]
        last_searched = (counts - 1).clamp(min=0)[:, None]
        last_lp = lp_at.gather(1, last_searched)[:, 0] if steps else zero[:, 0]
        last_n = n_at.gather(1, last_searched)[:, 0] if steps else zero[:, 0].long()
        tail_lp = torch.where(counts > 0, total_lp - last_lp, total_lp + state.skipped)
        tail_n = torch.where(counts > 0, total_n - last_n, total_n + state.pending.long())
        state.skipped, state.pending = tail_lp, tail_n > 0
        state.frames = state.frames + lengths
        return counts

    def _step(
        self,
        state: CTCBeamState,
        lp: torch.Tensor,
        candidates: tuple[torch.Tensor, torch.Tensor],
        active: torch.Tensor | None,
        collapse: torch.Tensor,
        collapse_lp: torch.Tensor,
    ) -> None:
        """Search one frame lp (B, V) with its candidate tokens and their log-probs (B, C)
        for the `active` (B,) streams (None: all); `collapse` (B,) marks streams whose
        skipped blank frames (log-prob `collapse_lp`) come first."""
        batch, k = state.blank.shape
        ninf = -math.inf
        pb, pnb, last = state.blank, state.nonblank, state.last
        if bool(collapse.any()):
            merged = torch.logaddexp(pb, pnb) + collapse_lp[:, None]
            pb = torch.where(collapse[:, None], merged, pb)
            pnb = torch.where(collapse[:, None], ninf, pnb)
        total = torch.logaddexp(pb, pnb)  # (B, K)
        alive = total > ninf
        lp_last = lp.gather(1, last.clamp(min=0)).masked_fill(last < 0, ninf)  # (B, K)
        stay_b = total + lp[:, BLANK_ID : BLANK_ID + 1]
        stay_nb = pnb + lp_last
        cand, cand_lp = candidates
        n_cand = cand.shape[1]
        # A repeated token only extends paths that end in blank ("a _ a" -> "aa").
        repeat = cand[:, None, :] == last[:, :, None]  # (B, K, C)
        ext = torch.where(repeat, pb[:, :, None], total[:, :, None]) + cand_lp[:, None, :]
        # Row k' is row j extended by last[k'] when its parent key is j's key: that extension
        # adds to k' (prefix merging) and leaves the candidates.
        match = (state.parent_key[:, None, :] == state.key[:, :, None]) & (
            state.length[:, None, :] == state.length[:, :, None] + 1
        )
        match &= alive[:, :, None] & alive[:, None, :]  # (B, K_j, K')
        has = match.any(dim=1)  # (B, K')
        if bool(has.any()):
            # At most one j matches (rows are distinct prefixes): its index by a dot product.
            j = (match.long() * torch.arange(k, device=lp.device)[None, :, None]).sum(dim=1)
            same = last.gather(1, j) == last
            from_j = torch.where(same, pb.gather(1, j), total.gather(1, j)) + lp_last
            stay_nb = torch.where(has, torch.logaddexp(stay_nb, from_j), stay_nb)
            pos_eq = cand[:, None, :] == last[:, :, None]  # (B, K', C)
            drop = has & pos_eq.any(dim=-1)
            pos = (pos_eq.long() * torch.arange(n_cand, device=lp.device)).sum(dim=-1)
            flat = torch.where(drop, j * n_cand + pos, k * n_cand)  # k * C: a dummy column
            ext = torch.cat([ext.flatten(1), ext.new_full((batch, 1), ninf)], dim=1)
            ext = ext.scatter(1, flat, ninf)[:, :-1]
        scores = torch.cat([torch.logaddexp(stay_b, stay_nb), ext.flatten(1)], dim=1)
        fused = None
        if state.fused is not None and self.fusion is not None:
            # Ranked by CTC + fusion; a candidate's fusion score is that of its row's scorers.
            extra = self.fusion.scores(state.scorer_state).reshape(batch, k, -1)  # (B, K, V)
            extra = extra.gather(2, cand[:, None, :].expand(-1, k, -1))  # (B, K, C)
            fused = torch.cat(
                [state.fused, (state.fused[:, :, None] + extra).flatten(1)], dim=1
            )  # (B, K + K * C)
            _, idx = (scores + fused).topk(k, dim=1)
            top = scores.gather(1, idx)
        else:
            top, idx = scores.topk(k, dim=1)  # (B, K)
        is_ext = idx >= k
        src = torch.where(is_ext, (idx - k) // n_cand, idx)
        tok = cand.gather(1, ((idx - k) % n_cand).clamp(min=0))
        key = state.key.gather(1, src)
        new = {
            "blank": torch.where(is_ext, ninf, stay_b.gather(1, src)),
            "nonblank": torch.where(is_ext, top, stay_nb.gather(1, src)),
            "last": torch.where(is_ext, tok, last.gather(1, src)),
            "key": torch.where(is_ext, (key * _HASH_BASE + tok + 1) % _HASH_MOD, key),
            "parent_key": torch.where(is_ext, key, state.parent_key.gather(1, src)),
            "length": state.length.gather(1, src) + is_ext.long(),
        }
        if fused is not None:
            new["fused"] = fused.gather(1, idx)
        parents, emitted = src, torch.where(is_ext, tok, -1)
        if active is not None:
            # Inactive streams (past their length) keep everything; `pb`/`pnb` include a
            # collapse only for active streams, since skipped frames precede a searched one.
            rows = active[:, None]
            new = {
                name: torch.where(rows, value, getattr(state, name)) for name, value in new.items()
            }
            parents = torch.where(rows, src, torch.arange(k, device=src.device).expand(batch, k))
            emitted = torch.where(rows, emitted, -1)
        for name, value in new.items():
            setattr(state, name, value)
        if self.fusion is not None:
            rows = (parents + torch.arange(batch, device=src.device)[:, None] * k).flatten()
            state.scorer_state = self.fusion.advance(state.scorer_state, rows, emitted.flatten())
        state.parents.append(parents)
        state.emitted.append(emitted)

    def finalize(self, state: CTCBeamState) -> list[list[Hypothesis]]:
        """The `nbest` best prefixes of each stream, best first, with total log-probs (plus
        the fusion scores, eos included, when fused)."""
        score = torch.logaddexp(state.blank, state.nonblank) + state.skipped[:, None]  # (B, K)
        if state.fused is not None and self.fusion is not None:
            ends = self.fusion.scores(state.scorer_state)[:, SOS_EOS_ID]
            score = score + state.fused + ends.reshape(score.shape)
        top, rows = score.topk(self.nbest, dim=1)  # (B, N)
        tokens = self._backtrack(state, rows)  # (B, N) lists
        return [
            [
                Hypothesis(tuple(toks), float(s))
                for toks, s in zip(row_tokens, row_scores, strict=True)
                if s > -math.inf
            ]
            for row_tokens, row_scores in zip(tokens, top.tolist(), strict=True)
        ]

    def best(self, state: CTCBeamState) -> list[list[int]]:
        """Token ids of the current best prefix of each stream (a partial result)."""
        rows = self.ranking(state).argmax(dim=1, keepdim=True)
        return [row[0] for row in self._backtrack(state, rows)]

    @staticmethod
    def ranking(state: CTCBeamState) -> torch.Tensor:
        """What the beam's rows (B, K) are ranked by: CTC log-prob (+ fusion so far)."""
        total = torch.logaddexp(state.blank, state.nonblank)
        return total if state.fused is None else total + state.fused

    @staticmethod
    def _backtrack(state: CTCBeamState, rows: torch.Tensor) -> list[list[list[int]]]:
        """Token ids of beam rows `rows` (B, N), following the back-pointers."""
        steps: list[torch.Tensor] = []
        for parents, emitted in zip(reversed(state.parents), reversed(state.emitted), strict=True):
            if emitted.dim() == 3:  # folded frames (B, K, S)
                index = rows[..., None].expand(-1, -1, emitted.shape[2])
                steps.append(emitted.gather(1, index))
            else:
                steps.append(emitted.gather(1, rows)[..., None])
            rows = parents.gather(1, rows)
        if not steps:
            return [[[] for _ in range(rows.shape[1])] for _ in range(rows.shape[0])]
        emitted_seq = torch.cat(steps[::-1], dim=2).tolist()  # (B, N, S)
        return [[[t for t in seq if t >= 0] for seq in utt] for utt in emitted_seq]
