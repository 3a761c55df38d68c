"""The process tier's scratch directories as noexec tmpfs mounts made by a root daemon.

bubblewrap 0.8 mounts ``--tmpfs`` with nosuid and nodev only: it has no option
that adds noexec (``--remount-ro`` adds read-only and nothing else), and the
code inside, without capabilities, cannot remount. A bind mount keeps the flags
of its source, though, and the kernel locks them for a user namespace (a mount
that came in noexec cannot be made exec inside). So a root daemon mounts each
sandbox's ``/tmp``, ``/dev/shm`` and working directory itself, each a tmpfs of
``tmpfs_mb`` with noexec, nosuid and nodev, and bwrap binds them in.

Layout: ``/run/sandpool-scratch/sandpool-<daemon pid>-<instance>-<pool>/`` (root, 0711,
a private mount, so nothing below it propagates into other mount namespaces),
then one directory per sandbox, owned by the sandbox's own host uid and mode
0700, so that no other host user reaches the mounts while bwrap binds them.
Once the runner is ready, bwrap has bound them, and the daemon detaches its
own copies: the host's mount table then holds nothing of the sandbox, and each
tmpfs lives exactly as long as the sandbox's mount namespace. A daemon killed
in between leaves mounts under its directory; the next daemon's start sweeps
them (the pid in the name says whose they were).

A daemon that is not root cannot mount on the host. Its sandboxes' mounts are
made in a mount namespace of each sandbox's own (``userns.py``), onto the
pool's empty staging directories, ``$TMPDIR/sandpool-scratch-<uid>/sandpool-<daemon
pid>-<instance>-<pool>/`` (``StagedScratch``), from the pool's fstab there:
the same three tmpfs, the same flags, bound in the same way; the host never
holds them, and its directories stay empty.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from pool.errors import BackendError
from pool.mounts import detach, mount_points
from pool.procfs import pid_alive

log = structlog.get_logger("sandpool.process")

SCRATCH_ROOT = Path("/run/sandpool-scratch")
STAGING_NAME = "sandpool-scratch-{uid}"  # in $TMPDIR, for a daemon that is not root
FSTAB = "fstab"  # in a pool's staging directory
SANDBOX_UID = 65534  # who owns a non-root daemon's scratch, in the sandbox's namespace
# (host directory name, path inside the sandbox, mode inside): /tmp and
# /dev/shm are world-writable and sticky as usual; the working directory is
# the sandbox user's alone.
SCRATCH_DIRS = (("tmp", "/tmp", "1777"), ("shm", "/dev/shm", "1777"), ("work", "/sandbox", "0700"))
# Beside them, the sandbox's devpts instance, with its share of the host's PTYs
# as max (pool/quotas.py): bwrap's own --dev instance has none.
PTS_DIR, PTS_INSIDE = "pts", "/dev/pts"
PTS_OPTIONS = "newinstance,ptmxmode=0666,mode=0620,max={ptys}"

_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000
# mount(2) itself, which the standard library does not offer (pool/mounts.py unmounts).
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def _mount(source: str, target: Path, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            bytes(target),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


@dataclass(slots=True)
class SandboxScratch:
    """One sandbox's three mounts on the host, until ``detach()``."""

    directory: Path
    mounted: list[Path] = field(default_factory=list)

    def bwrap_args(self) -> list[str]:
        """``--bind`` arguments that put the mounts at their places in the sandbox."""
        args: list[str] = []
        for name, inside, _ in SCRATCH_DIRS:
            args += ["--bind", str(self.directory / name), inside]
        # --dev-bind: bwrap's --bind adds nodev, and /dev/pts/ptmx is a device.
        return [*args, "--dev-bind", str(self.directory / PTS_DIR), PTS_INSIDE]

    def detach(self) -> None:
        """Take the host's copies away; the sandbox keeps its own. Idempotent; blocking.

        Raises BackendError if a mount cannot be detached.
        """
        try:
            for path in reversed(self.mounted):
                detach(path)
                with contextlib.suppress(FileNotFoundError):
                    path.rmdir()
            self.mounted.clear()
            with contextlib.suppress(FileNotFoundError):
                self.directory.rmdir()
        except OSError as e:
            raise BackendError(f"cannot remove the sandbox's scratch mounts: {e}") from None


class ScratchMounts:
    """Makes noexec scratch mounts for one pool of a root daemon."""

    def __init__(self, dir_name: str) -> None:
        self.directory = SCRATCH_ROOT / dir_name

    def start(self) -> None:
        """Sweep what dead daemons left, then make this pool's private directory.

        Raises OSError (not root, no /run). Blocking: run in a thread.
        """
        SCRATCH_ROOT.mkdir(mode=0o711, exist_ok=True)
        sweep_stale_scratch(SCRATCH_ROOT)
        self.directory.mkdir(mode=0o711, exist_ok=True)
        # Bound onto itself and made private: mounts below it stay in the
        # daemon's mount namespace (systemd makes / shared, so they would
        # otherwise appear in every namespace that is a peer or slave of it).
        _mount(str(self.directory), self.directory, None, _MS_BIND, None)
        _mount("none", self.directory, None, _MS_PRIVATE | _MS_REC, None)

    def close(self) -> None:
        """Remove this pool's directory; the sandboxes' own mounts are gone by now. Blocking."""
        try:
            detach(self.directory)
            self.directory.rmdir()
        except OSError as e:
            log.warning("scratch_not_removed", path=str(self.directory), error=e.strerror)

    def mount(self, sandbox_id: str, uid: int, size_bytes: int, ptys: int) -> SandboxScratch:
        """Three fresh tmpfs mounts (noexec, nosuid, nodev) owned by ``uid``, and a
        devpts instance of at most ``ptys`` PTYs. Blocking.

        Raises BackendError; on failure nothing is left behind.
        """
        scratch = SandboxScratch(self.directory / sandbox_id)
        try:
            scratch.directory.mkdir(mode=0o700)
            os.chown(scratch.directory, uid, uid)
            for name, _, mode in SCRATCH_DIRS:
                target = scratch.directory / name
                target.mkdir(mode=0o700)
                options = f"size={size_bytes},mode={mode},uid={uid},gid={uid}"
                _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, options)
                scratch.mounted.append(target)
            target = scratch.directory / PTS_DIR
            target.mkdir(mode=0o700)
            _mount("devpts", target, "devpts", _MS_NOSUID | _MS_NOEXEC,
                   PTS_OPTIONS.format(ptys=ptys))
            scratch.mounted.append(target)
        except OSError as e:
            with contextlib.suppress(BackendError):
                scratch.detach()
            raise BackendError(f"cannot mount the sandbox's scratch space: {e}") from None
        return scratch


class StagedScratch:
    """A non-root daemon's noexec scratch for one pool: empty directories and an
    fstab, which each sandbox's namespace maker mounts in its own mount namespace."""

    def __init__(self, dir_name: str) -> None:
        staging = STAGING_NAME.format(uid=os.geteuid())
        self.directory = Path(tempfile.gettempdir()) / staging / dir_name

    @property
    def fstab(self) -> Path:
        return self.directory / FSTAB

    def start(self, size_bytes: int, ptys: int) -> None:
        """Sweep what dead daemons left, then make this pool's directories and fstab:
        the three tmpfs of ``size_bytes`` and a devpts instance of ``ptys`` PTYs.

        Raises OSError. Blocking: run in a thread.
        """
        root = self.directory.parent
        root.mkdir(mode=0o700, exist_ok=True)
        sweep_stale_scratch(root)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        lines = []
        for name, _, mode in SCRATCH_DIRS:
            target = self.directory / name
            target.mkdir(mode=0o700, exist_ok=True)
            if any(c.isspace() for c in str(target)):
                raise OSError(f"a scratch path with white space cannot go in an fstab: {target}")
            options = (f"noexec,nosuid,nodev,size={size_bytes},mode={mode},"
                       f"uid={SANDBOX_UID},gid={SANDBOX_UID}")
            lines.append(f"sandpool-scratch {target} tmpfs {options} 0 0\n")
        target = self.directory / PTS_DIR
        target.mkdir(mode=0o700, exist_ok=True)
        options = "nosuid,noexec," + PTS_OPTIONS.format(ptys=ptys)
        lines.append(f"sandpool-pts {target} devpts {options} 0 0\n")
        self.fstab.write_text("".join(lines))

    def bwrap_args(self) -> list[str]:
        """``--bind`` arguments: in the sandbox's mount namespace the directories
        hold its mounts."""
        return SandboxScratch(self.directory).bwrap_args()

    def close(self) -> None:
        """Remove this pool's directories (empty on the host). Blocking."""
        try:
            self.fstab.unlink(missing_ok=True)
            for name in [*(name for name, _, _ in SCRATCH_DIRS), PTS_DIR]:
                (self.directory / name).rmdir()
            self.directory.rmdir()
        except OSError as e:
            log.warning("scratch_not_removed", path=str(self.directory), error=e.strerror)
        with contextlib.suppress(OSError):  # another pool's or daemon's may still be there
            self.directory.parent.rmdir()


def sweep_stale_scratch(root: Path) -> None:
    """Detach and remove the scratch directories of daemons that are gone.

    A directory is ``sandpool-<pid>-...`` (the process tier's cgroup name);
    one whose daemon still runs is left alone.
    """
    mounts = mount_points()
    for stale in root.iterdir():
        pid = stale.name.removeprefix("sandpool-").partition("-")[0]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        prefix = f"{stale}/"
        # Deepest first: the sandboxes' mounts, then the pool directory's own.
        for point in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
            with contextlib.suppress(OSError):
                detach(point)
        with contextlib.suppress(OSError):
            detach(stale)
        with contextlib.suppress(OSError):
            (stale / FSTAB).unlink()  # a non-root daemon's StagedScratch
        for directory in sorted(stale.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                directory.rmdir()  # empty once detached: never deletes a file
        log.info("stale_scratch_removed", path=str(stale))
