"""What the sync and the async client share, apart from I/O: the request body, the
answer turned into a document or an exception, the read timeout, the retry wait.

Fed dicts, bytes and exceptions in its tests; ``client.py`` only moves bytes.
"""

from __future__ import annotations

import base64
import email.utils
import json
import math
import os
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from sandpool_client.errors import (
    ApiError,
    BadRequest,
    DaemonUnreachable,
    Forbidden,
    RequestTimeout,
    SandpoolClientError,
    SessionBusy,
    SessionEnded,
    SessionLimit,
    SessionNotFound,
    SessionsUnsupported,
    TooManySessions,
    Unavailable,
)
from sandpool_client.models import OutputChunk, RunResult

# The daemon's default socket. The daemon keeps its own copy of this path: the
# two are separate distributions, and the client must not depend on the server.
DEFAULT_SOCKET = "/run/sandpool/sandpool.sock"
SOCKET_ENV = "SANDPOOL_SOCKET"

# How long to wait for an answer to a request that names no run timeout (a run
# without timeout_s, GET /v1/pools): above a default pool's worst case, its
# acquire_timeout_s (30 s) plus the largest default timeout_s (30 s, datasci).
DEFAULT_REQUEST_TIMEOUT_S = 120.0
# Added to a run's timeout_s for its read timeout: the wait for a warm sandbox
# (a pool's acquire_timeout_s, 30 s by default) and the sandbox's start and
# teardown around the run.
DEFAULT_QUEUE_SLACK_S = 35.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# A Retry-After longer than this is not waited out even with retries left:
# the daemon is saying that it will be unavailable for a while.
DEFAULT_MAX_RETRY_WAIT_S = 30.0
# When a 503 carries no Retry-After (a proxy in between, not the daemon).
FALLBACK_RETRY_WAIT_S = 1.0

BAD_REQUEST_STATUSES = frozenset({400, 404, 405, 413, 415, 422})
# 429: this token's runs in flight are at its cap (the TCP listener); 503: the daemon's.
UNAVAILABLE_STATUSES = frozenset({429, 503})
FORBIDDEN_STATUSES = frozenset({401, 403})
# The session codes of docs/sessions.md, each its own class whatever the status.
SESSION_ERRORS: dict[str, type[ApiError]] = {
    "session_not_found": SessionNotFound,
    "sessions_unsupported": SessionsUnsupported,
    "session_ended": SessionEnded,
    "session_busy": SessionBusy,
    "too_many_sessions": TooManySessions,
    "session_limit": SessionLimit,
    "session_memory": SessionLimit,
}
RUN_PATH = "/v1/run"
SESSIONS_PATH = "/v1/sessions"
# Asks POST /v1/run for its output line by line as it is written (NDJSON).
STREAM_HEADERS = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}


def socket_path(socket: str | os.PathLike[str] | None) -> str:
    """The socket to use: the one given, else ``$SANDPOOL_SOCKET``, else the default."""
    if socket is not None:
        return os.fspath(socket)
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def run_body(
    code: str,
    *,
    pool: str | None,
    language: str | None,
    stdin: str | None,
    timeout_s: float | None,
    files: Mapping[str, bytes | str] | None,
    env: Mapping[str, str] | None,
    argv: Sequence[str] | None,
) -> dict[str, Any]:
    """The JSON object of ``POST /v1/run``; fields left None are left out (the daemon's defaults).

    A str travels as UTF-8 text, and so do bytes that are valid UTF-8 (a CSV, a
    script): the same bytes arrive, a quarter fewer of them, and neither end
    pays for base64 (about 10 ms per MB here). Other bytes travel as base64.
    """
    body: dict[str, Any] = {"code": code}
    for key, value in (("pool", pool), ("language", language), ("stdin", stdin),
                       ("timeout_s", timeout_s)):
        if value is not None:
            body[key] = value
    if files is not None:
        body["files"] = [file_entry(path, content) for path, content in files.items()]
    if env is not None:
        body["env"] = dict(env)
    if argv is not None:
        if isinstance(argv, str):  # a str is a Sequence[str] of its characters
            raise TypeError("argv must be a list of strings, not a str")
        body["argv"] = list(argv)
    return body


def file_entry(path: str, content: bytes | str) -> dict[str, str]:
    """One entry of a request's ``files``: as text where that is lossless, else base64."""
    if isinstance(content, bytes):
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            return {"path": path, "content": base64.b64encode(content).decode("ascii"),
                    "encoding": "base64"}
        return {"path": path, "content": text, "encoding": "utf-8"}
    return {"path": path, "content": content, "encoding": "utf-8"}


def session_body(
    *, pool: str | None, ttl_s: float | None, idle_timeout_s: float | None
) -> dict[str, Any]:
    """The JSON object of ``POST /v1/sessions``; fields left None are the daemon's defaults."""
    return {key: value for key, value in (
        ("pool", pool), ("ttl_s", ttl_s), ("idle_timeout_s", idle_timeout_s),
    ) if value is not None}


def session_path(session_id: str, action: str = "") -> str:
    """``/v1/sessions/{id}`` (``action``: ``run`` for ``.../run``), the id quoted whole.

    Raises ValueError for an empty id: ``/v1/sessions/`` would be another resource.
    """
    if not session_id:
        raise ValueError("a session id is not empty")
    path = f"{SESSIONS_PATH}/{urllib.parse.quote(session_id, safe='')}"
    return f"{path}/{action}" if action else path


def encode_json(body: Mapping[str, Any]) -> bytes:
    """The request body as bytes.

    ASCII-escaped, unlike httpx's ``json=``: code read with ``surrogateescape``
    (a file that is not UTF-8) holds lone surrogates, which only ``\\uXXXX``
    escapes can carry.
    """
    return json.dumps(body).encode("ascii")


def read_timeout_s(
    run_timeout_s: float | None, request_timeout_s: float, queue_slack_s: float
) -> float:
    """How long a run may take to answer: at least ``request_timeout_s``, and for a run
    given ``timeout_s``, that plus the slack for queueing, so a long run is never cut."""
    if run_timeout_s is None or not math.isfinite(run_timeout_s):
        return request_timeout_s
    return max(request_timeout_s, run_timeout_s + queue_slack_s)


def decode_answer(response: httpx.Response) -> Any:
    """The JSON document of a successful answer; raises the error an error answer means.

    Raises BadRequest, Forbidden, Unavailable or ApiError with the daemon's
    ``code`` and ``message``, or for a session's code its class
    (``SESSION_ERRORS``); SandpoolClientError (``invalid_response``) for an
    answer that is not JSON.
    """
    status = response.status_code
    try:
        document = json.loads(response.content)
    except ValueError:
        raise SandpoolClientError(
            f"sandpool answered {status} without JSON", code="invalid_response", status=status
        ) from None
    if status < 400:
        return document
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        error = {}
    code = str(error.get("code") or f"http_{status}")
    message = str(error.get("message") or f"sandpool answered {status}")
    session_error = SESSION_ERRORS.get(code)
    if session_error is not None:
        raise _session_error(session_error, response, message, code, error)
    if status in UNAVAILABLE_STATUSES:
        raise Unavailable(message, code=code, status=status,
                          retry_after=parse_retry_after(response.headers.get("Retry-After")))
    if status in BAD_REQUEST_STATUSES:
        raise BadRequest(message, code=code, status=status)
    if status in FORBIDDEN_STATUSES:
        raise Forbidden(message, code=code, status=status)
    raise ApiError(message, code=code, status=status)


def _session_error(
    kind: type[ApiError], response: httpx.Response, message: str, code: str,
    error: Mapping[str, Any],
) -> ApiError:
    status = response.status_code
    if issubclass(kind, SessionEnded):
        reason = error.get("reason")
        return kind(message, code=code, status=status,
                    reason=reason if isinstance(reason, str) else None)
    if issubclass(kind, Unavailable):
        return kind(message, code=code, status=status,
                    retry_after=parse_retry_after(response.headers.get("Retry-After")))
    return kind(message, code=code, status=status)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds from now: delta-seconds or an HTTP date; None if absent
    or unreadable. A date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT even when it does not say so
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_wait_s(error: Unavailable, max_retry_wait_s: float) -> float | None:
    """Seconds to wait before sending again after a 503; None when it is not worth waiting."""
    wait = FALLBACK_RETRY_WAIT_S if error.retry_after is None else error.retry_after
    return wait if wait <= max_retry_wait_s else None


def transport_error(error: httpx.TransportError, where: str) -> SandpoolClientError:
    """The exception an httpx transport error means for the caller.

    ``where`` names the socket or URL in the message. A timeout while
    connecting, and any failure to connect, is ``daemon_unreachable`` (nothing
    was sent); a read timeout is a RequestTimeout; a connection that broke
    after the request left is ``connection_lost``.
    """
    if isinstance(error, httpx.ConnectTimeout):
        return DaemonUnreachable(f"no answer from sandpool at {where} while connecting",
                                 code="daemon_unreachable")
    if isinstance(error, httpx.TimeoutException):
        return RequestTimeout(f"sandpool at {where} did not answer in time ({error})",
                              code="request_timeout")
    if isinstance(error, httpx.ConnectError):
        cause = _os_error(error)
        if isinstance(cause, FileNotFoundError):
            message = f"no sandpool daemon at {where} (start it: sandpool serve)"
        elif isinstance(cause, PermissionError):
            message = f"permission denied on {where} (are you in the socket's group?)"
        elif isinstance(cause, ConnectionRefusedError):
            message = f"nothing listens at {where} (is the daemon running?)"
        else:
            message = f"cannot connect to sandpool at {where}: {cause or error}"
        return DaemonUnreachable(message, code="daemon_unreachable")
    return DaemonUnreachable(
        f"the connection to sandpool at {where} broke before its answer: {error}",
        code="connection_lost",
    )


def _os_error(error: BaseException) -> OSError | None:
    """The OSError under httpx's and httpcore's wrappers, if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def stream_event(line: str) -> OutputChunk | RunResult:
    """One line of a streamed run: output, or the final result.

    Raises ApiError (with the stream's status, 200) for an error line, the run
    having failed after its output began; SandpoolClientError
    (``invalid_response``) for a line that is none of these.
    """
    try:
        document = json.loads(line)
    except ValueError:
        document = None
    kind = document.get("type") if isinstance(document, dict) else None
    if kind in ("stdout", "stderr") and isinstance(document, dict):
        data = document.get("data")
        if isinstance(data, str):
            return OutputChunk(stream=kind, data=data)
    elif kind == "result":
        return RunResult.from_json(document)
    elif kind == "error" and isinstance(document, dict):
        raise ApiError(str(document.get("message") or "the run failed"),
                       code=str(document.get("code") or "stream_error"), status=200)
    raise SandpoolClientError(
        f"sandpool streamed a line that is not a run event: {line[:200]!r}",
        code="invalid_response", status=200,
    )


def stream_ended_early(where: str) -> DaemonUnreachable:
    """What a stream that closed before its result line means: the connection broke."""
    return DaemonUnreachable(
        f"the stream from sandpool at {where} ended before the run's result",
        code="connection_lost",
    )
