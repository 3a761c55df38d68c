"""Metrics over TCP, JSON logs, and the systemd notify sequence of a real daemon."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import (
    METRIC_NAMES,
    Daemon,
    free_port,
    metric_sample,
    scrape,
    start_daemon,
    stop_daemon,
)

SECRET = "s3cr3t-user-output-7f1c"


@dataclass
class Observed:
    daemon: Daemon
    metrics_url: str
    notifications: list[str]
    notify_socket: socket.socket




@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    tmp = tmp_path_factory.mktemp("observed")
    notify_path = str(tmp / "notify.sock")
    notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_socket.bind(notify_path)
    notify_socket.settimeout(0.2)
    port = free_port()
    config = f"""
        [server]
        metrics_address = "127.0.0.1:{port}"
        [pools.obs]
        min_idle = 1
        max_size = 2
        timeout_s = 5
    """
    daemon = start_daemon(tmp, config, env={"NOTIFY_SOCKET": notify_path})
    observed = Observed(daemon, f"http://127.0.0.1:{port}/metrics", [], notify_socket)
    try:
        yield observed
    finally:
        stop_daemon(daemon)
        observed.notifications += drain(notify_socket)
        notify_socket.close()


def drain(notify_socket: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(notify_socket.recv(4096).decode())
        except TimeoutError:
            return messages


def present_sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample; AssertionError when the series is not exported."""
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition("}")[0]))
            if found == labels:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels} exported")


def test_every_metric_is_exported_over_tcp(observed: Observed) -> None:
    with observed.daemon.client() as client:
        client.run("print(1)", pool="obs")
    text = scrape(observed.metrics_url)
    for name in METRIC_NAMES:
        assert re.search(rf"^{name}(_bucket|_count|_sum)?[{{ ]", text, re.M), name
    assert 'backends="docker=' in text


def test_the_sandboxes_gauge_reports_the_pools_own_counts(observed: Observed) -> None:
    with observed.daemon.client() as client:
        client.run("print(1)", pool="obs")

        def settled() -> dict[str, object]:
            (summary,) = [p for p in client.pools() if p["name"] == "obs"]
            return summary

        # Back at min_idle with nothing starting or busy: the counts hold still.
        deadline = time.monotonic() + 30
        while (summary := settled())["idle"] != 1 or summary["starting"] or summary["busy"]:
            assert time.monotonic() < deadline, summary
            time.sleep(0.05)
    text = scrape(observed.metrics_url)
    exported = {
        state: present_sample(text, "sandpool_sandboxes", pool="obs", state=state)
        for state in ("idle", "busy", "starting")
    }
    assert exported == {"idle": 1.0, "busy": 0.0, "starting": 0.0}


def test_counters_and_histograms_follow_requests(observed: Observed) -> None:
    before = scrape(observed.metrics_url)
    with observed.daemon.client() as client:
        for _ in range(3):
            assert client.run("print(1)", pool="obs")["exit_code"] == 0
        assert client.run("while True: pass", pool="obs", timeout_s=0.5)["timed_out"]
        bomb = client.run("b = []\nwhile True: b.append(bytearray(2**24))", pool="obs")
        assert bomb["oom_killed"]
    after = scrape(observed.metrics_url)

    def moved(name: str, **labels: str) -> float:
        return metric_sample(after, name, pool="obs", **labels) - metric_sample(
            before, name, pool="obs", **labels)

    assert moved("sandpool_requests_total", outcome="ok") == 3
    assert moved("sandpool_requests_total", outcome="timeout") == 1
    assert moved("sandpool_requests_total", outcome="oom") == 1
    assert moved("sandpool_timeouts_total") == 1
    assert moved("sandpool_oom_kills_total") == 1
    assert moved("sandpool_request_duration_seconds_count", outcome="ok") == 3
    assert moved("sandpool_execution_duration_seconds_count") == 5
    assert moved("sandpool_acquire_wait_seconds_count") == 5


def test_metrics_on_the_socket_match(observed: Observed) -> None:
    with observed.daemon.client() as client:
        status, raw = client.request_raw("GET", "/metrics")
        text = raw.decode()
    assert status == 200
    assert "sandpool_requests_total" in text


def test_logs_are_json_with_request_fields_and_no_user_output(observed: Observed) -> None:
    with observed.daemon.client() as client:
        result = client.run(f"print('{SECRET}')", pool="obs", stdin=SECRET)
    assert result["stdout"] == SECRET + "\n"
    # The request line is written after the response is sent: wait for it.
    deadline = time.monotonic() + 10
    while True:
        events = observed.daemon.log_events()  # every line parses as JSON
        requests = [e for e in events if e["event"] == "request" and e.get("sandbox")
                    == result["sandbox_id"]]
        if requests or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(requests) == 1
    assert {"pool", "sandbox", "outcome", "duration_ms", "queued_ms", "stdout_bytes",
            "stderr_bytes", "exit_code", "timestamp", "level"} <= set(requests[0])
    assert requests[0]["stdout_bytes"] == len(SECRET) + 1
    assert SECRET not in Path(observed.daemon.log_path).read_text()


def test_notify_ready_then_status(observed: Observed) -> None:
    observed.notifications += drain(observed.notify_socket)
    assert observed.notifications, "no notification received"
    assert observed.notifications[0].splitlines()[0] == "READY=1"
    assert any(m.startswith("STATUS=") or "\nSTATUS=obs: " in m
               for m in observed.notifications)


def test_notify_stopping_after_sigterm(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
        notify_socket.bind(notify_path)
        notify_socket.settimeout(0.2)
        daemon = start_daemon(
            tmp_path, '[server]\nmetrics_address = "off"\n[pools.p]\nmin_idle = 1\n',
            env={"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "2000000"},
        )
        stop_daemon(daemon)
        messages = drain(notify_socket)
    fields = [field for message in messages for field in message.splitlines()]
    assert fields[0] == "READY=1"
    assert "WATCHDOG=1" in fields  # pings at half of WatchdogSec from the event loop
    assert fields[-1] == "STOPPING=1"
    assert fields.index("READY=1") < fields.index("STOPPING=1")
