"""Writing files so that a reader (or a rerun after a crash) sees the old file or the new one,
never half of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write the new file to, in any mode or with any
    library; when the block ends it replaces `path` in one rename (`os.replace`). If the block
    raises, the temporary file is removed and `path` is left as it was.

        with atomic_write(target) as tmp:
            tmp.write_text(text, encoding="utf-8")

    The temporary file is hidden (a leading dot) and ends in `.tmp`, so globs and directory
    listings for the real files pass it over; it carries the process id, so processes writing
    the same target at once do not write into one temporary file. It sits in the target's
    folder because a rename is atomic only within one file system.

    fsync: make the new file durable before it replaces the old one, and the rename durable
    after (the folder is synced too): a power loss then leaves one of the two whole files.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if fsync:
            _sync(tmp, os.O_RDONLY)  # any descriptor of the file flushes all its data
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        _sync(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _sync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
