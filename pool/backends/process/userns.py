"""A non-root daemon's sandbox: its user namespace, made with its quotas before bwrap.

A daemon that is not root cannot give a sandbox a host uid of its own: every
process sandbox is the daemon's uid outside, and the kernel counts inotify
instances and watches against the maker of each user namespace, up to the
host. So each sandbox gets its share (``pool/quotas.py``), set as its user
namespace's ``/proc/sys/user`` limits, which the kernel checks at every level.
Only a process inside the namespace with its capabilities can write them;
bwrap writes none but ``max_user_namespaces``, and the sandbox's own
``/proc/sys`` is read-only. So the daemon makes the namespace and hands it to
bwrap (``--userns``):

- util-linux ``unshare`` makes it, mapping the daemon's uid to 65534 (the uid
  the code sees, as with ``bwrap --unshare-user``), and keeps the namespace's
  capabilities for the shell it starts there (``--keep-caps``);
- that shell writes the sandbox's shares and ``max_user_namespaces`` = 0, so
  the code can make no user namespace (what ``--disable-userns`` is for; the
  seccomp filter refuses ``unshare`` anyway), says it is ready, and waits;
- the daemon opens the namespace by the shell's pid and lets the shell go.
  bwrap enters it, and its ``--cap-drop ALL`` leaves the code no capability
  in it, the bounding set included.

Two short execs and no privilege: the maker alone took 3-5 ms of host CPU
here, a sandbox's start ~11 ms more in all (docs/process-tier.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess

from pool.errors import BackendError
from pool.wire import USER_QUOTAS

SANDBOX_UID = 65534  # the namespace's only uid and gid (definition.SANDBOX_UID)
MAKE_TIMEOUT_S = 10.0
READY = b"ready\n"
SHELL_NAME = "sandpool-userns"  # how the shell's own errors begin

# $1.. are the quotas' values, in USER_QUOTAS order. The shell says it is there
# once the limits are written, and waits for the daemon to close its stdin.
_SCRIPT = "".join(
    f'printf %s "${i}" > /proc/sys/user/{name} && ' for i, name in enumerate(USER_QUOTAS, 1)
) + "printf 0 > /proc/sys/user/max_user_namespaces && echo ready && read -r _"


def unshare_command(unshare: str, quotas: dict[str, int]) -> list[str]:
    """The command that makes the namespace; its one line on stdout, ``READY``,
    comes from inside it. Raises KeyError for a quota not given."""
    values = [str(quotas[name]) for name in USER_QUOTAS]
    return [unshare, "--user", f"--map-user={SANDBOX_UID}", f"--map-group={SANDBOX_UID}",
            "--keep-caps", "/bin/sh", "-c", _SCRIPT, SHELL_NAME, *values]


async def make_user_namespace(unshare: str, quotas: dict[str, int]) -> int:
    """A sandbox's user namespace, as an fd (close-on-exec): bwrap's ``--userns``.
    The caller closes it.

    Raises BackendError with the tool's own words when it cannot be made.
    """
    maker = await asyncio.create_subprocess_exec(
        *unshare_command(unshare, quotas),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert maker.stdin is not None
    assert maker.stdout is not None
    fds: list[int] = []  # the namespace's, once opened
    failure = ""
    try:
        try:
            async with asyncio.timeout(MAKE_TIMEOUT_S):
                said = await maker.stdout.readline()
            if said != READY:
                failure = said.decode(errors="replace").strip() or "it said nothing"
            else:
                # The maker is our unreaped child: its pid is still its own.
                fds.append(os.open(f"/proc/{maker.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC))
        except TimeoutError:
            failure = f"no answer in {MAKE_TIMEOUT_S:g} s"
        except OSError as e:
            failure = str(e)
        finally:
            maker.stdin.close()  # the shell's read ends; the fd keeps the namespace
            if not fds and maker.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    maker.kill()
            errors = await _drain(maker)
        if failure:
            raise BackendError(
                f"cannot make the sandbox's user namespace: {errors.strip() or failure}",
                code="userns_failed",
            )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0]


async def _drain(maker: asyncio.subprocess.Process) -> str:
    """Wait for the maker (a shielded wait: it is ours to reap) and return its stderr."""
    assert maker.stderr is not None
    errors = await asyncio.shield(maker.stderr.read())
    await asyncio.shield(maker.wait())
    return errors.decode(errors="replace")[-2000:]
