"""``sandpool mcp``: a Model Context Protocol server in front of a running daemon.

An agent's MCP host (Claude Desktop, an IDE, an agent framework) gets
``run_code`` (one run in a fresh sandbox, its output as text and its figures as
images), ``list_pools``, and the session tools ``session_create``,
``session_run`` and ``session_close`` (runs that keep their state, like a
notebook's cells). The server is a client of the daemon's Unix socket through
``sandpool_client``; it holds no pool of its own, so it can be started and
stopped at will, one per MCP host, beside one daemon.

The sessions it creates are its only resources, and it bounds them twice: each
is created with an idle timeout (an agent that forgets to close one leaks a
sandbox for that long at most), and the server closes every one it created
when it exits (``McpSessions``).

Built on the official SDK (``mcp``), imported only by this command: ``sandpool
serve`` never loads it. The translation from a run's result to MCP content is
pure (``run_code_result``, ``list_pools_result``, ``error_result``), apart from
the tools that do the I/O.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import signal
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field
from sandpool_client import (
    AsyncClient,
    AsyncSession,
    PoolInfo,
    RichResult,
    RunResult,
    SandpoolClientError,
    SessionEnded,
    SessionNotFound,
)

logger = logging.getLogger(__name__)

SERVER_NAME = "sandpool"
Transport = Literal["stdio", "streamable-http"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
DEFAULT_HTTP_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
HTTP_PATH = "/mcp"
# The HTTP transport has no authentication: it is served on loopback only, so
# reaching it takes an account on this host (see docs/mcp.md).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
# Image results an MCP host can show a model; others are named in the text.
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# How long a session this server created may wait for a run: an agent that
# forgets session_close holds a sandbox this long at most.
DEFAULT_SESSION_IDLE_TIMEOUT_S = 300.0
# At exit, how long closing the sessions may take; what is left then ends by its
# idle timeout.
CLOSE_SESSIONS_TIMEOUT_S = 10.0

INSTRUCTIONS = """\
sandpool runs code in locked-down sandboxes with no network. run_code gets a fresh \
sandbox each call: nothing carries over. For step-by-step work (load data, look, \
then plot), session_create leases one sandbox whose session_run calls share \
variables, imports and files like notebook cells; session_close it when done. \
list_pools says which pools (runtimes and their packages) there are."""

RUN_CODE_DESCRIPTION = """\
Run a program in a fresh, single-use sandbox (no network, nothing kept between calls) \
and return its stdout, stderr and exit code, with the sandbox's verdicts (timed out, \
out of memory, output truncated). Python, shell or JavaScript, by `language` or by \
`pool` (see list_pools). In Python pools, matplotlib figures shown with plt.show() or \
left open come back as PNG images, and a final bare expression's value as text, as in \
a notebook cell. `files` are written into the working directory before the code \
runs; files the code leaves under out/ are listed by path and size. A program that \
fails is a normal result (its exit code and error), not a tool error; tool errors \
are sandpool refusing the request (e.g. unknown_pool, pool_exhausted), with a \
stable code."""

SESSION_CREATE_DESCRIPTION = """\
Start a session: one sandbox (no network) kept for you, where each session_run \
continues from the previous one, like notebook cells: variables, imports, files and \
the working directory persist. Returns its session_id. It ends when you call \
session_close, after {idle_s:g} s without a run, at ttl_s, or when a run times out \
or runs out of memory; then its state is gone. Python pools only; for a one-off \
program use run_code."""

SESSION_RUN_DESCRIPTION = """\
Run Python code in a session (see session_create), after its earlier runs: names \
defined before are still there. Same output as run_code: stdout, stderr, exit code, \
verdicts, a final expression's value, figures as images; files are written into \
the current directory, and files under out/ that are new or changed are listed. \
A run that times out or runs out of memory ends the session. Tool errors: \
session_ended (with the reason; create a new session), session_not_found, \
session_busy (another run of it is in flight)."""

SESSION_CLOSE_DESCRIPTION = """\
End a session and destroy its sandbox. Says why it ended (deleted, or the reason \
it had ended already: idle, expired, timed_out...); closing an ended session is \
not an error."""

LIST_POOLS_DESCRIPTION = """\
List the sandbox pools: each pool's name, backend (isolation tier), language, \
runtime version and installed packages, and its sandboxes (idle, busy, max_size). \
Pass a pool's name to run_code as `pool`."""


class FileArgument(BaseModel):
    """A file written into the sandbox's working directory before the code runs."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="relative to the sandbox's working directory, '/'-separated, "
        "e.g. data/in.csv (directories are made as needed)"
    )
    content: str = Field(description="the file's content: text, or base64 with encoding base64")
    encoding: Literal["utf-8", "base64"] = Field(
        default="utf-8", description="utf-8 (content is text) or base64 (binary content)"
    )


def upload_files(files: Sequence[FileArgument]) -> dict[str, bytes | str]:
    """``run_code``'s ``files`` as the client takes them: path to text, or to decoded bytes.

    Raises SandpoolClientError with the daemon's code for what cannot reach it
    as sent: ``invalid_file_content`` (base64 that is not strict base64) and
    ``duplicate_path`` (a mapping would silently keep one of two).
    """
    uploads: dict[str, bytes | str] = {}
    for index, entry in enumerate(files):
        if entry.path in uploads:
            raise SandpoolClientError(
                f"files[{index}].path {entry.path!r} is given twice", code="duplicate_path"
            )
        if entry.encoding == "utf-8":
            uploads[entry.path] = entry.content
            continue
        try:
            uploads[entry.path] = base64.b64decode(entry.content, validate=True)
        except (binascii.Error, ValueError):
            raise SandpoolClientError(
                f"files[{index}].content of {entry.path!r} is not valid base64",
                code="invalid_file_content",
            ) from None
    return uploads


def run_code_result(result: RunResult) -> CallToolResult:
    """A run as MCP content: one text block, then one image block per figure.

    ``structured_content`` carries the same facts as JSON for hosts that read it.
    ``is_error`` stays false for a program that failed: the run happened, and its
    exit code and error are what the model needs to see.
    """
    content: list[ContentBlock] = [TextContent(type="text", text=run_code_text(result))]
    content.extend(
        ImageContent(type="image", data=base64.b64encode(image.data).decode("ascii"),
                     mime_type=image.type)
        for image in result.images if is_shown(image)
    )
    return CallToolResult(content=content, structured_content=run_code_summary(result))


def is_shown(image: RichResult) -> bool:
    """An image result goes to the host whole, in a type a model can take, or not at all."""
    return image.type in IMAGE_TYPES and not image.truncated


def run_code_text(result: RunResult) -> str:
    """The text a model reads: the verdict line first, then each non-empty section."""
    sections = [f"exit_code: {result.exit_code}" + "".join(
        f", {flag}" for flag, is_set in (
            ("timed_out", result.timed_out), ("oom_killed", result.oom_killed),
            ("stdout_truncated", result.stdout_truncated),
            ("stderr_truncated", result.stderr_truncated),
        ) if is_set
    ) + f" (pool {result.pool}, {result.duration_ms:.0f} ms)"]
    if result.timed_out:
        sections.append("the program ran past its timeout and was killed")
    if result.oom_killed:
        sections.append("the program ran out of memory and was killed")
    if result.stdout:
        sections.append(f"stdout:\n{result.stdout}")
    if result.stderr:
        sections.append(f"stderr:\n{result.stderr}")
    for shown in result.results:
        if shown.text is not None:
            sections.append(f"result ({shown.type}):\n{shown.text}")
    figures = sum(is_shown(image) for image in result.images)
    if figures:
        sections.append(f"figures: {figures} image(s) follow")
    if figures < len(result.images) or result.results_omitted or any(
        r.truncated for r in result.results
    ):
        sections.append("some results were cut at the pool's max_results_bytes, left out, "
                        "or are images of a type not sent")
    if result.error is not None:
        sections.append(f"error: {result.error.name}: {result.error.value}")
    if result.files:
        listing = "\n".join(
            f"{f.path} ({f.type}, {f.size} bytes{', truncated' if f.truncated else ''})"
            for f in result.files
        )
        sections.append(f"files under out/:\n{listing}")
    if result.files_omitted:
        sections.append(f"{result.files_omitted} more entries under out/ were left out")
    return "\n\n".join(sections)


def run_code_summary(result: RunResult) -> dict[str, Any]:
    """The run's facts as a JSON object (images and file contents left out)."""
    return {
        "exit_code": result.exit_code,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "timed_out": result.timed_out,
        "oom_killed": result.oom_killed,
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated,
        "duration_ms": result.duration_ms,
        "pool": result.pool,
        "error": None if result.error is None else {
            "name": result.error.name, "value": result.error.value,
            "traceback": result.error.traceback,
        },
        "files": [{"path": f.path, "type": f.type, "size": f.size, "truncated": f.truncated}
                  for f in result.files],
        "images": len(result.images),
    }


def session_run_result(result: RunResult) -> CallToolResult:
    """A session's run as ``run_code_result`` says it, and whether the run ended the session.

    A run the daemon killed (a timeout, out of memory, output over the cap) took
    the session with it; the model hears it now rather than at its next call.
    """
    answer = run_code_result(result)
    ended = result.timed_out or result.oom_killed or result.exit_code is None
    if ended:
        first = answer.content[0]
        assert isinstance(first, TextContent)  # run_code_result's first block, always
        first.text += ("\n\nthe session ended with this run: its state is gone; "
                       "session_create starts a new one")
    if answer.structured_content is not None:
        answer.structured_content["session_ended"] = ended
    return answer


def session_result(session: AsyncSession) -> CallToolResult:
    """A created session: its id first, as the model reads it, and the same as JSON."""
    document = {
        "session_id": session.id, "pool": session.pool,
        "expires_at": session.expires_at.isoformat(),
        "idle_timeout_s": session.idle_timeout_s,
    }
    text = (f"session_id: {session.id}\npool: {session.pool}\n"
            f"ends {session.idle_timeout_s:g} s after its last run, "
            f"at {session.expires_at.isoformat()} at the latest")
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=document)


def closed_result(session_id: str, reason: str | None) -> CallToolResult:
    """A closed session: why it ended (``deleted`` when this call ended it)."""
    said = reason or "unknown (it ended over an hour ago)"
    return CallToolResult(
        content=[TextContent(type="text", text=f"session {session_id} ended: {said}")],
        structured_content={"session_id": session_id, "ended": reason},
    )


class McpSessions:
    """The sessions this server created, each with the server's idle timeout.

    Entered around the server's life: leaving closes every session still held,
    so an MCP host that goes away leaves no sandbox behind. A session another
    client of the same user created is reachable by its id too (the daemon
    decides ownership), but is not closed at exit: it is not ours.
    """

    def __init__(self, client: AsyncClient, idle_timeout_s: float) -> None:
        if idle_timeout_s <= 0:
            raise ValueError("the session idle timeout is a number of seconds above 0")
        self._client = client
        self.idle_timeout_s = idle_timeout_s
        self._held: dict[str, AsyncSession] = {}

    def __len__(self) -> int:
        return len(self._held)

    async def create(self, pool: str | None, ttl_s: float | None) -> AsyncSession:
        """A new session of ``pool``, held until closed. Raises SandpoolClientError."""
        # The daemon keeps idle_timeout_s at most ttl_s.
        idle_s = self.idle_timeout_s if ttl_s is None else min(self.idle_timeout_s, ttl_s)
        session = await self._client.session(pool, ttl_s=ttl_s, idle_timeout_s=idle_s)
        self._held[session.id] = session
        return session

    async def find(self, session_id: str) -> AsyncSession:
        """The session of that id: ours, or one the daemon knows for this user.

        Raises SessionNotFound, SessionEnded, SandpoolClientError.
        """
        held = self._held.get(session_id)
        if held is not None:
            return held
        return await self._client.resume_session(session_id)

    def forget(self, session_id: str) -> None:
        """Stop holding a session that ended (nothing left to close)."""
        self._held.pop(session_id, None)

    async def close(self, session_id: str) -> str | None:
        """Close the session; why it ended. Raises SessionNotFound for an id the daemon
        does not know for this user, SandpoolClientError when the daemon cannot be asked."""
        try:
            session = await self.find(session_id)
        except SessionEnded as e:  # nothing to close: what close() would have said
            self.forget(session_id)
            return e.reason
        reason = await session.close()
        self.forget(session_id)
        return reason

    async def close_all(self) -> None:
        """Close every session held, together, within ``CLOSE_SESSIONS_TIMEOUT_S``.

        Failures are logged, not raised: this runs as the server exits, and a
        session it could not close still ends by its idle timeout.
        """
        held, self._held = list(self._held.values()), {}
        if not held:
            return
        try:
            async with asyncio.timeout(CLOSE_SESSIONS_TIMEOUT_S):
                outcomes = await asyncio.gather(*(s.close() for s in held),
                                                return_exceptions=True)
        except TimeoutError:
            logger.warning("%d session(s) not closed within %g s; their idle timeout "
                           "(%g s) ends them", len(held), CLOSE_SESSIONS_TIMEOUT_S,
                           self.idle_timeout_s)
            return
        for session, outcome in zip(held, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome  # a cancellation or an exit, not a failed close
                logger.warning("session %s not closed (%r); its idle timeout (%g s) "
                               "ends it", session.id, outcome, self.idle_timeout_s)

    async def __aenter__(self) -> McpSessions:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close_all()


def list_pools_result(pools: Sequence[PoolInfo]) -> CallToolResult:
    """The pools as JSON text (what a model reads) and as structured content."""
    document = {"pools": [pool_entry(p) for p in pools]}
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(document, indent=2))],
        structured_content=document,
    )


def pool_entry(pool: PoolInfo) -> dict[str, Any]:
    return {
        "name": pool.name,
        "backend": pool.backend,
        "language": pool.language,
        "runtime": {"version": pool.runtime_version, "packages": dict(pool.packages)},
        "idle": pool.idle,
        "busy": pool.busy,
        "max_size": pool.max_size,
    }


def error_result(error: SandpoolClientError) -> CallToolResult:
    """A refusal as an MCP tool error: ``<code>: <message>``, and the fields as JSON.

    A 503's ``retry_after`` rides along, so an agent can wait it out, and an
    ended session's ``reason``.
    """
    details: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.status is not None:
        details["status"] = error.status
    if isinstance(error, SessionEnded):
        details["reason"] = error.reason
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        details["retry_after_s"] = retry_after
    return CallToolResult(
        content=[TextContent(type="text", text=error_text(error))],
        structured_content={"error": details},
        is_error=True,
    )


def error_text(error: SandpoolClientError) -> str:
    text = f"{error.code}: {error.message}"
    if isinstance(error, SessionEnded) and error.reason and error.reason not in text:
        text += f" (reason: {error.reason})"
    return text


def build_server(client: AsyncClient, version: str, sessions: McpSessions) -> MCPServer[Any]:
    """The MCP server with its tools, each a call through ``client``; ``version`` is
    sandpool's, as the server tells MCP hosts. The session tools create and find
    sessions through ``sessions``, which the caller closes.

    Only the client's errors (the daemon's refusals, an unreachable daemon) become
    tool errors here; the SDK turns anything else into a tool error too, so no
    call can end the server.
    """
    server: MCPServer[Any] = MCPServer(
        SERVER_NAME, instructions=INSTRUCTIONS, version=version,
        # The log goes to stderr; on stdio an MCP host keeps it. Only problems.
        log_level="WARNING",
    )

    @server.tool(
        name="run_code", description=RUN_CODE_DESCRIPTION,
        annotations=ToolAnnotations(
            title="Run code in a sandbox", read_only_hint=False, destructive_hint=False,
            idempotent_hint=False, open_world_hint=False,
        ),
    )
    async def run_code(
        code: Annotated[str, Field(description="the program's source")],
        language: Annotated[
            Literal["python", "shell", "javascript"] | None,
            Field(description="run in a pool of this language (default: the pool 'python')"),
        ] = None,
        pool: Annotated[
            str | None, Field(description="run in this pool (see list_pools); wins over language")
        ] = None,
        stdin: Annotated[str | None, Field(description="the program's standard input")] = None,
        timeout_s: Annotated[
            float | None,
            Field(gt=0, description="seconds before the program is killed (default: the pool's)"),
        ] = None,
        files: Annotated[
            list[FileArgument] | None,
            Field(description="files written into the working directory before the code runs"),
        ] = None,
    ) -> CallToolResult:
        try:
            uploads = upload_files(files or [])
            result = await client.run(
                code, pool=pool, language=language, stdin=stdin, timeout_s=timeout_s,
                files=uploads or None,
            )
        except SandpoolClientError as e:
            return error_result(e)
        return run_code_result(result)

    @server.tool(
        name="list_pools", description=LIST_POOLS_DESCRIPTION,
        annotations=ToolAnnotations(
            title="List sandbox pools", read_only_hint=True, open_world_hint=False,
        ),
    )
    async def list_pools() -> CallToolResult:
        try:
            pools = await client.pools()
        except SandpoolClientError as e:
            return error_result(e)
        return list_pools_result(pools)

    @server.tool(
        name="session_create",
        description=SESSION_CREATE_DESCRIPTION.format(idle_s=sessions.idle_timeout_s),
        annotations=ToolAnnotations(
            title="Start a sandbox session", read_only_hint=False, destructive_hint=False,
            idempotent_hint=False, open_world_hint=False,
        ),
    )
    async def session_create(
        pool: Annotated[
            str | None,
            Field(description="a Python pool (see list_pools; default: the pool 'python')"),
        ] = None,
        ttl_s: Annotated[
            float | None,
            Field(gt=0, description="the longest the session may live, in seconds "
                  "(default: the daemon's, 600)"),
        ] = None,
    ) -> CallToolResult:
        try:
            session = await sessions.create(pool, ttl_s)
        except SandpoolClientError as e:
            return error_result(e)
        return session_result(session)

    @server.tool(
        name="session_run", description=SESSION_RUN_DESCRIPTION,
        annotations=ToolAnnotations(
            title="Run code in a sandbox session", read_only_hint=False,
            destructive_hint=False, idempotent_hint=False, open_world_hint=False,
        ),
    )
    async def session_run(
        session_id: Annotated[str, Field(description="from session_create")],
        code: Annotated[str, Field(description="Python source, run after the earlier runs")],
        stdin: Annotated[str | None, Field(description="the code's standard input")] = None,
        timeout_s: Annotated[
            float | None,
            Field(gt=0, description="seconds before the run is killed, which ends the "
                  "session (default: the pool's)"),
        ] = None,
        files: Annotated[
            list[FileArgument] | None,
            Field(description="files written into the current directory before the code runs"),
        ] = None,
    ) -> CallToolResult:
        try:
            uploads = upload_files(files or [])
            session = await sessions.find(session_id)
            result = await session.run(code, stdin=stdin, timeout_s=timeout_s,
                                       files=uploads or None)
        except (SessionEnded, SessionNotFound) as e:
            sessions.forget(session_id)
            return error_result(e)
        except SandpoolClientError as e:
            return error_result(e)
        return session_run_result(result)

    @server.tool(
        name="session_close", description=SESSION_CLOSE_DESCRIPTION,
        annotations=ToolAnnotations(
            title="End a sandbox session", read_only_hint=False, destructive_hint=True,
            idempotent_hint=True, open_world_hint=False,
        ),
    )
    async def session_close(
        session_id: Annotated[str, Field(description="from session_create")],
    ) -> CallToolResult:
        try:
            reason = await sessions.close(session_id)
        except SandpoolClientError as e:
            return error_result(e)
        return closed_result(session_id, reason)

    return server


def check_http_host(host: str) -> None:
    """Raises ValueError unless ``host`` is a loopback address the HTTP transport may use."""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(
            f"--host {host}: the MCP HTTP transport has no authentication, so it is "
            f"served on loopback only ({', '.join(sorted(LOOPBACK_HOSTS))})"
        )


async def serve_mcp(
    socket: str | None,
    version: str,
    transport: Transport = "stdio",
    host: str = DEFAULT_HTTP_HOST,
    port: int = DEFAULT_HTTP_PORT,
    session_idle_timeout_s: float = DEFAULT_SESSION_IDLE_TIMEOUT_S,
) -> None:
    """Serve MCP until stdin closes (stdio), or SIGINT or SIGTERM; then close the
    sessions it created.

    ``socket``: the daemon's (None: ``$SANDPOOL_SOCKET``, else the default). The
    daemon need not be up yet: each tool call connects, and an unreachable daemon
    is a tool error (``daemon_unreachable``). ``session_idle_timeout_s``: the
    idle timeout of each session ``session_create`` makes. Raises ValueError for
    an HTTP host that is not loopback, or an idle timeout that is not above 0.
    """
    if transport == "streamable-http":
        check_http_host(host)
    async with AsyncClient(socket) as client, \
            McpSessions(client, session_idle_timeout_s) as sessions:
        server = build_server(client, version, sessions)
        if transport == "stdio":
            await serve_until_signalled(server.run_stdio_async(), sessions)
        else:
            await serve_until_signalled(server.run_streamable_http_async(
                host=host, port=port, streamable_http_path=HTTP_PATH
            ), sessions)


async def serve_until_signalled(
    serving: Coroutine[Any, Any, None], sessions: McpSessions
) -> None:
    """Run ``serving`` until it returns, or until SIGINT or SIGTERM: then close
    ``sessions`` and end the process by that signal.

    Why not cancel ``serving`` and return: on stdio the SDK reads stdin in a
    thread, and the cancellation waits for that read, which waits for the host
    to write. So the sessions are closed first, and the signal, given back its
    default, ends the process as it would have without this server's sessions.
    A second signal during the closing does so at once. Over HTTP uvicorn takes
    both signals while it serves (a graceful shutdown), then raises the one it
    caught again: it arrives after ``serving`` returned, and changes nothing.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[int] = []

    def stop_serving(signum: int) -> None:
        received.append(signum)
        stop.set()
        loop.remove_signal_handler(signum)  # the default again, for a second one

    handled = (signal.SIGINT, signal.SIGTERM)
    for signum in handled:
        loop.add_signal_handler(signum, stop_serving, signum)
    try:
        async with asyncio.TaskGroup() as group:
            served = group.create_task(serving)
            stopped = group.create_task(stop.wait())
            served.add_done_callback(lambda _: stopped.cancel())
            await asyncio.wait((served, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not served.done():
                await sessions.close_all()
                for signum in handled:
                    loop.remove_signal_handler(signum)
                signal.raise_signal(received[0])  # the default: the process ends here
    except ExceptionGroup as failed:
        # Only the server can fail (waiting for the event cannot): its error, as
        # serving it without this function would raise it.
        raise failed.exceptions[0] from None
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
