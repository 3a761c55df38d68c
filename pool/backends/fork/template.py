"""One fork pool's template: a warm interpreter in bubblewrap that forks the sandboxes.

The template is the pool's runner in TEMPLATE mode (``pool/runner.py``): it
imports and warms the pool's ``preload`` once, then forks one sandbox per
SpawnOrder the daemon sends on a control socket and reports each one's end
(``pool/wire.py``). It never runs code of anyone's.

Privilege, from the outside in:
- bwrap runs as the template's own host uid (one of the daemon's range,
  ``pool/uids.py``) and unshares a user namespace whose uid and gid maps the
  daemon writes itself (bwrap's ``--userns-block-fd`` waits for them): uid 0
  inside is the template's host uid, and every other uid of the daemon's range
  is mapped to itself, so each sandbox can become a host uid of its own.
- The template is uid 0 of that namespace with the capabilities its sandboxes
  need for their set-up (TEMPLATE_CAPABILITIES) and none in the host's.
- It sees the pool's read-only root file system, the guest programs and the
  pool's cgroup directories (CGROUP_MOUNT), in which the daemon hands it, per
  sandbox, only the ``cgroup.procs`` files (chowned to the template's uid).
- ``--die-with-parent``: it dies with the daemon, and as PID 1 of its PID
  namespace it takes every sandbox with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import structlog

from pool import guest
from pool.backends.process.cgroups import CgroupTree, SandboxCgroup
from pool.backends.process.definition import INTERPRETER, JOIN_CGROUPS, SandboxDefinition
from pool.errors import BackendError
from pool.uids import SandboxUids
from pool.wire import (
    CGROUP_MOUNT,
    MAX_CONTROL_BYTES,
    SPAWN_FDS,
    TEMPLATE,
    TEMPLATE_READY,
    WORKDIR,
    RunnerArguments,
    SandboxExit,
    SpawnOrder,
    WireError,
)

log = structlog.get_logger("sandpool.fork")

# What the sandboxes' set-up needs, inside the template's user namespace only:
# mounts and namespaces, becoming their uid, emptying the bounding set, lo up.
TEMPLATE_CAPABILITIES = (
    "CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_NET_ADMIN",
    "CAP_SYS_RESOURCE",  # its namespace's per-uid quotas (/proc/sys/user)
)  # fmt: skip

INFO_TIMEOUT_S = 10.0  # bwrap's start to its --info-fd report
STDERR_LOG_BYTES = 4096

ExitCallback = Callable[[int], None]


def id_map(template_uid: int, uids: SandboxUids) -> str:
    """The template's uid (and gid) map: 0 is the template, the rest of the range itself.

    Extents may not overlap outside, so the range is mapped around the
    template's own uid.
    """
    lines = [f"0 {template_uid} 1"]
    end = uids.base + uids.count
    if template_uid > uids.base:
        lines.append(f"{uids.base} {uids.base} {template_uid - uids.base}")
    if template_uid + 1 < end:
        lines.append(f"{template_uid + 1} {template_uid + 1} {end - template_uid - 1}")
    return "\n".join(lines) + "\n"


def inside_cgroup_procs(tree: CgroupTree, cgroup: SandboxCgroup) -> list[str]:
    """A sandbox's ``cgroup.procs`` files as the template sees them, under CGROUP_MOUNT."""
    inside = []
    for path in map(Path, cgroup.procs_files):
        for controller, pool_dir in tree.pool_dirs.items():
            if path.is_relative_to(pool_dir):
                inside.append(f"{CGROUP_MOUNT}/{controller}/{path.relative_to(pool_dir)}")
    return inside


class Template:
    """The template process of one pool, and the daemon's end of its control socket."""

    def __init__(
        self,
        definition: SandboxDefinition,
        tree: CgroupTree,
        cgroup: SandboxCgroup,
        host_uid: int,
        uids: SandboxUids,
    ) -> None:
        self.definition = definition
        self.tree = tree
        self.cgroup = cgroup  # the template's own, with the pool's memory and pids limits
        self.host_uid = host_uid
        self._uids = uids
        self._control: socket.socket | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._stderr_r: int | None = None
        self._watchers: dict[str, ExitCallback] = {}
        self._pidfd: int | None = None  # the template's own (bwrap's child)
        self.alive = False

    def __repr__(self) -> str:
        return f"<Template uid={self.host_uid} alive={self.alive} sandboxes={len(self._watchers)}>"

    def command(self, control_fd: int, seccomp_fd: int, block_fd: int, info_fd: int) -> list[str]:
        d = self.definition
        c = d.config
        if d.setpriv is None:
            raise BackendError("the fork tier needs a root daemon", code="fork_needs_root")
        uid = str(self.host_uid)
        cgroup_binds = []
        for controller, pool_dir in sorted(self.tree.pool_dirs.items()):
            cgroup_binds += ["--bind", str(pool_dir), f"{CGROUP_MOUNT}/{controller}"]
        capabilities = []
        for capability in TEMPLATE_CAPABILITIES:
            capabilities += ["--cap-add", capability]
        return [
            "/bin/sh", "-c", JOIN_CGROUPS, "sh", *self.cgroup.procs_files, "--",
            d.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            d.bwrap,
            "--unshare-user", "--userns-block-fd", str(block_fd), "--info-fd", str(info_fd),
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup",
            "--die-with-parent", "--new-session",
            # The template is PID 1: its sandboxes' namespaces are nested in its
            # own, so its death (and bwrap's) takes every one of them.
            "--as-pid-1",
            "--uid", "0", "--gid", "0", *capabilities,
            "--hostname", "sandbox",
            "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", WORKDIR,
            "--setenv", "LANG", "C.UTF-8",
            # bwrap makes a mount point's missing parents 0700 and the template's:
            # every sandbox's uid must pass through /opt to the guest programs.
            "--perms", "0755", "--dir", "/opt",
            *d.filesystem,
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(c.tmpfs_mb * 1024 * 1024), "--tmpfs", "/tmp",
            *cgroup_binds,
            "--dir", WORKDIR,
            "--remount-ro", "/dev", "--remount-ro", "/",
            "--chdir", "/",
            "--",
            INTERPRETER, "-I", guest.path_in_sandbox(guest.RUNNER),
            *RunnerArguments(
                TEMPLATE, c.language, (control_fd, seccomp_fd), d.limits, list(c.preload)
            ).to_argv(),
        ]  # fmt: skip

    async def start(self, ready_timeout_s: float) -> None:
        """Start the template and wait until its preload is warm.

        Raises BackendError with bwrap's or the runner's own words; on failure
        nothing is left running.
        """
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        seccomp_fd = self.definition.seccomp_fd()
        block_r, block_w = os.pipe()
        info_r, info_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        os.set_blocking(stderr_r, False)
        self._stderr_r = stderr_r
        self._control = ours
        passed = (theirs.fileno(), seccomp_fd, block_r, info_w)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self.command(theirs.fileno(), seccomp_fd, block_r, info_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_w,
                pass_fds=passed,
                start_new_session=True,  # a Ctrl-C for the daemon must not reach it
                cwd="/",
            )
        except OSError as e:
            for fd in (block_w, info_r):
                os.close(fd)
            await self.close()
            raise BackendError(f"cannot run bubblewrap: {e}") from None
        finally:
            theirs.close()
            for fd in (seccomp_fd, block_r, info_w, stderr_w):
                os.close(fd)
        try:
            try:
                async with asyncio.timeout(INFO_TIMEOUT_S):
                    pid = await _read_child_pid(loop, info_r)
                # Held to the end: close() kills the template itself and waits
                # for its exit, which is after every sandbox nested in its PID
                # namespace was killed and reaped (bwrap's own exit is not).
                self._pidfd = os.pidfd_open(pid)
                await asyncio.to_thread(self._write_id_maps, pid)
            finally:
                os.close(info_r)
                os.write(block_w, b"1")  # bwrap goes on (and fails, if the maps were not written)
                os.close(block_w)
            async with asyncio.timeout(ready_timeout_s):
                message = await loop.sock_recv(ours, MAX_CONTROL_BYTES)
            if message != TEMPLATE_READY:
                raise BackendError("the template did not report ready")
        except BaseException as e:
            why = self.read_stderr() or _describe(e, ready_timeout_s)
            await self.close()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise BackendError(f"cannot start the pool's template: {why}") from None
        self.alive = True
        loop.add_reader(ours.fileno(), self._on_control)

    def _write_id_maps(self, pid: int) -> None:
        """The daemon writes them: as root it may map the whole range, which bwrap may not."""
        mapping = id_map(self.host_uid, self._uids)
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{pid}/{name}").write_text(mapping)

    def spawn(self, order: SpawnOrder, fds: list[int], on_exit: ExitCallback) -> None:
        """Order one sandbox; ``on_exit`` gets its first process's status once it is reaped.

        Raises BackendError if the template is gone. The fds are the template's
        copies from now on: the caller closes its own.
        """
        if not self.alive or self._control is None:
            raise BackendError("the pool's template is gone")
        if len(fds) != len(SPAWN_FDS):
            raise ValueError(f"a spawn order takes {len(SPAWN_FDS)} fds")
        try:
            socket.send_fds(self._control, [order.encode()], fds)
        except OSError as e:  # a full socket buffer (the template is stuck) or gone
            self._lost(f"cannot send it a spawn order: {e}")
            raise BackendError(f"the pool's template did not take the order: {e}") from None
        self._watchers[order.sandbox] = on_exit

    def forget(self, sandbox_id: str) -> None:
        self._watchers.pop(sandbox_id, None)

    def _on_control(self) -> None:
        while self._control is not None:
            try:
                message = self._control.recv(MAX_CONTROL_BYTES)
            except BlockingIOError:
                return
            except OSError as e:
                self._lost(f"its control socket failed: {e}")
                return
            if not message:
                self._lost(self.read_stderr() or "it exited")
                return
            try:
                report = SandboxExit.decode(message)
            except WireError as e:
                self._lost(f"it sent a malformed message: {e}")
                return
            callback = self._watchers.pop(report.sandbox, None)
            if callback is not None:
                callback(report.status)

    def _lost(self, why: str | None) -> None:
        """The template is gone or broken (``why``), or closed (None): its sandboxes
        died with it, or are killed now."""
        if not self.alive:
            return
        self.alive = False
        if why is not None:
            log.error("fork_template_lost", uid=self.host_uid, reason=why)
        if self._control is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._control.fileno())
        self._kill()
        watchers, self._watchers = self._watchers, {}
        for callback in watchers.values():
            callback(-signal.SIGKILL)

    def _kill(self) -> None:
        """SIGKILL the template: its sandboxes, nested in its PID namespace, die with
        it, and bwrap, its parent, reaps it and exits. Before the template is known
        (a start cut short), bwrap itself: --die-with-parent takes the rest."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        else:
            self._kill_bwrap()

    def _kill_bwrap(self) -> None:
        """Killing bwrap first would leave the template's zombie to the host's init."""
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def read_stderr(self) -> str:
        if self._stderr_r is None:
            return ""
        try:
            data = os.read(self._stderr_r, STDERR_LOG_BYTES)
        except OSError:
            return ""
        return data.decode("utf-8", "replace").strip()

    async def close(self) -> None:
        """Kill the template (and so every sandbox it forked); wait until it has exited,
        its sandboxes with it, and bwrap is reaped."""
        self._lost(None)
        self._kill()
        if self._pidfd is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(INFO_TIMEOUT_S):
                    await _exited(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._process is not None:
            try:
                async with asyncio.timeout(INFO_TIMEOUT_S):
                    await self._process.wait()
            except TimeoutError:
                self._kill_bwrap()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(INFO_TIMEOUT_S):
                        await self._process.wait()
        if self._control is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._control.fileno())
            self._control.close()
            self._control = None
        if self._stderr_r is not None:
            with contextlib.suppress(OSError):
                os.close(self._stderr_r)
            self._stderr_r = None


async def _read_child_pid(loop: asyncio.AbstractEventLoop, fd: int) -> int:
    """bwrap's --info-fd JSON, which may arrive in pieces: its ``child-pid``."""
    os.set_blocking(fd, False)
    buffer = b""
    decoder = json.JSONDecoder()
    while True:
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, readable)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        if not chunk:
            raise BackendError("bubblewrap exited before it started the template")
        buffer += chunk
        with contextlib.suppress(ValueError):
            info, _ = decoder.raw_decode(buffer.decode())
            return int(info["child-pid"])


async def _exited(pidfd: int) -> None:
    """Until the process of ``pidfd`` has exited (the pidfd turns readable)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()
    loop.add_reader(pidfd, _wake, readable)
    try:
        await readable
    finally:
        loop.remove_reader(pidfd)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _describe(error: BaseException, ready_timeout_s: float) -> str:
    if isinstance(error, TimeoutError):
        return f"it was not ready within {ready_timeout_s:g} s"
    if isinstance(error, BackendError):
        return error.message
    return str(error) or type(error).__name__
