"""Attention decoding over a narrow step interface: beam search, joint CTC/attention scoring
(CTC prefix scores, Watanabe et al. 2017) and two-pass rescoring of CTC n-best lists.

The search never touches a model's modules: it needs `encode`, `init_state` and `step` (the
`StepModel` protocol), an encoder output whose rows can be picked per hypothesis and a decoder state
that can be reordered. Everything runs batched over utterances x beams.

Each search takes an optional `CancelToken`, checked at every output step (and every
`CHECK_FRAMES` frames of a CTC prefix-score update, a loop over the whole utterance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeVar

import torch

from asr.cancel import CHECK_FRAMES, CancelToken
from asr.decoding.options import DecodeOptions, Hypothesis
from asr.decoding.scorers import Fusion
from asr.tokenizer import BLANK_ID, SOS_EOS_ID


class Encoded(Protocol):
    lengths: torch.Tensor  # (B,) valid encoder frames
    ctc_log_probs: torch.Tensor | None  # (B, T_ctc, V) or None without a CTC head
    ctc_lengths: torch.Tensor  # (B,) valid frames of ctc_log_probs

    def select(self, rows: torch.Tensor) -> Self: ...


class DecoderState(Protocol):
    attention: torch.Tensor  # (N, T') attention weights of the last step

    def select(self, indices: torch.Tensor) -> Self: ...


E = TypeVar("E", bound=Encoded)
S = TypeVar("S", bound=DecoderState)
E_contra = TypeVar("E_contra", bound=Encoded, contravariant=True)


class StepModel(Protocol[E_contra, S]):
    """What attention decoding needs from a model (LAS implements it, after its `encode`)."""

    def init_state(self, enc: E_contra, /) -> S: ...

    def step(self, enc: E_contra, state: S, tokens: torch.Tensor, /) -> tuple[torch.Tensor, S]: ...


@dataclass
class CTCPrefixState:
    """CTC forward variables of N prefixes over all T' frames of their utterance."""

    nonblank: torch.Tensor  # (T', N) log P(frames 0..t, prefix, last frame not blank)
    blank: torch.Tensor  # (T', N) ... last frame blank
    score: torch.Tensor  # (N,) prefix score log P(prefix, anything after)
    last: torch.Tensor  # (N,) last token, -1 for the empty prefix

    def select(self, rows: torch.Tensor) -> CTCPrefixState:
        return CTCPrefixState(
            self.nonblank[:, rows], self.blank[:, rows], self.score[rows], self.last[rows]
        )


class CTCPrefixScorer:
    """Prefix scores of candidate extensions under a CTC model (Watanabe et al. 2017, Alg. 2),
    vectorised over hypotheses and candidates; one loop over the T' frames per output token."""

    def __init__(
        self, log_probs: torch.Tensor, lengths: torch.Tensor, cancel: CancelToken | None = None
    ) -> None:
        """log_probs: (N, T', V) CTC log-probs of each hypothesis' utterance; lengths (N,)."""
        self.cancel = cancel
        self.x = log_probs.float().transpose(0, 1)  # (T', N, V)
        self.lengths = lengths.to(log_probs.device)
        frames = self.x.shape[0]
        steps = torch.arange(frames, device=log_probs.device)
        self.valid = steps[:, None] < self.lengths  # (T', N)

    def select(self, rows: torch.Tensor) -> CTCPrefixScorer:
        """The scorer of hypotheses `rows` (N',) only."""
        out = CTCPrefixScorer.__new__(CTCPrefixScorer)
        out.x, out.lengths, out.valid = self.x[:, rows], self.lengths[rows], self.valid[:, rows]
        out.cancel = self.cancel
        return out

    def initial(self) -> CTCPrefixState:
        """The empty prefix: only blanks so far."""
        blank = self.x[:, :, BLANK_ID].cumsum(dim=0)  # (T', N)
        n = blank.shape[1]
        return CTCPrefixState(
            nonblank=torch.full_like(blank, -math.inf),
            blank=blank,
            score=blank.new_zeros(n),
            last=torch.full((n,), -1, dtype=torch.long, device=blank.device),
        )

    def extend(
        self, state: CTCPrefixState, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefix scores of each prefix extended by each of tokens (N, C).

        Returns (scores (N, C), nonblank (T', N, C), blank (T', N, C)); eos scores the prefix
        as complete (all frames consumed).
        """
        frames, n = state.blank.shape
        cand = tokens.shape[1]
        x_tok = self.x.gather(2, tokens.unsqueeze(0).expand(frames, -1, -1))  # (T', N, C)
        x_blank = self.x[:, :, BLANK_ID : BLANK_ID + 1]  # (T', N, 1)
        prev_total = torch.logaddexp(state.nonblank, state.blank)  # (T', N)
        # phi: paths of the prefix after which the new token may start; a repeated token
        # needs a blank in between.
        repeat = tokens == state.last[:, None]  # (N, C)
        phi = torch.where(repeat, state.blank[:, :, None], prev_total[:, :, None])  # (T', N, C)
        ninf = torch.full((n, cand), -math.inf, device=x_tok.device)
        r_nb = [torch.where(state.last[:, None] < 0, x_tok[0], ninf)]  # t = 0: first token only
        r_b = [ninf]
        for t in range(1, frames):
            if self.cancel is not None and t % CHECK_FRAMES == 0:
                self.cancel.check()
            r_nb.append(torch.logaddexp(r_nb[-1], phi[t - 1]) + x_tok[t])
            r_b.append(torch.logaddexp(r_nb[-2], r_b[-1]) + x_blank[t])
        nonblank, blank = torch.stack(r_nb), torch.stack(r_b)  # (T', N, C)
        # psi: the new token starts at some frame t < T (frame 0 only for the empty prefix).
        starts = torch.cat([r_nb[0][None], phi[:-1] + x_tok[1:]], dim=0)
        starts = starts.masked_fill(~self.valid[:, :, None], -math.inf)
        scores = starts.logsumexp(dim=0)  # (N, C)
        final = prev_total.gather(0, (self.lengths - 1).clamp(min=0)[None])[0]  # (N,)
        scores = torch.where(tokens == SOS_EOS_ID, final[:, None], scores)
        return scores, nonblank, blank

    @staticmethod
    def choose(
        state: CTCPrefixState,
        rows: torch.Tensor,
        cols: torch.Tensor,
        scores: torch.Tensor,
        nonblank: torch.Tensor,
        blank: torch.Tensor,
        tokens: torch.Tensor,
    ) -> CTCPrefixState:
        """The state of prefix `rows` (M,) extended by candidate `cols` (M,)."""
        return CTCPrefixState(
            nonblank=nonblank[:, rows, cols],
            blank=blank[:, rows, cols],
            score=scores[rows, cols],
            last=tokens[rows, cols],
        )


def _length_bounds(
    lengths: torch.Tensor, options: DecodeOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max output tokens per utterance from its encoder frames (B,)."""
    frames = lengths.double()
    max_len = (frames * options.max_len_ratio).ceil().long().clamp(min=1)
    min_len = (frames * options.min_len_ratio).floor().long().clamp(max=max_len - 1)
    return min_len, max_len


@torch.no_grad()
def attention_beam_search(
    model: StepModel[E, S],
    enc: E,
    options: DecodeOptions,
    *,
    joint: bool = False,
    fusion: Fusion | None = None,
    cancel: CancelToken | None = None,
) -> list[list[Hypothesis]]:
    """Beam search over `model.step`, batched over B utterances x K beams.

    enc: the encoder output of B utterances. Finished hypotheses are ranked by
    score / (tokens + 1) ** length_penalty (+ coverage bonus); the search for an utterance
    stops once it has K finished hypotheses or reaches max_len_ratio * T' tokens. With
    `joint`, each step scores the `joint_candidates` best attention tokens with the model's
    CTC head: (1 - ctc_weight) * attention + ctc_weight * CTC prefix score. A `fusion` of
    scorers (language model, hotwords, length bonus) adds its weighted scores to every step,
    eos included (candidates for CTC scoring are the best by attention + fusion).
    Returns the `nbest` best per utterance with their (unnormalised) log-prob scores; raises
    `Cancelled` at a step where `cancel` says stop.
    """
    batch, k = enc.lengths.shape[0], options.beam
    n = batch * k
    device = enc.lengths.device
    enc_k = enc.select(torch.arange(batch, device=device).repeat_interleave(k))
    state = model.init_state(enc_k)
    min_len, max_len = _length_bounds(enc.lengths, options)
    scores = torch.full((batch, k), -math.inf, device=device)
    scores[:, 0] = 0.0  # one live hypothesis (sos) per utterance to start
    tokens = torch.full((n,), SOS_EOS_ID, dtype=torch.long, device=device)
    history = torch.zeros((batch, k, 0), dtype=torch.long, device=device)
    coverage = torch.zeros_like(state.attention) if options.coverage_weight > 0 else None
    weight = options.ctc_weight if joint else 0.0
    ctc: CTCPrefixScorer | None = None
    ctc_state: CTCPrefixState | None = None
    if weight > 0:
        if enc_k.ctc_log_probs is None:
            raise ValueError("joint decoding needs a model with a CTC head (ctc_weight > 0)")
        ctc = CTCPrefixScorer(enc_k.ctc_log_probs, enc_k.ctc_lengths, cancel)
        ctc_state = ctc.initial()
    n_cand = options.joint_candidates or max(int(1.5 * k), 1)
    fusion = fusion if fusion else None
    fusion_state: tuple[Any, ...] = () if fusion is None else fusion.init(n, device)
    finished: list[list[tuple[float, float, tuple[int, ...]]]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    offsets = (torch.arange(batch, device=device) * k)[:, None]  # (B, 1)
    utts = list(range(batch))  # the utterance of each row of the (shrinking) batch

    for i in range(int(max_len.max())):
        if cancel is not None:
            cancel.check()
        log_probs, state = model.step(enc_k, state, tokens)  # (N, V)
        if coverage is not None:
            coverage = coverage + state.attention
        log_probs[:, BLANK_ID] = -math.inf  # the attention decoder never emits blank
        too_short = (min_len > i).repeat_interleave(k)
        log_probs[:, SOS_EOS_ID] = log_probs[:, SOS_EOS_ID].masked_fill(too_short, -math.inf)
        if options.eos_threshold is not None:
            best = log_probs.max(dim=-1).values
            weak = log_probs[:, SOS_EOS_ID] < best - options.eos_threshold
            log_probs[:, SOS_EOS_ID] = log_probs[:, SOS_EOS_ID].masked_fill(weak, -math.inf)
        extra = None if fusion is None else fusion.scores(fusion_state)  # (N, V)
        if ctc is not None and ctc_state is not None:
            ranked = log_probs if extra is None else log_probs + extra
            _, cand = ranked.topk(min(n_cand, log_probs.shape[1]), dim=-1)  # (N, C)
            att = log_probs.gather(1, cand)
            ctc_scores, ctc_nb, ctc_b = ctc.extend(ctc_state, cand)
            step_scores = (1 - weight) * att + weight * (ctc_scores - ctc_state.score[:, None])
            if extra is not None:
                step_scores = step_scores + extra.gather(1, cand)
            step_scores = step_scores.masked_fill(att == -math.inf, -math.inf)
        else:
            step_scores, cand = log_probs if extra is None else log_probs + extra, None
        width = step_scores.shape[1]
        total = (scores.reshape(n, 1) + step_scores).reshape(batch, k * width)
        cand_tokens = (
            cand if cand is not None else torch.arange(width, device=device).expand(n, width)
        ).reshape(batch, k * width)
        is_eos = cand_tokens == SOS_EOS_ID
        # eos among the K best ends a hypothesis; the K best others carry on. At the length
        # limit they end too (as greedy decoding does).
        top, top_idx = total.topk(k, dim=1)
        last_step = max_len <= i + 1  # (B,)
        ends = (is_eos.gather(1, top_idx) | last_step[:, None]) & (top > -math.inf)
        ends &= ~done[:, None]
        for b, j in ends.nonzero().tolist():
            flat = int(top_idx[b, j])
            beam, _tok = divmod(flat, width)
            seq = history[b, beam].tolist()
            tok_id = int(cand_tokens[b, flat])
            if tok_id != SOS_EOS_ID:
                seq.append(tok_id)
            raw = float(top[b, j])
            ranked = raw / float(len(seq) + 1) ** options.length_penalty
            if coverage is not None:
                attended = coverage[b * k + beam] > options.coverage_threshold
                ranked += options.coverage_weight * float(attended.sum())
            finished[utts[b]].append((ranked, raw, tuple(seq)))
        enough = torch.tensor([len(finished[u]) >= k for u in utts], device=device)
        done |= last_step | enough
        if bool(done.all()):
            break
        live, live_idx = total.masked_fill(is_eos, -math.inf).topk(k, dim=1)  # (B, K)
        beam_idx = live_idx // width
        rows = (offsets + beam_idx).reshape(n)
        tokens = cand_tokens.gather(1, live_idx).reshape(n)
        state = state.select(rows)
        if coverage is not None:
            coverage = coverage.index_select(0, rows)
        if fusion is not None:
            fusion_state = fusion.advance(fusion_state, rows, tokens)
        if ctc is not None and ctc_state is not None:
            cols = (live_idx % width).reshape(n)
            assert cand is not None
            ctc_state = ctc.choose(ctc_state, rows, cols, ctc_scores, ctc_nb, ctc_b, cand)
        history = torch.cat(
            [
                history.gather(1, beam_idx[:, :, None].expand(-1, -1, history.shape[2])),
                tokens.reshape(batch, k, 1),
            ],
            dim=2,
        )
        scores = live
        if bool(done.any()):
            # Finished utterances leave the batch; the rest go on as a smaller one.
            keep = (~done).nonzero()[:, 0]  # (B',)
            rows = (keep[:, None] * k + torch.arange(k, device=device)).reshape(-1)
            enc_k, state, tokens = enc_k.select(rows), state.select(rows), tokens[rows]
            if coverage is not None:
                coverage = coverage.index_select(0, rows)
            if fusion is not None:
                fusion_state = fusion.advance(fusion_state, rows, torch.full_like(rows, -1))
            if ctc is not None and ctc_state is not None:
                ctc, ctc_state = ctc.select(rows), ctc_state.select(rows)
            history, scores = history[keep], scores[keep]
            min_len, max_len = min_len[keep], max_len[keep]
            utts = [utts[b] for b in keep.tolist()]
            batch, n = len(utts), len(utts) * k
            offsets = (torch.arange(batch, device=device) * k)[:, None]
            done = torch.zeros(batch, dtype=torch.bool, device=device)
    nbest = min(options.nbest, k)
    results = []
    for hyps in finished:
        hyps.sort(key=lambda h: -h[0])
        results.append([Hypothesis(seq, raw) for _, raw, seq in hyps[:nbest]])
    return results


@torch.no_grad()
def attention_scores(
    model: StepModel[E, S],
    enc: E,
    rows: torch.Tensor,
    hyps: Sequence[Sequence[int]],
    cancel: CancelToken | None = None,
) -> torch.Tensor:
    """log P_att(y + eos | x) of each hypothesis (teacher forcing through `step`).

    enc: encoder output of B utterances; rows (M,): the utterance of each of the M hyps.
    Returns (M,) float32.
    """
    device = rows.device
    m = len(hyps)
    if m == 0:
        return torch.zeros(0, device=device)
    width = max(len(h) for h in hyps) + 1
    targets = torch.full((m, width), SOS_EOS_ID, dtype=torch.long, device=device)
    for i, h in enumerate(hyps):
        if h:
            targets[i, : len(h)] = torch.tensor(h, dtype=torch.long, device=device)
    lengths = torch.tensor([len(h) + 1 for h in hyps], device=device)  # tokens + eos
    enc_m = enc.select(rows)
    state = model.init_state(enc_m)
    inputs = torch.full((m,), SOS_EOS_ID, dtype=torch.long, device=device)
    total = torch.zeros(m, device=device)
    for t in range(width):
        if cancel is not None:
            cancel.check()
        log_probs, state = model.step(enc_m, state, inputs)
        picked = log_probs.gather(1, targets[:, t : t + 1])[:, 0]
        total += torch.where(t < lengths, picked, 0.0)
        inputs = targets[:, t]
    return total


def rescore(
    model: StepModel[E, S],
    enc: E,
    nbest: Sequence[Sequence[Hypothesis]],
    options: DecodeOptions,
    cancel: CancelToken | None = None,
    fusion: Fusion | None = None,
) -> list[list[Hypothesis]]:
    """Second pass: re-rank CTC n-best lists (scores = CTC log-probs) of the B utterances of
    `enc` by (1 - ctc_weight) * log P_att(y + eos | x) + ctc_weight * CTC score.

    With a `fusion`, the n-best came from a search fused with it (score = CTC + F), and
    (1 - ctc_weight) * F is added, so the fusion keeps its full weight: (1 - w) att + w CTC + F.
    """
    rows = [b for b, hyps in enumerate(nbest) for _ in hyps]
    flat = [h for hyps in nbest for h in hyps]
    device = enc.lengths.device
    att = attention_scores(
        model,
        enc,
        torch.tensor(rows, dtype=torch.long, device=device),
        [h.tokens for h in flat],
        cancel,
    ).tolist()
    weight = options.ctc_weight
    extra = [0.0] * len(flat)
    if fusion:
        extra = fusion.sequence_scores([h.tokens for h in flat], device).tolist()
    ranked: list[list[Hypothesis]] = [[] for _ in nbest]
    for b, h, a, f in zip(rows, flat, att, extra, strict=True):
        ranked[b].append(Hypothesis(h.tokens, (1 - weight) * (a + f) + weight * h.score))
    for hyps in ranked:
        hyps.sort(key=lambda h: -h.score)
    return [hyps[: options.nbest] for hyps in ranked]
