"""A non-root daemon's sandbox: user and mount namespaces made before bwrap, with
the sandbox's quotas and noexec scratch.

A daemon that is not root can neither give a sandbox a host uid of its own nor
mount on the host. So it makes a user namespace and a mount namespace for each
sandbox, does there what root would do on the host, and starts bwrap inside
them (``nsenter``), where bwrap makes its own namespaces as usual
(``--unshare-user --disable-userns``):

- Quotas. Every process sandbox is the daemon's uid outside, and the kernel
  counts inotify instances and watches against the maker of each user
  namespace, up to the host; so each sandbox gets its share
  (``pool/quotas.py``) as its namespace's ``/proc/sys/user`` limits, which the
  kernel checks at every level below it too. Only a process inside the
  namespace with its capabilities may write them, and bwrap writes none but
  ``max_user_namespaces`` (its ``--disable-userns``, which holds inside as
  under a root daemon).
- Scratch. bwrap 0.8 cannot mount a tmpfs noexec. In the private mount
  namespace, ``mount`` puts a noexec, nosuid, nodev tmpfs of the pool's size on
  each of the pool's empty staging directories (``scratch.StagedScratch``'s
  fstab), and bwrap binds them in: the kernel locks the flags of a mount that
  enters a less privileged namespace, so the code cannot remount them exec.
  The host's mount table never holds them.

util-linux ``unshare`` makes the namespaces, mapping the daemon's uid to 65534
(the uid the code sees) and keeping the new namespace's capabilities for the
shell it starts there (``--keep-caps``). The shell writes the limits, mounts,
says it is ready and waits on stdin, so the namespaces live until bwrap has
entered them; the backend then releases it. No privilege is needed anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

from pool.errors import BackendError
from pool.wire import USER_QUOTAS

SANDBOX_UID = 65534  # the namespace's only uid and gid (definition.SANDBOX_UID)
MAKE_TIMEOUT_S = 10.0
READY = b"ready\n"
SHELL_NAME = "sandpool-userns"  # how the shell's own errors begin

# $1 is the fstab of the scratch mounts, $2.. the quotas' values in USER_QUOTAS
# order. The shell says it is ready once all is in place, then waits for the
# daemon to close its stdin.
_SCRIPT = "".join(
    f'printf %s "${i}" > /proc/sys/user/{name} && ' for i, name in enumerate(USER_QUOTAS, 2)
) + 'mount -a -T "$1" && echo ready && read -r _'


def unshare_command(unshare: str, fstab: Path, quotas: dict[str, int]) -> list[str]:
    """The command that makes the namespaces; its one line on stdout, ``READY``,
    comes from inside them. Raises KeyError for a quota not given."""
    values = [str(quotas[name]) for name in USER_QUOTAS]
    return [unshare, "--user", f"--map-user={SANDBOX_UID}", f"--map-group={SANDBOX_UID}",
            "--keep-caps", "--mount", "--propagation=private",
            "/bin/sh", "-c", _SCRIPT, SHELL_NAME, str(fstab), *values]


def nsenter_command(nsenter: str, maker_pid: int) -> list[str]:
    """What goes before bwrap's command line: into the maker's namespaces, with
    the daemon's credentials (65534 there, so bwrap starts with no capability)."""
    return [nsenter, f"--target={maker_pid}", "--user", "--mount", "--preserve-credentials"]


class NamespaceMaker:
    """One sandbox's namespaces, held by the shell ``unshare`` started in them."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    def __repr__(self) -> str:
        return f"<NamespaceMaker pid={self.pid} exited={self._process.returncode}>"

    @property
    def pid(self) -> int:
        return self._process.pid

    @classmethod
    async def make(cls, unshare: str, fstab: Path, quotas: dict[str, int]) -> NamespaceMaker:
        """The namespaces, ready for ``nsenter_command``; ``release`` them once bwrap
        has entered. Raises BackendError with the tools' own words when they
        cannot be made; nothing is left running then.
        """
        process = await asyncio.create_subprocess_exec(
            *unshare_command(unshare, fstab, quotas),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        maker = cls(process)
        assert process.stdout is not None
        timed_out = False
        try:
            try:
                async with asyncio.timeout(MAKE_TIMEOUT_S):
                    said = await process.stdout.readline()
            except TimeoutError:
                timed_out, said = True, b""
        except BaseException:
            await asyncio.shield(maker.release(kill=True))
            raise
        if said != READY:
            errors = await asyncio.shield(maker.release(kill=timed_out))
            why = (f"no answer in {MAKE_TIMEOUT_S:g} s" if timed_out
                   else said.decode(errors="replace").strip() or "it said nothing")
            raise BackendError(
                f"cannot make the sandbox's namespaces: {errors.strip() or why}",
                code="userns_failed",
            )
        return maker

    async def release(self, *, kill: bool = False) -> str:
        """Let the shell go (the namespaces live on in bwrap), or ``kill`` it; reap
        it and return its stderr. Idempotent; kills a shell that does not go."""
        process = self._process
        assert process.stdin is not None
        assert process.stderr is not None
        process.stdin.close()  # the shell's read ends
        if kill and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        try:
            async with asyncio.timeout(MAKE_TIMEOUT_S):
                errors = await process.stderr.read()
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            errors = b""
            await process.wait()
        return errors.decode(errors="replace")[-2000:]
