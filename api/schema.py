"""The JSON bodies of the HTTP API, apart from aiohttp: no I/O, fed bytes and dicts.

What a ``/v1/run`` body may hold and what each way of getting it wrong answers
(a ``BadRequestError`` or ``UnknownPoolError`` with a stable code), the body of a
run's result, and one pool's summary in ``GET /v1/pools``. ``api/server.py``
wires these to HTTP; the contract itself is defined here once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

from pool.backends.base import RunRequest, RunResult
from pool.config import PoolConfig
from pool.errors import BadRequestError, UnknownPoolError

RUN_FIELDS = frozenset({"code", "language", "pool", "stdin", "timeout_s"})
DEFAULT_POOL = "python"  # the pool a request that names neither pool nor language gets


@dataclass(frozen=True, slots=True)
class RunBody:
    """A valid ``/v1/run`` body: the name of the pool to run in, and what to run."""

    pool: str
    request: RunRequest


class RunResultBody(TypedDict):
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


class PoolSummary(TypedDict):
    name: str
    backend: str
    language: str
    idle: int
    busy: int
    starting: int
    min_idle: int
    max_size: int


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
    the pool, ``timeout_s``), so a body wrong in two ways always gets the same
    answer. Raises BadRequestError (400) or UnknownPoolError (404).
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
    return RunBody(pool=pool.name, request=RunRequest(code=code, stdin=stdin, timeout_s=timeout_s))


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
    }


def pool_summary(config: PoolConfig, counts: Mapping[str, int]) -> PoolSummary:
    """One entry of ``GET /v1/pools``: the pool's settings and its sandboxes by state."""
    return {
        "name": config.name,
        "backend": config.backend,
        "language": config.language,
        "idle": counts["idle"],
        "busy": counts["busy"],
        "starting": counts["starting"],
        "min_idle": config.min_idle,
        "max_size": config.max_size,
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
