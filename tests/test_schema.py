"""The API's bodies (api/schema.py) fed plain bytes and dicts: no daemon, no socket."""

from __future__ import annotations

import base64
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.schema import (
    MAX_ARGV_BYTES,
    MAX_ENV_BYTES,
    RUN_FIELDS,
    choose_pool,
    decode_json_object,
    parse_run,
    pool_summary,
    result_body,
)
from pool import wire
from pool.backends.base import RunRequest, RunResult
from pool.backends.runtime import Runtime
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
    # Small file limits, so every one of them is reached by a small body.
    "files": PoolConfig(name="files", max_files=3, max_file_bytes=4, max_files_bytes=6),
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
        "unknown field 'colour' (allowed: argv, code, env, files, language, pool, stdin, "
        "timeout_s)"
    )
    assert sorted(RUN_FIELDS) == [
        "argv", "code", "env", "files", "language", "pool", "stdin", "timeout_s",
    ]


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
        "files": [],
        "files_omitted": 0,
        "results": [],
        "results_omitted": 0,
        "error": None,
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
    counts = {"idle": 1, "busy": 2, "leased": 1, "starting": 0, "destroying": 4}
    runtime = Runtime(version="3.11.2", packages={"pandas": "1.5.3"})
    assert pool_summary(config, counts, runtime) == {
        "name": "python-process",
        "backend": "process",
        "language": "python",
        "runtime": {"version": "3.11.2", "packages": {"pandas": "1.5.3"}},
        "idle": 1,
        "busy": 2,
        "leased": 1,
        "starting": 0,
        "min_idle": 1,
        "max_size": 3,
        "max_sessions": 1,  # half of max_size, rounded down
        "problem": None,
    }


def test_a_pool_summary_without_a_known_runtime_says_unknown() -> None:
    summary = pool_summary(PoolConfig(name="p"), {"idle": 0, "busy": 0, "starting": 0})
    assert summary["runtime"] == {"version": "unknown", "packages": {}}


# --- /v1/run: files in ------------------------------------------------------------


def refused_files(files: object, pool: str = "files") -> SandpoolError:
    return refused({"code": "1", "pool": pool, "files": files})


def test_files_are_written_as_given_utf8_by_default_or_base64() -> None:
    parsed = parse_run({"code": "1", "files": [
        {"path": "data.csv", "content": "a,b\n1,é\n"},
        {"path": "in/raw.bin", "content": base64.b64encode(b"\0\xff").decode(),
         "encoding": "base64"},
        {"path": "in/empty", "content": "", "encoding": "utf-8"},
        {"path": "out/seed.txt", "content": "back"},
    ]}, POOLS)
    assert parsed.request.files == (
        ("data.csv", "a,b\n1,é\n".encode()), ("in/raw.bin", b"\0\xff"), ("in/empty", b""),
        ("out/seed.txt", b"back"),
    )


def test_no_files_env_or_argv_leave_the_request_as_before() -> None:
    request = parse_run({"code": "1", "files": [], "env": {}, "argv": []}, POOLS).request
    assert (request.files, request.env, request.argv) == ((), {}, ())
    assert request == RunRequest(code="1", stdin="", timeout_s=10.0)


@pytest.mark.parametrize(("files", "message"), [
    ({"path": "a", "content": ""}, "the field 'files' must be a list of {path, content, "
     "encoding} objects"),
    ("a", "the field 'files' must be a list of {path, content, encoding} objects"),
    (None, "the field 'files' must be a list of {path, content, encoding} objects"),
    (["a"], "files[0] must be an object {path, content, encoding}"),
    ([{"path": "a", "content": "", "mode": 0o755}],
     "files[0] has an unknown field 'mode' (allowed: content, encoding, path)"),
    ([{"content": ""}], "files[0] needs the field 'path'"),
    ([{"path": "a"}], "files[0] needs the field 'content'"),
    ([{"path": 1, "content": ""}], "files[0].path must be a string"),
    ([{"path": "a", "content": None}], "files[0].content must be a string"),
    ([{"path": "a", "content": b"x".hex(), "encoding": "hex"}],
     'files[0].encoding must be "utf-8" or "base64"'),
    ([{"path": "a", "content": "", "encoding": None}],
     'files[0].encoding must be "utf-8" or "base64"'),
    ([{"path": "ok", "content": ""}, 7], "files[1] must be an object {path, content, encoding}"),
])
def test_files_of_the_wrong_shape(files: object, message: str) -> None:
    error = refused_files(files)
    assert (error.status, error.code, error.message) == (400, "invalid_files", message)


@pytest.mark.parametrize(("path", "says"), [
    ("", "'' is empty"),
    ("/etc/passwd", "'/etc/passwd' is absolute; paths are relative to the working directory"),
    ("..", "'..' has a '..' component"),
    ("../x", "'../x' has a '..' component"),
    ("a/../../x", "'a/../../x' has a '..' component"),
    ("./a", "'./a' has a '.' component"),
    ("a/.", "'a/.' has a '.' component"),
    (".", "'.' has a '.' component"),
    ("a//b", "'a//b' has an empty component (a leading, doubled or trailing '/')"),
    ("a/", "'a/' has an empty component (a leading, doubled or trailing '/')"),
    ("a\0b", "'a\\x00b' holds a NUL byte"),
    ("a\\b", "'a\\\\b' holds a backslash; separate directories with '/'"),
    ("..\\..\\x", "'..\\\\..\\\\x' holds a backslash; separate directories with '/'"),
    ("a\udc80", "'a\\udc80' is not valid Unicode (a lone surrogate)"),
    ("n" * 256, f"{'n' * 60!r}... has a component over 255 bytes"),
    ("é" * 128, f"{'é' * 60!r}... has a component over 255 bytes"),
    ("/".join(["d" * 255] * 4) + "/x",
     f"{('d' * 60)!r}... is 1025 bytes long; at most 1024 are allowed"),
])
def test_paths_that_could_leave_the_working_directory_or_not_be_created(
    path: str, says: str
) -> None:
    error = refused_files([{"path": "fine.txt", "content": ""}, {"path": path, "content": ""}])
    assert (error.status, error.code, error.message) == (
        400, "invalid_path", f"files[1].path {says}",
    )


def test_the_longest_path_and_names_are_allowed() -> None:
    longest = "/".join(["d" * 255] * 3 + ["d" * 254]) + "/x"  # 1024 bytes
    name = "é" * 127  # 254 bytes
    files = parse_run({"code": "1", "files": [
        {"path": longest, "content": ""}, {"path": name, "content": ""},
        {"path": "dir with spaces/-x", "content": ""},
    ]}, POOLS).request.files
    assert [path for path, _ in files] == [longest, name, "dir with spaces/-x"]


@pytest.mark.parametrize(("content", "encoding", "says"), [
    ("AAE", "base64", "not valid base64"),  # no padding
    ("AA E=", "base64", "not valid base64"),
    ("AAE=\n", "base64", "not valid base64"),
    ("AA-_", "base64", "not valid base64"),  # the URL-safe alphabet
    ("AAé=", "base64", "not valid base64"),
    ("a\udc80", "utf-8", "not valid UTF-8 text (a lone surrogate)"),
])
def test_file_content_that_cannot_be_decoded(content: str, encoding: str, says: str) -> None:
    error = refused_files([{"path": "x.bin", "content": content, "encoding": encoding}])
    assert (error.status, error.code, error.message) == (
        400, "invalid_file_content", f"files[0].content of 'x.bin' is {says}",
    )


def test_more_files_than_the_pool_takes() -> None:
    error = refused_files([{"path": f"f{i}", "content": ""} for i in range(4)])
    assert (error.status, error.code, error.message) == (
        400, "too_many_files", "4 files given; pool 'files' takes at most 3",
    )
    # The default pool takes 32.
    assert refused_files([{"path": f"f{i}", "content": ""} for i in range(33)],
                         "python").code == "too_many_files"
    assert len(parse_run({"code": "1", "files": [
        {"path": f"f{i}", "content": ""} for i in range(32)]}, POOLS).request.files) == 32


def test_a_file_over_the_per_file_limit_counts_decoded_bytes() -> None:
    error = refused_files([{"path": "big", "content": "héllo"[:4]}])  # 5 bytes as UTF-8
    assert (error.status, error.code, error.message) == (
        400, "file_too_large", "files[0] 'big' holds 5 bytes; pool 'files' takes at most 4 "
        "per file",
    )
    # 8 characters of base64 are 4 bytes: within the limit.
    four = base64.b64encode(b"1234").decode()
    assert parse_run({"code": "1", "pool": "files", "files": [
        {"path": "ok", "content": four, "encoding": "base64"}]}, POOLS).request.files == (
        ("ok", b"1234"),)


def test_files_over_the_total_limit() -> None:
    error = refused_files([{"path": "a", "content": "1234"}, {"path": "b", "content": "123"}])
    assert (error.status, error.code, error.message) == (
        400, "files_too_large",
        "files[1] 'b' brings the files to 7 bytes; pool 'files' takes at most 6 in all",
    )
    assert len(parse_run({"code": "1", "pool": "files", "files": [
        {"path": "a", "content": "1234"}, {"path": "b", "content": "12"}]},
        POOLS).request.files) == 2


def test_a_path_given_twice() -> None:
    error = refused_files([{"path": "a/x", "content": ""}, {"path": "b", "content": ""},
                           {"path": "a/x", "content": "b"}])
    assert (error.status, error.code, error.message) == (
        400, "duplicate_path", "files[2] 'a/x' is given twice",
    )


@pytest.mark.parametrize(("first", "second", "message"), [
    ("a", "a/b", "files[1] 'a/b' lies under 'a', which is given as a file"),
    ("a", "a/b/c", "files[1] 'a/b/c' lies under 'a', which is given as a file"),
    ("a/b", "a", "files[1] 'a' is a directory of 'a/b', given earlier"),
    ("a/b/c", "a/b", "files[1] 'a/b' is a directory of 'a/b/c', given earlier"),
])
def test_a_path_that_would_be_both_a_file_and_a_directory(
    first: str, second: str, message: str
) -> None:
    error = refused_files([{"path": first, "content": ""}, {"path": second, "content": ""}])
    assert (error.status, error.code, error.message) == (400, "path_conflict", message)


def test_paths_that_only_share_a_prefix_or_a_directory_do_not_conflict() -> None:
    paths = ["a/b", "a/c", "ab", "a/bc", "a.txt"]
    files = parse_run({"code": "1", "files": [{"path": p, "content": ""} for p in paths]},
                      POOLS).request.files
    assert [path for path, _ in files] == paths


def test_file_checks_run_in_a_fixed_order() -> None:
    # Too many wins over any item's fault; then the first faulty item, and
    # within an item: shape, path, content, size, total, duplicate, conflict.
    assert refused_files([1, 2, 3, 4]).code == "too_many_files"
    assert refused_files([{"path": "/x", "content": "!", "encoding": "base64"}]
                         ).code == "invalid_path"
    assert refused_files([{"path": "x", "content": "!!!!!", "encoding": "base64"}]
                         ).code == "invalid_file_content"
    assert refused_files([{"path": "x", "content": "12345"}, {"path": "/y", "content": ""}]
                         ).code == "file_too_large"
    assert refused_files([{"path": "x", "content": "1234"}, {"path": "x", "content": "123"}]
                         ).code == "files_too_large"
    assert refused_files([{"path": "x", "content": ""}, {"path": "x", "content": ""},
                          {"path": "x/y", "content": ""}]).code == "duplicate_path"
    # files after timeout_s, and before env and argv.
    assert refused({"code": "1", "timeout_s": 0, "files": 1}).code == "invalid_timeout"
    assert refused({"code": "1", "files": 1, "env": 1, "argv": 1}).code == "invalid_files"
    assert refused({"code": "1", "env": 1, "argv": 1}).code == "invalid_env"
    # And after the pool, whose limits they are.
    assert refused({"code": "1", "pool": "nope", "files": 1}).code == "unknown_pool"


# --- /v1/run: env and argv --------------------------------------------------------


def test_env_and_argv_are_passed_as_given() -> None:
    request = parse_run({"code": "1", "env": {"A": "1", "_b9": "", "LANG": "é x=y"},
                         "argv": ["-v", "", "é", "a b"]}, POOLS).request
    assert request.env == {"A": "1", "_b9": "", "LANG": "é x=y"}
    assert request.argv == ("-v", "", "é", "a b")


@pytest.mark.parametrize(("env", "message"), [
    (["A=1"], "the field 'env' must be an object of strings"),
    ("A=1", "the field 'env' must be an object of strings"),
    ({"": "x"}, "env name '' must match [A-Za-z_][A-Za-z0-9_]*"),
    ({"1A": "x"}, "env name '1A' must match [A-Za-z_][A-Za-z0-9_]*"),
    ({"A-B": "x"}, "env name 'A-B' must match [A-Za-z_][A-Za-z0-9_]*"),
    ({"A=B": "x"}, "env name 'A=B' must match [A-Za-z_][A-Za-z0-9_]*"),
    ({"É": "x"}, "env name 'É' must match [A-Za-z_][A-Za-z0-9_]*"),
    ({"A\0": "x"}, "env name 'A\\x00' must match [A-Za-z_][A-Za-z0-9_]*"),
    ({"A\n": "x"}, "env name 'A\\n' must match [A-Za-z_][A-Za-z0-9_]*"),
    ({"A": 1}, "env['A'] must be a string"),
    ({"A": None}, "env['A'] must be a string"),
    ({"A": "x\0y"}, "env['A'] holds a NUL byte"),
    ({"A": "\udc80"}, "env['A'] is not valid Unicode (a lone surrogate)"),
    ({f"V{i}": "" for i in range(65)}, "env has 65 entries; at most 64 are allowed"),
    ({"A": "x" * (MAX_ENV_BYTES - 1), "B": ""},
     f"env reaches {MAX_ENV_BYTES + 1} bytes at 'B'; at most {MAX_ENV_BYTES} are allowed"),
])
def test_bad_env(env: object, message: str) -> None:
    error = refused({"code": "1", "env": env})
    assert (error.status, error.code, error.message) == (400, "invalid_env", message)


def test_the_largest_env_is_allowed() -> None:
    env = {f"V{i}": "" for i in range(64)}
    assert parse_run({"code": "1", "env": env}, POOLS).request.env == env
    env = {"A": "é" * ((MAX_ENV_BYTES - 1) // 2)}
    assert parse_run({"code": "1", "env": env}, POOLS).request.env == env


@pytest.mark.parametrize(("argv", "message"), [
    ("-v", "the field 'argv' must be a list of strings"),
    ({"0": "-v"}, "the field 'argv' must be a list of strings"),
    (["-v", 1], "argv[1] must be a string"),
    ([None], "argv[0] must be a string"),
    (["a\0b"], "argv[0] holds a NUL byte"),
    (["\udc80"], "argv[0] is not valid Unicode (a lone surrogate)"),
    ([""] * 257, "argv has 257 items; at most 256 are allowed"),
    (["x" * MAX_ARGV_BYTES, "y"],
     f"argv reaches {MAX_ARGV_BYTES + 1} bytes at argv[1]; at most {MAX_ARGV_BYTES} are allowed"),
])
def test_bad_argv(argv: object, message: str) -> None:
    error = refused({"code": "1", "argv": argv})
    assert (error.status, error.code, error.message) == (400, "invalid_argv", message)


def test_the_largest_argv_is_allowed() -> None:
    assert len(parse_run({"code": "1", "argv": [""] * 256}, POOLS).request.argv) == 256
    argv = ["é" * (MAX_ARGV_BYTES // 4), "é" * (MAX_ARGV_BYTES // 4)]
    assert parse_run({"code": "1", "argv": argv}, POOLS).request.argv == tuple(argv)


def test_env_is_checked_before_argv() -> None:
    assert refused({"code": "1", "env": {"1": ""}, "argv": 1}).code == "invalid_env"


# --- the result's files, results and error ----------------------------------------


LIMITS = wire.OutcomeLimits(max_files=2, max_file_bytes=4, max_files_bytes=100,
                            max_display_bytes=6)


def outcome_of(stream: bytes) -> wire.Outcome:
    outcome = wire.Outcome(LIMITS)
    for kind, payload in wire.FrameDecoder().feed(stream):
        outcome.add(kind, payload)
    return outcome


def file_out(path: str, content: bytes, kind: str = "file", size: int | None = None) -> bytes:
    header = {"path": path, "kind": kind, "size": len(content) if size is None else size}
    return wire.header_frame(wire.FILE_OUT, header) + wire.content_frames(content)


def display(mime: str, data: bytes) -> bytes:
    return wire.header_frame(wire.DISPLAY, {"type": mime}) + wire.content_frames(data)


def result_with(outcome: wire.Outcome | None) -> RunResult:
    return RunResult(
        exit_code=1, stdout=b"", stderr=b"", timed_out=False, oom_killed=False,
        stdout_truncated=False, stderr_truncated=False, execution_s=0.001, outcome=outcome,
    )


def test_files_results_and_the_error_in_the_result_body() -> None:
    outcome = outcome_of(
        file_out("out/chart.png", b"\x89PNG\r\n")  # over 4 bytes: cut
        + file_out("out/link", b"", kind="symlink", size=11)
        + file_out("out/dropped", b"x")  # past max_files
        + display("image/png", b"\x89PN")
        + display("text/plain", b"\xc3\xa9\xff")  # not UTF-8 at its end
        + display("text/plain", b"gone")  # past max_display_bytes
        + wire.header_frame(wire.ERROR, {"name": "ZeroDivisionError", "value": "division by zero",
                                         "traceback": "Traceback ...\n"})
    )
    body = result_body(result_with(outcome), "python", "sb-3", 0.0)
    assert body["files"] == [
        {"path": "out/chart.png", "type": "file", "size": 6,
         "content": base64.b64encode(b"\x89PNG").decode(), "truncated": True},
        {"path": "out/link", "type": "symlink", "size": 11, "content": None,
         "truncated": False},
    ]
    assert body["files_omitted"] == 1
    assert body["results"] == [
        {"type": "image/png", "data": base64.b64encode(b"\x89PN").decode(), "truncated": False},
        {"type": "text/plain", "data": "é\ufffd", "truncated": False},
    ]
    assert body["results_omitted"] == 1
    assert body["error"] == {"name": "ZeroDivisionError", "value": "division by zero",
                             "traceback": "Traceback ...\n"}
    assert body["exit_code"] == 1  # the error claims nothing about the verdict


def test_a_result_cut_at_its_limit_says_so() -> None:
    body = result_body(result_with(outcome_of(display("text/plain", b"1234567"))), "p", "s", 0)
    assert body["results"] == [{"type": "text/plain", "data": "123456", "truncated": True}]


def test_an_empty_file_and_an_empty_outcome() -> None:
    body = result_body(result_with(outcome_of(file_out("out/empty", b""))), "p", "s", 0)
    assert body["files"] == [{"path": "out/empty", "type": "file", "size": 0, "content": "",
                              "truncated": False}]
    assert (body["results"], body["error"]) == ([], None)
    empty = result_body(result_with(wire.Outcome(LIMITS)), "p", "s", 0)
    assert {key: empty[key] for key in ("files", "files_omitted", "results", "results_omitted",
                                        "error")} == {
        "files": [], "files_omitted": 0, "results": [], "results_omitted": 0, "error": None}


@pytest.mark.parametrize("kind", ["fifo", "socket", "device", "directory", "other"])
def test_entries_that_are_not_regular_files_have_no_content(kind: str) -> None:
    body = result_body(result_with(outcome_of(file_out("out/x", b"", kind=kind, size=0))),
                       "p", "s", 0)
    assert body["files"] == [{"path": "out/x", "type": kind, "size": 0, "content": None,
                              "truncated": False}]


# --- any JSON in files, env and argv: a 400 with its code, or a valid request -----


any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # NUL, surrogates too
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), any_text),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(any_text, children, max_size=4)),
    max_leaves=10,
)
file_items = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"path": st.one_of(any_text, st.sampled_from(["a", "a/b", "../a", "/a", "a//b"])),
         "content": st.one_of(any_text, st.sampled_from(["AAE=", "MTIz", "12345"]))},
        optional={"encoding": st.sampled_from(["utf-8", "base64", "gzip"])},
    ),
)
CODES = {"files": {"invalid_files", "too_many_files", "invalid_path", "invalid_file_content",
                   "file_too_large", "files_too_large", "duplicate_path", "path_conflict"},
         "env": {"invalid_env"}, "argv": {"invalid_argv"}}


@settings(database=None)  # no .hypothesis/ in the shared tree; a failure prints its example
@given(field=st.sampled_from(["files", "env", "argv"]), value=st.one_of(
    json_values, st.lists(file_items, max_size=5), st.lists(any_text, max_size=5),
    st.dictionaries(any_text, any_text, max_size=5),
))
def test_any_json_in_files_env_or_argv_is_a_400_with_its_code_or_valid(
    field: str, value: object
) -> None:
    try:
        request = parse_run({"code": "1", "pool": "files", field: value}, POOLS).request
    except BadRequestError as error:
        refusal: BadRequestError | None = error
    else:
        refusal = None
    if refusal is not None:
        assert refusal.code in CODES[field], refusal.message
        assert refusal.message
        return
    for path, data in request.files:
        parts = path.split("/")
        assert not path.startswith("/")
        assert ".." not in parts
        assert "" not in parts
        assert "\0" not in path
        assert "\\" not in path
        assert len(data) <= 4
    assert all("\0" not in v for v in (*request.env.values(), *request.argv))


def test_a_file_whose_content_stops_short_of_its_size_is_truncated() -> None:
    # The guest, told the limits, stops sending early; or the file shrank as it was read.
    body = result_body(result_with(outcome_of(file_out("out/cut", b"ab", size=10))), "p", "s", 0)
    assert body["files"] == [{"path": "out/cut", "type": "file", "size": 10,
                              "content": base64.b64encode(b"ab").decode(), "truncated": True}]
