"""The Docker backend's lifecycle: one pool's single-use containers, started, run and removed.

Each container runs the runner (``pool/runner.py``) as its main process and is
attached when it joins the pool; one request is one frame written on the
attached stream, and the result comes back as frames on the same stream
(``channel.py``), so a run never waits for a container to exit. The container
definition is ``definition.py``; owner labels and the proof that their daemon
is gone, ``ownership.py``; dockerd's events, ``events.py``; the pool's own
cpu cgroup, where the engine is this host's dockerd, ``cgroup.py``.

Every Docker call has a timeout: aiodocker's defaults never time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import structlog
from aiodocker.containers import DockerContainer

from pool import guest
from pool.backends.base import (
    BUSY_AFTER_S,
    BackendBase,
    RunRequest,
    RunResult,
    Sandbox,
    new_sandbox_id,
)
from pool.backends.docker import engine
from pool.backends.docker.cgroup import (
    PoolCgroup,
    engine_facts,
    prepare_pool_cgroup,
    refused,
    remove_pool_cgroup,
)
from pool.backends.docker.channel import RunEnd, RunnerChannel
from pool.backends.docker.containers import Containers
from pool.backends.docker.definition import (
    LABEL_INSTANCE,
    LABEL_POOL,
    container_definition,
    labels_of,
    own_devpts,
)
from pool.backends.docker.engine import CALL_TIMEOUT_S, DOCKER_ERRORS, describe
from pool.backends.docker.events import OomEvents, follow_events
from pool.backends.docker.ownership import owner_label
from pool.backends.docker.reaper import Reaper
from pool.backends.process.cgroups import SandboxCgroup, cgroup_dir_name
from pool.backends.process.cpu import PoolCpu
from pool.backends.runtime import Runtime, image_runtime
from pool.config import PoolConfig
from pool.errors import BackendError, SandboxLostError
from pool.protocol import ProtocolViolation
from pool.quotas import Holders, pty_share, small_shares
from pool.seccomp import docker_profile
from pool.uids import SandboxUids, default_uids
from pool.wire import Outcome, OutputCapture

log = structlog.get_logger("sandpool.docker")

READY_TIMEOUT_S = 20.0  # container start to the runner's ready frame
SWEEP_INTERVAL_S = 10.0
OOM_EXIT_CODE = 137  # 128 + SIGKILL: what the runner reports for an OOM-killed child
# Without the pool's own cgroup (cgroup.py), a busy run's container gets the
# least CPU shares: among the containers it competes with only a 512th of a
# default one's weight. Not BUSY_AFTER_S as in
# the other tiers: an update costs dockerd a `runc update` (~30 ms, measured),
# which would be a quarter of a 0.12 s run's own CPU; past half a second it is
# a few percent. A session's container gets the default back after the run.
DOCKER_BUSY_AFTER_S = 5 * BUSY_AFTER_S
BUSY_CPU_SHARES = 2  # the kernel's least
DEFAULT_CPU_SHARES = 1024  # one process's, what Docker gives a container without CpuShares


class DockerSandbox(Sandbox):
    """One started container, its runner channel, and the host uid it runs as."""

    def __init__(
        self, sandbox_id: str, container: DockerContainer, channel: RunnerChannel, uid: int
    ) -> None:
        super().__init__(sandbox_id)
        self.uid = uid  # host uid and gid of every process in the container
        self.container = container
        self.channel = channel
        # Its cpu cgroup below the pool's own (cgroup.py), whose idle flag a
        # busy run sets; None where the engine keeps the pool's containers.
        self.cgroup: SandboxCgroup | None = None
        # Without one, lowering a busy run's CPU shares (DockerBackend.run):
        # awaited before the container is removed, or, in a session, before its
        # next run.
        self.demotion: asyncio.Future[None] | None = None

    @property
    def container_id(self) -> str:
        return str(self.container.id)


class DockerBackend(BackendBase[DockerSandbox]):
    """Runs one pool's sandboxes as Docker containers."""

    name = "docker"

    def __init__(
        self, config: PoolConfig, instance_id: str, uids: SandboxUids | None = None,
        holders: Holders | None = None,
    ) -> None:
        super().__init__(config, instance_id)
        self._uids = uids or default_uids()
        self._holders = holders or Holders()
        self._containers = Containers()
        self._reaper = Reaper(config.name, instance_id, self._containers)
        self._guest_dir: Path | None = None  # guest.install(): the runner, bind-mounted read-only
        self._ptys: int | None = None  # each container's share of the host's PTYs
        self._sandboxes: dict[str, DockerSandbox] = {}  # container id -> started, not destroyed
        self._oom = OomEvents()
        self._tasks: list[asyncio.Task[None]] = []  # event follower and leak sweeper
        self._creating: set[str] = set()  # names of containers not yet in _sandboxes
        self._server_version = "unknown"
        self._runtime = Runtime()
        self._owner = ""  # owner_label(), read once at start
        self._cgroup: PoolCgroup | None = None  # the pool's own, where it may have one
        self._cpu = PoolCpu(None, weigh_starts=True)  # that cgroup's standing (process/cpu.py)

    # --- lifecycle ---------------------------------------------------------

    @property
    def docker(self) -> aiodocker.Docker:
        """The connected client. Raises BackendError before ``start()`` or after ``close()``."""
        return self._containers.docker

    async def start(self) -> None:
        """Connect, check the image, reap orphans of dead daemons, follow events.

        Raises BackendError when the image is missing, or libseccomp (which
        renders the seccomp profile: ``seccomp_unavailable``). An unreachable Docker
        engine is not fatal: the pool backs off and rebuilds when it answers.
        """
        try:
            self._owner = owner_label()
        except OSError as e:
            raise BackendError(
                f"cannot read this daemon's own identity for container labels: {e}",
                code="identity_unreadable",
            ) from None
        self._guest_dir = await asyncio.to_thread(guest.install)
        self._ptys = await asyncio.to_thread(
            pty_share, self._holders.of_ptys(self.config)
        )
        if own_devpts(self.config) and (small := small_shares({"ptys": self._ptys})):
            log.warning("quota_shares_small", pool=self.config.name, shares=small)
        # The seccomp profile needs libseccomp's syscall table: read it once,
        # off the event loop, and fail here rather than at every container.
        await asyncio.to_thread(docker_profile)
        docker = self._containers.connect()
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                version = await docker.version()
                self._server_version = str(version.get("Version", "unknown"))
                await docker.images.inspect(self.config.image)
            self._runtime = await image_runtime(self.config.language, self.config.image)
            await self.reap_orphans()
            await self._prepare_cgroup()
        except aiodocker.DockerError as e:
            if e.status == 404:
                await self.close()
                raise BackendError(
                    f"image {self.config.image} not found: build it with `sandpool image build`",
                    code="image_missing",
                ) from None
            log.warning("docker_refused", pool=self.config.name, error=describe(e))
        except (aiohttp.ClientError, OSError, TimeoutError, BackendError) as e:
            log.warning("docker_unreachable", pool=self.config.name, error=describe(e))
        loop = asyncio.get_running_loop()
        events = follow_events(docker, self.config.name, self.instance_id, self._on_event)
        self._tasks = [loop.create_task(events), loop.create_task(self._sweep())]

    async def _prepare_cgroup(self) -> None:
        """The pool's own cpu cgroup, where the engine is this host's dockerd and
        sandpool may hold it (cgroup.py); the log says which, and why not."""
        async with asyncio.timeout(CALL_TIMEOUT_S):
            info = await self.docker.system.info()
        facts = await asyncio.to_thread(engine_facts, self._containers.url, info)
        reason = refused(facts)
        if not reason and facts.own_cpu is not None:
            dir_name = cgroup_dir_name(self.config.name, self.instance_id)
            try:
                self._cgroup = await asyncio.to_thread(prepare_pool_cgroup, dir_name,
                                                       facts.own_cpu)
            except OSError as e:
                reason = f"cannot create the pool's cgroup: {e}"
        if self._cgroup is None:
            log.info("docker_cgroup_engines", pool=self.config.name, reason=reason)
            return
        self._cpu = PoolCpu(self._cgroup.tree, weigh_starts=True)
        log.info("docker_cgroup_own", pool=self.config.name, path=self._cgroup.parent)

    def requests_waiting(self, waiting: bool) -> None:
        self._cpu.requests_waiting(waiting)

    async def close(self) -> None:
        """Stop following events; remove whatever of this pool is still there; disconnect.

        The pool has destroyed its sandboxes by now, but a removal that failed
        while dockerd was down left a container behind, and one across a dockerd
        restart can leave the container's volume: labels find both.
        """
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._containers.connected:
            try:
                mine = await self._containers.list(f"{LABEL_INSTANCE}={self.instance_id}")
                for container in mine:
                    if labels_of(container).get(LABEL_POOL) == self.config.name:
                        await self._containers.remove(str(container["Id"]))
                await self._reaper.remove_dangling_volumes(
                    f"{LABEL_INSTANCE}={self.instance_id}", f"{LABEL_POOL}={self.config.name}")
            except (*DOCKER_ERRORS, BackendError) as e:
                log.error("containers_not_removed", pool=self.config.name, error=describe(e))
            await self._containers.close()
        await self._cpu.close()
        if self._cgroup is not None:  # its containers are gone; what the engine left goes too
            await asyncio.to_thread(remove_pool_cgroup, self._cgroup)
            self._cgroup = None
            self._cpu = PoolCpu(None, weigh_starts=True)

    def version(self) -> str:
        return self._server_version

    def runtime(self) -> Runtime:
        return self._runtime

    async def ping(self) -> bool:
        try:
            await engine.ping(self.docker)
        except (*DOCKER_ERRORS, BackendError, ValueError):
            return False
        return True

    # --- sandboxes ---------------------------------------------------------

    def container_config(self, uid: int | None = None) -> dict[str, Any]:
        """The hardened container definition (``definition.py``) for this pool.

        ``uid`` is the sandbox's own host uid (and gid); without one, the first
        of the range (a definition for the benchmarks).
        """
        if uid is None:
            uid = self._uids.base
        if not self._owner:  # a definition built before start() (the benchmarks)
            self._owner = owner_label()
        if self._guest_dir is None:  # likewise
            self._guest_dir = guest.install()
        if self._ptys is None:  # likewise
            self._ptys = pty_share(self._holders.of_ptys(self.config))
        return container_definition(
            self.config,
            uid=uid,
            instance_id=self.instance_id,
            owner=self._owner,
            ptys=self._ptys,
            guest_dir=self._guest_dir,
            cgroup_parent=self._cgroup.parent if self._cgroup is not None else None,
        )

    async def start_sandbox(self) -> DockerSandbox:
        # A start weighs on the pool's own cgroup, where it has one.
        return await self._cpu.start(self._start_sandbox, self.destroy_sandbox)

    async def _start_sandbox(self) -> DockerSandbox:
        sandbox_id = new_sandbox_id()
        name = f"sandpool-{self.config.name}-{sandbox_id}"
        uid = self._uids.acquire()
        self._creating.add(name)
        try:
            sandbox = await self._start_container(sandbox_id, name, uid)
        finally:
            self._creating.discard(name)
        if self._cgroup is not None:  # one stat, on the loop: no await between start and return
            sandbox.cgroup = self._cgroup.sandbox(sandbox.container_id)
        self._sandboxes[sandbox.container_id] = sandbox
        return sandbox

    async def _start_container(self, sandbox_id: str, name: str, uid: int) -> DockerSandbox:
        """Create, attach, start, wait for the runner.

        On failure the container is removed and the uid released; a removal
        that fails raises BackendError and keeps the uid held, since the
        container's processes may still run as it.
        """
        creating = asyncio.ensure_future(self._create_container(name, uid))
        try:
            container = await asyncio.shield(creating)
        except asyncio.CancelledError:
            # dockerd finishes a create whose request was abandoned, so removing
            # by name now could miss it: let it finish, then remove what it made.
            with contextlib.suppress(BackendError):
                await self._remove_and_release((await creating).id, uid)
            raise
        channel: RunnerChannel | None = None
        try:
            stream = engine.attach(self.docker, container.id)
            channel = RunnerChannel(stream, sandbox_id)
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await stream.__aenter__()
                await container.start()
            async with asyncio.timeout(READY_TIMEOUT_S):
                await channel.wait_ready()
        except BaseException as e:
            if channel is not None:
                await channel.close()
            await asyncio.shield(self._remove_and_release(container.id, uid))
            if isinstance(e, (*DOCKER_ERRORS, ProtocolViolation)):
                raise BackendError(f"cannot start a container: {describe(e)}") from None
            raise
        return DockerSandbox(sandbox_id, container, channel, uid)

    async def _create_container(self, name: str, uid: int) -> DockerContainer:
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                return await self.docker.containers.create(self.container_config(uid), name=name)
        except DOCKER_ERRORS as e:
            # A create that timed out may still have made the container.
            await self._remove_and_release(name, uid)
            raise BackendError(f"cannot create a container: {describe(e)}") from None

    async def run(self, sandbox: DockerSandbox, request: RunRequest) -> RunResult:
        if sandbox.channel.child_gone or not sandbox.take_request():
            raise SandboxLostError(f"sandbox {sandbox.id} died while idle")
        began = time.monotonic()
        limits = self.config.outcome_limits()
        await sandbox.channel.send_request(request, limits)
        capture = OutputCapture(self.config.max_output_bytes, request.output_listener)
        outcome = Outcome(limits)
        try:
            async with self._cpu_standing(sandbox, session=request.session):
                end, exit_code = await sandbox.channel.collect(capture, outcome, request.timeout_s)
        except DOCKER_ERRORS as e:
            raise BackendError(f"lost the stream of sandbox {sandbox.id}: {describe(e)}") from None
        execution_s = time.monotonic() - began
        if end is RunEnd.NOT_TAKEN:
            raise SandboxLostError(f"sandbox {sandbox.id}: its session's process had ended")
        if end is RunEnd.STREAM_ENDED:
            # The runner died without its exit frame (OOM kill, crash): ask Docker.
            exit_code = await self._exit_code(sandbox)
        oom_killed = await self._oom.reported(
            sandbox.container_id,
            wait=end is RunEnd.STREAM_ENDED or exit_code == OOM_EXIT_CODE,
        )
        return RunResult.from_capture(
            capture,
            exit_code=exit_code,
            timed_out=end is RunEnd.TIMED_OUT,
            oom_killed=oom_killed,
            execution_s=execution_s,
            outcome=outcome,
        )

    @contextlib.asynccontextmanager
    async def _cpu_standing(self, sandbox: DockerSandbox, *, session: bool) -> AsyncIterator[None]:
        """Around one run: a busy run yields the CPU (docs/security.md, "Busy work
        yields"), and a session's next run starts at an ordinary standing."""
        if sandbox.cgroup is not None:  # below the pool's own cgroup: as the process tier
            async with self._cpu.running(sandbox.cgroup, kept=session):
                yield
            return

        def become_busy() -> None:
            sandbox.demotion = asyncio.ensure_future(self._set_shares(sandbox, BUSY_CPU_SHARES))

        busy = asyncio.get_running_loop().call_later(DOCKER_BUSY_AFTER_S, become_busy)
        try:
            yield
        finally:
            busy.cancel()
        if session and sandbox.demotion is not None:
            await asyncio.shield(sandbox.demotion)
            sandbox.demotion = None
            await asyncio.shield(self._set_shares(sandbox, DEFAULT_CPU_SHARES))

    async def _exit_code(self, sandbox: DockerSandbox) -> int:
        """The status Docker saw for a runner that died without its exit frame."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                info = await sandbox.container.wait()
                state = await sandbox.container.show()
        except DOCKER_ERRORS as e:
            raise BackendError(
                f"sandbox {sandbox.id} died and Docker cannot say why: {describe(e)}"
            ) from None
        if state["State"].get("OOMKilled"):
            self._oom.event(sandbox.container_id).set()
        return int(info.get("StatusCode", state["State"].get("ExitCode", 0)))

    async def _set_shares(self, sandbox: DockerSandbox, shares: int) -> None:
        """Best effort: shares only move latency, and the container may be gone."""
        try:
            await engine.set_cpu_shares(self.docker, sandbox.container_id, shares)
        except (*DOCKER_ERRORS, BackendError) as e:
            log.debug("cpu_shares_not_set", sandbox=sandbox.id, error=describe(e))

    async def destroy_sandbox(self, sandbox: DockerSandbox) -> None:
        self._sandboxes.pop(sandbox.container_id, None)
        sandbox.mark_destroyed()
        if sandbox.demotion is not None:  # never left running past its container
            await asyncio.shield(sandbox.demotion)
        await sandbox.channel.close()
        try:
            await self._remove_and_release(sandbox.container_id, sandbox.uid)
        finally:
            self._oom.forget(sandbox.container_id)

    async def _remove_and_release(self, name_or_id: str, uid: int) -> None:
        """Remove the container, then free its uid: no process of it runs any more."""
        await self._containers.remove(name_or_id)
        self._uids.release(uid)

    # --- reaping (reaper.py) ----------------------------------------------

    async def reap_orphans(self) -> int:
        """Remove sandpool containers whose daemon is gone; how many (``Reaper.reap_orphans``)."""
        return await self._reaper.reap_orphans()

    async def sweep(self) -> None:
        """Remove this pool's containers the backend does not track; drop dead idle ones."""
        await self._reaper.sweep(self._sandboxes, self._creating, self.report_died)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.sweep()
                await self.reap_orphans()
            except (*DOCKER_ERRORS, BackendError) as e:
                log.debug("sweep_failed", pool=self.config.name, error=describe(e))

    # --- events ------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        container_id = str(event.get("id", ""))
        action = event.get("Action") or event.get("status")
        sandbox = self._sandboxes.get(container_id)
        if action == "oom":
            self._oom.event(container_id).set()
            if sandbox is not None:
                self.report_oom(sandbox)
        elif action == "die" and sandbox is not None:
            self.report_died(sandbox)
