"""One seccomp policy for every tier that runs native code, as an allowlist.

The policy is data (``POLICY``) rendered two ways: ``build_filter()`` compiles
it to a BPF program for ``bwrap --seccomp`` (PyPI ``pyseccomp``, ctypes over
the host's libseccomp2), and ``docker_profile()`` writes it as a Docker seccomp
profile that the Docker backend passes inline in ``SecurityOpt``. Both tiers
therefore answer every call the same way; tests/security/test_seccomp_policy.py
runs one probe in both and compares.

Answers, chosen so that a denied call looks like a kernel without the feature
(docs/security.md has the reasoning):

- a syscall not on the list fails with ENOSYS, so libc and Python fall back as
  they do on an older kernel (``clone3`` -> ``clone``, ``faccessat2`` ->
  ``faccessat``). Written as one explicit rule naming every syscall the host's
  libseccomp knows outside the list (the complement of the allowlist, never a
  list of its own), because Docker 20.10 ignores a profile's
  ``defaultErrnoRet``. Syscalls newer than libseccomp get ENOSYS too: runc
  adds that itself, the BPF program by number;
- ``socket()`` of a family outside AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK
  (NETLINK_ROUTE only) fails with EAFNOSUPPORT, the kernel's answer for a
  family it was built without;
- ``clone()`` with a namespace flag fails with EPERM, as it does without
  CAP_SYS_ADMIN;
- anything else (``personality()`` with a value outside the list, a number
  that is no syscall) meets the default action, EPERM: Docker's, which a
  profile cannot change on Docker 20.10.

"""

from __future__ import annotations

import errno
import functools
import json
import platform
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pool.errors import BackendError

# --- the policy ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """A comparison of one syscall argument (all of a rule's conditions must hold).

    For ``masked_eq`` the argument, masked by ``value``, must equal ``expected``;
    the other operators compare the argument with ``value``.
    """

    index: int
    op: Literal["eq", "ne", "ge", "masked_eq"]
    value: int
    expected: int = 0


@dataclass(frozen=True, slots=True)
class Rule:
    """What the listed syscalls answer when every condition holds: allow, or an errno."""

    names: tuple[str, ...]
    errno: int | None = None  # None: allowed
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    unlisted_errno: int  # a syscall no rule names
    default_errno: int  # a call no rule matches: an argument outside every rule's, a non-syscall

    def named(self) -> frozenset[str]:
        """Every syscall some rule names: allowed outright or by its arguments."""
        return frozenset(n for r in self.rules for n in r.names)

    def unlisted(self, known: Iterable[str]) -> list[str]:
        """The syscalls of ``known`` that no rule names, sorted: the complement of the list."""
        return sorted(set(known) - self.named())


# What CPython, its standard library, the runner, glibc, /bin/sh and coreutils
# call, by purpose: Docker's default list (moby profiles/seccomp/default.json)
# without what a capability-less, single-use sandbox never needs. Names a
# kernel or libseccomp does not know (the aarch64 table lacks open, stat, ...)
# are skipped when rendering.
ALLOWED_SYSCALLS = (
    # processes and threads (clone is below: it has an argument filter)
    "fork", "vfork", "execve", "execveat", "exit", "exit_group", "wait4", "waitid",
    "set_tid_address", "set_robust_list", "get_robust_list", "rseq", "arch_prctl",
    "prctl", "seccomp", "capget", "capset", "getpid", "getppid", "gettid", "getpgid",
    "getpgrp", "getsid", "setpgid", "setsid", "kill", "tkill", "tgkill",
    "pidfd_open", "pidfd_send_signal", "restart_syscall",
    # identity (no capabilities: the kernel refuses any real change)
    "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups",
    "setfsuid", "setfsgid",
    # signals and timers
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend",
    "rt_sigtimedwait", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "sigaltstack",
    "signalfd", "signalfd4", "alarm", "pause", "getitimer", "setitimer",
    "timer_create", "timer_delete", "timer_getoverrun", "timer_gettime", "timer_settime",
    "timerfd_create", "timerfd_gettime", "timerfd_settime",
    "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "time",
    "times",
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mincore", "msync",
    "mlock", "mlock2", "mlockall", "munlock", "munlockall", "membarrier",
    "pkey_alloc", "pkey_free", "pkey_mprotect", "memfd_create", "map_shadow_stack", "mseal",
    # files and directories
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "open", "openat", "openat2", "creat", "close", "close_range",
    "lseek", "dup", "dup2", "dup3", "fcntl", "flock", "ioctl", "pipe", "pipe2",
    "stat", "fstat", "lstat", "newfstatat", "statx", "statfs", "fstatfs",
    "access", "faccessat", "faccessat2", "getdents", "getdents64", "getcwd", "chdir", "fchdir",
    "mkdir", "mkdirat", "rmdir", "mknod", "mknodat", "link", "linkat", "symlink", "symlinkat",
    "unlink", "unlinkat", "rename", "renameat", "renameat2", "readlink", "readlinkat",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "fchownat", "lchown",
    "umask", "truncate", "ftruncate", "fallocate", "fadvise64", "readahead",
    "fsync", "fdatasync", "sync", "syncfs", "sync_file_range",
    "utime", "utimes", "utimensat", "futimesat",
    "getxattr", "lgetxattr", "fgetxattr", "setxattr", "lsetxattr", "fsetxattr",
    "listxattr", "llistxattr", "flistxattr", "removexattr", "lremovexattr", "fremovexattr",
    "sendfile", "splice", "tee", "vmsplice", "copy_file_range", "cachestat",
    # waiting for events
    "select", "pselect6", "poll", "ppoll", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2",
    "inotify_init", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
    "futex", "futex_waitv", "futex_wake", "futex_wait", "futex_requeue",
    "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents",
    # sockets (socket itself is below: it has an argument filter)
    "socketpair", "bind", "listen", "accept", "accept4", "connect", "getsockname",
    "getpeername", "getsockopt", "setsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg",
    "sendmmsg", "recvmmsg", "shutdown",
    # System V and POSIX IPC, private to the sandbox's IPC namespace
    "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl",
    "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
    "mq_timedreceive", "mq_notify", "mq_getsetattr",
    # scheduling, resources and the system's description
    "sched_yield", "sched_getaffinity", "sched_setaffinity", "sched_getparam",
    "sched_setparam", "sched_getscheduler", "sched_setscheduler", "sched_getattr",
    "sched_setattr", "sched_get_priority_max", "sched_get_priority_min",
    "sched_rr_get_interval", "getpriority", "setpriority", "ioprio_get", "ioprio_set",
    "getrlimit", "setrlimit", "prlimit64", "getrusage", "getrandom", "getcpu", "uname",
    "sysinfo",
)  # fmt: skip

# Left out on purpose, each reachable without a capability in Docker's default
# or the kernel's: io_uring_* (a frequent source of kernel exploits; libraries
# fall back on ENOSYS), memfd_secret, modify_ldt, userfaultfd, bpf,
# perf_event_open, keyctl/add_key/request_key, ptrace, process_vm_readv/writev,
# process_madvise, kcmp, pidfd_getfd, unshare, setns, clone3, the mount family
# (mount, umount2, pivot_root, chroot, fsopen, fsmount, open_tree, move_mount,
# mount_setattr, ...), name_to_handle_at, open_by_handle_at, fanotify_*,
# landlock_*, lookup_dcookie, remap_file_pages, adjtimex/clock_adjtime, kexec_*,
# init_module/finit_module/delete_module, reboot, swapon/swapoff, acct,
# quotactl, syslog, sethostname/setdomainname, vhangup, iopl/ioperm, and every
# syscall added to the kernel after this list was written.

# Socket families code in a sandbox needs: Unix sockets, TCP/UDP over the
# sandbox's own loopback, and rtnetlink, which glibc's getaddrinfo() and
# if_nameindex() use. Everything else (AF_VSOCK, AF_PACKET, AF_KEY, AF_ALG,
# AF_BLUETOOTH, ...) answers EAFNOSUPPORT.
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
NETLINK_ROUTE = 0
SOCKET_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)

# clone() flags that create namespaces; its flags are its first argument on
# x86_64 and arm64 (not on s390x, which this policy does not support).
# CLONE_NEWTIME is absent: clone() reads that bit as part of the exit signal,
# and only clone3() and unshare(), both denied, honour it.
NAMESPACE_FLAGS = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)
NAMESPACE_MASK = functools.reduce(int.__or__, NAMESPACE_FLAGS)

# personality() values Docker allows: PER_LINUX, PER_LINUX32, UNAME26 with
# either, and the query. Anything else (ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC)
# would weaken the next exec.
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)


def _socket_rules() -> tuple[Rule, ...]:
    allowed = [Rule(("socket",), None, (Condition(0, "eq", f),)) for f in SOCKET_FAMILIES]
    allowed.append(
        Rule(("socket",), None, (Condition(0, "eq", AF_NETLINK), Condition(2, "eq", NETLINK_ROUTE)))
    )
    refused = errno.EAFNOSUPPORT
    denied = [
        Rule(("socket",), refused, (Condition(0, "eq", family),))
        for family in range(AF_NETLINK)
        if family not in SOCKET_FAMILIES
    ]
    denied.append(Rule(("socket",), refused, (Condition(0, "ge", AF_NETLINK + 1),)))
    denied.append(
        Rule(
            ("socket",),
            errno.EPROTONOSUPPORT,
            (Condition(0, "eq", AF_NETLINK), Condition(2, "ne", NETLINK_ROUTE)),
        )
    )
    return (*allowed, *denied)


POLICY = Policy(
    unlisted_errno=errno.ENOSYS,
    default_errno=errno.EPERM,
    rules=(
        Rule(ALLOWED_SYSCALLS),
        # With a namespace flag, clone() matches no rule: the default, EPERM.
        Rule(("clone",), None, (Condition(0, "masked_eq", NAMESPACE_MASK, 0),)),
        *(Rule(("personality",), None, (Condition(0, "eq", p),)) for p in PERSONALITIES),
        *_socket_rules(),
    ),
)


# --- rendering -------------------------------------------------------------

# Syscall numbers after the last one libseccomp knows that the BPF program
# answers ENOSYS, as runc's own stub does for every number after a profile's
# last: since Linux 5.1 new syscalls take the same number on every
# architecture, one after the other (6.18 ended at 470).
NEWER_SYSCALLS = 128
_SYSCALL_NUMBERS = range(1024)  # where libseccomp's tables are searched


@functools.cache
def known_syscalls() -> dict[str, int]:
    """Name -> number of every native syscall the host's libseccomp knows.

    Raises BackendError ``seccomp_unavailable`` without libseccomp2. Costs
    ~10 ms once (a thousand table look-ups): run it in a thread.
    """
    seccomp = _pyseccomp()
    known: dict[str, int] = {}
    for number in _SYSCALL_NUMBERS:
        try:
            known[seccomp.resolve_syscall(seccomp.Arch.NATIVE, number).decode()] = number
        except ValueError:  # a gap in the table
            continue
    return known


@functools.cache
def build_filter() -> bytes:
    """Compile ``POLICY`` to a BPF program for the host's architecture.

    Raises BackendError ``seccomp_unavailable`` if libseccomp2 cannot be
    loaded. Costs ~20 ms the first time, then nothing: run it in a thread.
    """
    seccomp = _pyseccomp()
    known = known_syscalls()
    operators = {
        "eq": seccomp.EQ, "ne": seccomp.NE, "ge": seccomp.GE, "masked_eq": seccomp.MASKED_EQ,
    }  # fmt: skip
    rules = seccomp.SyscallFilter(seccomp.ERRNO(POLICY.default_errno))
    # A binary tree of syscall numbers instead of a linear chain: some 500
    # rules would otherwise cost every syscall hundreds of comparisons.
    rules.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)
    for rule in POLICY.rules:
        action = seccomp.ALLOW if rule.errno is None else seccomp.ERRNO(rule.errno)
        args = [
            seccomp.Arg(c.index, operators[c.op], c.value, c.expected)
            if c.op == "masked_eq"
            else seccomp.Arg(c.index, operators[c.op], c.value)
            for c in rule.conditions
        ]
        for name in rule.names:
            if name in known:  # not on this architecture, or newer than libseccomp
                rules.add_rule(action, known[name], *args)
    unlisted = seccomp.ERRNO(POLICY.unlisted_errno)
    for name in POLICY.unlisted(known):
        rules.add_rule(unlisted, known[name])
    newest = max(known.values())
    for number in range(newest + 1, newest + 1 + NEWER_SYSCALLS):
        rules.add_rule(unlisted, number)
    with tempfile.TemporaryFile() as program:
        rules.export_bpf(program)
        program.seek(0)
        return program.read()


def _pyseccomp() -> Any:
    try:
        # Imported here so that importing this module never needs libseccomp.
        import pyseccomp  # type: ignore[import-untyped]
    except (ImportError, RuntimeError, OSError) as e:
        raise BackendError(
            f"sandpool's seccomp policy needs libseccomp ({e}): "
            "install it with `apt-get install libseccomp2` and `pip install pyseccomp`",
            code="seccomp_unavailable",
        ) from None
    return pyseccomp


_DOCKER_ARCHITECTURES = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}
_DOCKER_OPERATORS = {
    "eq": "SCMP_CMP_EQ", "ne": "SCMP_CMP_NE", "ge": "SCMP_CMP_GE",
    "masked_eq": "SCMP_CMP_MASKED_EQ",
}  # fmt: skip


@functools.cache
def docker_profile() -> str:
    """``POLICY`` as a Docker seccomp profile for this host: ``render_docker_profile``.

    Raises BackendError ``seccomp_unavailable`` without libseccomp2. Costs
    ~10 ms the first time (``known_syscalls``), then nothing: call it first
    in a thread.
    """
    return render_docker_profile(known_syscalls(), platform.machine())


def render_docker_profile(known: Iterable[str], machine: str) -> str:
    """``POLICY`` as a Docker seccomp profile (compact JSON), for ``SecurityOpt``.

    ``known`` is the syscall names to answer ENOSYS unless the policy names
    them (``known_syscalls()``); ``machine`` is ``platform.machine()``. The
    native architecture alone is listed, without Docker's 32-bit
    sub-architectures, so runc filters the native ABI only, as the BPF
    program does; runc adds its ENOSYS stub for syscalls newer than the
    profile only for listed architectures (measured: without the list, 457
    answered EPERM). runc skips names its libseccomp does not know. Pure.
    """
    syscalls: list[dict[str, Any]] = []
    for rule in POLICY.rules:
        entry: dict[str, Any] = {"names": list(rule.names)}
        if rule.errno is None:
            entry["action"] = "SCMP_ACT_ALLOW"
        else:
            entry["action"] = "SCMP_ACT_ERRNO"
            entry["errnoRet"] = rule.errno
        if rule.conditions:
            # runc ANDs the conditions of one entry when each names a different
            # argument, which holds for every rule here (checked by the tests).
            entry["args"] = [
                {"index": c.index, "value": c.value, "valueTwo": c.expected,
                 "op": _DOCKER_OPERATORS[c.op]}
                for c in rule.conditions
            ]  # fmt: skip
        syscalls.append(entry)
    syscalls.append(
        {"names": POLICY.unlisted(known), "action": "SCMP_ACT_ERRNO",
         "errnoRet": POLICY.unlisted_errno}
    )  # fmt: skip
    profile: dict[str, Any] = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": POLICY.default_errno,  # what Docker 20.10 does without it
        "syscalls": syscalls,
    }
    if machine in _DOCKER_ARCHITECTURES:
        profile["architectures"] = [_DOCKER_ARCHITECTURES[machine]]
    return json.dumps(profile, separators=(",", ":"))
