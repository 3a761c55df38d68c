"""What the daemon answers, as typed values: parsed from the JSON documents, no I/O.

A field the daemon adds later is ignored, so an older client keeps working;
a field this client needs that is missing or of the wrong type raises
``SandpoolClientError`` with the code ``invalid_response``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from sandpool_client.errors import SandpoolClientError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class OutFile:
    """One entry the program left under ``out/`` in its working directory.

    ``type`` is ``file``, ``symlink``, ``fifo``, ``socket``, ``device``,
    ``directory`` or ``other``; only a ``file`` has ``content`` (the others are
    reported by name and size, never followed). ``truncated``: ``content``
    stops short of ``size``, cut at the pool's file limits.
    """

    path: str
    type: str
    size: int
    content: bytes | None
    truncated: bool


@dataclass(frozen=True, slots=True)
class RichResult:
    """What a notebook cell would show: a figure (``image/png``) or a final value's repr
    (``text/plain``).

    ``data`` holds the bytes (an image decoded from base64, text as UTF-8);
    ``text`` the text for a ``text/*`` type, None for an image.
    """

    type: str
    data: bytes
    text: str | None
    truncated: bool


@dataclass(frozen=True, slots=True)
class RunError:
    """The program's uncaught exception: its class ``name``, ``str`` value and traceback."""

    name: str
    value: str
    traceback: str


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """Output a streamed run (``Client.stream``) wrote, as the daemon captured it.

    ``stream`` is ``stdout`` or ``stderr``. A stream's chunks joined equal the
    result's ``stdout`` or ``stderr``: the same cap, the same UTF-8 decoding with
    U+FFFD (a character is never split between two chunks).
    """

    stream: Literal["stdout", "stderr"]
    data: str


@dataclass(frozen=True, slots=True)
class RunResult:
    """The answer to one run. Verdicts (``timed_out``, ``oom_killed``, the truncation
    flags) are the daemon's; ``files``, ``results`` and ``error`` are the program's claims.

    ``exit_code`` is None when sandpool killed the sandbox (a timeout, output over
    the cap); 128 + N when signal N killed the program.
    """

    exit_code: int | None
    stdout: str
    stderr: str
    timed_out: bool
    oom_killed: bool
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: float
    queued_ms: float
    pool: str
    sandbox_id: str
    files: tuple[OutFile, ...] = ()
    files_omitted: int = 0
    results: tuple[RichResult, ...] = ()
    results_omitted: int = 0
    error: RunError | None = None

    @property
    def ok(self) -> bool:
        """The program exited 0 and sandpool did not kill it."""
        return self.exit_code == 0 and not self.timed_out and not self.oom_killed

    @property
    def images(self) -> tuple[RichResult, ...]:
        """The image results (figures), in the order they were shown."""
        return tuple(r for r in self.results if r.type.startswith("image/"))

    @classmethod
    def from_json(cls, answer: object) -> RunResult:
        """The result of a ``POST /v1/run`` answer's JSON object.

        Raises SandpoolClientError (``invalid_response``) if it is not one.
        """
        document = _object(answer, "the answer")
        error = document.get("error")
        error_document = None if error is None else _object(error, "error")
        return cls(
            exit_code=_optional(document, "exit_code", int),
            stdout=_field(document, "stdout", str),
            stderr=_field(document, "stderr", str),
            timed_out=_field(document, "timed_out", bool),
            oom_killed=_field(document, "oom_killed", bool),
            stdout_truncated=_field(document, "stdout_truncated", bool),
            stderr_truncated=_field(document, "stderr_truncated", bool),
            duration_ms=float(_field(document, "duration_ms", (int, float))),
            queued_ms=float(_field(document, "queued_ms", (int, float))),
            pool=_field(document, "pool", str),
            sandbox_id=_field(document, "sandbox_id", str),
            files=tuple(_out_file(e) for e in _list(document, "files")),
            files_omitted=_field(document, "files_omitted", int, 0),
            results=tuple(_rich_result(e) for e in _list(document, "results")),
            results_omitted=_field(document, "results_omitted", int, 0),
            error=None if error_document is None else RunError(
                name=_field(error_document, "name", str),
                value=_field(error_document, "value", str),
                traceback=_field(error_document, "traceback", str),
            ),
        )

    def save_files(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write the run's regular files under ``directory`` at their ``out/...`` paths.

        Returns the paths written; entries that are not regular files are skipped,
        a truncated file is written as far as it came back. Never follows a symlink
        at a file's own name, so a stale link in ``directory`` cannot send content
        elsewhere. Raises ValueError for a path that is not plain and relative (the
        daemon never sends one), OSError when a file cannot be written.
        """
        written = []
        for entry in self.files:
            parts = entry.path.split("/")
            if (entry.path.startswith("/") or "\0" in entry.path
                    or any(p in ("", ".", "..") for p in parts)):
                raise ValueError(f"refusing to write the returned path {entry.path!r}")
            if entry.type != "file" or entry.content is None:
                continue
            target = Path(directory, *parts)
            _write_new(target, entry.content)
            written.append(target)
        return written

    def save_images(
        self, directory: str | os.PathLike[str], prefix: str = "result-"
    ) -> list[Path]:
        """Write each image result as ``directory/<prefix>N.<subtype>`` (``result-1.png``...).

        N counts images from 1 in the order they were shown. Returns the paths
        written; makes ``directory`` if there is an image. Raises OSError.
        """
        written = []
        for number, image in enumerate(self.images, 1):
            # image/png -> png, image/svg+xml -> svg; the type is the program's
            # claim and becomes part of a file name, so only letters and digits.
            subtype = image.type.rpartition("/")[2].partition("+")[0]
            if not subtype.isalnum():
                subtype = "bin"
            target = Path(directory, f"{prefix}{number}.{subtype}")
            _write_new(target, image.data)
            written.append(target)
        return written


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """One pool of ``GET /v1/pools``: its settings, what runs in it, its sandboxes by state.

    ``runtime_version`` and ``packages`` are what the image was built with
    (``"unknown"`` for an image built elsewhere).
    """

    name: str
    backend: str
    language: str
    idle: int
    busy: int
    starting: int
    min_idle: int
    max_size: int
    runtime_version: str = "unknown"
    packages: Mapping[str, str] = field(default_factory=dict)
    # Why the pool cannot serve at once (its backend's last start error, or
    # warming); None when nothing keeps it, and from a daemon that does not say.
    problem: str | None = None

    @classmethod
    def list_from_json(cls, document: object) -> list[PoolInfo]:
        """The pools of a ``GET /v1/pools`` answer. Raises SandpoolClientError."""
        pools = _list(_object(document, "the answer"), "pools")
        return [cls.from_json(_object(p, "pools[]")) for p in pools]

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> PoolInfo:
        """One entry of ``GET /v1/pools``. Raises SandpoolClientError (``invalid_response``)."""
        runtime = _object(document.get("runtime", {}), "runtime")
        packages = _object(runtime.get("packages", {}), "runtime.packages")
        return cls(
            name=_field(document, "name", str),
            backend=_field(document, "backend", str),
            language=_field(document, "language", str),
            idle=_field(document, "idle", int),
            busy=_field(document, "busy", int),
            starting=_field(document, "starting", int),
            min_idle=_field(document, "min_idle", int),
            max_size=_field(document, "max_size", int),
            runtime_version=_field(runtime, "version", str, "unknown"),
            packages={str(k): str(v) for k, v in packages.items()},
            problem=_optional(document, "problem", str),
        )


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A live session as the daemon describes it (``GET /v1/sessions/{id}``).

    ``expires_at`` is the latest it can live (its creation plus ``ttl_s``);
    ``idle_expires_at`` when it ends if no run comes first (the last run's end
    plus ``idle_timeout_s``), None while a run is in flight (``busy``). Times
    are timezone-aware (UTC).
    """

    session_id: str
    pool: str
    created_at: datetime
    expires_at: datetime
    idle_timeout_s: float
    idle_expires_at: datetime | None
    runs: int
    busy: bool

    @classmethod
    def from_json(cls, answer: object) -> SessionInfo:
        """A session object. Raises SandpoolClientError (``invalid_response``)."""
        document = _object(answer, "the session")
        return cls(
            session_id=_field(document, "session_id", str),
            pool=_field(document, "pool", str),
            created_at=_timestamp(document, "created_at"),
            expires_at=_timestamp(document, "expires_at"),
            idle_timeout_s=float(_field(document, "idle_timeout_s", (int, float))),
            idle_expires_at=None if document.get("idle_expires_at") is None
            else _timestamp(document, "idle_expires_at"),
            runs=_field(document, "runs", int),
            busy=_field(document, "busy", bool),
        )

    @classmethod
    def list_from_json(cls, answer: object) -> list[SessionInfo]:
        """The sessions of a ``GET /v1/sessions`` answer. Raises SandpoolClientError."""
        return [cls.from_json(s) for s in _list(_object(answer, "the answer"), "sessions")]


def ended_reason_from_json(answer: object) -> str:
    """Why a session ended, from a ``DELETE /v1/sessions/{id}`` answer (``deleted``,
    or the reason it had ended for already). Raises SandpoolClientError."""
    return _field(_object(answer, "the answer"), "ended", str)


def _timestamp(document: Mapping[str, Any], key: str) -> datetime:
    text = _field(document, key, str)
    try:
        # 3.11's fromisoformat reads RFC 3339 with its "Z".
        when = datetime.fromisoformat(text)
    except ValueError:
        raise _invalid(f"{key!r} is not an ISO 8601 time: {text[:40]!r}") from None
    if when.tzinfo is None:
        raise _invalid(f"{key!r} has no time zone: {text[:40]!r}")
    return when


def _out_file(entry: object) -> OutFile:
    document = _object(entry, "files[]")
    content = _optional(document, "content", str)
    return OutFile(
        path=_field(document, "path", str),
        type=_field(document, "type", str),
        size=_field(document, "size", int),
        content=None if content is None else _base64(content, "files[].content"),
        truncated=_field(document, "truncated", bool, False),
    )


def _rich_result(entry: object) -> RichResult:
    document = _object(entry, "results[]")
    mime = _field(document, "type", str)
    data = _field(document, "data", str)
    is_text = mime.startswith("text/")
    return RichResult(
        type=mime,
        # Text comes decoded by the daemon (U+FFFD for what was not UTF-8), so
        # encoding it again loses nothing.
        data=data.encode("utf-8", "surrogatepass") if is_text else _base64(data, "results[].data"),
        text=data if is_text else None,
        truncated=_field(document, "truncated", bool, False),
    )


def _write_new(target: Path, content: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(target, flags, 0o666), "wb") as f:
        f.write(content)


_MISSING: Any = object()


def _invalid(what: str) -> SandpoolClientError:
    return SandpoolClientError(
        f"the daemon's answer is not what this client understands: {what}",
        code="invalid_response",
    )


def _field(
    document: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...],
    default: T = _MISSING,
) -> T:
    value = document.get(key, default)
    if value is _MISSING:
        raise _invalid(f"{key!r} is missing")
    # bool is an int to isinstance: a count or a status given as true is still wrong.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise _invalid(f"{key!r} is {type(value).__name__}")
    return value  # type: ignore[return-value]  # checked against kind just above


def _optional(document: Mapping[str, Any], key: str, kind: type[T]) -> T | None:
    if document.get(key) is None:
        return None
    return _field(document, key, kind)


def _list(document: Mapping[str, Any], key: str) -> list[Any]:
    return _field(document, key, list, [])


def _object(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(f"{what} is not an object")
    return value


def _base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{what} is not base64") from None
