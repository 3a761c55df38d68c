"""Running the build's commands: captured, logged with progress, or piped into each other.

Every command runs in a session of its own and is killed with its whole process
group on a timeout or a cancellation, so no child of debootstrap (dpkg, wget) or
of ``docker import`` outlives the build. A missing tool and a timeout become an
``ImageBuildError`` with one readable line; a non-zero exit status does not: the
caller knows what the failure means and words it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pool.errors import ImageBuildError

PROGRESS_INTERVAL_S = 5.0
TERMINATE_GRACE_S = 10.0

# Some root-only tools live in sbin, which a user's PATH may lack.
TOOL_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
)


@dataclass(frozen=True, slots=True)
class Completed:
    """What a finished command left: its exit status and its decoded output."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def last_error_line(self) -> str:
        return last_line(self.stderr) or last_line(self.stdout)


async def run(
    argv: list[str],
    *,
    timeout_s: float,
    what: str,
    env: dict[str, str] | None = None,
    input_bytes: bytes | None = None,
) -> Completed:
    """Run ``argv`` to completion and capture its output; kill it on timeout or
    cancellation.

    Raises ``ImageBuildError`` when the tool is missing or ``what`` did not finish
    within ``timeout_s``.
    """
    proc = await spawn(
        argv,
        env=env,
        stdin=asyncio.subprocess.PIPE if input_bytes is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await proc.communicate(input_bytes)
    except TimeoutError:
        await terminate(proc)
        raise ImageBuildError(f"{what} did not finish within {timeout_s:.0f}s") from None
    except BaseException:
        await asyncio.shield(terminate(proc))
        raise
    assert proc.returncode is not None
    return Completed(proc.returncode, decode(stdout), decode(stderr))


async def run_logged(
    argv: list[str], *, env: dict[str, str], timeout_s: float, report: Callable[[str], None]
) -> Completed:
    """Run a long command with stdout and stderr merged, passing its latest output
    line to ``report`` every PROGRESS_INTERVAL_S.

    Raises ``ImageBuildError`` when the tool is missing or did not finish within
    ``timeout_s``.
    """
    proc = await spawn(
        argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    lines: list[str] = []

    async def collect_output() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            lines.append(decode(raw).rstrip())

    try:
        async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as group:
            reader = group.create_task(collect_output())
            while True:
                done, _ = await asyncio.wait({reader}, timeout=PROGRESS_INTERVAL_S)
                if done:
                    break
                latest = next((line for line in reversed(lines) if line.strip()), "")
                report(f"{Path(argv[0]).name}: {latest[:120]}")
            await proc.wait()
    except TimeoutError:
        await terminate(proc)
        raise ImageBuildError(
            f"{Path(argv[0]).name} did not finish within {timeout_s:.0f}s"
        ) from None
    except BaseException:
        await asyncio.shield(terminate(proc))
        raise
    assert proc.returncode is not None
    return Completed(proc.returncode, "\n".join(lines), "")


async def pipe(
    producer_argv: list[str], consumer_argv: list[str], *, timeout_s: float
) -> tuple[Completed, Completed]:
    """Run ``producer | consumer`` and capture both sides' output (the producer's
    stdout goes to the consumer only).

    Raises ``ImageBuildError`` when a tool is missing or the pair did not finish
    within ``timeout_s``.
    """
    read_end, write_end = os.pipe()
    processes: list[asyncio.subprocess.Process] = []
    try:
        try:
            processes.append(
                await spawn(
                    producer_argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=write_end,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
            processes.append(
                await spawn(
                    consumer_argv,
                    stdin=read_end,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
        finally:
            # Only the children hold the pipe now, so each sees the other one exit.
            os.close(read_end)
            os.close(write_end)
        producer, consumer = processes
        async with asyncio.timeout(timeout_s):
            (_, produced_err), (consumed_out, consumed_err) = await asyncio.gather(
                producer.communicate(), consumer.communicate()
            )
    except TimeoutError:
        for proc in processes:
            await terminate(proc)
        raise ImageBuildError(
            f"{producer_argv[0]} | {consumer_argv[0]} did not finish within {timeout_s:.0f}s"
        ) from None
    except BaseException:
        for proc in processes:
            await asyncio.shield(terminate(proc))
        raise
    assert producer.returncode is not None
    assert consumer.returncode is not None
    return (
        Completed(producer.returncode, "", decode(produced_err)),
        Completed(consumer.returncode, decode(consumed_out), decode(consumed_err)),
    )


async def spawn(
    argv: list[str], *, env: dict[str, str] | None = None, stdin: int, stdout: int, stderr: int
) -> asyncio.subprocess.Process:
    """Start ``argv`` in a new session; raises ``ImageBuildError`` if the tool is missing."""
    executable = which(argv[0])
    if executable is None:
        raise ImageBuildError(_missing_tool_message(argv[0]))
    # A session of its own, so terminate() reaches the whole tree (debootstrap's
    # dpkg and wget) and a terminal's Ctrl-C reaches only us: we clean up in order.
    return await asyncio.create_subprocess_exec(
        executable,
        *argv[1:],
        env=env,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
    )


async def terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, SIGKILL it after TERMINATE_GRACE_S, and reap it."""
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(TERMINATE_GRACE_S):
                await proc.wait()
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
    # Stragglers that outlived the group leader must not keep writing into the rootfs.
    _signal_group(proc.pid, signal.SIGKILL)


def which(tool: str) -> str | None:
    """The path of ``tool``, looked up in the sbin directories too."""
    return shutil.which(tool, path=TOOL_PATH)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _missing_tool_message(tool: str) -> str:
    if tool == "docker":
        return (
            "the docker command is not installed: run scripts/ensure-docker.sh as root "
            "(or install docker.io)"
        )
    return f"{tool} is not installed"


def decode(data: bytes) -> str:
    return data.decode(errors="replace")


def last_line(text: str) -> str:
    """The last line of ``text`` that is not blank, stripped ("" if none)."""
    return next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, newlines included, made one space."""
    return " ".join(text.split())
