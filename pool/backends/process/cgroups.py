"""The process tier's cgroups: one directory per pool, one per sandbox below it.

The memory cgroup is what bounds a sandbox's memory: RLIMIT_AS does not count
shared memory (memfds, tmpfs, SysV and POSIX shm), so without one the backend
refuses to start. Its ``oom_kill`` counter gives the OOM verdict the way
Docker's events do. pids and cpu are extras where the host offers them.

Cgroup v1 (one directory per controller) and v2 (one unified directory) alike;
as root, or as a user systemd delegated a subtree to (``Delegate=yes``). What
makes, sweeps or removes cgroups writes kernfs files and blocks briefly: run it
in a thread. Reading the OOM counter is one pread, fine on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import structlog

from pool.config import PoolConfig
from pool.errors import BackendError
from pool.procfs import pid_alive, process_names

log = structlog.get_logger("sandpool.process")

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_DAEMON_LEAF = "sandpool-daemon"  # cgroup v2: where the daemon moves itself
CPU_PERIOD_US = 100_000
# A cgroup's default CPU weight, that of one process: cpu.shares (v1) and
# cpu.weight (v2), and the largest each takes.
WEIGHT_OF_ONE = {1: ("cpu.shares", 1024, 262_144), 2: ("cpu.weight", 100, 10_000)}
# x 10 ms: a cgroup is busy until the kernel has freed its last task, which takes
# milliseconds once its processes are SIGKILLed, and seconds on a host starved of
# CPU (a datasci fork bomb's 64 processes, under two busy loops, outlasted 0.5 s).
RMDIR_ATTEMPTS = 500


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
    """One sandbox's cgroup directories, and what the backend reads and writes in them."""

    dirs: list[Path]
    procs_files: list[str] = field(default_factory=list)
    oom_counter_fd: int | None = None  # memory.oom_control (v1) or memory.events (v2)
    cpu_limit: tuple[Path, str] | None = None  # written once the runner is ready
    idle_file: Path | None = None  # cpu.idle: 1 while a busy run goes on (cpu.py)

    def apply_cpu_limit(self) -> None:
        """Set the CPU quota. Blocking (one kernfs write): run in a thread.

        Not at creation: the runner's own start-up would be throttled at a
        fractional ``cpus``, which slows every refill (docs/performance.md).
        """
        if self.cpu_limit is not None:
            path, value = self.cpu_limit
            path.write_text(value)

    def set_idle(self, idle: bool) -> None:
        """SCHED_IDLE among its pool's sandboxes, or not. Blocking (one kernfs
        write): run in a thread. Best effort: a cgroup already removed (the run
        ended and the sandbox went) or a kernel without cpu.idle (before 5.15)
        keeps its standing, which only moves latency."""
        if self.idle_file is not None:
            with contextlib.suppress(OSError):
                self.idle_file.write_text("1" if idle else "0")

    def oom_kills(self) -> int:
        """The kernel's count of OOM kills in this cgroup: one pread of a kernfs file, no I/O."""
        if self.oom_counter_fd is None:
            return 0
        for line in os.pread(self.oom_counter_fd, 4096, 0).decode().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0


def own_cgroups(pid: int | str = "self") -> dict[str, str]:
    """This process's (or ``pid``'s) cgroup path per v1 controller, and under "" its v2 path."""
    paths: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def daemon_group_name(pid: int | None = None, role: str = "daemon") -> str:
    """``sandpool-<daemon pid>-<role>``: cgroup v1's cgroups for the daemon's own
    threads (pool/daemon_cpu.py), named so a later daemon sweeps them."""
    return f"sandpool-{os.getpid() if pid is None else pid}-{role}"


def pools_base(own_path: str, hierarchy: Path, pid: int | None = None) -> Path:
    """Where the pools' directories of daemon ``pid`` (this one by default) go:
    the cgroup ``own_path`` names in ``hierarchy``, or its parent when that is
    the daemon's own (v2's leaf, v1's weighted group): pools and daemon are siblings."""
    base = hierarchy / own_path.lstrip("/")
    if base.name in (CGROUP_DAEMON_LEAF, daemon_group_name(pid)):
        base = base.parent
    return base


def delegated_v2_base(own_path: str) -> Path:
    """The cgroup (v2) this daemon may manage: its own, or the parent of its leaf.

    Raises OSError (EPERM) for root in a cgroup that systemd did not delegate:
    root could write anywhere, but such a cgroup is systemd's, and moving the
    daemon inside it would confuse the service manager.
    """
    base = pools_base(own_path, CGROUP_ROOT)
    if base != CGROUP_ROOT and os.geteuid() == 0 and not _delegated(base):
        raise OSError(errno.EPERM, f"{base} is not delegated (systemd: Delegate=yes)")
    return base


def unified_host() -> bool:
    """Whether /sys/fs/cgroup is cgroup v2 alone; else v1 hierarchies (a hybrid
    host's v2 mount, unified/, holds no controller the daemon uses)."""
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def prepare_cgroups(dir_name: str) -> tuple[CgroupTree | None, str]:
    """Create this pool's cgroup directory below the daemon's own cgroup.

    Returns the tree, or None and the reason (not root, no delegation, no memory
    controller): the backend then relies on rlimits alone. Blocking: run in a thread.
    """
    try:
        own = own_cgroups()
        if unified_host():
            return _prepare_v2(own.get("", "/"), dir_name), ""
        return _prepare_v1(own, dir_name), ""
    except (OSError, ValueError) as e:
        return None, str(e)


def _prepare_v1(own: dict[str, str], dir_name: str) -> CgroupTree:
    pool_dirs: dict[str, Path] = {}
    for controller in ("memory", "pids", "cpu"):
        if controller not in own:
            continue
        base = pools_base(own[controller], CGROUP_ROOT / controller)
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
    base = delegated_v2_base(own)
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
    """Remove the cgroups of daemons that died without cleaning up (SIGKILL, crash),
    killing what is left in them first. Blocking: run in a thread.

    Their running sandboxes died with them (--die-with-parent), but not one
    that was starting: bwrap's child, still setting up its namespaces, has no
    parent-death signal yet, and waits forever for a parent that is gone (seen
    after a SIGKILL that met a refill). A process in a dead daemon's sandbox
    cgroup is such an orphan. A daemon that reads as alive (a reused pid
    included) is left alone. Pools start together, so two sweeps may meet: what
    the other removed first is skipped.
    """
    for stale in base.glob("sandpool-*"):
        daemon_pid = stale.name.split("-")[1]
        if not daemon_pid.isdigit() or pid_alive(int(daemon_pid)) or not stale.is_dir():
            continue
        killed, stayed = remove_emptied([stale])
        for directory, processes in killed.items():
            log.warning("stale_sandbox_killed", path=str(directory), processes=processes)
        if not stayed:
            log.info("stale_cgroup_removed", path=str(stale))


def remove_emptied(directories: list[Path]) -> tuple[dict[Path, list[str]], list[Path]]:
    """Remove cgroup directories and the sandbox directories one level below them,
    SIGKILLing whatever still runs in any of them (``rmdir_killing``). Never
    raises. Blocking: run in a thread.

    Returns the directories that held processes, each with what it held, and
    those still there: one refused (not EBUSY), or busy after RMDIR_ATTEMPTS
    steps (a process the kill cannot end, in uninterruptible sleep). A
    directory already gone (two sweeps meeting) is fine.
    """
    below: list[Path] = []
    for directory in directories:
        with contextlib.suppress(OSError):  # gone, or not a directory
            below += [d for d in directory.iterdir() if d.is_dir()]
    order = [*below, *directories]  # children first: a parent with one is busy
    killed, error = rmdir_killing(order)
    return killed, [d for d in order if d.exists()] if error is not None else []


def rmdir_killing(order: list[Path]) -> tuple[dict[Path, list[str]], OSError | None]:
    """rmdir each directory of ``order`` (children before their parents); in one
    that is busy, SIGKILL what runs, and try again every 10 ms, RMDIR_ATTEMPTS
    times. Blocking: run in a thread.

    Returns the directories that held processes, each with what it held
    (``process_names``, for a log), and the error that stopped it: EBUSY after
    the last attempt, or another errno at once; None once all are gone (one
    already gone is fine). Even once ``cgroup.procs`` is empty, rmdir says
    EBUSY until the kernel has released the last task: hence retrying, not one
    wait for the list to empty.
    """
    killed: dict[Path, list[str]] = {}
    busy: list[tuple[Path, OSError]] = []
    for _ in range(RMDIR_ATTEMPTS):
        busy = []
        for directory in order:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY:
                    return killed, e
                busy.append((directory, e))
        if not busy:
            return killed, None
        # Each directory's processes are named before any is killed: one process
        # is in a directory of every hierarchy, and gone from all once killed.
        for directory, _ in busy:
            if found := members(directory):
                killed.setdefault(directory, process_names(found))
        for directory, _ in busy:
            kill_members(directory)  # again each time: a fork may race a kill
        time.sleep(0.01)  # a worker thread, not the event loop
    return killed, busy[0][1]


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
                if (directory / "cpu.idle").exists():
                    cgroup.idle_file = directory / "cpu.idle"
    except OSError as e:
        remove_sandbox_cgroup(cgroup)
        raise BackendError(f"cannot create the sandbox's cgroup: {e}") from None
    return cgroup


def remove_sandbox_cgroup(cgroup: SandboxCgroup) -> None:
    """Remove a sandbox's cgroup(s) once its processes are gone. Blocking: run in a thread.

    Normally empty once bwrap is reaped; anything still inside (a child bwrap
    lost in a failed start) is killed (``rmdir_killing``). Raises BackendError
    if a directory stays busy for RMDIR_ATTEMPTS x 10 ms, or cannot be removed.
    """
    if cgroup.oom_counter_fd is not None:
        os.close(cgroup.oom_counter_fd)
        cgroup.oom_counter_fd = None
    _, error = rmdir_killing(list(reversed(cgroup.dirs)))
    if error is not None and error.errno == errno.EBUSY:
        raise BackendError(f"cgroup {error.filename} still has processes")
    if error is not None:
        raise BackendError(f"cannot remove cgroup {error.filename}: {error}")
    cgroup.dirs.clear()


def members(directory: Path) -> list[int]:
    """The pids in a cgroup directory; [] when it cannot be read (gone already)."""
    try:
        return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def kill_members(directory: Path) -> None:
    """SIGKILL every process of a cgroup directory."""
    for pid in members(directory):  # listed, hence alive and ours: the pid is not reused
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def set_pool_cpu(tree: CgroupTree, weight: int, idle: bool, *, was_idle: bool) -> None:
    """Set the pool directory's CPU weight (in processes' weights) and idle flag.

    What the values are is pool/backends/process/cpu.py's. The kernel refuses a
    weight for an idle cgroup and resets it to one process's when the flag is
    cleared, so the flag is cleared (if ``was_idle``) before the weight is written.
    Best effort, as both only move latency: a cgroup without a cpu controller,
    a kernel without cpu.idle, or a directory being removed is left as it is.
    Blocking (kernfs writes): run in a thread.
    """
    name, one, most = WEIGHT_OF_ONE[tree.version]
    directory = tree.pool_dirs.get("cpu" if tree.version == 1 else "unified")
    if directory is None:
        return
    idle_file = directory / "cpu.idle"
    flagged = idle_file.exists()  # not before Linux 5.15: then the weight alone moves
    with contextlib.suppress(OSError):
        if idle and flagged:
            idle_file.write_text("1")
            return
        if was_idle and flagged:
            idle_file.write_text("0")
        (directory / name).write_text(str(min(most, one * weight)))


def remove_pool_cgroups(tree: CgroupTree) -> None:
    """Remove this pool's directories, once its sandboxes are destroyed. Blocking:
    run in a thread.

    What is still below them is this pool's leftover: a sandbox whose destroy
    gave up (its processes outlasted RMDIR_ATTEMPTS), or in a Docker pool what
    the engine left. It is killed and its directory removed with the pool's
    (``remove_emptied``), logged as ``pool_leftover_killed``; one that stays
    busy is logged and left to the next daemon's sweep.
    """
    killed, stayed = remove_emptied(list(tree.pool_dirs.values()))
    for directory, processes in killed.items():
        log.warning("pool_leftover_killed", path=str(directory), processes=processes)
    for directory in stayed:
        log.warning("cgroup_not_removed", path=str(directory))
