"""The process backend's seccomp filter: syscalls a sandbox never needs fail with EPERM.

Built once per pool with PyPI ``pyseccomp`` (ctypes over the host's libseccomp2,
the library Debian's systemd and apt already pull in) and exported as a compiled
BPF program, which ``bwrap --seccomp FD`` installs just before it executes the
runner. Everything else is allowed: the filter narrows the kernel's attack
surface (keyrings, BPF, perf, io_uring, namespaces, mounts) for code that
already runs without capabilities; it is not what confines the code.
"""

from __future__ import annotations

import errno
import functools
import tempfile
from typing import Any

from pool.errors import BackendError

# Calls that need a capability the sandbox lacks, or reach kernel code no
# program needs: blocking them turns a kernel bug there into EPERM.
BLOCKED_SYSCALLS = (
    # debugging and reading other processes' memory
    "ptrace", "process_vm_readv", "process_vm_writev",
    # filesystems and namespaces: the sandbox's view is fixed by bubblewrap
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init",
    # kernel keyrings, BPF, perf, userfaultfd, io_uring: frequent sources of exploits
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    # the machine itself
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "quotactl_fd", "syslog",
)  # fmt: skip

# clone() may not create namespaces either; its flags are its first argument on
# x86_64 and arm64 (not on s390x, where the filter would miss them).
NAMESPACE_FLAGS = (
    0x00000080,  # CLONE_NEWTIME
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)


@functools.cache
def build_filter() -> bytes:
    """Compile the filter to BPF for the host's architecture.

    Raises BackendError if libseccomp2 cannot be loaded. Costs a few
    milliseconds (ctypes finds the library through ``ldconfig -p``) the first
    time, then nothing: run it in a thread.
    """
    try:
        # Imported here so the other backends never need libseccomp.
        import pyseccomp  # type: ignore[import-untyped]
    except (ImportError, RuntimeError, OSError) as e:
        raise BackendError(
            f"the process backend needs libseccomp ({e}): "
            "install it with `apt-get install libseccomp2` and `pip install pyseccomp`",
            code="seccomp_unavailable",
        ) from None
    seccomp: Any = pyseccomp
    denied = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in BLOCKED_SYSCALLS:
        number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
        if number >= 0:  # older kernels and libseccomps do not know the newest calls
            rules.add_rule(denied, number)
    for flag in NAMESPACE_FLAGS:
        rules.add_rule(denied, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory a filter cannot read: answer ENOSYS so
    # glibc falls back to clone(), which the rules above can inspect (as
    # Flatpak and Docker do).
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as program:
        rules.export_bpf(program)
        program.seek(0)
        return program.read()
