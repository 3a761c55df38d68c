"""A local user floods a daemon with idle connections: its fds, its log, root's /healthz.

    .venv/bin/python -m bench.connection_flood [--code-dir DIR] [--connections 3000]
                                               [--seconds 10] [--nofile 1024]

Starts a daemon from DIR (default: this tree; point it at a ``git archive`` of
an older commit to compare) with one ``fake`` pool and the metrics port on,
sets its RLIMIT_NOFILE to ``--nofile`` (a plain shell's soft limit), and has a
process running as uid 65534 open ``--connections`` idle connections (one in
six to the metrics port) and hold them. Each second, root sends ``GET
/healthz`` on a new connection. Prints one JSON object: the daemon's fds, the
answers root got, how much the log grew and how many tracebacks it holds.
Needs root. Method and results: docs/connections.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support import Daemon, free_port, start_daemon, terminate_daemon

NOBODY = 65534
CONFIG = """
[server]
metrics_address = "127.0.0.1:{port}"
socket_mode = 0o666

[pools.f]
backend = "fake"
min_idle = 1
max_size = 2
"""
# Imports first (the interpreter's files are root's), then uid 65534. Connects
# until COUNT or a refusal it cannot wait out, prints how many, holds them.
ATTACKER = r"""
import encodings.idna, os, socket, sys, time
os.setgroups([]); os.setgid(65534); os.setuid(65534)
path, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
deadline = time.monotonic() + 20
for number in range(count):
    try:
        if number % 6 == 5:
            conn = socket.socket()
            conn.settimeout(1)
            conn.connect(("127.0.0.1", port))
        else:
            conn = socket.socket(socket.AF_UNIX)
            conn.setblocking(False)
            while True:
                try:
                    conn.connect(path)
                    break
                except BlockingIOError:  # the backlog is full: the daemon does not accept
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
        held.append(conn)
    except OSError:
        break
print(len(held), flush=True)
sys.stdin.read()
"""


def healthz(path: str) -> tuple[str, float]:
    """Status line (or the error's name) and milliseconds of one /healthz on a new connection."""
    began = time.monotonic()
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(5)
            conn.connect(path)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status = conn.recv(4096).split(b"\r\n")[0].decode() or "closed"
    except OSError as e:
        status = type(e).__name__
    return status, round((time.monotonic() - began) * 1000, 2)


def flood(code_dir: Path, connections: int, seconds: int, nofile: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="sandpool-flood-"))
    work.chmod(0o755)  # uid 65534 must reach the socket
    port = free_port()
    daemon: Daemon | None = None
    attacker: subprocess.Popen[str] | None = None
    try:
        daemon = start_daemon(work, CONFIG.format(port=port), code_dir=code_dir)
        socket_path, log_path = daemon.socket, daemon.log_path
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (nofile, nofile))
        fd_dir = f"/proc/{daemon.pid}/fd"
        fds_before, log_before = len(os.listdir(fd_dir)), log_path.stat().st_size
        attacker = subprocess.Popen(
            [sys.executable, "-I", "-c", ATTACKER, socket_path, str(port), str(connections)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert attacker.stdout is not None
        assert attacker.stdin is not None
        connected = attacker.stdout.readline().strip()
        samples = []
        for _ in range(seconds):
            time.sleep(1)
            samples.append((len(os.listdir(fd_dir)), healthz(socket_path)))
        logged = log_path.read_bytes()[log_before:]
        attacker.stdin.close()
        attacker.wait(timeout=30)
        time.sleep(2)
        return {
            "code": str(code_dir),
            "rlimit_nofile": nofile,
            "attacker_connected": int(connected or 0),
            "fds_before": fds_before,
            "fds_max_during": max(fds for fds, _ in samples),
            "healthz_during": [answer for _, answer in samples],
            "log_bytes_during": len(logged),
            "tracebacks_during": logged.count(b"Traceback"),
            "healthz_after": healthz(socket_path),
        }
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        if daemon is not None:
            terminate_daemon(daemon)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code-dir", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--nofile", type=int, default=1024)
    options = parser.parse_args()
    result = flood(options.code_dir.resolve(), options.connections, options.seconds,
                   options.nofile)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
