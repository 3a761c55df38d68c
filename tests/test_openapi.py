"""The OpenAPI document is true: a real daemon's answers, every status and code, validate.

The document is ``api/openapi.py``'s, served at ``GET /openapi.json``. Each
answer below is checked against the response the document gives for its path,
method and status: its media type, its required headers (Retry-After on a 503)
and its body by JSON Schema (``jsonschema``, draft 2020-12, OpenAPI 3.1's
dialect). Every error code of the document is either provoked here or listed in
``NOT_PROVOKED`` with the reason, so a new code cannot go undocumented or untested.
"""

from __future__ import annotations

import ast
import base64
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from api import schema
from api.openapi import build_document
from pool import errors
from pool.config import PoolConfig
from tests.support import (
    REPOSITORY,
    Daemon,
    running_daemon,
    start_daemon,
    stop_daemon,
    wait_until,
)

DOCUMENT_URI = "urn:sandpool:openapi"

# One process pool to run in and a tiny one to exhaust, with limits small
# enough that each error is cheap to provoke. max_concurrent_requests 3: the
# tiny pool's one running and one queued request leave room for a third.
CONFIG = """
[server]
metrics_address = "off"
max_request_bytes = 65536
body_timeout_s = 1
max_concurrent_requests = 3
max_connections = 64
max_connections_per_peer = 6

[pools.python]
backend = "process"
min_idle = 1
max_size = 2
timeout_s = 5
max_timeout_s = 10
max_files = 3
max_file_bytes = 64
max_files_bytes = 100

[pools.tiny]
backend = "process"
min_idle = 0
max_size = 1
max_queue = 1
acquire_timeout_s = 2
"""

# Codes of the document this module cannot provoke, and why.
NOT_PROVOKED = {
    "backend_unavailable": "needs a backend that fails to start sandboxes",
    "backend_error": "needs a backend that fails mid-run",
    "sandbox_lost": "needs every sandbox handed out to die first",
    "http_error": "a fallback: no route raises an HTTP error that another code does not name",
}

# Bodies of POST /v1/run that CONFIG's daemon refuses, and the code each gets.
RUN_REFUSALS: list[tuple[str, bytes, int, str]] = [
    ("not JSON", b"{not json", 400, "invalid_json"),
    ("not UTF-8", b"\xff\xfe", 400, "invalid_encoding"),
    ("not an object", b"[1, 2]", 400, "invalid_request"),
    ("no code", b"{}", 400, "missing_code"),
    ("code not a string", b'{"code": 5}', 400, "invalid_type"),
    ("timeout_s zero", b'{"code": "1", "timeout_s": 0}', 400, "invalid_timeout"),
    ("unknown field", b'{"code": "1", "timeout": 5}', 400, "unknown_field"),
    ("unknown language", b'{"code": "1", "language": "cobol"}', 400, "unknown_language"),
    ("unknown pool", b'{"code": "1", "pool": "nope"}', 404, "unknown_pool"),
    ("files not a list", b'{"code": "1", "files": {}}', 400, "invalid_files"),
    ("too many files", json.dumps({"code": "1", "files": [
        {"path": f"f{i}", "content": ""} for i in range(4)]}).encode(), 400, "too_many_files"),
    ("path escapes", b'{"code": "1", "files": [{"path": "../x", "content": ""}]}', 400,
     "invalid_path"),
    ("bad base64", b'{"code": "1", "files": [{"path": "x", "content": "!", '
     b'"encoding": "base64"}]}', 400, "invalid_file_content"),
    ("file too large", json.dumps({"code": "1", "files": [
        {"path": "x", "content": "a" * 65}]}).encode(), 400, "file_too_large"),
    ("files too large", json.dumps({"code": "1", "files": [
        {"path": "x", "content": "a" * 60}, {"path": "y", "content": "a" * 60}]}).encode(),
     400, "files_too_large"),
    ("duplicate path", b'{"code": "1", "files": [{"path": "x", "content": ""}, '
     b'{"path": "x", "content": ""}]}', 400, "duplicate_path"),
    ("path conflict", b'{"code": "1", "files": [{"path": "x", "content": ""}, '
     b'{"path": "x/y", "content": ""}]}', 400, "path_conflict"),
    ("bad env name", b'{"code": "1", "env": {"1X": "a"}}', 400, "invalid_env"),
    ("argv not strings", b'{"code": "1", "argv": [1]}', 400, "invalid_argv"),
]
# Codes the tests after RUN_REFUSALS provoke, each asserted there.
PROVOKED_BY_TESTS = {
    "not_found", "method_not_allowed", "request_too_large", "unsupported_media_type",
    "body_timeout", "pool_exhausted", "acquire_timeout", "too_many_connections_from_peer",
    "server_busy", "shutting_down", "forbidden", "too_many_connections", "run_interrupted",
}
# Codes of the session endpoints: provoked by tests/test_sessions.py, which
# checks those answers against this document.
PROVOKED_BY_SESSION_TESTS = {
    "invalid_session", "sessions_unsupported", "session_not_found", "session_busy",
    "session_ended", "too_many_sessions", "session_limit", "session_memory",
}
# Codes of the TCP listener: provoked over TLS by tests/test_tls_listener.py,
# which checks those answers against this document.
PROVOKED_OVER_TLS = {"unauthorized", "pool_forbidden", "token_busy"}


# --- the document alone ------------------------------------------------------


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_document(metadata.version("sandpool"))


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate_openapi(document)


def documented_codes(document: dict[str, Any]) -> set[str]:
    codes: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            error = node.get("properties", {}).get("error", {})
            codes.update(error.get("properties", {}).get("code", {}).get("enum", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document["paths"])
    walk(document["components"]["responses"])
    return codes


def raised_codes(path: Path) -> set[str]:
    """Codes passed as ``code=`` to an error in ``path``, and the server's ``_HTTP_CODES``.

    A plain ``SandpoolError`` is left out: the server raises those at start
    (socket in use, metrics port taken) to its caller, never to a client.
    """
    codes: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "SandpoolError":
                continue
            codes.update(
                k.value.value for k in node.keywords
                if k.arg == "code" and isinstance(k.value, ast.Constant)
            )
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    and func.value.id == "_HTTP_CODES" and func.attr == "get"):
                codes.update(a.value for a in node.args[1:] if isinstance(a, ast.Constant))
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_HTTP_CODES" for t in node.targets
        ):
            assert isinstance(node.value, ast.Dict)
            codes.update(v.value for v in node.value.values if isinstance(v, ast.Constant))
    return codes


def test_every_code_raised_is_documented(document: dict[str, Any]) -> None:
    raised = set()
    for source in ("api/schema.py", "api/server.py", "pool/manager.py", "pool/sessions.py"):
        raised |= raised_codes(REPOSITORY / source)
    # The default codes of the errors that reach a client.
    raised |= {cls.code for cls in (
        errors.BadRequestError, errors.ForbiddenError, errors.UnknownPoolError,
        errors.UnavailableError, errors.BackendError, errors.SandboxLostError,
        errors.UnsupportedMediaTypeError, errors.UnauthorizedError, errors.PoolForbiddenError,
        errors.TokenBusyError, errors.SessionNotFoundError, errors.SessionEndedError,
        errors.SessionBusyError, errors.TooManySessionsError, errors.RunInterruptedError,
    )}
    # raised_codes must see the codes it is meant to (a test that cannot fail is a defect).
    assert {"invalid_path", "duplicate_path", "not_found", "http_error",
            "acquire_timeout"} <= raised
    assert raised - documented_codes(document) == set()


def test_every_documented_code_is_raised(document: dict[str, Any]) -> None:
    sources = "".join(
        (REPOSITORY / p).read_text()
        for p in ("api/schema.py", "api/server.py", "api/connections.py", "pool/manager.py",
                  "pool/sessions.py", "pool/errors.py")
    ).replace("ErrorCode(\"", "")  # the table itself is no use of a code
    documented = documented_codes(document)
    assert documented == {e.code for e in schema.ERROR_CODES}
    assert {code for code in documented if f'"{code}"' not in sources} == set()


def test_every_code_is_provoked_or_said_why_not(document: dict[str, Any]) -> None:
    provoked = ({code for *_, code in RUN_REFUSALS} | PROVOKED_BY_TESTS | PROVOKED_OVER_TLS
                | PROVOKED_BY_SESSION_TESTS)
    assert provoked.isdisjoint(NOT_PROVOKED)
    assert documented_codes(document) - provoked == set(NOT_PROVOKED)


@pytest.mark.parametrize("body", [
    {"code": "print(1)"},
    {"code": "x", "language": "python", "stdin": "", "timeout_s": 2.5,
     "files": [{"path": "a/b.txt", "content": "hi"},
               {"path": "c.bin", "content": "AAE=", "encoding": "base64"}],
     "env": {"MODE": "fast"}, "argv": ["--v"]},
])
def test_what_the_daemon_takes_the_document_takes(document: dict[str, Any], body: dict) -> None:
    schema.parse_run(body, {"python": PoolConfig(name="python")})
    validator(document, "/components/schemas/RunRequest").validate(body)


@pytest.mark.parametrize("body", [
    {}, {"code": 1}, {"code": "x", "timeout": 5}, {"code": "x", "timeout_s": 0},
    {"code": "x", "env": {"1X": "a"}}, {"code": "x", "files": [{"path": "x"}]},
])
def test_what_the_document_refuses_the_daemon_refuses(
    document: dict[str, Any], body: dict
) -> None:
    assert not validator(document, "/components/schemas/RunRequest").is_valid(body)
    with pytest.raises(errors.BadRequestError):
        schema.parse_run(body, {"python": PoolConfig(name="python")})


# --- a real daemon's answers --------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("openapi"), CONFIG) as daemon:
        yield daemon


def validator(document: dict[str, Any], pointer: str) -> Draft202012Validator:
    """A validator for the schema at ``pointer`` in the document; its $refs resolve there."""
    registry: Registry[Any] = Registry().with_resource(
        DOCUMENT_URI, DRAFT202012.create_resource(document)
    )
    return Draft202012Validator({"$ref": f"{DOCUMENT_URI}#{pointer}"}, registry=registry)


def escape(segment: str) -> str:
    return segment.replace("~", "~0").replace("/", "~1")


def check_answer(
    document: dict[str, Any], method: str, path: str,
    status: int, headers: dict[str, str], body: bytes,
) -> Any:
    """Assert the answer is one the document gives for ``method path``; returns its body.

    A path the document lacks must answer its NotFound, a method a path lacks
    its MethodNotAllowed; otherwise the operation's response for ``status``
    (or its ``default``).
    """
    operation = document["paths"].get(path, {}).get(method.lower())
    if path not in document["paths"]:
        where = "/components/responses/NotFound"
        assert status == 404
    elif operation is None:
        where = "/components/responses/MethodNotAllowed"
        assert status == 405
    else:
        responses = operation["responses"]
        key = str(status) if str(status) in responses else "default"
        assert key in responses, f"{method} {path} answered {status}, which is not documented"
        where = f"/paths/{escape(path)}/{method.lower()}/responses/{key}"
    response: dict[str, Any] = document
    for segment in where.strip("/").split("/"):
        response = response[segment.replace("~1", "/").replace("~0", "~")]
    folded = {name.lower(): value for name, value in headers.items()}
    for name, header in response.get("headers", {}).items():
        if header.get("required"):
            assert name.lower() in folded, f"{status} without {name}"
            validator(document, f"{where}/headers/{escape(name)}/schema").validate(
                int(folded[name.lower()]))
    media_type = folded["content-type"].split(";")[0].strip()
    assert media_type in response["content"], f"{status} as {media_type}"
    instance = json.loads(body) if media_type == "application/json" else body.decode()
    validator(document, f"{where}/content/{escape(media_type)}/schema").validate(instance)
    return instance


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("sandpool", timeout=60)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.socket_path)


def request(
    daemon: Daemon, document: dict[str, Any], method: str, path: str, body: bytes | None = None,
    content_type: str | None = "application/json",
) -> tuple[int, Any]:
    """One request on its own connection; the answer, checked against the document."""
    connection = UnixConnection(daemon.socket)
    try:
        headers = {"Content-Type": content_type} if content_type and body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    answer = check_answer(document, method, path, response.status,
                          dict(response.getheaders()), raw)
    return response.status, answer


def run(daemon: Daemon, document: dict[str, Any], body: dict[str, Any]) -> Any:
    status, answer = request(daemon, document, "POST", "/v1/run", json.dumps(body).encode())
    assert status == 200, answer
    return answer


def test_served_document_is_the_built_one(daemon: Daemon, document: dict[str, Any]) -> None:
    status, served = request(daemon, document, "GET", "/openapi.json")
    assert (status, served) == (200, document)


@pytest.mark.parametrize(("body", "status", "code"),
                         [r[1:] for r in RUN_REFUSALS], ids=[r[0] for r in RUN_REFUSALS])
def test_refused_runs_match(
    daemon: Daemon, document: dict[str, Any], body: bytes, status: int, code: str
) -> None:
    got_status, answer = request(daemon, document, "POST", "/v1/run", body)
    assert (got_status, answer["error"]["code"]) == (status, code)


def test_run_results_match(daemon: Daemon, document: dict[str, Any]) -> None:
    answer = run(daemon, document, {
        "code": "import os, sys\nos.makedirs('out', exist_ok=True)\n"
                "open('out/r.txt', 'w').write(open('in.txt').read() + sys.argv[1])\n"
                "os.symlink('r.txt', 'out/link')\n"
                "print(os.environ['MODE'])\n6 * 7",
        "files": [{"path": "in.txt", "content": base64.b64encode(b"ok ").decode(),
                   "encoding": "base64"}],
        "env": {"MODE": "fast"}, "argv": ["done"],
    })
    assert (answer["exit_code"], answer["stdout"]) == (0, "fast\n"), answer
    files = {f["path"]: f for f in answer["files"]}
    assert base64.b64decode(files["out/r.txt"]["content"]) == b"ok done"
    assert (files["out/link"]["type"], files["out/link"]["content"]) == ("symlink", None)
    assert answer["results"] == [{"type": "text/plain", "data": "42", "truncated": False}]

    failed = run(daemon, document, {"code": "{}['total']"})
    assert failed["exit_code"] == 1
    assert failed["error"]["name"] == "KeyError"

    timed_out = run(daemon, document, {"code": "while True: pass", "timeout_s": 0.5})
    assert (timed_out["exit_code"], timed_out["timed_out"]) == (None, True)


def test_other_endpoints_match(daemon: Daemon, document: dict[str, Any]) -> None:
    status, pools = request(daemon, document, "GET", "/v1/pools")
    assert (status, sorted(p["name"] for p in pools["pools"])) == (200, ["python", "tiny"])
    assert request(daemon, document, "GET", "/healthz") == (200, {"status": "ok"})
    status, ready = request(daemon, document, "GET", "/readyz")
    assert (status, ready["ready"]) == (200, True)
    status, metrics = request(daemon, document, "GET", "/metrics")
    assert status == 200
    assert "sandpool_requests_total" in metrics


def test_routing_errors_match(daemon: Daemon, document: dict[str, Any]) -> None:
    status, answer = request(daemon, document, "GET", "/v2/nothing")
    assert (status, answer["error"]["code"]) == (404, "not_found")
    for method, path in (("GET", "/v1/run"), ("POST", "/healthz"), ("DELETE", "/v1/pools")):
        status, answer = request(daemon, document, method, path, b"" if method == "POST" else None)
        assert (status, answer["error"]["code"]) == (405, "method_not_allowed")


def test_body_errors_match(daemon: Daemon, document: dict[str, Any]) -> None:
    body = json.dumps({"code": "#" * 70_000}).encode()
    status, answer = request(daemon, document, "POST", "/v1/run", body)
    assert (status, answer["error"]["code"]) == (413, "request_too_large")
    status, answer = request(daemon, document, "POST", "/v1/run", b"code=1",
                             "application/x-www-form-urlencoded")
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")


def test_stalled_body_matches(daemon: Daemon, document: dict[str, Any]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(daemon.socket)
        sock.sendall(b"POST /v1/run HTTP/1.1\r\nHost: sandpool\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"co")
        response = http.client.HTTPResponse(sock)
        response.begin()
        status, headers, raw = response.status, dict(response.getheaders()), response.read()
    answer = check_answer(document, "POST", "/v1/run", status, headers, raw)
    assert (status, answer["error"]["code"]) == (400, "body_timeout")


def test_exhausted_pool_matches(daemon: Daemon, document: dict[str, Any]) -> None:
    # Pool "tiny": max_size 1, max_queue 1, acquire_timeout_s 2. One runs, one
    # queues (and gives up after 2 s), the third is refused at once.
    def tiny(code: str) -> tuple[int, Any]:
        body = json.dumps({"code": code, "pool": "tiny"}).encode()
        return request(daemon, document, "POST", "/v1/run", body)

    def tiny_busy() -> bool:
        _, answer = request(daemon, document, "GET", "/v1/pools")
        return next(p for p in answer["pools"] if p["name"] == "tiny")["busy"] == 1

    with ThreadPoolExecutor(2) as executor:
        running = executor.submit(tiny, "import time; time.sleep(4); print('ran')")
        wait_until(tiny_busy, "the tiny pool's sandbox to be busy")
        queued = executor.submit(tiny, "print('queued')")
        time.sleep(0.3)  # let it reach the queue
        status, answer = tiny("1")
        assert (status, answer["error"]["code"]) == (503, "pool_exhausted")
        status, answer = queued.result(timeout=30)
        assert (status, answer["error"]["code"]) == (503, "acquire_timeout")
        assert running.result(timeout=30)[1]["stdout"] == "ran\n"


def refusal_after(socket_path: str, held: int) -> tuple[int, dict[str, str], bytes]:
    """The answer a new connection reads, sending nothing, while ``held`` others stay open."""
    sockets = []
    try:
        for _ in range(held):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.connect(socket_path)
        time.sleep(0.3)  # each counted in as the daemon accepts it
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(socket_path)
            response = http.client.HTTPResponse(sock)
            response.begin()
            return response.status, dict(response.getheaders()), response.read()
    finally:
        for sock in sockets:
            sock.close()


def test_per_peer_refusal_matches(daemon: Daemon, document: dict[str, Any]) -> None:
    # max_connections_per_peer 6: six idle connections held, the seventh is
    # answered and closed at once, whatever path it would have asked for.
    status, headers, raw = refusal_after(daemon.socket, 6)
    answer = check_answer(document, "GET", "/healthz", status, headers, raw)
    assert (status, answer["error"]["code"]) == (503, "too_many_connections_from_peer")


GATED_CONFIG = """
[server]
metrics_address = "off"
socket_mode = 0o666
allowed_uids = [1]
max_connections = 3
max_connections_per_peer = 3

[pools.python]
backend = "process"
min_idle = 0
max_size = 1
"""


def test_refusals_at_connection_match(document: dict[str, Any]) -> None:
    # uid 65534 is not in allowed_uids (root always is); three connections
    # fill the listener before any peer's own cap.
    shared = Path(tempfile.mkdtemp(prefix="sandpool-openapi-"))  # reachable by uid 65534
    shared.chmod(0o755)
    gated = start_daemon(shared, GATED_CONFIG)
    try:
        status, headers, raw = refusal_after(gated.socket, 3)
        answer = check_answer(document, "GET", "/v1/pools", status, headers, raw)
        assert (status, answer["error"]["code"]) == (503, "too_many_connections")

        read_as_nobody = textwrap.dedent(f"""
            import base64, http.client, json, os, socket
            os.setgid(65534); os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect({gated.socket!r})
            response = http.client.HTTPResponse(sock)
            response.begin()
            print(json.dumps([response.status, dict(response.getheaders()),
                              base64.b64encode(response.read()).decode()]))
        """)
        done = subprocess.run([sys.executable, "-c", read_as_nobody], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        status, headers, body = json.loads(done.stdout)
        answer = check_answer(document, "POST", "/v1/run", status, headers,
                              base64.b64decode(body))
        assert (status, answer["error"]["code"]) == (403, "forbidden")
    finally:
        stop_daemon(gated)
        shutil.rmtree(shared)


def test_busy_server_matches(daemon: Daemon, document: dict[str, Any]) -> None:
    # max_concurrent_requests 3: a run in tiny and two in python, then a fourth.
    def sleeper(pool: str) -> tuple[int, Any]:
        body = json.dumps({"code": "import time; time.sleep(3)", "pool": pool}).encode()
        return request(daemon, document, "POST", "/v1/run", body)

    def all_busy() -> bool:
        _, answer = request(daemon, document, "GET", "/v1/pools")
        busy = {p["name"]: p["busy"] for p in answer["pools"]}
        return busy == {"python": 2, "tiny": 1}

    with ThreadPoolExecutor(3) as executor:
        runs = [executor.submit(sleeper, pool) for pool in ("tiny", "python", "python")]
        wait_until(all_busy, "three runs in flight")
        status, answer = request(daemon, document, "POST", "/v1/run", b'{"code": "1"}')
        assert (status, answer["error"]["code"]) == (503, "server_busy")
        assert [run.result(timeout=30)[0] for run in runs] == [200, 200, 200]


DRAINING_CONFIG = """
[server]
metrics_address = "off"
shutdown_timeout_s = 1

[pools.python]
backend = "process"
min_idle = 1
max_size = 1
"""


def test_run_cut_by_shutdown_matches(
    tmp_path: Path, document: dict[str, Any]
) -> None:
    # shutdown_timeout_s 1: a run still going a second after SIGTERM is stopped
    # and its client told so.
    draining = start_daemon(tmp_path, DRAINING_CONFIG)
    try:
        def busy() -> bool:
            _, answer = request(draining, document, "GET", "/v1/pools")
            return bool(answer["pools"][0]["busy"] == 1)

        with ThreadPoolExecutor(1) as executor:
            body = b'{"code": "import time; time.sleep(30)", "timeout_s": 5}'
            cut = executor.submit(request, draining, document, "POST", "/v1/run", body)
            wait_until(busy, "the run to start")
            draining.process.send_signal(signal.SIGTERM)
            status, answer = cut.result(timeout=30)
        assert (status, answer["error"]["code"]) == (500, "run_interrupted")
    finally:
        stop_daemon(draining)
