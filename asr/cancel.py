"""Cooperative cancellation: a token the searches check between blocks of work.

A decode cannot be interrupted from outside (torch holds the thread), so a caller that stops
waiting (its deadline passed, it cancelled) hands the decoder a `CancelToken`, and the
searches call `check()` every few dozen frames or output tokens: it raises `Cancelled` and the
decode unwinds there. Without a token the searches skip every check, so the library's own
callers (CLI, training evaluation) pay nothing and decode exactly as before.

The server's engine subclasses the token: its `check()` is also where a long decode gives the
model to work that waits (`server.engine`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Frames (or CTC prefix-scorer time steps) between two checks inside a search: small enough
# that a check comes every few milliseconds of decoding, large enough to cost nothing.
CHECK_FRAMES = 32


class Cancelled(Exception):
    """Work stopped because its caller cancelled it."""


class DeadlineExceeded(Cancelled):
    """Work stopped because its caller's deadline passed."""


class CancelToken:
    """Whether some work should stop: an absolute deadline (`time.monotonic()` seconds), a flag
    set by `cancel()`, and/or a `cancelled` callable polled at each check (for example a gRPC
    context's `cancelled`; it is called from the thread doing the work, so it must only read).

        token = CancelToken.after(2.0)
        recognizer.decode(feats, lengths, cancel=token)  # raises DeadlineExceeded after ~2 s
    """

    def __init__(
        self, *, deadline: float | None = None, cancelled: Callable[[], bool] | None = None
    ) -> None:
        self.deadline = deadline
        self._poll = cancelled
        self._reason: str | None = None  # set by cancel()

    @classmethod
    def after(
        cls, seconds: float | None, *, cancelled: Callable[[], bool] | None = None
    ) -> CancelToken:
        """A token whose deadline is `seconds` from now (None: no deadline)."""
        deadline = None if seconds is None else time.monotonic() + seconds
        return cls(deadline=deadline, cancelled=cancelled)

    def cancel(self, reason: str = "cancelled by the caller") -> None:
        """Stop the work at its next check (safe from any thread: it sets a flag)."""
        self._reason = reason

    def stopped(self) -> Cancelled | None:
        """Why the work should stop now (the exception `check` would raise), or None."""
        if self._reason is not None:
            return Cancelled(self._reason)
        if self._poll is not None and self._poll():
            return Cancelled("cancelled by the caller")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return DeadlineExceeded("deadline exceeded")
        return None

    def check(self) -> None:
        """Raise `Cancelled` (or `DeadlineExceeded`) if the work should stop."""
        if (reason := self.stopped()) is not None:
            raise reason
