"""``sandpool mcp``: a Model Context Protocol server in front of a running daemon.

An agent's MCP host (Claude Desktop, an IDE, an agent framework) gets two tools:
``run_code`` (one run in a fresh sandbox, its output as text and its figures as
images) and ``list_pools``. The server is a client of the daemon's Unix socket
through ``sandpool_client``; it holds no sandbox and no pool of its own, so it
can be started and stopped at will, one per MCP host, beside one daemon.

Built on the official SDK (``mcp``), imported only by this command: ``sandpool
serve`` never loads it. The translation from a run's result to MCP content is
pure (``run_code_result``, ``list_pools_result``, ``error_result``), apart from
the tools that do the I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field
from sandpool_client import (
    AsyncClient,
    PoolInfo,
    RichResult,
    RunResult,
    SandpoolClientError,
)

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

INSTRUCTIONS = """\
sandpool runs code in single-use, locked-down sandboxes: each run_code call gets a \
fresh sandbox with no network, destroyed afterwards, so nothing carries over between \
calls. list_pools says which pools (runtimes and their packages) there are."""

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

    A 503's ``retry_after`` rides along, so an agent can wait it out.
    """
    details: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.status is not None:
        details["status"] = error.status
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        details["retry_after_s"] = retry_after
    return CallToolResult(
        content=[TextContent(type="text", text=f"{error.code}: {error.message}")],
        structured_content={"error": details},
        is_error=True,
    )


def build_server(client: AsyncClient, version: str) -> MCPServer[Any]:
    """The MCP server with its tools, each a call through ``client``; ``version`` is
    sandpool's, as the server tells MCP hosts.

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
) -> None:
    """Serve MCP until stdin closes (stdio) or the process is interrupted (HTTP).

    ``socket``: the daemon's (None: ``$SANDPOOL_SOCKET``, else the default). The
    daemon need not be up yet: each tool call connects, and an unreachable daemon
    is a tool error (``daemon_unreachable``). Raises ValueError for an HTTP host
    that is not loopback.
    """
    if transport == "streamable-http":
        check_http_host(host)
    async with AsyncClient(socket) as client:
        server = build_server(client, version)
        if transport == "stdio":
            await server.run_stdio_async()
        else:
            await server.run_streamable_http_async(
                host=host, port=port, streamable_http_path=HTTP_PATH
            )

