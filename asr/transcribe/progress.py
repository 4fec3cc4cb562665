"""Progress of a run: a bar over audio seconds on stderr, and the counts for its summary."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from asr.transcribe.results import Failure, Outcome


class Progress:
    """A bar on stderr (when it is a terminal) over audio seconds, with hours done and the
    real-time factor; counts for the summary line."""

    def __init__(self, total_seconds: float, enabled: bool) -> None:
        self.bar = tqdm(
            total=total_seconds,
            unit="s",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio [{elapsed}<{remaining}{postfix}]",
        )
        self.start = time.monotonic()
        self.ok = self.failed = 0
        self.seconds = 0.0  # audio of the files done
        self.partial = 0.0  # decoded audio of the long file in progress

    def log(self, message: str) -> None:
        self.bar.write(message, file=sys.stderr)  # above the bar, not through it

    def advance(self, seconds: float) -> None:
        self.partial += seconds
        self._show(seconds)

    def done(self, outcome: Outcome) -> None:
        if isinstance(outcome, Failure):
            self.failed += 1
            self.log(f"{outcome.item.path}: {outcome.reason}")
            duration = outcome.item.duration or 0.0
        else:
            self.ok += 1
            self.seconds += outcome.duration
            duration = outcome.duration
        step, self.partial = max(0.0, duration - self.partial), 0.0
        self._show(step)

    def _show(self, step: float) -> None:
        self.bar.update(step)
        self.bar.set_postfix_str(f"{self.decoded / 3600:.2f} h, RTF {self.rtf:.3f}")

    @property
    def decoded(self) -> float:
        return self.seconds + self.partial

    @property
    def rtf(self) -> float:
        return (time.monotonic() - self.start) / max(self.decoded, 1e-9)

    def summary(self, skipped: int) -> str:
        wall = time.monotonic() - self.start
        resumed = f", {skipped} already done" if skipped else ""
        rtf = f" (RTF {self.rtf:.3f})" if self.seconds else ""  # none when nothing was decoded
        return (
            f"asr transcribe: {self.ok} files done, {self.failed} failed{resumed}; "
            f"{self.seconds / 3600:.3f} h of audio in {wall:.1f} s{rtf}"
        )

    def close(self) -> None:
        self.bar.close()
