"""Synthetic LibriSpeech-layout corpora from espeak-ng, flite and festival (asr.data.synth)."""

from __future__ import annotations

import argparse
import logging
import shutil
import zlib
from pathlib import Path

import pytest
import soundfile as sf
import torch

from asr.data import synth
from asr.data.synth import (
    Sentence,
    SynthError,
    Voice,
    builtin_text,
    read_text,
    speaker_id,
    speaker_ids,
    synthesize,
    synthesize_corpus,
)
from asr.text import normalize_text

MINI_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"
MINI_TEXT = MINI_TEXT / "librispeech-mini.txt"
HAVE_ESPEAK = shutil.which("espeak-ng") is not None
HAVE_FLITE = shutil.which("flite") is not None
HAVE_FESTIVAL = {"kal_diphone", "cmu_us_slt_arctic_hts"} <= set(synth._festival_voices())
needs_festival = pytest.mark.skipif(
    not HAVE_FESTIVAL,
    reason="needs festival with festvox-kallpc16k and festvox-us-slt-hts (make system-deps)",
)
needs_espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed")
needs_engines = pytest.mark.skipif(
    not (HAVE_ESPEAK and HAVE_FLITE), reason="needs both espeak-ng and flite installed"
)
VOICES = [Voice.parse("espeak:en-us"), Voice.parse("flite:slt")]
SUBSET = "train-synth"


# ---------------------------------------------------------------------------------------------
# Voices


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("espeak:en-us+m3", Voice("espeak", "en-us+m3")),
        ("flite:slt", Voice("flite", "slt")),
        ("festival:kal_diphone:rate=0.9", Voice("festival", "kal_diphone", 0.9)),
        ("espeak:en-us+f2:rate=1.2:pitch=70", Voice("espeak", "en-us+f2", 1.2, 70)),
        ("espeak:en-gb:pitch=30:rate=0.9", Voice("espeak", "en-gb", 0.9, 30)),
    ],
)
def test_voice_parse_round_trip(spec: str, expected: Voice) -> None:
    voice = Voice.parse(spec)
    assert voice == expected
    assert Voice.parse(voice.spec) == voice
    assert str(voice) == voice.spec


def test_voice_spec_is_canonical() -> None:
    assert Voice.parse("espeak:en:pitch=30:rate=1.50").spec == "espeak:en:rate=1.5:pitch=30"
    assert Voice.parse("espeak:en:rate=1").spec == "espeak:en"  # the default is left out
    assert Voice.parse("espeak-ng:en-us").spec == "espeak:en-us"


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("mbrola:us1", "unknown engine"),
        ("espeak", "missing voice name"),
        ("espeak:en-us:speed=2", "unknown option 'speed'"),
        ("espeak:en-us:rate=fast", "not a number"),
        ("espeak:en-us:pitch=1.5", "not a number"),
        ("espeak:en-us:rate", "not KEY=VALUE"),
        ("espeak:en-us:rate=0", "rate"),
        ("espeak:en-us:pitch=120", "pitch 120"),
        ("flite:-voice", "bad voice name"),
        ("espeak:en:rate=1:rate=2", "given twice"),
    ],
)
def test_voice_parse_rejects_bad_specs(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        Voice.parse(spec)
    assert str(caught.value).startswith(f"{spec}:")


def test_speaker_ids_are_stable_distinct_and_outside_librispeech() -> None:
    specs = ["espeak:en-us", "espeak:en-us+m3", "espeak:en-gb+f2", "flite:slt", "flite:awb"]
    voices = [Voice.parse(s) for s in specs]
    ids = [speaker_id(v) for v in voices]
    assert len(set(ids)) == len(ids)
    assert all(10_000 <= i <= 99_999 for i in ids)
    assert speaker_id(Voice.parse("flite:slt")) == 10_000 + zlib.crc32(b"flite:slt") % 90_000
    assert list(speaker_ids(voices)) == ids


def test_speaker_ids_reject_duplicates_and_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="duplicate voice"):
        speaker_ids([Voice.parse("flite:slt"), Voice.parse("flite:slt")])
    monkeypatch.setattr(synth, "speaker_id", lambda voice: 12345)
    with pytest.raises(ValueError, match="collides"):
        speaker_ids(VOICES)


def test_utterance_ids_continue_in_the_next_chapter() -> None:
    first = synth.utterance_id(12345, 0, SUBSET)
    rolled = synth.utterance_id(12345, 10_000, SUBSET)
    assert first.endswith("-0000") and rolled.endswith("-0000")
    assert int(rolled.split("-")[1]) == int(first.split("-")[1]) + 1
    assert synth.chapter_id(SUBSET) != synth.chapter_id("dev-synth")


def test_jitter_is_deterministic_and_bounded() -> None:
    voice = Voice.parse("espeak:en-us:pitch=90")
    draws = [synth.jittered(voice, f"1-2-{i:04d}", 0.2, 20) for i in range(50)]
    assert draws == [synth.jittered(voice, f"1-2-{i:04d}", 0.2, 20) for i in range(50)]
    assert all(0.8 <= d.rate <= 1.2 and d.pitch is not None and 70 <= d.pitch <= 99 for d in draws)
    assert len({d.rate for d in draws}) > 1
    assert synth.jittered(voice, "1-2-0000", 0.0, 0) is voice


# ---------------------------------------------------------------------------------------------
# Text


def test_read_text_both_formats_and_normalization(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "text.txt"
    path.write_text(
        "1272-128104-0000 MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES\n"
        "\n"
        "“Don’t go,” she said — the café was  closed; well-known 'quotes'.\n"
        "I counted 3 cats.\n"
        "   ?!...  \n"
        "Émile's boys' hats\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING, logger="asr.data.synth"):
        sentences = read_text(path)
    assert sentences == [
        Sentence("MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES", "1272-128104-0000"),
        Sentence("DON'T GO SHE SAID THE CAFE WAS CLOSED WELL KNOWN QUOTES"),
        Sentence("EMILE'S BOYS HATS"),
    ]
    assert "skipped 1 sentences containing digits" in caplog.text


def test_builtin_text_is_normalized_and_varied() -> None:
    sentences = builtin_text()
    assert 250 <= len(sentences) <= 400
    assert len({s.text for s in sentences}) == len(sentences)
    for sentence in sentences:
        assert sentence.source_id is None
        assert sentence.text == normalize_text(sentence.text)
        assert 5 <= len(sentence.text.split()) <= 25
    assert len({w for s in sentences for w in s.text.split()}) > 1000


# ---------------------------------------------------------------------------------------------
# Engines


def test_trim_silence_keeps_a_short_margin() -> None:
    wave = torch.zeros(48_000)
    wave[16_000:32_000] = 0.5
    trimmed = synth.trim_silence(wave)
    assert trimmed.numel() == 16_000 + 2 * 3_200
    assert synth.trim_silence(torch.zeros(100)).numel() == 0


@needs_engines
def test_list_voices_from_installed_engines() -> None:
    voices = synth.list_voices()
    assert {"espeak:en-us", "espeak:en-us+m3", "espeak:en-gb+f2", "flite:slt"} <= set(voices)
    assert "flite:awb_time" not in voices  # limited domain: only speaks clock times
    for spec in voices:
        Voice.parse(spec)


@needs_engines
def test_bad_voice_name_is_a_synth_error(tmp_path: Path) -> None:
    out = tmp_path / "x.flac"
    with pytest.raises(SynthError, match="xx-nonexistent") as caught:
        synthesize("HELLO THERE", Voice.parse("espeak:xx-nonexistent"), out)
    assert "does not exist" in caught.value.reason  # espeak-ng's own stderr
    with pytest.raises(SynthError, match="unknown espeak-ng variant"):
        synthesize("HELLO THERE", Voice.parse("espeak:en-us+nosuchvariant"), out)
    with pytest.raises(SynthError, match="unknown flite voice"):
        synthesize("HELLO THERE", Voice.parse("flite:nosuchvoice"), out)
    assert list(tmp_path.iterdir()) == []


@needs_festival
def test_festival_voices_are_listed_and_checked(tmp_path: Path) -> None:
    voices = synth.list_voices()
    assert {"festival:kal_diphone", "festival:cmu_us_slt_arctic_hts"} <= set(voices)
    assert "espeak:en-us+klatt" in voices  # variants beyond the m/f speakers
    with pytest.raises(SynthError, match="unknown festival voice"):
        synthesize("HELLO THERE", Voice.parse("festival:nosuchvoice"), tmp_path / "x.flac")
    assert list(tmp_path.iterdir()) == []


def _seconds(voice: str, tmp_path: Path, text: str = "THE QUICK BROWN FOX JUMPED") -> float:
    return synthesize(text, Voice.parse(voice), tmp_path / f"{voice.replace(':', '_')}.flac")


@needs_festival
@pytest.mark.parametrize("name", ["kal_diphone", "cmu_us_slt_arctic_hts"])
def test_festival_rate_changes_duration_for_diphone_and_hts(name: str, tmp_path: Path) -> None:
    # Diphone voices time by Duration_Stretch, HTS voices by hts_engine's -r: both must obey.
    normal = _seconds(f"festival:{name}", tmp_path)
    fast = _seconds(f"festival:{name}:rate=1.5", tmp_path)
    assert 1.0 < normal < 4.0
    assert fast < 0.8 * normal


@needs_festival
def test_festival_pitch_moves_f0_and_output_is_deterministic(tmp_path: Path) -> None:
    import torchaudio.functional as F

    def f0(spec: str) -> float:
        path = tmp_path / f"{spec.replace(':', '_')}.flac"
        synthesize("A LONG VOWEL SOUNDS HERE", Voice.parse(spec), path)
        wave = torch.from_numpy(sf.read(path, dtype="float32")[0])
        return float(F.detect_pitch_frequency(wave, 16_000).median())

    low, high = f0("festival:kal_diphone:pitch=20"), f0("festival:kal_diphone:pitch=80")
    assert high > 1.1 * low  # 60 steps are 2 ** 0.6 = 1.5x by design; the detector is rough
    first = tmp_path / "a.flac"
    synthesize("HELLO THERE", Voice.parse("festival:ked_diphone"), first)
    synthesize("HELLO THERE", Voice.parse("festival:ked_diphone"), tmp_path / "b.flac")
    assert first.read_bytes() == (tmp_path / "b.flac").read_bytes()


def test_missing_engine_is_a_synth_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SynthError, match="espeak-ng is not installed"):
        synthesize_corpus([Sentence("HELLO")], VOICES[:1], tmp_path, SUBSET, progress=False)
    assert not (tmp_path / SUBSET).exists()


# ---------------------------------------------------------------------------------------------
# Corpus


def _short_sentences(count: int) -> list[Sentence]:
    if not MINI_TEXT.is_file():
        pytest.skip(f"shared test text not found: {MINI_TEXT}")
    return sorted(read_text(MINI_TEXT), key=lambda s: len(s.text))[:count]


def _flacs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.flac"))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Sentence]]:
    if not (HAVE_ESPEAK and HAVE_FLITE):
        pytest.skip("needs both espeak-ng and flite installed")
    sentences = _short_sentences(3)
    root = tmp_path_factory.mktemp("synth")
    report = synthesize_corpus(sentences, VOICES, root, SUBSET, jobs=2, progress=False)
    assert (report.written, report.skipped, report.failed) == (6, 0, [])
    assert report.seconds > 0
    return root, sentences


def test_corpus_has_librispeech_layout(corpus: tuple[Path, list[Sentence]]) -> None:
    root, sentences = corpus
    subset_dir = root / SUBSET
    chapter = synth.chapter_id(SUBSET)
    speakers = sorted(speaker_id(v) for v in VOICES)
    assert sorted(int(p.name) for p in subset_dir.iterdir() if p.is_dir()) == speakers
    for speaker in speakers:
        chapter_dir = subset_dir / str(speaker) / str(chapter)
        ids = [f"{speaker}-{chapter}-{i:04d}" for i in range(len(sentences))]
        assert sorted(p.name for p in chapter_dir.iterdir()) == sorted(
            [f"{speaker}-{chapter}.trans.txt"] + [f"{u}.flac" for u in ids]
        )
        trans = (chapter_dir / f"{speaker}-{chapter}.trans.txt").read_text(encoding="utf-8")
        assert trans == "".join(f"{u} {s.text}\n" for u, s in zip(ids, sentences, strict=True))


def test_corpus_audio_is_16k_mono_and_plausibly_long(corpus: tuple[Path, list[Sentence]]) -> None:
    root, sentences = corpus
    for flac in sorted((root / SUBSET).rglob("*.flac")):
        info = sf.info(str(flac))
        assert (info.samplerate, info.channels, info.format, info.subtype) == (
            16_000,
            1,
            "FLAC",
            "PCM_16",
        )
        samples, _ = sf.read(str(flac), dtype="float32")
        words = len(sentences[int(flac.stem.split("-")[2])].text.split())
        assert 0.15 * words <= len(samples) / 16_000 <= 1.0 * words + 0.4, flac.name
        assert abs(samples).max() > 0.05


def test_corpus_index_files(corpus: tuple[Path, list[Sentence]]) -> None:
    root, sentences = corpus
    subset_dir = root / SUBSET
    voices_tsv = (subset_dir / "VOICES.TSV").read_text(encoding="utf-8").splitlines()
    assert voices_tsv[0] == "speaker\tvoice"
    assert sorted(voices_tsv[1:]) == sorted(f"{speaker_id(v)}\t{v.spec}" for v in VOICES)
    sources = (subset_dir / "SOURCES.TSV").read_text(encoding="utf-8").splitlines()
    assert sources[0] == "utterance\tsource"
    assert len(sources) == 1 + len(VOICES) * len(sentences)
    by_utt = dict(line.split("\t") for line in sources[1:])
    utt = synth.utterance_id(speaker_id(VOICES[1]), 2, SUBSET)
    assert by_utt[utt] == sentences[2].source_id


def test_corpus_resume_skips_existing_files(corpus: tuple[Path, list[Sentence]]) -> None:
    root, sentences = corpus
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*.flac")}
    report = synthesize_corpus(sentences, VOICES, root, SUBSET, jobs=2, progress=False)
    assert (report.written, report.skipped, report.failed) == (0, 6, [])
    assert report.seconds > 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*.flac")} == before


def test_corpus_is_deterministic(
    corpus: tuple[Path, list[Sentence]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    root, sentences = corpus
    again = tmp_path_factory.mktemp("synth-again")
    report = synthesize_corpus(sentences, VOICES, again, SUBSET, jobs=1, progress=False)
    assert report.written == 6
    assert _flacs(again) == _flacs(root)


@needs_espeak
def test_failed_utterance_is_reported_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = synth.synthesize

    def flaky(text: str, voice: Voice, out_path: str | Path) -> float:
        if str(out_path).endswith("-0001.flac"):
            raise SynthError(voice.spec, Path(out_path).stem, "simulated engine crash")
        return real(text, voice, out_path)

    monkeypatch.setattr(synth, "synthesize", flaky)
    sentences = [Sentence("GOOD MORNING"), Sentence("GOOD AFTERNOON"), Sentence("GOOD NIGHT")]
    report = synthesize_corpus(sentences, VOICES[:1], tmp_path, SUBSET, progress=False)
    assert report.written == 2
    assert [(u.split("-")[2], "simulated engine crash" in r) for u, r in report.failed] == [
        ("0001", True)
    ]
    trans = next((tmp_path / SUBSET).rglob("*.trans.txt")).read_text(encoding="utf-8")
    assert [line.split(" ", 1)[1] for line in trans.splitlines()] == ["GOOD MORNING", "GOOD NIGHT"]
    assert not (tmp_path / SUBSET / "SOURCES.TSV").exists()  # plain text: no source ids


@needs_espeak
def test_unknown_voice_stops_the_corpus_before_any_audio(tmp_path: Path) -> None:
    voices = [Voice.parse("espeak:en-us"), Voice.parse("espeak:xx-nonexistent")]
    with pytest.raises(SynthError, match="xx-nonexistent"):
        synthesize_corpus([Sentence("HELLO")], voices, tmp_path, SUBSET, progress=False)
    assert not (tmp_path / SUBSET).exists()


# ---------------------------------------------------------------------------------------------
# Command line


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_missing_text_file_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.txt"
    args = _args("--text", str(missing), "--voices", "flite:slt", "--out", str(tmp_path))
    assert synth.run(args) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1


def test_run_bad_voice_spec_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert synth.run(_args("--voices", "espeak:en-us,mbrola:us1", "--out", str(tmp_path))) == 2
    assert "mbrola:us1" in capsys.readouterr().err


@needs_espeak
def test_run_writes_corpus_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat.\nA dog barked twice.\n", encoding="utf-8")
    args = _args("--text", str(text), "--voices", "espeak:en-us+f2", "--out", str(tmp_path))
    assert synth.run(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("train-synth: 2 utterances (2 written, 0 skipped, 0 failed), 0.00 h")
    assert len(list((tmp_path / "train-synth").rglob("*.flac"))) == 2


@needs_engines
def test_voices_per_sentence_spreads_sentences_over_voices(tmp_path: Path) -> None:
    sentences = [Sentence("THE CAT SAT"), Sentence("A DOG RAN"), Sentence("WE WENT OUT")]
    report = synthesize_corpus(
        sentences, VOICES, tmp_path, SUBSET, voices_per_sentence=1, progress=False
    )
    assert (report.written, report.failed) == (3, [])
    spoken: dict[str, list[int]] = {}
    for trans in (tmp_path / SUBSET).rglob("*.trans.txt"):
        for line in trans.read_text().splitlines():
            utt_id, text = line.split(" ", 1)
            spoken.setdefault(text, []).append(int(utt_id.split("-")[0]))
    assert sorted(spoken) == sorted(s.text for s in sentences)  # every sentence exactly once
    assert all(len(speakers) == 1 for speakers in spoken.values())
    assert len({s for speakers in spoken.values() for s in speakers}) == 2  # voices take turns
    with pytest.raises(ValueError, match="voices per sentence must be in 1-2"):
        synthesize_corpus(sentences, VOICES, tmp_path, SUBSET, voices_per_sentence=3)
