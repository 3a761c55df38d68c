"""The wasm tier's scratch space: a size-limited tmpfs per directory, in every mode.

A guest's ``/sandbox``, ``/tmp`` and status directory are each a tmpfs made
with the kernel's new mount API (fsopen/fsconfig/fsmount) and attached
nowhere: nothing in the mount table, nothing on the host's disk, nothing to
unmount. The filesystem lives exactly as long as some fd into it, so a dead
daemon (SIGKILL included) leaves nothing behind and there is nothing for a
later daemon to sweep.

Who may mount:

- a daemon with CAP_SYS_ADMIN (root) mounts itself;
- anyone else asks a small helper process (this module run with ``-m``) that
  sits in an unprivileged user and mount namespace of its own, where tmpfs may
  be mounted, and hands each detached mount back as an fd over SCM_RIGHTS.
  The fd works in the daemon's namespaces as any directory fd does, and the
  files the daemon creates through it belong to the daemon's uid (the
  helper's root is mapped to it). The helper dies with the daemon
  (PR_SET_PDEATHSIG, and EOF on its socket);
- where neither works (user namespaces disabled), the wasm tier refuses to
  start with ``wasm_scratch_unbounded``: it never writes a guest's files to
  an unbounded host directory.

This module must stay importable without wasmtime: the helper imports it.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import os
import socket
import stat
import sys
import threading
from collections.abc import Sequence

from pool.errors import BackendError
from pool.wire import OUT_DIR, OUTCOME_FILE, STATUS_FILE

_libc = ctypes.CDLL(None, use_errno=True)
# The new mount API (Linux 5.2+), the same numbers on every architecture.
_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 430, 431, 432
_FSOPEN_CLOEXEC = _FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6
_MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV, _MOUNT_ATTR_NOEXEC = 0x2, 0x4, 0x8
_CLONE_NEWUSER, _CLONE_NEWNS = 0x10000000, 0x00020000
_PR_SET_PDEATHSIG = 1

STATUS_LIMIT_KB = 64  # the status tmpfs holds one small file
SCRATCH_INODES = 4096  # files and directories per tmpfs: each costs kernel memory
HELPER_TIMEOUT_S = 10.0  # the helper answers in ~0.1 ms; this bounds a bug, not a load
_MAX_MOUNTS_PER_REQUEST = 8
_REPLY_OK = b"ok"


def _syscall(number: int, *args: object) -> int:
    result = int(_libc.syscall(number, *args))
    if result < 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    return result


def mount_tmpfs(size: str, inodes: int) -> int:
    """A fresh tmpfs of ``size`` attached nowhere; returns an O_PATH fd to its root.

    Needs CAP_SYS_ADMIN over the caller's mount namespace; raises OSError
    (EPERM, ENOSYS) where it is not allowed. The filesystem is freed when the
    last fd into it closes.
    """
    context = _syscall(_SYS_FSOPEN, b"tmpfs", _FSOPEN_CLOEXEC)
    try:
        for key, value in ((b"size", size), (b"nr_inodes", str(inodes)), (b"mode", "0700")):
            _syscall(_SYS_FSCONFIG, context, _FSCONFIG_SET_STRING, key, value.encode(), 0)
        _syscall(_SYS_FSCONFIG, context, _FSCONFIG_CMD_CREATE, None, None, 0)
        attributes = _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV | _MOUNT_ATTR_NOEXEC
        return _syscall(_SYS_FSMOUNT, context, _FSMOUNT_CLOEXEC, attributes)
    finally:
        os.close(context)


class TmpfsSource:
    """Makes detached tmpfs mounts: by itself (root) or through the namespace helper.

    ``mount`` is thread-safe and blocking (worker threads call it).
    """

    def __init__(self) -> None:
        self.mode = "unstarted"  # "direct" or "helper" once started
        self._helper: asyncio.subprocess.Process | None = None
        self._channel: socket.socket | None = None
        self._lock = threading.Lock()

    async def start(self) -> None:
        """Find a way to mount; raises BackendError ``wasm_scratch_unbounded`` if none works."""
        direct_error = await asyncio.to_thread(_try_direct)
        if direct_error is None:
            self.mode = "direct"
            return
        try:
            await self._start_helper()
            # One real mount proves the helper can: user namespaces may be off.
            for fd in await asyncio.to_thread(self.mount, [(f"{STATUS_LIMIT_KB}k", 16)]):
                os.close(fd)
        except OSError as e:
            await self.close()
            raise BackendError(
                "the wasm tier cannot bound its scratch space: mounting a tmpfs failed "
                f"({direct_error}), and so did an unprivileged user namespace ({e}). "
                "Run the daemon as root, or allow unprivileged user namespaces "
                "(user.max_user_namespaces > 0; systemd: RestrictNamespaces= must allow "
                "user and mnt)",
                code="wasm_scratch_unbounded",
            ) from None
        self.mode = "helper"

    async def _start_helper(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Started from the event loop's thread: PR_SET_PDEATHSIG fires when
            # the thread that forked the helper ends, and this one lives as long
            # as the daemon.
            self._helper = await asyncio.create_subprocess_exec(
                *helper_command(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(HELPER_TIMEOUT_S)
        self._channel = ours

    def mount(self, specs: Sequence[tuple[str, int]]) -> list[int]:
        """One detached tmpfs per ``(size, inodes)``; returns O_PATH fds to their roots.

        Raises OSError (the kernel's refusal, or the helper gone). Blocking.
        """
        if self.mode == "direct":
            fds: list[int] = []
            try:
                for size, inodes in specs:
                    fds.append(mount_tmpfs(size, inodes))
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            return fds
        request = ";".join(f"{size},{inodes}" for size, inodes in specs).encode()
        with self._lock:
            channel = self._channel
            if channel is None:
                raise OSError(0, "the tmpfs helper is not running")
            try:
                channel.send(request)
                message, ancillary, _, _ = channel.recvmsg(
                    256, socket.CMSG_SPACE(_MAX_MOUNTS_PER_REQUEST * 4), socket.MSG_CMSG_CLOEXEC
                )
            except OSError:
                # A reply may still be on its way (a timeout): the next request
                # would read it as its own, so the channel is not used again.
                self._channel = None
                channel.close()
                raise
        fds = []
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
        if message != _REPLY_OK or len(fds) != len(specs):
            for fd in fds:
                os.close(fd)
            if not message:
                raise OSError(0, "the tmpfs helper exited")
            raise OSError(0, f"the tmpfs helper refused: {message.decode(errors='replace')}")
        return fds

    async def close(self) -> None:
        """Stop the helper (mounts already handed out stay valid until their fds close)."""
        if self._channel is not None:
            self._channel.close()  # EOF: the helper exits
            self._channel = None
        helper, self._helper = self._helper, None
        if helper is not None:
            try:
                async with asyncio.timeout(HELPER_TIMEOUT_S):
                    await helper.wait()
            except TimeoutError:
                helper.kill()
                await helper.wait()


def helper_command(channel_fd: int) -> list[str]:
    """How the helper is started: this module, by this interpreter, isolated from the env."""
    return [sys.executable, "-I", "-m", __name__, str(channel_fd), str(os.getpid())]


def _try_direct() -> str | None:
    try:
        os.close(mount_tmpfs(f"{STATUS_LIMIT_KB}k", 16))
    except OSError as e:
        return e.strerror or str(e)
    return None


class Scratch:
    """A sandbox's writable directories: ``sandbox`` (its workdir), ``tmp``, ``status``.

    Each is a tmpfs of its own (``tmpfs_mb``; the status one ``status_kb``,
    room for the status and outcome files), so a full one says ENOSPC as
    Docker's tmpfs does and nothing reaches the host's disk.
    """

    NAMES = ("sandbox", "tmp", "status")

    def __init__(
        self, source: TmpfsSource, tmpfs_mb: int, status_kb: int = STATUS_LIMIT_KB
    ) -> None:
        self.paths: dict[str, str] = {}  # name -> the path wasmtime opens
        self._fds: list[int] = []
        self._status_dir = -1
        try:
            size = {"sandbox": f"{tmpfs_mb}m", "tmp": f"{tmpfs_mb}m"}
            self._fds = source.mount([
                (size.get(name, f"{status_kb}k"), SCRATCH_INODES) for name in self.NAMES
            ])
            for name, fd in zip(self.NAMES, self._fds, strict=True):
                self.paths[name] = f"/proc/self/fd/{fd}"
            self._status_dir = os.open(
                self.paths["status"], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
            )
        except BaseException:
            self.close()
            raise

    def read_status(self) -> bytes:
        """The runner's status file, at most 16 bytes. Raises OSError (FileNotFoundError
        when there is none)."""
        return self._read_regular(STATUS_FILE, 16)

    def out_size(self) -> int:
        """Bytes of the regular files directly in the guest's out/: a hint for the
        caller's choice of thread, not a bound (subdirectories are not counted)."""
        try:
            with os.scandir(f"{self.paths['sandbox']}/{OUT_DIR}") as listing:
                return sum(entry.stat(follow_symlinks=False).st_size for entry in listing)
        except OSError:
            return 0

    def outcome_size(self) -> int:
        """The outcome file's size as its directory says (0 if there is none); a hint only."""
        try:
            return os.stat(OUTCOME_FILE, dir_fd=self._status_dir, follow_symlinks=False).st_size
        except OSError:
            return 0

    def read_outcome(self, limit: int) -> bytes:
        """The runner's outcome file, at most ``limit`` bytes, b"" if there is none.
        Raises OSError for anything but a regular file."""
        try:
            return self._read_regular(OUTCOME_FILE, limit)
        except FileNotFoundError:
            return b""

    def _read_regular(self, name: str, limit: int) -> bytes:
        """At most ``limit`` bytes of ``name`` in the status directory, which the guest
        writes too: never through a link it made, never from anything but a file."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=self._status_dir)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file")
            parts: list[bytes] = []
            while limit > 0 and (chunk := os.read(fd, min(limit, 1 << 20))):
                parts.append(chunk)
                limit -= len(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Drop the daemon's fds; the kernel frees each tmpfs once wasmtime's are closed too."""
        for fd in (*self._fds, self._status_dir):
            if fd >= 0:
                os.close(fd)
        self._fds = []
        self._status_dir = -1


# --- the helper process ---------------------------------------------------------


def _enter_namespaces() -> None:
    """Become root of a new user namespace (mapped to our own uid) with its own mounts."""
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))
    for path, line in (
        ("/proc/self/setgroups", "deny"),
        ("/proc/self/uid_map", f"0 {uid} 1"),
        ("/proc/self/gid_map", f"0 {gid} 1"),
    ):
        with open(path, "w") as f:
            f.write(line)


def _serve_mounts(channel: socket.socket) -> None:
    while True:
        request = channel.recv(4096)
        if not request:
            return  # the daemon closed its end, or died
        fds: list[int] = []
        try:
            specs = [part.split(",") for part in request.decode().split(";")]
            if not 0 < len(specs) <= _MAX_MOUNTS_PER_REQUEST:
                raise ValueError("bad number of mounts")
            for size, inodes in specs:
                fds.append(mount_tmpfs(size, int(inodes)))
            channel.sendmsg(
                [_REPLY_OK], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
        except (OSError, ValueError) as e:
            channel.send(f"{type(e).__name__}: {e}".encode()[:200] or b"error")
        finally:
            for fd in fds:
                os.close(fd)


def _helper_main(argv: Sequence[str]) -> int:
    channel_fd, parent_pid = int(argv[0]), int(argv[1])
    _libc.prctl(_PR_SET_PDEATHSIG, 9)  # SIGKILL when the daemon's thread ends
    if os.getppid() != parent_pid:
        return 1  # the daemon died before the line above
    channel = socket.socket(fileno=channel_fd)
    try:
        _enter_namespaces()
    except OSError as e:
        channel.send(f"cannot enter a user namespace: {e}".encode()[:200])
        return 1
    _serve_mounts(channel)
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))
