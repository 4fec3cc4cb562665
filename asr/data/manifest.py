"""JSONL manifests: one utterance per line, the interchange format between every stage."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from asr.files import atomic_write


@dataclass(frozen=True)
class Utterance:
    """One line of a manifest. `path` is absolute so a manifest works from any directory."""

    id: str
    path: str
    duration: float  # seconds
    text: str
    speaker: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


class ManifestError(ValueError):
    """A manifest line is malformed; the message names the file and line."""


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a JSONL manifest, rejecting malformed lines with their line number."""
    utterances = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ManifestError(f"{path}: cannot read manifest ({err.strerror or err})") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            utterances.append(
                Utterance(
                    id=str(row["id"]),
                    path=str(row["path"]),
                    duration=float(row["duration"]),
                    text=str(row["text"]),
                    speaker=str(row.get("speaker", "")),
                )
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ManifestError(f"{path}:{number}: malformed manifest line ({err!r})") from err
    return utterances


def write_manifest(path: str | Path, utterances: Iterable[Utterance]) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a manifest behind."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target, fsync=True) as tmp, tmp.open("w", encoding="utf-8") as f:
        for utt in utterances:
            f.write(utt.to_json() + "\n")
