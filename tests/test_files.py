"""`asr.files.atomic_write`: the target holds the old file or the new one, never part of one."""

from __future__ import annotations

from pathlib import Path

import pytest

from asr.files import atomic_write


@pytest.mark.parametrize("fsync", [False, True])
def test_writes_the_content_and_leaves_no_temp_file(tmp_path: Path, fsync: bool) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    with atomic_write(target, fsync=fsync) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")
        tmp.write_text("new\n", encoding="utf-8")
        assert target.read_text() == "old\n"  # replaced only when the block ends
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_binary_writes_through_an_open_file(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    with atomic_write(target) as tmp, tmp.open("wb") as f:
        f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_a_failure_mid_write_keeps_the_old_target(tmp_path: Path) -> None:
    target = tmp_path / "manifest.jsonl"
    target.write_text('{"id": "a"}\n')
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_write(target) as tmp:
        with tmp.open("w") as f:
            f.write('{"id": "half')
        raise RuntimeError("disk on fire")
    assert target.read_text() == '{"id": "a"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]


def test_a_failure_before_a_first_write_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(ValueError), atomic_write(target):
        raise ValueError("bad input")
    assert list(tmp_path.iterdir()) == []
