"""Progress lines of a build: each phase with the time since the build started."""

from __future__ import annotations

import time
from collections.abc import Callable

Progress = Callable[[str], None]


class Clock:
    """Reports phases to ``progress`` with the time since the build started."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._started = time.monotonic()

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def phase(self, message: str) -> None:
        self._progress(f"{message} (elapsed {self.elapsed_s:.1f}s)")
