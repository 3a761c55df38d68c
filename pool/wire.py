"""What the daemon and the guest runners say to each other: the one definition, I/O-free.

Used by both sides: the daemon imports it, and ``pool/guest.py`` splices its
source into each guest runner (which cannot import sandpool), so every
constant below is defined here only. Hence its constraints: standard library
only, no ``from __future__`` import (it is spliced mid-file), and valid on
every interpreter a guest runs (the image's CPython and CPython-WASI).

The channel, from the runner's side:
- The runner starts, warms up and writes one ready frame (``R``).
- The daemon writes one request: a 4-byte big-endian length and a JSON object
  ``{"code": str, "stdin": str}`` (NUL bytes and any Unicode survive JSON).
- Output and the exit status come back as frames (1 type byte, 4-byte
  big-endian length, payload): ``O`` stdout, ``E`` stderr, ``X`` a 4-byte
  signed status. Which of them travel framed depends on the tier (see the
  runners' docstrings).

Nothing the sandboxed code writes is trusted for a verdict: the decoder
refuses unknown frame types and oversized frames instead of buffering them,
an exit status is 0-255 or a forgery, and the output capture counts bytes
itself and stops at its cap.
"""

import json
import struct

FRAME = struct.Struct(">cI")  # type byte, payload length
REQUEST = struct.Struct(">I")  # length of the JSON request that follows
STATUS = struct.Struct(">i")  # an X frame's payload
READY, STDOUT, STDERR, EXIT = b"R", b"O", b"E", b"X"
KNOWN_KINDS = frozenset((READY, STDOUT, STDERR, EXIT))
READY_FRAME = FRAME.pack(READY, 0)
CHUNK = 65536  # one read of an output pipe, and so the largest frame a runner sends
MAX_FRAME_BYTES = 1 << 20  # what the decoder accepts: the runner sends at most CHUNK
MAX_EXIT_CODE = 255  # what a process status can be: 0-255, 128 + N for signal N

# Paths inside every sandbox.
WORKDIR = "/sandbox"  # the code's working directory and HOME, a fresh tmpfs
# wasm only: WASI's proc_exit carries statuses 0..WASI_MAX_STATUS; a larger one
# is written to STATUS_DIR/STATUS_FILE and the guest exits WASI_MAX_STATUS.
WASI_MAX_STATUS = 125
STATUS_DIR, STATUS_FILE = "/.sandpool", "status"


# The runner's command line: ``<mode> <language> [<3 fds>] [RLIMIT_<NAME>=<soft>:<hard> ...]``.
RELAY, DIRECT = "relay", "direct"  # output as frames on the runner's stdout, or on pipes of its own
LANGUAGES = ("python", "shell")
RLIMIT_PREFIX = "RLIMIT_"


class WireError(ValueError):
    """Bytes that are not what the other side may send: garbled, forged or cut short."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


def encode_request(code: str, stdin: str) -> bytes:
    """One length-prefixed request; lone surrogates survive the round trip."""
    body = json.dumps({"code": code, "stdin": stdin}, ensure_ascii=False).encode(
        "utf-8", "surrogatepass"
    )
    return REQUEST.pack(len(body)) + body


def decode_request(body: bytes) -> "tuple[str, str]":
    """(code, stdin) of a request body, the bytes after its length. Raises WireError."""
    try:
        request = json.loads(body.decode("utf-8", "surrogatepass"))
    except ValueError:
        raise WireError("the request is not JSON") from None
    if not isinstance(request, dict):
        raise WireError("the request is not a JSON object")
    code, stdin = request.get("code"), request.get("stdin", "")
    if not isinstance(code, str) or not isinstance(stdin, str):
        raise WireError("the request's code and stdin must be strings")
    return code, stdin


def decode_exit(payload: bytes) -> int:
    """An exit status from an X frame or a status pipe: always 0-255.

    The sandboxed code can write to that channel too, so anything else (a
    negative or 32-bit value, a short write) is a forgery: WireError.
    """
    if len(payload) != STATUS.size:
        raise WireError("malformed exit frame from the sandbox")
    code = int(STATUS.unpack(payload)[0])
    if not 0 <= code <= MAX_EXIT_CODE:
        raise WireError(f"impossible exit status {code} from the sandbox")
    return code


class FrameDecoder:
    """Splits a byte stream into ``(kind, payload)`` frames, whatever the chunking."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> "list[tuple[bytes, bytes]]":
        """The frames completed by ``data``. Raises WireError on an unknown or oversized frame."""
        self._buffer += data
        frames = []
        offset = 0
        while len(self._buffer) - offset >= FRAME.size:
            kind, size = FRAME.unpack_from(self._buffer, offset)
            if kind not in KNOWN_KINDS or size > MAX_FRAME_BYTES:
                raise WireError("the sandbox sent a malformed frame")
            end = offset + FRAME.size + size
            if len(self._buffer) < end:
                break
            frames.append((kind, bytes(self._buffer[offset + FRAME.size : end])))
            offset = end
        del self._buffer[:offset]
        return frames


class OutputCapture:
    """stdout and stderr of one run, each capped at ``limit`` bytes by the daemon's count."""

    __slots__ = ("limit", "stderr", "stderr_truncated", "stdout", "stdout_truncated")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.stdout_truncated = False
        self.stderr_truncated = False

    def add(self, kind: bytes, data: bytes) -> bool:
        """Append a chunk of ``kind`` (STDOUT or STDERR); False once that stream passed its cap."""
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


class RunnerArguments:
    """What the runner is told on its command line; ``parse`` and ``to_argv`` are inverses."""

    __slots__ = ("fds", "language", "limits", "mode")

    def __init__(
        self,
        mode: str,
        language: str,
        fds: "tuple[int, int, int] | None" = None,
        limits: "dict[str, tuple[int, int]] | None" = None,
    ) -> None:
        self.mode = mode
        self.language = language
        self.fds = fds  # direct mode: the write ends for the code's stdout, stderr and status
        self.limits = dict(limits or {})  # RLIMIT_<NAME> -> (soft, hard)

    def to_argv(self) -> "list[str]":
        argv = [self.mode, self.language, *(str(fd) for fd in self.fds or ())]
        argv += [f"{name}={soft}:{hard}" for name, (soft, hard) in self.limits.items()]
        return argv

    @classmethod
    def parse(cls, argv: "list[str]") -> "RunnerArguments":
        """The arguments after the runner's path. Raises WireError naming what is wrong."""
        if len(argv) < 2:
            raise WireError("usage: runner.py relay|direct <language> [fds] [RLIMIT_X=soft:hard]")
        mode, language, rest = argv[0], argv[1], argv[2:]
        if mode not in (RELAY, DIRECT):
            raise WireError(f"unknown mode {mode!r}: expected {RELAY!r} or {DIRECT!r}")
        if language not in LANGUAGES:
            raise WireError(f"unknown language {language!r}")
        fds = None
        if mode == DIRECT:
            if len(rest) < 3 or not all(word.isdigit() for word in rest[:3]):
                raise WireError("direct mode needs three fds: stdout, stderr, status")
            fds = (int(rest[0]), int(rest[1]), int(rest[2]))
            rest = rest[3:]
        limits = {}
        for word in rest:
            name, _, value = word.partition("=")
            soft, _, hard = value.partition(":")
            if not name.startswith(RLIMIT_PREFIX) or not soft.isdigit() or not hard.isdigit():
                raise WireError(f"bad limit {word!r}: expected RLIMIT_<NAME>=<soft>:<hard>")
            limits[name] = (int(soft), int(hard))
        return cls(mode, language, fds, limits)
