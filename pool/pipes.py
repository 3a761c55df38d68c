"""Event-loop I/O of a sandbox's output pipes: the reader behind pool.wire's OutputCapture."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from pool.wire import CHUNK, STDERR, STDOUT, OutputCapture


class PipeReader:
    """Reads a sandbox's stdout and stderr pipes into a capped capture, on the event loop.

    ``on_over_cap`` is called when a stream passes the cap; reading goes on
    (discarding), so a writer never blocks on a full pipe while it is stopped.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stdout_fd: int,
        stderr_fd: int,
        capture: OutputCapture,
        on_over_cap: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._capture = capture
        self._on_over_cap = on_over_cap
        self._open = {stdout_fd: STDOUT, stderr_fd: STDERR}
        self.received = False  # any output came back
        for fd in self._open:
            loop.add_reader(fd, self._on_readable, fd)

    def _on_readable(self, fd: int) -> bool:
        """Read one chunk; False when nothing more is there now (or ever)."""
        try:
            data = read_nonblocking(fd)
        except OSError:
            data = b""
        if data is None:
            return False
        if not data:
            self._loop.remove_reader(fd)
            del self._open[fd]
            return False
        self.received = True
        if not self._capture.add(self._open[fd], data):
            self._on_over_cap()
        return True

    def drain(self, max_reads: int | None = None) -> None:
        """Read what is buffered now, at most ``max_reads`` chunks per pipe.

        Without a bound only once no writer can add more; with one where a
        process left behind may keep writing.
        """
        for fd in list(self._open):
            reads = 0
            while fd in self._open and (max_reads is None or reads < max_reads):
                if not self._on_readable(fd):
                    break
                reads += 1

    def stop(self) -> None:
        """Read no more, for good; let go of ``on_over_cap``.

        That callback is the run's own (its bound method) and the run holds this
        reader: kept, the two and the capture's megabyte would form a cycle that
        only the cyclic collector frees, long after the run was answered.
        """
        for fd in self._open:
            self._loop.remove_reader(fd)
        self._open.clear()
        self._on_over_cap = _nothing


def _nothing() -> None:
    pass


def read_nonblocking(fd: int, size: int = CHUNK) -> bytes | None:
    """Up to ``size`` bytes, ``b""`` at EOF, None when nothing is there yet."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
