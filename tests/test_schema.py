"""The API's bodies (api/schema.py) fed plain bytes and dicts: no daemon, no socket."""

from __future__ import annotations

import math

import pytest

from api.schema import (
    RUN_FIELDS,
    choose_pool,
    decode_json_object,
    parse_run,
    pool_summary,
    result_body,
)
from pool.backends.base import RunRequest, RunResult
from pool.config import PoolConfig
from pool.errors import BadRequestError, SandpoolError, UnknownPoolError

POOLS = {
    "python": PoolConfig(name="python", timeout_s=10.0, max_timeout_s=60.0),
    "shell": PoolConfig(name="shell", language="shell"),
    "tiny": PoolConfig(name="tiny", timeout_s=2.0, max_timeout_s=5.0),
    # A pool named after a language it does not run: a request for that language
    # must not land here.
    "bash": PoolConfig(name="bash", language="python"),
    "sh-2": PoolConfig(name="sh-2", language="shell"),
}


def refused(body: dict[str, object], pools: dict[str, PoolConfig] = POOLS) -> SandpoolError:
    with pytest.raises(SandpoolError) as caught:
        parse_run(body, pools)
    return caught.value


# --- the raw body ------------------------------------------------------------


@pytest.mark.parametrize(("raw", "code", "message"), [
    (b"\xff\xfe", "invalid_encoding", "the request body is not valid UTF-8"),
    (b"{not json", "invalid_json", "the request body is not valid JSON"),
    (b"", "invalid_json", "the request body is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid_json", "the request body is not valid JSON"),
    (b"[1, 2]", "invalid_request", "the request body must be a JSON object"),
    (b'"code"', "invalid_request", "the request body must be a JSON object"),
    (b"null", "invalid_request", "the request body must be a JSON object"),
])
def test_bodies_that_are_not_a_json_object(raw: bytes, code: str, message: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        decode_json_object(raw)
    assert (caught.value.status, caught.value.code, caught.value.message) == (400, code, message)


def test_a_json_object_decodes_as_sent() -> None:
    assert decode_json_object(b'{"code": "print(1)", "timeout_s": 2}') == {
        "code": "print(1)", "timeout_s": 2,
    }


def test_an_integer_past_pythons_digit_limit_is_a_float_not_an_error() -> None:
    body = decode_json_object(b'{"timeout_s": ' + b"9" * 5000 + b"}")
    assert body["timeout_s"] == math.inf


# --- /v1/run: what is refused, with which code and message --------------------


def test_unknown_field_names_the_first_and_the_allowed() -> None:
    error = refused({"code": "1", "timeout": 5, "colour": "red"})
    assert (error.status, error.code) == (400, "unknown_field")
    assert error.message == (
        "unknown field 'colour' (allowed: code, language, pool, stdin, timeout_s)"
    )
    assert sorted(RUN_FIELDS) == ["code", "language", "pool", "stdin", "timeout_s"]


@pytest.mark.parametrize("body", [{}, {"code": None}, {"stdin": "x"}])
def test_code_is_required(body: dict[str, object]) -> None:
    error = refused(body)
    assert (error.status, error.code, error.message) == (
        400, "missing_code", "the field 'code' is required",
    )


@pytest.mark.parametrize(("body", "field"), [
    ({"code": 5}, "code"),
    ({"code": ["print(1)"]}, "code"),
    ({"code": "1", "stdin": 5}, "stdin"),
    ({"code": "1", "stdin": None}, "stdin"),
    ({"code": "1", "pool": 1}, "pool"),
    ({"code": "1", "language": {"name": "python"}}, "language"),
])
def test_fields_that_must_be_strings(body: dict[str, object], field: str) -> None:
    error = refused(body)
    assert (error.status, error.code, error.message) == (
        400, "invalid_type", f"the field {field!r} must be a string",
    )


def test_unknown_pool_is_404() -> None:
    error = refused({"code": "1", "pool": "nope"})
    assert isinstance(error, UnknownPoolError)
    assert (error.status, error.code, error.message) == (
        404, "unknown_pool", "no pool named 'nope'",
    )


def test_unknown_language_lists_the_languages_served() -> None:
    error = refused({"code": "1", "language": "cobol"})
    assert (error.status, error.code, error.message) == (
        400, "unknown_language", "no pool runs language 'cobol' (available: python, shell)",
    )


def test_no_default_pool_asks_for_one() -> None:
    error = refused({"code": "1"}, {"shell": POOLS["shell"]})
    assert (error.status, error.code, error.message) == (
        404, "unknown_pool", "no pool named 'python'; name one with the 'pool' field",
    )


@pytest.mark.parametrize("timeout_s", ["5", True, False, None, [1], {"s": 1}])
def test_timeout_that_is_not_a_number(timeout_s: object) -> None:
    error = refused({"code": "1", "timeout_s": timeout_s})
    assert (error.status, error.code, error.message) == (
        400, "invalid_timeout", "the field 'timeout_s' must be a number",
    )


@pytest.mark.parametrize("timeout_s", [0, 0.0, -1, -0.5, 60.001, 1e9, 10**400,
                                       math.inf, -math.inf, math.nan])
def test_timeout_out_of_the_pools_range(timeout_s: float) -> None:
    error = refused({"code": "1", "timeout_s": timeout_s})
    assert (error.status, error.code, error.message) == (
        400, "invalid_timeout",
        "timeout_s must be greater than 0 and at most 60 for pool 'python'",
    )


def test_timeout_range_is_the_chosen_pools() -> None:
    error = refused({"code": "1", "pool": "tiny", "timeout_s": 6})
    assert error.message == "timeout_s must be greater than 0 and at most 5 for pool 'tiny'"
    assert parse_run({"code": "1", "timeout_s": 6}, POOLS).request.timeout_s == 6.0


def test_checks_run_in_a_fixed_order() -> None:
    # Wrong in every way: the unknown field is reported, then code, then the pool.
    assert refused({"code": 5, "pool": "nope", "extra": 1}).code == "unknown_field"
    assert refused({"code": 5, "pool": "nope", "timeout_s": "x"}).code == "invalid_type"
    assert refused({"code": "1", "stdin": 5, "pool": "nope"}).code == "invalid_type"
    assert refused({"code": "1", "pool": "nope", "timeout_s": "x"}).code == "unknown_pool"


# --- /v1/run: what is accepted ------------------------------------------------


def test_defaults_are_the_python_pool_no_stdin_and_its_timeout() -> None:
    parsed = parse_run({"code": "print(1)"}, POOLS)
    assert parsed.pool == "python"
    assert parsed.request == RunRequest(code="print(1)", stdin="", timeout_s=10.0)


def test_every_field_given() -> None:
    parsed = parse_run(
        {"code": "cat", "stdin": "in\0put", "pool": "tiny", "timeout_s": 5}, POOLS
    )
    assert parsed.pool == "tiny"
    assert parsed.request == RunRequest(code="cat", stdin="in\0put", timeout_s=5.0)
    assert isinstance(parsed.request.timeout_s, float)


def test_empty_code_and_the_largest_timeout_are_allowed() -> None:
    parsed = parse_run({"code": "", "timeout_s": 60}, POOLS)
    assert parsed.request == RunRequest(code="", stdin="", timeout_s=60.0)
    assert parse_run({"code": "1", "timeout_s": 1e-6}, POOLS).request.timeout_s == 1e-6


def test_pool_wins_over_language() -> None:
    assert parse_run({"code": "1", "pool": "tiny", "language": "shell"}, POOLS).pool == "tiny"
    # Even a language no pool runs: the named pool decides.
    assert parse_run({"code": "1", "pool": "tiny", "language": "cobol"}, POOLS).pool == "tiny"


def test_language_prefers_the_pool_named_after_it() -> None:
    pools = {"sh-2": POOLS["sh-2"], "shell": POOLS["shell"]}
    assert choose_pool({"language": "shell"}, pools).name == "shell"


def test_language_falls_back_to_the_first_pool_that_runs_it() -> None:
    pools = {"sh-2": POOLS["sh-2"], "sh-3": PoolConfig(name="sh-3", language="shell")}
    assert choose_pool({"language": "shell"}, pools).name == "sh-2"
    # A pool named like the language but running another one is passed over.
    pools = {"shell": PoolConfig(name="shell", language="python"), "sh-2": POOLS["sh-2"]}
    assert choose_pool({"language": "shell"}, pools).name == "sh-2"


# --- bodies the daemon sends --------------------------------------------------


def test_result_body() -> None:
    result = RunResult(
        exit_code=3, stdout=b"out\xff", stderr=b"", timed_out=False, oom_killed=False,
        stdout_truncated=True, stderr_truncated=False, execution_s=0.0123456,
    )
    assert result_body(result, "python", "sb-1", 0.0004444) == {
        "exit_code": 3,
        "stdout": "out\ufffd",
        "stderr": "",
        "timed_out": False,
        "oom_killed": False,
        "stdout_truncated": True,
        "stderr_truncated": False,
        "duration_ms": 12.346,
        "queued_ms": 0.444,
        "pool": "python",
        "sandbox_id": "sb-1",
    }


def test_result_body_of_a_killed_sandbox_has_no_exit_code() -> None:
    result = RunResult(
        exit_code=None, stdout=b"", stderr=b"", timed_out=True, oom_killed=False,
        stdout_truncated=False, stderr_truncated=False, execution_s=1.0,
    )
    body = result_body(result, "tiny", "sb-2", 0.0)
    assert (body["exit_code"], body["timed_out"], body["duration_ms"]) == (None, True, 1000.0)


def test_pool_summary() -> None:
    config = PoolConfig(name="python-process", backend="process", min_idle=1, max_size=3)
    counts = {"idle": 1, "busy": 2, "starting": 0, "destroying": 4}
    assert pool_summary(config, counts) == {
        "name": "python-process",
        "backend": "process",
        "language": "python",
        "idle": 1,
        "busy": 2,
        "starting": 0,
        "min_idle": 1,
        "max_size": 3,
    }
