"""HAProxy (Debian's, run as a plain process) in front of the simulation's nodes.

HTTP mode with TLS on both sides: clients get one certificate at HAProxy, and
HAProxy speaks TLS to each daemon, whose listener serves nothing else (the
network between a load balancer and the pods is not trusted either). HTTP
mode, not TCP passthrough, because only a balancer that reads the answers can
send a 503 to another node, and can balance per request rather than per
connection.

What it retries, and why that is safe (``retry-on``):

- ``conn-failure``: the connection to a node, or its TLS handshake, failed,
  so no request left. A drained daemon closes its listener at once.
- ``503``: the daemon refused the run before starting it (``shutting_down``,
  ``pool_exhausted``, ``server_busy``...; docs/api.md). The one 503 that
  follows a started run (``shutting_down`` after ``shutdown_timeout_s``) cannot
  happen here: runs are shorter than the drain.

Never ``empty-response``, ``response-timeout`` or ``junk-response``: those mean
the request reached a node and its answer was lost (a node killed mid-run),
and the run may have executed: HAProxy answers 502 and the client reports it.
``http-reuse never``: every request opens its own connection to a node, so a
node closing an idle kept-alive connection as a request is sent on it (which
HAProxy could only answer with a 502) cannot happen; the cost is one TLS
handshake to the node per request. Health checks GET ``/readyz`` with a token
of their own every 500 ms; two failures take a node out.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.simulate.pki import Pki

CHECK_TOKEN = "haproxy-check"
BACKEND = "daemons"
SERVER_NAME = "sandpool.sim"
START_TIMEOUT_S = 10.0

# HAProxy's own answers, in the daemon's error shape, so the client reads them:
# a 503 before any node took the request (retried by the client after its
# Retry-After), a 502 for a node that went away with the request (the run may
# have executed: never retried), a 504 for a node that did not answer in time.
ERROR_ANSWERS = {
    502: ("Bad Gateway", "node_lost", "the node running this request went away before it "
          "answered: the run may have executed", ""),
    503: ("Service Unavailable", "no_node_available", "no sandpool node is ready; nothing ran",
          "Retry-After: 1\r\n"),
    504: ("Gateway Timeout", "node_timeout", "the node did not answer in time: the run may "
          "have executed", ""),
}

LOG_FORMAT = (
    '{"id":"%[capture.req.hdr(0)]","server":"%s","t":"%t","status":%ST,"retries":"%rc",'
    '"term":"%ts","ta_ms":%Ta}'
)


def render_config(directory: Path, port: int, pki: Pki, nodes: dict[str, str]) -> str:
    """haproxy.cfg for ``nodes`` (name -> address), listening on 127.0.0.1:``port``."""
    token = pki.tokens[CHECK_TOKEN]
    servers = "\n".join(f"    server {name} {address}:8443" for name, address in nodes.items())
    return f"""\
global
    log stdout format raw local0
    maxconn 2048
    stats socket {directory}/admin.sock mode 600 level admin
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-server-options ssl-min-ver TLSv1.2

defaults
    mode http
    log global
    log-format '{LOG_FORMAT}'
    option http-buffer-request
    errorfile 502 {directory}/502.http
    errorfile 503 {directory}/503.http
    errorfile 504 {directory}/504.http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    option log-separate-errors
    timeout check 2s
    retries 3
    option redispatch 1
    retry-on conn-failure 503

frontend sandpool
    bind 127.0.0.1:{port} ssl crt {directory}/frontend.pem
    http-request capture req.hdr(X-Request-Id) len 64
    default_backend {BACKEND}

backend {BACKEND}
    balance leastconn
    http-reuse never
    option httpchk
    http-check send meth GET uri /readyz hdr Authorization "Bearer {token}"
    http-check expect status 200
    default-server ssl verify required ca-file {pki.ca_file} verifyhost {SERVER_NAME} sni str({SERVER_NAME}) check inter 500ms fall 2 rise 2
{servers}
"""  # noqa: E501


@dataclass
class Balancer:
    process: subprocess.Popen[bytes]
    port: int
    directory: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(5)
            admin.connect(str(self.directory / "admin.sock"))
            admin.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := admin.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """Server name -> HAProxy's view of its health ("UP", "DOWN", ...)."""
        states = {}
        for line in self.admin("show stat").splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == BACKEND and fields[1] not in ("BACKEND",):
                states[fields[1]] = fields[17]
        return states

    def log_entries(self) -> list[dict[str, object]]:
        """One entry per request HAProxy answered (its log lines, JSON)."""
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            start = line.find("{")
            if start < 0:
                continue
            try:
                entries.append(json.loads(line[start:]))
            except ValueError:
                continue
        return entries

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_balancer(directory: Path, pki: Pki, nodes: dict[str, str]) -> Balancer:
    """Write the config and the frontend's certificate, check the config, start HAProxy.

    Raises RuntimeError with HAProxy's words if the config does not load.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pem = directory / "frontend.pem"
    # HAProxy (root) reads the daemon's certificate and key, as one file.
    pem.write_bytes((pki.tls_dir / "tls.crt").read_bytes() + (pki.tls_dir / "tls.key").read_bytes())
    pem.chmod(0o600)
    for status, (reason, code, message, extra) in ERROR_ANSWERS.items():
        body = json.dumps({"error": {"code": code, "message": message}})
        (directory / f"{status}.http").write_text(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{extra}"
            f"Cache-Control: no-cache\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}")
    port = free_port()
    config = directory / "haproxy.cfg"
    config.write_text(render_config(directory, port, pki, nodes))
    checked = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True,
                             text=True, timeout=30)
    if checked.returncode != 0:
        raise RuntimeError(f"haproxy refused its config: {checked.stdout}{checked.stderr}")
    log_path = directory / "haproxy.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ})
    balancer = Balancer(process, port, directory, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (directory / "admin.sock").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            balancer.stop()
            raise RuntimeError(f"haproxy did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    return balancer
