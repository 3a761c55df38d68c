"""The process backend: pre-started runners in bubblewrap namespaces, the lowest-latency tier.

Each sandbox is one ``bwrap`` process tree started ahead of demand, running the
same runner as the Docker backend (``pool/runner.py`` in direct mode) with the host's
own ``/usr`` mounted read-only. A request is one frame written on the runner's
stdin. The runner runs in its direct mode: the code's stdout, stderr and exit
status come back on three pipes of the sandbox's own, read by the event loop,
and the runner's stdout (an asyncio subprocess protocol) carries only its
ready frame and, if the code dies without reporting, its exit frame. A
hand-out costs about a pipe write each way (issue 6).

Isolation (see README, "The process tier"): new user, PID, network, IPC, UTS
and cgroup namespaces; no capabilities; uid 65534 inside and, for a root
daemon, a host uid of the sandbox's own outside (``pool/uids.py``; the daemon
drops to it with ``setpriv`` before bwrap, also because the kernel exempts
real uid 0 from RLIMIT_NPROC); a seccomp filter
(``pool/seccomp.py``); rlimits set by a few lines run before the runner; and a
per-sandbox memory, pids and cpu cgroup whose ``oom_kill`` counter gives the
OOM verdict the way Docker's events do. The cgroup is required: without it
memory_mb would bound only the address space, not shared memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog

from pool import guest
from pool.backends.base import EventListener, RunRequest, RunResult, Sandbox, new_sandbox_id
from pool.backends.process.scratch import SandboxScratch, ScratchMounts
from pool.config import PoolConfig
from pool.errors import BackendError, SandboxLostError
from pool.pipes import PipeReader, read_nonblocking
from pool.procfs import pid_alive
from pool.protocol import FrameDecoder, ProtocolViolation, decode_exit
from pool.seccomp import build_filter
from pool.uids import SandboxUids, default_uids
from pool.wire import DIRECT, EXIT, READY, WORKDIR, OutputCapture, RunnerArguments, encode_request

log = structlog.get_logger("sandpool.process")

INTERPRETER = "/usr/bin/python3"  # the host's; /usr is all the sandbox sees of it
SANDBOX_UID = 65534  # nobody, as the code sees itself inside the sandbox
READY_TIMEOUT_S = 10.0  # spawn to the runner's ready frame; measured 20-110 ms
EXIT_TIMEOUT_S = 5.0  # SIGKILL to bwrap reaped; measured ~1 ms
STATUS_BYTES = 4  # the child's status on its status pipe: a signed 32-bit big-endian int
# Once the status is in, output already written is in the pipes; a process the
# code left behind may keep writing, so read at most this many chunks more.
DRAIN_READS = 64
# The OOM killer counts its kill before the victim dies, so the counter is
# normally current when the exit frame arrives; allow a little slack.
OOM_COUNTER_GRACE_S = 0.05
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_DAEMON_LEAF = "sandpool-daemon"  # cgroup v2: where the daemon moves itself
CPU_PERIOD_US = 100_000
RMDIR_ATTEMPTS = 50  # x 10 ms: a cgroup is busy until the kernel has freed its last task
STDERR_LOG_BYTES = 4096
# The memory cgroup decides; the address-space limit is only a backstop this
# many times larger (threads reserve far more address space than they use).
ADDRESS_SPACE_FACTOR = 8

# Run by /bin/sh with the daemon's rights (root, or the owner of a delegated
# subtree): join the sandbox's cgroups, then exec the rest of the command line.
# Joining from inside the child is the only way to have every process of the
# tree born in the cgroup (asyncio cannot spawn into one).
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ >"$1" || exit 125; shift; done; shift; exec "$@"'


# --- cgroups ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CgroupTree:
    """This pool's cgroup directories: one per v1 controller, or one v2 directory."""

    version: Literal[1, 2]
    pool_dirs: dict[str, Path]  # controller -> directory ("unified" for v2)

    @property
    def controllers(self) -> list[str]:
        return sorted(self.pool_dirs)


@dataclass(slots=True)
class SandboxCgroup:
    dirs: list[Path]
    procs_files: list[str] = field(default_factory=list)
    oom_counter_fd: int | None = None  # memory.oom_control (v1) or memory.events (v2)
    cpu_limit: tuple[Path, str] | None = None  # written once the runner is ready

    def apply_cpu_limit(self) -> None:
        """Set the CPU quota. Blocking (one kernfs write): run in a thread.

        Not at creation: the runner's own start-up (~60 ms of CPU here) would
        be throttled at cpus=0.5, which measured 13-31 ms slower refills.
        """
        if self.cpu_limit is not None:
            path, value = self.cpu_limit
            path.write_text(value)

    def oom_kills(self) -> int:
        """The kernel's count of OOM kills in this cgroup: one pread of a kernfs file, no I/O."""
        if self.oom_counter_fd is None:
            return 0
        for line in os.pread(self.oom_counter_fd, 4096, 0).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


def own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its v2 path."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def prepare_cgroups(dir_name: str) -> tuple[CgroupTree | None, str]:
    """Create this pool's cgroup directory below the daemon's own cgroup.

    Returns the tree, or None and the reason (not root, no delegation, no memory
    controller): the backend then relies on rlimits alone. Blocking: run in a thread.
    """
    try:
        own = own_cgroups()
        if (CGROUP_ROOT / "cgroup.controllers").exists():
            return _prepare_v2(own.get("", "/"), dir_name), ""
        return _prepare_v1(own, dir_name), ""
    except (OSError, ValueError) as e:
        return None, str(e)


def _prepare_v1(own: dict[str, str], dir_name: str) -> CgroupTree:
    pool_dirs: dict[str, Path] = {}
    for controller in ("memory", "pids", "cpu"):
        if controller not in own:
            continue
        base = CGROUP_ROOT / controller / own[controller].lstrip("/")
        directory = base / dir_name
        try:
            sweep_stale_cgroups(base)
            directory.mkdir(exist_ok=True)
        except OSError as e:
            if controller == "memory":
                raise OSError(e.errno, f"cannot create {directory}: {e.strerror}") from None
            continue  # pids and cpu are extras; rlimits still bound processes
        pool_dirs[controller] = directory
    if "memory" not in pool_dirs:
        raise OSError(errno.ENOENT, "no cgroup v1 memory controller")
    return CgroupTree(version=1, pool_dirs=pool_dirs)


def _prepare_v2(own: str, dir_name: str) -> CgroupTree:
    base = CGROUP_ROOT / own.lstrip("/")
    if base.name == CGROUP_DAEMON_LEAF:  # moved there by another pool of this daemon
        base = base.parent
    if own != "/" and os.geteuid() == 0 and not _delegated(base):
        # Root could write anywhere, but a cgroup systemd did not delegate is
        # systemd's: moving the daemon inside it would confuse the service manager.
        raise OSError(errno.EPERM, f"{base} is not delegated (systemd: Delegate=yes)")
    available = (base / "cgroup.controllers").read_text().split()
    controllers = [c for c in ("memory", "pids", "cpu") if c in available]
    if "memory" not in controllers:
        raise OSError(errno.ENOENT, f"no memory controller delegated to {base}")
    enable = " ".join(f"+{c}" for c in controllers)
    try:
        (base / "cgroup.subtree_control").write_text(enable)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        # "No internal processes": a cgroup that hands controllers to children
        # may hold no process itself, so the daemon moves to a leaf of its own
        # (what systemd expects of a service with Delegate=yes).
        leaf = base / CGROUP_DAEMON_LEAF
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(str(os.getpid()))
        (base / "cgroup.subtree_control").write_text(enable)
    sweep_stale_cgroups(base)
    directory = base / dir_name
    directory.mkdir(exist_ok=True)
    (directory / "cgroup.subtree_control").write_text(enable)
    return CgroupTree(version=2, pool_dirs={"unified": directory})


def _delegated(cgroup: Path) -> bool:
    """Whether systemd (>= 251) marked this cgroup as delegated to the service in it."""
    try:
        return os.getxattr(cgroup, "trusted.delegate") == b"1"
    except OSError:
        return False


def cgroup_dir_name(pool_name: str, instance_id: str) -> str:
    """``sandpool-<daemon pid>-<instance>-<pool>``: the pid lets a later daemon sweep it."""
    return f"sandpool-{os.getpid()}-{instance_id}-{pool_name}"


def sweep_stale_cgroups(base: Path) -> None:
    """Remove the empty cgroups of daemons that died without cleaning up (SIGKILL, crash).

    Their sandboxes died with them (--die-with-parent); a daemon still alive, or
    a cgroup that still holds a process, is left alone.
    """
    for stale in base.glob("sandpool-*"):
        daemon_pid = stale.name.split("-")[1]
        if not daemon_pid.isdigit() or pid_alive(int(daemon_pid)):
            continue
        for sandbox_dir in [d for d in stale.iterdir() if d.is_dir()]:
            with contextlib.suppress(OSError):
                sandbox_dir.rmdir()
        with contextlib.suppress(OSError):
            stale.rmdir()
            log.info("stale_cgroup_removed", path=str(stale))


def create_sandbox_cgroup(tree: CgroupTree, sandbox_id: str, config: PoolConfig) -> SandboxCgroup:
    """Make one sandbox's cgroup(s) with the pool's limits. Blocking: run in a thread.

    Raises BackendError; on failure nothing is left behind.
    """
    memory = config.memory_mb * 1024 * 1024
    cpu_quota_us = max(1000, int(config.cpus * CPU_PERIOD_US))
    if tree.version == 1:
        settings = {
            "memory": [
                ("memory.limit_in_bytes", str(memory)),
                ("memory.memsw.limit_in_bytes", str(memory)),  # no swap either
            ],
            "pids": [("pids.max", str(config.pids_limit))],
            "cpu": [("cpu.cfs_period_us", str(CPU_PERIOD_US))],
        }
        cpu_limit = ("cpu", "cpu.cfs_quota_us", str(cpu_quota_us))
        counter = ("memory", "memory.oom_control")
    else:
        settings = {
            "unified": [
                ("memory.max", str(memory)),
                ("memory.swap.max", "0"),
                ("pids.max", str(config.pids_limit)),
            ]
        }
        cpu_limit = ("unified", "cpu.max", f"{cpu_quota_us} {CPU_PERIOD_US}")
        counter = ("unified", "memory.events")
    cgroup = SandboxCgroup(dirs=[])
    try:
        for controller, pool_dir in tree.pool_dirs.items():
            directory = pool_dir / sandbox_id
            directory.mkdir()
            cgroup.dirs.append(directory)
            for name, value in settings[controller]:
                target = directory / name
                if name.startswith(("memory.memsw", "memory.swap", "cpu.")) and not target.exists():
                    continue  # no swap accounting, or no cpu controller: nothing to bound
                target.write_text(value)
            cgroup.procs_files.append(str(directory / "cgroup.procs"))
            if controller == counter[0]:
                cgroup.oom_counter_fd = os.open(directory / counter[1], os.O_RDONLY | os.O_CLOEXEC)
            if controller == cpu_limit[0] and (directory / cpu_limit[1]).exists():
                cgroup.cpu_limit = (directory / cpu_limit[1], cpu_limit[2])
    except OSError as e:
        remove_sandbox_cgroup(cgroup)
        raise BackendError(f"cannot create the sandbox's cgroup: {e}") from None
    return cgroup


def remove_sandbox_cgroup(cgroup: SandboxCgroup) -> None:
    """Remove a sandbox's cgroup(s) once its processes are gone. Blocking: run in a thread.

    Raises BackendError if a directory stays busy for half a second.
    """
    if cgroup.oom_counter_fd is not None:
        os.close(cgroup.oom_counter_fd)
        cgroup.oom_counter_fd = None
    for directory in reversed(cgroup.dirs):
        for _ in range(RMDIR_ATTEMPTS):
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise BackendError(f"cannot remove cgroup {directory}: {e}") from None
                # Normally empty once bwrap is reaped; anything still inside
                # (a child bwrap lost in a failed start) dies now.
                _kill_members(directory)
                time.sleep(0.01)  # a worker thread, not the event loop
        else:
            raise BackendError(f"cgroup {directory} still has processes")
    cgroup.dirs.clear()


def _kill_members(directory: Path) -> None:
    try:
        members = (directory / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in members:  # listed, hence alive and ours: the pid is not reused
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def remove_pool_cgroups(tree: CgroupTree) -> None:
    """Remove this pool's directories; one still busy is left to the next daemon's sweep."""
    for directory in tree.pool_dirs.values():
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cgroup_not_removed", path=str(directory), error=e.strerror)


# --- the runner's process -------------------------------------------------


@dataclass(slots=True, eq=False)
class _Run:
    """One request in flight; its verdicts are filled in by the protocol's callbacks."""

    capture: OutputCapture
    done: asyncio.Future[None]
    output: PipeReader | None = None  # the code's stdout and stderr, once watched
    exit_code: int | None = None
    answered: bool = False  # a status or an exit frame came back
    ended: bool = False  # stdout closed before an exit frame
    over_cap: bool = False
    violation: bool = False
    request_refused: bool = False  # writing the request failed: the runner was gone

    def finish(self) -> None:
        """The code has ended: take what it wrote before, and the run is done."""
        if self.done.done():
            return
        if self.output is not None:
            self.output.drain(DRAIN_READS)
        if not self.done.done():  # the drain may have found the cap
            self.done.set_result(None)

    def stop_at_cap(self) -> None:
        if not self.done.done():
            self.over_cap = True
            self.done.set_result(None)


class _OutputPipes:
    """A sandbox's stdout, stderr and status pipes (the runner's direct mode): read ends here."""

    def __init__(self) -> None:
        self.stdout_r, stdout_w = os.pipe()
        self.stderr_r, stderr_w = os.pipe()
        self.status_r, status_w = os.pipe()
        self.write_ends: tuple[int, ...] = (stdout_w, stderr_w, status_w)
        for fd in (self.stdout_r, self.stderr_r, self.status_r):
            os.set_blocking(fd, False)

    def close_write_ends(self) -> None:
        for fd in self.write_ends:
            os.close(fd)
        self.write_ends = ()

    def watch(self, loop: asyncio.AbstractEventLoop, run: _Run) -> None:
        run.output = PipeReader(loop, self.stdout_r, self.stderr_r, run.capture, run.stop_at_cap)
        loop.add_reader(self.status_r, self._on_status, loop, run)

    def unwatch(self, loop: asyncio.AbstractEventLoop, run: _Run) -> None:
        if run.output is not None:
            run.output.stop()
        loop.remove_reader(self.status_r)

    def _on_status(self, loop: asyncio.AbstractEventLoop, run: _Run) -> None:
        data = read_nonblocking(self.status_r, STATUS_BYTES)
        if data is None:
            return
        loop.remove_reader(self.status_r)
        if len(data) != STATUS_BYTES:
            return  # closed by exec, or garbage: the runner reports the exit instead
        try:
            run.exit_code = decode_exit(data)
        except ProtocolViolation:
            run.violation = True  # a forged status: no exit code, the sandbox is killed
        run.answered = True
        run.finish()

    def close(self) -> None:
        for fd in (*self.write_ends, self.stdout_r, self.stderr_r, self.status_r):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.write_ends = ()


class _RunnerProtocol(asyncio.SubprocessProtocol):
    """Reads runner frames from bwrap's stdout as they arrive; no task per sandbox."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.decoder = FrameDecoder()
        self.ready: asyncio.Future[None] = loop.create_future()
        # A start cancelled before it awaited readiness never reads the failure.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.exited: asyncio.Future[int] = loop.create_future()
        self.transport: asyncio.SubprocessTransport | None = None
        self.run: _Run | None = None
        self.on_idle_death: Callable[[], None] | None = None
        self._broken = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd != 1 or self._broken:
            return
        try:
            frames = self.decoder.feed(bytes(data) if isinstance(data, bytes) else data.encode())
        except ProtocolViolation as e:
            # Garbage on the runner's channel: nothing after it can be trusted.
            self._broken = True
            self._fail(e)
            return
        for kind, payload in frames:
            self._on_frame(kind, payload)

    def _on_frame(self, kind: bytes, payload: bytes) -> None:
        if not self.ready.done():
            if kind == READY:
                self.ready.set_result(None)
            else:
                self._broken = True
                self.ready.set_exception(
                    ProtocolViolation("the runner sent output before it was ready")
                )
            return
        run = self.run
        if run is None or run.done.done():
            return  # after the status, or while parked: nothing the verdict needs
        if kind == EXIT:
            run.answered = True
            try:
                run.exit_code = decode_exit(payload)
            except ProtocolViolation:
                run.violation = True
            run.finish()
        else:  # the runner's direct mode sends nothing else after its ready frame
            self._fail(ProtocolViolation(f"unexpected frame {kind!r} from the runner"))

    def _fail(self, error: ProtocolViolation) -> None:
        if not self.ready.done():
            self.ready.set_exception(error)
        elif self.run is not None and not self.run.done.done():
            self.run.violation = True
            self.run.done.set_result(None)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        run = self.run
        if fd == 0 and exc is not None and run is not None:
            run.request_refused = True
        if fd != 1:
            return
        if not self.ready.done():
            self.ready.set_exception(BackendError("bubblewrap exited before the runner was ready"))
        elif run is not None and not run.done.done():
            run.ended = True
            run.finish()
        elif run is None and self.on_idle_death is not None:
            self.on_idle_death()

    def process_exited(self) -> None:
        returncode = self.transport.get_returncode() if self.transport is not None else None
        if not self.exited.done():
            self.exited.set_result(returncode if returncode is not None else -signal.SIGKILL)
        if not self.ready.done():
            self.ready.set_exception(BackendError("bubblewrap exited before the runner was ready"))
        if self.run is None and self.on_idle_death is not None:
            self.on_idle_death()


class ProcessSandbox(Sandbox):
    def __init__(
        self,
        sandbox_id: str,
        transport: asyncio.SubprocessTransport,
        protocol: _RunnerProtocol,
        info_fd: int,
        stderr_fd: int,
        cgroup: SandboxCgroup | None,
        pipes: _OutputPipes,
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
        self.host_uid: int | None = None  # held from the range until the cgroup is empty
        self.scratch: SandboxScratch | None = None  # the host's copies, until the runner is ready

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


# --- the backend ----------------------------------------------------------


class ProcessBackend:
    """Runs one pool's sandboxes as bubblewrap process trees on this host."""

    name = "process"

    def __init__(
        self, config: PoolConfig, instance_id: str, uids: SandboxUids | None = None
    ) -> None:
        self.config = config
        self.instance_id = instance_id
        self._uids = uids or default_uids()
        self.listener: EventListener | None = None
        self._bwrap = ""
        self._setpriv: str | None = None
        self._seccomp = b""
        self._cgroups: CgroupTree | None = None
        self._scratch: ScratchMounts | None = None  # a root daemon's noexec scratch mounts
        self._filesystem: list[str] = []
        self._limits: dict[str, tuple[int, int]] = {}  # the runner's rlimits (runner_limits)
        self._version = "unknown"
        self._started = False
        self._sandboxes: set[ProcessSandbox] = set()

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise BackendError(
                "bubblewrap is not installed: `apt-get install bubblewrap`", code="bwrap_missing"
            )
        self._bwrap = bwrap
        if os.geteuid() == 0:
            # As root, bwrap's sandbox uid would map to real uid 0, which the kernel
            # exempts from RLIMIT_NPROC (200 forks succeeded): drop to nobody first.
            self._setpriv = shutil.which("setpriv")
            if self._setpriv is None:
                raise BackendError("setpriv (util-linux) is missing", code="setpriv_missing")
        self._seccomp = await asyncio.to_thread(build_filter)
        guest_dir = await asyncio.to_thread(guest.install)
        self._filesystem = await asyncio.to_thread(_filesystem_args)
        self._filesystem += ["--ro-bind", str(guest_dir), guest.GUEST_DIR]
        self._version = await _bwrap_version(bwrap)
        # As root, or as a user systemd delegated a cgroup subtree to (Delegate=yes).
        dir_name = cgroup_dir_name(self.config.name, self.instance_id)
        self._cgroups, reason = await asyncio.to_thread(prepare_cgroups, dir_name)
        if self._cgroups is None:
            # RLIMIT_AS does not count shared memory (memfds, tmpfs, SysV and POSIX
            # shm), so without a memory cgroup one request held 1.5 GiB at
            # memory_mb = 128: refuse rather than promise a limit that is not there.
            raise BackendError(
                f"the process tier enforces memory_mb only with a memory cgroup, and this "
                f"daemon cannot create one ({reason}): run it as root, or under systemd with "
                "Delegate=yes on a cgroup v2 host (see README, 'The process tier')",
                code="process_needs_cgroups",
            )
        if self._setpriv is not None:
            scratch = ScratchMounts(dir_name)
            try:
                await asyncio.to_thread(scratch.start)
            except OSError as e:
                await self.close()
                raise BackendError(
                    f"cannot prepare the noexec scratch mounts in {scratch.directory}: {e}",
                    code="scratch_unavailable",
                ) from None
            self._scratch = scratch
        self._limits = self.runner_limits()
        self._started = True
        # One sandbox through its whole life now, so a host that forbids user
        # namespaces fails at start-up with bwrap's own words, not at every refill.
        try:
            probe = await self.start_sandbox()
        except BackendError as e:
            await self.close()
            raise BackendError(
                f"{e.message} (the process backend needs unprivileged user namespaces: "
                "see README, 'The process tier')",
                code="bwrap_failed",
            ) from None
        except BaseException:
            await self.close()
            raise
        await self.destroy_sandbox(probe)
        log.info(
            "process_backend_ready",
            pool=self.config.name,
            bwrap=self._version,
            cgroups=self._cgroups.controllers if self._cgroups else [],
            host_uids=repr(self._uids) if self._setpriv else os.geteuid(),
        )

    async def close(self) -> None:
        for sandbox in list(self._sandboxes):
            await asyncio.shield(self.destroy_sandbox(sandbox))
        if self._cgroups is not None:
            await asyncio.to_thread(remove_pool_cgroups, self._cgroups)
            self._cgroups = None
        if self._scratch is not None:
            await asyncio.to_thread(self._scratch.close)
            self._scratch = None
        self._started = False

    def version(self) -> str:
        return self._version

    async def ping(self) -> bool:
        return self._started

    # --- sandboxes ---------------------------------------------------------

    def sandbox_command(
        self, seccomp_fd: int, info_fd: int, cgroup: SandboxCgroup | None,
        output_fds: tuple[int, ...], host_uid: int | None = None,
        scratch: SandboxScratch | None = None,
    ) -> list[str]:
        """The full command line of one sandbox; every limit comes from the pool config.

        ``host_uid``: what a root daemon drops to before bwrap, the sandbox's own
        uid of the range (inside, the code still sees 65534).
        """
        c = self.config
        stdout_w, stderr_w, status_w = output_fds  # the runner's direct mode
        tmpfs_bytes = str(c.tmpfs_mb * 1024 * 1024)
        command: list[str] = []
        if cgroup is not None and cgroup.procs_files:
            command += ["/bin/sh", "-c", _JOIN_CGROUPS, "sh", *cgroup.procs_files, "--"]
        if self._setpriv is not None:
            uid = str(host_uid if host_uid is not None else self._uids.base)
            command += [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        command += [
            self._bwrap,
            # --unshare-all only *tries* the user namespace; --disable-userns needs it.
            "--unshare-all", "--unshare-user", "--disable-userns",
            "--die-with-parent", "--new-session",
            # The runner is PID 1: killing it empties the namespace, and bwrap reaps
            # it itself (with an init of bwrap's, a zombie would outlive bwrap).
            "--as-pid-1",
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL",
            "--hostname", "sandbox",
            "--clearenv",
            "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "HOME", WORKDIR,
            "--setenv", "LANG", "C.UTF-8",
            *self._filesystem,
            "--proc", "/proc",
            "--dev", "/dev",
            # A root daemon's own noexec tmpfs mounts (process_scratch.py);
            # otherwise bwrap's, which it cannot make noexec.
            *(scratch.bwrap_args() if scratch is not None else [
                "--perms", "1777", "--size", tmpfs_bytes, "--tmpfs", "/tmp",
                "--perms", "1777", "--size", tmpfs_bytes, "--tmpfs", "/dev/shm",
                "--perms", "0700", "--size", tmpfs_bytes, "--tmpfs", WORKDIR,
            ]),
            # bwrap's root and /dev are writable tmpfs without a size: make them read-only.
            "--remount-ro", "/dev", "--remount-ro", "/",
            "--chdir", WORKDIR,
            "--seccomp", str(seccomp_fd),
            "--info-fd", str(info_fd),
            "--",
            INTERPRETER, "-I", guest.path_in_sandbox(guest.RUNNER),
            *RunnerArguments(
                DIRECT, c.language, (stdout_w, stderr_w, status_w), self._limits
            ).to_argv(),
        ]  # fmt: skip
        return command

    def runner_limits(self) -> dict[str, tuple[int, int]]:
        """The rlimits the runner sets on itself before anything else, inherited by the code.

        Set by the runner, not by ``preexec_fn``, which would cost a full fork
        of the daemon per sandbox.
        """
        c = self.config
        memory = c.memory_mb * 1024 * 1024
        cpu_s = math.ceil(c.max_timeout_s) + 1  # the daemon's timeout always comes first
        address_space = memory * ADDRESS_SPACE_FACTOR
        file_size = c.tmpfs_mb * 1024 * 1024
        return {
            "RLIMIT_AS": (address_space, address_space),
            "RLIMIT_CPU": (cpu_s, cpu_s + 1),
            # Also bounds memfds, which no tmpfs size covers; the request's stdin is one.
            "RLIMIT_FSIZE": (file_size, file_size),
            "RLIMIT_NOFILE": (1024, 1024),
            "RLIMIT_CORE": (0, 0),
            "RLIMIT_NPROC": (c.pids_limit, c.pids_limit),
        }

    async def start_sandbox(self) -> ProcessSandbox:
        if not self._started:
            raise BackendError("the process backend is not started")
        sandbox_id = new_sandbox_id()
        cgroup: SandboxCgroup | None = None
        if self._cgroups is not None:
            creating = asyncio.ensure_future(
                asyncio.to_thread(create_sandbox_cgroup, self._cgroups, sandbox_id, self.config)
            )
            try:
                cgroup = await asyncio.shield(creating)
            except asyncio.CancelledError:
                # The thread finishes the cgroup anyway: remove what it made.
                with contextlib.suppress(BackendError):
                    await asyncio.to_thread(remove_sandbox_cgroup, await creating)
                raise
        # Shielded: cancelling the spawn halfway would have asyncio kill bwrap
        # between its clone and --die-with-parent, orphaning the half-made child.
        spawning = asyncio.ensure_future(self._spawn(sandbox_id, cgroup))
        try:
            sandbox = await asyncio.shield(spawning)
        except BaseException as e:
            made = None
            if isinstance(e, asyncio.CancelledError):
                with contextlib.suppress(BackendError):
                    made = await spawning
            if made is not None:
                with contextlib.suppress(BackendError):
                    await self.destroy_sandbox(made)  # removes the cgroup too
            elif cgroup is not None:
                with contextlib.suppress(BackendError):
                    await asyncio.to_thread(remove_sandbox_cgroup, cgroup)
            raise
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                # Shielded so that the destroy below can still wait for it.
                await asyncio.shield(sandbox.protocol.ready)
            sandbox.learn_runner()
            if sandbox.scratch is not None:
                # bwrap bound the mounts before it started the runner: the
                # host's copies can go, so nothing of the sandbox stays reachable.
                await asyncio.to_thread(sandbox.scratch.detach)
            if sandbox.cgroup is not None:
                await asyncio.to_thread(sandbox.cgroup.apply_cpu_limit)
        except BaseException as e:
            with contextlib.suppress(BackendError):
                await asyncio.shield(self.destroy_sandbox(sandbox))
            if isinstance(
                e, (BackendError, ProtocolViolation, OSError, TimeoutError, ValueError, KeyError)
            ):
                why = sandbox.stderr_text or _describe(e)
                raise BackendError(f"cannot start a bubblewrap sandbox: {why}") from None
            raise
        sandbox.protocol.on_idle_death = lambda: self._died_idle(sandbox)
        return sandbox

    async def _spawn(self, sandbox_id: str, cgroup: SandboxCgroup | None) -> ProcessSandbox:
        loop = asyncio.get_running_loop()
        # A fresh fd per spawn: bwrap reads the program to its end.
        seccomp_fd = os.memfd_create("sandpool-seccomp", os.MFD_CLOEXEC)
        os.write(seccomp_fd, self._seccomp)
        os.lseek(seccomp_fd, 0, os.SEEK_SET)
        info_r, info_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        for fd in (info_r, stderr_r):
            os.set_blocking(fd, False)
        pipes = _OutputPipes()
        # As root, each sandbox runs as a host uid of its own (pool/uids.py); a
        # non-root daemon's sandboxes can only be its own uid outside.
        host_uid = self._uids.acquire() if self._setpriv is not None else None
        scratch: SandboxScratch | None = None
        try:
            if self._scratch is not None and host_uid is not None:
                scratch = await asyncio.to_thread(
                    self._scratch.mount, sandbox_id, host_uid, self.config.tmpfs_mb * 1024 * 1024
                )
            command = self.sandbox_command(
                seccomp_fd, info_w, cgroup, pipes.write_ends, host_uid, scratch
            )
            transport, protocol = await loop.subprocess_exec(
                lambda: _RunnerProtocol(loop),
                *command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr_w,
                pass_fds=(seccomp_fd, info_w, *pipes.write_ends),
                # Out of the daemon's process group: a Ctrl-C meant for the
                # daemon must not kill sandboxes it is draining.
                start_new_session=True,
                cwd="/",  # after setpriv, nobody may not enter the daemon's directory
            )
        except BaseException as e:
            os.close(info_r)
            os.close(stderr_r)
            pipes.close()
            if host_uid is not None:  # nothing was started as it
                self._uids.release(host_uid)
            if scratch is not None:
                with contextlib.suppress(BackendError):
                    await asyncio.to_thread(scratch.detach)
            if isinstance(e, OSError):
                raise BackendError(f"cannot run bubblewrap: {e}") from None
            raise
        finally:
            for fd in (seccomp_fd, info_w, stderr_w):
                os.close(fd)
        pipes.close_write_ends()  # the sandbox holds them now: EOF means its writers are gone
        sandbox = ProcessSandbox(
            sandbox_id, transport, protocol, info_r, stderr_r, cgroup, pipes
        )
        sandbox.host_uid = host_uid
        sandbox.scratch = scratch
        self._sandboxes.add(sandbox)
        return sandbox

    def _died_idle(self, sandbox: ProcessSandbox) -> None:
        if not sandbox.mark_dead():
            return
        log.warning(
            "sandbox_died_idle",
            pool=self.config.name,
            sandbox=sandbox.id,
            stderr=sandbox.read_stderr(),
        )
        if self.listener is not None:
            self.listener(sandbox, "died")

    async def run(self, sandbox: ProcessSandbox, request: RunRequest) -> RunResult:
        protocol = sandbox.protocol
        stdin = sandbox.transport.get_pipe_transport(0)
        if (
            not sandbox.alive
            or protocol.exited.done()
            or not isinstance(stdin, asyncio.WriteTransport)
            or stdin.is_closing()
        ):
            raise SandboxLostError(f"sandbox {sandbox.id} died while idle")
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        run = _Run(OutputCapture(self.config.max_output_bytes), loop.create_future())
        protocol.run = run
        sandbox.pipes.watch(loop, run)
        stdin.write(encode_request(request.code, request.stdin))
        timed_out = False
        try:
            async with asyncio.timeout(request.timeout_s):
                await run.done
        except TimeoutError:
            timed_out = True
        finally:
            sandbox.pipes.unwatch(loop, run)
        execution_s = time.monotonic() - began
        if timed_out or run.over_cap or run.violation:
            sandbox.kill()  # now, not at destroy: the code may be burning CPU
        if run.violation:
            log.warning("sandbox_protocol_violation", sandbox=sandbox.id)
        exit_code = run.exit_code
        if run.ended:
            if run.request_refused and not (run.answered or (run.output and run.output.received)):
                raise SandboxLostError(f"sandbox {sandbox.id} did not take its request")
            exit_code = await self._exit_status(sandbox)
        oom_killed = await self._oom_verdict(sandbox, wait=run.ended or exit_code == 137)
        if oom_killed and self.listener is not None:
            self.listener(sandbox, "oom")
        return RunResult.from_capture(
            run.capture,
            exit_code=None if timed_out or run.over_cap else exit_code,
            timed_out=timed_out,
            oom_killed=oom_killed,
            execution_s=execution_s,
        )

    async def _exit_status(self, sandbox: ProcessSandbox) -> int | None:
        """The runner died without its exit frame: bwrap exits with its status."""
        try:
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                returncode = await asyncio.shield(sandbox.protocol.exited)
        except TimeoutError:
            return None
        return returncode if returncode >= 0 else 128 - returncode

    async def _oom_verdict(self, sandbox: ProcessSandbox, *, wait: bool) -> bool:
        """Whether the kernel OOM-killed in the sandbox's cgroup; never the code's claim."""
        cgroup = sandbox.cgroup
        if cgroup is None:
            return False
        deadline = time.monotonic() + (OOM_COUNTER_GRACE_S if wait else 0.0)
        while True:
            # One pread of a kernfs counter: it never waits on a device.
            if cgroup.oom_kills() > 0:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)

    async def destroy_sandbox(self, sandbox: ProcessSandbox) -> None:
        if not sandbox.mark_destroyed():
            return
        self._sandboxes.discard(sandbox)
        try:
            await self._reap(sandbox)
        finally:
            # bwrap's own complaints and a crashed runner's traceback land here.
            sandbox.stderr_text = sandbox.read_stderr()
            if sandbox.stderr_text:
                log.debug("runner_stderr", sandbox=sandbox.id, stderr=sandbox.stderr_text)
            sandbox.transport.close()
            sandbox.close_fds()
            if sandbox.scratch is not None:  # a start that failed before the runner was ready
                try:
                    await asyncio.to_thread(sandbox.scratch.detach)
                except BackendError as e:
                    log.warning("scratch_not_removed", sandbox=sandbox.id, error=e.message)
            if sandbox.cgroup is not None:
                await asyncio.to_thread(remove_sandbox_cgroup, sandbox.cgroup)
            # Only now is the uid free: the cgroup was empty, so no process runs as it.
            if sandbox.host_uid is not None:
                self._uids.release(sandbox.host_uid)
                sandbox.host_uid = None

    async def _reap(self, sandbox: ProcessSandbox) -> None:
        """Kill the tree and wait until bwrap is reaped, hence every process in it gone."""
        protocol = sandbox.protocol
        if sandbox.runner_pidfd is None and not protocol.exited.done():
            # A start cut short. bwrap names the runner only once it has cloned
            # it; killing bwrap before could orphan the child mid-setup.
            either: list[asyncio.Future[Any]] = [protocol.ready, protocol.exited]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READY_TIMEOUT_S):
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        sandbox.kill()
        try:
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                await asyncio.shield(sandbox.protocol.exited)
            return
        except TimeoutError:
            pass
        log.warning("sandbox_kill_slow", sandbox=sandbox.id)
        sandbox.kill_bwrap()
        try:
            async with asyncio.timeout(EXIT_TIMEOUT_S):
                await asyncio.shield(sandbox.protocol.exited)
        except TimeoutError:
            raise BackendError(f"sandbox {sandbox.id} did not die after SIGKILL") from None


def _filesystem_args() -> list[str]:
    """Read-only binds of what the interpreter needs, following the host's /usr layout."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    if os.path.exists("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    if not os.access(INTERPRETER, os.X_OK):
        raise BackendError(
            f"the process backend runs the host's {INTERPRETER}: install python3",
            code="python_missing",
        )
    return args


async def _bwrap_version(bwrap: str) -> str:
    process = await asyncio.create_subprocess_exec(
        bwrap, "--version", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(EXIT_TIMEOUT_S):
            out, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return "unknown"
    return out.decode().strip() or "unknown"


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return f"the runner was not ready within {READY_TIMEOUT_S:g} s"
    if isinstance(error, BackendError | ProtocolViolation):
        return error.message
    return str(error) or type(error).__name__
