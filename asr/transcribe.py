"""`asr transcribe`: audio files, directories, manifests or lists on stdin -> transcripts, with a
model bundle (`--model`) or a running server (`--server`).

    asr transcribe audio/ --model BUNDLE --format jsonl --out hyps.jsonl   # rerun to resume
    find /data -name '*.flac' | asr transcribe - --model BUNDLE --shard 3/8 --out part3.jsonl
    asr transcribe talk.wav --model BUNDLE --format srt --out subtitles/
    asr transcribe audio/ --server HOST:PORT --token-file TOKEN --format txt

How a run goes:
- Inputs are expanded (directories recursively by `AUDIO_EXTENSIONS`, manifests line by line,
  `-` as one path a line), sorted by path and given ids (see `assign_ids`). `--shard I/N` keeps
  every N-th input from the I-th, so N jobs over the same inputs cover each exactly once.
  Inputs the output already holds are skipped, so a rerun finishes an interrupted run.
- Files up to `--long-audio` seconds are read by `--workers` threads and decoded in batches of
  similar length. Longer files are read in blocks (memory stays bounded by a segment) and
  split into segments with times from the start of the file: a streaming-capable bundle
  (latency-controlled BiLSTM-CTC) runs a `StreamingSession`, whose endpointer ends segments at
  pauses; any other bundle gets pieces of at most `--max-segment` seconds cut at the quietest
  moment near their end (`cut_at_pauses`).
- Each file's result is written and flushed as soon as it is done. A file that cannot be used
  is named on stderr with the reason and skipped; the run goes on, and exits 1 at the end.

Output (`--out`; stdout without it):
- txt: `ID<TAB>TEXT` lines; jsonl: one object per file (`FileResult.to_json`). Both append to an
  existing file, skip the ids it holds, and drop a torn last line left by a killed run.
- srt/vtt: one cue per segment, split where it would exceed `--cue-words` words or 6 s, and at
  pauses over a second. Into one file, the inputs follow one another on one timeline (each
  offset by the length of those before it, in input order; VTT marks each with a NOTE), so a
  single input gets exactly its own subtitles. Written when the run ends; not resumable.
- `--out DIR/` (an existing directory, or a path ending in `/`): one `ID.FORMAT` file per input,
  written atomically; inputs whose file exists are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from asr import load_model
from asr.audio import (
    AUDIO_EXTENSIONS,
    SAMPLE_RATE,
    AudioError,
    audio_duration,
    load_audio,
    read_blocks,
)
from asr.data.manifest import read_manifest
from asr.data.sampler import BucketingBatchSampler
from asr.decoding.options import Transcript, WordTiming, mean_confidence
from asr.files import atomic_write
from asr.recognizer import BATCH_FRAMES, Recognizer
from asr.streaming import EndpointConfig, StreamingSession

if TYPE_CHECKING:
    from asr.client import AsrClient
    from asr.v1 import asr_pb2

FORMATS = ("txt", "jsonl", "srt", "vtt")
LONG_AUDIO = 60.0  # seconds; longer files are read in blocks and segmented
BLOCK_SECONDS = 10.0  # how much of a long file is read at a time
CUT_WINDOW = 5.0  # seconds at the end of a too-long piece searched for a place to cut it
FRAME = SAMPLE_RATE // 100  # 10 ms of samples
CUE_PAUSE = 1.0  # seconds of silence between words that start a new subtitle cue
CUE_SECONDS = 6.0  # longest subtitle cue: longer is more than a reader follows
AHEAD = 2  # batches being read while one is decoded


@dataclass(frozen=True)
class Item:
    """One input file."""

    id: str
    path: Path
    duration: float | None = None  # seconds: from a manifest, else read from the header


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the file
    end: float
    transcript: Transcript  # word times from the start of the file


@dataclass(frozen=True)
class FileResult:
    item: Item
    duration: float  # seconds
    segments: tuple[Segment, ...]

    @property
    def text(self) -> str:
        return " ".join(s.transcript.text for s in self.segments if s.transcript.text)

    @property
    def words(self) -> list[WordTiming]:
        return [w for s in self.segments for w in s.transcript.words]

    def to_json(self, nbest: bool) -> dict[str, Any]:
        """id, path, duration, text, confidence, words, segments; with `nbest`, the n-best
        list of a file decoded as one segment, or of each segment of a longer one."""
        words = self.words
        row: dict[str, Any] = {
            "id": self.item.id,
            "path": str(self.item.path),
            "duration": round(self.duration, 3),
            "text": self.text,
            "confidence": mean_confidence(words),
            "words": [_word_json(w) for w in words],
            "segments": [_segment_json(s) for s in self.segments],
        }
        if nbest and len(self.segments) == 1:
            row["nbest"] = _nbest_json(self.segments[0].transcript)
        elif nbest:
            for segment, out in zip(self.segments, row["segments"], strict=True):
                out["nbest"] = _nbest_json(segment.transcript)
        return row


def _segment_json(s: Segment) -> dict[str, Any]:
    return {
        "start": round(s.start, 3),
        "end": round(s.end, 3),
        "text": s.transcript.text,
        "confidence": s.transcript.confidence,
    }


def _word_json(w: WordTiming) -> dict[str, Any]:
    return {
        "word": w.word,
        "start": round(w.start, 3),
        "end": round(w.end, 3),
        "confidence": w.confidence,
    }


def _nbest_json(t: Transcript) -> list[dict[str, Any]]:
    # A server returns no scores: null, not NaN (which is not JSON).
    return [{"text": a.text, "score": a.score if math.isfinite(a.score) else None} for a in t.nbest]


@dataclass(frozen=True)
class Failure:
    item: Item
    reason: str


Outcome = FileResult | Failure


# ---------------------------------------------------------------------------------------------
# Inputs


def _expand(spec: Path, *, must_exist: bool) -> Iterator[tuple[Path, str | None, float | None]]:
    """(path, id from a manifest, duration from a manifest) of each file `spec` names."""
    if spec.is_dir():
        for path in sorted(spec.rglob("*")):
            if path.suffix.lower() in AUDIO_EXTENSIONS and path.is_file():
                yield path, None, None
    elif spec.suffix == ".jsonl":
        for utt in read_manifest(spec):
            # Manifest paths are absolute; a relative one is taken from the manifest's folder.
            yield spec.parent / utt.path, utt.id, utt.duration
    elif must_exist and not spec.exists():
        raise ValueError(f"{spec}: no such file or directory")
    else:  # a missing file from a list on stdin is reported with the other failures
        yield spec, None, None


def collect(specs: Sequence[str], stdin: IO[str]) -> list[Item]:
    """The inputs named on the command line, sorted by path, with unique ids."""
    if specs.count("-") > 1:
        raise ValueError("'-' (paths on stdin) can be given once")
    found: dict[Path, tuple[str | None, float | None]] = {}
    for spec in specs:
        listed = [line.strip() for line in stdin] if spec == "-" else [spec]
        for name in filter(None, listed):
            for path, utt_id, duration in _expand(Path(name), must_exist=spec != "-"):
                found.setdefault(path.absolute(), (utt_id, duration))  # each file once
    if not found:
        raise ValueError(
            f"no audio files in {' '.join(specs)} ({' '.join(sorted(AUDIO_EXTENSIONS))})"
        )
    return assign_ids(sorted(found.items(), key=lambda kv: str(kv[0])))


def assign_ids(entries: Sequence[tuple[Path, tuple[str | None, float | None]]]) -> list[Item]:
    """A file's id is its manifest id, else its name without the extension; files whose names
    clash get their path (without extension) under the folder the clashing files share."""
    named = Counter(utt_id for _, (utt_id, _) in entries if utt_id is not None)
    stems = Counter(path.stem for path, (utt_id, _) in entries if utt_id is None)
    clash = {stem for stem, n in stems.items() if n > 1 or stem in named}
    clashing = [p for p, (utt_id, _) in entries if utt_id is None and p.stem in clash]
    root = Path(os.path.commonpath([p.parent for p in clashing])) if clashing else Path()

    def file_id(path: Path) -> str:
        return (
            path.relative_to(root).with_suffix("").as_posix() if path.stem in clash else path.stem
        )

    items = [
        Item(utt_id if utt_id is not None else file_id(path), path, duration)
        for path, (utt_id, duration) in entries
    ]
    repeated = [i for i, n in Counter(item.id for item in items).items() if n > 1]
    if repeated:
        paths = [str(item.path) for item in items if item.id == repeated[0]]
        raise ValueError(f"inputs share the id {repeated[0]!r}: {', '.join(paths)}")
    return items


def parse_shard(text: str | None) -> tuple[int, int]:
    """`I/N` -> (I, N) with 0 <= I < N; no shard is 0/1."""
    if text is None:
        return 0, 1
    index, sep, count = text.partition("/")
    if sep and index.isdigit() and count.isdigit() and int(index) < int(count):
        return int(index), int(count)
    raise ValueError(f"--shard {text!r} is not I/N with 0 <= I < N (e.g. 0/4)")


def shard(items: Sequence[Item], index: int, count: int) -> list[Item]:
    """Every `count`-th input from the `index`-th: shards of a sorted list are disjoint, cover it
    exactly, and mix short and long files alike."""
    return list(items[index::count])


def probe(item: Item) -> Item:
    """`item` with its duration from the file header, or AudioError."""
    if item.duration is not None:
        return item
    duration = audio_duration(item.path)
    if duration <= 0:
        raise AudioError(str(item.path), "contains no samples (zero-length audio)")
    return replace(item, duration=duration)


# ---------------------------------------------------------------------------------------------
# Long audio


def quietest_cut(samples: torch.Tensor, window: float = CUT_WINDOW) -> int:
    """Where to cut samples (N,): the middle of the quietest 10 ms frame in the last `window`
    seconds, measured over 90 ms around it (a pause between words, not a stop consonant)."""
    frames = samples.numel() // FRAME
    first = max(1, frames - round(window * 100))
    if frames <= first:
        return samples.numel()
    energy = samples[: frames * FRAME].reshape(frames, FRAME).pow(2).mean(dim=1)  # (frames,)
    smooth = F.avg_pool1d(energy[None, None], 9, stride=1, padding=4, count_include_pad=False)
    return (first + int(smooth[0, 0, first:].argmin())) * FRAME + FRAME // 2


def cut_at_pauses(
    blocks: Iterable[torch.Tensor], max_seconds: float
) -> Iterator[tuple[float, torch.Tensor]]:
    """Consecutive blocks of samples -> (start seconds, piece (N,)) pieces of at most
    `max_seconds`, each cut at `quietest_cut`. Holds at most one piece plus one block."""
    limit = round(max_seconds * SAMPLE_RATE)
    buffer, start = torch.zeros(0), 0
    for block in blocks:
        buffer = torch.cat([buffer, block])
        while buffer.numel() > limit:
            cut = quietest_cut(buffer[:limit])
            yield start / SAMPLE_RATE, buffer[:cut]
            buffer, start = buffer[cut:], start + cut
    if buffer.numel():
        yield start / SAMPLE_RATE, buffer


def shifted(transcript: Transcript, seconds: float) -> Transcript:
    """`transcript` with its word times moved `seconds` later."""
    words = tuple(
        replace(w, start=w.start + seconds, end=w.end + seconds) for w in transcript.words
    )
    return replace(transcript, words=words)


# ---------------------------------------------------------------------------------------------
# Engines: a local recognizer or a server


class Engine(Protocol):
    def short(self, items: list[Item]) -> Iterator[Outcome]:
        """Results of short files, in any order, as each is done."""
        ...

    def long(self, item: Item, advance: Callable[[float], None]) -> FileResult:
        """A long file, segmented, calling `advance(seconds)` as its audio is decoded;
        raises AudioError."""
        ...


class LocalEngine:
    """Decodes with a Recognizer in this process."""

    def __init__(
        self,
        recognizer: Recognizer,
        *,
        workers: int,
        max_segment: float,
        batch_frames: int = BATCH_FRAMES,
    ) -> None:
        self.recognizer = recognizer
        self.options = recognizer.options
        self.workers = workers
        self.max_segment = max_segment
        self.batch_frames = batch_frames
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

    def long(self, item: Item, advance: Callable[[float], None]) -> FileResult:
        blocks = _counted(read_blocks(item.path, BLOCK_SECONDS), advance)
        segments = self._streamed(blocks) if self.streams else self._pieces(blocks)
        kept = tuple(s for s in segments if s.transcript.text)
        return FileResult(item, item.duration or 0.0, kept)

    def _streamed(self, blocks: Iterable[torch.Tensor]) -> Iterator[Segment]:
        session = StreamingSession(
            self.recognizer,
            self.options,
            EndpointConfig(max_segment=self.max_segment),
            interim_results=False,
        )
        for block in blocks:
            for r in session.accept(block):
                yield Segment(r.start, r.end, r.transcript)
        for r in session.finish():
            yield Segment(r.start, r.end, r.transcript)

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
    the server decodes in micro-batches), long ones with StreamingRecognize."""

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
        from asr.client import to_seconds

        response = self.client.recognize(
            item.path.read_bytes(),
            model=self.model,
            alternatives=self.nbest,
            word_time_offsets=True,
            request_id=item.id,
        )
        duration = to_seconds(response.audio_duration) or (item.duration or 0.0)
        return FileResult(item, duration, tuple(_segments(response.results)))

    def long(self, item: Item, advance: Callable[[float], None]) -> FileResult:
        import grpc

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
        return FileResult(item, samples.numel() / SAMPLE_RATE, tuple(_segments(finals)))


def _segments(
    results: Iterable[asr_pb2.SpeechRecognitionResult | asr_pb2.StreamingRecognitionResult],
) -> Iterator[Segment]:
    from asr.client import to_segments

    return (Segment(start, end, t) for start, end, t in to_segments(results))


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
    for item in items:
        if (item.duration or 0.0) > long_audio:
            try:
                yield engine.long(item, advance)
            except AudioError as err:
                yield Failure(item, err.reason)


# ---------------------------------------------------------------------------------------------
# Subtitles


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str


def cues(result: FileResult, max_words: int, offset: float = 0.0) -> list[Cue]:
    """A cue per segment, split after `max_words` words, at a pause of `CUE_PAUSE` or before
    `CUE_SECONDS`; a segment without word times is one cue."""
    out = []
    for segment in result.segments:
        words = segment.transcript.words
        if not words:
            out.append(Cue(segment.start + offset, segment.end + offset, segment.transcript.text))
            continue
        group = [words[0]]
        for word in words[1:]:
            full = len(group) >= max_words or word.end - group[0].start > CUE_SECONDS
            if full or word.start - group[-1].end > CUE_PAUSE:
                out.append(_cue(group, offset))
                group = []
            group.append(word)
        out.append(_cue(group, offset))
    return out


def _cue(words: list[WordTiming], offset: float) -> Cue:
    start = words[0].start + offset
    # Players need a cue to last; a one-frame word gets a tenth of a second.
    end = max(words[-1].end + offset, start + 0.1)
    return Cue(start, end, " ".join(w.word for w in words))


def _timestamp(seconds: float, decimal: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, minutes, secs = ms // 3_600_000, ms // 60_000 % 60, ms // 1000 % 60
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms % 1000:03d}"


# The cues of each file, with a note on where it starts (VTT shows it; SRT has no comments).
Groups = Sequence[tuple[str, list[Cue]]]


def _srt(groups: Groups) -> str:
    all_cues = [c for _, file_cues in groups for c in file_cues]
    return "".join(
        f"{n}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n{c.text}\n\n"
        for n, c in enumerate(all_cues, start=1)
    )


def _vtt(groups: Groups) -> str:
    blocks = []
    for note, file_cues in groups:
        if note:
            blocks.append(f"NOTE {note.replace('-->', '->')}\n\n")
        blocks += [
            f"{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n{c.text}\n\n"
            for c in file_cues
        ]
    return "WEBVTT\n\n" + "".join(blocks)


SUBTITLES: dict[str, Callable[[Groups], str]] = {"srt": _srt, "vtt": _vtt}


# ---------------------------------------------------------------------------------------------
# Outputs


@dataclass(frozen=True)
class Render:
    """How results look in one format."""

    # A file's output on its own: (result, most words a cue, n-best wanted) -> text.
    document: Callable[[FileResult, int, bool], str]
    line: Callable[[FileResult, bool], str] | None = None  # one line per file, if line-based
    line_id: Callable[[str], str] | None = None  # the id of such a line


FORMAT_RENDER: dict[str, Render] = {
    "txt": Render(
        document=lambda r, _, __: "".join(f"{s.transcript.text}\n" for s in r.segments),
        line=lambda r, _: f"{r.item.id}\t{r.text}",
        line_id=lambda line: line.split("\t", 1)[0],
    ),
    "jsonl": Render(
        document=lambda r, _, nbest: json.dumps(r.to_json(nbest), ensure_ascii=False) + "\n",
        line=lambda r, nbest: json.dumps(r.to_json(nbest), ensure_ascii=False),
        line_id=lambda line: str(json.loads(line)["id"]),
    ),
    "srt": Render(document=lambda r, words, _: _srt([("", cues(r, words))])),
    "vtt": Render(document=lambda r, words, _: _vtt([("", cues(r, words))])),
}


class Output(Protocol):
    def finished(self, items: Sequence[Item]) -> set[str]:
        """Ids of `items` the output already holds (from an earlier run)."""
        ...

    def write(self, result: FileResult) -> None: ...

    def close(self) -> None: ...


class LineOutput:
    """txt or jsonl lines on stdout or appended to a file, flushed one by one."""

    def __init__(self, fmt: str, path: Path | None, nbest: bool, log: Callable[[str], None]):
        render = FORMAT_RENDER[fmt]
        assert render.line is not None and render.line_id is not None
        self.line, self.nbest = render.line, nbest
        self.done: set[str] = set() if path is None else _recover(path, render.line_id, log)
        self.stream: IO[str] = sys.stdout if path is None else path.open("a", encoding="utf-8")

    def finished(self, items: Sequence[Item]) -> set[str]:
        return {i.id for i in items} & self.done

    def write(self, result: FileResult) -> None:
        self.stream.write(self.line(result, self.nbest) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not sys.stdout:
            self.stream.close()


def _recover(path: Path, line_id: Callable[[str], str], log: Callable[[str], None]) -> set[str]:
    """Ids of the complete lines of an earlier run's output; a torn last line (no newline: the
    run was killed while writing it) is cut off, so appending continues cleanly."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        return set()
    data = path.read_bytes()
    whole = data.rfind(b"\n") + 1
    if whole < len(data):
        log(f"{path}: dropping a partial last line left by an interrupted run")
        with path.open("r+b") as f:
            f.truncate(whole)
    ids = set()
    for number, line in enumerate(data[:whole].decode("utf-8").splitlines(), start=1):
        try:
            ids.add(line_id(line))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path}:{number}: not a line this command writes ({err}); refusing to append to it"
            ) from err
    return ids


class DirOutput:
    """One `ID.FORMAT` file per input in a directory, each written whole (temp file + rename)."""

    def __init__(self, fmt: str, root: Path, cue_words: int, nbest: bool) -> None:
        self.fmt, self.root, self.cue_words, self.nbest = fmt, root, cue_words, nbest
        self.render = FORMAT_RENDER[fmt].document
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, item_id: str) -> Path:
        return self.root / f"{item_id}.{self.fmt}"

    def finished(self, items: Sequence[Item]) -> set[str]:
        return {i.id for i in items if self._path(i.id).is_file()}

    def write(self, result: FileResult) -> None:
        target = self._path(result.item.id)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(target) as tmp:
            tmp.write_text(self.render(result, self.cue_words, self.nbest), encoding="utf-8")

    def close(self) -> None:
        pass


class SubtitleOutput:
    """srt or vtt of all inputs in one file: one after another on one timeline, in input order,
    written at the end (their order and offsets are known only then)."""

    def __init__(self, fmt: str, path: Path | None, order: Sequence[Item], cue_words: int):
        self.fmt, self.path, self.cue_words = fmt, path, cue_words
        self.order = [i.id for i in order]
        self.results: dict[str, FileResult] = {}

    def finished(self, items: Sequence[Item]) -> set[str]:
        return set()

    def write(self, result: FileResult) -> None:
        self.results[result.item.id] = result

    def close(self) -> None:
        groups = []
        offset = 0.0
        for item_id in self.order:
            if item_id in self.results:
                r = self.results[item_id]
                note = f"{r.item.id} ({r.item.path}) from {_timestamp(offset, '.')}"
                groups.append((note, cues(r, self.cue_words, offset)))
                offset += r.duration
        text = SUBTITLES[self.fmt](groups)
        if self.path is None:
            sys.stdout.write(text)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(text, encoding="utf-8")


def open_output(
    fmt: str,
    out: str | None,
    items: Sequence[Item],
    *,
    cue_words: int,
    nbest: bool,
    log: Callable[[str], None],
) -> Output:
    """Where `--out` (stdout if None) asks results to go, in `fmt`."""
    if out is not None and (Path(out).is_dir() or out.endswith(("/", os.sep))):
        return DirOutput(fmt, Path(out), cue_words, nbest)
    path = None if out is None else Path(out)
    if fmt in SUBTITLES:
        return SubtitleOutput(fmt, path, items, cue_words)
    return LineOutput(fmt, path, nbest, log)


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A bar on stderr (when it is a terminal) over audio seconds, with hours done and the
    real-time factor; counts for the summary line."""

    def __init__(self, total_seconds: float, enabled: bool) -> None:
        self.bar = tqdm(
            total=total_seconds,
            unit="s",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}{postfix}]",
        )
        self.start = time.monotonic()
        self.ok = self.failed = 0
        self.seconds = 0.0  # audio of the files done
        self.partial = 0.0  # decoded audio of the long file in progress

    def log(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)  # above the bar, not through it

    def advance(self, seconds: float) -> None:
        self.partial += seconds
        self._show(seconds)

    def done(self, outcome: Outcome) -> None:
        if isinstance(outcome, Failure):
            self.failed += 1
            self.log(f"{outcome.item.path}: {outcome.reason}")
            duration = outcome.item.duration or 0.0
        else:
            self.ok += 1
            self.seconds += outcome.duration
            duration = outcome.duration
        step, self.partial = max(0.0, duration - self.partial), 0.0
        self._show(step)

    def _show(self, step: float) -> None:
        self.bar.update(step)
        self.bar.set_postfix_str(f"{self.decoded / 3600:.2f} h, RTF {self.rtf:.3f}")

    @property
    def decoded(self) -> float:
        return self.seconds + self.partial

    @property
    def rtf(self) -> float:
        return (time.monotonic() - self.start) / max(self.decoded, 1e-9)

    def summary(self, skipped: int) -> str:
        wall = time.monotonic() - self.start
        resumed = f", {skipped} already done" if skipped else ""
        rtf = f" (RTF {self.rtf:.3f})" if self.seconds else ""  # none when nothing was decoded
        return (
            f"asr transcribe: {self.ok} files done, {self.failed} failed{resumed}; "
            f"{self.seconds / 3600:.3f} h of audio in {wall:.1f} s{rtf}"
        )

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------
# The command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="audio files, directories (searched recursively), JSONL manifests, or - for a "
        "list of paths on stdin",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", type=Path, metavar="BUNDLE", help="bundle directory to decode with"
    )
    source.add_argument("--server", metavar="HOST:PORT", help="transcribe with a running server")
    p.add_argument("--format", choices=FORMATS, help="default: --out's extension, else txt")
    p.add_argument(
        "--out",  # a str: Path would drop the trailing / that asks for a directory
        metavar="FILE|DIR/",
        help="output file (appended to and resumed for txt/jsonl), or DIR/ for one file per "
        "input; default stdout",
    )
    p.add_argument("--shard", metavar="I/N", help="transcribe only shard I (0-based) of N")
    p.add_argument("--workers", type=int, default=2, help="threads reading audio (or calls)")
    p.add_argument(
        "--batch-seconds",
        type=float,
        default=BATCH_FRAMES / 100,
        help="padded audio per decoded batch (memory grows with it)",
    )
    p.add_argument("--nbest", type=int, default=1, help="alternatives in jsonl output")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--long-audio",
        type=float,
        default=LONG_AUDIO,
        metavar="SECONDS",
        help="files longer than this are read in blocks and segmented",
    )
    p.add_argument(
        "--max-segment", type=float, default=30.0, help="longest segment of a long file (s)"
    )
    p.add_argument("--cue-words", type=int, default=12, help="most words in a subtitle cue")
    p.add_argument("--model-name", default="", help="with --server: the model to use")
    p.add_argument("--token-file", type=Path, help="with --server: bearer token file")
    p.add_argument("--tls", action="store_true", help="with --server: connect over TLS")
    p.add_argument("--tls-ca", type=Path, help="with --server: TLS trusting this PEM CA bundle")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def _engine(args: argparse.Namespace, overrides: dict[str, Any]) -> tuple[Engine, AsrClient | None]:
    """The engine, and the client to close when done."""
    if args.server is not None:
        from asr.client import connect

        if overrides or args.rescore_model:
            raise ValueError("with --server, decoding options are the server's")
        # No deadline: a long file streams for as long as it lasts.
        client = connect(
            args.server,
            token_file=args.token_file,
            tls=args.tls,
            tls_ca=args.tls_ca,
            timeout=None,
        )
        remote = ServerEngine(client, model=args.model_name, nbest=args.nbest, workers=args.workers)
        return remote, client
    try:
        recognizer = load_model(
            args.model,
            args.device,
            rescorer=args.rescore_model,
            **overrides | {"nbest": args.nbest},
        )
    except TypeError as err:  # an unknown option name: a bad argument
        raise ValueError(str(err)) from err
    local = LocalEngine(
        recognizer,
        workers=args.workers,
        max_segment=args.max_segment,
        batch_frames=max(1, round(args.batch_seconds * 100)),
    )
    return local, None


def run(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> int:
    """`asr transcribe`; `overrides` are DecodeOptions fields (--method, --beam, --set, ...:
    the decoding flags `asr.cli` adds to this command as to `asr decode`)."""
    index, count = parse_shard(args.shard)
    suffix = "" if args.out is None else Path(args.out).suffix[1:]
    fmt = args.format or (suffix if suffix in FORMATS else "txt")
    for name in ("workers", "nbest", "cue_words"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine, client = _engine(args, overrides or {})
    items = shard(collect(args.paths, sys.stdin), index, count)
    quiet = args.quiet
    progress = Progress(0.0, enabled=not quiet and sys.stderr.isatty())
    output = open_output(
        fmt, args.out, items, cue_words=args.cue_words, nbest=args.nbest > 1, log=progress.log
    )
    done = output.finished(items)
    todo = [i for i in items if i.id not in done]
    try:
        probed = _probe_all(todo, args.workers, progress)
        progress.bar.reset(total=sum(i.duration or 0.0 for i in probed))
        for outcome in run_engine(engine, probed, args.long_audio, progress.advance):
            progress.done(outcome)
            if isinstance(outcome, FileResult):
                output.write(outcome)
        output.close()
    finally:
        progress.close()
        if client is not None:
            client.close()
        if not quiet:
            print(progress.summary(len(done)), file=sys.stderr)
    return 1 if progress.failed else 0


def _probe_all(items: list[Item], workers: int, progress: Progress) -> list[Item]:
    """Items with durations; files whose header cannot be read are reported as failures."""

    def attempt(item: Item) -> Item | Failure:
        try:
            return probe(item)
        except AudioError as err:
            return Failure(item, err.reason)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        probed = list(pool.map(attempt, items))
    for outcome in probed:
        if isinstance(outcome, Failure):
            progress.done(outcome)
    return [i for i in probed if isinstance(i, Item)]
