"""The fork tier's isolation steps: what a sandbox's first process does to itself.

Guest code, spliced into the runner (``pool/guest.py``): standard library only,
no ``from __future__`` import, every call through libc where Python has none.

Each sandbox of the fork tier begins as a fork of the pool's template, which
runs as uid 0 of a user namespace of its own (bwrap's), holding capabilities
there and nowhere else. The template forks it straight into a PID namespace
of its own (``fork_into_new_pid_namespace``): the sandbox's PID 1, still
holding the template's capabilities, joins its cgroups, unshares the mount,
IPC, UTS, network and cgroup namespaces, makes its mounts (``mount_scratch``)
and then gives up everything (``drop_privileges``, ``install_seccomp``) before
it reads a request. Each step raises OSError naming the step; the runner turns
that into a sandbox that never reports ready.
"""

import ctypes
import fcntl
import os
import socket
import struct

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# What the sandbox's PID 1 unshares for itself: every namespace but its PID
# namespace (it was born in it) and the user namespace, which is the
# template's: its uid map holds each sandbox's own host uid, and the sandbox
# keeps no capability in it.
SANDBOX_NAMESPACES = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET

MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_REC, MS_PRIVATE = 0x4000, 0x40000
MNT_DETACH = 2
SCRATCH_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC

PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 4, 22, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SECCOMP_MODE_FILTER = 2
SOCK_FILTER_BYTES = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
IFREQ = struct.Struct("16sH22x")  # struct ifreq: the name, then ifr_flags

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def fork_into_new_pid_namespace(own_pid_namespace: int) -> int:
    """``os.fork()`` with the child as PID 1 of a PID namespace of its own.

    unshare(CLONE_NEWPID) moves only the children to come, and only once: the
    parent makes a fresh namespace for this one fork and goes back to its own
    (``own_pid_namespace``, an fd of /proc/self/ns/pid) at once, so nothing
    else is ever forked into it. One fork, where a middle process would cost
    a second copy of the template's page tables.
    """
    unshare(CLONE_NEWPID)
    try:
        pid = os.fork()
    except OSError:
        _setns(own_pid_namespace, CLONE_NEWPID)
        raise
    if pid:
        _setns(own_pid_namespace, CLONE_NEWPID)
    return pid


def _setns(fd: int, kind: int) -> None:
    _check(_libc.setns(fd, kind), "setns")  # os.setns is Python 3.12's


def join_cgroups(procs_files: "list[str]") -> None:
    """Move this process into each cgroup: its children are then born there."""
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"0")  # 0: the writing process itself
        finally:
            os.close(fd)


def mount_scratch(size: int, uid: int, workdir: str, hidden: "list[str]", ptys: int) -> None:
    """This sandbox's own mounts, in its own mount namespace; PID 1 of its PID namespace.

    Nothing propagates back to the template; /proc shows this namespace only;
    /tmp, /dev/shm and ``workdir`` are fresh tmpfs of ``size`` bytes, noexec,
    nosuid and nodev (the working directory ``uid``'s); /dev/pts is a devpts
    instance of its own, of at most ``ptys`` PTYs (pool/quotas.py); ``hidden``
    (the template's cgroup directories, on its /tmp) are unmounted first.
    """
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    for path in hidden:
        _check(_libc.umount2(path.encode(), MNT_DETACH), f"umount {path}")
    _check(_libc.mount(b"proc", b"/proc", b"proc", SCRATCH_FLAGS, None), "mount /proc")
    scratch = (("/tmp", "1777", 0), ("/dev/shm", "1777", 0), (workdir, "0700", uid))
    for target, mode, owner in scratch:
        options = f"size={size},mode={mode},uid={owner},gid={owner}".encode()
        _check(_libc.mount(b"tmpfs", target.encode(), b"tmpfs", SCRATCH_FLAGS, options),
               f"mount {target}")
    _check(_libc.mount(b"devpts", b"/dev/pts", b"devpts", MS_NOSUID | MS_NOEXEC,
                       f"newinstance,ptmxmode=0666,mode=0620,max={ptys}".encode()),
           "mount /dev/pts")


def set_user_quotas(quotas: "dict[str, int]") -> None:
    """This user namespace's per-uid quotas (``/proc/sys/user``), from the fresh /proc."""
    for name, limit in quotas.items():
        with open(f"/proc/sys/user/{name}", "w") as f:
            f.write(str(limit))


def set_hostname(name: str) -> None:
    socket.sethostname(name)


def loopback_up() -> None:
    """Bring up ``lo`` in the new network namespace, as bwrap does: it has nothing else."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = IFREQ.pack(b"lo", 0)
        _, flags = IFREQ.unpack(fcntl.ioctl(probe.fileno(), SIOCGIFFLAGS, request))
        fcntl.ioctl(probe.fileno(), SIOCSIFFLAGS, IFREQ.pack(b"lo", flags | IFF_UP))


def drop_privileges(uid: int) -> None:
    """Become ``uid`` (and gid ``uid``) with no capability left, for good.

    The bounding and ambient sets are emptied first, while CAP_SETPCAP is still
    there; changing every uid away from 0 then clears the permitted and
    effective sets, and capset the inheritable one; no_new_privs keeps any
    exec from granting one back.
    Raises OSError if a capability is left.
    """
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    # The uid change cleared the permitted and effective sets, not the inheritable one.
    no_capabilities = (_CapData * 2)()
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(header), no_capabilities), "clear capabilities")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # The uid change made the process undumpable (its /proc files root's), which
    # the code, forked from it, would inherit: a process-tier sandbox's code
    # reads its own /proc/self/environ. The runner makes itself undumpable again.
    _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb") and int(value, 16):
                raise OSError(f"{key} is {value.strip()} after dropping privileges")


def install_seccomp(program: bytes) -> None:
    """Install the pool's filter (pool/seccomp.py's, as bwrap takes it): the last step."""
    if not program or len(program) % SOCK_FILTER_BYTES:
        raise OSError("the seccomp program is empty or cut short")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // SOCK_FILTER_BYTES, ctypes.addressof(buffer))
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0),
        "install the seccomp filter",
    )
