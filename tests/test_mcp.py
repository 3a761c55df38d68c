"""``sandpool mcp`` end to end: the MCP SDK's own client against the server as users start it.

One daemon for the module: ``python-process`` (process tier) for ordinary runs and
sessions, and ``datasci`` (fork tier, numpy, pandas and matplotlib preloaded) for a
chart. Over
stdio the client spawns ``sandpool mcp`` itself, as an MCP host does; over
streamable HTTP the test starts the server on a free loopback port. The result's
translation to MCP content is also checked alone, on results built by hand.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, ImageContent, TextContent
from sandpool_client import (
    Client,
    RichResult,
    RunError,
    RunResult,
    SandpoolClientError,
    SessionEnded,
    Unavailable,
)

from api.mcp_server import (
    FileArgument,
    error_result,
    run_code_result,
    session_run_result,
    upload_files,
)
from tests.support import REPOSITORY, Daemon, free_port, running_daemon, wait_until

CONFIG = """
[server]
metrics_address = "off"

[pools.python-process]
backend = "process"
min_idle = 1
max_size = 4
timeout_s = 10
max_timeout_s = 30

[pools.datasci]
backend = "fork"
image = "sandpool/datasci:bookworm"
preload = ["numpy", "pandas", "matplotlib.pyplot"]
memory_mb = 384
min_idle = 1
max_size = 2
timeout_s = 20
max_timeout_s = 60
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SERVER_START_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def mcp_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("mcp"), CONFIG) as running:
        yield running


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[TextIO]:
    """Where a stdio server's stderr goes (the SDK's client needs a real file)."""
    with open(tmp_path / "mcp.log", "a") as log:
        yield log


@pytest.fixture
def sandpool(mcp_daemon: Daemon) -> Iterator[Client]:
    """A client of the daemon beside the MCP server (the same user); after the test, no
    session is left, whoever made it."""
    with Client(mcp_daemon.socket) as client:
        yield client
        wait_until(lambda: client.sessions() == [], "every session to end")


@contextlib.asynccontextmanager
async def stdio_session(
    socket_path: str, errlog: TextIO, idle_timeout_s: float | None = None
) -> AsyncIterator[ClientSession]:
    """An initialized session with ``sandpool mcp`` spawned by the SDK's stdio client."""
    args = ["-m", "api.cli", "mcp", "--socket", socket_path]
    if idle_timeout_s is not None:
        args += ["--session-idle-timeout-s", str(idle_timeout_s)]
    server = StdioServerParameters(command=sys.executable, args=args, cwd=REPOSITORY)
    async with stdio_client(server, errlog=errlog) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        yield session


@contextlib.contextmanager
def http_server(socket_path: str, errlog: Path) -> Iterator[str]:
    """``sandpool mcp --transport streamable-http`` on a free port; yields its URL.

    Stopped with SIGTERM and waited for, whatever happens: uvicorn shuts down
    gracefully, then raises the signal again, so the status is -SIGTERM.
    """
    port = free_port()
    with open(errlog, "a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "mcp", "--socket", socket_path,
             "--transport", "streamable-http", "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=REPOSITORY,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not port_open(port):
            assert process.poll() is None, f"sandpool mcp exited:\n{errlog.read_text()}"
            assert time.monotonic() < deadline, f"not listening:\n{errlog.read_text()}"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        try:
            assert process.wait(timeout=15) in (0, -signal.SIGTERM), errlog.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def text_of(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if isinstance(block, TextContent))


def images_of(result: CallToolResult) -> list[ImageContent]:
    return [block for block in result.content if isinstance(block, ImageContent)]


async def run_code(session: ClientSession, **arguments: Any) -> CallToolResult:
    return await session.call_tool("run_code", arguments)


async def test_stdio_lists_run_code_and_list_pools_with_their_schemas(
    mcp_daemon: Daemon, server_log: TextIO
) -> None:
    async with stdio_session(mcp_daemon.socket, server_log) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        server_info = (await session.initialize()).server_info  # the handshake's, kept
    assert (server_info.name, server_info.version) == ("sandpool", metadata.version("sandpool"))
    assert set(tools) == {
        "run_code", "list_pools", "session_create", "session_run", "session_close"}
    assert set(tools["session_run"].input_schema["required"]) == {"session_id", "code"}
    assert set(tools["session_run"].input_schema["properties"]) == {
        "session_id", "code", "stdin", "timeout_s", "files"}
    assert set(tools["session_create"].input_schema["properties"]) == {"pool", "ttl_s"}
    assert "300 s without a run" in (tools["session_create"].description or "")
    schema = tools["run_code"].input_schema
    assert schema["required"] == ["code"]
    assert set(schema["properties"]) == {"code", "language", "pool", "stdin", "timeout_s", "files"}
    file_schema = schema["$defs"]["FileArgument"]
    assert set(file_schema["properties"]) == {"path", "content", "encoding"}
    assert file_schema["properties"]["encoding"]["enum"] == ["utf-8", "base64"]
    assert tools["list_pools"].annotations is not None
    assert tools["list_pools"].annotations.read_only_hint is True


async def test_run_code_returns_stdout_stderr_exit_code_and_reads_stdin_and_files(
    mcp_daemon: Daemon, server_log: TextIO
) -> None:
    code = (
        "import sys\n"
        "print(sys.stdin.read(), open('data/in.txt').read(), open('blob', 'rb').read())\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    async with stdio_session(mcp_daemon.socket, server_log) as session:
        result = await run_code(
            session, code=code, pool="python-process", stdin="in", timeout_s=10,
            files=[{"path": "data/in.txt", "content": "text"},
                   {"path": "blob", "content": base64.b64encode(b"\x00\xff").decode(),
                    "encoding": "base64"}],
        )
    assert not result.is_error, text_of(result)
    text = text_of(result)
    assert text.startswith("exit_code: 3 (pool python-process,")
    assert "stdout:\nin text b'\\x00\\xff'\n" in text
    assert "stderr:\nto stderr\n" in text
    assert result.structured_content is not None
    assert result.structured_content["exit_code"] == 3
    assert result.structured_content["stdout"] == "in text b'\\x00\\xff'\n"
    assert result.structured_content["timed_out"] is False


async def test_the_language_picks_a_pool_and_an_uncaught_exception_is_reported(
    mcp_daemon: Daemon, server_log: TextIO
) -> None:
    async with stdio_session(mcp_daemon.socket, server_log) as session:
        result = await run_code(session, code="1 / 0", language="python")
    assert not result.is_error  # the program failed; the tool did not
    text = text_of(result)
    assert "exit_code: 1 (pool python-process," in text
    assert "error: ZeroDivisionError: division by zero" in text


async def test_a_timeout_is_a_verdict_in_the_text(
    mcp_daemon: Daemon, server_log: TextIO
) -> None:
    async with stdio_session(mcp_daemon.socket, server_log) as session:
        result = await run_code(
            session, code="import time\ntime.sleep(30)", pool="python-process", timeout_s=1
        )
    assert not result.is_error
    assert text_of(result).startswith("exit_code: None, timed_out (pool python-process,")


async def test_a_chart_comes_back_as_png_image_content(
    mcp_daemon: Daemon, server_log: TextIO
) -> None:
    code = (
        "import matplotlib.pyplot as plt\n"
        "import pandas as pd\n"
        "pd.Series([1, 3, 2]).plot()\n"
        "plt.show()\n"
        "print('plotted')\n"
    )
    async with stdio_session(mcp_daemon.socket, server_log) as session:
        result = await run_code(session, code=code, pool="datasci", timeout_s=30)
    assert not result.is_error, text_of(result)
    assert "stdout:\nplotted\n" in text_of(result)
    [image] = images_of(result)
    assert image.mime_type == "image/png"
    assert base64.b64decode(image.data, validate=True).startswith(PNG_SIGNATURE)


async def test_list_pools_names_backend_language_and_runtime(
    mcp_daemon: Daemon, server_log: TextIO
) -> None:
    async with stdio_session(mcp_daemon.socket, server_log) as session:
        result = await session.call_tool("list_pools", {})
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    pools = {p["name"]: p for p in result.structured_content["pools"]}
    assert set(pools) == {"python-process", "datasci"}
    assert (pools["python-process"]["backend"], pools["python-process"]["language"]) == (
        "process", "python")
    assert pools["datasci"]["backend"] == "fork"
    assert "pandas" in pools["datasci"]["runtime"]["packages"]
    assert pools["datasci"]["runtime"]["version"].startswith("3.")
    assert '"name": "datasci"' in text_of(result)  # the same, as text a model reads


async def test_a_daemon_refusal_is_a_tool_error_with_its_code_and_the_server_goes_on(
    mcp_daemon: Daemon, server_log: TextIO
) -> None:
    async with stdio_session(mcp_daemon.socket, server_log) as session:
        unknown = await run_code(session, code="print(1)", pool="no-such-pool")
        bad_timeout = await run_code(session, code="print(1)", pool="python-process",
                                     timeout_s=1000)
        bad_file = await run_code(session, code="print(1)", pool="python-process",
                                  files=[{"path": "../x", "content": "x"}])
        after = await run_code(session, code="print('still here')", pool="python-process")
        pools = await session.call_tool("list_pools", {})
    assert unknown.is_error
    assert text_of(unknown) == "unknown_pool: no pool named 'no-such-pool'"
    assert unknown.structured_content == {"error": {
        "code": "unknown_pool", "message": "no pool named 'no-such-pool'", "status": 404}}
    assert bad_timeout.is_error
    assert text_of(bad_timeout).startswith("invalid_timeout: ")
    assert bad_file.is_error
    assert text_of(bad_file).startswith("invalid_path: ")
    assert not after.is_error
    assert "stdout:\nstill here\n" in text_of(after)
    assert not pools.is_error


async def test_an_unreachable_daemon_is_a_tool_error(tmp_path: Path, server_log: TextIO) -> None:
    missing = str(tmp_path / "no-daemon.sock")
    async with stdio_session(missing, server_log) as session:
        result = await run_code(session, code="print(1)")
        pools = await session.call_tool("list_pools", {})
    assert result.is_error
    assert text_of(result).startswith("daemon_unreachable: ")
    assert missing in text_of(result)
    assert pools.is_error


async def test_streamable_http_serves_the_same_tools(mcp_daemon: Daemon, tmp_path: Path) -> None:
    with http_server(mcp_daemon.socket, tmp_path / "mcp-http.log") as url:
        async with streamable_http_client(url) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            tools = {tool.name for tool in (await session.list_tools()).tools}
            ran = await run_code(session, code="print(6 * 7)", pool="python-process")
            refused = await run_code(session, code="print(1)", pool="no-such-pool")
            again = await run_code(session, code="print('again')", pool="python-process")
    assert {"run_code", "list_pools", "session_run"} <= tools
    assert not ran.is_error, text_of(ran)
    assert text_of(ran).startswith("exit_code: 0 (pool python-process,")
    assert "stdout:\n42\n" in text_of(ran)
    assert refused.is_error
    assert text_of(refused).startswith("unknown_pool: ")
    assert "stdout:\nagain\n" in text_of(again)


async def session_create(session: ClientSession, **arguments: Any) -> str:
    """A new session's id, as the model reads it in the text."""
    created = await session.call_tool("session_create", arguments)
    assert not created.is_error, text_of(created)
    assert created.structured_content is not None
    session_id: str = created.structured_content["session_id"]
    assert text_of(created).startswith(f"session_id: {session_id}\n")
    return session_id


async def session_run(session: ClientSession, session_id: str, code: str,
                      **arguments: Any) -> CallToolResult:
    return await session.call_tool(
        "session_run", {"session_id": session_id, "code": code, **arguments})


def live_ids(client: Client) -> set[str]:
    return {info.session_id for info in client.sessions()}


async def test_a_session_keeps_state_between_runs_until_closed(
    mcp_daemon: Daemon, sandpool: Client, server_log: TextIO
) -> None:
    async with stdio_session(mcp_daemon.socket, server_log) as session:
        session_id = await session_create(session, pool="python-process")
        assert session_id in live_ids(sandpool)
        assert sandpool.resume_session(session_id).idle_timeout_s == 300  # the default
        first = await session_run(session, session_id, "x = 41\nopen('kept.txt', 'w').write('k')")
        second = await session_run(
            session, session_id, "print(x + 1, open('kept.txt').read(), open('in.txt').read())",
            files=[{"path": "in.txt", "content": "given"}])
        closed = await session.call_tool("session_close", {"session_id": session_id})
        after = await session_run(session, session_id, "print(x)")
        again = await session.call_tool("session_close", {"session_id": session_id})
    assert not first.is_error, text_of(first)
    assert not second.is_error, text_of(second)
    assert text_of(second).startswith("exit_code: 0 (pool python-process,")
    assert "stdout:\n42 k given\n" in text_of(second)
    assert second.structured_content is not None
    assert second.structured_content["session_ended"] is False
    assert not closed.is_error
    assert text_of(closed) == f"session {session_id} ended: deleted"
    assert after.is_error
    assert text_of(after).startswith("session_ended: ")
    assert after.structured_content is not None
    assert after.structured_content["error"]["reason"] == "deleted"
    assert not again.is_error  # closing an ended session is not an error
    assert text_of(again) == f"session {session_id} ended: deleted"
    assert session_id not in live_ids(sandpool)


async def test_a_run_that_times_out_ends_the_session_and_says_so(
    mcp_daemon: Daemon, sandpool: Client, server_log: TextIO
) -> None:
    async with stdio_session(mcp_daemon.socket, server_log) as session:
        session_id = await session_create(session, pool="python-process")
        killed = await session_run(session, session_id, "while True: pass", timeout_s=0.5)
        later = await session_run(session, session_id, "print(1)")
    assert not killed.is_error  # the run happened; its verdict says how it ended
    assert text_of(killed).startswith("exit_code: None, timed_out")
    assert "the session ended with this run" in text_of(killed)
    assert later.is_error
    assert later.structured_content is not None
    assert later.structured_content["error"]["reason"] == "timed_out"
    assert "timed_out" in text_of(later)


async def test_an_unknown_session_and_a_refused_pool_are_tool_errors(
    mcp_daemon: Daemon, sandpool: Client, server_log: TextIO
) -> None:
    async with stdio_session(mcp_daemon.socket, server_log) as session:
        unknown = await session_run(session, session_id="s-unknown", code="print(1)")
        unknown_close = await session.call_tool("session_close", {"session_id": "s-unknown"})
        no_pool = await session.call_tool("session_create", {"pool": "no-such-pool"})
        still = await run_code(session, code="print('still here')", pool="python-process")
    assert unknown.is_error
    assert text_of(unknown).startswith("session_not_found: ")
    assert unknown_close.is_error
    assert text_of(unknown_close).startswith("session_not_found: ")
    assert no_pool.is_error
    assert text_of(no_pool).startswith("unknown_pool: ")
    assert "stdout:\nstill here\n" in text_of(still)


async def test_sessions_the_server_created_are_closed_when_it_exits(
    mcp_daemon: Daemon, sandpool: Client, server_log: TextIO
) -> None:
    async with stdio_session(mcp_daemon.socket, server_log) as session:
        forgotten = [await session_create(session, pool="python-process") for _ in range(2)]
        assert set(forgotten) <= live_ids(sandpool)
    # The host went away (stdin closed): the server closed both on its way out,
    # rather than leaving them to their idle timeout.
    wait_until(lambda: not set(forgotten) & live_ids(sandpool), "the sessions to be closed")
    for session_id in forgotten:
        with pytest.raises(SessionEnded) as ended:
            sandpool.resume_session(session_id)
        assert ended.value.reason == "deleted"


def test_sigterm_with_the_host_still_attached_closes_the_sessions_and_ends_the_server(
    mcp_daemon: Daemon, sandpool: Client, server_log: TextIO
) -> None:
    """A host that signals before it closes stdin: the server must not wait for stdin."""
    process = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "mcp", "--socket", mcp_daemon.socket],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=server_log, text=True,
        cwd=REPOSITORY,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        for message in (
            {"id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "a-host", "version": "0"}}},
            {"method": "notifications/initialized"},
            {"id": 2, "method": "tools/call", "params": {
                "name": "session_create", "arguments": {"pool": "python-process"}}},
        ):
            process.stdin.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
            process.stdin.flush()
        process.stdout.readline()  # initialize's answer
        created = json.loads(process.stdout.readline())["result"]
        session_id = created["structuredContent"]["session_id"]
        assert session_id in live_ids(sandpool)
        process.send_signal(signal.SIGTERM)  # stdin stays open
        status = process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdin.close()
        process.stdout.close()
    assert status == -signal.SIGTERM
    with pytest.raises(SessionEnded) as ended:
        sandpool.resume_session(session_id)
    assert ended.value.reason == "deleted"


async def test_a_session_the_agent_leaves_open_ends_by_the_idle_timeout(
    mcp_daemon: Daemon, sandpool: Client, server_log: TextIO
) -> None:
    async with stdio_session(mcp_daemon.socket, server_log, idle_timeout_s=1.5) as session:
        session_id = await session_create(session, pool="python-process")
        assert sandpool.resume_session(session_id).idle_timeout_s == 1.5
        ran = await session_run(session, session_id, "x = 1")
        assert not ran.is_error, text_of(ran)
        wait_until(lambda: session_id not in live_ids(sandpool), "the idle session to end",
                   timeout_s=15)
        later = await session_run(session, session_id, "print(x)")
    assert later.is_error
    assert later.structured_content is not None
    assert later.structured_content["error"]["reason"] == "idle"


async def test_streamable_http_closes_its_sessions_on_sigterm(
    mcp_daemon: Daemon, sandpool: Client, tmp_path: Path
) -> None:
    with http_server(mcp_daemon.socket, tmp_path / "mcp-http.log") as url:
        async with streamable_http_client(url) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            session_id = await session_create(session, pool="python-process")
            ran = await session_run(session, session_id, "y = 2")
            assert not ran.is_error, text_of(ran)
        assert session_id in live_ids(sandpool)  # the MCP client left; the server holds it
    # http_server stopped the server with SIGTERM and waited for its exit.
    with pytest.raises(SessionEnded) as ended:
        sandpool.resume_session(session_id)
    assert ended.value.reason == "deleted"


def test_a_host_on_the_first_protocol_revision_gets_text_and_is_error(
    mcp_daemon: Daemon, server_log: TextIO
) -> None:
    """Hosts built on older SDKs handshake with 2024-11-05; JSON lines written by hand."""
    process = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "mcp", "--socket", mcp_daemon.socket],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=server_log, text=True,
        cwd=REPOSITORY,
    )

    def send(message: dict[str, Any]) -> None:
        assert process.stdin is not None
        process.stdin.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
        process.stdin.flush()

    def answer() -> dict[str, Any]:
        assert process.stdout is not None
        reply: dict[str, Any] = json.loads(process.stdout.readline())
        return reply

    try:
        send({"id": 1, "method": "initialize", "params": {
            "protocolVersion": "2024-11-05", "capabilities": {},
            "clientInfo": {"name": "an-old-host", "version": "0"}}})
        assert answer()["result"]["protocolVersion"] == "2024-11-05"
        send({"method": "notifications/initialized"})
        send({"id": 2, "method": "tools/call", "params": {
            "name": "run_code", "arguments": {"code": "print(2 + 2)", "pool": "python-process"}}})
        ran = answer()["result"]
        send({"id": 3, "method": "tools/call", "params": {
            "name": "run_code", "arguments": {"code": "print(1)", "pool": "no-such-pool"}}})
        refused = answer()["result"]
    finally:
        process.stdin.close()  # the host goes away: the server ends by itself
        try:
            status = process.wait(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
    assert status == 0
    assert ran["isError"] is False
    assert ran["content"][0]["type"] == "text"
    assert "stdout:\n4\n" in ran["content"][0]["text"]
    assert refused["isError"] is True
    assert refused["content"][0]["text"].startswith("unknown_pool: ")


def test_the_http_transport_refuses_a_host_that_is_not_loopback() -> None:
    answer = subprocess.run(
        [sys.executable, "-m", "api.cli", "mcp", "--transport", "streamable-http",
         "--host", "0.0.0.0"],
        capture_output=True, text=True, timeout=60, cwd=REPOSITORY,
    )
    assert answer.returncode == 1
    assert "loopback only" in answer.stderr


# The translation alone, on results built by hand.

def result_with(**fields: Any) -> RunResult:
    defaults: dict[str, Any] = {
        "exit_code": 0, "stdout": "", "stderr": "", "timed_out": False, "oom_killed": False,
        "stdout_truncated": False, "stderr_truncated": False, "duration_ms": 12.0,
        "queued_ms": 0.0, "pool": "datasci", "sandbox_id": "s1",
    }
    return RunResult(**{**defaults, **fields})


def test_every_whole_png_figure_becomes_image_content_and_the_rest_is_named() -> None:
    png = PNG_SIGNATURE + b"rest"
    result = run_code_result(result_with(results=(
        RichResult("image/png", png, None, False),
        RichResult("text/plain", b"3.5", "3.5", False),
        RichResult("image/png", PNG_SIGNATURE, None, True),
        RichResult("image/svg+xml", b"<svg/>", None, False),
        RichResult("image/png", png + b"2", None, False),
    )))
    assert [base64.b64decode(i.data) for i in images_of(result)] == [png, png + b"2"]
    text = text_of(result)
    assert "result (text/plain):\n3.5" in text
    assert "figures: 2 image(s) follow" in text
    assert "some results were cut" in text


def test_verdicts_and_the_error_lead_the_text() -> None:
    text = text_of(run_code_result(result_with(
        exit_code=None, oom_killed=True, stdout_truncated=True,
        error=RunError("MemoryError", "", "Traceback ..."),
    )))
    assert text.startswith("exit_code: None, oom_killed, stdout_truncated (pool datasci, 12 ms)")
    assert "ran out of memory" in text
    assert "error: MemoryError: " in text


def test_a_session_run_the_daemon_killed_says_the_session_ended() -> None:
    killed = session_run_result(result_with(exit_code=None, timed_out=True))
    assert "the session ended with this run" in text_of(killed)
    assert killed.structured_content is not None
    assert killed.structured_content["session_ended"] is True
    failed = session_run_result(result_with(exit_code=1))  # the program's failure only
    assert "session ended" not in text_of(failed)
    ended = error_result(SessionEnded("session ended: idle", code="session_ended",
                                      status=410, reason="idle"))
    assert text_of(ended) == "session_ended: session ended: idle"
    assert ended.structured_content == {"error": {
        "code": "session_ended", "message": "session ended: idle", "status": 410,
        "reason": "idle"}}


def test_a_refusal_keeps_code_status_and_retry_after() -> None:
    result = error_result(Unavailable("pool 'x' is full", code="pool_exhausted", status=503,
                                      retry_after=2.0))
    assert result.is_error
    assert text_of(result) == "pool_exhausted: pool 'x' is full"
    assert result.structured_content == {"error": {
        "code": "pool_exhausted", "message": "pool 'x' is full", "status": 503,
        "retry_after_s": 2.0}}


def test_files_decode_base64_and_refuse_what_the_daemon_would() -> None:
    assert upload_files([FileArgument(path="a", content="text"),
                         FileArgument(path="b", content="AP8=", encoding="base64")]) == {
        "a": "text", "b": b"\x00\xff"}
    with pytest.raises(SandpoolClientError) as bad:
        upload_files([FileArgument(path="a", content="not base64!", encoding="base64")])
    assert bad.value.code == "invalid_file_content"
    with pytest.raises(SandpoolClientError) as twice:
        upload_files([FileArgument(path="a", content="1"), FileArgument(path="a", content="2")])
    assert twice.value.code == "duplicate_path"


def test_the_daemon_and_the_other_commands_never_import_the_mcp_sdk() -> None:
    probe = (
        "import sys, api.cli, api.daemon\n"
        "api.cli.build_parser()\n"
        "print(sorted(m for m in sys.modules if m == 'mcp' or m.startswith('mcp.')))\n"
    )
    answer = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, cwd=REPOSITORY, check=True)
    assert answer.stdout == "[]\n"
