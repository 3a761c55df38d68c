"""The ``sandpool_client`` distribution against a real daemon on its Unix socket.

One small daemon for the module (process tier): ``python`` for ordinary runs,
``tiny`` (one sandbox, a queue of one) to be filled for 503s. The TCP side
(``base_url=``, ``token=``) has no listener in the daemon yet, so it is checked
against httpx's MockTransport only, as are Retry-After dates and the retry cap.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sandpool_client import (
    AsyncClient,
    BadRequest,
    Client,
    DaemonUnreachable,
    RequestTimeout,
    RunResult,
    SandpoolClientError,
    Unavailable,
)
from sandpool_client.protocol import encode_json, file_entry, parse_retry_after

from tests.support import REPOSITORY, Daemon, running_daemon, wait_until

CONFIG = """
[server]
metrics_address = "off"

[pools.python]
backend = "process"
min_idle = 1
max_size = 3
timeout_s = 5
max_timeout_s = 20

[pools.tiny]
backend = "process"
min_idle = 0
max_size = 1
max_queue = 1
acquire_timeout_s = 10
"""
PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"


@pytest.fixture(scope="module")
def small_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("client-package"), CONFIG) as running:
        yield running


@pytest.fixture
def sandpool(small_daemon: Daemon) -> Iterator[Client]:
    with Client(small_daemon.socket) as client:
        yield client


def test_run_returns_output_exit_code_and_the_rest_of_the_answer(sandpool: Client) -> None:
    result = sandpool.run(
        "import os, sys\n"
        "print(sys.stdin.read(), os.environ['MODE'], sys.argv[1:])\n"
        "print('err', file=sys.stderr)\n"
        "sys.exit(3)\n",
        stdin="in", env={"MODE": "fast"}, argv=["-v", "two words"], timeout_s=5,
    )
    assert (result.stdout, result.stderr, result.exit_code) == (
        "in fast ['-v', 'two words']\n", "err\n", 3)
    assert (result.timed_out, result.oom_killed, result.ok) == (False, False, False)
    assert (result.stdout_truncated, result.stderr_truncated) == (False, False)
    assert result.pool == "python"
    assert result.sandbox_id
    assert result.duration_ms > 0
    assert result.queued_ms >= 0
    assert sandpool.run("print(1)", language="python").ok


def test_a_timeout_and_an_uncaught_exception_are_results(sandpool: Client) -> None:
    result = sandpool.run("while True: pass", timeout_s=0.5)
    assert (result.timed_out, result.exit_code, result.ok) == (True, None, False)
    result = sandpool.run("def f():\n    return {}['total']\nf()\n")
    assert result.error is not None
    assert (result.error.name, result.error.value) == ("KeyError", "'total'")
    assert "return {}['total']" in result.error.traceback


def test_files_go_in_and_come_back_typed(sandpool: Client, tmp_path: Path) -> None:
    result = sandpool.run(
        "import os\n"
        "os.makedirs('out/sub')\n"
        "open('out/sub/copy.bin', 'wb').write(open('raw.bin', 'rb').read())\n"
        "open('out/text.csv', 'w').write(open('data/in.csv').read())\n"
        "open('out/utf8.bin', 'wb').write(open('utf8.bin', 'rb').read())\n"
        "os.symlink('/etc/passwd', 'out/link')\n"
        "{'answer': 6 * 7}\n",
        files={"data/in.csv": "a,é\n", "raw.bin": b"\0\xff", "utf8.bin": "\0é\r\n".encode()},
    )
    assert result.ok, result.stderr
    files = {entry.path: entry for entry in result.files}
    assert set(files) == {"out/sub/copy.bin", "out/text.csv", "out/utf8.bin", "out/link"}
    # Sent as text (valid UTF-8), back byte for byte.
    assert files["out/utf8.bin"].content == "\0é\r\n".encode()
    assert (files["out/sub/copy.bin"].content, files["out/sub/copy.bin"].size) == (b"\0\xff", 2)
    assert files["out/text.csv"].content == "a,é\n".encode()
    assert (files["out/link"].type, files["out/link"].content) == ("symlink", None)
    assert [(r.type, r.text) for r in result.results] == [("text/plain", "{'answer': 42}")]
    written = result.save_files(tmp_path)
    assert sorted(written) == [tmp_path / "out/sub/copy.bin", tmp_path / "out/text.csv",
                               tmp_path / "out/utf8.bin"]
    assert (tmp_path / "out/sub/copy.bin").read_bytes() == b"\0\xff"
    assert not (tmp_path / "out/link").exists()


def test_bytes_travel_as_text_when_that_is_lossless_else_as_base64() -> None:
    assert file_entry("a.csv", "x,é\n".encode()) == {
        "path": "a.csv", "content": "x,é\n", "encoding": "utf-8"}
    assert file_entry("b.bin", b"\0\xff") == {
        "path": "b.bin", "content": "AP8=", "encoding": "base64"}
    assert file_entry("c.txt", "\udc80") == {
        "path": "c.txt", "content": "\udc80", "encoding": "utf-8"}


def test_a_bad_request_raises_bad_request_with_the_daemons_code(sandpool: Client) -> None:
    with pytest.raises(BadRequest) as caught:
        sandpool.run("1", timeout_s=0)
    assert (caught.value.status, caught.value.code) == (400, "invalid_timeout")
    assert caught.value.message == "timeout_s must be greater than 0 and at most 20 for pool " \
                                   "'python'"
    with pytest.raises(BadRequest) as caught:
        sandpool.run("1", files={"../x": "y"})
    assert (caught.value.code, caught.value.message) == (
        "invalid_path", "files[0].path '../x' has a '..' component")
    with pytest.raises(BadRequest) as caught:
        sandpool.run("1", pool="nope")
    assert (caught.value.status, caught.value.code) == (404, "unknown_pool")


def test_pools_are_typed(sandpool: Client) -> None:
    pools = {p.name: p for p in sandpool.pools()}
    assert set(pools) == {"python", "tiny"}
    assert (pools["tiny"].backend, pools["tiny"].language, pools["tiny"].max_size) == (
        "process", "python", 1)
    assert pools["python"].runtime_version.startswith("3.")


@contextlib.contextmanager
def tiny_pool_full(small_daemon: Daemon, hold_s: float) -> Iterator[None]:
    """``tiny`` with its one sandbox busy for ``hold_s`` and its queue of one taken."""

    def tiny(code: str) -> RunResult:
        with Client(small_daemon.socket) as client:
            return client.run(code, pool="tiny", timeout_s=15)

    def busy() -> int:
        with Client(small_daemon.socket) as client:
            return next(p.busy for p in client.pools() if p.name == "tiny")

    with ThreadPoolExecutor(2) as executor:
        running: Future[RunResult] = executor.submit(
            tiny, f"import time; time.sleep({hold_s}); print('ran')")
        wait_until(lambda: busy() == 1, "tiny's sandbox to be busy")
        queued = executor.submit(tiny, "print('queued')")
        time.sleep(0.3)  # let it reach the queue
        yield
        assert running.result(timeout=30).stdout == "ran\n"
        assert queued.result(timeout=30).stdout == "queued\n"


def test_an_exhausted_pool_raises_unavailable_with_retry_after(
    small_daemon: Daemon, sandpool: Client
) -> None:
    with tiny_pool_full(small_daemon, hold_s=3):
        with pytest.raises(Unavailable) as caught:
            sandpool.run("print('refused')", pool="tiny")
        assert (caught.value.status, caught.value.code) == (503, "pool_exhausted")
        assert caught.value.retry_after is not None
        assert caught.value.retry_after >= 1
        assert caught.value.message


def test_retries_wait_out_retry_after_until_the_pool_has_room(small_daemon: Daemon) -> None:
    with tiny_pool_full(small_daemon, hold_s=2):
        began = time.monotonic()
        with Client(small_daemon.socket, retries=20) as patient:
            result = patient.run("print('late')", pool="tiny")
        # Refused at first (the pool was full), then sent again each Retry-After (1 s).
        assert time.monotonic() - began >= 1.0
        assert result.stdout == "late\n"


def test_retries_give_up_with_the_last_503(small_daemon: Daemon) -> None:
    with tiny_pool_full(small_daemon, hold_s=4):
        began = time.monotonic()
        with Client(small_daemon.socket, retries=1) as client, pytest.raises(Unavailable):
            client.run("print('refused')", pool="tiny")
        assert time.monotonic() - began >= 1.0  # one wait of Retry-After before the second


def test_the_read_timeout_follows_the_runs_timeout(small_daemon: Daemon) -> None:
    slow = "import time; time.sleep(2); print('done')"
    with Client(small_daemon.socket, request_timeout_s=0.5) as client:
        # timeout_s given: read timeout is timeout_s + queueing slack, not 0.5 s.
        assert client.run(slow, timeout_s=10).stdout == "done\n"
        # No timeout_s: only request_timeout_s, and running out of it is its own error.
        with pytest.raises(RequestTimeout) as caught:
            client.run(slow)
    assert caught.value.code == "request_timeout"


async def test_async_client_runs_concurrently(small_daemon: Daemon) -> None:
    async with AsyncClient(small_daemon.socket) as client:
        first, second = await asyncio.gather(
            client.run("import time; time.sleep(0.5); print(1)"),
            client.run("import time; time.sleep(0.5); print(2)"),
        )
        assert (first.stdout, second.stdout) == ("1\n", "2\n")
        assert first.sandbox_id != second.sandbox_id
        result = await client.run("print(open('in.txt').read())", files={"in.txt": "hi"})
        assert result.stdout == "hi\n"
        assert "tiny" in {p.name for p in await client.pools()}
        with pytest.raises(BadRequest) as caught:
            await client.run("1", argv=["\0"])
        assert caught.value.code == "invalid_argv"


def test_no_daemon_is_daemon_unreachable(tmp_path: Path) -> None:
    missing = tmp_path / "none.sock"
    with Client(missing) as client, pytest.raises(DaemonUnreachable) as caught:
        client.run("1")
    assert caught.value.code == "daemon_unreachable"
    assert str(missing) in caught.value.message
    assert caught.value.status is None
    # A socket file nobody listens on: what a crashed daemon leaves.
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bound:
        bound.bind(str(stale))
    with Client(stale) as client, pytest.raises(DaemonUnreachable) as caught:
        client.pools()
    assert caught.value.code == "daemon_unreachable"


async def test_no_daemon_is_daemon_unreachable_async(tmp_path: Path) -> None:
    async with AsyncClient(tmp_path / "none.sock") as client:
        with pytest.raises(DaemonUnreachable):
            await client.run("1")


def test_sandpool_run_uses_the_client(small_daemon: Daemon, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "api.cli", "run"]
    done = subprocess.run(
        [*base, "--socket", small_daemon.socket, "--out-dir", str(tmp_path / "kept"), "-c",
         "import os, sys\nos.makedirs('out', exist_ok=True)\nopen('out/r.txt', 'w').write('ok')\n"
         "print('x'); print('e', file=sys.stderr)\n6 * 7\n"],
        capture_output=True, text=True, timeout=60, cwd=REPOSITORY,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "x\n42\n", "e\n")
    assert (tmp_path / "kept/out/r.txt").read_text() == "ok"
    done = subprocess.run([*base, "--socket", str(tmp_path / "none.sock"), "-c", "1"],
                          capture_output=True, text=True, timeout=60, cwd=REPOSITORY)
    assert (done.returncode, done.stderr) == (
        125, f"sandpool: no sandpool daemon at {tmp_path / 'none.sock'} "
        "(start it: sandpool serve)\n")


# --- no daemon: the TCP form, Retry-After, the retry cap, results by hand ----------


def answer(status: int, body: bytes, **headers: str) -> httpx.Response:
    return httpx.Response(status, content=body, headers={"Content-Type": "application/json",
                                                         **headers})


RESULT = (b'{"exit_code": 0, "stdout": "ok\\n", "stderr": "", "timed_out": false, '
          b'"oom_killed": false, "stdout_truncated": false, "stderr_truncated": false, '
          b'"duration_ms": 1.5, "queued_ms": 0.1, "pool": "python", "sandbox_id": "s1"}')
EXHAUSTED = b'{"error": {"code": "pool_exhausted", "message": "pool \'python\' is full"}}'


def test_base_url_and_token_reach_the_server_as_a_bearer_header() -> None:
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answer(200, RESULT)

    with Client(base_url="https://sandpool.example:8443/api", token="s3cret",
                transport=httpx.MockTransport(server)) as client:
        result = client.run("print('ok')", timeout_s=3)
    assert (result.stdout, result.exit_code, result.files, result.error) == ("ok\n", 0, (), None)
    assert str(seen[0].url) == "https://sandpool.example:8443/api/v1/run"
    assert seen[0].headers["Authorization"] == "Bearer s3cret"
    assert seen[0].headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError, match="not both"):
        Client("/tmp/x.sock", base_url="https://sandpool.example")


async def test_retries_count_and_a_long_retry_after_is_not_waited_out() -> None:
    answers = [answer(503, EXHAUSTED, **{"Retry-After": "0"})] * 2 + [answer(200, RESULT)]
    sent: list[int] = []

    def server(request: httpx.Request) -> httpx.Response:
        sent.append(1)
        return answers[len(sent) - 1]

    async with AsyncClient(base_url="http://sandpool.test", retries=2,
                           transport=httpx.MockTransport(server)) as client:
        assert (await client.run("1")).stdout == "ok\n"
    assert len(sent) == 3
    sent.clear()
    async with AsyncClient(base_url="http://sandpool.test", retries=1,
                           transport=httpx.MockTransport(server)) as client:
        with pytest.raises(Unavailable) as caught:
            await client.run("1")
    assert (len(sent), caught.value.code, caught.value.retry_after) == (2, "pool_exhausted", 0)

    def closed_for_an_hour(request: httpx.Request) -> httpx.Response:
        sent.append(1)
        return answer(503, EXHAUSTED, **{"Retry-After": "3600"})

    sent.clear()
    began = time.monotonic()
    with Client(base_url="http://sandpool.test", retries=5,
                transport=httpx.MockTransport(closed_for_an_hour)) as client, \
            pytest.raises(Unavailable) as caught:
        client.run("1")
    assert (len(sent), caught.value.retry_after) == (1, 3600)
    assert time.monotonic() - began < 5


def test_retry_after_as_seconds_or_an_http_date() -> None:
    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    assert parse_retry_after("2", now) == 2.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:25 GMT", now) == 5.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_an_answer_that_is_not_a_result_is_invalid_response() -> None:
    for body in (b'{"stdout": 1}', b"[1]"):
        not_a_result = httpx.MockTransport(lambda r, body=body: answer(200, body))
        with Client(base_url="http://sandpool.test", transport=not_a_result) as client, \
                pytest.raises(SandpoolClientError) as caught:
            client.run("1")
        assert caught.value.code == "invalid_response"
    a_proxys_page = httpx.MockTransport(lambda r: httpx.Response(502, content=b"<html>bad"))
    with Client(base_url="http://sandpool.test", transport=a_proxys_page) as client, \
            pytest.raises(SandpoolClientError) as caught:
        client.run("1")
    assert (caught.value.code, caught.value.status) == ("invalid_response", 502)


def test_code_that_is_not_utf8_still_travels() -> None:
    # A file read with surrogateescape (as `sandpool run FILE` reads one) holds lone surrogates.
    assert encode_json({"code": "print(1)  # \udcff"}) == b'{"code": "print(1)  # \\udcff"}'


def test_images_and_files_are_saved_by_their_helpers(tmp_path: Path) -> None:
    png = base64.b64encode(PNG).decode()
    result = RunResult.from_json({
        "exit_code": 0, "stdout": "", "stderr": "", "timed_out": False, "oom_killed": False,
        "stdout_truncated": False, "stderr_truncated": False, "duration_ms": 1.0,
        "queued_ms": 0.0, "pool": "datasci", "sandbox_id": "s",
        "files": [{"path": "out/a.csv", "type": "file", "size": 2, "content": "eHk=",
                   "truncated": False}],
        "files_omitted": 0,
        "results": [{"type": "image/png", "data": png, "truncated": False},
                    {"type": "text/plain", "data": "3.5", "truncated": False},
                    {"type": "image/png", "data": png, "truncated": False}],
        "results_omitted": 0, "error": None, "a_field_of_tomorrow": True,
    })
    assert [image.data for image in result.images] == [PNG, PNG]
    assert result.results[1].text == "3.5"
    assert result.save_images(tmp_path / "shown") == [
        tmp_path / "shown/result-1.png", tmp_path / "shown/result-2.png"]
    assert (tmp_path / "shown/result-2.png").read_bytes() == PNG
    (tmp_path / "out").mkdir()
    (tmp_path / "out/a.csv").symlink_to(tmp_path / "elsewhere")
    # Never through a link at the file's own name (O_NOFOLLOW: ELOOP).
    with pytest.raises(OSError, match="symbolic links"):
        result.save_files(tmp_path)
    assert not (tmp_path / "elsewhere").exists()
    escaping = RunResult.from_json({**_fields(result), "files": [
        {"path": "../x", "type": "file", "size": 1, "content": "eA==", "truncated": False}]})
    with pytest.raises(ValueError, match="refusing"):
        escaping.save_files(tmp_path)


def _fields(result: RunResult) -> dict[str, object]:
    return {"exit_code": result.exit_code, "stdout": result.stdout, "stderr": result.stderr,
            "timed_out": False, "oom_killed": False, "stdout_truncated": False,
            "stderr_truncated": False, "duration_ms": 1.0, "queued_ms": 0.0,
            "pool": result.pool, "sandbox_id": result.sandbox_id}
