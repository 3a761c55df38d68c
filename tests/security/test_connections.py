"""Connections cannot exhaust the daemon: caps, header and idle timeouts, the peer check.

Each test attacks a real daemon (``python -m api.cli serve``) over its real Unix
socket and metrics port, from clients running as other uids where the peer
matters, and checks what the attacker is denied: descriptors in the daemon
(``/proc/PID/fd``), answers to other clients, lines in the log.

The daemons here run a ``fake`` pool unless the test runs code: the gate sits in
front of the HTTP server and never sees a backend, and a fake pool starts in
milliseconds and holds no descriptors of its own that would blur the counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from api.client import Client
from tests.support import Daemon, free_port, metric_sample, start_daemon, stop_daemon
from tests.support import scrape as scrape_tcp

Spawn = Callable[..., Daemon]
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other uids")
# Descriptors the daemon may open on its own between two counts (a log line, a
# /proc read by the metrics collector, a sandbox's pipes).
FD_SLACK = 12

FAKE_POOL = """
[pools.f]
backend = "fake"
min_idle = 1
max_size = 2
"""

# Python starts as root (its files are private to root here), imports, then becomes UID.
DROP_TO = """
import os, socket, sys, time
uid = int(sys.argv[1])
if uid:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
"""
# As UID, holds COUNT connections to ADDRESS ("unix:PATH" or "tcp:HOST:PORT")
# until stdin closes, and prints how many connect() calls succeeded.
HOLDER = DROP_TO + """
address, count = sys.argv[2], int(sys.argv[3])
held = []
deadline = time.monotonic() + 30
for _ in range(count):
    if address.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        while True:
            try:
                s.connect(address[5:])
                break
            except BlockingIOError:  # the listen backlog is full until the daemon accepts
                assert time.monotonic() < deadline
                time.sleep(0.01)
    else:
        host, port = address[4:].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=10)
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"""




def open_fds(daemon: Daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.process.pid}/fd"))


class Holders:
    """Processes holding idle connections; all are ended by close()."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[str]] = []

    def hold(self, address: str, count: int, uid: int = 0) -> int:
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", HOLDER, str(uid), address, str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == str(count), f"holder could not connect: {line!r}"
        return count

    def close(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.close()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            assert process.stdout is not None
            process.stdout.close()
        self.processes.clear()


@pytest.fixture
def holders() -> Iterator[Holders]:
    running = Holders()
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def spawn_shared_daemon() -> Iterator[Callable[[str], Daemon]]:
    """Daemons whose socket other uids can reach: not under pytest's private tmp."""
    started: list[tuple[Daemon, Path]] = []

    def spawn(config: str) -> Daemon:
        shared = Path(tempfile.mkdtemp(prefix="sandpool-conn-"))
        shared.chmod(0o755)
        try:
            started.append((start_daemon(shared, config), shared))
        except BaseException:
            shutil.rmtree(shared)
            raise
        return started[-1][0]

    try:
        yield spawn
    finally:
        for daemon, shared in started:
            try:
                stop_daemon(daemon)
            finally:
                shutil.rmtree(shared)


def scrape(daemon: Daemon, port: int | None = None) -> str:
    """/metrics over TCP when ``port`` is given (the socket may be full), else the socket."""
    if port is not None:
        return scrape_tcp(f"http://127.0.0.1:{port}/metrics")
    with daemon.client() as client:
        status, body = client.request_raw("GET", "/metrics")
    assert status == 200
    return body.decode()


def settle(daemon: Daemon, listener: str, attempts: int, *, before: float = 0.0,
           held_before: float = 0.0, port: int | None = None, timeout_s: float = 20) -> float:
    """Wait until the daemon has admitted or refused ``attempts`` more connections.

    Returns how many connections it holds open in all. ``before`` and
    ``held_before`` are the refused and open counts before the attack; a
    scrape's own connection is not counted.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        text = scrape(daemon, port)
        held = metric_sample(text, "sandpool_connections_open", listener=listener)
        if listener == ("metrics" if port is not None else "api"):
            held -= 1  # the scrape itself
        refused = sum(
            metric_sample(text, "sandpool_connections_refused_total", listener=listener,
                          reason=reason)
            for reason in ("too_many_connections", "too_many_connections_from_peer",
                           "forbidden")
        ) - before
        if held - held_before + refused >= attempts:
            return held
        assert time.monotonic() < deadline, (held, refused, attempts)
        time.sleep(0.05)


def refused_so_far(daemon: Daemon, listener: str, port: int | None = None) -> float:
    text = scrape(daemon, port)
    return sum(
        metric_sample(text, "sandpool_connections_refused_total", listener=listener,
                      reason=reason)
        for reason in ("too_many_connections", "too_many_connections_from_peer", "forbidden")
    )


def raw_exchange(address: str, request: bytes, timeout_s: float = 10) -> bytes:
    """Send ``request`` on a new connection and read until the daemon closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout_s)
        conn.connect(address)
        with contextlib.suppress(BrokenPipeError):  # closed at accept: its answer is readable
            conn.sendall(request)
        return wait_closed(conn, timeout_s)


def wait_closed(conn: socket.socket, timeout_s: float = 10) -> bytes:
    """What the daemon sent before closing ``conn``; fails if it is still open after timeout_s."""
    conn.settimeout(timeout_s)
    received = b""
    try:
        while chunk := conn.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the daemon kept the connection open {timeout_s} s")
    return received


CAPS = """
[server]
metrics_address = "127.0.0.1:{port}"
socket_mode = 0o666
max_connections = 100
max_connections_per_peer = 40
metrics_max_connections = 8
metrics_max_connections_per_peer = 8
# Long, so that only the caps are under test here.
header_timeout_s = 60
keepalive_timeout_s = 60

[pools.p]
backend = "process"
min_idle = 1
max_size = 2
timeout_s = 10
"""


@needs_root
@pytest.mark.timeout(180)
def test_idle_connections_of_one_uid_leave_the_api_to_others(
    spawn_shared_daemon: Callable[[str], Daemon], holders: Holders
) -> None:
    port = free_port()
    daemon = spawn_shared_daemon(CAPS.format(port=port))
    baseline = open_fds(daemon)
    address = f"unix:{daemon.socket}"

    # One uid opens 300 idle connections: it keeps its share (40), no more.
    attempts = holders.hold(address, 300, uid=NOBODY)
    assert settle(daemon, "api", attempts, port=port) == 40
    assert open_fds(daemon) <= baseline + 40 + FD_SLACK
    with daemon.client() as client:  # another uid (root) is served as usual
        assert client.request("GET", "/healthz") == {"status": "ok"}
        assert client.run("print(6 * 7)", pool="p")["stdout"] == "42\n"

    # More uids, each at its share: together they meet the listener's cap (100).
    before = refused_so_far(daemon, "api", port)
    attempts = holders.hold(address, 100, uid=NOBODY - 1) + holders.hold(
        address, 100, uid=NOBODY - 2)
    assert settle(daemon, "api", attempts, before=before, held_before=40, port=port) == 100
    assert open_fds(daemon) <= baseline + 100 + FD_SLACK
    # Now everyone else is turned away at once, with a stable code, not left hanging.
    answer = raw_exchange(daemon.socket, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 ")
    assert b'"code": "too_many_connections"' in answer

    holders.close()  # the slots come back
    deadline = time.monotonic() + 20
    while b"200 OK" not in raw_exchange(daemon.socket, b"GET /healthz HTTP/1.1\r\n"
                                        b"Host: x\r\nConnection: close\r\n\r\n"):
        assert time.monotonic() < deadline, "the daemon did not take connections again"
        time.sleep(0.1)
    with daemon.client() as client:
        assert client.run("print(1)", pool="p")["stdout"] == "1\n"


def test_metrics_port_connections_are_capped_apart_from_the_api(
    spawn_daemon: Spawn, holders: Holders
) -> None:
    port = free_port()
    daemon = spawn_daemon(CAPS.format(port=port).replace('backend = "process"',
                                                         'backend = "fake"'))
    baseline = open_fds(daemon)
    attempts = holders.hold(f"tcp:127.0.0.1:{port}", 200)
    assert settle(daemon, "metrics", attempts) == 8
    # A scrape now is turned away: 503, or a reset if the close won the race.
    with pytest.raises((urllib.error.HTTPError, ConnectionResetError)) as turned_away:
        scrape(daemon, port)
    if isinstance(turned_away.value, urllib.error.HTTPError):
        turned_away.value.close()
        assert turned_away.value.code == 503
    assert open_fds(daemon) <= baseline + 8 + FD_SLACK
    with daemon.client() as client:
        assert client.request("GET", "/healthz") == {"status": "ok"}
        assert client.run("hello", pool="p")["stdout"] == "hello"


HEADER = """
[server]
metrics_address = "127.0.0.1:{port}"
header_timeout_s = 1
# Far beyond the tests' waits: only the header timeout can close these.
keepalive_timeout_s = 60
""" + FAKE_POOL


def test_a_silent_connection_is_closed_after_the_header_timeout(spawn_daemon: Spawn) -> None:
    port = free_port()
    daemon = spawn_daemon(HEADER.format(port=port))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(daemon.socket)
        assert wait_closed(silent) == b""
    with socket.create_connection(("127.0.0.1", port)) as silent_tcp:
        assert wait_closed(silent_tcp) == b""


def test_a_dribbled_request_head_is_cut_off(spawn_daemon: Spawn) -> None:
    daemon = spawn_daemon(HEADER.format(port=free_port()))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.connect(daemon.socket)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + 10
        closed = False
        while not closed:  # one header byte every 0.2 s, never the blank line
            assert time.monotonic() < deadline, "the daemon kept reading the head for 10 s"
            try:
                slow.sendall(b"X-Slow: a\r\n" if int(time.monotonic() * 5) % 2 else b"X")
                time.sleep(0.2)
                slow.setblocking(False)
                try:
                    closed = slow.recv(65536) == b""
                except BlockingIOError:
                    pass
                finally:
                    slow.setblocking(True)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
    # A complete request on time is answered; a client that keeps its
    # connection after it is not cut off by the header timer.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as prompt:
        prompt.connect(daemon.socket)
        prompt.sendall(b"POST /v1/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 50\r\n\r\n")
        time.sleep(1.5)  # past the header timeout, within body_timeout_s
        prompt.sendall(b'{"code": "sleep 0.1", "pool": "f"}'.ljust(50))
        prompt.settimeout(10)
        assert prompt.recv(65536).startswith(b"HTTP/1.1 200 ")


def test_malformed_requests_get_400_and_one_log_line(spawn_daemon: Spawn) -> None:
    port = free_port()
    daemon = spawn_daemon(HEADER.format(port=port))
    log_lines = len(daemon.log_path.read_text().splitlines())
    for number in range(60):  # any local user can send these to the metrics port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nBad Header\r\n\r\n" if number % 2
                         else b"GET /metrics HTTP/1.1\r\nContent-Length: x\r\n\r\n")
            assert wait_closed(conn).startswith(b"HTTP/1.0 400 Bad Request")
    new_lines = daemon.log_path.read_text().splitlines()[log_lines:]
    assert len(new_lines) <= 2, new_lines  # not a traceback per request
    events = [json.loads(line) for line in new_lines]  # still one JSON object a line
    assert events[0]["event"] == "http_error"
    assert events[0]["error"].startswith("BadHttpMessage: ")


def test_an_idle_keepalive_connection_is_closed(spawn_daemon: Spawn) -> None:
    daemon = spawn_daemon("""
        [server]
        metrics_address = "off"
        header_timeout_s = 1
        keepalive_timeout_s = 2
        """ + FAKE_POOL)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(daemon.socket)
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = wait_closed(idle)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"Connection: close" not in answer  # kept alive, then closed when idle
    with Client(daemon.socket, timeout_s=10) as client:  # the client reconnects by itself
        assert client.request("GET", "/healthz") == {"status": "ok"}
        time.sleep(3)
        assert client.request("GET", "/healthz") == {"status": "ok"}


REFUSING = """
[server]
metrics_address = "off"
socket_mode = 0o666
allowed_uids = [4242]
""" + FAKE_POOL

PROBE = DROP_TO + """
path = sys.argv[2]
for request in sys.argv[3:]:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(path)
    try:
        conn.sendall(request.encode())
    except BrokenPipeError:
        pass
    answer = b""
    try:
        while chunk := conn.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    print(repr(answer), flush=True)
"""


@needs_root
def test_a_refused_uid_gets_nothing_and_holds_nothing(
    spawn_shared_daemon: Callable[[str], Daemon], holders: Holders
) -> None:
    daemon = spawn_shared_daemon(REFUSING)
    run = '{"code": "leak", "pool": "f"}'
    requests = [
        "GET /v1/pools HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "POST /v1/run HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(run)}\r\n\r\n{run}",
    ]
    done = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, str(NOBODY), daemon.socket, *requests],
        capture_output=True, text=True, timeout=60,
    )
    answers = done.stdout.splitlines()
    assert len(answers) == len(requests), done.stderr
    for answer in answers:
        # 403 forbidden at accept (or only a reset if the close won the race):
        # never a pool name, a metric or a run.
        assert answer == "b''" or answer.startswith("b'HTTP/1.1 403 Forbidden"), answer
        assert "forbidden" in answer or answer == "b''"
        for secret in ('"f"', "sandpool_", "leak"):
            assert secret not in answer
    assert answers[0].startswith("b'HTTP/1.1 403")  # at least the first says why

    # 300 idle connections cost the daemon nothing it keeps, and the log one line.
    baseline = open_fds(daemon)
    log_lines = len(daemon.log_path.read_text().splitlines())
    attempts = holders.hold(f"unix:{daemon.socket}", 300, uid=NOBODY)
    assert settle(daemon, "api", attempts, before=len(requests)) == 0
    assert open_fds(daemon) <= baseline + FD_SLACK
    new_lines = daemon.log_path.read_text().splitlines()[log_lines:]
    assert len(new_lines) <= 2, new_lines
    with daemon.client() as client:  # root always passes
        assert client.run("still here", pool="f")["stdout"] == "still here"


@pytest.mark.timeout(120)
def test_accept_errors_are_logged_once_and_accepting_resumes(
    spawn_daemon: Spawn, holders: Holders
) -> None:
    daemon = spawn_daemon("""
        [server]
        metrics_address = "off"
        header_timeout_s = 60
        keepalive_timeout_s = 60
        """ + FAKE_POOL)
    pid = daemon.process.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    log_lines = len(daemon.log_path.read_text().splitlines())
    # Room for ten connections, then accept() fails with EMFILE.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(daemon) + 10, limits[1]))
    try:
        holders.hold(f"unix:{daemon.socket}", 60)
        time.sleep(3.5)  # asyncio retries the accept every second
        holders.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        # The pending connections are taken and dropped; the daemon answers again.
        deadline = time.monotonic() + 20
        while b"200 OK" not in raw_exchange(daemon.socket, b"GET /healthz HTTP/1.1\r\n"
                                            b"Host: x\r\nConnection: close\r\n\r\n"):
            assert time.monotonic() < deadline, "the daemon did not accept again"
            time.sleep(0.2)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
    new_lines = daemon.log_path.read_text().splitlines()[log_lines:]
    assert "Traceback" not in "\n".join(new_lines)
    errors = [line for line in new_lines if "event_loop_resource_error" in line]
    assert 1 <= len(errors) <= 2, new_lines
    assert re.search(r'"error": "EMFILE"', errors[0])
