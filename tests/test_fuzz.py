"""Hostile request bodies at POST /v1/run through the real daemon's socket.

The property: whatever bytes arrive, the answer is JSON — a result or
``{"error": {"code", "message"}}`` — never a 5xx other than a 503 with ``Retry-After``,
never a hang, and the daemon still runs code afterwards. The explicit cases below pin
the inputs tests/test_api.py does not already cover.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.client import Client
from tests.support import Daemon

RESULT_KEYS = {
    "exit_code", "stdout", "stderr", "timed_out", "oom_killed", "stdout_truncated",
    "stderr_truncated", "duration_ms", "queued_ms", "pool", "sandbox_id",
    "files", "files_omitted", "results", "results_omitted", "error",
}
# Longer than any run the fixture's pools allow (max_timeout_s is at most 60 s), so a
# socket timeout means the daemon hung, not that the code was slow.
HANG_S = 90.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    raw: bytes

    def document(self) -> Any:
        try:
            return json.loads(self.raw)
        except ValueError:
            raise AssertionError(
                f"HTTP {self.status} without a JSON body: {self.raw[:300]!r}"
            ) from None


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=HANG_S)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(HANG_S)
        self.sock.connect(self.socket_path)


def post(
    daemon: Daemon, body: bytes, *, content_type: str | None = "application/json",
    method: str = "POST", path: str = "/v1/run",
) -> Answer:
    connection = _Unix(daemon.socket)
    try:
        headers = {"Content-Type": content_type} if content_type is not None else {}
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except TimeoutError:
            raise AssertionError(f"no answer within {HANG_S:g} s to {body[:200]!r}") from None
        return Answer(response.status, dict(response.getheaders()), raw)
    finally:
        connection.close()


def assert_well_formed(answer: Answer) -> None:
    """The API contract for any body: a result or a JSON error; 5xx only as a 503 to retry."""
    document = answer.document()
    assert answer.status < 500 or answer.status == 503, (answer.status, document)
    if answer.status == 200:
        assert isinstance(document, dict)
        assert set(document) == RESULT_KEYS
        return
    assert answer.status >= 400, (answer.status, document)
    assert isinstance(document, dict)
    assert set(document) == {"error"}, document
    error = document["error"]
    assert isinstance(error, dict)
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    if answer.status == 503:
        assert int(answer.headers["Retry-After"]) >= 1


def assert_still_serves(daemon: Daemon) -> None:
    with daemon.client() as client:
        assert client.run("print(6 * 7)")["stdout"] == "42\n"


# --- generated bodies ------------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    """A JSON number literal written verbatim: json.dumps refuses ints over 4300 digits."""

    text: str


def to_json(value: Any) -> str:
    """Serialize like json.dumps (NaN and Infinity as literals), plus verbatim Number."""
    if isinstance(value, Number):
        return value.text
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(to_json(v) for v in value) + "]"
    return json.dumps(value)  # ensure_ascii: a lone surrogate goes out as a \\udXXX escape


# Any code point, lone surrogates and NUL included.
any_text = st.text(st.characters(exclude_categories=()), max_size=30)
edge_numbers = st.one_of(
    st.integers(),
    st.floats(),  # NaN, +-Infinity, -0.0, subnormals
    st.sampled_from([
        0, -0.0, 1e-400, 5e-324, 2**63, -(2**63), 1e308, 10**400, -(10**400),
        Number("1" + "0" * 5000), Number("-" + "9" * 4301), Number("1e99999"),
        Number("0.0000000000000000000000001"),
    ]),
)
scalars = st.one_of(st.none(), st.booleans(), edge_numbers, any_text)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(any_text, children, max_size=4),
    ),
    max_leaves=12,
)
# Code that really runs is cheap: it finishes, fails to compile, or is short random text.
cheap_code = st.one_of(
    st.sampled_from([
        "", "print(1)", "pass", "import sys; sys.exit(3)", "\0", "print('a\\0b')",
        "import sys; print(sys.stdin.read())", "raise SystemExit('x')", "echo hi",
        "import sys; sys.stdout.buffer.write(bytes(range(256)))",
    ]),
    any_text,
)
languages = st.sampled_from(["python", "python", "shell", "cobol", ""])
pools = st.sampled_from(["python", "python", "shell", "tiny", "nope"])


paths = st.one_of(
    st.sampled_from(["a.txt", "d/b.csv", "out/z", "../x", "/abs", "a\\b", "", "a//b", "a/./b"]),
    any_text,
)
files = st.lists(
    st.fixed_dictionaries(
        {"path": paths, "content": any_text},
        optional={"encoding": st.sampled_from(["utf-8", "base64", "latin-1"])},
    ),
    max_size=4,
)
env = st.dictionaries(st.one_of(st.sampled_from(["A", "B_1", "1X", "", "PATH"]), any_text),
                      any_text, max_size=4)
argv = st.lists(any_text, max_size=4)


def run_body(timeouts: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"code": cheap_code},
        optional={"language": languages, "pool": pools, "stdin": any_text, "timeout_s": timeouts,
                  "files": files, "env": env, "argv": argv},
    )


# Requests that really run (or name an unknown pool or language).
valid_bodies = run_body(st.floats(0.05, 2))
# The same with edge values of timeout_s, or one field replaced by any JSON value.
edge_timeout_bodies = run_body(edge_numbers)
one_field_wrong = st.tuples(
    valid_bodies,
    st.sampled_from(["code", "language", "pool", "stdin", "timeout_s", "files", "env", "argv"]),
    json_values,
).map(lambda case: {**case[0], case[1]: case[2]})
# The real field names with anything at all in them, and a typo of timeout_s.
wild_bodies = st.fixed_dictionaries(
    {},
    optional={
        "code": json_values,
        "language": json_values,
        "pool": json_values,
        "stdin": json_values,
        "timeout_s": json_values,
        "timeout": json_values,
        "files": json_values,
        "env": json_values,
        "argv": json_values,
    },
)
deeply_nested = st.integers(1, 100_000).map(lambda depth: "[" * depth + "]" * depth)
bodies = st.one_of(
    valid_bodies.map(to_json).map(str.encode),
    valid_bodies.map(to_json).map(str.encode),
    edge_timeout_bodies.map(to_json).map(str.encode),
    one_field_wrong.map(to_json).map(str.encode),
    wild_bodies.map(to_json).map(str.encode),
    json_values.map(to_json).map(str.encode),
    deeply_nested.map(lambda nested: ('{"code": "1", "stdin": ' + nested + "}").encode()),
    st.binary(max_size=200),
)


@pytest.mark.timeout(900)
def test_generated_bodies_get_json_answers_never_5xx_never_hang(daemon: Daemon) -> None:
    @settings(
        max_examples=150,
        deadline=None,
        database=None,  # no .hypothesis/ in the shared tree; a failure prints its example
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=bodies)
    def one(body: bytes) -> None:
        assert_well_formed(post(daemon, body))

    one()
    assert_still_serves(daemon)


# --- explicit cases test_api.py does not cover -------------------------------------------


@pytest.mark.parametrize("timeout", [
    pytest.param("1" + "0" * 400, id="int-beyond-float-range"),
    pytest.param("-1" + "0" * 400, id="negative-int-beyond-float-range"),
    pytest.param("9" * 4301, id="int-over-pythons-4300-digit-limit"),
    pytest.param("-0.0", id="minus-zero"),
    pytest.param("1e-400", id="underflows-to-zero"),
    pytest.param("Infinity", id="infinity"),
    pytest.param("-Infinity", id="minus-infinity"),
    pytest.param("null", id="null"),
    pytest.param("[5]", id="list"),
    pytest.param("20.5", id="just-over-the-pools-max"),
])
def test_timeout_out_of_range_is_invalid_timeout(daemon: Daemon, timeout: str) -> None:
    answer = post(daemon, f'{{"code": "print(1)", "timeout_s": {timeout}}}'.encode())
    assert_well_formed(answer)
    assert (answer.status, answer.document()["error"]["code"]) == (400, "invalid_timeout")


def test_huge_integer_in_an_unknown_field_is_a_4xx(daemon: Daemon) -> None:
    # Python refuses to parse ints over 4300 digits with a plain ValueError, not a
    # JSONDecodeError; whichever check fires first, the client must get a 4xx JSON error.
    answer = post(daemon, b'{"code": "1", "extra": ' + b"7" * 5000 + b"}")
    assert_well_formed(answer)
    assert answer.status == 400


def test_timeout_at_the_pools_max_is_accepted(client: Client) -> None:
    assert client.run("print(1)", timeout_s=20)["stdout"] == "1\n"  # python's max_timeout_s


def test_stdin_over_the_limit_is_413(daemon: Daemon) -> None:
    answer = post(daemon, json.dumps({"code": "1", "stdin": "x" * 300_000}).encode())
    assert_well_formed(answer)
    assert (answer.status, answer.document()["error"]["code"]) == (413, "request_too_large")


def test_chunked_body_over_the_limit_is_413_without_content_length(daemon: Daemon) -> None:
    # No Content-Length to check up front: the limit must hold while streaming.
    chunk = b"#" * 65536
    connection = _Unix(daemon.socket)
    try:
        connection.putrequest("POST", "/v1/run")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        connection.send(b'3\r\n{"a\r\n')
        for _ in range(5):  # 320 KiB, over the fixture's 256 KiB max_request_bytes
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.send(b"0\r\n\r\n")
        response = connection.getresponse()
        answer = Answer(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()
    assert_well_formed(answer)
    assert (answer.status, answer.document()["error"]["code"]) == (413, "request_too_large")


def test_nul_and_any_unicode_in_stdin_reach_the_program_intact(client: Client) -> None:
    data = "a\0b\U0001f600\u2028\r\n"
    result = client.run("import sys; print(ascii(sys.stdin.read()))", stdin=data)
    assert result["stdout"] == ascii(data) + "\n"


def test_nul_in_a_shell_script_is_a_clear_error(client: Client) -> None:
    result = client.run("echo a\0echo b", language="shell")
    assert result["exit_code"] == 2
    assert "NUL" in str(result["stderr"])
    assert result["stdout"] == ""


def test_lone_surrogate_in_code_fails_inside_the_sandbox_not_the_daemon(daemon: Daemon) -> None:
    answer = post(daemon, b'{"code": "print(1)  # \\ud800"}')
    assert_well_formed(answer)
    assert answer.status == 200
    assert answer.document()["exit_code"] == 1


@pytest.mark.parametrize("content_type", [
    "application/json; charset=utf-8",
    "Application/JSON",
])
def test_json_content_type_variants_are_accepted(daemon: Daemon, content_type: str) -> None:
    answer = post(daemon, b'{"code": "print(2)"}', content_type=content_type)
    assert answer.status == 200
    assert answer.document()["stdout"] == "2\n"


@pytest.mark.parametrize("content_type", ["text/plain", "application/jsonx", "multipart/form-data"])
def test_other_content_types_are_415(daemon: Daemon, content_type: str) -> None:
    answer = post(daemon, b'{"code": "print(2)"}', content_type=content_type)
    assert_well_formed(answer)
    assert (answer.status, answer.document()["error"]["code"]) == (415, "unsupported_media_type")


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_on_run_are_405(daemon: Daemon, method: str) -> None:
    answer = post(daemon, b'{"code": "1"}', method=method)
    assert_well_formed(answer)
    assert (answer.status, answer.document()["error"]["code"]) == (405, "method_not_allowed")

