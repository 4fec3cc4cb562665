"""bench/peer_wer.py: pocketsphinx decodes a manifest, scored by our scorer, into a
results.json that `asr results` shows as a peer row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from asr.data.manifest import Utterance, write_manifest
from tests.conftest import REPO

pytest.importorskip("pocketsphinx")


def _real_manifest(root: Path, out: Path, count: int) -> Path:
    """`count` real dev-clean utterances (speaker 1988) as a manifest."""
    chapter = root / "dev-clean" / "1988" / "24833"
    lines = (chapter / "1988-24833.trans.txt").read_text().splitlines()[:count]
    rows = []
    for line in lines:
        utt_id, text = line.split(" ", 1)
        path = chapter / f"{utt_id}.flac"
        rows.append(Utterance(utt_id, str(path), sf.info(str(path)).duration, text, "1988"))
    write_manifest(out, rows)
    return out


def _peer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "peer_wer.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_peer_decodes_real_speech_into_results(librispeech_root: Path, tmp_path: Path) -> None:
    manifest = _real_manifest(librispeech_root, tmp_path / "real.jsonl", 3)
    results = tmp_path / "peer" / "results.json"
    done = _peer("--manifest", f"real={manifest}", "--results", str(results), "--jobs", "2")
    assert done.returncode == 0, done.stderr
    name, rates = done.stdout.strip().splitlines()[-1].split()[2].split("=")
    wer, cer = map(float, rates.split("/"))
    assert name == "real"
    # A generic recognizer on clean read speech: about 20 % WER; far from 100 % either way.
    assert 0 <= cer <= wer < 60
    data = json.loads(results.read_text())
    assert data["model"] == "pocketsphinx" and data["peer"] is True
    summary = data["methods"]["default"]["real"]
    assert summary["wer"] == pytest.approx(wer, abs=0.01) and summary["utterances"] == 3
    hyps = (tmp_path / "peer" / "real" / "hyps.tsv").read_text().splitlines()
    assert hyps[0] == "id\treference\thypothesis" and len(hyps) == 4
    # `asr results` reads it beside our own results.
    table = subprocess.run(
        [sys.executable, "-m", "asr.cli", "results", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    assert "pocketsphinx" in table.stdout and f"{wer:.2f}" in table.stdout


def test_peer_bad_input_exits_2_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    done = _peer("--manifest", f"x={missing}")
    assert done.returncode == 2 and "missing.jsonl" in done.stderr
    done = _peer("--manifest", "no-equals-sign")
    assert done.returncode == 2 and "NAME=MANIFEST" in done.stderr
