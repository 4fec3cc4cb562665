"""`asr transcribe` and the Python API (`asr.load_model`, `Recognizer.transcribe`) with the
trained word model: inputs (directories, manifests, stdin), jsonl/txt/srt/vtt output, resuming
after an interruption, bad files, shards, long audio in segments, and a server as the engine."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import math
import random
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import srt
import torch

import asr
from asr.audio import SAMPLE_RATE, AudioError, save_flac
from asr.bundle import Bundle
from asr.cli import main
from asr.data.manifest import Utterance as ManifestLine
from asr.data.manifest import write_manifest
from asr.models.bilstm_ctc import BiLSTMCTC
from asr.recognizer import Recognizer
from asr.transcribe import (
    Failure,
    FileResult,
    Item,
    LineOutput,
    LocalEngine,
    Outcome,
    cut_at_pauses,
    quietest_cut,
)
from tests.conftest import REPO
from tests.word_corpus import Utterance, WordCorpus, save_bundle

TIMING = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}$")


@pytest.fixture(scope="module")
def bundle_dir(word_model: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_bundle(word_model, tmp_path_factory.mktemp("ctc") / "bundle")


@pytest.fixture(scope="module")
def offline_dir(word_model: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights without latency control: it cannot stream, so long files are cut."""
    assert isinstance(word_model.model, BiLSTMCTC)
    offline = BiLSTMCTC(replace(word_model.model.config, chunk_size=0, right_context=0))
    offline.load_state_dict(word_model.model.state_dict())
    bundle = replace(word_model, model=offline.eval())
    return save_bundle(bundle, tmp_path_factory.mktemp("offline") / "bundle")


@pytest.fixture(scope="module")
def utterances(word_corpus: WordCorpus) -> list[Utterance]:
    rng = random.Random(5)
    return [word_corpus.utterance(rng) for _ in range(6)]


@pytest.fixture(scope="module")
def words_dir(utterances: list[Utterance], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """utt0..utt5 in nested folders, flac and wav."""
    root = tmp_path_factory.mktemp("words")
    for i, utt in enumerate(utterances):
        folder = root / f"part{i % 2}"
        folder.mkdir(exist_ok=True)
        if i % 3 == 2:
            sf.write(folder / f"utt{i}.wav", utt.audio.numpy(), SAMPLE_RATE)
        else:
            save_flac(folder / f"utt{i}.flac", utt.audio)
    (root / "notes.txt").write_text("not audio: directories are searched by extension\n")
    return root


def clip(words_dir: Path, i: int) -> Path:
    """The file of utterance i."""
    [path] = words_dir.rglob(f"utt{i}.*")
    return path


def transcribe(*args: str | Path) -> int:
    return main(["transcribe", *map(str, args)])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_directory_to_jsonl_with_words_and_nbest(
    bundle_dir: Path, librispeech_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hyps.jsonl"
    assert transcribe(librispeech_root, "--model", bundle_dir, "--out", out, "--nbest", "3") == 0
    rows = read_jsonl(out)
    flacs = sorted(librispeech_root.rglob("*.flac"))
    assert len(flacs) == 17
    assert sorted(r["id"] for r in rows) == sorted(p.stem for p in flacs)
    for row in rows:
        assert set(row) == {
            "id", "path", "duration", "text", "confidence", "words", "segments", "nbest"
        }  # fmt: skip
        info = sf.info(row["path"])
        assert row["duration"] == pytest.approx(info.frames / info.samplerate, abs=1e-3)
        assert row["text"] == " ".join(w["word"] for w in row["words"])
        for w in row["words"]:
            assert set(w) == {"word", "start", "end", "confidence"}
            assert 0 <= w["start"] <= w["end"] <= row["duration"] + 0.05
        starts = [w["start"] for w in row["words"]]
        assert starts == sorted(starts)
        assert 1 <= len(row["nbest"]) <= 3 and row["nbest"][0]["text"] == row["text"]
        assert [s["text"] for s in row["segments"]] == [row["text"]]


def test_word_audio_to_txt_matches_the_words(
    bundle_dir: Path, words_dir: Path, utterances: list[Utterance], capsys: pytest.CaptureFixture
) -> None:
    assert transcribe(words_dir, "--model", bundle_dir, "--workers", "3") == 0
    out, err = capsys.readouterr()
    lines = dict(line.split("\t") for line in out.splitlines())
    assert lines == {f"utt{i}": u.text for i, u in enumerate(utterances)}
    assert "6 files done, 0 failed" in err


def test_resume_after_an_interruption_and_a_torn_line(
    bundle_dir: Path,
    words_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
) -> None:
    out = tmp_path / "hyps.jsonl"
    args = (words_dir, "--model", bundle_dir, "--out", out, "--batch-seconds", "10")
    writes = 0
    write = LineOutput.write

    def interrupted(self: LineOutput, result: object) -> None:
        nonlocal writes
        writes += 1
        if writes == 3:
            raise KeyboardInterrupt  # Ctrl-C while decoding the third file
        write(self, result)  # type: ignore[arg-type]

    monkeypatch.setattr(LineOutput, "write", interrupted)
    assert transcribe(*args) == 130
    monkeypatch.undo()
    finished = out.read_bytes()
    assert finished.count(b"\n") == 2
    with out.open("ab") as f:  # then killed in the middle of writing a line
        f.write(b'{"id": "utt4", "path": "/x", "dura')
    capsys.readouterr()
    assert transcribe(*args) == 0
    err = capsys.readouterr().err
    assert "dropping a partial last line" in err
    assert "4 files done, 0 failed, 2 already done" in err
    assert out.read_bytes().startswith(finished)  # finished lines untouched
    ids = [row["id"] for row in read_jsonl(out)]
    assert sorted(ids) == [f"utt{i}" for i in range(6)]
    assert transcribe(*args) == 0  # nothing left to do
    assert "0 files done, 0 failed, 6 already done" in capsys.readouterr().err
    assert len(read_jsonl(out)) == 6


def test_bad_files_are_named_and_the_rest_finish(
    bundle_dir: Path, words_dir: Path, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    copied = sorted(words_dir.rglob("utt*"))[:3]
    for path in copied:
        (mixed / path.name).write_bytes(path.read_bytes())
    good = (mixed / "utt0.flac").read_bytes()
    (mixed / "corrupt.flac").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(999)))
    (mixed / "empty.wav").write_bytes(b"")
    (mixed / "truncated.flac").write_bytes(good[: len(good) // 3])
    sf.write(mixed / "rate8k.wav", np.zeros(8000, dtype=np.float32), 8000)  # resampled: fine
    out = tmp_path / "hyps.txt"
    assert transcribe(mixed, "--model", bundle_dir, "--out", out) == 1
    err = capsys.readouterr().err
    assert f"{mixed / 'corrupt.flac'}: cannot read audio header" in err
    assert f"{mixed / 'empty.wav'}: empty file (0 bytes)" in err
    assert f"{mixed / 'truncated.flac'}: cannot decode audio" in err
    assert "4 files done, 3 failed" in err
    ids = [line.split("\t")[0] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(["rate8k", *(p.stem for p in copied)])


def test_shards_cover_every_input_once(
    bundle_dir: Path, librispeech_root: Path, tmp_path: Path
) -> None:
    ids = []
    for i in range(3):
        out = tmp_path / f"shard{i}.txt"
        args = ("--model", bundle_dir, "--method", "greedy", "--shard", f"{i}/3", "--out", out)
        assert transcribe(librispeech_root, *args) == 0
        ids += [line.split("\t")[0] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(p.stem for p in librispeech_root.rglob("*.flac"))


def test_bad_arguments_exit_2(
    bundle_dir: Path, words_dir: Path, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    cases = {
        "is not I/N": ("--shard", "3/3"),
        "unknown decoding option(s) nope": ("--set", "nope=1"),
        "invalid DecodeOptions: beam must be >= 1, got 0": ("--beam", "0"),
        "unknown decoding method 'nope'": ("--method", "nope"),
        "method 'joint' needs an attention decoder (a CTC model needs a LAS bundle": (
            "--method",
            "joint",
        ),
    }
    for message, extra in cases.items():
        assert transcribe(words_dir, "--model", bundle_dir, *extra) == 2
        assert message in capsys.readouterr().err
    assert transcribe(tmp_path / "nothing", "--model", bundle_dir) == 2
    assert "nothing: no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse: neither --model nor --server
        transcribe(words_dir)
    assert exit_.value.code == 2


def test_stdin_list_and_manifest(
    bundle_dir: Path,
    words_dir: Path,
    utterances: list[Utterance],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
) -> None:
    paths = [clip(words_dir, 0), clip(words_dir, 1)]
    listed = f"{paths[0]}\n\n{paths[1]}\n{tmp_path / 'gone.flac'}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(listed))
    assert transcribe("-", "--model", bundle_dir) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"utt0\t{utterances[0].text}", f"utt1\t{utterances[1].text}"]
    assert f"{tmp_path / 'gone.flac'}: file not found" in err
    manifest = tmp_path / "set.jsonl"
    lines = [ManifestLine(f"spk-{p.stem}", str(p), sf.info(p).duration, "", "") for p in paths]
    write_manifest(manifest, lines)
    assert transcribe(manifest, "--model", bundle_dir, "--format", "jsonl") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["id"] for r in rows) == ["spk-utt0", "spk-utt1"]


def test_srt_and_vtt(
    bundle_dir: Path, words_dir: Path, utterances: list[Utterance], tmp_path: Path
) -> None:
    paths = [clip(words_dir, 0), clip(words_dir, 1)]
    subs = tmp_path / "subs"
    assert transcribe(*paths, "--model", bundle_dir, "--format", "srt", "--out", f"{subs}/") == 0
    for i in range(2):
        cues = list(srt.parse((subs / f"utt{i}.srt").read_text()))
        assert " ".join(c.content for c in cues) == utterances[i].text
        starts = [c.start.total_seconds() for c in cues]
        assert starts == sorted(starts) and all(c.end > c.start for c in cues)
        first = utterances[i].words[0][1]
        assert abs(starts[0] - first) < 0.15  # the first word's start
    # Into one file with at most 2 words a cue: the second file follows the first.
    both = tmp_path / "both.srt"
    assert transcribe(*paths, "--model", bundle_dir, "--out", both, "--cue-words", "2") == 0
    cues = list(srt.parse(both.read_text()))
    assert [c.index for c in cues] == list(range(1, len(cues) + 1))
    assert all(len(c.content.split()) <= 2 for c in cues)
    assert " ".join(c.content for c in cues) == f"{utterances[0].text} {utterances[1].text}"
    first_duration = utterances[0].audio.numel() / SAMPLE_RATE
    second = [c for c in cues if c.start.total_seconds() >= first_duration]
    assert " ".join(c.content for c in second) == utterances[1].text
    vtt = tmp_path / "both.vtt"
    assert transcribe(*paths, "--model", bundle_dir, "--out", vtt) == 0
    text = vtt.read_text()
    assert text.startswith("WEBVTT\n\n")
    blocks = text.split("\n\n")[1:-1]
    notes = [b for b in blocks if b.startswith("NOTE ")]
    assert [n.split()[1] for n in notes] == ["utt0", "utt1"]
    cue_blocks = [b.splitlines() for b in blocks if not b.startswith("NOTE ")]
    assert all(TIMING.match(lines[0]) and len(lines) == 2 for lines in cue_blocks)
    assert " ".join(lines[1] for lines in cue_blocks) == " ".join(c.content for c in cues)


def _long_audio(word_corpus: WordCorpus, seconds: float) -> tuple[torch.Tensor, list[tuple]]:
    """Word-corpus utterances one after another: audio and (word, start, end) from its start."""
    rng = random.Random(11)
    parts, words, at = [], [], 0.0
    while at < seconds:
        utt = word_corpus.utterance(rng)
        parts.append(utt.audio)
        words += [(w, s + at, e + at) for w, s, e in utt.words]
        at += utt.audio.numel() / SAMPLE_RATE
    return torch.cat(parts), words


@pytest.mark.parametrize("model", ["streaming", "offline"])
def test_long_audio_in_segments_with_absolute_times(
    model: str,
    bundle_dir: Path,
    offline_dir: Path,
    word_corpus: WordCorpus,
    tmp_path: Path,
) -> None:
    """Three minutes through StreamingSession (a latency-controlled bundle) or cut at pauses
    into pieces of at most 20 s (a bundle that cannot stream)."""
    audio, truth = _long_audio(word_corpus, 180.0)
    path = tmp_path / "long.flac"
    save_flac(path, audio)
    out = tmp_path / "long.jsonl"
    bundle = {"streaming": bundle_dir, "offline": offline_dir}[model]
    assert transcribe(path, "--model", bundle, "--out", out, "--max-segment", "20") == 0
    [row] = read_jsonl(out)
    assert row["duration"] == pytest.approx(audio.numel() / SAMPLE_RATE, abs=1e-3)
    segments = row["segments"]
    assert len(segments) > 9  # at most 20 s each
    assert all(0 < s["end"] - s["start"] <= 20.01 for s in segments)
    assert all(a["end"] <= b["start"] + 1e-6 for a, b in itertools.pairwise(segments))
    words = row["words"]
    pairs = itertools.pairwise(words)
    assert all(a["start"] <= a["end"] <= b["start"] + 1e-6 for a, b in pairs)
    # Nearly every word is found, at its true place: the times count from the file's start.
    found = {(w["word"], round(w["start"])): w for w in words}
    hits = 0
    for word, start, end in truth:
        match = found.get((word, round(start))) or found.get((word, round(start) + 1))
        match = match or found.get((word, round(start) - 1))
        if match and abs(match["start"] - start) < 0.2 and abs(match["end"] - end) < 0.3:
            hits += 1
    assert hits >= 0.9 * len(truth), (hits, len(truth))


def test_long_files_stream_side_by_side_with_their_own_segments(
    word_model: Bundle, word_corpus: WordCorpus, tmp_path: Path
) -> None:
    """A streaming model decodes long files together (`accept_streams`): each file gets the
    segments it gets alone, files of different lengths leave the batch as they end, and one
    that cannot be read fails alone."""
    items = []
    for i, seconds in enumerate((50.0, 25.0, 70.0)):
        audio = _long_audio(word_corpus, seconds)[0][i * 1000 :]  # different starts
        path = tmp_path / f"long{i}.flac"
        save_flac(path, audio)
        items.append(Item(f"long{i}", path, audio.numel() / SAMPLE_RATE))
    items.insert(1, Item("missing", tmp_path / "missing.flac", 60.0))
    recognizer = Recognizer(word_model)

    def run(long_streams: int) -> tuple[dict[str, Outcome], float]:
        seconds = [0.0]

        def advance(s: float) -> None:
            seconds[0] += s

        engine = LocalEngine(recognizer, workers=1, max_segment=20.0, long_streams=long_streams)
        return {o.item.id: o for o in engine.long(items, advance)}, seconds[0]

    together, decoded = run(16)
    alone, _ = run(1)
    assert isinstance(together.pop("missing"), Failure)
    assert isinstance(alone.pop("missing"), Failure)
    assert decoded == pytest.approx(sum(i.duration or 0.0 for i in items if i.id != "missing"))

    def key(outcome: Outcome) -> list[tuple[str, float, float]]:
        assert isinstance(outcome, FileResult)
        return [(s.transcript.text, s.start, s.end) for s in outcome.segments]

    assert together.keys() == alone.keys() == {"long0", "long1", "long2"}
    for name in together:
        assert key(together[name]) == key(alone[name])
        assert len(key(together[name])) > 1  # segmented


def test_cuts_fall_in_pauses() -> None:
    rng = torch.Generator().manual_seed(0)
    loud = torch.randn(SAMPLE_RATE * 40, generator=rng) * 0.3
    pause = slice(int(27.3 * SAMPLE_RATE), int(27.6 * SAMPLE_RATE))
    loud[pause] *= 0.001
    cut = quietest_cut(loud[: 30 * SAMPLE_RATE])
    assert pause.start < cut < pause.stop
    blocks = loud.split(SAMPLE_RATE * 7)
    pieces = list(cut_at_pauses(blocks, 30.0))
    assert [round(start, 2) for start, _ in pieces] == [0.0, round(cut / SAMPLE_RATE, 2)]
    assert torch.equal(torch.cat([p for _, p in pieces]), loud)


def test_a_transcript_survives_the_api() -> None:
    """What the server sends (`to_alternatives`) is what `--server` reads back: the text,
    word times and confidences (to 4 places) and the n-best texts; the API has no scores."""
    from asr.client import to_alternatives, to_duration, to_segments
    from asr.decoding.options import Alternative, Transcript, WordTiming
    from asr.v1 import asr_pb2

    words = (WordTiming("hello", 0.5, 0.9, 0.75), WordTiming("world", 1.0, 1.5, 0.5))
    nbest = (Alternative("hello world", (3, 4), -1.0), Alternative("hollow world", (5, 4), -2.0))
    sent = Transcript("hello world", (3, 4), -1.0, words, nbest, 0.625)
    results = [
        asr_pb2.StreamingRecognitionResult(
            alternatives=to_alternatives(sent, word_time_offsets=True),
            result_end_time=to_duration(2.0),
        ),
        asr_pb2.StreamingRecognitionResult(result_end_time=to_duration(3.0)),  # no speech
        asr_pb2.StreamingRecognitionResult(
            alternatives=to_alternatives(sent, word_time_offsets=False),
            result_end_time=to_duration(4.25),
        ),
    ]
    (start, end, first), (start2, end2, second) = to_segments(results)
    assert (start, end, start2, end2) == (0.0, 2.0, 3.0, 4.25)
    assert first.text == "hello world" and first.confidence == 0.625
    assert first.words == words and second.words == ()
    assert [a.text for a in first.nbest] == ["hello world", "hollow world"]
    assert all(a.tokens == () and math.isnan(a.score) for a in first.nbest)


def test_python_api(
    bundle_dir: Path, words_dir: Path, utterances: list[Utterance], tmp_path: Path
) -> None:
    recognizer = asr.load_model(bundle_dir, beam=4)
    assert isinstance(recognizer, Recognizer) and recognizer.options.beam == 4
    path = clip(words_dir, 0)
    audio = utterances[1].audio
    single = recognizer.transcribe(path)
    assert single.text == utterances[0].text
    assert [w.word for w in single.words] == single.text.split()
    batch = recognizer.transcribe(
        [audio.numpy(), audio, path.read_bytes(), str(path)], method="greedy", nbest=1
    )
    assert [t.text for t in batch] == [utterances[1].text] * 2 + [utterances[0].text] * 2
    assert len(recognizer.transcribe(path, nbest=3).nbest) > 1
    with pytest.raises(TypeError, match=r"unknown decoding option.*beems"):
        recognizer.transcribe(path, beems=3)
    with pytest.raises(ValueError, match="beam must be >= 1, got 0"):
        asr.load_model(bundle_dir, beam=0)
    with pytest.raises(AudioError, match="shape"):
        recognizer.transcribe(np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(AudioError, match="no samples"):
        recognizer.transcribe(torch.zeros(0))


def test_readme_python_example_runs(
    bundle_dir: Path, words_dir: Path, utterances: list[Utterance]
) -> None:
    """The README's example, on the word model and files with known words."""
    readme = (REPO / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    [code] = [b for b in blocks if "asr.load_model(" in b]
    paths = {p.stem: str(p) for p in words_dir.rglob("utt*")}
    for placeholder, real in {
        '"exp/ctc/bundle"': repr(str(bundle_dir)),
        '"utt.flac"': repr(paths["utt0"]),
        '"a.flac"': repr(paths["utt1"]),
        '"b.wav"': repr(paths["utt2"]),
    }.items():
        assert placeholder in code
        code = code.replace(placeholder, real)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith(utterances[0].text)
    assert lines[1:] == [utterances[1].text, utterances[2].text]


@pytest.fixture
def server_target(word_model: Bundle) -> Iterator[str]:
    """`asr serve` in this process (its own event loop thread), with the word model."""
    from server.app import start
    from server.config import ServerConfig
    from server.servicer import Model

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = ServerConfig(models=(("words", "<memory>"),), port=0)
    models = [Model("words", Recognizer(word_model))]
    running = asyncio.run_coroutine_threadsafe(start(config, models), loop).result(60)
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_through_a_server(
    server_target: str,
    words_dir: Path,
    utterances: list[Utterance],
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
) -> None:
    """Short files with Recognize, a long one (over --long-audio) streamed."""
    long = tmp_path / "long.flac"
    pause = torch.zeros(2 * SAMPLE_RATE)  # the server's endpointer ends a segment here
    audio = torch.cat([utterances[3].audio, pause, utterances[4].audio])
    save_flac(long, audio)
    paths = [clip(words_dir, 0), clip(words_dir, 1), long]
    threshold = audio.numel() / SAMPLE_RATE - 1  # only the long file streams
    args = ["--server", server_target, "--format", "jsonl", "--long-audio", str(threshold)]
    assert transcribe(*paths, *args, "--nbest", "2") == 0
    rows = {r["id"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows["utt0"]["text"] == utterances[0].text
    assert rows["utt1"]["text"] == utterances[1].text
    assert rows["utt0"]["nbest"][0] == {"text": utterances[0].text, "score": None}
    assert rows["long"]["text"] == f"{utterances[3].text} {utterances[4].text}"
    assert len(rows["long"]["segments"]) >= 2
    second = rows["long"]["words"][-1]
    offset = (utterances[3].audio.numel() + pause.numel()) / SAMPLE_RATE
    assert abs(second["start"] - (offset + utterances[4].words[-1][1])) < 0.15
    assert transcribe(*paths, "--server", server_target, "--beam", "3") == 2
    assert "decoding options are the server's" in capsys.readouterr().err
