"""StreamingSession: audio chunks in, interim and final results out, for one stream.

Samples go through incremental log-mel features, the latency-controlled BiLSTM-CTC encoder
(`BiLSTMCTCStream`) and the incremental CTC prefix beam search, so the work per chunk is
proportional to the chunk, never to the audio so far. Endpointing follows the CTC output: once
a segment has speech (a non-blank best token), a run of blank frames as long as
`trailing_silence`, or a segment reaching `max_segment`, closes it; its final result is the
beam search's n-best, or with the recognizer's LAS bundle a second pass over the segment
(`rescore`: the n-best rescored; `joint`: attention beam search scored with the streamed CTC
posteriors), with word timings counted from the start of the stream. Memory is bounded by one
segment.

Interim results may read ahead (`lookahead=True`): the encoder emits a block's frames only
once it has their right context, but it has already run over that right context, so a partial
can be the search's best prefix followed by the best path through the right-context frames'
provisional log-probs (`BiLSTMCTC.lc_block`'s look-ahead), once the segment has speech. A word
whose CTC peak lies in the right context then no longer waits for the next block: on the demo
model at 6 + 4 blocks, 213 of 352 words of its held-out sentences showed complete sooner, none
later, 146 ms sooner on average. The look-ahead's tokens are counted in
`StreamResult.provisional` and lower the stability, and finals never use them. It is off by
default: those tokens are often a word's first units guessed wrong, without the LM the search
fuses ("THE GARDEN THISSLEEPI" where the search alone shows "THE GARDEN THIS"), and the first
partial comes no sooner (it waits for the search to find speech either way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from asr.config import Config
from asr.decoding.ctc import CTCBeamState, CTCPrefixBeamSearch
from asr.decoding.options import (
    Alternative,
    DecodeOptions,
    Hypothesis,
    Transcript,
    mean_confidence,
)
from asr.features import FeatureConfig, StreamingFeatures, accept_features
from asr.models.base import model_device
from asr.models.bilstm_ctc import BiLSTMCTC, BiLSTMCTCStream, push_streams, run_streams
from asr.models.las import LAS
from asr.recognizer import METHODS, Evidence, Posteriors, Recognizer
from asr.tokenizer import BLANK_ID

LEAD_SECONDS = 0.3  # silence kept before the first speech of a segment


@dataclass(frozen=True)
class EndpointConfig(Config):
    """When a segment ends (rules like sherpa-onnx's)."""

    trailing_silence: float = 0.8  # seconds of blank output after speech
    max_segment: float = 30.0  # seconds; a segment is cut here even without a pause

    def validate(self) -> None:
        self.check(
            {
                "trailing_silence": (self.trailing_silence > 0, "> 0 seconds"),
                "max_segment": (self.max_segment > 0, "> 0 seconds"),
            }
        )


@dataclass(frozen=True)
class StreamResult:
    """An interim (is_final False) or final result of the current segment."""

    transcript: Transcript
    is_final: bool
    # interim: probability share of the best prefix in the beam (times the look-ahead's path
    # probability when it adds tokens); final: 1
    stability: float
    start: float  # segment start, seconds from the start of the stream
    end: float  # end of the audio this result covers (the look-ahead's frames not counted)
    # interim: how many of the transcript's last tokens are the look-ahead's (read from
    # frames the encoder has seen with part of their right context, so they may change)
    provisional: int = 0


class StreamingSession:
    """One stream through a recognizer whose model is a latency-controlled BiLSTM-CTC."""

    def __init__(
        self,
        recognizer: Recognizer,
        options: DecodeOptions | None = None,
        endpoint: EndpointConfig | None = None,
        *,
        interim_results: bool = True,
        lookahead: bool = False,
    ) -> None:
        if not recognizer.can_stream:
            raise ValueError(
                f"{recognizer.bundle.path}: streaming needs a latency-controlled BiLSTM-CTC "
                "model (chunk_size > 0)"
            )
        model = recognizer.bundle.model
        assert isinstance(model, BiLSTMCTC)  # can_stream
        self.recognizer = recognizer
        self.options = options or recognizer.options
        recognizer.check(self.options)
        self.endpoint = endpoint or EndpointConfig()
        self.interim_results = interim_results
        self.lookahead = interim_results and lookahead
        self.model = model
        # Beam search for every method: greedy is its first-best, rescore rescores its n-best.
        beam = 1 if self.options.method == "greedy" else self.options.beam
        wide = self.options.method == "rescore"
        self.search = CTCPrefixBeamSearch(
            replace(self.options, beam=beam, nbest=beam if wide else self.options.nbest),
            None if self.options.method == "greedy" else recognizer.fusion(self.options),
        )
        self.features = StreamingFeatures(recognizer.bundle.feature_config)
        self.encoder = BiLSTMCTCStream(model)
        self.frame_seconds = recognizer.frame_seconds * model.time_reduction
        self.frames = 0  # encoder frames consumed in the stream
        self.finished = False
        # Samples not yet through the features: held until they complete an encoder block
        # (features come out the same however the audio is cut, and nothing can change
        # before a block runs), so a 100 ms chunk mostly costs a list append.
        self.held: list[torch.Tensor] = []
        self.held_samples = 0
        self._new_segment(0)

    @property
    def batch_key(self) -> tuple[int, DecodeOptions]:
        """Sessions with equal keys run their encoder and search batched (`accept_streams`):
        the same recognizer (model and scorers) and options."""
        return id(self.recognizer), self.options

    def _new_segment(self, frame: int) -> None:
        self.segment_start = frame  # encoder frames from the start of the stream
        self.state: CTCBeamState = self.search.init(1, model_device(self.model))
        self.log_probs: list[torch.Tensor] = []  # (n, V) per consumed piece
        # consumed log-probs (n, V) the search has not advanced over yet (`_sync`)
        self.unsearched: list[torch.Tensor] = []
        self.raw: list[torch.Tensor] = []  # (n, F) feature frames of the segment
        self.blank_run = 0
        self.has_speech = False
        self.last_partial = ""

    def state_bytes(self) -> int:
        """Bytes of the tensors this stream holds of its own (held samples, feature and
        encoder state, the search's beam and back-pointers, the segment's frames and
        log-probs), not the model's weights: what one more stream costs. Bounded by one
        segment (`EndpointConfig.max_segment`), however long the stream runs."""
        own = (self.held, self.features, self.encoder, self.state)
        return tensor_bytes((*own, self.log_probs, self.unsearched, self.raw))

    def accept(self, samples: torch.Tensor) -> list[StreamResult]:
        """Feed (N,) float 16 kHz samples; returns the finals of segments that ended and, with
        interim results on, the current partial when its text changed."""
        return accept_streams([self], [samples])[0]

    def _push(self, samples: torch.Tensor, ends: bool) -> torch.Tensor | None:
        """New samples (ends: the last); once they complete an encoder block, or at the end,
        the held samples that the features must now take (`accept_streams` runs them)."""
        if self.finished:
            raise RuntimeError("the stream is finished")
        self.finished = ends
        if samples.numel():
            self.held.append(samples)
            self.held_samples += samples.numel()
        due = ends or self.encoder.completes_block(self.features.frames_after(self.held_samples))
        if not due or not self.held:
            return None
        held = torch.cat(self.held) if len(self.held) > 1 else self.held[0]
        self.held, self.held_samples = [], 0
        return held

    def samples_until_due(self) -> int:
        """The fewest samples (>= 1) that the next `accept` calls must bring, together, before
        any of them does work: until then each returns nothing and changes nothing but the
        held audio, so a caller may hold that much audio itself (`server.engine`) and send it
        as one chunk. 0 once the stream is finished (the next `accept` raises)."""
        if self.finished:
            return 0

        def due(more: int) -> bool:
            frames = self.features.frames_after(self.held_samples + more)
            return self.encoder.completes_block(frames)

        low, high = 0, 1  # invariant: due(high), and low == 0 or not due(low)
        while not due(high):
            low, high = high, 2 * high
        while high - low > 1:  # the least `high` that is due: both are monotone in samples
            middle = (low + high) // 2
            low, high = (low, middle) if due(middle) else (middle, high)
        return high

    def _news(self, frames: int) -> list[StreamResult]:
        """With interim results on: the partial, if its text changed since the encoder stood
        at `frames` (the search is synced)."""
        # The encoder emits whole blocks, so most chunks add no frame and cannot change the
        # partial; the backtrack behind it is skipped for them.
        if not (self.interim_results and self.has_speech and self.frames != frames):
            return []
        partial = self._partial(self._lookahead())
        if partial.transcript.text == self.last_partial:  # only news goes to the client
            return []
        self.last_partial = partial.transcript.text
        return [partial]

    def finish(self) -> list[StreamResult]:
        """End of audio: the final result of the last segment (if it had speech)."""
        if self.finished:
            return []
        return accept_streams([self], [torch.zeros(0)], last=[True])[0]

    def _consume(self, log_probs: torch.Tensor) -> list[StreamResult]:
        """Advance over new encoder frames (n, V), closing segments at endpoints."""
        results = []
        best = log_probs.argmax(dim=-1).tolist()
        silence = math.ceil(self.endpoint.trailing_silence / self.frame_seconds)
        longest = math.ceil(self.endpoint.max_segment / self.frame_seconds)
        lead = math.ceil(LEAD_SECONDS / self.frame_seconds)
        base, start = self.frames, 0
        for i, token in enumerate(best):
            if token == BLANK_ID:
                self.blank_run += 1
            else:
                self.blank_run, self.has_speech = 0, True
            end = base + i + 1
            length = end - self.segment_start
            if self.has_speech and (self.blank_run >= silence or length >= longest):
                self._advance(log_probs[start : i + 1])
                results.append(self._final())
                start = i + 1
                self._restart(end)
            elif not self.has_speech and length >= 2 * lead:
                # Nothing said yet: keep only the last `lead` frames before speech starts, so
                # buffers stay bounded and max_segment counts from (just before) the speech.
                self._advance(log_probs[start : i + 1])
                start = i + 1
                self._restart(end - lead)
        self._advance(log_probs[start:])
        self.frames = base + len(best)
        return results

    def _restart(self, frame: int) -> None:
        """A new segment from encoder frame `frame`, keeping what the old one holds of it."""
        raw = torch.cat(self.raw) if self.raw else None
        log_probs = torch.cat(self.log_probs) if self.log_probs else None
        offset = frame - self.segment_start
        self._new_segment(frame)
        if raw is not None and raw.shape[0] > offset * self.model.time_reduction:
            self.raw.append(raw[offset * self.model.time_reduction :])
        if log_probs is not None and log_probs.shape[0] > offset:
            self._advance(log_probs[offset:])

    def _advance(self, log_probs: torch.Tensor) -> None:
        """Consume log-probs (n, V) into the segment; the search runs over them at `_sync`
        (batched with other streams' by `accept_streams`)."""
        if log_probs.shape[0]:
            self.log_probs.append(log_probs)
            self.unsearched.append(log_probs)

    def _sync(self) -> None:
        """Advance the search over the frames consumed since it last ran."""
        if self.unsearched:
            frames = torch.cat(self.unsearched)
            self.unsearched = []
            self.search.advance(self.state, frames[None], torch.tensor([frames.shape[0]]))

    def _lookahead(self) -> tuple[tuple[int, ...], float]:
        """The best path through the encoder's provisional right-context frames (`run_streams`'
        look-ahead): its tokens after the segment's frames (a token that goes on from the last
        of them is not repeated) and its probability. `_news` asks only once the segment has
        speech: right-context frames at the end of silence, with nothing after them, can read
        as a stray unit (the demo model showed a 'D' before the speech of 18 of its 66
        held-out sentences)."""
        ahead = self.encoder.lookahead
        if not self.lookahead or ahead is None or not ahead.shape[1]:
            return (), 1.0
        best_lp, best = ahead[0].max(dim=-1)  # (Nr,)
        previous = int(self.log_probs[-1][-1].argmax()) if self.log_probs else BLANK_ID
        tokens = []
        for token in best.tolist():
            if token not in (previous, BLANK_ID):
                tokens.append(token)
            previous = token
        return tuple(tokens), float(best_lp.sum().exp())

    def _partial(self, ahead: tuple[tuple[int, ...], float]) -> StreamResult:
        """The best prefix so far, followed by the look-ahead's tokens `ahead` (tokens, their
        probability): a word shows one block sooner than the search can commit to it; the
        stability counts both (the look-ahead's path probability times the prefix's share)."""
        self._sync()
        scores = self.search.ranking(self.state)[0]  # (K,)
        share = float((scores.max() - scores.logsumexp(dim=0)).exp())
        extra, p_extra = ahead
        tokens = tuple(self.search.best(self.state)[0]) + extra
        text = self.recognizer.bundle.tokenizer.decode(tokens)
        transcript = Transcript(text=text, tokens=tokens, score=float(scores.max()))
        stability = share * p_extra if extra else share
        return StreamResult(transcript, False, round(stability, 4), *self._span(), len(extra))

    def _span(self) -> tuple[float, float]:
        end = self.segment_start + sum(lp.shape[0] for lp in self.log_probs)
        return self.segment_start * self.frame_seconds, end * self.frame_seconds

    def _final(self) -> StreamResult:
        self._sync()
        hyps = self.search.finalize(self.state) or [[]]
        nbest = hyps[0] or [Hypothesis((), 0.0)]
        log_probs = torch.cat(self.log_probs) if self.log_probs else torch.zeros(0, 1)
        frames = log_probs.shape[0] * self.model.time_reduction
        raw = torch.cat(self.raw)[:frames] if self.raw else torch.zeros(0, 1)
        ctc = Posteriors(
            log_probs[None], torch.tensor([log_probs.shape[0]]), self.model.time_reduction
        )
        method = METHODS[self.options.method]
        # The second pass (rescore, joint) runs the batch methods over the segment, with the
        # posteriors and n-best streamed for it; too short a segment for the LAS listener's x8
        # reduction keeps the first pass.
        if method.needs and raw.shape[0] >= 8 * LAS.time_reduction:
            lengths = torch.tensor([raw.shape[0]])
            evidence = Evidence(self.recognizer, raw[None], lengths, ctc=ctc, ctc_nbest=[nbest])
            with torch.no_grad():
                nbest = method.search(evidence, self.options)[0] or nbest
        start, end = self._span()
        energy = raw.mean(dim=-1) if raw.numel() else None
        transcript = self.recognizer.transcript(nbest, self.options, ctc, 0, energy, offset=start)
        return StreamResult(transcript, True, 1.0, start, end)


def accept_streams(
    sessions: Sequence[StreamingSession],
    chunks: Sequence[torch.Tensor],
    last: Sequence[bool] | None = None,
) -> list[list[StreamResult]]:
    """Feed each session its chunk of (N,) float 16 kHz samples and return what each
    `accept` would, with the work of sessions of equal `batch_key` batched: one log-mel call
    and one subsampling call for all the sessions whose held audio completes a block
    (`accept_features`, `push_streams`), one batched encoder call per LC block for all the
    sessions with a block ready (`run_streams`) and one batched search over all their new
    frames (`CTCPrefixBeamSearch.advance_many`). Every session's results are its own alone,
    up to the float rounding of the batched matrix products (~1e-7). A session may appear once.

    last[i]: chunk i is the end of session i's audio: its results are then the finals that
    `accept(chunk)` and `finish()` give (not the interim result the final supersedes), its
    last blocks batched with the others' (`run_streams`' flush), and the session is finished.

    This is how a server carries many streams on few cores: a batch-1 LSTM step and a
    one-stream search step cost about what 10-30 of them batched do.
    """
    ending = [False] * len(sessions) if last is None else list(last)
    if not len(sessions) == len(chunks) == len(ending):
        raise ValueError(f"{len(sessions)} sessions, {len(chunks)} chunks, {len(ending)} flags")
    if len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("accept_streams: a session may appear once")
    # One log-mel and one subsampling call per model for the streams with features due (a
    # block complete, or the end).
    due: dict[tuple[int, FeatureConfig], list[tuple[StreamingSession, torch.Tensor]]] = {}
    for session, samples, ends in zip(sessions, chunks, ending, strict=True):
        if (held := session._push(samples, ends)) is not None:
            key = (id(session.model), session.features.config)
            due.setdefault(key, []).append((session, held))
    for pending in due.values():
        feats = accept_features([s.features for s, _ in pending], [x for _, x in pending])
        fed = [(s, f) for (s, _), f in zip(pending, feats, strict=True) if f.shape[0]]
        for session, frames in fed:
            session.raw.append(frames)
        push_streams([s.encoder for s, _ in fed], [f[None] for _, f in fed])
    groups: dict[tuple[int, DecodeOptions], list[int]] = {}
    for i, session in enumerate(sessions):
        groups.setdefault(session.batch_key, []).append(i)
    results: list[list[StreamResult]] = [[] for _ in sessions]
    before = [s.frames for s in sessions]
    for members in groups.values():
        group = [sessions[i] for i in members]
        outputs = run_streams(
            [s.encoder for s in group],
            [ending[i] for i in members],
            [s.lookahead and not ending[i] for i, s in zip(members, group, strict=True)],
        )
        for i, session, log_probs in zip(members, group, outputs, strict=True):
            results[i] = session._consume(log_probs[0])  # endpoints: finals (synced alone)
        behind = [s for s in group if s.unsearched]
        group[0].search.advance_many(
            [s.state for s in behind], [torch.cat(s.unsearched) for s in behind]
        )
        for s in behind:
            s.unsearched = []
    for i, session in enumerate(sessions):
        if not ending[i]:
            results[i].extend(session._news(before[i]))
        elif session.has_speech:
            results[i].append(session._final())
    return results


def tensor_bytes(root: object) -> int:
    """Bytes of the tensors reachable from `root` through attributes, sequences and dicts,
    each tensor once; modules (shared weights) are not followed. A view counts its own
    elements, not the storage it looks into (a chunk sliced from a caller's longer buffer)."""
    seen: set[int] = set()
    total, todo = 0, [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, torch.nn.Module):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.nbytes
        elif isinstance(obj, dict):
            todo += obj.values()
        elif isinstance(obj, list | tuple | set):
            todo += obj
        elif hasattr(obj, "__dict__"):
            todo += vars(obj).values()
    return total


def join_finals(finals: list[StreamResult]) -> Transcript:
    """The final results of a stream's segments as one transcript of the whole stream (word
    times are already counted from the stream's start); one alternative, the best path."""
    spoken = [f.transcript for f in finals if f.transcript.text]
    words = tuple(w for t in spoken for w in t.words)
    text = " ".join(t.text for t in spoken)
    tokens = tuple(token for t in spoken for token in t.tokens)
    score = sum(t.score for t in spoken)
    return Transcript(
        text=text,
        tokens=tokens,
        score=score,
        words=words,
        nbest=(Alternative(text, tokens, score),),
        confidence=mean_confidence(words),
    )
