"""What the daemon and the guest runners say to each other: the one definition, I/O-free.

One concept in one module on purpose: it is spliced whole into every guest.

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
import re
import struct
from collections.abc import Callable, Mapping

FRAME = struct.Struct(">cI")  # type byte, payload length
# A request: the lengths of its JSON header and of the file contents that
# follow the header, each file's bytes as they are, in the header's order.
REQUEST = struct.Struct(">II")
STATUS = struct.Struct(">i")  # an X frame's payload
READY, STDOUT, STDERR, EXIT = b"R", b"O", b"E", b"X"
# What a run leaves besides its output, sent by the guest before its EXIT frame
# (see "Outcome" below): a file under OUT_DIR, a rich result, a content chunk
# of the last file or result, the uncaught exception.
FILE_OUT, DISPLAY, CONTENT, ERROR = b"F", b"D", b"C", b"T"
OUTCOME_KINDS = frozenset((FILE_OUT, DISPLAY, CONTENT, ERROR))
# Sessions (a request with ``session`` set: the child takes another request
# after it). SESSION: the child tells the relay, on its status pipe, to keep
# relaying after the EXIT frame; never passed on. GONE: the relay tells the
# daemon the child has ended, so no further request of the session is taken
# (direct mode needs none: there the runner's EXIT frame means exactly that).
SESSION, GONE = b"S", b"G"
KNOWN_KINDS = frozenset((READY, STDOUT, STDERR, EXIT, SESSION, GONE)) | OUTCOME_KINDS
READY_FRAME = FRAME.pack(READY, 0)
CHUNK = 65536  # one read of an output pipe, and so the largest frame a runner sends
# Once the code's status is in, what it wrote before is in the pipes; a process
# it left behind may keep writing, so whoever drains reads at most this many
# chunks more (the runner in relay mode, the daemon in direct mode).
DRAIN_READS = 64
MAX_FRAME_BYTES = 1 << 20  # what the decoder accepts: the runner sends at most CHUNK
MAX_EXIT_CODE = 255  # what a process status can be: 0-255, 128 + N for signal N
# The EXIT status a relaying runner sends when the code garbled its status
# channel: impossible on purpose, so the daemon reports a protocol violation.
GARBLED_STATUS = -1

# Paths inside every sandbox.
WORKDIR = "/sandbox"  # the code's working directory and HOME, a fresh tmpfs
OUT_DIR = "out"  # under WORKDIR: every file the code leaves there comes back
# matplotlib's font cache, built into an image when it is built (pool/image),
# copied by the runner into MATPLOTLIB_CONFIG_DIR, a writable one, at start.
MATPLOTLIB_CACHE = "/usr/share/sandpool/matplotlib"
MATPLOTLIB_CONFIG_DIR = "/tmp/.matplotlib"
# wasm only: WASI's proc_exit carries statuses 0..WASI_MAX_STATUS; a larger one
# is written to STATUS_DIR/STATUS_FILE and the guest exits WASI_MAX_STATUS.
WASI_MAX_STATUS = 125
STATUS_DIR, STATUS_FILE = "/.sandpool", "status"
OUTCOME_FILE = "outcome"  # wasm only: the run's outcome frames, in STATUS_DIR


# The runner's command line:
# ``<mode> <language> [<fds>] [RLIMIT_<NAME>=<soft>:<hard> ...] [preload=<modules>]``.
RELAY, DIRECT = "relay", "direct"  # output as frames on the runner's stdout, or on pipes of its own
TEMPLATE = "template"  # the fork tier's template: forks a direct-mode runner per SpawnOrder
# How many fds each mode is given: direct mode the write ends for the code's
# stdout, stderr and status; the template its control socket and the seccomp
# program its sandboxes install.
MODE_FDS = {RELAY: 0, DIRECT: 3, TEMPLATE: 2}
LANGUAGES = ("python", "shell", "javascript")
RLIMIT_PREFIX = "RLIMIT_"
PRELOAD = "preload"  # preload=<module>[,<module>...]
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z").match


class WireError(ValueError):
    """Bytes that are not what the other side may send: garbled, forged or cut short."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


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
    """stdout and stderr of one run, each capped at ``limit`` bytes by the daemon's count.

    ``listener``, when set, is called with ``(kind, data)`` for every non-empty
    piece the capture keeps, in order and as it arrives: the pieces of a stream
    joined are exactly that stream's captured bytes, never past the cap. It runs
    inside ``add`` (on the daemon's event loop) and must not raise.
    """

    __slots__ = ("limit", "listener", "stderr", "stderr_truncated", "stdout", "stdout_truncated")

    def __init__(
        self, limit: int, listener: "Callable[[bytes, bytes], None] | None" = None
    ) -> None:
        self.limit = limit
        self.listener = listener
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
            if self.listener is not None and data:
                self.listener(kind, bytes(data))
            return True
        buffer += data[:room]
        if self.listener is not None and room > 0:
            self.listener(kind, bytes(data[:room]))
        if kind == STDOUT:
            self.stdout_truncated = True
        else:
            self.stderr_truncated = True
        return False


class RunnerArguments:
    """What the runner is told on its command line; ``parse`` and ``to_argv`` are inverses."""

    __slots__ = ("fds", "language", "limits", "mode", "preload")

    def __init__(
        self,
        mode: str,
        language: str,
        fds: "tuple[int, ...] | None" = None,
        limits: "dict[str, tuple[int, int]] | None" = None,
        preload: "list[str] | None" = None,
    ) -> None:
        self.mode = mode
        self.language = language
        self.fds = fds  # MODE_FDS[mode] of them, or None
        self.limits = dict(limits or {})  # RLIMIT_<NAME> -> (soft, hard)
        self.preload = list(preload or [])  # modules imported and warmed before ready

    def to_argv(self) -> "list[str]":
        argv = [self.mode, self.language, *(str(fd) for fd in self.fds or ())]
        argv += [f"{name}={soft}:{hard}" for name, (soft, hard) in self.limits.items()]
        if self.preload:
            argv.append(f"{PRELOAD}={','.join(self.preload)}")
        return argv

    @classmethod
    def parse(cls, argv: "list[str]") -> "RunnerArguments":
        """The arguments after the runner's path. Raises WireError naming what is wrong."""
        if len(argv) < 2:
            raise WireError(
                "usage: runner.py relay|direct|template <language> [fds] [RLIMIT_X=soft:hard]"
            )
        mode, language, rest = argv[0], argv[1], argv[2:]
        if mode not in MODE_FDS:
            raise WireError(f"unknown mode {mode!r}: expected one of {sorted(MODE_FDS)}")
        if language not in LANGUAGES:
            raise WireError(f"unknown language {language!r}")
        fds = None
        count = MODE_FDS[mode]
        if count:
            if len(rest) < count or not all(word.isdigit() for word in rest[:count]):
                raise WireError(f"{mode} mode needs {count} fds")
            fds = tuple(int(word) for word in rest[:count])
            rest = rest[count:]
        limits = {}
        preload: list[str] = []
        for word in rest:
            name, _, value = word.partition("=")
            if name == PRELOAD:
                preload = value.split(",") if value else []
                if not all(_MODULE_NAME(module) for module in preload):
                    raise WireError(f"bad preload {value!r}: expected module names")
                continue
            soft, _, hard = value.partition(":")
            if not name.startswith(RLIMIT_PREFIX) or not soft.isdigit() or not hard.isdigit():
                raise WireError(f"bad limit {word!r}: expected RLIMIT_<NAME>=<soft>:<hard>")
            limits[name] = (int(soft), int(hard))
        return cls(mode, language, fds, limits, preload)


# --- The fork tier: a template's control socket ------------------------------------
#
# A SOCK_SEQPACKET pair, one message per datagram. The daemon sends one
# SpawnOrder per sandbox, with SPAWN_FDS attached (SCM_RIGHTS) in that order;
# the template answers TEMPLATE_READY once, when its preload is warm, then one
# SandboxExit per order, when the sandbox's first process has been reaped (or
# failed to start). The template never runs code, but the daemon still
# decodes what it says strictly: a template that says nonsense is replaced.
SPAWN_FDS = ("request", "channel", "diagnostics", "stdout", "stderr", "status")
MAX_CONTROL_BYTES = 4096
# The pool's cgroup directories, in the template: on its /tmp, which each
# sandbox covers with a fresh tmpfs of its own.
CGROUP_MOUNT = "/tmp/.sandpool-cgroups"
TEMPLATE_READY = b'{"ready": true}'
# Per-user kernel quotas that are not rlimits, which a sandbox that shares a
# host uid gets a share of (pool/quotas.py), as its user namespace's
# /proc/sys/user/<name>: set by a fork sandbox itself, and by a non-root
# daemon for its process sandboxes (pool/backends/process/userns.py).
USER_QUOTAS = ("max_inotify_instances", "max_inotify_watches")
_SANDBOX_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z").match


def _control_object(data: bytes, what: str) -> "dict[str, object]":
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WireError(f"malformed {what}") from None
    if not isinstance(value, dict):
        raise WireError(f"malformed {what}")
    return value


class SpawnOrder:
    """One sandbox the template is to fork: who it runs as, where its cgroups are."""

    __slots__ = ("cgroup_procs", "ptys", "sandbox", "tmpfs_bytes", "uid", "user_quotas")

    def __init__(
        self, sandbox: str, uid: int, cgroup_procs: "list[str]", tmpfs_bytes: int,
        user_quotas: "dict[str, int]", ptys: int,
    ) -> None:
        self.sandbox = sandbox
        self.uid = uid  # the sandbox's host uid, mapped to itself in the template's namespace
        self.cgroup_procs = list(cgroup_procs)  # cgroup.procs files under CGROUP_MOUNT
        self.tmpfs_bytes = tmpfs_bytes  # each of /tmp, /dev/shm and WORKDIR
        self.user_quotas = dict(user_quotas)  # USER_QUOTAS name -> this sandbox's share
        self.ptys = ptys  # its devpts instance's max: its share of the host's PTYs

    def encode(self) -> bytes:
        return json.dumps({name: getattr(self, name) for name in self.__slots__}).encode()

    @classmethod
    def decode(cls, data: bytes) -> "SpawnOrder":
        """Raises WireError unless every field is there and sane."""
        value = _control_object(data, "spawn order")
        sandbox, uid, procs, size, quotas, ptys = (value.get(name) for name in (
            "sandbox", "uid", "cgroup_procs", "tmpfs_bytes", "user_quotas", "ptys"))
        if not isinstance(sandbox, str) or not _SANDBOX_ID(sandbox):
            raise WireError("spawn order: bad sandbox id")
        if type(uid) is not int or not 0 < uid < 2**31:
            raise WireError("spawn order: bad uid")
        if type(size) is not int or size <= 0:
            raise WireError("spawn order: bad tmpfs_bytes")
        if not isinstance(procs, list) or not all(
            isinstance(path, str) and path.startswith(CGROUP_MOUNT + "/")
            and "/../" not in path and path.endswith("/cgroup.procs") for path in procs
        ):
            raise WireError("spawn order: bad cgroup_procs")
        if not isinstance(quotas, dict) or not all(
            name in USER_QUOTAS and type(limit) is int and limit > 0
            for name, limit in quotas.items()
        ):
            raise WireError("spawn order: bad user_quotas")
        if type(ptys) is not int or ptys <= 0:
            raise WireError("spawn order: bad ptys")
        return cls(sandbox, uid, procs, size, quotas, ptys)


class SandboxExit:
    """A sandbox's first process was reaped: ``status`` as subprocess reports it
    (the exit code, or minus the signal that killed it)."""

    __slots__ = ("sandbox", "status")

    def __init__(self, sandbox: str, status: int) -> None:
        self.sandbox = sandbox
        self.status = status

    def encode(self) -> bytes:
        return json.dumps({"sandbox": self.sandbox, "status": self.status}).encode()

    @classmethod
    def decode(cls, data: bytes) -> "SandboxExit":
        value = _control_object(data, "sandbox exit")
        sandbox, status = value.get("sandbox"), value.get("status")
        if not isinstance(sandbox, str) or type(status) is not int or not -64 <= status <= 255:
            raise WireError("malformed sandbox exit")
        return cls(sandbox, status)


# --- Outcome: files out, rich results and the error, besides the output ------------
#
# After the code ends, the guest sends, before its EXIT frame:
# - per entry under OUT_DIR: FILE_OUT with a JSON header {"path": "out/...",
#   "kind": "file"|"symlink"|"fifo"|"socket"|"device"|"directory"|"other",
#   "size": int}, then (regular files only) the content as CONTENT frames;
# - per rich result: DISPLAY with a JSON header {"type": "image/png" |
#   "text/plain"}, then its bytes as CONTENT frames;
# - at most one ERROR: JSON {"name", "value", "traceback"}.
# Every frame stays within CHUNK bytes, so no decoder buffers more. None of it
# is a verdict: it is what the program says it produced, held to OutcomeLimits
# by the daemon whatever the guest does (the guest is told the limits in its
# request only to stop early).

FILE_KINDS = ("file", "symlink", "fifo", "socket", "device", "directory", "other")
DISPLAY_TYPES = ("image/png", "text/plain")
MAX_PATH_CHARS = 1024
MAX_ERROR_BYTES = 64 * 1024  # an ERROR frame's payload, traceback included


class OutcomeLimits:
    """Caps on what one run may return besides its output."""

    __slots__ = ("max_display_bytes", "max_file_bytes", "max_files", "max_files_bytes")

    def __init__(
        self, max_files: int, max_file_bytes: int, max_files_bytes: int, max_display_bytes: int
    ) -> None:
        self.max_files = max_files  # entries reported from OUT_DIR
        self.max_file_bytes = max_file_bytes  # content returned per file
        self.max_files_bytes = max_files_bytes  # content returned for all files together
        self.max_display_bytes = max_display_bytes  # all rich results together

    def to_json(self) -> "dict[str, int]":
        return {name: getattr(self, name) for name in self.__slots__}

    def frame_bytes(self) -> int:
        """The most a guest within these limits sends as outcome and exit frames."""
        content = self.max_files_bytes + self.max_display_bytes
        headers = (self.max_files + 1) * (FRAME.size + MAX_PATH_CHARS * 6 + 64)  # JSON-escaped
        chunks = (content // CHUNK + self.max_files + 2) * FRAME.size
        return content + headers + chunks + FRAME.size + MAX_ERROR_BYTES + 2 * FRAME.size

    @classmethod
    def from_json(cls, value: object) -> "OutcomeLimits":
        if not isinstance(value, dict) or set(value) != set(cls.__slots__) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values()
        ):
            raise WireError("malformed outcome limits")
        return cls(**value)


class GuestRequest:
    """What the guest is asked to run: the code and everything around it."""

    __slots__ = ("argv", "code", "env", "files", "limits", "session", "stdin")

    def __init__(
        self,
        code: str,
        stdin: str = "",
        files: "list[tuple[str, bytes]] | None" = None,
        env: "dict[str, str] | None" = None,
        argv: "list[str] | None" = None,
        limits: "OutcomeLimits | None" = None,
        session: bool = False,
    ) -> None:
        self.code = code
        self.stdin = stdin
        self.files = list(files or [])  # (path relative to WORKDIR, content), validated upstream
        self.env = dict(env or {})  # added to the sandbox's environment
        self.argv = list(argv or [])  # sys.argv[1:] / process.argv.slice(2)
        self.limits = limits or OutcomeLimits(0, 0, 0, 0)
        # A session's run: the code runs in the session's __main__, and the
        # child takes the next request afterwards instead of parking.
        self.session = session

    def encode(self) -> bytes:
        """REQUEST, the JSON header, then the files' contents; lone surrogates survive.

        The contents travel raw, not as base64 strings inside the JSON:
        encoding a megabyte that way and decoding it in the guest cost ~20 ms
        of CPU on the request's path (docs/performance.md).
        """
        header = json.dumps({
            "code": self.code,
            "stdin": self.stdin,
            "files": [[path, len(content)] for path, content in self.files],
            "env": self.env,
            "argv": self.argv,
            "limits": self.limits.to_json(),
            "session": self.session,
        }, ensure_ascii=False).encode("utf-8", "surrogatepass")
        contents = b"".join(content for _, content in self.files)
        return REQUEST.pack(len(header), len(contents)) + header + contents

    @classmethod
    def decode(cls, header: bytes, contents: bytes) -> "GuestRequest":
        """A request from its header and contents (REQUEST's two lengths). Raises WireError."""
        try:
            request = json.loads(header.decode("utf-8", "surrogatepass"))
        except ValueError:
            raise WireError("the request is not JSON") from None
        if not isinstance(request, dict):
            raise WireError("the request is not a JSON object")
        code, stdin = request.get("code"), request.get("stdin", "")
        if not isinstance(code, str) or not isinstance(stdin, str):
            raise WireError("the request's code and stdin must be strings")
        files, env, argv = request.get("files", []), request.get("env", {}), request.get("argv", [])
        if not isinstance(files, list) or not all(
            isinstance(f, list) and len(f) == 2 and isinstance(f[0], str)
            and type(f[1]) is int and f[1] >= 0
            for f in files
        ):
            raise WireError("the request's files must be [path, size] pairs")
        if sum(size for _, size in files) != len(contents):
            raise WireError("the request's file sizes do not add up to its contents")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise WireError("the request's env must map strings to strings")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise WireError("the request's argv must be a list of strings")
        decoded, offset = [], 0
        for path, size in files:
            decoded.append((path, contents[offset : offset + size]))
            offset += size
        limits = OutcomeLimits.from_json(request["limits"]) if "limits" in request else None
        session = request.get("session", False)
        if not isinstance(session, bool):
            raise WireError("the request's session must be a boolean")
        return cls(code, stdin, decoded, env, argv, limits, session)


def header_frame(kind: bytes, header: "Mapping[str, object]") -> bytes:
    """A FILE_OUT, DISPLAY or ERROR frame: its JSON header, cut to fit one frame."""
    return frame(kind, json.dumps(header, ensure_ascii=False).encode("utf-8", "replace"))


def content_frames(data: bytes) -> bytes:
    """``data`` as CONTENT frames of at most CHUNK bytes each."""
    return b"".join(frame(CONTENT, data[i : i + CHUNK]) for i in range(0, len(data), CHUNK))


class OutFile:
    __slots__ = ("content", "kind", "path", "size", "truncated")

    def __init__(self, path: str, kind: str, size: int) -> None:
        self.path = path
        self.kind = kind
        self.size = size  # as the guest saw it (st_size)
        self.content = bytearray()
        self.truncated = False  # content stops short of ``size`` (a limit, or it changed)


class Display:
    __slots__ = ("data", "mime", "truncated")

    def __init__(self, mime: str) -> None:
        self.mime = mime
        self.data = bytearray()
        self.truncated = False


class Outcome:
    """What the guest returned besides its output, within the limits, as the daemon keeps it."""

    def __init__(self, limits: OutcomeLimits) -> None:
        self.limits = limits
        self.files: list[OutFile] = []
        self.results: list[Display] = []
        self.error: dict[str, str] | None = None
        self.files_dropped = 0  # entries past limits.max_files
        self.results_dropped = 0  # results past limits.max_display_bytes
        self._files_bytes = 0
        self._display_bytes = 0
        self._current: OutFile | Display | None = None  # what CONTENT frames extend

    def add(self, kind: bytes, payload: bytes) -> None:
        """Take one outcome frame. Raises WireError on a malformed one; a frame past
        a limit is counted or cut, never buffered."""
        if kind == CONTENT:
            self._add_content(payload)
            return
        header = _json_object(payload)
        if kind == FILE_OUT:
            path, file_kind, size = header.get("path"), header.get("kind"), header.get("size")
            if not _valid_out_path(path) or file_kind not in FILE_KINDS or not (
                isinstance(size, int) and not isinstance(size, bool) and size >= 0
            ):
                raise WireError("malformed file header from the sandbox")
            if len(self.files) >= self.limits.max_files:
                self.files_dropped += 1
                self._current = None
                return
            out = OutFile(str(path), str(file_kind), size)
            self.files.append(out)
            self._current = out
        elif kind == DISPLAY:
            mime = header.get("type")
            if mime not in DISPLAY_TYPES:
                raise WireError("malformed result header from the sandbox")
            if self._display_bytes >= self.limits.max_display_bytes:
                self.results_dropped += 1
                self._current = None
                return
            display = Display(str(mime))
            self.results.append(display)
            self._current = display
        elif kind == ERROR:
            if not all(isinstance(header.get(key), str) for key in ("name", "value", "traceback")):
                raise WireError("malformed error from the sandbox")
            if self.error is None:
                self.error = {key: str(header[key]) for key in ("name", "value", "traceback")}
            self._current = None
        else:
            raise WireError(f"unexpected frame {kind!r} in a run's outcome")

    def _add_content(self, data: bytes) -> None:
        current = self._current
        if current is None:
            return  # the content of something dropped past a limit
        if isinstance(current, OutFile):
            if current.kind != "file":
                raise WireError("content for a file that is not a regular file")
            room = max(0, min(
                self.limits.max_file_bytes - len(current.content),
                self.limits.max_files_bytes - self._files_bytes,
            ))
            kept = data[:room]
            self._files_bytes += len(kept)
            current.content += kept
        else:
            room = max(0, self.limits.max_display_bytes - self._display_bytes)
            kept = data[:room]
            self._display_bytes += len(kept)
            current.data += kept
        if len(kept) < len(data):
            current.truncated = True


def _json_object(payload: bytes) -> "dict[str, object]":
    try:
        value = json.loads(payload.decode("utf-8"))
    except ValueError:
        raise WireError("malformed outcome frame from the sandbox") from None
    if not isinstance(value, dict):
        raise WireError("malformed outcome frame from the sandbox")
    return value


def _valid_out_path(path: object) -> bool:
    """``out/...``, relative, no ``..``, no NUL: a name to report, never a host path."""
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS or "\0" in path:
        return False
    parts = path.split("/")
    return parts[0] == OUT_DIR and len(parts) > 1 and all(
        part not in ("", ".", "..") for part in parts
    )
