"""The daemon's side of the runner protocol (see ``pool/runner.py``), shared by backends.

Nothing the sandboxed code writes is trusted for a verdict: the decoder refuses
unknown frame types and oversized frames instead of buffering them, and the
output capture counts bytes itself and stops at the cap.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from pool.errors import SandpoolError

FRAME = struct.Struct(">cI")
REQUEST = struct.Struct(">I")
READY, STDOUT, STDERR, EXIT = b"R", b"O", b"E", b"X"
_KNOWN = frozenset((READY, STDOUT, STDERR, EXIT))
MAX_FRAME_BYTES = 1 << 20  # the runner sends at most 64 KiB per frame
CHUNK = 65536  # one read of an output pipe


class ProtocolViolation(SandpoolError):
    """The sandbox sent bytes that are not runner frames (crashed or forged)."""

    code = "sandbox_protocol_error"


def runner_source() -> str:
    """The runner's source, handed to ``python3 -I -c`` inside each sandbox."""
    return resources.files("pool").joinpath("runner.py").read_text(encoding="utf-8")


def encode_request(code: str, stdin: str) -> bytes:
    """One length-prefixed request frame; NUL bytes and any Unicode survive JSON."""
    body = json.dumps({"code": code, "stdin": stdin}, ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )
    return REQUEST.pack(len(body)) + body


MAX_EXIT_CODE = 255  # what a process status can be: 0-255, 128 + N for signal N


def decode_exit(payload: bytes) -> int:
    """An exit status from the sandbox's status channel: always 0-255.

    The sandboxed code can write to that channel too, so anything else (a
    negative or 32-bit value, a short write) is a forgery: ProtocolViolation.
    """
    if len(payload) != 4:
        raise ProtocolViolation("malformed exit frame from the sandbox")
    code = int.from_bytes(payload, "big", signed=True)
    if not 0 <= code <= MAX_EXIT_CODE:
        raise ProtocolViolation(f"impossible exit status {code} from the sandbox")
    return code


class FrameDecoder:
    """Splits a byte stream into ``(kind, payload)`` frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buffer += data
        frames: list[tuple[bytes, bytes]] = []
        offset = 0
        while len(self._buffer) - offset >= FRAME.size:
            kind, size = FRAME.unpack_from(self._buffer, offset)
            if kind not in _KNOWN or size > MAX_FRAME_BYTES:
                raise ProtocolViolation("the sandbox sent a malformed frame")
            end = offset + FRAME.size + size
            if len(self._buffer) < end:
                break
            frames.append((kind, bytes(self._buffer[offset + FRAME.size : end])))
            offset = end
        del self._buffer[:offset]
        return frames


@dataclass(slots=True)
class OutputCapture:
    """stdout and stderr of one run, each capped at ``limit`` bytes by the daemon's count."""

    limit: int
    stdout: bytearray
    stderr: bytearray
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @classmethod
    def with_limit(cls, limit: int) -> OutputCapture:
        return cls(limit=limit, stdout=bytearray(), stderr=bytearray())

    def add(self, kind: bytes, data: bytes) -> bool:
        """Append a chunk; False once a stream went over its cap (stop reading, kill)."""
        buffer = self.stdout if kind == STDOUT else self.stderr
        room = self.limit - len(buffer)
        if len(data) <= room:
            buffer += data
            return True
        buffer += data[:room]
        if kind == STDOUT:
            self.stdout_truncated = True
        else:
            self.stderr_truncated = True
        return False

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated


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
        for fd in self._open:
            self._loop.remove_reader(fd)
        self._open.clear()


def read_nonblocking(fd: int, size: int = CHUNK) -> bytes | None:
    """Up to ``size`` bytes, ``b""`` at EOF, None when nothing is there yet."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
