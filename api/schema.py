"""The JSON bodies of the HTTP API, apart from aiohttp: no I/O, fed bytes and dicts.

One concept, kept in one module past the usual size: the API's contract,
every field's check and every error code next to each other.

What a ``/v1/run`` body may hold and what each way of getting it wrong answers
(a ``BadRequestError`` or ``UnknownPoolError`` with a stable code), the body of a
run's result, and one pool's summary in ``GET /v1/pools``. ``api/server.py``
wires these to HTTP; the contract itself is defined here once.

Files in are checked here, before any sandbox is involved: a path that would
leave the sandbox's working directory, or one the guest could not create
(a name too long, a file where a directory must be), never reaches a guest.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypedDict

from pool.backends.base import RunRequest, RunResult
from pool.backends.runtime import Runtime
from pool.config import PoolConfig
from pool.errors import BadRequestError, UnknownPoolError
from pool.wire import Outcome

RUN_FIELDS = frozenset(
    {"argv", "code", "env", "files", "language", "pool", "stdin", "timeout_s"}
)
DEFAULT_POOL = "python"  # the pool a request that names neither pool nor language gets

# Files in: what Linux can create (NAME_MAX per component) and a whole path
# short enough to name in an error and a log line.
FILE_FIELDS = frozenset({"path", "content", "encoding"})
ENCODINGS = ("utf-8", "base64")
MAX_PATH_BYTES = 1024
MAX_NAME_BYTES = 255
# env and argv are small by nature; these bounds keep one request from
# growing a sandbox's environment or command line towards the kernel's
# ARG_MAX (where exec fails) whatever max_request_bytes allows.
MAX_ENV_ENTRIES = 64
MAX_ENV_BYTES = 64 * 1024
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ARGV_ITEMS = 256
MAX_ARGV_BYTES = 64 * 1024
SHOWN_CHARS = 60  # of a client's string quoted back in an error message


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """A stable code of an error body ``{"error": {"code", "message"}}`` and when it comes.

    ``scope`` says which requests may get it: ``run`` only ``POST /v1/run`` (and a
    session's run), ``session`` only the ``/v1/sessions`` endpoints,
    ``any`` a request to any endpoint (answered at connection or by aiohttp),
    ``routing`` a path the daemon does not serve or a method it does not allow there.
    ``status`` None: whatever status an HTTP error no other code covers carries.
    """

    code: str
    status: int | None
    scope: Literal["run", "session", "any", "routing"]
    when: str


# Every code the API answers with, once: api/openapi.py documents them from
# here, and tests/test_openapi.py checks that each code raised in api/ and by
# the pools' UnavailableError is listed, and each listed code is raised.
ERROR_CODES = (
    ErrorCode("invalid_json", 400, "run", "the body is not valid JSON"),
    ErrorCode("invalid_encoding", 400, "run", "the body is not valid UTF-8"),
    ErrorCode("invalid_request", 400, "run", "the body is not a JSON object"),
    ErrorCode("missing_code", 400, "run", "no 'code' field, or null"),
    ErrorCode("invalid_type", 400, "run", "'code', 'stdin', 'pool' or 'language' not a string"),
    ErrorCode("invalid_timeout", 400, "run",
              "'timeout_s' not a number, or not in (0, the pool's max_timeout_s]"),
    ErrorCode("unknown_field", 400, "run", "a field the body may not hold"),
    ErrorCode("unknown_language", 400, "run", "no pool runs the 'language' given"),
    ErrorCode("body_timeout", 400, "run", "the body did not arrive within body_timeout_s"),
    ErrorCode("invalid_files", 400, "run",
              "'files' is not a list of {path, content, encoding} objects"),
    ErrorCode("too_many_files", 400, "run", "more files than the pool's max_files"),
    ErrorCode("invalid_path", 400, "run",
              "a path that is empty, absolute, has a '.', '..' or empty name, a NUL byte, a "
              f"backslash, a lone surrogate, a name over {MAX_NAME_BYTES} bytes, or more "
              f"than {MAX_PATH_BYTES} bytes"),
    ErrorCode("invalid_file_content", 400, "run",
              "content that is not strict base64, or UTF-8 text with a lone surrogate"),
    ErrorCode("file_too_large", 400, "run", "a file over the pool's max_file_bytes, decoded"),
    ErrorCode("files_too_large", 400, "run", "the files together over the pool's max_files_bytes"),
    ErrorCode("duplicate_path", 400, "run", "the same path twice"),
    ErrorCode("path_conflict", 400, "run",
              "a path under another file's path, or the directory of one given earlier"),
    ErrorCode("invalid_env", 400, "run",
              f"'env' not an object of strings, over {MAX_ENV_ENTRIES} entries or "
              f"{MAX_ENV_BYTES} bytes, a bad name, a value holding NUL or a lone surrogate"),
    ErrorCode("invalid_argv", 400, "run",
              f"'argv' not a list of strings, over {MAX_ARGV_ITEMS} items or {MAX_ARGV_BYTES} "
              "bytes, an item holding NUL or a lone surrogate"),
    ErrorCode("unauthorized", 401, "any",
              "on the TCP listener: no 'Authorization: Bearer' token, or one no configured "
              "token's sha256 matches (with WWW-Authenticate)"),
    ErrorCode("pool_forbidden", 403, "run",
              "on the TCP listener: the bearer token's 'pools' do not include the pool"),
    ErrorCode("forbidden", 403, "any",
              "the peer's uid and gid are not in allowed_uids/allowed_gids (at connection)"),
    ErrorCode("unknown_pool", 404, "run",
              "'pool' names no pool; or neither 'pool' nor 'language' and no pool 'python'"),
    ErrorCode("not_found", 404, "routing", "a path the daemon does not serve"),
    ErrorCode("method_not_allowed", 405, "routing", "a method the path does not take"),
    ErrorCode("request_too_large", 413, "run", "the body is over the server's max_request_bytes"),
    ErrorCode("unsupported_media_type", 415, "run",
              "a Content-Type other than application/json"),
    ErrorCode("token_busy", 429, "run",
              "on the TCP listener: the bearer token's max_concurrent runs are in flight"),
    ErrorCode("pool_exhausted", 503, "run", "the pool's queue (max_queue) is full"),
    ErrorCode("acquire_timeout", 503, "run",
              "no sandbox became free within the pool's acquire_timeout_s"),
    ErrorCode("backend_unavailable", 503, "run", "the pool's backend fails to start sandboxes"),
    ErrorCode("backend_error", 503, "run", "the backend failed while running the request"),
    ErrorCode("sandbox_lost", 503, "run", "every sandbox handed to the request died first"),
    ErrorCode("server_busy", 503, "run", "the server's max_concurrent_requests are running"),
    ErrorCode("shutting_down", 503, "run", "the daemon is stopping; the request did not run"),
    ErrorCode("run_interrupted", 500, "run",
              "the daemon stopped while the run was in flight (its drain ran out) and stopped "
              "it part-way: the code may have had effects; not safe to send again blindly"),
    ErrorCode("too_many_connections", 503, "any",
              "the listener's max_connections are open (at connection)"),
    ErrorCode("too_many_connections_from_peer", 503, "any",
              "the peer's max_connections_per_peer are open (at connection)"),
    ErrorCode("invalid_session", 400, "session",
              "ttl_s or idle_timeout_s not a number in range (docs/sessions.md)"),
    ErrorCode("sessions_unsupported", 400, "session",
              "the pool's tier cannot keep state between runs (wasm, javascript), or its "
              "max_sessions is 0"),
    ErrorCode("session_not_found", 404, "session",
              "no live session of that id is the caller's (another caller's id included)"),
    ErrorCode("session_busy", 409, "session", "a run of the session is in flight"),
    ErrorCode("session_ended", 410, "session",
              "the session has ended; error.reason says why (docs/sessions.md)"),
    ErrorCode("too_many_sessions", 429, "session",
              "the caller holds server.max_sessions_per_caller sessions"),
    ErrorCode("session_limit", 503, "session", "the pool holds its max_sessions sessions"),
    ErrorCode("session_memory", 503, "session",
              "the sessions together would pass server.session_memory_mb"),
    ErrorCode("http_error", None, "any", "another HTTP error, with its own status"),
)


@dataclass(frozen=True, slots=True)
class RunBody:
    """A valid ``/v1/run`` body: the name of the pool to run in, and what to run."""

    pool: str
    request: RunRequest


class FileBody(TypedDict):
    path: str
    type: str
    size: int
    content: str | None
    truncated: bool


class DisplayBody(TypedDict):
    type: str
    data: str
    truncated: bool


class ErrorBody(TypedDict):
    name: str
    value: str
    traceback: str


class OutcomeBody(TypedDict):
    files: list[FileBody]
    files_omitted: int
    results: list[DisplayBody]
    results_omitted: int
    error: ErrorBody | None


class RunResultBody(OutcomeBody):
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


class RuntimeSummary(TypedDict):
    version: str
    packages: dict[str, str]


class PoolSummary(TypedDict):
    name: str
    backend: str
    language: str
    runtime: RuntimeSummary
    idle: int
    busy: int
    leased: int
    starting: int
    min_idle: int
    max_size: int
    max_sessions: int
    problem: str | None


def decode_json_object(raw: bytes) -> dict[str, object]:
    """The body as a JSON object. Raises BadRequestError (400) naming what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequestError(
            "the request body is not valid UTF-8", code="invalid_encoding"
        ) from None
    try:
        body = json.loads(text, parse_int=_parse_int)
    except (ValueError, RecursionError):
        raise BadRequestError("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object", code="invalid_request")
    return body


def parse_run(body: Mapping[str, object], pools: Mapping[str, PoolConfig]) -> RunBody:
    """Validate a ``/v1/run`` body against the pools the daemon serves.

    Fields are checked in a fixed order (unknown fields, ``code``, ``stdin``,
    the pool, ``timeout_s``, ``files``, ``env``, ``argv``; within ``files``,
    item by item), so a body wrong in two ways always gets the same answer.
    Raises BadRequestError (400) or UnknownPoolError (404). Costs one pass
    over the body; base64 content is decoded once, here.
    """
    unknown = sorted(set(body) - RUN_FIELDS)
    if unknown:
        raise BadRequestError(
            f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(RUN_FIELDS))})",
            code="unknown_field",
        )
    if body.get("code") is None:
        raise BadRequestError("the field 'code' is required", code="missing_code")
    code = _require_str(body, "code")
    stdin = _require_str(body, "stdin") if "stdin" in body else ""
    pool = choose_pool(body, pools)
    timeout_s = pool.timeout_s
    if "timeout_s" in body:
        timeout_s = _timeout(body["timeout_s"], pool)
    files = parse_files(body["files"], pool) if "files" in body else ()
    env = parse_env(body["env"]) if "env" in body else {}
    argv = parse_argv(body["argv"]) if "argv" in body else ()
    return RunBody(pool=pool.name, request=RunRequest(
        code=code, stdin=stdin, timeout_s=timeout_s, files=files, env=env, argv=argv
    ))


SESSION_FIELDS = frozenset({"pool", "ttl_s", "idle_timeout_s"})
# A session's run names no pool: it runs in the session's.
SESSION_RUN_FIELDS = RUN_FIELDS - {"pool", "language"}


@dataclass(frozen=True, slots=True)
class SessionBody:
    pool: str
    ttl_s: float | None  # None: the server's default (pool/sessions.py checks the bounds)
    idle_timeout_s: float | None


class SessionSummary(TypedDict):
    session_id: str
    pool: str
    created_at: str
    expires_at: str
    idle_timeout_s: float
    idle_expires_at: str | None
    runs: int
    busy: bool


def parse_session(body: Mapping[str, object], pools: Mapping[str, PoolConfig]) -> SessionBody:
    """Validate a ``POST /v1/sessions`` body: unknown fields, the pool, then the two
    durations' types (their bounds are the server's, checked where they live).
    Raises BadRequestError (400) or UnknownPoolError (404)."""
    unknown = sorted(set(body) - SESSION_FIELDS)
    if unknown:
        raise BadRequestError(
            f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(SESSION_FIELDS))})",
            code="unknown_field",
        )
    pool = choose_pool(body, pools)
    durations: list[float | None] = []
    for key in ("ttl_s", "idle_timeout_s"):
        value = body.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value <= 0
        ):
            raise BadRequestError(f"the field {key!r} must be a positive number of seconds",
                                  code="invalid_session")
        durations.append(None if value is None else float(value))
    return SessionBody(pool.name, durations[0], durations[1])


def parse_session_run(body: Mapping[str, object], pool: PoolConfig) -> RunRequest:
    """Validate a ``POST /v1/sessions/{id}/run`` body: the ``/v1/run`` body without
    ``pool`` and ``language``, held to the session's pool."""
    unknown = sorted(set(body) - SESSION_RUN_FIELDS)
    if unknown:
        raise BadRequestError(
            f"unknown field {unknown[0]!r} (a session's run takes: "
            f"{', '.join(sorted(SESSION_RUN_FIELDS))})",
            code="unknown_field",
        )
    return parse_run({**body, "pool": pool.name}, {pool.name: pool}).request


def parse_files(value: object, pool: PoolConfig) -> tuple[tuple[str, bytes], ...]:
    """``files`` as (path, content) pairs, within the pool's ``max_files*`` limits.

    Checked in order: the list and its length, then item by item: its shape,
    its path, its content, its size, the running total, then whether its path
    repeats (``duplicate_path``) or nests with (``path_conflict``) an earlier
    one. Raises BadRequestError naming the first offending item.
    """
    if not isinstance(value, list):
        raise BadRequestError(
            "the field 'files' must be a list of {path, content, encoding} objects",
            code="invalid_files",
        )
    if len(value) > pool.max_files:
        raise BadRequestError(
            f"{len(value)} files given; pool {pool.name!r} takes at most {pool.max_files}",
            code="too_many_files",
        )
    files: list[tuple[str, bytes]] = []
    paths: set[str] = set()
    under: dict[str, str] = {}  # each directory a given path lies under -> that path
    total = 0
    for index, item in enumerate(value):
        where = f"files[{index}]"
        path, content, encoding = _file_fields(item, where)
        parts = _check_path(path, where)
        data = _decode_content(content, encoding, where, path)
        if len(data) > pool.max_file_bytes:
            raise BadRequestError(
                f"{where} {_shown(path)} holds {len(data)} bytes; pool {pool.name!r} takes "
                f"at most {pool.max_file_bytes} per file",
                code="file_too_large",
            )
        total += len(data)
        if total > pool.max_files_bytes:
            raise BadRequestError(
                f"{where} {_shown(path)} brings the files to {total} bytes; pool "
                f"{pool.name!r} takes at most {pool.max_files_bytes} in all",
                code="files_too_large",
            )
        if path in paths:
            raise BadRequestError(f"{where} {_shown(path)} is given twice", code="duplicate_path")
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        clash = next((a for a in ancestors if a in paths), None)
        if clash is not None:
            raise BadRequestError(
                f"{where} {_shown(path)} lies under {_shown(clash)}, which is given as a file",
                code="path_conflict",
            )
        if path in under:
            raise BadRequestError(
                f"{where} {_shown(path)} is a directory of {_shown(under[path])}, given earlier",
                code="path_conflict",
            )
        paths.add(path)
        for ancestor in ancestors:
            under.setdefault(ancestor, path)
        files.append((path, data))
    return tuple(files)


def parse_env(value: object) -> dict[str, str]:
    """``env`` as a name -> value map. Raises BadRequestError (``invalid_env``)."""
    if not isinstance(value, dict):
        raise BadRequestError(
            "the field 'env' must be an object of strings", code="invalid_env"
        )
    if len(value) > MAX_ENV_ENTRIES:
        raise BadRequestError(
            f"env has {len(value)} entries; at most {MAX_ENV_ENTRIES} are allowed",
            code="invalid_env",
        )
    total = 0
    for name, text in value.items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise BadRequestError(
                f"env name {_shown(str(name))} must match [A-Za-z_][A-Za-z0-9_]*",
                code="invalid_env",
            )
        if not isinstance(text, str):
            raise BadRequestError(f"env[{_shown(name)}] must be a string", code="invalid_env")
        if "\0" in text:
            raise BadRequestError(f"env[{_shown(name)}] holds a NUL byte", code="invalid_env")
        size = _utf8_size(text)
        if size is None:
            raise BadRequestError(
                f"env[{_shown(name)}] is not valid Unicode (a lone surrogate)", code="invalid_env"
            )
        total += len(name) + size
        if total > MAX_ENV_BYTES:
            raise BadRequestError(
                f"env reaches {total} bytes at {_shown(name)}; at most {MAX_ENV_BYTES} are allowed",
                code="invalid_env",
            )
    return dict(value)


def parse_argv(value: object) -> tuple[str, ...]:
    """``argv`` as a tuple of arguments. Raises BadRequestError (``invalid_argv``)."""
    if not isinstance(value, list):
        raise BadRequestError("the field 'argv' must be a list of strings", code="invalid_argv")
    if len(value) > MAX_ARGV_ITEMS:
        raise BadRequestError(
            f"argv has {len(value)} items; at most {MAX_ARGV_ITEMS} are allowed",
            code="invalid_argv",
        )
    total = 0
    for index, argument in enumerate(value):
        if not isinstance(argument, str):
            raise BadRequestError(f"argv[{index}] must be a string", code="invalid_argv")
        if "\0" in argument:
            raise BadRequestError(f"argv[{index}] holds a NUL byte", code="invalid_argv")
        size = _utf8_size(argument)
        if size is None:
            raise BadRequestError(
                f"argv[{index}] is not valid Unicode (a lone surrogate)", code="invalid_argv"
            )
        total += size
        if total > MAX_ARGV_BYTES:
            raise BadRequestError(
                f"argv reaches {total} bytes at argv[{index}]; at most {MAX_ARGV_BYTES} "
                "are allowed",
                code="invalid_argv",
            )
    return tuple(value)


def choose_pool(body: Mapping[str, object], pools: Mapping[str, PoolConfig]) -> PoolConfig:
    """``pool`` wins over ``language``; with neither, the pool named "python".

    For a language, the pool named after it if it runs that language, else the
    first configured pool that does. Raises BadRequestError or UnknownPoolError.
    """
    if "pool" in body:
        name = _require_str(body, "pool")
        if name not in pools:
            raise UnknownPoolError(f"no pool named {name!r}")
        return pools[name]
    if "language" in body:
        language = _require_str(body, "language")
        if language in pools and pools[language].language == language:
            return pools[language]
        for pool in pools.values():
            if pool.language == language:
                return pool
        known = sorted({p.language for p in pools.values()})
        raise BadRequestError(
            f"no pool runs language {language!r} (available: {', '.join(known)})",
            code="unknown_language",
        )
    if DEFAULT_POOL not in pools:
        raise UnknownPoolError("no pool named 'python'; name one with the 'pool' field")
    return pools[DEFAULT_POOL]


def result_body(
    result: RunResult, pool: str, sandbox_id: str, acquire_wait_s: float
) -> RunResultBody:
    """The 200 answer to ``/v1/run``; output that is not UTF-8 is decoded with U+FFFD."""
    return {
        "exit_code": result.exit_code,
        "stdout": result.stdout.decode("utf-8", "replace"),
        "stderr": result.stderr.decode("utf-8", "replace"),
        "timed_out": result.timed_out,
        "oom_killed": result.oom_killed,
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated,
        "duration_ms": round(result.execution_s * 1000, 3),
        "queued_ms": round(acquire_wait_s * 1000, 3),
        "pool": pool,
        "sandbox_id": sandbox_id,
        **outcome_body(result.outcome),
    }


def outcome_body(outcome: Outcome | None) -> OutcomeBody:
    """Files out, rich results and the error of a run; none of them when the tier sent none.

    A file's content and an image are base64; only a regular file has content
    (a symlink, FIFO or device is reported by name, kind and size: null).
    Text results are decoded as UTF-8 with U+FFFD, like stdout.
    """
    if outcome is None:
        return {"files": [], "files_omitted": 0, "results": [], "results_omitted": 0,
                "error": None}
    files: list[FileBody] = [{
        "path": out.path,
        "type": out.kind,
        "size": out.size,
        "content": base64.b64encode(out.content).decode("ascii") if out.kind == "file" else None,
        # A guest told the limits stops sending early: content short of the
        # size it reported is cut (or the file changed), whoever cut it.
        "truncated": out.truncated or (out.kind == "file" and len(out.content) < out.size),
    } for out in outcome.files]
    results: list[DisplayBody] = [{
        "type": display.mime,
        "data": (
            display.data.decode("utf-8", "replace") if display.mime.startswith("text/")
            else base64.b64encode(display.data).decode("ascii")
        ),
        "truncated": display.truncated,
    } for display in outcome.results]
    error: ErrorBody | None = None
    if outcome.error is not None:
        error = {
            "name": outcome.error["name"],
            "value": outcome.error["value"],
            "traceback": outcome.error["traceback"],
        }
    return {"files": files, "files_omitted": outcome.files_dropped, "results": results,
            "results_omitted": outcome.results_dropped, "error": error}


def pool_summary(
    config: PoolConfig,
    counts: Mapping[str, int],
    runtime: Runtime | None = None,
    problem: str | None = None,
) -> PoolSummary:
    """One entry of ``GET /v1/pools``: the pool's settings, what runs in it (the
    language's version and key packages, as Piston's /runtimes), its sandboxes by state,
    and what keeps it from serving at once (``Pool.problem``), if anything."""
    runtime = runtime or Runtime()
    return {
        "name": config.name,
        "backend": config.backend,
        "language": config.language,
        "runtime": {"version": runtime.version, "packages": dict(runtime.packages)},
        "idle": counts["idle"],
        "busy": counts["busy"],
        "leased": counts.get("leased", 0),
        "starting": counts["starting"],
        "min_idle": config.min_idle,
        "max_size": config.max_size,
        "max_sessions": config.session_capacity,
        "problem": problem,
    }


def _parse_int(literal: str) -> int | float:
    # Python refuses int() of more than 4300 digits; such a number is valid JSON
    # and only ever out of range here, so let it become a float (inf if need be).
    try:
        return int(literal)
    except ValueError:
        return float(literal)


def _require_str(body: Mapping[str, object], key: str) -> str:
    value = body[key]
    if not isinstance(value, str):
        raise BadRequestError(f"the field {key!r} must be a string", code="invalid_type")
    return value


def _timeout(value: object, pool: PoolConfig) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequestError("the field 'timeout_s' must be a number", code="invalid_timeout")
    try:
        seconds = float(value)
    except OverflowError:  # an integer beyond the float range
        seconds = math.inf
    if not math.isfinite(seconds) or not 0 < seconds <= pool.max_timeout_s:
        raise BadRequestError(
            f"timeout_s must be greater than 0 and at most {pool.max_timeout_s:g} "
            f"for pool {pool.name!r}",
            code="invalid_timeout",
        )
    return seconds


def _file_fields(item: object, where: str) -> tuple[str, str, str]:
    if not isinstance(item, dict):
        raise BadRequestError(
            f"{where} must be an object {{path, content, encoding}}", code="invalid_files"
        )
    unknown = sorted(set(item) - FILE_FIELDS)
    if unknown:
        raise BadRequestError(
            f"{where} has an unknown field {unknown[0]!r} (allowed: content, encoding, path)",
            code="invalid_files",
        )
    for key in ("path", "content"):
        if key not in item:
            raise BadRequestError(f"{where} needs the field {key!r}", code="invalid_files")
        if not isinstance(item[key], str):
            raise BadRequestError(f"{where}.{key} must be a string", code="invalid_files")
    encoding = item.get("encoding", "utf-8")
    if encoding not in ENCODINGS:
        raise BadRequestError(
            f"{where}.encoding must be \"utf-8\" or \"base64\"", code="invalid_files"
        )
    return item["path"], item["content"], encoding


def _check_path(path: str, where: str) -> list[str]:
    """The path's components, if it names a file the guest may create under its workdir.

    Backslashes are refused although Linux allows them in a name: a client on
    Windows means a directory by them, and a tool that treats them as
    separators would see a different (perhaps escaping) path than the guest.
    """
    def bad(reason: str) -> BadRequestError:
        return BadRequestError(f"{where}.path {_shown(path)} {reason}", code="invalid_path")

    if not path:
        raise bad("is empty")
    if "\0" in path:
        raise bad("holds a NUL byte")
    if "\\" in path:
        raise bad("holds a backslash; separate directories with '/'")
    if path.startswith("/"):
        raise bad("is absolute; paths are relative to the working directory")
    size = _utf8_size(path)
    if size is None:
        raise bad("is not valid Unicode (a lone surrogate)")
    if size > MAX_PATH_BYTES:
        raise bad(f"is {size} bytes long; at most {MAX_PATH_BYTES} are allowed")
    parts = path.split("/")
    for part in parts:
        if part in (".", ".."):
            raise bad(f"has a {part!r} component")
        if not part:
            raise bad("has an empty component (a leading, doubled or trailing '/')")
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise bad(f"has a component over {MAX_NAME_BYTES} bytes")
    return parts


def _decode_content(content: str, encoding: str, where: str, path: str) -> bytes:
    try:
        if encoding == "base64":
            # Strict: the standard alphabet with padding, no line breaks, nothing
            # after the padding, so a client's mistake is an error rather than
            # silently different bytes.
            return binascii.a2b_base64(content, strict_mode=True)
        return content.encode("utf-8")
    except (binascii.Error, ValueError, UnicodeEncodeError):
        what = "base64" if encoding == "base64" else "UTF-8 text (a lone surrogate)"
        raise BadRequestError(
            f"{where}.content of {_shown(path)} is not valid {what}",
            code="invalid_file_content",
        ) from None


def _utf8_size(text: str) -> int | None:
    """Bytes of ``text`` as UTF-8; None if it holds a lone surrogate (JSON allows them)."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def _shown(text: str) -> str:
    """A client's string quoted in a message, cut so one line stays short."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return repr(text[:SHOWN_CHARS]) + "..."
