"""Output formats and where their results go.

One writer class per format, as whisper's `ResultWriter` family (`whisper/utils.py`): a writer
puts one file's result in an open file (`write_result`), or writes it whole to a path
(`writer(result, path)`). Line formats (txt, jsonl) also give the line a file's result makes
in a shared output and read the id back from one; subtitle formats (srt, vtt) also lay out
several files' cues on one timeline. A new format is one class in `WRITERS`.

The outputs (`open_output`) put the writers' results on stdout, into one file (appended to and
resumed for line formats), or one file per input in a directory.
"""

from __future__ import annotations

import json
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Protocol

from asr.files import atomic_write
from asr.transcribe.inputs import Item
from asr.transcribe.results import FileResult
from asr.transcribe.segmentation import Cue, cues

# The cues of each file, with a note on where it starts (VTT shows it; SRT has no comments).
Groups = Sequence[tuple[str, list[Cue]]]


class ResultWriter(ABC):
    """One output format. cue_words: most words in a subtitle cue; nbest: the n-best lists
    too, where the format has room for them."""

    extension: str

    def __init__(self, *, cue_words: int, nbest: bool) -> None:
        self.cue_words = cue_words
        self.nbest = nbest

    def __call__(self, result: FileResult, path: Path) -> None:
        """`result` on its own in the file at `path`, written atomically: a killed run leaves
        the old file or none, so a file that exists is one that is done."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp, tmp.open("w", encoding="utf-8") as file:
            self.write_result(result, file)

    @abstractmethod
    def write_result(self, result: FileResult, file: IO[str]) -> None:
        """`result` as a whole file of this format."""


class LineWriter(ResultWriter):
    """A format with a line per input file, so one output file holds many files' results, and
    a rerun learns from the ids of its lines which are done."""

    @abstractmethod
    def line(self, result: FileResult) -> str:
        """`result` as one line, without its newline."""

    @abstractmethod
    def line_id(self, line: str) -> str:
        """The id of the file a line is about; ValueError, KeyError or TypeError when it is
        not a line this format writes."""


class WriteTXT(LineWriter):
    """On its own, a file's text a segment a line; in a shared output, `ID<TAB>TEXT`."""

    extension = "txt"

    def write_result(self, result: FileResult, file: IO[str]) -> None:
        file.write("".join(f"{s.transcript.text}\n" for s in result.segments))

    def line(self, result: FileResult) -> str:
        return f"{result.item.id}\t{result.text}"

    def line_id(self, line: str) -> str:
        return line.split("\t", 1)[0]


class WriteJSONL(LineWriter):
    """One object per file (`FileResult.to_json`), alone or in a shared output."""

    extension = "jsonl"

    def write_result(self, result: FileResult, file: IO[str]) -> None:
        file.write(self.line(result) + "\n")

    def line(self, result: FileResult) -> str:
        return json.dumps(result.to_json(self.nbest), ensure_ascii=False)

    def line_id(self, line: str) -> str:
        return str(json.loads(line)["id"])


class SubtitlesWriter(ResultWriter):
    """A cue per `cues` piece of a file's segments."""

    decimal_marker: str  # between seconds and milliseconds

    def write_result(self, result: FileResult, file: IO[str]) -> None:
        file.write(self.subtitles([("", cues(result, self.cue_words))]))

    @abstractmethod
    def subtitles(self, groups: Groups) -> str:
        """Every group's cues, in order, as one document."""

    def timestamp(self, seconds: float) -> str:
        return timestamp(seconds, self.decimal_marker)


class WriteSRT(SubtitlesWriter):
    extension = "srt"
    decimal_marker = ","

    def subtitles(self, groups: Groups) -> str:
        all_cues = [c for _, file_cues in groups for c in file_cues]
        return "".join(
            f"{n}\n{self.timestamp(c.start)} --> {self.timestamp(c.end)}\n{c.text}\n\n"
            for n, c in enumerate(all_cues, start=1)
        )


class WriteVTT(SubtitlesWriter):
    extension = "vtt"
    decimal_marker = "."

    def subtitles(self, groups: Groups) -> str:
        blocks = []
        for note, file_cues in groups:
            if note:
                blocks.append(f"NOTE {note.replace('-->', '->')}\n\n")
            blocks += [
                f"{self.timestamp(c.start)} --> {self.timestamp(c.end)}\n{c.text}\n\n"
                for c in file_cues
            ]
        return "WEBVTT\n\n" + "".join(blocks)


WRITERS: dict[str, type[ResultWriter]] = {
    w.extension: w for w in (WriteTXT, WriteJSONL, WriteSRT, WriteVTT)
}
FORMATS = tuple(WRITERS)


def timestamp(seconds: float, decimal: str) -> str:
    """HH:MM:SS<decimal>mmm, as subtitle formats write times."""
    ms = max(0, round(seconds * 1000))
    hours, minutes, secs = ms // 3_600_000, ms // 60_000 % 60, ms // 1000 % 60
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms % 1000:03d}"


# ---------------------------------------------------------------------------------------------
# Outputs


class Output(Protocol):
    def finished(self, items: Sequence[Item]) -> set[str]:
        """Ids of `items` the output already holds (from an earlier run)."""
        ...

    def write(self, result: FileResult) -> None: ...

    def close(self) -> None: ...


class LineOutput:
    """txt or jsonl lines on stdout or appended to a file, flushed one by one."""

    def __init__(self, writer: LineWriter, path: Path | None, log: Callable[[str], None]):
        self.writer = writer
        self.done: set[str] = set() if path is None else _recover(path, writer.line_id, log)
        self.stream: IO[str] = sys.stdout if path is None else path.open("a", encoding="utf-8")

    def finished(self, items: Sequence[Item]) -> set[str]:
        return {i.id for i in items} & self.done

    def write(self, result: FileResult) -> None:
        self.stream.write(self.writer.line(result) + "\n")
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
    """One `ID.FORMAT` file per input in a directory, each written whole."""

    def __init__(self, writer: ResultWriter, root: Path) -> None:
        self.writer, self.root = writer, root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, item_id: str) -> Path:
        return self.root / f"{item_id}.{self.writer.extension}"

    def finished(self, items: Sequence[Item]) -> set[str]:
        return {i.id for i in items if self._path(i.id).is_file()}

    def write(self, result: FileResult) -> None:
        self.writer(result, self._path(result.item.id))

    def close(self) -> None:
        pass


class SubtitleOutput:
    """srt or vtt of all inputs in one file: one after another on one timeline, in input order,
    written at the end (their order and offsets are known only then)."""

    def __init__(self, writer: SubtitlesWriter, path: Path | None, order: Sequence[Item]):
        self.writer, self.path = writer, path
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
                note = f"{r.item.id} ({r.item.path}) from {timestamp(offset, '.')}"  # VTT's
                groups.append((note, cues(r, self.writer.cue_words, offset)))
                offset += r.duration
        text = self.writer.subtitles(groups)
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
    writer = WRITERS[fmt](cue_words=cue_words, nbest=nbest)
    if out is not None and (Path(out).is_dir() or out.endswith(("/", os.sep))):
        return DirOutput(writer, Path(out))
    path = None if out is None else Path(out)
    if isinstance(writer, SubtitlesWriter):
        return SubtitleOutput(writer, path, items)
    assert isinstance(writer, LineWriter)  # every format is one or the other
    return LineOutput(writer, path, log)
