"""Shared fixtures: a real sandpool daemon on a real Unix socket, with real dockerd.

The daemon runs as a subprocess (``python -m api.cli serve``), exactly as users
start it. Its containers carry ``sandpool.instance=<id>``; after the session the
fixture stops the daemon with SIGTERM and asserts that none of them is left.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from api.client import ApiError, Client

DAEMON_CONFIG = """
[server]
metrics_address = "off"
max_request_bytes = 262144
shutdown_timeout_s = 10

[pools.python]
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20
acquire_timeout_s = 30

[pools.shell]
language = "shell"
min_idle = 1
max_size = 2
timeout_s = 5

[pools.python-process]
backend = "process"
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20

[pools.python-wasm]
backend = "wasm"
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20

[pools.tiny]
min_idle = 0
max_size = 1
max_queue = 1
acquire_timeout_s = 5
max_output_bytes = 4096
"""


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    socket: str
    log_path: Path
    instance_id: str

    def client(self) -> Client:
        return Client(self.socket, timeout_s=60)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def log_events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]


def docker_containers(label: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={label}"],
        check=True, capture_output=True, text=True, timeout=30,
    )
    return out.stdout.split()


def wait_ready(daemon: Daemon, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise AssertionError(f"daemon exited early:\n{daemon.log_path.read_text()}")
        try:
            with daemon.client() as client:
                pools = client.pools()
            if all(p["idle"] >= p["min_idle"] for p in pools):
                return
        except ApiError:
            pass
        time.sleep(0.1)
    raise AssertionError("daemon did not become ready")


def start_daemon(
    tmp: Path,
    config: str = DAEMON_CONFIG,
    env: dict[str, str] | None = None,
    command_prefix: Sequence[str] = (),
) -> Daemon:
    """Start ``python -m api.cli serve`` in ``tmp`` and wait until its pools are warm.

    ``command_prefix`` runs the daemon under another command (e.g. ``setpriv``
    to run it as another user); ``process.pid`` is then that command's, which
    must exec the daemon.
    """
    config_path = tmp / "sandpool.toml"
    config_path.write_text(textwrap.dedent(config))
    socket_path = tmp / "sandpool.sock"
    log_path = tmp / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*command_prefix, sys.executable, "-m", "api.cli", "serve",
             "--config", str(config_path), "--socket", str(socket_path), "--log-format", "json"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
    daemon = Daemon(process, str(socket_path), log_path, instance_id="")
    deadline = time.monotonic() + 60
    while not daemon.instance_id and time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"daemon exited early:\n{log_path.read_text()}")
        for event in daemon.log_events() if log_path.stat().st_size else []:
            if "instance" in event:
                daemon.instance_id = str(event["instance"])
        time.sleep(0.05)
    wait_ready(daemon)
    return daemon


def stop_daemon(daemon: Daemon) -> None:
    """SIGTERM, expect exit 0, and assert the daemon left no container behind."""
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            code = daemon.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
            raise AssertionError("daemon did not stop within 60 s of SIGTERM") from None
        assert code == 0, daemon.log_path.read_text()[-4000:]
    leftovers = docker_containers(f"sandpool.instance={daemon.instance_id}")
    if leftovers:
        subprocess.run(["docker", "rm", "-f", *leftovers], capture_output=True, timeout=60)
    assert leftovers == [], f"containers left behind: {leftovers}"
    assert not os.path.exists(daemon.socket), "socket file left behind"


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = start_daemon(tmp_path_factory.mktemp("daemon"))
    try:
        yield running
    finally:
        stop_daemon(running)


@pytest.fixture
def spawn_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start dedicated daemons; each is stopped (and checked for leaks) even if the test fails."""
    started: list[Daemon] = []

    def spawn(
        config: str = DAEMON_CONFIG,
        env: dict[str, str] | None = None,
        command_prefix: Sequence[str] = (),
    ) -> Daemon:
        directory = tmp_path / f"daemon{len(started)}"
        directory.mkdir()
        started.append(start_daemon(directory, config, env, command_prefix))
        return started[-1]

    yield spawn
    for running in started:
        stop_daemon(running)


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture
def sandboxed(client: Client, request: pytest.FixtureRequest) -> Iterator[Client]:
    """The daemon's client; after the test, the test module's ``POOL`` must still answer."""
    yield client
    answer = client.run("print('serving')", pool=request.module.POOL)
    assert answer["stdout"] == "serving\n"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout_s:g} s: {what}")
        time.sleep(0.05)


def host_processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains the marker (sandboxed ones included)."""
    needle = marker.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue  # exited while we looked
    return found
