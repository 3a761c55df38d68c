"""The fork backend: single-use sandboxes forked from a warm template, not started.

Each pool has one template (``template.py``): the pool's runner with its
``preload`` imported and warmed, in bubblewrap, on the pool's image's root file
system. A sandbox is a copy-on-write fork of it, isolated by its own steps
(``pool/isolate.py``) into what a process-tier sandbox is: namespaces of its
own, the read-only root, fresh noexec scratch, its own cgroup and host uid,
no capability, the seccomp filter. It runs one request as a process-tier
runner does (``pool/backends/process/execute.py``) and is destroyed.

A start makes the sandbox's cgroup (its ``cgroup.procs`` files chowned to the
template, which moves the fork in), its pipes, and sends the order; the
runner's ready frame comes back on the pipes; the sandbox's PID 1 is then
found in its cgroup and held by a pidfd. A destroy kills PID 1, waits for the
template to report it reaped, then releases the cgroup and the host uid.
A template that dies is replaced at the next start; its sandboxes died with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os

import structlog

from pool.backends.base import BackendBase, RunRequest, RunResult, new_sandbox_id
from pool.backends.fork.sandbox import ChannelReader, ForkSandbox, RequestWriter
from pool.backends.fork.template import Template, inside_cgroup_procs
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
from pool.wire import SpawnOrder

log = structlog.get_logger("sandpool.fork")

# The template imports the pool's preload once: a data-science stack takes
# seconds, more on a loaded host.
TEMPLATE_READY_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 10.0  # order to the runner's ready frame: far above a normal fork
EXIT_TIMEOUT_S = 5.0  # SIGKILL to the template's report that PID 1 was reaped
TEMPLATE_CGROUP = "template"


class ForkBackend(BackendBase[ForkSandbox]):
    """Forks one pool's sandboxes from its template; a root daemon only."""

    name = "fork"

    def __init__(
        self, config: PoolConfig, instance_id: str, uids: SandboxUids | None = None,
        holders: Holders | None = None,
    ) -> None:
        super().__init__(config, instance_id)
        self._uids = uids or default_uids()
        self._holders = holders or Holders()
        self._definition: SandboxDefinition | None = None
        self._cgroups: CgroupTree | None = None
        self._template: Template | None = None
        self._template_lock = asyncio.Lock()
        self._version = "unknown"
        self._runtime = Runtime()
        self._sandboxes: set[ForkSandbox] = set()
        self._quotas: dict[str, int] = {}
        self._ptys = 1  # each sandbox's share of the host's PTYs, set at start
        # The pool cgroup's standing (cpu.py). A fork costs the template ~1 ms:
        # starts add no weight, and a pool whose runs are short never writes.
        self._cpu = PoolCpu(None, weigh_starts=False)

    def __repr__(self) -> str:
        return f"<ForkBackend {self.config.name} sandboxes={len(self._sandboxes)}>"

    # --- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        if os.geteuid() != 0:
            # Only root may map the range of host uids into the template's user
            # namespace, which gives every sandbox a uid of its own.
            raise BackendError(
                "the fork tier needs a root daemon (each sandbox runs as a host uid of "
                "its own, mapped by the daemon): see docs/fork-tier.md",
                code="fork_needs_root",
            )
        definition = await define(self.config)
        # Every sandbox is counted against the template's uid too (pool/quotas.py).
        holders = self.config.max_size + 1
        definition = dataclasses.replace(
            definition, limits=rlimit_shares(definition.limits, holders)
        )
        self._quotas = await asyncio.to_thread(user_quota_shares, holders)
        self._ptys = await asyncio.to_thread(
            pty_share, self._holders.of_ptys(self.config)
        )
        shares = sandbox_shares(self._quotas, definition.limits, self._ptys)
        self._version = definition.version
        dir_name = cgroup_dir_name(self.config.name, self.instance_id)
        self._cgroups, reason = await asyncio.to_thread(prepare_cgroups, dir_name)
        if self._cgroups is None:
            raise BackendError(
                f"the fork tier enforces memory_mb with a memory cgroup, and this daemon "
                f"cannot create one ({reason})",
                code="process_needs_cgroups",
            )
        self._cpu = PoolCpu(self._cgroups, weigh_starts=False)
        try:
            self._definition = await with_rootfs(definition)
            self._runtime = await image_runtime(self.config.language, self.config.image)
            # One sandbox through its whole life now, so that a host that cannot
            # run it fails at start-up with the kernel's own words.
            await self.destroy_sandbox(await self.start_sandbox())
        except BaseException:
            await self.close()
            raise
        log.info(
            "fork_backend_ready",
            pool=self.config.name,
            bwrap=self._version,
            cgroups=self._cgroups.controllers,
            host_uids=repr(self._uids),
            shares=shares,
        )
        if small := small_shares(shares):
            log.warning("quota_shares_small", pool=self.config.name, shares=small)

    def requests_waiting(self, waiting: bool) -> None:
        self._cpu.requests_waiting(waiting)

    async def close(self) -> None:
        for sandbox in list(self._sandboxes):
            await asyncio.shield(self.destroy_sandbox(sandbox))
        await self._close_template()
        await self._cpu.close()
        if self._cgroups is not None:
            await asyncio.to_thread(remove_pool_cgroups, self._cgroups)
            self._cgroups = None
        self._definition = None

    def version(self) -> str:
        return self._version

    def runtime(self) -> Runtime:
        return self._runtime

    async def ping(self) -> bool:
        return self._definition is not None

    # --- the template ------------------------------------------------------

    async def _live_template(self) -> Template:
        """The pool's template, started (or restarted, if it died) now if need be."""
        async with self._template_lock:
            if self._template is not None and not self._template.alive:
                await self._close_template()
            if self._template is None:
                self._template = await self._start_template()
            return self._template

    async def _start_template(self) -> Template:
        if self._definition is None or self._cgroups is None:
            raise BackendError("the fork backend is not started")
        tree = self._cgroups
        host_uid = self._uids.acquire()
        cgroup: SandboxCgroup | None = None
        try:
            cgroup = await asyncio.to_thread(
                create_sandbox_cgroup, tree, TEMPLATE_CGROUP, self.config
            )
            if tree.version == 2:
                # Moving a process between cgroups needs write access to their
                # common ancestor's cgroup.procs: the pool's directory.
                await asyncio.to_thread(
                    os.chown, tree.pool_dirs["unified"] / "cgroup.procs", host_uid, host_uid
                )
            template = Template(self._definition, tree, cgroup, host_uid, self._uids)
            await template.start(TEMPLATE_READY_TIMEOUT_S)
        except BaseException:
            if cgroup is not None:
                with contextlib.suppress(BackendError):
                    await asyncio.to_thread(remove_sandbox_cgroup, cgroup)
            self._uids.release(host_uid)
            raise
        log.info("fork_template_ready", pool=self.config.name, uid=host_uid)
        return template

    async def _close_template(self) -> None:
        template, self._template = self._template, None
        if template is None:
            return
        await template.close()
        try:
            await asyncio.to_thread(remove_sandbox_cgroup, template.cgroup)
        except BackendError as e:
            log.warning("cgroup_not_removed", pool=self.config.name, error=e.message)
        self._uids.release(template.host_uid)

    # --- sandboxes ---------------------------------------------------------

    async def start_sandbox(self) -> ForkSandbox:
        # The template forks in the pool's cgroup: a start clears its idle flag.
        return await self._cpu.start(self._start_sandbox, self.destroy_sandbox)

    async def _start_sandbox(self) -> ForkSandbox:
        template = await self._live_template()
        if self._cgroups is None:
            raise BackendError("the fork backend is not started")
        tree = self._cgroups
        sandbox_id = new_sandbox_id()
        creating = asyncio.ensure_future(
            asyncio.to_thread(self._make_cgroup, tree, sandbox_id, template.host_uid)
        )
        try:
            cgroup = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # The thread finishes the cgroup anyway: remove what it made.
            with contextlib.suppress(BackendError):
                await asyncio.to_thread(remove_sandbox_cgroup, await creating)
            raise
        try:
            sandbox = await self._order(template, tree, sandbox_id, cgroup)
        except BaseException:
            with contextlib.suppress(BackendError):
                await asyncio.to_thread(remove_sandbox_cgroup, cgroup)
            raise
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                # Shielded so that the destroy below can still wait for it.
                await asyncio.shield(sandbox.protocol.ready)
            await asyncio.to_thread(_ready, sandbox, cgroup)
        except BaseException as e:
            with contextlib.suppress(BackendError):
                await asyncio.shield(self.destroy_sandbox(sandbox))
            if isinstance(e, (BackendError, ProtocolViolation, OSError, TimeoutError)):
                why = sandbox.stderr_text or _describe(e)
                raise BackendError(f"cannot fork a sandbox: {why}") from None
            raise
        sandbox.protocol.on_idle_death = lambda: report_died_waiting(
            sandbox, self.config.name, self.report_died
        )
        return sandbox

    def _make_cgroup(self, tree: CgroupTree, sandbox_id: str, template_uid: int) -> SandboxCgroup:
        """The sandbox's cgroup, its cgroup.procs files the template's to write. Blocking."""
        cgroup = create_sandbox_cgroup(tree, sandbox_id, self.config)
        try:
            for path in cgroup.procs_files:
                os.chown(path, template_uid, template_uid)
        except OSError as e:
            remove_sandbox_cgroup(cgroup)
            raise BackendError(f"cannot hand the sandbox's cgroup to the template: {e}") from None
        return cgroup

    async def _order(
        self, template: Template, tree: CgroupTree, sandbox_id: str, cgroup: SandboxCgroup
    ) -> ForkSandbox:
        """Make the sandbox's pipes and send the template its order; nothing here waits
        on the sandbox. On failure its pipes are closed and its uid released."""
        loop = asyncio.get_running_loop()
        protocol = RunnerProtocol(loop)
        pipes = OutputPipes()
        request_r, request_w = os.pipe()
        channel_r, channel_w = os.pipe()
        diagnostics_r, diagnostics_w = os.pipe()
        os.set_blocking(diagnostics_r, False)
        theirs = [request_r, channel_w, diagnostics_w, *pipes.write_ends]
        uid = self._uids.acquire()
        sandbox = ForkSandbox(sandbox_id, protocol, pipes, cgroup, uid, diagnostics_r)
        sandbox.template_alive = lambda: template.alive
        self._sandboxes.add(sandbox)
        try:
            # The transports own their fds from here on, closed by sandbox.close().
            sandbox.channel_transport, _ = await loop.connect_read_pipe(
                lambda: ChannelReader(protocol), os.fdopen(channel_r, "rb", buffering=0)
            )
            sandbox.request_transport, _ = await loop.connect_write_pipe(
                lambda: RequestWriter(protocol), os.fdopen(request_w, "wb", buffering=0)
            )
            order = SpawnOrder(
                sandbox_id, uid, inside_cgroup_procs(tree, cgroup),
                self.config.tmpfs_mb * 1024 * 1024, self._quotas, self._ptys,
            )  # fmt: skip
            template.spawn(order, theirs, protocol.exited_with)
        except BaseException:
            if sandbox.channel_transport is None:
                os.close(channel_r)
            if sandbox.request_transport is None:
                os.close(request_w)
            protocol.exited_with(-9)  # nothing was started
            self._sandboxes.discard(sandbox)
            sandbox.close()
            if sandbox.host_uid is not None:
                self._uids.release(sandbox.host_uid)
            raise
        finally:
            for fd in (request_r, channel_w, diagnostics_w):
                os.close(fd)
            pipes.close_write_ends()  # the template holds them now
        return sandbox

    async def run(self, sandbox: ForkSandbox, request: RunRequest) -> RunResult:
        async with self._cpu.running(sandbox.cgroup, kept=request.session):
            return await run_direct(
                sandbox, request, self.config, self.report_oom,
                killed_outside=lambda: not sandbox.template_alive(),
            )

    async def destroy_sandbox(self, sandbox: ForkSandbox) -> None:
        if not sandbox.mark_destroyed():
            return
        self._sandboxes.discard(sandbox)
        # A destroyed sandbox reports no death, and the callback holds the
        # sandbox that holds its protocol: a cycle the last run's output would
        # wait in for the cyclic collector.
        sandbox.protocol.on_idle_death = None
        try:
            sandbox.kill()
            try:
                async with asyncio.timeout(EXIT_TIMEOUT_S):
                    await asyncio.shield(sandbox.protocol.exited)
            except TimeoutError:
                log.warning("sandbox_kill_slow", sandbox=sandbox.id)
                sandbox.kill()
        finally:
            sandbox.stderr_text = sandbox.read_stderr()
            if sandbox.stderr_text:
                log.debug("runner_stderr", sandbox=sandbox.id, stderr=sandbox.stderr_text)
            if self._template is not None:
                self._template.forget(sandbox.id)
            sandbox.close()
            if sandbox.cgroup is not None:
                # Kills what is left in it (a start cut short) before removing it.
                await asyncio.to_thread(remove_sandbox_cgroup, sandbox.cgroup)
                sandbox.cgroup = None
            # Only now is the uid free: the cgroup was empty, so no process runs as it.
            if sandbox.host_uid is not None:
                self._uids.release(sandbox.host_uid)
                sandbox.host_uid = None


def _ready(sandbox: ForkSandbox, cgroup: SandboxCgroup) -> None:
    """Once its runner is ready: hold its PID 1, then let the CPU quota bite. Blocking
    (one thread hop for both: each costs the loop a wake-up)."""
    sandbox.learn_runner()
    cgroup.apply_cpu_limit()


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return f"the runner was not ready within {READY_TIMEOUT_S:g} s"
    if isinstance(error, BackendError | ProtocolViolation):
        return error.message
    return str(error) or type(error).__name__
