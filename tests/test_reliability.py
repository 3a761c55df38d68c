"""Faults and lifecycle: drain, disconnects, dead sandboxes, crashed daemons, access control.

Each test starts its own daemon (conftest's spawn_daemon stops it even on failure) so it can
kill, signal or starve it without touching the shared one.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from api.client import ApiError
from tests.support import (
    Daemon,
    daemon_cgroups,
    docker_containers,
    metric_sample,
    restart_dockerd,
    start_daemon,
    stop_daemon,
    wait_until,
)

Spawn = Callable[..., Daemon]

ONE_POOL = """
[server]
metrics_address = "off"
shutdown_timeout_s = {shutdown}
body_timeout_s = 1
socket_mode = 0o666
allowed_uids = [4242]
[pools.p]
min_idle = {min_idle}
max_size = 2
timeout_s = 30
"""


def one_pool(min_idle: int = 1, shutdown: float = 10) -> str:
    return ONE_POOL.format(min_idle=min_idle, shutdown=shutdown)


def pool_containers(daemon: Daemon) -> list[str]:
    return docker_containers(f"sandpool.instance={daemon.instance_id}")


def send_run(daemon: Daemon, body: dict[str, Any]) -> socket.socket:
    """Send a run request on a raw connection and return it without reading."""
    payload = json.dumps({"pool": "p", **body}).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(daemon.socket)
    conn.sendall(
        b"POST /v1/run HTTP/1.1\r\nHost: sandpool\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    return conn


def read_response(conn: socket.socket, timeout_s: float = 60) -> tuple[int, dict[str, Any]]:
    conn.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    conn.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def busy(daemon: Daemon) -> int:
    with daemon.client() as client:
        return int(next(p for p in client.pools() if p["name"] == "p")["busy"])


def queue_length(daemon: Daemon) -> int:
    with daemon.client() as client:
        metrics = client.request_raw("GET", "/metrics")[1].decode()
    return int(metric_sample(metrics, "sandpool_queue_waiters", pool="p"))


def test_drain_lets_a_run_in_flight_finish(spawn_daemon: Spawn) -> None:
    daemon = spawn_daemon(one_pool())
    conn = send_run(daemon, {"code": "import time; time.sleep(1.5); print('done')"})
    wait_until(lambda: busy(daemon) == 1, "the run to start")
    daemon.process.send_signal(signal.SIGTERM)
    status, body = read_response(conn)
    assert (status, body["stdout"]) == (200, "done\n")
    stop_daemon(daemon)  # exit 0, no container, no socket file


def test_drain_timeout_stops_the_run_with_a_clear_error(spawn_daemon: Spawn) -> None:
    """A run the drain cuts had begun: 500 run_interrupted, never the 503 that proxies and
    clients send again; a request still queued for a sandbox ran nothing: 503."""
    daemon = spawn_daemon(one_pool(shutdown=1))
    running = [send_run(daemon, {"code": "import time; time.sleep(60)"}) for _ in range(2)]
    wait_until(lambda: busy(daemon) == 2, "both runs to start")
    queued = send_run(daemon, {"code": "open('/sandbox/ran', 'w')"})
    wait_until(lambda: queue_length(daemon) == 1, "the third request to queue")
    daemon.process.send_signal(signal.SIGTERM)
    for conn in running:
        status, body = read_response(conn)
        assert (status, body["error"]["code"]) == (500, "run_interrupted")
    status, body = read_response(queued)
    assert (status, body["error"]["code"]) == (503, "shutting_down")
    assert daemon.process.wait(timeout=30) == 0
    stop_daemon(daemon)


def test_second_signal_skips_the_drain(spawn_daemon: Spawn) -> None:
    daemon = spawn_daemon(one_pool(shutdown=60))
    conn = send_run(daemon, {"code": "import time; time.sleep(60)"})
    wait_until(lambda: busy(daemon) == 1, "the run to start")
    daemon.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    daemon.process.send_signal(signal.SIGINT)
    status, body = read_response(conn, timeout_s=20)
    assert (status, body["error"]["code"]) == (500, "run_interrupted")
    assert daemon.process.wait(timeout=20) == 0
    stop_daemon(daemon)


def test_client_gone_mid_run_destroys_the_sandbox(spawn_daemon: Spawn) -> None:
    daemon = spawn_daemon(one_pool(min_idle=0))
    try:
        conn = send_run(daemon, {"code": "import time; time.sleep(60)"})
        wait_until(lambda: busy(daemon) == 1, "the run to start")
        assert len(pool_containers(daemon)) == 1
        conn.close()
        # min_idle is 0: once the abandoned sandbox is destroyed, nothing is left.
        wait_until(lambda: pool_containers(daemon) == [], "destruction", timeout_s=15)
        with daemon.client() as client:
            assert client.run("print('next')", pool="p")["stdout"] == "next\n"
    finally:
        stop_daemon(daemon)


def test_sigkilled_daemon_leaves_nothing_after_the_next_start(spawn_daemon: Spawn) -> None:
    crashed = spawn_daemon(one_pool(min_idle=2))
    orphans = pool_containers(crashed)
    assert orphans, "a warm daemon has containers"
    crashed.process.kill()
    crashed.process.wait()
    assert pool_containers(crashed) == orphans  # SIGKILL ran no clean-up
    # As root, the daemon's cgroups and its pool's (pool/backends/docker/cgroup.py).
    cgroups = daemon_cgroups(crashed.process.pid)
    assert bool(cgroups) == (os.geteuid() == 0), cgroups
    successor = spawn_daemon(one_pool())
    try:
        assert pool_containers(crashed) == []  # reaped at start-up
        assert daemon_cgroups(crashed.process.pid) == []  # then swept, in every hierarchy
    finally:
        stop_daemon(successor)
    os.unlink(crashed.socket)  # what a SIGKILLed daemon leaves; the successor used another


def test_another_live_daemon_is_not_reaped(daemon: Daemon, spawn_daemon: Spawn) -> None:
    before = set(pool_containers(daemon))
    assert before
    other = spawn_daemon(one_pool())
    try:
        assert before <= set(pool_containers(daemon)) | set(docker_containers("sandpool.pool"))
        with daemon.client() as client:
            assert client.run("print('alive')")["stdout"] == "alive\n"
    finally:
        stop_daemon(other)


def test_killed_idle_containers_are_replaced_never_handed_out(spawn_daemon: Spawn) -> None:
    daemon = spawn_daemon(one_pool(min_idle=2))
    try:
        victims = pool_containers(daemon)
        subprocess.run(["docker", "kill", *victims], check=True, capture_output=True, timeout=60)
        with daemon.client() as client:
            for _ in range(4):
                result = client.run("print('fresh')", pool="p")
                assert result["stdout"] == "fresh\n"
        wait_until(lambda: len(set(pool_containers(daemon)) - set(victims)) >= 2,
                   "replacements")
    finally:
        stop_daemon(daemon)


def test_random_kills_under_load_every_request_answered(spawn_daemon: Spawn) -> None:
    daemon = spawn_daemon(one_pool(min_idle=2))
    stop = threading.Event()

    def killer() -> int:
        # Kills pooled containers: ones already running at the last look, so
        # mostly idle and busy ones rather than ones still starting.
        kills, seen_before = 0, set[str]()
        while not stop.wait(0.4):
            running = set(subprocess.run(
                ["docker", "ps", "-q", "--filter", f"label=sandpool.instance={daemon.instance_id}"],
                capture_output=True, text=True, timeout=30,
            ).stdout.split())
            pooled = sorted(running & seen_before)
            seen_before = running
            if pooled:
                subprocess.run(["docker", "kill", random.choice(pooled)], capture_output=True,
                               timeout=30)
                kills += 1
        return kills

    def load(worker: int) -> list[tuple[str, dict[str, Any]]]:
        answers = []
        with daemon.client() as client:
            for i in itertools.count():
                if stop.is_set():
                    return answers
                expected = f"{worker}-{i}\n"
                try:
                    answers.append((expected, client.run(
                        f"import time; time.sleep(0.1); print('{expected.strip()}')", pool="p")))
                except ApiError as e:
                    answers.append((expected, {"refused": e.code, "status": e.status}))
                stop.wait(0.8)  # steady, not saturating: sandboxes sit idle to be killed
        return answers

    with ThreadPoolExecutor(4) as executor:
        killing = executor.submit(killer)
        loads = [executor.submit(load, worker) for worker in range(2)]
        time.sleep(12)
        stop.set()
        kills = killing.result()
        answers = [answer for future in loads for answer in future.result()]
    assert kills >= 3
    for expected, result in answers:
        # A request whose sandbox was killed mid-run gets a result saying so (its
        # output so far, Docker's exit status), or a clean 503; never a hang, a
        # 500, or someone else's output.
        if "refused" in result:
            assert result["status"] == 503, result
        else:
            assert result["stdout"] in (expected, ""), result
    served = sum("refused" not in r and r["stdout"] == expected for expected, r in answers)
    assert served >= 0.7 * len(answers), answers


def test_peer_not_in_allowed_uids_gets_403() -> None:  # its own socket dir, see below
    # The socket must be reachable by uid 65534, so not under pytest's private tmp.
    shared = Path(tempfile.mkdtemp(prefix="sandpool-peer-"))
    shared.chmod(0o755)
    daemon = start_daemon(shared, one_pool())
    try:
        code = textwrap.dedent(f"""
            import os, sys
            sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
            from api.client import ApiError, Client
            os.setgid(65534); os.setuid(65534)  # after the imports: root's home is private
            try:
                Client({daemon.socket!r}).run("print(1)")
            except ApiError as e:
                print(e.status, e.code)
        """)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60)
        assert done.stdout == "403 forbidden\n", done.stderr
        denied = [e for e in daemon.log_events() if e["event"] == "peer_denied"]
        assert denied[-1]["uid"] == 65534
        assert denied[-1]["gid"] == 65534
        assert isinstance(denied[-1]["pid"], int)
        with daemon.client() as client:  # root is always allowed
            assert client.run("print(1)", pool="p")["stdout"] == "1\n"
    finally:
        stop_daemon(daemon)
        shutil.rmtree(shared)


def test_a_client_stalling_mid_body_does_not_block_others(spawn_daemon: Spawn) -> None:
    daemon = spawn_daemon(one_pool())
    try:
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.connect(daemon.socket)
        stalled.sendall(b"POST /v1/run HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"code\": ")
        with daemon.client() as client:
            assert client.run("print('not blocked')", pool="p")["stdout"] == "not blocked\n"
        status, body = read_response(stalled, timeout_s=10)  # body_timeout_s = 1
        assert (status, body["error"]["code"]) == (400, "body_timeout")
    finally:
        stop_daemon(daemon)


@pytest.mark.timeout(300)
def test_docker_restart_fails_fast_then_recovers(spawn_daemon: Spawn) -> None:
    daemon = spawn_daemon(one_pool(min_idle=1))
    try:
        restart_dockerd(during=lambda: assert_fails_fast(daemon))
        with daemon.client() as client:
            wait_until(lambda: recovered(client), "the pool to recover", timeout_s=120)
            assert client.request("GET", "/readyz")["ready"] is True
    finally:
        stop_daemon(daemon)


def assert_fails_fast(daemon: Daemon) -> None:
    with daemon.client() as client:
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(ApiError) as caught:
                client.run("print(1)", pool="p")
            assert caught.value.status == 503, caught.value.message
            assert time.monotonic() - began < 15  # fails, not hangs to acquire_timeout_s
        with pytest.raises(ApiError) as caught:
            client.request("GET", "/readyz")
        assert caught.value.status == 503


def recovered(client: Any) -> bool:
    try:
        return bool(client.run("print('back')", pool="p")["stdout"] == "back\n")
    except ApiError:
        return False
