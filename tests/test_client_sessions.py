"""``sandpool_client`` sessions: the protocol alone, then both clients against a real daemon.

The first half feeds the parsing dicts and httpx's MockTransport answers, which
docs/sessions.md specifies: each stable code to its exception, a session's run
never sent twice, creation retried as a run is, ``close()`` idempotent. The
second half runs ``Client.session`` and ``AsyncClient.session`` against a real
daemon on its Unix socket (process tier), and a second daemon whose socket
another uid can reach, to be refused the owner's session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sandpool_client import (
    ApiError,
    AsyncClient,
    BadRequest,
    Client,
    OutputChunk,
    RunResult,
    SandpoolClientError,
    Session,
    SessionBusy,
    SessionEnded,
    SessionInfo,
    SessionLimit,
    SessionNotFound,
    SessionsUnsupported,
    TooManySessions,
    Unavailable,
)
from sandpool_client.protocol import decode_answer, session_body, session_path

from tests.support import Daemon, running_daemon, wait_until

SESSION_ID = "s-3q2V_abc-DEF"
SESSION = {
    "session_id": SESSION_ID, "pool": "python",
    "created_at": "2026-11-30T16:00:00Z", "expires_at": "2026-11-30T16:10:00Z",
    "idle_timeout_s": 300, "idle_expires_at": "2026-11-30T16:05:00Z",
    "runs": 0, "busy": False,
}
RESULT = {
    "exit_code": 0, "stdout": "42\n", "stderr": "", "timed_out": False, "oom_killed": False,
    "stdout_truncated": False, "stderr_truncated": False, "duration_ms": 1.5,
    "queued_ms": 0.0, "pool": "python", "sandbox_id": "sb1",
}


def error_answer(status: int, code: str, message: str = "no", **extra: Any) -> httpx.Response:
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else {}
    return httpx.Response(status, json={"error": {"code": code, "message": message, **extra}},
                          headers=headers)


# --- the protocol alone -----------------------------------------------------------


@pytest.mark.parametrize(("status", "code", "kind"), [
    (404, "session_not_found", SessionNotFound),
    (400, "sessions_unsupported", SessionsUnsupported),
    (409, "session_busy", SessionBusy),
    (429, "too_many_sessions", TooManySessions),
    (503, "session_limit", SessionLimit),
    (503, "session_memory", SessionLimit),
])
def test_each_session_code_raises_its_class(status: int, code: str, kind: type[ApiError]) -> None:
    with pytest.raises(kind) as caught:
        decode_answer(error_answer(status, code, "refused", retry_after=7))
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        status, code, "refused")


def test_the_old_families_still_catch_the_session_classes() -> None:
    # Code written before sessions (except BadRequest, except Unavailable) keeps working.
    assert issubclass(SessionNotFound, BadRequest)
    assert issubclass(SessionsUnsupported, BadRequest)
    assert issubclass(TooManySessions, Unavailable)
    assert issubclass(SessionLimit, Unavailable)
    with pytest.raises(Unavailable) as caught:
        decode_answer(error_answer(503, "session_memory", retry_after=3))
    assert caught.value.retry_after == 3.0


def test_session_ended_carries_its_reason() -> None:
    with pytest.raises(SessionEnded) as caught:
        decode_answer(error_answer(410, "session_ended", "it timed out", reason="timed_out"))
    assert (caught.value.status, caught.value.reason) == (410, "timed_out")
    assert "reason='timed_out'" in repr(caught.value)
    with pytest.raises(SessionEnded) as unsaid:
        decode_answer(error_answer(410, "session_ended"))
    assert unsaid.value.reason is None


def test_a_code_not_of_sessions_keeps_its_status_class() -> None:
    with pytest.raises(BadRequest) as caught:
        decode_answer(error_answer(404, "unknown_pool"))
    assert type(caught.value) is BadRequest
    with pytest.raises(ApiError) as gone:
        decode_answer(error_answer(410, "something_else"))
    assert type(gone.value) is ApiError


def test_session_body_leaves_out_what_is_not_given() -> None:
    assert session_body(pool=None, ttl_s=None, idle_timeout_s=None) == {}
    assert session_body(pool="python", ttl_s=60, idle_timeout_s=5.5) == {
        "pool": "python", "ttl_s": 60, "idle_timeout_s": 5.5}


def test_a_session_path_quotes_the_whole_id() -> None:
    assert session_path(SESSION_ID) == f"/v1/sessions/{SESSION_ID}"
    assert session_path(SESSION_ID, "run") == f"/v1/sessions/{SESSION_ID}/run"
    # An id from elsewhere cannot reach another resource.
    assert session_path("../pools") == "/v1/sessions/..%2Fpools"
    assert session_path("a/run?x") == "/v1/sessions/a%2Frun%3Fx"
    with pytest.raises(ValueError, match="not empty"):
        session_path("")


def test_a_session_object_parses_to_aware_times() -> None:
    info = SessionInfo.from_json({**SESSION, "runs": 2, "busy": True, "tomorrow": 1})
    assert info.expires_at == datetime(2026, 11, 30, 16, 10, tzinfo=UTC)
    assert info.idle_expires_at == datetime(2026, 11, 30, 16, 5, tzinfo=UTC)
    assert (info.session_id, info.pool, info.runs, info.busy, info.idle_timeout_s) == (
        SESSION_ID, "python", 2, True, 300.0)
    assert SessionInfo.from_json({**SESSION, "idle_expires_at": None}).idle_expires_at is None
    assert SessionInfo.list_from_json({"sessions": [SESSION, SESSION]}) == [
        SessionInfo.from_json(SESSION)] * 2
    for broken in ({**SESSION, "expires_at": "tomorrow"},
                   {**SESSION, "expires_at": "2026-11-30T16:10:00"},  # no zone
                   {**SESSION, "runs": True},
                   {key: v for key, v in SESSION.items() if key != "session_id"}):
        with pytest.raises(SandpoolClientError) as caught:
            SessionInfo.from_json(broken)
        assert caught.value.code == "invalid_response"


class FakeDaemon:
    """Answers by method and path, in order; records what was sent."""

    def __init__(self, *answers: tuple[str, str, httpx.Response]) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.sent.append((request.method, request.url.path, body))
        method, path, response = self.answers.pop(0)
        assert (request.method, request.url.path) == (method, path), self.sent
        return response

    def client(self, retries: int = 0) -> Client:
        return Client(base_url="http://sandpool.test", retries=retries,
                      transport=httpx.MockTransport(self))

    def async_client(self, retries: int = 0) -> AsyncClient:
        return AsyncClient(base_url="http://sandpool.test", retries=retries,
                           transport=httpx.MockTransport(self))


RUN_PATH = f"/v1/sessions/{SESSION_ID}/run"
SESSION_PATH = f"/v1/sessions/{SESSION_ID}"


# Functions, not constants: a client binds the response it received to itself.
def created() -> tuple[str, str, httpx.Response]:
    return ("POST", "/v1/sessions", httpx.Response(201, json=SESSION))


def deleted() -> tuple[str, str, httpx.Response]:
    return ("DELETE", SESSION_PATH,
            httpx.Response(200, json={"session_id": SESSION_ID, "ended": "deleted"}))


def test_a_session_run_is_sent_once_even_with_retries() -> None:
    daemon = FakeDaemon(
        created(),
        ("POST", RUN_PATH, error_answer(503, "shutting_down", retry_after=0)),
        ("POST", RUN_PATH, error_answer(503, "shutting_down", retry_after=0)),
    )
    with daemon.client(retries=5) as client:
        session = client.session(pool="python", ttl_s=60, idle_timeout_s=10)
        with pytest.raises(Unavailable):
            session.run("x = 1", stdin="in", env={"A": "1"}, timeout_s=3)
        with pytest.raises(Unavailable):  # the streamed form alike
            list(session.stream("x = 1"))
    assert [s[:2] for s in daemon.sent] == [
        ("POST", "/v1/sessions"), ("POST", RUN_PATH), ("POST", RUN_PATH)]
    assert daemon.sent[0][2] == {"pool": "python", "ttl_s": 60, "idle_timeout_s": 10}
    # The /v1/run body without pool and language.
    assert daemon.sent[1][2] == {"code": "x = 1", "stdin": "in", "timeout_s": 3,
                                 "env": {"A": "1"}}


async def test_creation_is_retried_on_429_and_503_as_a_run_is() -> None:
    daemon = FakeDaemon(
        ("POST", "/v1/sessions", error_answer(429, "too_many_sessions", retry_after=0)),
        ("POST", "/v1/sessions", error_answer(503, "session_limit", retry_after=0)),
        created(),
        ("POST", RUN_PATH, httpx.Response(200, json=RESULT)),
        deleted(),
    )
    async with daemon.async_client(retries=2) as client, client.session() as session:
        assert (session.id, session.pool) == (SESSION_ID, "python")
        assert session.expires_at == datetime(2026, 11, 30, 16, 10, tzinfo=UTC)
        assert (await session.run("print(42)")).stdout == "42\n"
    assert [s[:2] for s in daemon.sent] == [
        ("POST", "/v1/sessions")] * 3 + [("POST", RUN_PATH), ("DELETE", SESSION_PATH)]
    assert daemon.sent[0][2] == {}  # the daemon's defaults


def test_without_retries_creation_raises_the_limit_at_once() -> None:
    daemon = FakeDaemon(
        ("POST", "/v1/sessions", error_answer(429, "too_many_sessions", retry_after=2)))
    with daemon.client() as client, pytest.raises(TooManySessions) as caught:
        client.session()
    assert caught.value.retry_after == 2.0


def test_close_is_idempotent_and_an_ended_session_is_not_an_error() -> None:
    daemon = FakeDaemon(
        created(), deleted(),
        created(), ("DELETE", SESSION_PATH,
                  httpx.Response(200, json={"session_id": SESSION_ID, "ended": "idle"})),
        created(), ("DELETE", SESSION_PATH, error_answer(410, "session_ended", reason="expired")),
        created(), ("DELETE", SESSION_PATH, error_answer(404, "session_not_found")),
    )
    with daemon.client() as client:
        with client.session() as session:
            assert session.close() == "deleted"
            assert session.close() == "deleted"  # no second request
        assert "ended=deleted" in repr(session)
        assert client.session().close() == "idle"
        assert client.session().close() == "expired"
        assert client.session().close() is None
    assert [s[0] for s in daemon.sent] == ["POST", "DELETE"] * 4


def test_close_raises_what_leaves_the_session_alive() -> None:
    daemon = FakeDaemon(
        created(), ("DELETE", SESSION_PATH, error_answer(500, "internal")), deleted())
    with daemon.client() as client:
        session = client.session()
        with pytest.raises(ApiError):
            session.close()
        assert session.close() == "deleted"  # not taken as closed: sent again


async def test_a_session_streams_to_an_iterator_and_a_callback() -> None:
    lines = (b'{"type": "stdout", "data": "4"}\n{"type": "stdout", "data": "2\\n"}\n'
             + json.dumps({"type": "result", **RESULT}).encode() + b"\n")
    daemon = FakeDaemon(
        created(),
        ("POST", RUN_PATH, httpx.Response(200, content=lines)),
        ("POST", RUN_PATH, httpx.Response(200, content=lines)),
        deleted(),
    )
    async with daemon.async_client() as client:
        session = await client.session()
        events = [event async for event in session.stream("print(42)")]
        assert events[:2] == [OutputChunk("stdout", "4"), OutputChunk("stdout", "2\n")]
        assert isinstance(events[2], RunResult)
        heard: list[str] = []
        result = await session.run("print(42)", on_output=lambda c: heard.append(c.data))
        assert (heard, result.stdout) == (["4", "2\n"], "42\n")
        assert await session.close() == "deleted"
    assert all(s[2] == {"code": "print(42)"} for s in daemon.sent[1:3])


def test_sessions_and_info_are_typed() -> None:
    daemon = FakeDaemon(
        ("GET", "/v1/sessions", httpx.Response(200, json={"sessions": [SESSION]})),
        ("GET", "/v1/sessions", httpx.Response(200, json={"sessions": []})),
        ("GET", SESSION_PATH, httpx.Response(200, json=SESSION)),
        ("GET", SESSION_PATH, httpx.Response(200, json={**SESSION, "runs": 3, "busy": True})),
        ("GET", "/v1/sessions/nope", error_answer(404, "session_not_found")),
    )
    with daemon.client() as client:
        [listed] = client.sessions()
        assert listed.session_id == SESSION_ID
        assert client.sessions() == []
        resumed = client.resume_session(SESSION_ID)
        assert (resumed.id, resumed.idle_timeout_s) == (SESSION_ID, 300.0)
        now = resumed.info()
        assert (now.runs, now.busy) == (3, True)
        with pytest.raises(SessionNotFound):
            client.resume_session("nope")


# --- against a real daemon ----------------------------------------------------------

# python: ordinary sessions (two at once: max_sessions is half of max_size by
# default); one: room for one session; big: room for two, but two of its
# memory_mb pass session_memory_mb; python-wasm: a tier that keeps no state. A
# caller may hold three sessions.
CONFIG = """
[server]
metrics_address = "off"
max_sessions_per_caller = 3
session_memory_mb = 1024

[pools.python]
backend = "process"
min_idle = 1
max_size = 4
timeout_s = 5
max_timeout_s = 20

[pools.one]
backend = "process"
min_idle = 0
max_size = 2

[pools.big]
backend = "process"
memory_mb = 640
min_idle = 0
max_size = 4

[pools.python-wasm]
backend = "wasm"
min_idle = 1
max_size = 1
"""


@pytest.fixture(scope="module")
def session_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("client-sessions"), CONFIG) as running:
        yield running


@pytest.fixture
def sandpool(session_daemon: Daemon) -> Iterator[Client]:
    """The daemon's client; after the test, no session of this caller is left."""
    with Client(session_daemon.socket) as client:
        yield client
        assert client.sessions() == [], "a test left a session open"


def live_ids(client: Client) -> set[str]:
    return {info.session_id for info in client.sessions()}


def test_state_is_kept_across_runs_and_the_block_closes_the_session(sandpool: Client) -> None:
    with sandpool.session(pool="python") as session:
        assert session.pool == "python"
        assert session.expires_at > datetime.now(UTC)
        assert len(session.id) >= 43  # 256 bits in URL-safe base64, a prefix aside
        assert sandpool.run("x = 41").ok  # a single-use run, beside the session
        first = session.run("x = 41\nimport json\nimport os\nos.chdir('/tmp')")
        assert first.ok, first.stderr
        second = session.run("print(x + 1, json.dumps([os.getcwd()]))\nx * 2")
        assert (second.stdout, second.exit_code) == ('42 ["/tmp"]\n', 0)
        assert [r.text for r in second.results] == ["82"]
        assert session.id in live_ids(sandpool)
        info = session.info()
        assert (info.session_id, info.runs, info.busy) == (session.id, 2, False)
    assert session.id not in live_ids(sandpool)
    with pytest.raises(SessionEnded) as caught:
        session.run("print(x)")
    assert caught.value.reason == "deleted"


def test_files_persist_and_out_answers_what_changed(sandpool: Client) -> None:
    with sandpool.session(pool="python") as session:
        first = session.run(
            "import os\nos.makedirs('out', exist_ok=True)\n"
            "open('notes.txt', 'w').write('kept')\nopen('out/a.txt', 'w').write('a')\n",
            files={"data/in.csv": "n\n1\n", "blob.bin": b"\0\xff"},
        )
        assert first.ok, first.stderr
        assert [f.path for f in first.files] == ["out/a.txt"]
        second = session.run(
            "print(open('notes.txt').read(), open('data/in.csv').read().split(),"
            " open('blob.bin', 'rb').read())\n"
            "open('out/b.txt', 'w').write('b')\n",
        )
        assert second.stdout == "kept ['n', '1'] b'\\x00\\xff'\n"
        assert [(f.path, f.content) for f in second.files] == [("out/b.txt", b"b")]


def test_a_run_that_times_out_ends_the_session(sandpool: Client) -> None:
    with sandpool.session(pool="python") as session:
        session.run("x = 1")
        killed = session.run("while True: pass", timeout_s=0.5)
        assert (killed.timed_out, killed.exit_code) == (True, None)
        with pytest.raises(SessionEnded) as caught:
            session.run("print(x)")
        assert (caught.value.status, caught.value.code, caught.value.reason) == (
            410, "session_ended", "timed_out")
        with pytest.raises(SessionEnded):
            session.info()
        assert session.id not in live_ids(sandpool)
        assert session.close() == "timed_out"  # not an error: it had ended


def test_an_idle_session_ends_by_itself(sandpool: Client) -> None:
    with sandpool.session(pool="python", idle_timeout_s=1) as session:
        assert session.idle_timeout_s == 1
        session.run("x = 1")
        wait_until(lambda: session.id not in live_ids(sandpool), "the idle session to end",
                   timeout_s=15)
        with pytest.raises(SessionEnded) as caught:
            session.run("print(x)")
        assert caught.value.reason == "idle"


def test_a_session_ends_at_its_ttl_however_busy(sandpool: Client) -> None:
    def keep_running(session: Session) -> None:
        """Runs keep it from idling, not from expiring: until one is refused."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            session.run("import time; time.sleep(0.3)")

    with sandpool.session(pool="python", ttl_s=2, idle_timeout_s=1) as session:
        with pytest.raises(SessionEnded) as caught:
            keep_running(session)
        assert caught.value.reason == "expired"
        assert session.close() == "expired"


def test_close_is_idempotent_on_the_daemon_too(sandpool: Client) -> None:
    session = sandpool.session(pool="python")
    again = sandpool.resume_session(session.id)  # a second handle: its own DELETE
    assert again.id == session.id
    assert session.close() == "deleted"
    assert session.close() == "deleted"
    assert again.close() == "deleted"  # the daemon's answer for an ended session
    with pytest.raises(SessionEnded) as caught:
        sandpool.resume_session(session.id)
    assert caught.value.reason == "deleted"


def test_an_unknown_id_is_not_found(sandpool: Client) -> None:
    unknown = "s-" + secrets.token_urlsafe(32)
    with pytest.raises(SessionNotFound) as caught:
        sandpool.resume_session(unknown)
    assert (caught.value.status, caught.value.code) == (404, "session_not_found")
    with pytest.raises(SessionNotFound):
        sandpool.resume_session("../pools")  # quoted: never another resource


# A second caller on the socket: another uid (the daemon's owner is the peer's uid).
NOBODY = 65534
# The owner's daemon, whose socket another uid may reach (a directory it can
# traverse, mode 0o666, no allowed_uids).
SHARED_SOCKET_CONFIG = """
[server]
metrics_address = "off"
socket_mode = 0o666

[pools.python]
backend = "process"
min_idle = 1
max_size = 4
"""


def as_another_uid(socket_path: str, session_id: str) -> dict[str, Any]:
    """What uid ``NOBODY`` gets for ``session_id``: each request's status and code.

    A forked child drops to that uid (it cannot exec this venv's Python, which
    lives under root's home) and asks with modules the parent already loaded.
    """
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - reported through the pipe
        status = 1
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            seen: dict[str, Any] = {}
            with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path),
                              base_url="http://sandpool") as other:
                for name, method, path, body in (
                    ("get", "GET", session_path(session_id), None),
                    ("run", "POST", session_path(session_id, "run"), {"code": "print(secret)"}),
                    ("delete", "DELETE", session_path(session_id), None),
                    ("list", "GET", "/v1/sessions", None),
                    ("unknown", "GET", session_path("s-" + secrets.token_urlsafe(32)), None),
                ):
                    answer = other.request(method, path, json=body)
                    seen[name] = [answer.status_code, answer.json()]
            os.write(writer, json.dumps(seen).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(writer)
    with os.fdopen(reader, "rb") as answers:
        said = answers.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the other uid's requests failed"
    seen = json.loads(said)
    assert isinstance(seen, dict)
    return seen


def test_another_callers_session_is_not_found_for_them() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sandpool-sessions-"))
    try:
        workdir.chmod(0o755)
        with running_daemon(workdir, SHARED_SOCKET_CONFIG) as daemon, \
                Client(daemon.socket) as owner, owner.session(pool="python") as mine:
            mine.run("secret = 1")
            seen = as_another_uid(daemon.socket, mine.id)
            # Refused as an id that never existed is: the id is not even confirmed.
            assert seen["unknown"][0] == 404
            assert seen["unknown"][1]["error"]["code"] == "session_not_found"
            assert (seen["get"], seen["run"], seen["delete"]) == (seen["unknown"],) * 3
            assert seen["list"] == [200, {"sessions": []}]
            assert mine.run("print(secret)").stdout == "1\n"  # untouched by the other
    finally:
        shutil.rmtree(workdir)


def test_the_limits_raise_their_classes(sandpool: Client) -> None:
    with contextlib.ExitStack() as held:
        held.enter_context(sandpool.session(pool="one"))
        with pytest.raises(SessionLimit) as pool_full:
            sandpool.session(pool="one")
        assert (pool_full.value.status, pool_full.value.code) == (503, "session_limit")
        assert pool_full.value.retry_after is not None
        held.enter_context(sandpool.session(pool="python"))
        held.enter_context(sandpool.session(pool="python"))
        with pytest.raises(TooManySessions) as caller_full:
            sandpool.session(pool="python")
        assert (caller_full.value.status, caller_full.value.code) == (429, "too_many_sessions")
        assert caller_full.value.retry_after is not None
    with sandpool.session(pool="big"), pytest.raises(SessionLimit) as memory_full:
        sandpool.session(pool="big")  # 2 x 640 MB over session_memory_mb
    assert (memory_full.value.status, memory_full.value.code) == (503, "session_memory")
    with pytest.raises(SessionsUnsupported) as stateless:
        sandpool.session(pool="python-wasm")
    assert (stateless.value.status, stateless.value.code) == (400, "sessions_unsupported")


def test_creation_waits_out_a_full_pool_with_retries(session_daemon: Daemon) -> None:
    with Client(session_daemon.socket, retries=5) as patient:
        # Retry-After: until the first session of the pool can end by itself, here
        # by its idle timeout.
        holder = patient.session(pool="one", idle_timeout_s=2)
        began = time.monotonic()
        with patient.session(pool="one") as second:
            assert time.monotonic() - began >= 1.0  # refused at first, then sent again
            assert second.run("print('second')").stdout == "second\n"
        assert holder.close() == "idle"


def test_a_second_run_in_flight_is_refused_busy(sandpool: Client) -> None:
    with sandpool.session(pool="python") as session, ThreadPoolExecutor(1) as beside:
        slow = beside.submit(session.run, "import time; time.sleep(2); print('slow')")
        wait_until(lambda: session.info().busy, "the first run to be in flight")
        assert session.info().idle_expires_at is None  # not idling while it runs
        with pytest.raises(SessionBusy) as caught:
            session.run("print(1)")
        assert (caught.value.status, caught.value.code) == (409, "session_busy")
        assert slow.result(timeout=30).stdout == "slow\n"
        assert session.run("print('after')").stdout == "after\n"


def test_leaving_a_run_early_ends_the_session(sandpool: Client) -> None:
    with sandpool.session(pool="python") as session:
        session.run("x = 1")
        with contextlib.closing(session.stream(
            "import time\nprint('begun', flush=True)\ntime.sleep(10)"
        )) as events:
            first = next(events)
        assert first == OutputChunk("stdout", "begun\n")
        # The daemon cannot tell what state the killed run left: the session is over.
        wait_until(lambda: session.id not in live_ids(sandpool), "the session to end")
        with pytest.raises(SessionEnded) as caught:
            session.run("print(x)")
        assert caught.value.reason == "cancelled"


def test_leaving_the_block_by_an_exception_closes(sandpool: Client) -> None:
    opened: list[str] = []

    def analyse() -> None:
        with sandpool.session(pool="python") as session:
            opened.append(session.id)
            session.run("x = 1")
            raise LookupError("the caller's own failure")

    with pytest.raises(LookupError):
        analyse()
    assert opened
    assert opened[0] not in live_ids(sandpool)


async def test_async_sessions_keep_state_stream_and_close(session_daemon: Daemon) -> None:
    async with AsyncClient(session_daemon.socket) as client:
        async with client.session(pool="python") as session:
            assert (await session.run("x = 41")).ok
            events = [e async for e in session.stream("print(x + 1, flush=True)")]
            assert events[0] == OutputChunk("stdout", "42\n")
            assert isinstance(events[-1], RunResult)
            assert events[-1].stdout == "42\n"
            assert session.id in {i.session_id for i in await client.sessions()}
        assert session.id not in {i.session_id for i in await client.sessions()}
        kept = await client.session(pool="python", ttl_s=30)
        try:
            info = await kept.info()
            lifetime_s = (info.expires_at - info.created_at).total_seconds()
            assert lifetime_s == pytest.approx(30, abs=1)
            other = await client.session(pool="python")
            try:
                # Two sessions in parallel see nothing of each other.
                await asyncio.gather(kept.run("secret = 1"), other.run("import os"))
                peek = await other.run("print('secret' in globals())")
                assert peek.stdout == "False\n"
            finally:
                assert await other.close() == "deleted"
        finally:
            assert await kept.close() == "deleted"
            assert await kept.close() == "deleted"
        with pytest.raises(SessionEnded) as caught:
            await kept.run("1")
        assert caught.value.reason == "deleted"
        assert await client.sessions() == []
