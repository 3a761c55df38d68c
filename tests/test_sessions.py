"""Sessions against a real daemon, in every tier that holds them (docs/sessions.md).

State kept from run to run as in a notebook; two sessions see nothing of each
other; every way a session ends destroys its sandbox; another caller's id is
refused as an unknown one; each limit answers with its code; SIGTERM and
SIGKILL-plus-restart leave no session sandbox. Error answers are checked
against the OpenAPI document.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from api.client import ApiError, Client
from api.openapi import build_document
from tests.support import (
    Daemon,
    assert_out_of_memory,
    docker_containers,
    metric_sample,
    pool_cgroup_dir,
    processes_in_uid_range,
    start_daemon,
    stop_daemon,
    wait_until,
)

# Its own uid range: other daemons on this host (other tests) use the default one,
# and what this file's daemon leaves is found by uid.
UID_BASE = 1_910_000_000
UID_COUNT = 2048
# The daemons started one per test below: a range of their own, after it.
SMALL_UIDS = (UID_BASE + UID_COUNT, UID_COUNT)
CONFIG = f"""
[server]
metrics_address = "off"
socket_mode = 0o666
shutdown_timeout_s = 10
sandbox_uid_base = {UID_BASE}
sandbox_uid_count = {UID_COUNT}
max_sessions_per_caller = 3
session_memory_mb = 700
session_idle_timeout_s = 60

[pools.python]
min_idle = 1
max_size = 4
max_sessions = 2
timeout_s = 5

[pools.python-process]
backend = "process"
min_idle = 1
max_size = 4
max_sessions = 2
timeout_s = 5

[pools.python-fork]
backend = "fork"
min_idle = 1
max_size = 4
max_sessions = 2
timeout_s = 5

[pools.big]
backend = "process"
min_idle = 0
max_size = 2
max_sessions = 2
memory_mb = 400

[pools.python-wasm]
backend = "wasm"
min_idle = 1
max_size = 2
"""
TIERS = ["python", "python-process", "python-fork"]  # docker, process, fork


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    # A directory another uid can reach the socket in (pytest's are root's only).
    workdir = Path(tempfile.mkdtemp(prefix="sandpool-sessions-"))
    workdir.chmod(0o711)
    try:
        daemon = start_daemon(workdir, CONFIG)
        try:
            yield daemon
        finally:
            stop_daemon(daemon)
            no_sandbox_process_left(UID_BASE, UID_COUNT)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with daemon.client() as client:
        yield client
        # Every test ends its sessions: the limits of the next one start from zero.
        for session in client.request("GET", "/v1/sessions")["sessions"]:
            client.request("DELETE", f"/v1/sessions/{session['session_id']}")
        wait_until(lambda: all(p["leased"] == 0 for p in client.pools()),
                   "every leased sandbox destroyed")


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_document(metadata.version("sandpool"))


def create(client: Client, pool: str, **fields: object) -> str:
    session = client.request("POST", "/v1/sessions", {"pool": pool, **fields})
    return str(session["session_id"])


def run(client: Client, session: str, code: str, **fields: object) -> dict[str, Any]:
    return client.request("POST", f"/v1/sessions/{session}/run", {"code": code, **fields})


def refused(
    client: Client, method: str, path: str, body: object, status: int, code: str,
    document: dict[str, Any], template: str,
) -> dict[str, Any]:
    """The error answer, checked for its status, code and against the document."""
    got, raw = client.request_raw(method, path, body)
    answer = json.loads(raw)
    assert (got, answer["error"]["code"]) == (status, code), answer
    operation = document["paths"][template][method.lower()]
    schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
    Draft202012Validator({**schema, "components": document["components"]}).validate(answer)
    return answer  # type: ignore[no-any-return]


# --- state ------------------------------------------------------------------------


@pytest.mark.parametrize("pool", TIERS)
def test_state_is_kept_from_run_to_run_like_notebook_cells(client: Client, pool: str) -> None:
    session = create(client, pool)
    first = run(client, session, textwrap.dedent("""\
        import os, json
        x = 41
        log = open("log.txt", "w")
        log.write("kept")
        os.mkdir("work")
        os.chdir("work")
        print("ok")
    """))
    assert (first["exit_code"], first["stdout"]) == (0, "ok\n"), first
    second = run(client, session, "log.flush()\nprint(os.getcwd(), json.dumps(x + 1))\nx + 1")
    assert second["stdout"] == "/sandbox/work 42\n", second
    assert second["results"] == [{"type": "text/plain", "data": "42", "truncated": False}]
    third = run(client, session, "print(open('/sandbox/log.txt').read())")
    assert third["stdout"] == "kept\n"


@pytest.mark.parametrize("pool", TIERS)
def test_files_in_replace_and_out_reports_what_is_new_or_changed(
    client: Client, pool: str
) -> None:
    session = create(client, pool)
    first = run(client, session, "open('out/a.txt', 'w').write('1')\nprint(open('d.csv').read())",
                files=[{"path": "d.csv", "content": "v1"}])
    assert first["stdout"] == "v1\n"
    assert [f["path"] for f in first["files"]] == ["out/a.txt"]
    # The same input path again replaces it; out/a.txt unchanged is not sent again.
    second = run(client, session, "open('out/b.txt', 'w').write('2')\nprint(open('d.csv').read())",
                 files=[{"path": "d.csv", "content": "v2"}])
    assert second["stdout"] == "v2\n"
    assert [f["path"] for f in second["files"]] == ["out/b.txt"]
    third = run(client, session, "open('out/a.txt', 'w').write('changed')")
    assert [(f["path"], f["size"]) for f in third["files"]] == [("out/a.txt", 7)]


@pytest.mark.parametrize("pool", TIERS)
def test_two_sessions_see_nothing_of_each_other(client: Client, pool: str) -> None:
    one, two = create(client, pool), create(client, pool)
    run(client, one, "import subprocess\nsecret = 'one'\nopen('mine.txt', 'w').write('one')\n"
        "p = subprocess.Popen(['sleep', '300'])")
    seen = run(client, two, textwrap.dedent("""\
        import os
        print('secret' in globals(), os.path.exists('mine.txt'),
              os.path.exists('/sandbox/mine.txt'))
        sleeping = [p for p in os.listdir('/proc') if p.isdigit()
                    and b'sleep' in open(f'/proc/{p}/cmdline', 'rb').read()]
        print(sleeping)
    """))
    assert seen["stdout"] == "False False False\n[]\n", seen
    # Still there for its own session.
    assert run(client, one, "print(secret, p.poll())")["stdout"] == "one None\n"


def test_the_pool_refills_behind_a_leased_sandbox(client: Client) -> None:
    session = create(client, "python-process")
    wait_until(lambda: pool_counts(client, "python-process")[:2] == (1, 1),
               "one idle sandbox beside the leased one")
    assert client.run("print(7)", pool="python-process")["stdout"] == "7\n"
    client.request("DELETE", f"/v1/sessions/{session}")


def pool_counts(client: Client, name: str) -> tuple[int, int]:
    pool = next(p for p in client.pools() if p["name"] == name)
    return pool["idle"], pool["leased"]


def cpu_standing(daemon: Daemon, pool: str, sandbox_id: str) -> str:
    """What the session's sandbox stands at: its pool's and its own cgroup's cpu.idle,
    or, for a container the engine keeps in its own cgroups, its CpuShares ("" where
    the host has no such file)."""
    found = pool_cgroup_dir(daemon, pool)
    if pool == "python":
        shares, container_id = subprocess.run(
            ["docker", "inspect", "--format", "{{.HostConfig.CpuShares}} {{.Id}}",
             f"sandpool-{pool}-{sandbox_id}"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.split()
        if found is None:
            return shares
        sandbox_id = container_id  # its cgroup below the pool's own
    if found is None or not (found / "cpu.idle").exists():
        return ""
    return ",".join((d / "cpu.idle").read_text().strip() for d in (found, found / sandbox_id))


@pytest.mark.parametrize("pool", TIERS)
def test_a_busy_run_leaves_the_sessions_next_run_an_ordinary_cpu_standing(
    daemon: Daemon, client: Client, pool: str
) -> None:
    """A busy run yields the CPU (tests/security/test_busy_neighbours.py); a
    session's sandbox gets its standing back for the next run, which may be short."""
    session = create(client, pool)
    sandbox_id = run(client, session, "print(1)")["sandbox_id"]
    # Docker in the engine's cgroups: CpuShares unset or set back, and 2 while busy.
    ordinary = {"python": ("0,0", "0", "1024")}.get(pool, ("0,0",))
    demoted = {"python": ("1,1", "2")}.get(pool, ("1,1",))
    if cpu_standing(daemon, pool, sandbox_id) not in ordinary:
        pytest.skip("no cpu.idle here")
    answers: list[dict[str, Any]] = []
    busy = threading.Thread(target=lambda: answers.append(run(
        client, session, "import time\nb = time.monotonic()\nwhile time.monotonic() - b < 3: pass",
        timeout_s=10)))
    busy.start()
    try:
        wait_until(lambda: cpu_standing(daemon, pool, sandbox_id) in demoted,
                   "the busy run's sandbox demoted", timeout_s=10)
    finally:
        busy.join()
    assert answers[0]["exit_code"] == 0
    assert cpu_standing(daemon, pool, sandbox_id) in ordinary
    assert run(client, session, "print(2)")["stdout"] == "2\n"


# --- ends ---------------------------------------------------------------------------


@pytest.mark.parametrize("pool", TIERS)
def test_a_run_that_times_out_ends_the_session(
    client: Client, pool: str, document: dict[str, Any]
) -> None:
    session = create(client, pool)
    run(client, session, "x = 1")
    answer = run(client, session, "import time\ntime.sleep(30)", timeout_s=1)
    assert answer["timed_out"] is True
    error = refused(client, "POST", f"/v1/sessions/{session}/run", {"code": "print(x)"}, 410,
                    "session_ended", document, "/v1/sessions/{session_id}/run")
    assert error["error"]["reason"] == "timed_out"
    assert client.request("DELETE", f"/v1/sessions/{session}")["ended"] == "timed_out"


def test_an_oom_kill_ends_the_session(client: Client, document: dict[str, Any]) -> None:
    session = create(client, "python-process")
    answer = run(client, session, "blocks = []\nwhile True: blocks.append(bytearray(16 << 20))",
                 timeout_s=15)
    assert_out_of_memory(answer, "python-process")
    error = refused(client, "GET", f"/v1/sessions/{session}", None, 410, "session_ended",
                    document, "/v1/sessions/{session_id}")
    assert error["error"]["reason"] == "oom_killed"


@pytest.mark.parametrize("pool", TIERS)
def test_an_interpreter_that_exits_ends_the_session_and_nothing_later_runs(
    client: Client, pool: str
) -> None:
    session = create(client, pool)
    assert run(client, session, "import os\nos._exit(3)")["exit_code"] == 3
    with pytest.raises(ApiError) as ended:
        run(client, session, "open('/sandbox/ran', 'w')")
    assert (ended.value.status, ended.value.code) == (410, "session_ended")


def test_idle_timeout_and_ttl_end_sessions_and_destroy_their_sandboxes(client: Client) -> None:
    idle = create(client, "python-fork", ttl_s=30, idle_timeout_s=1)
    expiring = create(client, "python-fork", ttl_s=2, idle_timeout_s=2)
    run(client, expiring, "x = 1")  # a run resets the idle timer, not the ttl
    wait_until(lambda: pool_counts(client, "python-fork")[1] == 0, "both sessions ended",
               timeout_s=15)
    reasons = {session: client.request("DELETE", f"/v1/sessions/{session}")["ended"]
               for session in (idle, expiring)}
    assert reasons == {idle: "idle", expiring: "expired"}


def test_delete_ends_a_session_at_once_and_is_idempotent(client: Client) -> None:
    session = create(client, "python")
    assert client.request("DELETE", f"/v1/sessions/{session}")["ended"] == "deleted"
    assert client.request("DELETE", f"/v1/sessions/{session}")["ended"] == "deleted"
    assert client.request("GET", "/v1/sessions")["sessions"] == []


# --- ownership ----------------------------------------------------------------------


def as_nobody(socket_path: str, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """One request on the socket from uid 65534, with the system Python (no repo import)."""
    script = textwrap.dedent(f"""\
        import json, socket
        s = socket.socket(socket.AF_UNIX)
        s.connect({socket_path!r})
        s.sendall(b"{method} {path} HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 0\\r\\n"
                  b"Connection: close\\r\\n\\r\\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        head, body = data.split(b"\\r\\n\\r\\n", 1)
        print(json.dumps([int(head.split()[1]), json.loads(body)]))
    """)
    done = subprocess.run(["/usr/bin/python3", "-c", script], user=65534, group=65534,
                          capture_output=True, text=True, timeout=30, cwd="/")
    assert done.returncode == 0, done.stderr
    status, body = json.loads(done.stdout)
    return status, body


def test_another_callers_id_is_refused_as_unknown(daemon: Daemon, client: Client) -> None:
    session = create(client, "python-process")
    run(client, session, "x = 1")
    for method, path in (("GET", f"/v1/sessions/{session}"),
                         ("POST", f"/v1/sessions/{session}/run"),
                         ("DELETE", f"/v1/sessions/{session}")):
        status, body = as_nobody(daemon.socket, method, path)
        assert (status, body["error"]["code"]) == (404, "session_not_found"), (method, body)
    status, body = as_nobody(daemon.socket, "GET", "/v1/sessions")
    assert (status, body) == (200, {"sessions": []})
    # Untouched for its owner.
    assert run(client, session, "print(x)")["stdout"] == "1\n"
    unknown = "s-" + "A" * 43
    status, body = as_nobody(daemon.socket, "GET", f"/v1/sessions/{unknown}")
    assert (status, body["error"]["code"]) == (404, "session_not_found")


def test_ids_are_long_and_random(client: Client) -> None:
    ids = [create(client, "python-process") for _ in range(2)]
    assert len(set(ids)) == 2
    assert all(len(i) >= 2 + 43 for i in ids)  # "s-" and 32 bytes of base64


# --- limits -------------------------------------------------------------------------


def test_each_limit_answers_with_its_code(
    client: Client, document: dict[str, Any]
) -> None:
    create_path = "/v1/sessions"
    refused(client, "POST", create_path, {"pool": "python-wasm"}, 400, "sessions_unsupported",
            document, create_path)
    refused(client, "POST", create_path, {"pool": "python", "ttl_s": 7200}, 400,
            "invalid_session", document, create_path)
    refused(client, "POST", create_path, {"pool": "python", "ttl_s": 10, "idle_timeout_s": 20},
            400, "invalid_session", document, create_path)
    first = create(client, "python-process")
    create(client, "python-process")
    answer = refused(client, "POST", create_path, {"pool": "python-process"}, 503,
                     "session_limit", document, create_path)
    assert "max_sessions" in answer["error"]["message"]
    create(client, "big")  # 3 sessions: this caller's maximum, 656 MiB of the 700
    refused(client, "POST", create_path, {"pool": "python"}, 429, "too_many_sessions",
            document, create_path)
    client.request("DELETE", f"/v1/sessions/{first}")
    refused(client, "POST", create_path, {"pool": "big"}, 503, "session_memory", document,
            create_path)
    status, _ = client.request_raw("POST", create_path, {"pool": "python"})
    assert status == 201  # 128 MiB more still fits


def test_one_run_at_a_time(client: Client, document: dict[str, Any]) -> None:
    session = create(client, "python-process")
    def run_slowly() -> None:
        with Client(client.socket_path, timeout_s=60) as other:
            run(other, session, "import time\ntime.sleep(2)")

    slow = threading.Thread(target=run_slowly)
    slow.start()
    try:
        wait_until(lambda: client.request("GET", f"/v1/sessions/{session}")["busy"],
                   "the first run in flight")
        refused(client, "POST", f"/v1/sessions/{session}/run", {"code": "1"}, 409,
                "session_busy", document, "/v1/sessions/{session_id}/run")
    finally:
        slow.join()
    assert run(client, session, "print('after')")["stdout"] == "after\n"


def test_a_session_run_takes_no_pool(client: Client, document: dict[str, Any]) -> None:
    session = create(client, "python-process")
    refused(client, "POST", f"/v1/sessions/{session}/run", {"code": "1", "pool": "python"},
            400, "unknown_field", document, "/v1/sessions/{session_id}/run")


# --- observability ------------------------------------------------------------------


def test_sessions_are_counted_and_logged_with_their_id(daemon: Daemon, client: Client) -> None:
    session = create(client, "python-fork")
    run(client, session, "1")
    run(client, session, "2")
    metrics = client.request_raw("GET", "/metrics")[1].decode()
    assert metric_sample(metrics, "sandpool_sessions_active", pool="python-fork") == 1
    before = metric_sample(metrics, "sandpool_sessions_ended_total", pool="python-fork",
                           reason="deleted")
    client.request("DELETE", f"/v1/sessions/{session}")
    metrics = client.request_raw("GET", "/metrics")[1].decode()
    assert metric_sample(metrics, "sandpool_sessions_active", pool="python-fork") == 0
    assert metric_sample(metrics, "sandpool_sessions_ended_total", pool="python-fork",
                         reason="deleted") == before + 1
    assert metric_sample(metrics, "sandpool_session_runs_count", pool="python-fork") >= 1
    wait_until(lambda: any(e.get("event") == "session_ended" and e.get("session") == session
                           for e in daemon.log_events()), "the session's end logged")
    lines = [e for e in daemon.log_events() if e.get("session") == session]
    assert {e["event"] for e in lines} >= {"session_created", "request", "session_ended"}


# --- daemon stops -------------------------------------------------------------------


SMALL = f"""
[server]
metrics_address = "off"
shutdown_timeout_s = 5
sandbox_uid_base = {SMALL_UIDS[0]}
sandbox_uid_count = {SMALL_UIDS[1]}

[pools.python]
min_idle = 1
max_size = 2

[pools.python-process]
backend = "process"
min_idle = 1
max_size = 2

[pools.python-fork]
backend = "fork"
min_idle = 1
max_size = 2
"""


def open_sessions(daemon: Daemon) -> None:
    with daemon.client() as client:
        for pool in TIERS:
            session = create(client, pool)
            run(client, session, "import subprocess\np = subprocess.Popen(['sleep', '300'])")


def test_sigterm_destroys_every_session(tmp_path: Path) -> None:
    daemon = start_daemon(tmp_path, SMALL)
    try:
        open_sessions(daemon)
    finally:
        stop_daemon(daemon)  # asserts no container of it is left
    no_sandbox_process_left(*SMALL_UIDS)
    ended = [e for e in daemon.log_events()
             if e.get("event") == "session_ended" and e.get("reason") == "shutdown"]
    assert len(ended) == len(TIERS)


def test_sigkill_then_restart_leaves_no_session_sandbox(tmp_path: Path) -> None:
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = start_daemon(tmp_path / "first", SMALL)
    try:
        open_sessions(first)
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()
    # bwrap and the fork template die with their parent; containers outlive it
    # until the next daemon's start-up reaps them.
    second = start_daemon(tmp_path / "second", SMALL)
    try:
        wait_until(lambda: docker_containers(f"sandpool.instance={first.instance_id}") == [],
                   "the dead daemon's containers removed")
        with second.client() as client:
            assert client.request("GET", "/v1/sessions")["sessions"] == []
    finally:
        stop_daemon(second)
    # Whatever of the first daemon's sessions had outlived it would still be here
    # (a process SIGKILLed a moment ago may take that moment to be reaped).
    no_sandbox_process_left(*SMALL_UIDS)


def no_sandbox_process_left(base: int, count: int) -> None:
    try:
        wait_until(lambda: processes_in_uid_range(base, count) == [],
                   "no process of a sandbox uid", timeout_s=10)
    except AssertionError:
        left = describe(processes_in_uid_range(base, count))
        raise AssertionError(f"processes of sandbox uids left: {left}") from None


def describe(pids: list[int]) -> list[str]:
    described = []
    for pid in pids:
        try:
            status = dict(line.split(":\t", 1) for line in
                          Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        described.append(f"{pid} {status.get('State')} ppid={status.get('PPid')} "
                         f"uid={status.get('Uid')} {cmdline!r}")
    return described
