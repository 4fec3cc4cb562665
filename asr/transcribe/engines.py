"""Engines that turn `Item`s into results: a recognizer in this process, or a server.

Short files are decoded in batches of similar length; long ones are read in blocks and
segmented (`asr.transcribe` describes how). With a streaming model, up to `LONG_STREAMS` long
files are decoded side by side as streams batched together (`accept_streams`, as the server
batches its streams): one batched encoder call per LC block and one batched search step for
all of them, each file's segments exactly its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from asr.audio import SAMPLE_RATE, AudioError, load_audio, read_blocks
from asr.data.sampler import BucketingBatchSampler
from asr.recognizer import BATCH_FRAMES, Recognizer
from asr.streaming import EndpointConfig, StreamingSession, StreamResult, accept_streams
from asr.transcribe.inputs import Item
from asr.transcribe.results import Failure, FileResult, Outcome, Segment
from asr.transcribe.segmentation import cut_at_pauses, shifted

if TYPE_CHECKING:
    from asr.client import AsrClient

BLOCK_SECONDS = 10.0  # how much of a long file is read at a time
AHEAD = 2  # batches being read while one is decoded
# Long files a streaming model decodes at once, batched: a batch-1 LSTM step costs about what
# 10-30 batched do; each adds one file's block (10 s) and open handle to memory.
LONG_STREAMS = 16


class Engine(Protocol):
    def short(self, items: list[Item]) -> Iterator[Outcome]:
        """Results of short files, in any order, as each is done."""
        ...

    def long(self, items: list[Item], advance: Callable[[float], None]) -> Iterator[Outcome]:
        """Results of long files, segmented, in any order, as each is done, calling
        `advance(seconds)` as their audio is decoded."""
        ...


@dataclass
class _LongFile:
    """A long file being streamed: its blocks still to read, its session, its segments."""

    item: Item
    blocks: Iterator[torch.Tensor]
    session: StreamingSession
    segments: list[Segment] = field(default_factory=list)

    def add(self, results: list[StreamResult]) -> None:
        self.segments += [Segment(r.start, r.end, r.transcript) for r in results]

    def result(self) -> FileResult:
        kept = tuple(s for s in self.segments if s.transcript.text)
        return FileResult(self.item, self.item.duration or 0.0, kept)


class LocalEngine:
    """Decodes with a Recognizer in this process."""

    def __init__(
        self,
        recognizer: Recognizer,
        *,
        workers: int,
        max_segment: float,
        batch_frames: int = BATCH_FRAMES,
        long_streams: int = LONG_STREAMS,
    ) -> None:
        self.recognizer = recognizer
        self.options = recognizer.options
        self.workers = workers
        self.max_segment = max_segment
        self.batch_frames = batch_frames
        self.long_streams = long_streams
        self.streams = recognizer.can_stream

    def _load(self, item: Item) -> tuple[torch.Tensor, float]:
        samples = load_audio(item.path)
        return self.recognizer.features(samples), samples.numel() / SAMPLE_RATE  # (T, F)

    def short(self, items: list[Item]) -> Iterator[Outcome]:
        if not items:
            return
        budget = self.batch_frames
        frames = [max(1, min(round(100 * (i.duration or 0.0)), budget)) for i in items]
        batches = list(BucketingBatchSampler(frames, max_frames=budget, shuffle=False))
        pool = ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="asr-read")

        def submit(batch: list[int]) -> list[tuple[Item, Future[tuple[torch.Tensor, float]]]]:
            return [(items[i], pool.submit(self._load, items[i])) for i in batch]

        try:
            # Files of the next batches are read and featurized while this one decodes.
            reading = deque(submit(b) for b in batches[:AHEAD])
            rest = iter(batches[AHEAD:])
            while reading:
                batch = reading.popleft()
                following = next(rest, None)
                if following is not None:
                    reading.append(submit(following))
                loaded = []
                for item, future in batch:
                    try:
                        loaded.append((item, *future.result()))
                    except AudioError as err:
                        yield Failure(item, err.reason)
                transcripts = self.recognizer.transcribe_features(
                    [feats for _, feats, _ in loaded], self.options, max_frames=budget
                )
                for (item, _, seconds), transcript in zip(loaded, transcripts, strict=True):
                    yield FileResult(item, seconds, (Segment(0.0, seconds, transcript),))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def long(self, items: list[Item], advance: Callable[[float], None]) -> Iterator[Outcome]:
        if self.streams:
            yield from self._streamed(items, advance)
            return
        for item in items:
            try:
                segments = self._pieces(_counted(read_blocks(item.path, BLOCK_SECONDS), advance))
                kept = tuple(s for s in segments if s.transcript.text)
                yield FileResult(item, item.duration or 0.0, kept)
            except AudioError as err:
                yield Failure(item, err.reason)

    def _streamed(self, items: list[Item], advance: Callable[[float], None]) -> Iterator[Outcome]:
        """Up to `long_streams` files at a time, a block of each per `accept_streams` call;
        a file that ends (or fails) makes room for the next."""
        waiting = iter(items)
        files: list[_LongFile] = []
        while True:
            while len(files) < self.long_streams and (item := next(waiting, None)) is not None:
                session = StreamingSession(
                    self.recognizer,
                    self.options,
                    EndpointConfig(max_segment=self.max_segment),
                    interim_results=False,
                )
                files.append(_LongFile(item, read_blocks(item.path, BLOCK_SECONDS), session))
            if not files:
                return
            running: list[tuple[_LongFile, torch.Tensor | None]] = []  # None: its end
            for file in files:
                try:
                    running.append((file, next(file.blocks, None)))
                except AudioError as err:
                    yield Failure(file.item, err.reason)
            files = []
            if not running:
                continue
            # Files that end are flushed in the same batched call as the blocks of the others.
            outputs = accept_streams(
                [f.session for f, _ in running],
                [torch.zeros(0) if b is None else b for _, b in running],
                [b is None for _, b in running],
            )
            for (file, block), results in zip(running, outputs, strict=True):
                file.add(results)
                if block is None:
                    yield file.result()
                else:
                    files.append(file)
                    advance(block.numel() / SAMPLE_RATE)

    def _pieces(self, blocks: Iterable[torch.Tensor]) -> Iterator[Segment]:
        """Pieces cut at pauses, decoded a batch (`batch_frames`) at a time."""
        pending: list[tuple[float, float, torch.Tensor]] = []  # (start, end, features (T, F))
        for start, piece in cut_at_pauses(blocks, self.max_segment):
            end = start + piece.numel() / SAMPLE_RATE
            pending.append((start, end, self.recognizer.features(piece)))
            if sum(f.shape[0] for _, _, f in pending) >= self.batch_frames:
                yield from self._decode_pieces(pending)
                pending = []
        yield from self._decode_pieces(pending)

    def _decode_pieces(self, pieces: list[tuple[float, float, torch.Tensor]]) -> Iterator[Segment]:
        transcripts = self.recognizer.transcribe_features(
            [f for _, _, f in pieces], self.options, max_frames=self.batch_frames
        )
        for (start, end, _), transcript in zip(pieces, transcripts, strict=True):
            yield Segment(start, end, shifted(transcript, start))


class ServerEngine:
    """Sends files to a server: short ones with Recognize (`workers` calls at a time, which
    the server decodes in micro-batches), long ones with StreamingRecognize.

    grpc and `asr.client` are imported where used, so a run with `--model` never loads them."""

    def __init__(self, client: AsrClient, *, model: str, nbest: int, workers: int) -> None:
        self.client = client
        self.model = model
        self.nbest = nbest
        self.workers = workers

    def short(self, items: list[Item]) -> Iterator[Outcome]:
        import grpc

        pool = ThreadPoolExecutor(max(1, self.workers), thread_name_prefix="asr-call")
        try:
            futures = {pool.submit(self._recognize, item): item for item in items}
            for future in as_completed(futures):
                item = futures[future]
                try:
                    yield future.result()
                except grpc.RpcError as err:
                    yield Failure(item, f"{err.code().name}: {err.details()}")
                except AudioError as err:
                    yield Failure(item, err.reason)
                except OSError as err:
                    yield Failure(item, f"cannot read ({err.strerror or err})")
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _recognize(self, item: Item) -> FileResult:
        from asr.client import to_seconds, to_segments

        response = self.client.recognize(
            item.path.read_bytes(),
            model=self.model,
            alternatives=self.nbest,
            word_time_offsets=True,
            request_id=item.id,
        )
        duration = to_seconds(response.audio_duration) or (item.duration or 0.0)
        segments = tuple(Segment(*s) for s in to_segments(response.results))
        return FileResult(item, duration, segments)

    def long(self, items: list[Item], advance: Callable[[float], None]) -> Iterator[Outcome]:
        for item in items:  # one stream at a time (the server batches streams of all clients)
            try:
                yield self._stream(item)
            except AudioError as err:
                yield Failure(item, err.reason)

    def _stream(self, item: Item) -> FileResult:
        import grpc

        from asr.client import to_segments

        # AsrClient.stream takes the whole file's samples: memory grows with the file here.
        samples = load_audio(item.path)
        try:
            responses = self.client.stream(
                samples,
                model=self.model,
                interim_results=False,
                word_time_offsets=True,
                request_id=item.id,
            )
            finals = [r for response in responses for r in response.results if r.is_final]
        except grpc.RpcError as err:
            raise AudioError(str(item.path), f"{err.code().name}: {err.details()}") from err
        segments = tuple(Segment(*s) for s in to_segments(finals))
        return FileResult(item, samples.numel() / SAMPLE_RATE, segments)


def _counted(
    blocks: Iterable[torch.Tensor], advance: Callable[[float], None]
) -> Iterator[torch.Tensor]:
    for block in blocks:
        yield block
        advance(block.numel() / SAMPLE_RATE)  # asked for the next: this one is decoded


def run_engine(
    engine: Engine, items: list[Item], long_audio: float, advance: Callable[[float], None]
) -> Iterator[Outcome]:
    """Every item through `engine`: the short ones batched first, then the long ones."""
    yield from engine.short([i for i in items if (i.duration or 0.0) <= long_audio])
    yield from engine.long([i for i in items if (i.duration or 0.0) > long_audio], advance)
