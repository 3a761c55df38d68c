"""Streamed runs (``Accept: application/x-ndjson``) against a real daemon, every tier.

One daemon for the module: a Docker ``python`` pool, ``process``, ``fork`` and
``wasm`` pools, and ``capped`` (process, a small ``max_output_bytes``). Output
must arrive while the program still runs, end in the result a plain run gives,
stop at the daemon's cap, keep a character split across reads whole, and a
client that leaves mid-stream must get its sandbox destroyed. The capture's
listener, which all of that rests on, is tested alone first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from sandpool_client import (
    ApiError,
    AsyncClient,
    BadRequest,
    Client,
    OutputChunk,
    RunResult,
    SandpoolClientError,
)
from sandpool_client.protocol import stream_event

from api.openapi import build_document
from pool.wire import STDERR, STDOUT, OutputCapture
from tests.support import (
    Daemon,
    free_port,
    metric_sample,
    running_daemon,
    scrape,
    start_daemon,
    stop_daemon,
    wait_until,
)

CAP_BYTES = 1000
CONFIG = """
[server]
metrics_address = "127.0.0.1:{port}"

[pools.python]
min_idle = 1
max_size = 2
timeout_s = 10
max_timeout_s = 30

[pools.process]
backend = "process"
min_idle = 1
max_size = 3
timeout_s = 10
max_timeout_s = 30

[pools.fork]
backend = "fork"
min_idle = 1
max_size = 2
timeout_s = 10
max_timeout_s = 30

[pools.wasm]
backend = "wasm"
min_idle = 1
max_size = 2
timeout_s = 10
max_timeout_s = 30

[pools.capped]
backend = "process"
min_idle = 1
max_size = 2
timeout_s = 10
max_output_bytes = {cap}
"""
TIERS = ["python", "process", "fork", "wasm"]
NDJSON = {"Accept": "application/x-ndjson"}
# What differs between two runs of the same code: timings and the sandbox.
PER_RUN = ("duration_ms", "queued_ms", "sandbox_id")
# Writes, flushes, sleeps: the first line exists a second before the program ends.
PRINT_SLEEP_PRINT = (
    "import sys, time\n"
    "print('first', flush=True)\n"
    "time.sleep(1)\n"
    "print('second')\n"
)
# 'é' is two bytes (c3 a9): the first is flushed alone, the second after a pause,
# so the daemon reads them apart.
SPLIT_CHARACTER = (
    "import sys, time\n"
    "out = sys.stdout.buffer\n"
    "out.write(b'a\\xc3'); out.flush()\n"
    "time.sleep(0.3)\n"
    "out.write(b'\\xa9b\\n'); out.flush()\n"
    "sys.stderr.buffer.write('€'.encode()[:1]); sys.stderr.flush()\n"
    "time.sleep(0.3)\n"
    "sys.stderr.buffer.write('€'.encode()[1:]); sys.stderr.flush()\n"
)


def test_capture_listener_hears_exactly_the_captured_bytes() -> None:
    heard: list[tuple[bytes, bytes]] = []
    capture = OutputCapture(5, lambda kind, data: heard.append((kind, data)))
    assert capture.add(STDOUT, b"abc")
    assert capture.add(STDERR, b"")
    assert not capture.add(STDOUT, b"defg")
    assert not capture.add(STDOUT, b"more")
    assert capture.add(STDERR, b"e")
    assert heard == [(STDOUT, b"abc"), (STDOUT, b"de"), (STDERR, b"e")]
    assert (bytes(capture.stdout), capture.stdout_truncated) == (b"abcde", True)


def test_capture_without_listener_is_unchanged() -> None:
    capture = OutputCapture(3)
    assert not capture.add(STDOUT, b"abcd")
    assert (bytes(capture.stdout), capture.stdout_truncated, capture.listener) == (
        b"abc", True, None)


def test_client_reads_each_kind_of_line() -> None:
    assert stream_event('{"type": "stderr", "data": "é"}') == OutputChunk("stderr", "é")
    with pytest.raises(ApiError) as failed:
        stream_event('{"type": "error", "code": "backend_error", "message": "lost"}')
    assert (failed.value.code, failed.value.message, failed.value.status) == (
        "backend_error", "lost", 200)
    for garbage in ("not json", '{"type": "stdout"}', '{"type": "later"}', "[1]"):
        with pytest.raises(SandpoolClientError) as refused:
            stream_event(garbage)
        assert refused.value.code == "invalid_response"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    config = CONFIG.format(port=free_port(), cap=CAP_BYTES)
    with running_daemon(tmp_path_factory.mktemp("streaming"), config) as running:
        yield running


@pytest.fixture(scope="module")
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=daemon.socket)
    with httpx.Client(transport=transport, base_url="http://sandpool", timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def line_schema() -> Draft202012Validator:
    """The OpenAPI document's schema of one streamed line, to check every line against."""
    uri = "urn:sandpool:openapi"
    document = build_document("test")
    registry: Registry[Any] = Registry().with_resource(
        uri, DRAFT202012.create_resource(document))
    return Draft202012Validator(
        {"$ref": f"{uri}#/components/schemas/RunStreamLine"}, registry=registry)


def streamed(
    http: httpx.Client, schema: Draft202012Validator, body: dict[str, Any]
) -> list[tuple[float, dict[str, Any]]]:
    """Each line of a streamed run with the monotonic time it arrived, checked
    against the document; the last one is the result."""
    lines = []
    with http.stream("POST", "/v1/run", json=body, headers=NDJSON) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["Content-Type"] == "application/x-ndjson"
        for line in response.iter_lines():
            event = json.loads(line)
            schema.validate(event)
            lines.append((time.monotonic(), event))
    assert [event["type"] for _, event in lines][-1] == "result", lines
    assert all(event["type"] in ("stdout", "stderr") for _, event in lines[:-1]), lines
    return lines


def joined(lines: list[tuple[float, dict[str, Any]]], stream: str) -> str:
    return "".join(event["data"] for _, event in lines if event["type"] == stream)


def without_per_run(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k not in PER_RUN and k != "type"}


def pool_counts(daemon: Daemon, pool: str) -> dict[str, Any]:
    return next(p for p in daemon.pools() if p["name"] == pool)


def daemon_metrics(daemon: Daemon) -> str:
    return scrape(f"http://{metrics_address(daemon)}/metrics")


def metrics_address(daemon: Daemon) -> str:
    config = (daemon.log_path.parent / "sandpool.toml").read_text()
    return config.split('metrics_address = "', 1)[1].split('"', 1)[0]


def disconnected(daemon: Daemon, pool: str) -> float:
    return metric_sample(daemon_metrics(daemon), "sandpool_requests_total",
                         pool=pool, outcome="disconnected")


def nothing_running(daemon: Daemon, pool: str) -> bool:
    """No sandbox of ``pool`` is busy or still being destroyed."""
    text = daemon_metrics(daemon)
    return all(metric_sample(text, "sandpool_sandboxes", pool=pool, state=state) == 0
               for state in ("busy", "destroying"))


@pytest.mark.parametrize("pool", TIERS)
def test_output_arrives_while_the_program_runs(
    http: httpx.Client, line_schema: Draft202012Validator, pool: str
) -> None:
    lines = streamed(http, line_schema, {"pool": pool, "code": PRINT_SLEEP_PRINT})
    first_at, first = lines[0]
    result_at, result = lines[-1]
    assert first == {"type": "stdout", "data": "first\n"}
    # The program slept a second between its two prints.
    assert result_at - first_at > 0.5, lines
    assert joined(lines, "stdout") == result["stdout"] == "first\nsecond\n"
    assert result["exit_code"] == 0


@pytest.mark.parametrize("pool", TIERS)
def test_streamed_result_is_the_plain_result(
    http: httpx.Client, line_schema: Draft202012Validator, pool: str
) -> None:
    body = {"pool": pool, "stdin": "in", "code": (
        "import sys\n"
        "print('out', sys.stdin.read(), 'ünïcode')\n"
        "print('err', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )}
    lines = streamed(http, line_schema, body)
    plain = http.post("/v1/run", json=body)
    assert plain.headers["Content-Type"].startswith("application/json")
    assert without_per_run(lines[-1][1]) == without_per_run(plain.json())
    assert joined(lines, "stdout") == plain.json()["stdout"] == "out in ünïcode\n"
    assert joined(lines, "stderr") == plain.json()["stderr"] == "err\n"
    assert plain.json()["exit_code"] == 3


def test_stream_stops_at_the_output_cap(
    http: httpx.Client, line_schema: Draft202012Validator
) -> None:
    body = {"pool": "capped", "code": (
        "import sys\n"
        "for _ in range(50):\n"
        "    print('x' * 99, flush=True)\n"
        "print('e' * 50, file=sys.stderr)\n"
    )}
    lines = streamed(http, line_schema, body)
    result = lines[-1][1]
    assert len(joined(lines, "stdout")) == CAP_BYTES
    assert joined(lines, "stdout") == result["stdout"]
    assert result["stdout_truncated"] is True
    assert result["exit_code"] is None  # killed at the cap, as a plain run is
    plain = http.post("/v1/run", json=body).json()
    assert (plain["stdout"], plain["stdout_truncated"], plain["exit_code"]) == (
        result["stdout"], True, None)


@pytest.mark.parametrize("pool", TIERS)
def test_character_split_across_reads_is_sent_whole(
    http: httpx.Client, line_schema: Draft202012Validator, pool: str
) -> None:
    lines = streamed(http, line_schema, {"pool": pool, "code": SPLIT_CHARACTER})
    result = lines[-1][1]
    assert joined(lines, "stdout") == result["stdout"] == "aéb\n"
    assert joined(lines, "stderr") == result["stderr"] == "€"
    assert not any("\ufffd" in event["data"] for _, event in lines[:-1])
    # The output came as the program wrote it: 'a' before the pause, 'éb' after.
    stdout = [event["data"] for _, event in lines if event["type"] == "stdout"]
    assert stdout[0] == "a", lines


def test_refused_before_the_stream_is_a_plain_error(http: httpx.Client) -> None:
    response = http.post("/v1/run", json={"pool": "nope", "code": "1"}, headers=NDJSON)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_pool"


@pytest.mark.parametrize("pool", ["process", "python"])
def test_client_leaving_mid_stream_destroys_the_sandbox(
    daemon: Daemon, http: httpx.Client, pool: str
) -> None:
    wait_until(lambda: nothing_running(daemon, pool), "no run in flight")
    before = disconnected(daemon, pool)
    code = "import time\nprint('started', flush=True)\ntime.sleep(25)\n"
    with http.stream("POST", "/v1/run", json={"pool": pool, "code": code, "timeout_s": 30},
                     headers=NDJSON) as response:
        lines = response.iter_lines()  # held: closing it would close the connection
        first = json.loads(next(lines))
        assert first == {"type": "stdout", "data": "started\n"}
        assert pool_counts(daemon, pool)["busy"] == 1
    # Closed with the program asleep for 25 s more: only the disconnect ends it.
    wait_until(lambda: nothing_running(daemon, pool),
               "the sandbox of the abandoned stream destroyed", timeout_s=10)
    wait_until(lambda: disconnected(daemon, pool) == before + 1,
               "the disconnect counted", timeout_s=5)
    assert http.post("/v1/run", json={"pool": pool, "code": "print(7)"}).json()["stdout"] == "7\n"
    assert not [e for e in daemon.log_events() if e.get("event") == "event_loop_error"]


def test_client_stream_and_callback(daemon: Daemon) -> None:
    with Client(daemon.socket) as sandpool:
        events = list(sandpool.stream(PRINT_SLEEP_PRINT, pool="process"))
        assert events[0] == OutputChunk(stream="stdout", data="first\n")
        result = events[-1]
        assert isinstance(result, RunResult)
        assert result.stdout == "first\nsecond\n"
        assert all(isinstance(event, OutputChunk) for event in events[:-1])

        heard: list[tuple[float, OutputChunk]] = []
        called = sandpool.run(PRINT_SLEEP_PRINT, pool="process",
                              on_output=lambda chunk: heard.append((time.monotonic(), chunk)))
        ended_at = time.monotonic()
        assert called.stdout == "".join(chunk.data for _, chunk in heard) == "first\nsecond\n"
        assert ended_at - heard[0][0] > 0.5
        with pytest.raises(BadRequest) as refused:
            next(sandpool.stream("1", pool="nope"))
        assert refused.value.code == "unknown_pool"


def test_client_leaving_its_iterator_destroys_the_sandbox(daemon: Daemon) -> None:
    wait_until(lambda: nothing_running(daemon, "process"), "no run in flight")
    code = "import time\nprint('started', flush=True)\ntime.sleep(25)\n"
    with Client(daemon.socket) as sandpool:
        for event in sandpool.stream(code, pool="process", timeout_s=30):
            assert event == OutputChunk(stream="stdout", data="started\n")
            break
        wait_until(lambda: nothing_running(daemon, "process"),
                   "the sandbox of the abandoned iterator destroyed", timeout_s=10)


async def test_async_client_stream_and_callback(daemon: Daemon) -> None:
    async with AsyncClient(daemon.socket) as sandpool:
        events = [event async for event in sandpool.stream(PRINT_SLEEP_PRINT, pool="fork")]
        assert events[0] == OutputChunk(stream="stdout", data="first\n")
        assert isinstance(events[-1], RunResult)
        assert events[-1].stdout == "first\nsecond\n"

        heard: list[OutputChunk] = []

        async def on_output(chunk: OutputChunk) -> None:
            heard.append(chunk)

        result = await sandpool.run(SPLIT_CHARACTER, pool="fork", on_output=on_output)
        assert "".join(c.data for c in heard if c.stream == "stdout") == result.stdout == "aéb\n"
        assert "".join(c.data for c in heard if c.stream == "stderr") == result.stderr == "€"

        code = "import time\nprint('started', flush=True)\ntime.sleep(25)\n"
        async with contextlib.aclosing(sandpool.stream(code, pool="fork", timeout_s=30)) as it:
            async for event in it:
                assert event == OutputChunk(stream="stdout", data="started\n")
                break
        async with asyncio.timeout(10):
            while not await asyncio.to_thread(nothing_running, daemon, "fork"):
                await asyncio.sleep(0.05)


DRAINING_CONFIG = """
[server]
metrics_address = "off"
shutdown_timeout_s = 1

[pools.python]
backend = "process"
min_idle = 1
max_size = 1
timeout_s = 20
"""


def test_shutdown_mid_stream_ends_it_with_an_error_line(tmp_path: Path) -> None:
    # shutdown_timeout_s 1: a run still going a second after SIGTERM is stopped;
    # its stream began, so the client hears it as the last line, not a status.
    draining = start_daemon(tmp_path, DRAINING_CONFIG)
    try:
        transport = httpx.HTTPTransport(uds=draining.socket)
        with httpx.Client(transport=transport, base_url="http://sandpool", timeout=30) as http:
            code = "import time\nprint('started', flush=True)\ntime.sleep(20)\n"
            with http.stream("POST", "/v1/run", json={"code": code}, headers=NDJSON) as response:
                lines = response.iter_lines()
                assert json.loads(next(lines)) == {"type": "stdout", "data": "started\n"}
                draining.process.send_signal(signal.SIGTERM)
                rest = [json.loads(line) for line in lines]
        assert response.status_code == 200
        assert rest == [{"type": "error", "code": "run_interrupted", "message":
                         "sandpool shut down while the run was in flight; it was stopped "
                         "part-way"}]
    finally:
        stop_daemon(draining)
