"""What an operator sees of a real daemon: request ids, 4xx counted by code, outcomes,
the backend-up gauge, start-up clashes, ``sandpool run --json``, journald priorities."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    REPOSITORY,
    Daemon,
    free_port,
    launch_daemon,
    metric_sample,
    scrape,
    start_daemon,
    stop_daemon,
    wait_until,
)

POOL = "ops"


@dataclass
class Operated:
    daemon: Daemon
    metrics_url: str


class UnixConnection(http.client.HTTPConnection):
    """http.client on the daemon's socket: any header, and the answer's headers."""

    def __init__(self, path: str) -> None:
        super().__init__("sandpool", timeout=60)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self.path)


def exchange(
    daemon: Daemon, method: str, path: str, body: object = None, **headers: str
) -> tuple[http.client.HTTPResponse, Any]:
    connection = UnixConnection(daemon.socket)
    try:
        payload = None if body is None else json.dumps(body).encode()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response, json.loads(response.read())
    finally:
        connection.close()


@pytest.fixture(scope="module")
def operated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operated]:
    port = free_port()
    config = f"""
        [server]
        metrics_address = "127.0.0.1:{port}"
        [pools.{POOL}]
        backend = "process"
        min_idle = 1
        max_size = 2
        timeout_s = 10
    """
    daemon = start_daemon(tmp_path_factory.mktemp("operated"), config)
    try:
        yield Operated(daemon, f"http://127.0.0.1:{port}/metrics")
    finally:
        stop_daemon(daemon)


def events_with(daemon: Daemon, **fields: object) -> list[dict[str, object]]:
    return [e for e in daemon.log_events() if all(e.get(k) == v for k, v in fields.items())]


def test_a_request_id_is_echoed_and_in_the_requests_log_lines(operated: Operated) -> None:
    response, result = exchange(operated.daemon, "POST", "/v1/run",
                                {"code": "print(1)", "pool": POOL}, **{"X-Request-Id": "ops-42.a"})
    assert result["stdout"] == "1\n"
    assert response.headers["X-Request-Id"] == "ops-42.a"
    wait_until(lambda: bool(events_with(operated.daemon, request_id="ops-42.a")),
               "the request's log line")
    (line,) = events_with(operated.daemon, request_id="ops-42.a")
    assert (line["event"], line["sandbox"]) == ("request", result["sandbox_id"])


def test_an_unsafe_request_id_is_replaced_by_a_new_one(operated: Operated) -> None:
    ids = set()
    for given in ("has space", "x" * 200, "\"quoted\"", ""):
        response, _ = exchange(operated.daemon, "GET", "/healthz", **{"X-Request-Id": given})
        ids.add(response.headers["X-Request-Id"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in ids), ids
    assert len(ids) == 4  # one new id per request


def test_client_errors_are_logged_and_counted_by_code(operated: Operated) -> None:
    before = scrape(operated.metrics_url)
    response, body = exchange(operated.daemon, "POST", "/v1/run", {"pool": POOL},
                              **{"X-Request-Id": "ops-missing-code"})
    assert (response.status, body["error"]["code"]) == (400, "missing_code")
    response, body = exchange(operated.daemon, "GET", "/no/such/path")
    assert (response.status, body["error"]["code"]) == (404, "not_found")
    after = scrape(operated.metrics_url)

    def moved(code: str) -> float:
        return (metric_sample(after, "sandpool_client_errors_total", code=code)
                - metric_sample(before, "sandpool_client_errors_total", code=code))

    assert (moved("missing_code"), moved("not_found")) == (1, 1)
    wait_until(lambda: bool(events_with(operated.daemon, request_id="ops-missing-code")),
               "the refused request's log line")
    (line,) = events_with(operated.daemon, request_id="ops-missing-code")
    assert (line["event"], line["status"], line["code"], line["level"]) == (
        "request_refused", 400, "missing_code", "info")


def test_outcome_tells_a_programs_failure_and_a_disconnect_from_success(
    operated: Operated,
) -> None:
    before = scrape(operated.metrics_url)
    _, failed = exchange(operated.daemon, "POST", "/v1/run",
                         {"code": "import sys; sys.exit(3)", "pool": POOL})
    assert failed["exit_code"] == 3
    # A client that leaves mid-run: its own outcome, not an error of the daemon.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leaving:
        leaving.connect(operated.daemon.socket)
        body = json.dumps({"code": "import time; time.sleep(8)", "pool": POOL}).encode()
        leaving.sendall(b"POST /v1/run HTTP/1.1\r\nHost: sandpool\r\nContent-Type: "
                        b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.5)

    def outcome(text: str, name: str) -> float:
        return metric_sample(text, "sandpool_requests_total", pool=POOL, outcome=name)

    wait_until(lambda: outcome(scrape(operated.metrics_url), "disconnected") == outcome(before,
               "disconnected") + 1, "the disconnect counted")
    after = scrape(operated.metrics_url)
    assert outcome(after, "failed") - outcome(before, "failed") == 1
    assert outcome(after, "ok") == outcome(before, "ok")
    assert outcome(after, "error") == outcome(before, "error")


def test_no_created_series_and_the_backend_is_up(operated: Operated) -> None:
    text = scrape(operated.metrics_url)
    assert "_created" not in text
    assert re.search(rf'^sandpool_backend_up{{pool="{POOL}"}} 1\.0$', text, re.M)


def test_readyz_and_status_report_no_problem_when_ready(operated: Operated) -> None:
    response, body = exchange(operated.daemon, "GET", "/readyz")
    assert (response.status, body) == (200, {"ready": True, "pools": {POOL: True},
                                             "reasons": {}})
    _, pools = exchange(operated.daemon, "GET", "/v1/pools")
    assert [p["problem"] for p in pools["pools"]] == [None]
    status = subprocess.run(
        [sys.executable, "-m", "api.cli", "status", "--socket", operated.daemon.socket],
        capture_output=True, text=True, timeout=60, cwd=REPOSITORY,
    )
    assert status.returncode == 0, status.stderr
    assert len(status.stdout.splitlines()) == 2  # the header and the pool: nothing wrong


def test_a_config_that_replaces_the_default_pools_says_which(operated: Operated) -> None:
    (warning,) = events_with(operated.daemon, event="default_pools_replaced")
    assert warning["level"] == "warning"
    not_served = warning["not_served"]
    assert isinstance(not_served, list)
    assert "python" in not_served
    assert POOL not in not_served


def run_cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", "run", "--socket", daemon.socket, "--pool", POOL,
         *args], capture_output=True, text=True, timeout=60, cwd=REPOSITORY,
    )


def test_run_json_prints_the_whole_result(operated: Operated) -> None:
    done = run_cli(operated.daemon, "--json", "-c", "print('hi'); import sys; sys.exit(4)")
    assert done.returncode == 4, done.stderr
    result = json.loads(done.stdout)
    assert (result["stdout"], result["exit_code"], result["pool"]) == ("hi\n", 4, POOL)
    assert {"stderr", "timed_out", "oom_killed", "sandbox_id", "duration_ms", "files",
            "results"} <= set(result)


def test_a_taken_metrics_port_fails_start_up_in_one_line_and_leaves_no_socket(
    tmp_path: Path,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = launch_daemon(tmp_path, f"""
            [server]
            metrics_address = "127.0.0.1:{port}"
            [pools.{POOL}]
            backend = "process"
            min_idle = 1
        """)
        try:
            # Before any pool warms: well within what one sandbox start takes here.
            assert daemon.process.wait(timeout=30) == 1
        finally:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()
    lines = daemon.log_path.read_text().splitlines()
    plain = [line for line in lines if not line.startswith("{")]
    assert plain == [f"sandpool: cannot listen for metrics on 127.0.0.1:{port}: "
                     "Address already in use"]
    assert not any("sandbox_started" in line or "warming" in line for line in lines)
    assert not os.path.exists(daemon.socket)


def test_log_levels_carry_journald_priorities_under_systemd(tmp_path: Path) -> None:
    out = tmp_path / "journal"
    script = ("import structlog; from metrics.logs import configure_logging; "
              "configure_logging('json', 'debug'); log = structlog.get_logger(); "
              "log.debug('d'); log.info('i'); log.warning('w'); log.error('e')")
    with open(out, "wb") as stdout:
        stat = os.fstat(stdout.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        subprocess.run([sys.executable, "-c", script], stdout=stdout, env=env, check=True,
                       cwd=REPOSITORY, timeout=30)
    lines = out.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["d", "i", "w", "e"]
    # Not the journal (a file, a pipe): plain JSON lines.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "JOURNAL_STREAM": "1:1"}, check=True,
                          cwd=REPOSITORY, timeout=30)
    assert all(line.startswith("{") for line in done.stdout.splitlines())
