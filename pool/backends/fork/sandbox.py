"""One fork sandbox's handles in the daemon: its pipes, its cgroup, its PID 1's pidfd.

The sandbox is the template's child, not the daemon's, so its pipes are made
here and handed to the template with the order; its exit status comes back
from the template (``Template.spawn``'s callback), and the daemon signals it
through a pidfd of its PID 1, found in its cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from pool.backends.base import Sandbox
from pool.backends.process.cgroups import SandboxCgroup, kill_members, members
from pool.backends.process.channel import OutputPipes, RunnerProtocol

STDERR_LOG_BYTES = 4096


class ChannelReader(asyncio.Protocol):
    """The runner's stdout (its ready and exit frames), fed to the process tier's protocol."""

    def __init__(self, runner: RunnerProtocol) -> None:
        self.runner = runner

    def data_received(self, data: bytes) -> None:
        self.runner.pipe_data_received(1, data)

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.runner.pipe_connection_lost(1, exc)


class RequestWriter(asyncio.BaseProtocol):
    """The runner's stdin: a write that fails means it was gone before it took the request."""

    def __init__(self, runner: RunnerProtocol) -> None:
        self.runner = runner

    def connection_lost(self, exc: Exception | None) -> None:
        self.runner.pipe_connection_lost(0, exc)


class ForkSandbox(Sandbox):
    """A forked sandbox and what it holds until destroyed: pipes, cgroup, host uid."""

    def __init__(
        self,
        sandbox_id: str,
        protocol: RunnerProtocol,
        pipes: OutputPipes,
        cgroup: SandboxCgroup,
        host_uid: int,
        diagnostics_fd: int,
    ) -> None:
        super().__init__(sandbox_id)
        self.protocol = protocol
        self.pipes = pipes
        self.cgroup: SandboxCgroup | None = cgroup
        self.host_uid: int | None = host_uid  # held from the range until the cgroup is empty
        self.diagnostics_fd = diagnostics_fd  # the set-up's and the runner's own stderr
        self.stderr_text = ""
        self.request_transport: asyncio.WriteTransport | None = None
        self.channel_transport: asyncio.ReadTransport | None = None
        self.runner_pid: int | None = None  # host pid of PID 1 of its namespace
        self.runner_pidfd: int | None = None
        # Whether the template that forked it is alive: its sandboxes die with it.
        self.template_alive: Callable[[], bool] = lambda: True

    def stdin(self) -> asyncio.BaseTransport | None:
        return self.request_transport

    def learn_runner(self) -> None:
        """Open a pidfd on the sandbox's PID 1, the one process of its cgroup that is PID 1
        of a namespace nested below the template's. Blocking (kernfs and /proc reads):
        run in a thread. Raises OSError when there is none.
        """
        if self.runner_pidfd is not None:
            return
        for pid in self._members():
            with contextlib.suppress(OSError):
                ns_pids = _ns_pids(pid)
                if len(ns_pids) >= 3 and ns_pids[-1] == 1:
                    self.runner_pid = pid
                    self.runner_pidfd = os.pidfd_open(pid)
                    return
        raise OSError("the sandbox's PID 1 is not in its cgroup")

    def _members(self) -> list[int]:
        if self.cgroup is None or not self.cgroup.dirs:
            return []
        return members(self.cgroup.dirs[0])

    def kill(self) -> None:
        """SIGKILL PID 1: its death empties the namespace. Before it is known, every
        process in the cgroup (a start cut short)."""
        if self.runner_pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.runner_pidfd, signal.SIGKILL)
            return
        if self.cgroup is not None and self.cgroup.dirs:
            kill_members(self.cgroup.dirs[0])

    def read_stderr(self) -> str:
        try:
            data = os.read(self.diagnostics_fd, STDERR_LOG_BYTES)
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()

    def close(self) -> None:
        for transport in (self.request_transport, self.channel_transport):
            if transport is not None:
                transport.close()
        for fd in (self.diagnostics_fd, self.runner_pidfd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.diagnostics_fd = -1
        self.runner_pidfd = None
        self.pipes.close()


def _ns_pids(pid: int) -> list[int]:
    """The pid in each PID namespace it is in, outermost first (``NSpid`` in its status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(word) for word in line.split()[1:]]
    return []
