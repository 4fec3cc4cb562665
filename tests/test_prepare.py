from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import soundfile as sf

from asr.cli import main
from asr.data.librispeech import prepare
from asr.data.manifest import ManifestError, Utterance, read_manifest, write_manifest

SUBSETS = ["dev-clean", "test-clean", "train-clean-100"]


def _transcripts(root: Path) -> dict[str, str]:
    """Independent reading of every trans.txt, to check the manifests against."""
    out = {}
    for trans in root.rglob("*.trans.txt"):
        for line in trans.read_text().splitlines():
            utt, text = line.split(" ", 1)
            out[utt] = text
    return out


def test_prepare_real_librispeech(librispeech_root: Path, tmp_path: Path) -> None:
    reports = prepare(librispeech_root, SUBSETS, tmp_path, jobs=2)
    assert [len(r.utterances) for r in reports] == [11, 5, 1]
    assert all(not r.problems for r in reports)
    truth = _transcripts(librispeech_root)
    seen = set()
    for subset in SUBSETS:
        for utt in read_manifest(tmp_path / f"{subset}.jsonl"):
            info = sf.info(utt.path)
            assert abs(utt.duration - info.frames / info.samplerate) < 0.010
            assert utt.text == truth[utt.id]
            assert utt.speaker == utt.id.split("-")[0]
            assert Path(utt.path).is_absolute() and subset in utt.path
            seen.add(utt.id)
    assert seen == set(truth)


@pytest.fixture
def corrupted_copy(librispeech_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "LibriSpeech"
    shutil.copytree(librispeech_root, root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # shared/ is read-only
    chapter = root / "dev-clean" / "1988" / "24833"
    flac = chapter / "1988-24833-0001.flac"
    flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])  # truncated
    trans = chapter / "1988-24833.trans.txt"
    lines = trans.read_text().splitlines()
    trans.write_text("\n".join(line for line in lines if not line.startswith("1988-24833-0002")))
    (chapter / "1988-24833-0099.flac").write_bytes(b"not audio")  # no transcript, unreadable
    return root


def test_corrupted_tree_is_reported(corrupted_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    reports = prepare(corrupted_copy, ["dev-clean"], out)
    kinds = sorted((p.kind, Path(p.path).name) for p in reports[0].problems)
    assert kinds == [
        ("audio without transcript", "1988-24833-0002.flac"),
        ("audio without transcript", "1988-24833-0099.flac"),
        ("unreadable audio", "1988-24833-0001.flac"),
    ]
    assert len(reports[0].utterances) == 9
    listed = (out / "dev-clean.problems.txt").read_text()
    assert "1988-24833-0001.flac" in listed and "1988-24833-0002.flac" in listed


def test_transcript_without_audio(corrupted_copy: Path, tmp_path: Path) -> None:
    (corrupted_copy / "test-clean" / "1089" / "134686" / "1089-134686-0000.flac").unlink()
    report = prepare(corrupted_copy, ["test-clean"], tmp_path)[0]
    assert [(p.kind, p.path.rsplit("/", 1)[1]) for p in report.problems] == [
        ("transcript without audio", "1089-134686-0000")
    ]


def test_cli_prepare(librispeech_root: Path, tmp_path: Path, capsys) -> None:
    rc = main(
        [
            "prepare",
            "--librispeech-root",
            str(librispeech_root),
            "--subsets",
            ",".join(SUBSETS),
            "--out",
            str(tmp_path),
            "--jobs",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "dev-clean: 11 utterances" in out and "test-clean: 5 utterances" in out
    assert "train-clean-100: 1 utterances" in out
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == sorted(f"{s}.jsonl" for s in SUBSETS)


def test_cli_prepare_reports_problems_and_fails(corrupted_copy: Path, tmp_path: Path, capsys):
    rc = main(
        [
            "prepare",
            "--librispeech-root",
            str(corrupted_copy),
            "--subsets",
            "dev-clean",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert "3 problems" in out and "unreadable audio" in out and "1988-24833-0001.flac" in out


def test_cli_prepare_missing_subset(librispeech_root: Path, tmp_path: Path, capsys) -> None:
    rc = main(
        [
            "prepare",
            "--librispeech-root",
            str(librispeech_root),
            "--subsets",
            "train-other-500",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2
    assert "train-other-500: subset directory not found" in capsys.readouterr().err


def test_manifest_round_trip_and_errors(tmp_path: Path) -> None:
    utts = [Utterance("a-1-0000", "/x/a.flac", 1.5, "HELLO", "a")]
    write_manifest(tmp_path / "m.jsonl", utts)
    assert read_manifest(tmp_path / "m.jsonl") == utts
    (tmp_path / "bad.jsonl").write_text(utts[0].to_json() + '\n{"id": "x"}\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl:2: malformed"):
        read_manifest(tmp_path / "bad.jsonl")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(tmp_path / "absent.jsonl")
