"""One process sandbox's handles on the host: bwrap, the runner's pidfd, its fds.

The runner is PID 1 of the sandbox's PID namespace, so killing it kills every
process the code started; bwrap then reaps it and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal

from pool.backends.base import Sandbox
from pool.backends.process.cgroups import SandboxCgroup
from pool.backends.process.channel import OutputPipes, RunnerProtocol
from pool.backends.process.scratch import SandboxScratch
from pool.backends.process.userns import NamespaceMaker

STDERR_LOG_BYTES = 4096


class ProcessSandbox(Sandbox):
    """A started bwrap tree and what it holds until destroyed: fds, cgroup, host uid, mounts
    (or the namespaces of a non-root daemon's sandbox, until bwrap is in them)."""

    def __init__(
        self,
        sandbox_id: str,
        transport: asyncio.SubprocessTransport,
        protocol: RunnerProtocol,
        info_fd: int,
        stderr_fd: int,
        cgroup: SandboxCgroup | None,
        pipes: OutputPipes,
        host_uid: int | None,
        scratch: SandboxScratch | None,
        maker: NamespaceMaker | None,
    ) -> None:
        super().__init__(sandbox_id)
        self.transport = transport
        self.protocol = protocol
        self.pipes = pipes
        self.info_fd: int | None = info_fd  # bwrap's --info-fd: the runner's host pid
        self.stderr_fd = stderr_fd  # bwrap's and the runner's own stderr, read on failure
        self.stderr_text = ""  # what was on it when the sandbox was destroyed
        self.cgroup = cgroup
        self.runner_pid: int | None = None  # host pid of the runner, PID 1 of its namespace
        self.runner_pidfd: int | None = None
        self.host_uid = host_uid  # held from the range until the cgroup is empty
        self.scratch = scratch  # the host's copies, until the runner is ready
        self.maker = maker  # a non-root daemon's namespaces, held until the runner is ready

    def stdin(self) -> asyncio.BaseTransport | None:
        return self.transport.get_pipe_transport(0)

    @property
    def bwrap_pid(self) -> int:
        return self.transport.get_pid()

    def learn_runner(self) -> None:
        """Open a pidfd on the runner, named by bwrap on --info-fd before the runner starts.

        Raises OSError or ValueError when bwrap has not (or not sensibly) written it.
        """
        if self.runner_pidfd is not None or self.info_fd is None:
            return
        try:
            info = json.loads(os.read(self.info_fd, 4096))
        finally:
            os.close(self.info_fd)
            self.info_fd = None
        self.runner_pid = int(info["child-pid"])
        self.runner_pidfd = os.pidfd_open(self.runner_pid)

    def kill(self) -> None:
        """SIGKILL the runner: as PID 1 of its namespace, its death takes every process in it.

        bwrap then reaps it and exits. Killing bwrap instead would leave the
        runner's zombie to the host's init.
        """
        if self.runner_pidfd is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.learn_runner()
        if self.runner_pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.runner_pidfd, signal.SIGKILL)
        else:  # bwrap never started the runner: its own death is all there is
            self.kill_bwrap()

    def kill_bwrap(self) -> None:
        """SIGKILL bwrap itself, unless it is known to have exited.

        Not ``transport.kill()``: Popen polls first and would reap the child
        behind asyncio's watcher, which then reports a made-up status 255. Until
        the watcher reaps it, the pid cannot be reused.
        """
        if not self.protocol.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.bwrap_pid, signal.SIGKILL)

    def read_stderr(self) -> str:
        try:
            data = os.read(self.stderr_fd, STDERR_LOG_BYTES)
        except OSError:  # empty (EAGAIN) or already closed
            return ""
        return data.decode("utf-8", "replace").strip()

    def close_fds(self) -> None:
        for fd in (self.info_fd, self.stderr_fd, self.runner_pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.info_fd = self.runner_pidfd = None
        self.stderr_fd = -1
        self.pipes.close()
