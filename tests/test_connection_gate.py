"""The connection gate's pure parts: the per-peer counter, the log throttle, canned answers.

The gate against a real daemon is tests/security/test_connections.py.
"""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest
import structlog

from api.connections import (
    ConnectionCounter,
    Throttle,
    ThrottledLog,
    loop_exception_handler,
    refusal,
)
from api.server import is_peer_allowed
from pool.config import ServerConfig, parse_config
from pool.errors import ConfigError
from pool.procfs import PeerCredentials


def test_counter_refuses_over_each_cap_and_forgets_closed_peers() -> None:
    counter = ConnectionCounter(max_total=3, max_per_peer=2)
    assert counter.try_add(1000) is None
    assert counter.try_add(1000) is None
    assert counter.try_add(1000) == "too_many_connections_from_peer"
    assert counter.try_add(1001) is None
    assert counter.try_add(1002) == "too_many_connections"
    assert (counter.total, counter.held_by(1000), counter.held_by(1001)) == (3, 2, 1)
    counter.remove(1000)
    assert counter.try_add(1002) is None  # a slot came back, for anyone
    for peer in (1000, 1001, 1002):
        counter.remove(peer)
    assert counter.total == 0
    assert counter._per_peer == {}  # no key outlives its connections


def test_throttle_admits_one_line_per_interval_and_counts_the_rest() -> None:
    now = [100.0]
    throttle = Throttle(interval_s=10.0, clock=lambda: now[0])
    assert throttle.admit("accept") == 0
    assert [throttle.admit("accept") for _ in range(5)] == [None] * 5
    assert throttle.admit("other") == 0  # keys are independent
    now[0] += 9.9
    assert throttle.admit("accept") is None
    now[0] += 0.1
    assert throttle.admit("accept") == 6  # the held-back count, then reset
    now[0] += 10.0
    assert throttle.admit("accept") == 0


def test_throttled_log_writes_one_line_with_the_suppressed_count() -> None:
    now = [0.0]
    throttled = ThrottledLog(Throttle(interval_s=10.0, clock=lambda: now[0]))
    with structlog.testing.capture_logs() as logs:
        for _ in range(1000):
            throttled.warning("peer_denied", uid=65534)
        now[0] = 10.0
        throttled.warning("peer_denied", uid=65534)
    assert logs == [
        {"event": "peer_denied", "uid": 65534, "log_level": "warning"},
        {"event": "peer_denied", "uid": 65534, "suppressed": 999, "log_level": "warning"},
    ]


def test_a_flood_on_one_listener_does_not_hide_the_other() -> None:
    throttled = ThrottledLog(Throttle(interval_s=10.0, clock=lambda: 0.0))
    with structlog.testing.capture_logs() as logs:
        for _ in range(100):
            throttled.warning("connection_refused", listener="metrics")
        throttled.warning("connection_refused", listener="api")
    assert [line["listener"] for line in logs] == ["metrics", "api"]


def test_accept_errors_are_throttled_without_traceback() -> None:
    handle = loop_exception_handler(ThrottledLog())
    emfile = OSError(errno.EMFILE, "Too many open files")
    with structlog.testing.capture_logs() as logs:
        for _ in range(100):
            handle(None, {"message": "socket.accept() out of system resource",  # type: ignore[arg-type]
                          "exception": emfile})
        handle(None, {"message": "boom", "exception": ValueError("bug")})  # type: ignore[arg-type]
    assert len(logs) == 2
    assert logs[0]["event"] == "event_loop_resource_error"
    assert logs[0]["error"] == "EMFILE"
    assert "exc_info" not in logs[0]
    assert logs[1]["event"] == "event_loop_error"
    assert isinstance(logs[1]["exc_info"], ValueError)  # a bug keeps its traceback


@pytest.mark.parametrize(("status", "code"), [(403, "forbidden"),
                                               (503, "too_many_connections")])
def test_refusal_is_a_complete_json_error_answer(status: int, code: str) -> None:
    raw = refusal(status, code, "why")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith(f"HTTP/1.1 {status} ")
    headers: dict[str, Any] = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body)
    assert headers["Connection"] == "close"
    assert ("Retry-After" in headers) == (status == 503)
    assert json.loads(body) == {"error": {"code": code, "message": "why"}}


def test_peer_check() -> None:
    open_to_all = ServerConfig()
    narrowed = ServerConfig(allowed_uids=(1000,), allowed_gids=(2000,))
    assert is_peer_allowed(open_to_all, PeerCredentials(1, 65534, 65534))
    assert is_peer_allowed(narrowed, PeerCredentials(1, 0, 0))
    assert is_peer_allowed(narrowed, PeerCredentials(1, 1000, 5))
    assert is_peer_allowed(narrowed, PeerCredentials(1, 5, 2000))
    assert not is_peer_allowed(narrowed, PeerCredentials(1, 65534, 65534))
    assert not is_peer_allowed(narrowed, PeerCredentials(-1, -1, -1))  # unknown peer


@pytest.mark.parametrize(("server", "message"), [
    ({"max_connections": 0}, "server.max_connections must be greater than 0"),
    ({"metrics_max_connections_per_peer": -1},
     "server.metrics_max_connections_per_peer must be greater than 0"),
    ({"max_connections": 10, "max_connections_per_peer": 11},
     "server.max_connections_per_peer must not exceed max_connections"),
    ({"metrics_max_connections": 2},
     "server.metrics_max_connections_per_peer must not exceed metrics_max_connections"),
    ({"header_timeout_s": 0}, "server.header_timeout_s must be greater than 0"),
    ({"header_timeout_s": 20, "keepalive_timeout_s": 10},
     "server.header_timeout_s must not exceed keepalive_timeout_s"),
    ({"keepalive_timeout_s": "15"}, "server.keepalive_timeout_s must be of type int or float"),
])
def test_connection_settings_are_validated(server: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": server})
    assert message in caught.value.message
