"""The process backend's lifecycle: pre-started runners in bubblewrap namespaces.

Each sandbox is one ``bwrap`` process tree started ahead of demand, running the
same runner as the Docker backend (``pool/runner.py`` in direct mode) with the
host's own ``/usr`` mounted read-only. A request is one frame written on the
runner's stdin; the code's stdout, stderr and exit status come back on three
pipes of the sandbox's own, read by the event loop (``channel.py``), so a
hand-out costs about a pipe write each way.

A start makes the sandbox's cgroup (``cgroups.py``) and, for a root daemon,
its noexec scratch mounts (``scratch.py``) or, for one that is not root, its
user and mount namespaces with its share of the daemon uid's quotas and its
noexec scratch mounts (``userns.py``), spawns the command line of
``definition.py``, and waits for the runner's ready frame. A run enforces the
timeout and the output cap by killing the runner; the OOM verdict is the
cgroup's ``oom_kill`` counter, never the code's claim. A destroy kills the
tree, waits until bwrap is reaped, then releases the cgroup, the mounts and
the host uid, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess

import structlog

from pool.backends.base import BackendBase, RunRequest, RunResult, new_sandbox_id
from pool.backends.process.cgroups import (
    CgroupTree,
    SandboxCgroup,
    cgroup_dir_name,
    create_sandbox_cgroup,
    prepare_cgroups,
    remove_pool_cgroups,
    remove_sandbox_cgroup,
)
from pool.backends.process.channel import OutputPipes, RunnerProtocol
from pool.backends.process.cpu import PoolCpu
from pool.backends.process.definition import SandboxDefinition, define, with_rootfs
from pool.backends.process.execute import report_died_waiting, run_direct
from pool.backends.process.sandbox import ProcessSandbox
from pool.backends.process.scratch import SandboxScratch, ScratchMounts, StagedScratch
from pool.backends.process.userns import NamespaceMaker
from pool.backends.runtime import Runtime, image_runtime
from pool.config import PoolConfig
from pool.errors import BackendError
from pool.protocol import ProtocolViolation
from pool.quotas import (
    Holders,
    pty_share,
    rlimit_shares,
    sandbox_shares,
    small_shares,
    user_quota_shares,
)
from pool.uids import SandboxUids, default_uids

log = structlog.get_logger("sandpool.process")

READY_TIMEOUT_S = 10.0  # spawn to the runner's ready frame: far above a normal start
EXIT_TIMEOUT_S = 5.0  # SIGKILL to bwrap reaped: far above a normal reap


class ProcessBackend(BackendBase[ProcessSandbox]):
    """Runs one pool's sandboxes as bubblewrap process trees on this host."""

    name = "process"

    def __init__(
        self, config: PoolConfig, instance_id: str, uids: SandboxUids | None = None,
        holders: Holders | None = None,
    ) -> None:
        super().__init__(config, instance_id)
        self._uids = uids or default_uids()
        self._holders = holders or Holders()
        self._definition: SandboxDefinition | None = None  # set once started, until closed
        self._cgroups: CgroupTree | None = None
        # Noexec scratch: a root daemon's mounts, or a non-root daemon's staging.
        self._scratch: ScratchMounts | StagedScratch | None = None
        self._ptys = 1  # each sandbox's share of the host's PTYs, set at start
        self._version = "unknown"
        self._runtime = Runtime()
        self._sandboxes: set[ProcessSandbox] = set()
        self._cpu = PoolCpu(None, weigh_starts=True)  # the pool cgroup's standing (cpu.py)

    def __repr__(self) -> str:
        return f"<ProcessBackend {self.config.name} sandboxes={len(self._sandboxes)}>"

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        definition = await define(self.config)
        if definition.unshare is not None:
            # Not root: every process sandbox of the daemon, and the daemon, share
            # its uid's per-user quotas; each sandbox gets a share (pool/quotas.py).
            holders = self._holders.of_own_uid(self.config)
            definition = dataclasses.replace(
                definition, limits=rlimit_shares(definition.limits, holders),
                user_quotas=await asyncio.to_thread(user_quota_shares, holders),
            )
        self._version = definition.version
        # As root, or as a user systemd delegated a cgroup subtree to (Delegate=yes).
        dir_name = cgroup_dir_name(self.config.name, self.instance_id)
        self._cgroups, reason = await asyncio.to_thread(prepare_cgroups, dir_name)
        if self._cgroups is None:
            # RLIMIT_AS does not count shared memory (memfds, tmpfs, SysV and POSIX
            # shm), so without a memory cgroup one request could hold many times
            # memory_mb: refuse rather than promise a limit that is not there.
            raise BackendError(
                f"the process tier enforces memory_mb only with a memory cgroup, and this "
                f"daemon cannot create one ({reason}): run it as root, or under systemd with "
                "Delegate=yes on a cgroup v2 host (see docs/process-tier.md)",
                code="process_needs_cgroups",
            )
        self._cpu = PoolCpu(self._cgroups, weigh_starts=True)
        try:
            definition = await with_rootfs(definition)
        except BaseException:
            await self.close()  # the cgroups made above
            raise
        self._runtime = await image_runtime(self.config.language, self.config.image)
        scratch = ScratchMounts(dir_name) if definition.setpriv else StagedScratch(dir_name)
        self._ptys = await asyncio.to_thread(
            pty_share, self._holders.of_ptys(self.config)
        )
        try:
            if isinstance(scratch, ScratchMounts):
                await asyncio.to_thread(scratch.start)
            else:
                await asyncio.to_thread(
                    scratch.start, self.config.tmpfs_mb * 1024 * 1024, self._ptys
                )
        except OSError as e:
            await self.close()
            raise BackendError(
                f"cannot prepare the noexec scratch mounts in {scratch.directory}: {e}",
                code="scratch_unavailable",
            ) from None
        self._scratch = scratch
        self._definition = definition
        # One sandbox through its whole life now, so a host that forbids user
        # namespaces fails at start-up with bwrap's own words, not at every refill.
        try:
            probe = await self.start_sandbox()
        except BackendError as e:
            await self.close()
            raise BackendError(
                f"{e.message} (the process backend needs unprivileged user namespaces: "
                "see docs/process-tier.md)",
                code="bwrap_failed",
            ) from None
        except BaseException:
            await self.close()
            raise
        await self.destroy_sandbox(probe)
        # As root a sandbox shares only the host's PTYs: its quotas are its uid's.
        shares = ({"ptys": self._ptys} if definition.unshare is None else
                  sandbox_shares(definition.user_quotas, definition.limits, self._ptys))
        log.info(
            "process_backend_ready",
            pool=self.config.name,
            bwrap=self._version,
            cgroups=self._cgroups.controllers if self._cgroups else [],
            host_uids=repr(self._uids) if definition.setpriv else os.geteuid(),
            shares=shares,
        )
        if small := small_shares(shares):
            log.warning("quota_shares_small", pool=self.config.name, shares=small)

    def requests_waiting(self, waiting: bool) -> None:
        self._cpu.requests_waiting(waiting)

    async def close(self) -> None:
        for sandbox in list(self._sandboxes):
            await asyncio.shield(self.destroy_sandbox(sandbox))
        await self._cpu.close()
        if self._cgroups is not None:
            await asyncio.to_thread(remove_pool_cgroups, self._cgroups)
            self._cgroups = None
        if self._scratch is not None:
            await asyncio.to_thread(self._scratch.close)
            self._scratch = None
        self._definition = None

    def version(self) -> str:
        return self._version

    def runtime(self) -> Runtime:
        return self._runtime

    async def ping(self) -> bool:
        return self._definition is not None

    # --- sandboxes ---------------------------------------------------------

    async def start_sandbox(self) -> ProcessSandbox:
        if self._definition is None:
            raise BackendError("the process backend is not started")
        definition = self._definition
        return await self._cpu.start(lambda: self._start_sandbox(definition),
                                     self.destroy_sandbox)

    async def _start_sandbox(self, definition: SandboxDefinition) -> ProcessSandbox:
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
        spawning = asyncio.ensure_future(self._spawn(definition, sandbox_id, cgroup))
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
            if sandbox.maker is not None:  # bwrap is in the namespaces: they live on in it
                await sandbox.maker.release()
                sandbox.maker = None
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
        sandbox.protocol.on_idle_death = lambda: report_died_waiting(
            sandbox, self.config.name, self.report_died
        )
        return sandbox

    async def _spawn(
        self, definition: SandboxDefinition, sandbox_id: str, cgroup: SandboxCgroup | None
    ) -> ProcessSandbox:
        loop = asyncio.get_running_loop()
        seccomp_fd = definition.seccomp_fd()
        info_r, info_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        for fd in (info_r, stderr_r):
            os.set_blocking(fd, False)
        pipes = OutputPipes()
        host_uid: int | None = None
        scratch: SandboxScratch | None = None  # a root daemon's, detached once ready
        maker: NamespaceMaker | None = None  # a non-root daemon's namespaces
        try:
            # start() chose the scratch by the daemon's mode: as root, each sandbox
            # runs as a host uid of its own (pool/uids.py) with mounts of its own;
            # a non-root daemon's sandboxes are all its own uid outside, each with
            # a share of that uid's quotas in namespaces of its own (userns.py).
            if isinstance(self._scratch, ScratchMounts):
                host_uid = self._uids.acquire()
                scratch = await asyncio.to_thread(
                    self._scratch.mount, sandbox_id, host_uid, self.config.tmpfs_mb * 1024 * 1024,
                    self._ptys,
                )
                in_sandbox: SandboxScratch | StagedScratch = scratch
            elif isinstance(self._scratch, StagedScratch) and definition.unshare is not None:
                maker = await NamespaceMaker.make(
                    definition.unshare, self._scratch.fstab, definition.user_quotas
                )
                in_sandbox = self._scratch
            else:
                raise BackendError("the process backend is not started")
            command = definition.command(
                seccomp_fd, info_w, cgroup, pipes.write_ends, in_sandbox, host_uid,
                maker.pid if maker is not None else None,
            )
            transport, protocol = await loop.subprocess_exec(
                lambda: RunnerProtocol(loop),
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
            if maker is not None:
                await asyncio.shield(maker.release(kill=True))
            if isinstance(e, OSError):
                raise BackendError(f"cannot run bubblewrap: {e}") from None
            raise
        finally:
            for fd in (seccomp_fd, info_w, stderr_w):
                os.close(fd)
        pipes.close_write_ends()  # the sandbox holds them now: EOF means its writers are gone
        sandbox = ProcessSandbox(
            sandbox_id, transport, protocol, info_r, stderr_r, cgroup, pipes, host_uid, scratch,
            maker,
        )
        self._sandboxes.add(sandbox)
        return sandbox

    async def run(self, sandbox: ProcessSandbox, request: RunRequest) -> RunResult:
        async with self._cpu.running(sandbox.cgroup, kept=request.session):
            return await run_direct(sandbox, request, self.config, self.report_oom)

    async def destroy_sandbox(self, sandbox: ProcessSandbox) -> None:
        if not sandbox.mark_destroyed():
            return
        self._sandboxes.discard(sandbox)
        # A destroyed sandbox reports no death, and the callback holds the
        # sandbox that holds its protocol: a cycle the last run's output would
        # wait in for the cyclic collector.
        sandbox.protocol.on_idle_death = None
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
            if sandbox.maker is not None:  # likewise
                await asyncio.shield(sandbox.maker.release(kill=True))
                sandbox.maker = None
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
            either: list[asyncio.Future[None] | asyncio.Future[int]] = [
                protocol.ready,
                protocol.exited,
            ]
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


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return f"the runner was not ready within {READY_TIMEOUT_S:g} s"
    if isinstance(error, BackendError | ProtocolViolation):
        return error.message
    return str(error) or type(error).__name__
