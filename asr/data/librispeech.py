"""Reader for the official LibriSpeech layout, and the `asr prepare` stage built on it.

    ROOT/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    ROOT/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   (lines "UTT-ID TEXT")

Any corpus in this layout works (real LibriSpeech, the synthetic corpora of `asr.data.synth`).
Inconsistencies are collected as `Problem`s and reported, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from asr.audio import SAMPLE_RATE, AudioError, audio_duration, load_audio
from asr.data.manifest import Utterance, write_manifest

AUDIO_SUFFIXES = (".flac", ".wav")


@dataclass(frozen=True)
class Problem:
    """Something in the corpus that keeps an utterance out of the manifest."""

    kind: str  # "audio without transcript", "transcript without audio", "unreadable audio", ...
    path: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class SubsetReport:
    subset: str
    utterances: list[Utterance] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def hours(self) -> float:
        return sum(u.duration for u in self.utterances) / 3600.0

    def summary(self) -> str:
        return (
            f"{self.subset}: {len(self.utterances)} utterances, {self.hours:.3f} h, "
            f"{len(self.problems)} problems"
        )


@dataclass(frozen=True)
class _Candidate:
    id: str
    path: Path
    text: str
    speaker: str


def _read_transcripts(chapter_dir: Path, problems: list[Problem]) -> dict[str, str]:
    texts: dict[str, str] = {}
    for trans in sorted(chapter_dir.glob("*.trans.txt")):
        try:
            lines = trans.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            problems.append(Problem("unreadable transcript", str(trans), str(err)))
            continue
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            if not text.strip():
                problems.append(Problem("transcript line without text", f"{trans}:{number}"))
            elif utt_id in texts:
                problems.append(Problem("duplicate transcript line", f"{trans}:{number}", utt_id))
            else:
                texts[utt_id] = " ".join(text.split())
    return texts


def _scan_layout(subset_dir: Path, problems: list[Problem]) -> Iterator[_Candidate]:
    """Pair audio files with transcript lines chapter by chapter."""
    for speaker_dir in sorted(p for p in subset_dir.iterdir() if p.is_dir()):
        for chapter_dir in sorted(p for p in speaker_dir.iterdir() if p.is_dir()):
            texts = _read_transcripts(chapter_dir, problems)
            audio = {
                p.stem: p
                for p in sorted(chapter_dir.iterdir())
                if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()
            }
            for utt_id in sorted(audio.keys() - texts.keys()):
                problems.append(Problem("audio without transcript", str(audio[utt_id])))
            for utt_id in sorted(texts.keys() - audio.keys()):
                problems.append(Problem("transcript without audio", f"{chapter_dir}/{utt_id}"))
            for utt_id in sorted(audio.keys() & texts.keys()):
                yield _Candidate(utt_id, audio[utt_id].resolve(), texts[utt_id], speaker_dir.name)


def _measure(candidate: _Candidate, verify: bool) -> Utterance | Problem:
    """Duration of one utterance; with `verify`, decode it all (catches truncated files, which
    still have an intact header) and take the duration from the decoded samples."""
    try:
        if verify:
            duration = load_audio(candidate.path).numel() / SAMPLE_RATE
        else:
            duration = audio_duration(candidate.path)
    except AudioError as err:
        return Problem("unreadable audio", str(candidate.path), err.reason)
    if duration <= 0:
        return Problem("unreadable audio", str(candidate.path), "zero-length audio")
    return Utterance(
        id=candidate.id,
        path=str(candidate.path),
        duration=round(duration, 4),
        text=candidate.text,
        speaker=candidate.speaker,
    )


def _measure_verified(candidate: _Candidate) -> Utterance | Problem:
    return _measure(candidate, verify=True)


def _measure_header(candidate: _Candidate) -> Utterance | Problem:
    return _measure(candidate, verify=False)


def scan_subset(
    root: str | Path, subset: str, *, verify: bool = True, jobs: int = 1, progress: bool = False
) -> SubsetReport:
    """Read one subset. Raises FileNotFoundError if ROOT/subset is not a directory."""
    subset_dir = Path(root) / subset
    if not subset_dir.is_dir():
        raise FileNotFoundError(f"{subset_dir}: subset directory not found")
    report = SubsetReport(subset)
    candidates = list(_scan_layout(subset_dir, report.problems))
    measure = _measure_verified if verify else _measure_header
    with ProcessPoolExecutor(max(jobs, 1)) as pool:
        # A pool of one still isolates the decoder: a crash in libsndfile cannot take us down.
        results = pool.map(measure, candidates, chunksize=32)
        for result in tqdm(results, total=len(candidates), desc=subset, disable=not progress):
            if isinstance(result, Problem):
                report.problems.append(result)
            else:
                report.utterances.append(result)
    return report


def prepare(
    root: str | Path,
    subsets: list[str],
    out_dir: str | Path,
    *,
    verify: bool = True,
    jobs: int = 1,
    progress: bool = False,
) -> list[SubsetReport]:
    """Write `out_dir/<subset>.jsonl` for each subset, and `<subset>.problems.txt` when the
    subset has problems (so they outlive the terminal scrollback)."""
    out = Path(out_dir)
    reports = []
    for subset in subsets:
        report = scan_subset(root, subset, verify=verify, jobs=jobs, progress=progress)
        write_manifest(out / f"{subset}.jsonl", report.utterances)
        problems_file = out / f"{subset}.problems.txt"
        if report.problems:
            problems_file.write_text("".join(f"{p}\n" for p in report.problems))
        else:
            problems_file.unlink(missing_ok=True)
        reports.append(report)
    return reports
