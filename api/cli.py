"""The ``sandpool`` command: serve, run, status, mcp, config check, image build.

Every failure ends with one readable line on stderr (``sandpool: ...``) and a
non-zero exit, never a stack trace. ``sandpool run`` exits with the program's
own exit code; 124 when it timed out, 137 when it was OOM-killed, 125 when
sandpool itself failed (the conventions of timeout(1) and docker run).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from pool.errors import SandpoolError

if TYPE_CHECKING:
    # Imported where used: `sandpool serve` has no use for an HTTP client.
    from sandpool_client import RunResult

EXIT_TIMEOUT = 124
EXIT_SANDPOOL_ERROR = 125
EXIT_OOM = 137
SOCKET_HELP = (
    "the daemon's Unix socket (default: $SANDPOOL_SOCKET, else /run/sandpool/sandpool.sock)"
)


def version() -> str:
    """The installed distribution's version, or ``unknown`` when run from a bare tree."""
    try:
        return metadata.version("sandpool")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandpool",
        description="Run untrusted code in warm, locked-down, single-use sandboxes.",
    )
    parser.add_argument(
        "--version", action="version", version=f"sandpool {version()}",
        help="print sandpool's version and exit",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    serve.add_argument(
        "--socket", metavar="PATH", help="Unix socket to listen on (overrides server.socket)"
    )
    serve.add_argument(
        "--metrics-address",
        metavar="HOST:PORT|off",
        help="TCP address Prometheus scrapes, or off (overrides server.metrics_address)",
    )
    serve.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default="auto",
        help="log lines as JSON or for a terminal (auto: console on a terminal, else JSON)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe level logged (default: info)",
    )

    run = commands.add_parser("run", help="run code through a running daemon")
    run.add_argument(
        "--socket", metavar="PATH", help=SOCKET_HELP,
    )
    which = run.add_mutually_exclusive_group()
    which.add_argument("--pool", metavar="NAME", help="the pool to run in (see `sandpool status`)")
    which.add_argument(
        "-l", "--language", metavar="LANG",
        help="python, shell or javascript: the daemon picks a pool of that language",
    )
    run.add_argument("--timeout", type=float, metavar="S", help="seconds before the run is killed")
    run.add_argument(
        "--file", dest="files", action="append", default=[], metavar="PATH[=NAME]",
        help="upload the local file PATH into the sandbox's working directory as NAME "
        "(default: its base name); repeatable",
    )
    run.add_argument(
        "-e", "--env", action="append", default=[], metavar="NAME=VALUE",
        help="set an environment variable for the program; repeatable",
    )
    run.add_argument(
        "--arg", dest="argv", action="append", default=[], metavar="ARG",
        help="append ARG to the program's arguments (sys.argv[1:]); repeatable; "
        "write --arg=-v for one that starts with '-'",
    )
    run.add_argument(
        "--out-dir", metavar="DIR",
        help="save the files the program left under out/ as DIR/out/..., and image "
        "results as DIR/result-N.png",
    )
    run.add_argument(
        "--json", action="store_true",
        help="print the whole result as one JSON object instead of the program's output "
        "(file contents and images as base64); the exit status is the same",
    )
    run.add_argument(
        "-i",
        "--input",
        metavar="FILE",
        help="file whose contents become the program's stdin ('-' for this stdin)",
    )
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", dest="code", metavar="CODE", help="the code to run")
    source.add_argument(
        "file", nargs="?", metavar="FILE", help="file with the code ('-' for stdin)"
    )

    status = commands.add_parser("status", help="show pools and sandbox counts")
    status.add_argument(
        "--socket", metavar="PATH", help=SOCKET_HELP,
    )

    mcp = commands.add_parser(
        "mcp", help="serve the daemon to MCP hosts (Model Context Protocol): run_code, "
        "list_pools and the session tools",
        description="A Model Context Protocol server in front of a running daemon; "
        "see docs/mcp.md.",
    )
    mcp.add_argument("--socket", metavar="PATH", help=SOCKET_HELP)
    mcp.add_argument(
        "--transport", choices=["stdio", "streamable-http"], default="stdio",
        help="stdio (the MCP host starts this command) or streamable-http "
        "(serve http://HOST:PORT/mcp) (default: stdio)",
    )
    mcp.add_argument(
        "--host", default="127.0.0.1",
        help="streamable-http: the loopback address to listen on (default: 127.0.0.1)",
    )
    mcp.add_argument(
        "--port", type=int, default=8000, help="streamable-http: the port (default: 8000)"
    )
    mcp.add_argument(
        "--session-idle-timeout-s", type=float, default=300.0, metavar="SECONDS",
        help="end a session this server created after this long without a run, so an agent "
        "that forgets to close one leaks nothing (default: 300)",
    )

    config = commands.add_parser("config", help="check a configuration file")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_commands.add_parser(
        "check", help="validate FILE and print the effective configuration (defaults filled in)"
    )
    check.add_argument("file", nargs="?", metavar="FILE", help="TOML file (default: no file)")

    token = commands.add_parser("token", help="make bearer tokens for the TCP listener")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    new_token = token_commands.add_parser(
        "new", help="print a fresh random token once, and the [[server.tokens]] table that "
        "holds its SHA-256 (the daemon never stores the token)",
    )
    new_token.add_argument("name", help="the token's name, which log lines show")

    image = commands.add_parser("image", help="manage the sandbox images")
    image_commands = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = image_commands.add_parser(
        "build", help="build a sandbox image from Debian packages (no registry needed)",
        description="Build a sandbox image from Debian packages; see docs/images.md.",
    )
    build.add_argument(
        "--profile", default="python", choices=["python", "datasci", "node"],
        help="what goes in: python (python3 only), datasci (numpy, pandas, matplotlib, "
        "scipy, scikit-learn...), node (nodejs and python3) (default: python)",
    )
    build.add_argument(
        "--tag",
        help="the tag to build (default: sandpool/<profile>:bookworm, "
        "e.g. sandpool/python:bookworm)",
    )
    build.add_argument(
        "--packages", metavar="'PKG ...'", default="",
        help="more Debian packages to install, separated by spaces",
    )
    build.add_argument(
        "--pip-requirements", metavar="FILE",
        help="a pip requirements file (hashes allowed) installed into the image at build "
        "time; the sandboxes themselves have no network",
    )
    build.add_argument("--mirror", metavar="URL", help="Debian mirror (default: the host's apt's)")
    build.add_argument(
        "--from",
        dest="base",
        metavar="IMAGE",
        help="build from this image (with python3) instead of debootstrap",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if the image is current")
    export = image_commands.add_parser(
        "export",
        help="export an image's root file system for the process tier",
        description="Export IMAGE's root file system, read-only, into "
        "STATE_DIR/rootfs/<image>/<image id>, once; print its path.",
    )
    export.add_argument(
        "image", nargs="?", default="sandpool/python:bookworm", metavar="IMAGE",
        help="the image (default: sandpool/python:bookworm)",
    )
    export.add_argument(
        "--state-dir", metavar="DIR",
        help="the state directory (default: the daemon's: $STATE_DIRECTORY, else "
        "/var/lib/sandpool for root, else ~/.local/state/sandpool)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return command_serve(args)
        if args.command == "run":
            return command_run(args)
        if args.command == "status":
            return command_status(args)
        if args.command == "mcp":
            return command_mcp(args)
        if args.command == "config":
            return command_config_check(args)
        if args.command == "token":
            return command_token_new(args)
        if args.image_command == "export":
            return command_image_export(args)
        return command_image_build(args)
    except SandpoolError as e:
        print(f"sandpool: {e.message}", file=sys.stderr)
        return EXIT_SANDPOOL_ERROR if args.command == "run" else 1
    except OSError as e:
        print(f"sandpool: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_SANDPOOL_ERROR if args.command == "run" else 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug: one line for the user, the traceback in the log
        if args.command == "serve":
            import structlog

            structlog.get_logger("sandpool").exception("crashed")
        print(f"sandpool: internal error ({type(e).__name__}: {e}); please report it",
              file=sys.stderr)
        return EXIT_SANDPOOL_ERROR if args.command == "run" else 1


def command_serve(args: argparse.Namespace) -> int:
    from api.daemon import serve
    from metrics.logs import configure_logging
    from pool.config import load_config

    configure_logging(args.log_format, args.log_level)
    config = load_config(args.config)
    changes: dict[str, Any] = {}
    if args.socket:
        changes["socket"] = os.path.abspath(args.socket)
    if args.metrics_address:
        changes["metrics_address"] = args.metrics_address
    if changes:
        config = config.replace_server(**changes)
    asyncio.run(serve(config))
    return 0


def command_run(args: argparse.Namespace) -> int:
    if args.code is not None:
        code = args.code
    elif args.file == "-":
        code = sys.stdin.read()
    else:
        with open(args.file, encoding="utf-8", errors="surrogateescape") as f:
            code = f.read()
    stdin = None
    if args.input == "-":
        stdin = sys.stdin.read()
    elif args.input is not None:
        with open(args.input, encoding="utf-8", errors="surrogateescape") as f:
            stdin = f.read()
    files = dict(upload_file(spec) for spec in args.files)
    env = dict(env_entry(spec) for spec in args.env)
    from sandpool_client import Client

    with client_errors(), Client(args.socket) as client:
        result = client.run(
            code, pool=args.pool, language=args.language, stdin=stdin, timeout_s=args.timeout,
            files=files or None, env=env or None, argv=args.argv or None,
        )
    if args.json:
        if args.out_dir is not None:
            result.save_files(args.out_dir)
            result.save_images(args.out_dir)
        print(json.dumps(dataclasses.asdict(result), default=base64_text))
        return run_exit_status(result)
    sys.stdout.write(result.stdout)
    # A final bare expression's value, as a notebook cell shows it.
    for display in result.results:
        if display.type == "text/plain":
            sys.stdout.write(f"{display.text}\n")
    sys.stdout.flush()
    sys.stderr.write(result.stderr)
    report_outcome(result, args.out_dir)
    for stream, truncated in (("stdout", result.stdout_truncated),
                              ("stderr", result.stderr_truncated)):
        if truncated:
            print(
                f"sandpool: {stream} was cut at the pool's output limit; the sandbox was killed",
                file=sys.stderr,
            )
    if result.oom_killed:
        print("sandpool: the program ran out of memory and was killed", file=sys.stderr)
    elif result.timed_out:
        print("sandpool: the program timed out and was killed", file=sys.stderr)
    return run_exit_status(result)


def run_exit_status(result: RunResult) -> int:
    """The program's exit code, or sandpool's own for a kill (OOM, timeout, output cap)."""
    if result.oom_killed:
        return EXIT_OOM
    if result.timed_out:
        return EXIT_TIMEOUT
    return result.exit_code if result.exit_code is not None else EXIT_SANDPOOL_ERROR


def base64_text(value: object) -> str:
    """``json.dumps``'s fallback for the result's bytes (file contents, images)."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


@contextlib.contextmanager
def client_errors() -> Iterator[None]:
    """The client's errors as sandpool's, so ``main`` says each in its one line."""
    from sandpool_client import SandpoolClientError

    try:
        yield
    except SandpoolClientError as e:
        raise SandpoolError(e.message, code=e.code) from None


def upload_file(spec: str) -> tuple[str, bytes]:
    """``PATH[=NAME]`` of ``--file`` as (NAME, content). An existing file named by the
    whole argument wins, so a local path holding "=" needs no NAME."""
    path, name = spec, os.path.basename(spec)
    if "=" in spec and not os.path.isfile(spec):
        path, _, name = spec.rpartition("=")
    with open(path, "rb") as f:
        return name, f.read()


def env_entry(spec: str) -> tuple[str, str]:
    name, equals, value = spec.partition("=")
    if not equals:
        raise SandpoolError(f"--env {spec!r}: expected NAME=VALUE")
    return name, value


def report_outcome(result: RunResult, out_dir: str | None) -> None:
    """Save what the run returned besides its output into ``out_dir``, or say it was left.

    One stderr line per thing the user would otherwise miss: a file cut at the
    pool's limit, an entry that is not a regular file, entries over the count.
    """
    if out_dir is None:
        if result.files or result.images:
            print(f"sandpool: the run returned {len(result.files)} file(s) under out/ and "
                  f"{len(result.images)} image(s); save them with --out-dir DIR",
                  file=sys.stderr)
    else:
        result.save_files(out_dir)
        result.save_images(out_dir)
    for entry in result.files:
        if entry.type != "file":
            print(f"sandpool: {entry.path} is a {entry.type}; only regular files "
                  "come back", file=sys.stderr)
        elif entry.truncated:
            print(f"sandpool: {entry.path} was cut at the pool's file limit "
                  f"({len(entry.content or b'')} of {entry.size} bytes)", file=sys.stderr)
    if result.files_omitted:
        print(f"sandpool: {result.files_omitted} more entries under out/ were left out "
              "(over the pool's max_files)", file=sys.stderr)
    if any(r.truncated for r in result.results) or result.results_omitted:
        print("sandpool: some results were cut or left out at the pool's max_results_bytes",
              file=sys.stderr)


def command_status(args: argparse.Namespace) -> int:
    from sandpool_client import Client

    with client_errors(), Client(args.socket) as client:
        pools = client.pools()
    columns = ("name", "backend", "language", "idle", "busy", "starting", "min_idle", "max_size")
    rows = [columns] + [tuple(str(getattr(p, c)) for c in columns) for p in pools]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for pool in pools:
        if pool.problem is not None:
            print(f"{pool.name}: {pool.problem}")
    return 0


def command_mcp(args: argparse.Namespace) -> int:
    # Imported here: the SDK and its web stack are for this command only.
    from api.mcp_server import check_http_host, serve_mcp

    if args.transport == "streamable-http":
        try:
            check_http_host(args.host)
        except ValueError as e:
            raise SandpoolError(str(e)) from None
    if not args.session_idle_timeout_s > 0:
        raise SandpoolError("--session-idle-timeout-s must be a positive number of seconds")
    asyncio.run(serve_mcp(args.socket, version(), args.transport, args.host, args.port,
                          session_idle_timeout_s=args.session_idle_timeout_s))
    return 0


def command_config_check(args: argparse.Namespace) -> int:
    from pool.config import load_config, to_toml

    sys.stdout.write(to_toml(load_config(args.file)))
    return 0


def command_token_new(args: argparse.Namespace) -> int:
    """The token on stderr, alone on its line; on stdout only what the config may hold,
    so ``sandpool token new NAME 2>NAME.token >>sandpool.toml`` keeps them apart."""
    from api.remote import new_token, token_sha256
    from pool.config import parse_tokens
    from pool.errors import ConfigError

    token = new_token()
    digest = token_sha256(token)
    try:
        parse_tokens([{"name": args.name, "sha256": digest}], "token")
    except ConfigError:
        raise SandpoolError(
            f"token name {args.name!r}: 1-63 characters of a-z, 0-9, '_', '.', '-'"
        ) from None
    print(token, file=sys.stderr)
    print(f"# token {args.name!r}: only its SHA-256 is here; the token itself went to stderr, "
          "shown this once\n"
          f'[[server.tokens]]\nname = "{args.name}"\nsha256 = "{digest}"\n'
          '# pools = ["python"]  # the pools it may use; absent: every pool\n'
          "# max_concurrent = 4  # its runs in flight", flush=True)
    return 0


def command_image_build(args: argparse.Namespace) -> int:
    from pool.image import Recipe, build_image_interruptibly, profile_named

    began = time.monotonic()

    def progress(line: str) -> None:
        # Progress is plain; only a failure is a "sandpool: ..." line.
        print(line, file=sys.stderr, flush=True)

    requirements = None
    if args.pip_requirements is not None:
        with open(args.pip_requirements, encoding="utf-8") as f:
            requirements = f.read()
    image_recipe = Recipe(
        profile=profile_named(args.profile),
        extra_packages=tuple(args.packages.split()),
        pip_requirements=requirements,
    )
    tag = args.tag or image_recipe.profile.tag
    try:
        built = asyncio.run(build_image_interruptibly(
            tag=tag, image_recipe=image_recipe, mirror=args.mirror, base=args.base,
            force=args.force, progress=progress,
        ))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("sandpool: interrupted; nothing was tagged", file=sys.stderr)
        return 130
    if built:
        progress(f"built {tag} in {time.monotonic() - began:.0f} s")
    else:
        progress(f"{tag} is up to date")
    return 0


def command_image_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pool.image import export_rootfs
    from pool.paths import state_dir

    try:
        path = asyncio.run(export_rootfs(args.image, Path(args.state_dir or state_dir())))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("sandpool: interrupted; nothing was exported", file=sys.stderr)
        return 130
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
