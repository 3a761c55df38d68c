"""How every sandbox of one process pool is started: the bwrap command line and its hardening.

New user, PID, network, IPC, UTS and cgroup namespaces; no capabilities;
uid 65534 inside and, for a root daemon, a host uid of the sandbox's own
outside (``pool/uids.py``: the daemon drops to it with ``setpriv`` before
bwrap) or, for a daemon that is not root, user and mount namespaces the daemon
makes with the sandbox's share of its uid's quotas and its scratch mounts, in
which bwrap starts (``userns.py``); noexec scratch mounts of the daemon's
(``scratch.py``); a read-only root holding the host's ``/usr`` and the guest
programs; sandpool's seccomp filter (``pool/seccomp.py``); rlimits the runner
sets on itself before anything else. Everything that does not change per
sandbox is found and checked once, by ``define()``, when the backend starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pool import guest
from pool.backends.process.cgroups import SandboxCgroup
from pool.backends.process.scratch import SandboxScratch, StagedScratch
from pool.backends.process.userns import nsenter_command
from pool.config import PoolConfig
from pool.errors import BackendError, ImageBuildError
from pool.image.rootfs import export_rootfs
from pool.paths import state_dir
from pool.seccomp import build_filter
from pool.wire import DIRECT, WORKDIR, RunnerArguments

INTERPRETER = "/usr/bin/python3"  # the image's (filesystem_args)
SANDBOX_UID = 65534  # nobody, as the code sees itself inside the sandbox
VERSION_TIMEOUT_S = 5.0  # ``bwrap --version``
# The memory cgroup decides; the address-space limit is only a backstop this
# many times larger (threads reserve far more address space than they use).
ADDRESS_SPACE_FACTOR = 8

# Run by /bin/sh with the daemon's rights (root, or the owner of a delegated
# subtree): join the sandbox's cgroups, then exec the rest of the command line.
# Joining from inside the child is the only way to have every process of the
# tree born in the cgroup (asyncio cannot spawn into one).
JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ >"$1" || exit 125; shift; done; shift; exec "$@"'


@dataclass(frozen=True, slots=True, eq=False)
class SandboxDefinition:
    """One pool's sandbox command line but for what each sandbox has of its own."""

    config: PoolConfig
    bwrap: str
    # A root daemon's: it drops to the sandbox's host uid before bwrap, because
    # bwrap's sandbox uid would otherwise map to real uid 0, which the kernel
    # exempts from RLIMIT_NPROC. None for a daemon that is not root.
    setpriv: str | None
    # A non-root daemon's: util-linux unshare, which makes each sandbox's user and
    # mount namespaces with its quotas and scratch, and nsenter, which starts
    # bwrap in them (userns.py). None for a root daemon.
    unshare: str | None
    nsenter: str | None
    seccomp: bytes  # the compiled filter, handed to bwrap on a fresh memfd per sandbox
    filesystem: tuple[str, ...]  # bwrap's read-only binds (filesystem_args) and the guest dir
    limits: dict[str, tuple[int, int]]  # the runner's rlimits (runner_limits)
    version: str  # bwrap's own
    # A non-root daemon's sandbox's share of the /proc/sys/user quotas (pool/quotas.py);
    # set by the backend, which knows how many sandboxes share the daemon's uid.
    user_quotas: dict[str, int] = dataclasses.field(default_factory=dict)

    def seccomp_fd(self) -> int:
        """A fresh memfd holding the filter, at offset 0: bwrap reads the program to its end."""
        fd = os.memfd_create("sandpool-seccomp", os.MFD_CLOEXEC)
        os.write(fd, self.seccomp)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def command(
        self,
        seccomp_fd: int,
        info_fd: int,
        cgroup: SandboxCgroup | None,
        output_fds: tuple[int, ...],
        scratch: SandboxScratch | StagedScratch,
        host_uid: int | None = None,
        maker_pid: int | None = None,
    ) -> list[str]:
        """The full command line of one sandbox; every limit comes from the pool config.

        ``scratch``: its noexec scratch mounts (a root daemon's, or in a non-root
        daemon's namespaces, the pool's staging). ``host_uid``: what a root
        daemon drops to before bwrap, the sandbox's own uid of the range
        (inside, the code still sees 65534). ``maker_pid``: what holds a
        non-root daemon's namespaces for the sandbox (userns.py). Raises
        ValueError when a root daemon's sandbox has no uid, or a non-root one
        no namespaces.
        """
        c = self.config
        stdout_w, stderr_w, status_w = output_fds  # the runner's direct mode
        command: list[str] = []
        if cgroup is not None and cgroup.procs_files:
            command += ["/bin/sh", "-c", JOIN_CGROUPS, "sh", *cgroup.procs_files, "--"]
        if self.setpriv is not None:
            if host_uid is None:
                raise ValueError("a root daemon's sandbox needs a host uid of its own")
            uid = str(host_uid)
            command += [self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        elif self.nsenter is not None:
            if maker_pid is None:
                raise ValueError("a non-root daemon's sandbox needs its namespaces")
            command += nsenter_command(self.nsenter, maker_pid)
        command += [
            self.bwrap,
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
            *self.filesystem,
            "--proc", "/proc",
            "--dev", "/dev",
            # The daemon's noexec tmpfs mounts (scratch.py): bwrap's --tmpfs
            # cannot be noexec.
            *scratch.bwrap_args(),
            # bwrap's root and /dev are writable tmpfs without a size: make them read-only.
            "--remount-ro", "/dev", "--remount-ro", "/",
            "--chdir", WORKDIR,
            "--seccomp", str(seccomp_fd),
            "--info-fd", str(info_fd),
            "--",
            INTERPRETER, "-I", guest.path_in_sandbox(guest.RUNNER),
            *RunnerArguments(
                DIRECT, c.language, (stdout_w, stderr_w, status_w), self.limits,
                list(c.preload),
            ).to_argv(),
        ]  # fmt: skip
        return command


async def define(config: PoolConfig) -> SandboxDefinition:
    """Find bwrap (and setpriv for a root daemon), compile the seccomp filter, install the
    guest programs and check the host's interpreter.

    Raises BackendError saying what to install. Costs a ``bwrap --version`` and a
    few file checks, in threads.
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise BackendError(
            "bubblewrap is not installed: `apt-get install bubblewrap`", code="bwrap_missing"
        )
    setpriv = unshare = nsenter = None
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise BackendError("setpriv (util-linux) is missing", code="setpriv_missing")
    else:
        unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
        if unshare is None or nsenter is None:
            raise BackendError("unshare or nsenter (util-linux) is missing",
                               code="unshare_missing")
    seccomp = await asyncio.to_thread(build_filter)
    guest_dir = await asyncio.to_thread(guest.install)
    return SandboxDefinition(
        config=config,
        bwrap=bwrap,
        setpriv=setpriv,
        unshare=unshare,
        nsenter=nsenter,
        seccomp=seccomp,
        filesystem=("--ro-bind", str(guest_dir), guest.GUEST_DIR),
        limits=runner_limits(config),
        version=await bwrap_version(bwrap),
    )


def runner_limits(config: PoolConfig) -> dict[str, tuple[int, int]]:
    """The rlimits the runner sets on itself before anything else, inherited by the code.

    Set by the runner, not by ``preexec_fn``, which would cost a full fork
    of the daemon per sandbox.
    """
    memory = config.memory_mb * 1024 * 1024
    cpu_s = math.ceil(config.max_timeout_s) + 1  # the daemon's timeout always comes first
    address_space = memory * ADDRESS_SPACE_FACTOR
    file_size = config.tmpfs_mb * 1024 * 1024
    # V8 reserves far more address space than it uses (its heap cage alone is
    # gigabytes): no backstop fits, so for node the memory cgroup, which every
    # process sandbox has, is the only memory limit.
    backstop = {} if config.language == "javascript" else {
        "RLIMIT_AS": (address_space, address_space)
    }
    return {
        **backstop,
        "RLIMIT_CPU": (cpu_s, cpu_s + 1),
        # Also bounds memfds, which no tmpfs size covers; the request's stdin is one.
        "RLIMIT_FSIZE": (file_size, file_size),
        "RLIMIT_NOFILE": (1024, 1024),
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_NPROC": (config.pids_limit, config.pids_limit),
    }


# What a sandbox sees of its image's root file system, each bound read-only;
# bwrap's own tmpfs root holds the rest (/proc, /dev, scratch, the guest dir).
ROOTFS_TOPS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")


def filesystem_args(rootfs: Path) -> list[str]:
    """Read-only binds of the image's root file system (``pool.image.export_rootfs``).

    The sandbox runs the image's interpreter and libraries, never the host's:
    the same as the docker tier's pool on that image. Raises BackendError when
    the image has no INTERPRETER.
    """
    args: list[str] = []
    for top in ROOTFS_TOPS:
        path = rootfs / top
        if path.is_symlink():  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(path), f"/{top}"]
        elif path.is_dir():
            args += ["--ro-bind", str(path), f"/{top}"]
    interpreter = rootfs / INTERPRETER.lstrip("/")
    if interpreter.is_symlink():  # python3 -> python3.11, inside the image
        link = os.readlink(interpreter)
        interpreter = rootfs / link.lstrip("/") if link.startswith("/") else (
            interpreter.parent / link
        )
    if not os.access(interpreter, os.X_OK):
        raise BackendError(
            f"the pool's image has no {INTERPRETER}: the process tier runs the image's python3",
            code="python_missing",
        )
    return args


async def with_rootfs(definition: SandboxDefinition) -> SandboxDefinition:
    """The definition with its pool's image's root file system bound in, exported
    under the state directory now unless it already was (seconds, once per image).

    Raises BackendError ``rootfs_unavailable`` when the image cannot be exported
    (no such image, or no access to Docker).
    """
    try:
        rootfs = await export_rootfs(definition.config.image, state_dir())
    except (ImageBuildError, OSError) as e:
        message = e.message if isinstance(e, ImageBuildError) else str(e)
        raise BackendError(
            f"the process tier runs from its image's root file system, and exporting "
            f"{definition.config.image} failed: {message}",
            code="rootfs_unavailable",
        ) from None
    binds = await asyncio.to_thread(filesystem_args, rootfs)
    return dataclasses.replace(definition, filesystem=(*binds, *definition.filesystem))


async def bwrap_version(bwrap: str) -> str:
    """``bwrap --version``'s answer, or "unknown"."""
    process = await asyncio.create_subprocess_exec(
        bwrap, "--version", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(VERSION_TIMEOUT_S):
            out, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        return "unknown"
    return out.decode().strip() or "unknown"
