"""What `asr transcribe` reads: paths, directories, manifests and lists on stdin -> `Item`s with
unique ids, sharded, with durations from the files' headers."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from asr.audio import AUDIO_EXTENSIONS, AudioError, audio_duration
from asr.data.manifest import read_manifest


@dataclass(frozen=True)
class Item:
    """One input file."""

    id: str
    path: Path
    duration: float | None = None  # seconds: from a manifest, else read from the header


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
