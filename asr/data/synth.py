"""Synthetic speech corpora in the LibriSpeech layout, spoken by espeak-ng, flite and festival.

The corpus is laid out exactly like LibriSpeech, so the same recipes (and
`asr.data.librispeech.scan_subset`) run on it unchanged::

    ROOT/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt:04d>.flac   16 kHz mono 16-bit
    ROOT/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt        "UTT-ID TEXT" lines
    ROOT/<subset>/VOICES.TSV     "speaker<TAB>voice spec", one row per speaker (header row first)
    ROOT/<subset>/SOURCES.TSV    "utterance<TAB>source id", only when input lines carried IDs

Voices are written as specs: ``espeak:en-us+m3``, ``flite:slt``, ``festival:kal_diphone``,
``espeak:en-us+f2:rate=1.2:pitch=70``. Each voice is one speaker, whose id is derived from
the canonical spec (10000-99999, so it never collides with real LibriSpeech ids, all < 10000).
Each (voice, subset) is one chapter (a chapter holds at most 10000 utterances; longer
texts continue in chapter + 1), and utterance N of every speaker is sentence N of the text, so
all voices speak the same sentences under the same utterance index.

Text is normalised to LibriSpeech style: upper case, letters A-Z, apostrophes inside words and
single spaces. Accents are folded (CAFÉ -> CAFE), other punctuation becomes a space, and
sentences containing digits are skipped (with a logged count): spelling numbers out correctly
("1984" as a year or a count) needs context we do not have, and a wrong transcript is worse
than a missing sentence.

Engines: espeak-ng writes 22050 Hz WAV, flite 16 kHz (8 kHz for kal), festival's diphone
voices 16 kHz and its HTS voices 32 kHz; all are resampled to 16 kHz and leading/trailing
silence is cut to 0.2 s. Three kinds of synthesis, which is the point of having them all:
espeak-ng is a formant synthesizer (its klatt variants a Klatt one), flite and festival's
kal/ked are diphone concatenation, festival's cmu_us_slt_arctic_hts a statistical parametric
(HTS) voice. Engines get the text in lower case, because flite spells all-capital words letter
by letter. ``rate`` scales espeak-ng's 175 words per minute, divides flite's duration_stretch
and festival's Duration_Stretch, and is hts_engine's speed (-r) for HTS voices. ``pitch`` is
espeak-ng's -p (0-99, default 50); for flite it sets int_f0_target_mean and for festival's
diphone voices the target_f0_mean of their intonation model, with 50 at the voice's own mean
and 0-99 spanning about an octave (flite's rms and festival's HTS voices ignore it: their F0
comes from a model that takes no target). The engines quietly fall back to a default voice for
unknown names, so names are checked against the installed lists, and every voice speaks a
probe word before a corpus run starts.

Runs are resumable and deterministic: a FLAC appears atomically only once complete, existing
FLACs are skipped, and espeak-ng 1.51, flite 2.2 and festival 2.5 produce byte-identical audio
for the same input, so the same text and voices give byte-identical corpora. The transcript and
TSV files are rewritten at the end of each run and list only utterances whose audio exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.resources
import logging
import math
import multiprocessing
import random
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from asr.audio import SAMPLE_RATE, AudioError, audio_duration, load_audio, save_flac
from asr.files import atomic_write
from asr.text import normalize_text

log = logging.getLogger(__name__)

# Engine name in specs -> the program that speaks (festival's text2wave writes a WAV file).
ENGINES = {"espeak": "espeak-ng", "flite": "flite", "festival": "text2wave"}
ENGINE_ALIASES = {"espeak-ng": "espeak"}
MIN_RATE, MAX_RATE = 0.25, 4.0  # speed multipliers beyond these are unintelligible
ESPEAK_WPM = 175  # espeak-ng's default speed; rate=1.0 means exactly this
ESPEAK_VARIANTS = tuple(f"m{i}" for i in range(1, 9)) + tuple(f"f{i}" for i in range(1, 6))
# Default intonation mean (Hz) of flite 2.2's built-in voices, found by searching for the
# int_f0_target_mean that reproduces the default output byte for byte; pitch 50 maps to it.
# rms is missing on purpose: it ignores int_f0_target_mean, so pitch has no effect on it.
FLITE_F0_MEAN = {"slt": 172.0, "awb": 132.0, "kal": 95.0, "kal16": 95.0}
FLITE_F0_FALLBACK = 100.0  # Hz, for voices loaded from .flitevox files (Speech Dispatcher's)
SPEAKER_ID_MIN, SPEAKER_ID_MAX = 10_000, 99_999
CHAPTER_ID_MIN, CHAPTER_SPAN = 100_000, 899_000  # base + chapter index stays below 10**6
UTTS_PER_CHAPTER = 10_000  # utterance ids have four digits
KEEP_SILENCE_S = 0.2  # leading/trailing silence kept around the speech
SILENCE_LEVEL = 1e-3  # |sample| at or below this counts as silence (-60 dBFS)
ENGINE_TIMEOUT_S = 120.0
MAX_RATE_JITTER = 0.5  # keeps every jittered rate above half the voice's rate
MAX_PITCH_JITTER = 49

# No leading '-' (it would be read as an option), no ':' (the spec separator), no spaces.
_NAME_RE = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_.+/-]*")
_SOURCE_ID_RE = re.compile(r"(?=\S*\d)(?=\S*-)\S+")  # "1272-128104-0000": a digit and a '-'


class SynthError(RuntimeError):
    """A voice could not speak an utterance. The message names the voice, the utterance and
    the engine's own explanation (its stderr)."""

    def __init__(self, voice: str, utterance: str, reason: str) -> None:
        super().__init__(f"{voice}: {utterance}: {reason}")
        self.voice = voice
        self.utterance = utterance
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Voices


@dataclass(frozen=True)
class Voice:
    """One TTS voice: `engine` (a key of ENGINES), the engine's voice `name`, a speed
    multiplier `rate` and an optional `pitch` (0-99, 50 is the voice's normal pitch)."""

    engine: str
    name: str
    rate: float = 1.0
    pitch: int | None = None

    def __post_init__(self) -> None:
        problem = _voice_problem(self.engine, self.name, self.rate, self.pitch)
        if problem:
            raise ValueError(f"{self.engine}:{self.name}: {problem}")

    @classmethod
    def parse(cls, spec: str) -> Voice:
        """Parse ``engine:name[:rate=X][:pitch=N]``; raises ValueError naming the spec."""
        engine, _, rest = spec.strip().partition(":")
        engine = ENGINE_ALIASES.get(engine, engine)
        name, *options = rest.split(":")
        rate: float = 1.0
        pitch: int | None = None
        seen: set[str] = set()
        for option in options:
            key, value = _parse_option(spec, option)
            if key in seen:
                raise ValueError(f"{spec}: option {key!r} given twice")
            seen.add(key)
            if key == "rate":
                rate = float(value)
            else:
                pitch = int(value)
        problem = _voice_problem(engine, name, rate, pitch)
        if problem:
            raise ValueError(f"{spec}: {problem}")
        return cls(engine, name, rate, pitch)

    @property
    def spec(self) -> str:
        """The canonical spec: `Voice.parse(voice.spec) == voice`."""
        parts = [self.engine, self.name]
        if self.rate != 1.0:
            parts.append(f"rate={self.rate!r}")
        if self.pitch is not None:
            parts.append(f"pitch={self.pitch}")
        return ":".join(parts)

    def __str__(self) -> str:
        return self.spec


def _voice_problem(engine: str, name: str, rate: float, pitch: int | None) -> str:
    """What is wrong with these voice fields, or "" if nothing."""
    if engine not in ENGINES:
        return f"unknown engine {engine!r} (known: {', '.join(ENGINES)})"
    if not name:
        return "missing voice name (expected ENGINE:NAME)"
    if not _NAME_RE.fullmatch(name):
        return f"bad voice name {name!r}"
    if not (math.isfinite(rate) and MIN_RATE <= rate <= MAX_RATE):
        return f"rate {rate} is outside {MIN_RATE}-{MAX_RATE}"
    if pitch is not None and not 0 <= pitch <= 99:
        return f"pitch {pitch} is outside 0-99"
    return ""


def _parse_option(spec: str, option: str) -> tuple[str, float | int]:
    key, sep, value = option.partition("=")
    if not sep:
        raise ValueError(f"{spec}: option {option!r} is not KEY=VALUE")
    try:
        if key == "rate":
            return key, float(value)
        if key == "pitch":
            return key, int(value)
    except ValueError:
        raise ValueError(f"{spec}: {key}={value!r} is not a number") from None
    raise ValueError(f"{spec}: unknown option {key!r} (known: rate, pitch)")


def speaker_id(voice: Voice) -> int:
    """Stable speaker id in 10000-99999 derived from the canonical spec (crc32, not `hash`,
    which is salted per process)."""
    span = SPEAKER_ID_MAX - SPEAKER_ID_MIN + 1
    return SPEAKER_ID_MIN + zlib.crc32(voice.spec.encode()) % span


def speaker_ids(voices: Sequence[Voice]) -> dict[int, Voice]:
    """Speaker id -> voice; raises ValueError on duplicate voices or id collisions."""
    ids: dict[int, Voice] = {}
    for voice in voices:
        sid = speaker_id(voice)
        if sid in ids:
            other = ids[sid]
            what = "duplicate voice" if other == voice else f"speaker id {sid} collides with"
            raise ValueError(f"{voice.spec}: {what} {other.spec}")
        ids[sid] = voice
    return ids


def chapter_id(subset: str, index: int = 0) -> int:
    """Chapter id of the `index`-th block of 10000 utterances of `subset`."""
    return CHAPTER_ID_MIN + zlib.crc32(subset.encode()) % CHAPTER_SPAN + index


def _run_tool(argv: list[str]) -> str:
    """stdout of a listing command, or "" if the tool is missing or fails."""
    if shutil.which(argv[0]) is None:
        return ""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


@functools.lru_cache(maxsize=1)
def _espeak_variants() -> frozenset[str]:
    # Columns: Pty Language Age/Gender VoiceName File ...; the file is "!v/<variant>".
    rows = (line.split() for line in _run_tool(["espeak-ng", "--voices=variant"]).splitlines())
    return frozenset(row[4][3:] for row in rows if len(row) > 4 and row[4].startswith("!v/"))


def _espeak_languages() -> list[str]:
    # mbrola voices ("mb/...") need the separate mbrola program and voice files, so skip them.
    rows = (line.split() for line in _run_tool(["espeak-ng", "--voices=en"]).splitlines()[1:])
    names = (row[1] for row in rows if len(row) > 4 and not row[4].startswith("mb/"))
    return list(dict.fromkeys(names))


@functools.lru_cache(maxsize=1)
def _flite_voices() -> tuple[str, ...]:
    text = _run_tool(["flite", "-lv"])
    _, _, names = text.partition(":")
    return tuple(names.split())


@functools.lru_cache(maxsize=1)
def _festival_voices() -> tuple[str, ...]:
    # Prints "(cmu_us_slt_arctic_hts ked_diphone kal_diphone)": every installed voice.
    if shutil.which("text2wave") is None:
        return ()
    text = _run_tool(["festival", "-b", "(print (voice.list))"])
    return tuple(sorted(text.strip().strip("()").split()))


def list_voices() -> list[str]:
    """Voice specs available from the installed engines (missing engines are skipped).

    espeak-ng: each non-mbrola English voice, alone and with every installed variant (the
    +m1..+m8 and +f1..+f5 speakers first, then klatt, whisper, croak and the rest).
    flite: every built-in voice except limited-domain ones ("awb_time" only speaks clock times).
    festival: every installed voice (Debian: festvox-kallpc16k, festvox-kdlpc16k,
    festvox-us-slt-hts are the English ones).
    """
    installed = _espeak_variants()
    variants = [v for v in ESPEAK_VARIANTS if v in installed]
    variants += sorted(installed - set(variants), key=str.lower)
    specs = []
    for language in _espeak_languages():
        specs.append(f"espeak:{language}")
        specs.extend(f"espeak:{language}+{variant}" for variant in variants)
    specs.extend(f"flite:{name}" for name in _flite_voices() if not name.endswith("_time"))
    specs.extend(f"festival:{name}" for name in _festival_voices())
    return specs


# --------------------------------------------------------------------------------------------
# Text


@dataclass(frozen=True)
class Sentence:
    """A normalised transcript and, when the input line had one, its original id."""

    text: str
    source_id: str | None = None


def parse_lines(lines: Iterable[str], label: str) -> list[Sentence]:
    """Sentences from `ID TEXT` or plain lines; blank, digit-bearing and empty ones skipped."""
    sentences: list[Sentence] = []
    with_digits = 0
    for line in lines:
        first, _, rest = line.strip().partition(" ")
        source_id = first if _SOURCE_ID_RE.fullmatch(first) else None
        raw = rest if source_id is not None else line
        if any(c.isdigit() for c in raw):
            with_digits += 1
            continue
        text = normalize_text(raw)
        if text:
            sentences.append(Sentence(text, source_id))
    if with_digits:
        log.warning("%s: skipped %d sentences containing digits", label, with_digits)
    return sentences


def read_text(path: str | Path) -> list[Sentence]:
    """Read a text file of `ID TEXT` (LibriSpeech style) or plain sentence lines."""
    return parse_lines(Path(path).read_text(encoding="utf-8").splitlines(), str(path))


def builtin_text() -> list[Sentence]:
    """The English sentences shipped with the package (asr/data/text/builtin_en.txt)."""
    resource = importlib.resources.files("asr.data") / "text" / "builtin_en.txt"
    return parse_lines(resource.read_text(encoding="utf-8").splitlines(), "builtin_en.txt")


# --------------------------------------------------------------------------------------------
# One utterance


def _pitch_factor(pitch: int) -> float:
    """F0 multiplier of a 0-99 pitch: 50 is the voice's own, 0-99 spans about one octave."""
    return 2.0 ** ((pitch - 50) / 100)


def _espeak_command(voice: Voice, spoken: str, wav: Path) -> tuple[list[str], str | None]:
    argv = ["espeak-ng", "-v", voice.name, "-s", str(round(ESPEAK_WPM * voice.rate))]
    if voice.pitch is not None:
        argv += ["-p", str(voice.pitch)]
    return [*argv, "-w", str(wav), "--", spoken], None


def _flite_command(voice: Voice, spoken: str, wav: Path) -> tuple[list[str], str | None]:
    argv = ["flite", "-voice", voice.name, "--setf", f"duration_stretch={1.0 / voice.rate:.4f}"]
    if voice.pitch is not None:
        f0 = FLITE_F0_MEAN.get(voice.name, FLITE_F0_FALLBACK) * _pitch_factor(voice.pitch)
        argv += ["--setf", f"int_f0_target_mean={f0:.1f}"]
    return [*argv, "-t", spoken, "-o", str(wav)], None


def _festival_command(voice: Voice, spoken: str, wav: Path) -> tuple[list[str], str | None]:
    # Scheme run after the voice is selected. Diphone voices time by Duration_Stretch and take
    # their F0 from int_lr_params (an assoc list: a pair consed in front overrides the voice's);
    # HTS voices ignore both and take hts_engine's own speed option instead.
    argv = ["text2wave", "-eval", f"(voice_{voice.name})"]
    if voice.rate != 1.0:
        argv += [
            "-eval",
            f"(Parameter.set 'Duration_Stretch {1.0 / voice.rate:.4f})",
            "-eval",
            "(if (and (symbol-bound? 'hts_engine_params) hts_engine_params)"
            " (set! hts_engine_params (append hts_engine_params"
            f' (list (list "-r" {voice.rate:.4f})))))',
        ]
    if voice.pitch is not None:
        mean = "(car (cdr (assoc 'target_f0_mean int_lr_params)))"
        argv += [
            "-eval",
            "(if (and (symbol-bound? 'int_lr_params) (assoc 'target_f0_mean int_lr_params))"
            f" (set! int_lr_params (cons (list 'target_f0_mean"
            f" (* {_pitch_factor(voice.pitch):.4f} {mean})) int_lr_params)))",
        ]
    # The text goes in on stdin: text2wave reads it as a file, so nothing in it is Scheme.
    return [*argv, "-o", str(wav)], spoken


ENGINE_COMMANDS = {
    "espeak": _espeak_command,
    "flite": _flite_command,
    "festival": _festival_command,
}


def _engine_command(voice: Voice, text: str, wav: Path) -> tuple[list[str], str | None]:
    """The engine's argv and what to write to its stdin (None: nothing)."""
    # Engines get lower case: flite spells all-capital words letter by letter ("NASA").
    return ENGINE_COMMANDS[voice.engine](voice, text.lower(), wav)


def _check_voice_name(voice: Voice, utterance: str) -> None:
    """Catch names the engines would silently replace with a default voice."""
    if shutil.which(ENGINES[voice.engine]) is None:
        raise SynthError(voice.spec, utterance, f"{ENGINES[voice.engine]} is not installed")
    if voice.engine == "flite":
        known = _flite_voices()
        if voice.name not in known and not Path(voice.name).is_file():
            available = ", ".join(known) or "none"
            raise SynthError(voice.spec, utterance, f"unknown flite voice (available: {available})")
    elif voice.engine == "festival":
        if voice.name not in _festival_voices():
            available = ", ".join(_festival_voices()) or "none"
            raise SynthError(
                voice.spec, utterance, f"unknown festival voice (installed: {available})"
            )
    elif "+" in voice.name:
        variant = voice.name.split("+", 1)[1]
        if variant not in _espeak_variants():
            raise SynthError(voice.spec, utterance, f"unknown espeak-ng variant {variant!r}")


def _run_engine(voice: Voice, text: str, wav: Path, utterance: str) -> None:
    argv, stdin = _engine_command(voice, text, wav)
    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SynthError(voice.spec, utterance, f"{argv[0]} failed to run: {err}") from err
    stderr = " ".join(done.stderr.split())
    if done.returncode != 0:
        raise SynthError(voice.spec, utterance, f"{argv[0]} exited {done.returncode}: {stderr}")
    if not wav.is_file() or wav.stat().st_size == 0:
        raise SynthError(voice.spec, utterance, f"{argv[0]} wrote no audio: {stderr}")


def trim_silence(wave: torch.Tensor, keep_s: float = KEEP_SILENCE_S) -> torch.Tensor:
    """Cut leading/trailing silence down to `keep_s` seconds (engines pad up to ~0.3 s)."""
    loud = torch.nonzero(wave.abs() > SILENCE_LEVEL, as_tuple=True)[0]
    if loud.numel() == 0:
        return wave[:0]
    keep = round(keep_s * SAMPLE_RATE)
    start = max(int(loud[0]) - keep, 0)
    end = min(int(loud[-1]) + 1 + keep, wave.numel())
    return wave[start:end]


def synthesize(text: str, voice: Voice, out_path: str | Path) -> float:
    """Speak `text` with `voice` into a 16 kHz mono 16-bit FLAC; returns its duration (s).

    The FLAC appears atomically (temp file + rename), so an existing file is always complete.
    Raises SynthError naming the voice, the utterance and the engine's error.
    """
    out = Path(out_path)
    utterance = f"{out.stem} ({text[:40]!r})"
    _check_voice_name(voice, utterance)
    with tempfile.TemporaryDirectory(prefix="asr-synth-") as tmp:
        wav = Path(tmp) / "utt.wav"
        _run_engine(voice, text, wav, utterance)
        try:
            wave = trim_silence(load_audio(wav))
        except AudioError as err:
            raise SynthError(
                voice.spec, utterance, f"unusable engine output: {err.reason}"
            ) from err
    if wave.numel() == 0:
        raise SynthError(voice.spec, utterance, "engine produced only silence")
    # Worker processes write side by side; a reader or a rerun never sees half a file.
    with atomic_write(out) as tmp:
        save_flac(tmp, wave)
    return wave.numel() / SAMPLE_RATE


def check_voice(voice: Voice) -> None:
    """Speak one word to prove the engine and voice work; raises SynthError if not."""
    with tempfile.TemporaryDirectory(prefix="asr-synth-") as tmp:
        synthesize("hello", voice, Path(tmp) / "probe.flac")


# --------------------------------------------------------------------------------------------
# Corpus


@dataclass
class SynthReport:
    """Outcome of `synthesize_corpus`; `seconds` counts written and skipped audio."""

    subset: str
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (utterance id, reason)
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return self.written + self.skipped + len(self.failed)

    def summary(self) -> str:
        return (
            f"{self.subset}: {self.total} utterances ({self.written} written, "
            f"{self.skipped} skipped, {len(self.failed)} failed), {self.seconds / 3600:.2f} h"
        )


@dataclass(frozen=True)
class _Job:
    utt_id: str
    text: str
    voice: Voice  # with this utterance's jitter applied
    path: Path


def utterance_id(speaker: int, index: int, subset: str) -> str:
    """`<speaker>-<chapter>-<utt:04d>` of sentence `index` (0-based) in `subset`."""
    chapter = chapter_id(subset, index // UTTS_PER_CHAPTER)
    return f"{speaker}-{chapter}-{index % UTTS_PER_CHAPTER:04d}"


def _utt_location(subset_dir: Path, speaker: int, index: int) -> tuple[str, Path]:
    """(utterance id, FLAC path) of sentence `index` spoken by `speaker`."""
    utt_id = utterance_id(speaker, index, subset_dir.name)
    chapter = utt_id.split("-")[1]
    return utt_id, subset_dir / str(speaker) / chapter / f"{utt_id}.flac"


def jittered(voice: Voice, utt_id: str, rate_jitter: float, pitch_jitter: int) -> Voice:
    """`voice` with a per-utterance rate and pitch drawn from a seed of (spec, utt id), so
    reruns and resumed runs draw the same values (Python's `hash` is salted, sha256 is not)."""
    if rate_jitter == 0 and pitch_jitter == 0:
        return voice
    seed = hashlib.sha256(f"{voice.spec}|{utt_id}".encode()).digest()
    rng = random.Random(int.from_bytes(seed[:8], "big"))
    rate = voice.rate * (1.0 + rng.uniform(-rate_jitter, rate_jitter))
    rate = round(min(max(rate, MIN_RATE), MAX_RATE), 4)
    pitch = voice.pitch
    if pitch_jitter:
        base = 50 if voice.pitch is None else voice.pitch
        pitch = min(max(base + rng.randint(-pitch_jitter, pitch_jitter), 0), 99)
    return dataclasses.replace(voice, rate=rate, pitch=pitch)


def _plan(
    sentences: Sequence[Sentence],
    ids: dict[int, Voice],
    subset_dir: Path,
    jitter: tuple[float, int],
    per_sentence: int,
) -> Iterator[_Job]:
    """Voice v speaks sentence i when (i - v) mod V < per_sentence: every sentence gets
    `per_sentence` voices and the voices take turns, so each reads about the same amount."""
    for v, (speaker, voice) in enumerate(ids.items()):
        for index, sentence in enumerate(sentences):
            if (index - v) % len(ids) >= per_sentence:
                continue
            utt_id, path = _utt_location(subset_dir, speaker, index)
            yield _Job(utt_id, sentence.text, jittered(voice, utt_id, *jitter), path)


def _run_job(job: _Job) -> tuple[str, float | None, str]:
    """(utt id, seconds or None, failure reason); failures are returned, never raised, so one
    bad utterance cannot stop the run."""
    try:
        job.path.parent.mkdir(parents=True, exist_ok=True)
        return job.utt_id, synthesize(job.text, job.voice, job.path), ""
    except (SynthError, AudioError, OSError) as err:
        return job.utt_id, None, str(err)


def _init_worker() -> None:
    # Jobs run in parallel processes already; torch threads on top would oversubscribe.
    torch.set_num_threads(1)


def _execute(jobs: list[_Job], workers: int, progress: bool, report: SynthReport) -> None:
    bar = tqdm(total=len(jobs), desc=report.subset, unit="utt", disable=not progress)
    with bar:
        for utt_id, seconds, reason in _results(jobs, workers):
            if seconds is None:
                report.failed.append((utt_id, reason))
            else:
                report.written += 1
                report.seconds += seconds
            bar.update()
    report.failed.sort()


def _results(jobs: list[_Job], workers: int) -> Iterator[tuple[str, float | None, str]]:
    if workers <= 1 or len(jobs) <= 1:
        yield from map(_run_job, jobs)
        return
    # spawn, not fork: forking a process whose torch/OpenMP thread pools are running can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), context, _init_worker) as pool:
        futures = [pool.submit(_run_job, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def _check_args(subset: str, limit: int | None, jobs: int, jitter: tuple[float, int]) -> None:
    if not subset or subset in {".", ".."} or "/" in subset or "\\" in subset:
        raise ValueError(f"bad subset name {subset!r} (one directory name, like train-synth)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if not 0.0 <= jitter[0] < MAX_RATE_JITTER:
        raise ValueError(f"rate jitter must be in [0, {MAX_RATE_JITTER}), got {jitter[0]}")
    if not 0 <= jitter[1] <= MAX_PITCH_JITTER:
        raise ValueError(f"pitch jitter must be in 0-{MAX_PITCH_JITTER}, got {jitter[1]}")


def synthesize_corpus(
    sentences: Sequence[Sentence],
    voices: Sequence[Voice],
    root: str | Path,
    subset: str,
    *,
    limit: int | None = None,
    jobs: int = 1,
    rate_jitter: float = 0.0,
    pitch_jitter: int = 0,
    voices_per_sentence: int | None = None,
    progress: bool = True,
) -> SynthReport:
    """Have every voice speak the first `limit` sentences into ROOT/<subset> (see module doc).

    `voices_per_sentence` < number of voices spreads the sentences over the voices instead:
    more distinct sentences for the same amount of audio, which is what a model needs to
    generalise to unseen words.

    Existing FLACs are skipped, so an interrupted run resumes where it stopped. Raises
    ValueError for bad arguments or colliding voices, and SynthError when a voice cannot speak
    at all (checked up front); failures of single utterances are collected in the report.
    With jobs > 1 the workers are spawned processes, so the calling program must be importable
    (a script with an ``if __name__ == "__main__"`` guard, not code piped into ``python -``).
    """
    jitter = (rate_jitter, pitch_jitter)
    _check_args(subset, limit, jobs, jitter)
    chosen = list(sentences[:limit])
    if not chosen:
        raise ValueError("no sentences to synthesize")
    ids = speaker_ids(voices)
    if not ids:
        raise ValueError("no voices given")
    for voice in ids.values():
        check_voice(voice)  # fail fast, not once per utterance
    subset_dir = Path(root) / subset
    _merge_voices(subset_dir / "VOICES.TSV", ids)  # before any audio: catches id conflicts
    report = SynthReport(subset)
    pending = []
    per_sentence = len(ids) if voices_per_sentence is None else voices_per_sentence
    if not 1 <= per_sentence <= len(ids):
        raise ValueError(
            f"voices per sentence must be in 1-{len(ids)} (the number of voices), "
            f"got {per_sentence}"
        )
    for job in _plan(chosen, ids, subset_dir, jitter, per_sentence):
        if job.path.is_file():
            report.skipped += 1
            report.seconds += audio_duration(job.path)
        else:
            pending.append(job)
    _execute(pending, jobs, progress, report)
    _write_index(chosen, ids, subset_dir)
    return report


# --------------------------------------------------------------------------------------------
# Transcripts and index files


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def _read_tsv(path: Path) -> list[list[str]]:
    """Rows after the header; [] when the file does not exist yet."""
    if not path.is_file():
        return []
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]


def _merge_voices(path: Path, ids: dict[int, Voice]) -> None:
    """Add this run's speakers to VOICES.TSV, keeping speakers of earlier runs."""
    known = {int(row[0]): row[1] for row in _read_tsv(path) if len(row) == 2}
    for sid, voice in ids.items():
        if known.get(sid, voice.spec) != voice.spec:
            raise ValueError(f"{voice.spec}: speaker {sid} is {known[sid]} in {path}")
        known[sid] = voice.spec
    _write_atomic(path, ["speaker\tvoice", *(f"{s}\t{known[s]}" for s in sorted(known))])


def _write_index(sentences: Sequence[Sentence], ids: dict[int, Voice], subset_dir: Path) -> None:
    """Rewrite trans.txt (and SOURCES.TSV) from the sentence list for utterances with audio:
    a transcript line without audio would be reported as a broken corpus by the reader."""
    sources: list[str] = []
    for speaker in ids:
        chapters: dict[Path, list[str]] = {}
        for index, sentence in enumerate(sentences):
            utt_id, path = _utt_location(subset_dir, speaker, index)
            if not path.is_file():
                continue
            chapters.setdefault(path.parent, []).append(f"{utt_id} {sentence.text}")
            if sentence.source_id is not None:
                sources.append(f"{utt_id}\t{sentence.source_id}")
        for chapter_dir, lines in chapters.items():
            _write_atomic(chapter_dir / f"{speaker}-{chapter_dir.name}.trans.txt", sorted(lines))
    _merge_sources(subset_dir / "SOURCES.TSV", sources, {str(s) for s in ids})


def _merge_sources(path: Path, rows: list[str], speakers: set[str]) -> None:
    """Replace this run's speakers' rows in SOURCES.TSV, keeping other speakers' rows."""
    kept = ["\t".join(r) for r in _read_tsv(path) if r[0].split("-")[0] not in speakers]
    if rows or kept:
        _write_atomic(path, ["utterance\tsource", *sorted(kept + rows)])
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Command line (wired into `asr synth` by asr.cli)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `asr synth`."""
    parser.add_argument(
        "--text",
        type=Path,
        help="sentences, one per line, plain or 'ID TEXT' (default: built-in English text)",
    )
    parser.add_argument("--voices", help="comma-separated voice specs, e.g. espeak:en-us,flite:slt")
    parser.add_argument("--out", type=Path, help="corpus root (LibriSpeech layout)")
    parser.add_argument("--subset", default="train-synth", help="subset directory name")
    parser.add_argument("--limit", type=int, help="use only the first N sentences")
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    parser.add_argument(
        "--rate-jitter", type=float, default=0.0, help="per-utterance rate change, e.g. 0.1 = ±10%%"
    )
    parser.add_argument(
        "--pitch-jitter", type=int, default=0, help="per-utterance pitch change (0-99 scale)"
    )
    parser.add_argument(
        "--voices-per-sentence",
        type=int,
        help="how many of the voices read each sentence (default: all), taking turns",
    )
    parser.add_argument(
        "--list-voices", action="store_true", help="print the available voice specs and exit"
    )


def _load_sentences(text: Path | None) -> list[Sentence]:
    if text is None:
        return builtin_text()
    try:
        sentences = read_text(text)
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ValueError(f"{text}: cannot read text file ({reason})") from err
    if not sentences:
        raise ValueError(f"{text}: no usable sentences")
    return sentences


def run(args: argparse.Namespace) -> int:
    """`asr synth`: 0 on success, 1 if some utterances failed, 2 for bad input."""
    if args.list_voices:
        specs = list_voices()
        if not specs:
            print(
                "asr synth: error: none of espeak-ng, flite, festival is installed", file=sys.stderr
            )
            return 2
        print("\n".join(specs))
        return 0
    try:
        if not args.voices or args.out is None:
            raise ValueError("--voices and --out are required (see --list-voices)")
        voices = [Voice.parse(spec) for spec in args.voices.split(",") if spec.strip()]
        report = synthesize_corpus(
            _load_sentences(args.text),
            voices,
            args.out,
            args.subset,
            limit=args.limit,
            jobs=args.jobs,
            rate_jitter=args.rate_jitter,
            pitch_jitter=args.pitch_jitter,
            voices_per_sentence=args.voices_per_sentence,
            progress=sys.stderr.isatty(),
        )
    except (ValueError, SynthError) as err:
        print(f"asr synth: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    for utt_id, reason in report.failed:
        print(f"  failed {utt_id}: {reason}")
    return 1 if report.failed else 0
