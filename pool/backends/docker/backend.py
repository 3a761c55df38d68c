"""The Docker backend: hardened single-use containers with a pre-warmed runner.

Each container runs ``pool/runner.py`` as its main process, with stdin open and
no TTY, and is attached when it joins the pool. A request is one frame written
on the attached stream; the result comes back as frames on the same stream.
Measured here: 1.1 ms hand-out to result, against 47-64 ms when the request
ends by closing stdin and the daemon waits for the container to exit (issue 3).

Every Docker call has a timeout: aiodocker's defaults never time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import structlog
from aiodocker.containers import DockerContainer
from aiodocker.stream import Stream
from yarl import URL

from pool import guest
from pool.backends.base import EventListener, RunRequest, RunResult, Sandbox, new_sandbox_id
from pool.config import PoolConfig
from pool.errors import BackendError, SandboxLostError
from pool.protocol import FrameDecoder, ProtocolViolation, decode_exit
from pool.seccomp import docker_profile
from pool.uids import SandboxUids, default_uids
from pool.wire import EXIT, READY, RELAY, WORKDIR, OutputCapture, RunnerArguments, encode_request

log = structlog.get_logger("sandpool.docker")

CALL_TIMEOUT_S = 15.0  # one Docker API call; create+start measured ~134 ms
READY_TIMEOUT_S = 20.0  # container start to the runner's ready frame
# The runner reports a SIGKILLed child (137) before dockerd's oom event may have
# reached us: wait this long for the event before saying "not OOM".
OOM_EVENT_GRACE_S = 0.25
EVENTS_RETRY_S = 1.0
LABEL_POOL = "sandpool.pool"
LABEL_INSTANCE = "sandpool.instance"
# host:pid:start-time of the daemon that made the container: the reaper removes
# a container only when that process is gone, so two daemons sharing one dockerd
# never reap each other's sandboxes.
LABEL_OWNER = "sandpool.owner"
SWEEP_INTERVAL_S = 10.0
DOCKER_SOCKET_URL = "unix:///var/run/docker.sock"
_DOCKER_ERRORS = (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError)


class DockerSandbox(Sandbox):
    def __init__(
        self, sandbox_id: str, container: DockerContainer, stream: Stream, uid: int
    ) -> None:
        super().__init__(sandbox_id)
        self.uid = uid  # host uid and gid of every process in the container
        self.container = container
        self.stream = stream
        self.decoder = FrameDecoder()
        self.pending: deque[tuple[bytes, bytes]] = deque()

    @property
    def container_id(self) -> str:
        return str(self.container.id)


class DockerBackend:
    """Runs one pool's sandboxes as Docker containers."""

    name = "docker"

    def __init__(
        self, config: PoolConfig, instance_id: str, uids: SandboxUids | None = None
    ) -> None:
        self.config = config
        self.instance_id = instance_id
        self._uids = uids or default_uids()
        self.listener: EventListener | None = None
        self._docker: aiodocker.Docker | None = None
        self._guest_dir: Path | None = None  # guest.install(): the runner, bind-mounted read-only
        self._sandboxes: dict[str, DockerSandbox] = {}  # container id -> started, not destroyed
        self._oom: dict[str, asyncio.Event] = {}  # container id -> set on its oom event
        self._tasks: list[asyncio.Task[None]] = []  # event follower and leak sweeper
        self._creating: set[str] = set()  # names of containers not yet in _sandboxes
        self._leak_suspects: set[str] = set()  # untracked at the last sweep
        self._server_version = "unknown"
        self._owner = ""  # owner_label(), read once at start
        self._unremovable_logged: set[str] = set()  # orphans dockerd refused to remove

    # --- lifecycle ---------------------------------------------------------

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            raise BackendError("the Docker backend is not started")
        return self._docker

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
        # The seccomp profile needs libseccomp's syscall table: read it once,
        # off the event loop, and fail here rather than at every container.
        await asyncio.to_thread(docker_profile)
        # An explicit URL: aiodocker's own discovery asserts when no socket exists
        # yet, and a daemon started before dockerd must wait for it, not crash.
        self._docker = aiodocker.Docker(url=os.environ.get("DOCKER_HOST") or DOCKER_SOCKET_URL)
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                version = await self._docker.version()
                self._server_version = str(version.get("Version", "unknown"))
                await self._docker.images.inspect(self.config.image)
            await self.reap_orphans()
        except aiodocker.DockerError as e:
            if e.status == 404:
                await self.close()
                raise BackendError(
                    f"image {self.config.image} not found: build it with `sandpool image build`",
                    code="image_missing",
                ) from None
            log.warning("docker_refused", pool=self.config.name, error=_describe(e))
        except (aiohttp.ClientError, OSError, TimeoutError, BackendError) as e:
            log.warning("docker_unreachable", pool=self.config.name, error=_describe(e))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_events()), loop.create_task(self._sweep())]

    async def close(self) -> None:
        """Stop following events; remove whatever of this pool is still there; disconnect.

        The pool has destroyed its sandboxes by now, but a removal that failed
        while dockerd was down left a container behind: labels find it.
        """
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._docker is not None:
            try:
                for container in await self._list(f"{LABEL_INSTANCE}={self.instance_id}"):
                    if container["Labels"].get(LABEL_POOL) == self.config.name:
                        await self._remove(str(container["Id"]))
            except (*_DOCKER_ERRORS, BackendError) as e:
                log.error("containers_not_removed", pool=self.config.name, error=_describe(e))
            await self._docker.close()
            self._docker = None

    def version(self) -> str:
        return self._server_version

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(2.0):
                # /_ping, not /info: readiness probes come often and /info costs dockerd
                # tens of milliseconds of CPU.
                await self.docker._query_json("_ping", versioned_api=False)
        except (*_DOCKER_ERRORS, BackendError, ValueError):
            return False
        return True

    # --- sandboxes ---------------------------------------------------------

    def container_config(self, uid: int | None = None) -> dict[str, Any]:
        """The hardened container definition; every limit comes from the pool config.

        ``uid`` is the sandbox's own host uid (and gid); without one, the first
        of the range (a definition for the benchmarks).
        """
        c = self.config
        if uid is None:
            uid = self._uids.base
        if not self._owner:  # a definition built before start() (the benchmarks)
            self._owner = owner_label()
        if self._guest_dir is None:  # likewise
            self._guest_dir = guest.install()
        memory = c.memory_mb * 1024 * 1024
        tmpfs_opts = f"rw,nosuid,nodev,noexec,size={c.tmpfs_mb}m"
        host_config: dict[str, Any] = {
            "NetworkMode": "none",
            "PidsLimit": c.pids_limit,
            "Memory": memory,
            "MemorySwap": memory,  # swap equal to memory: no swap at all
            "NanoCpus": int(c.cpus * 1e9),
            "ReadonlyRootfs": True,
            "Tmpfs": {
                "/tmp": f"{tmpfs_opts},mode=1777",
                WORKDIR: f"{tmpfs_opts},uid={uid},gid={uid},mode=0700",
            },
            "CapDrop": ["ALL"],
            # sandpool's own seccomp allowlist, the one the process tier
            # compiles, instead of the engine's default; Docker takes it inline.
            "SecurityOpt": ["no-new-privileges", f"seccomp={docker_profile()}"],
            # The private IPC namespace's /dev/shm (nosuid, nodev, noexec): Docker's
            # own 64 MiB otherwise, whatever tmpfs_mb says.
            "ShmSize": c.tmpfs_mb * 1024 * 1024,
            "IpcMode": "private",
            "Ulimits": [
                {"Name": "core", "Soft": 0, "Hard": 0},
                {"Name": "nofile", "Soft": 1024, "Hard": 1024},
            ],
            # Output reaches the daemon only through the attached stream, so a
            # flood can never fill the host's disk.
            "LogConfig": {"Type": "none", "Config": {}},
            "AutoRemove": False,
            # Read-only whatever the code does: it cannot change the next
            # sandbox's runner (there is none: each container is used once).
            "Mounts": [{
                "Type": "bind", "Source": str(self._guest_dir), "Target": guest.GUEST_DIR,
                "ReadOnly": True,
            }],
        }
        if c.runtime:
            host_config["Runtime"] = c.runtime
        return {
            "Image": c.image,
            "Cmd": [
                "python3", "-I", guest.path_in_sandbox(guest.RUNNER),
                *RunnerArguments(RELAY, c.language).to_argv(),
            ],
            # No user namespace: the uid is the host's, one per sandbox, so no
            # two sandboxes share a per-user kernel quota (pool/uids.py).
            "User": f"{uid}:{uid}",
            "WorkingDir": WORKDIR,
            "Env": [
                "PATH=/usr/local/bin:/usr/bin:/bin",
                "HOME=" + WORKDIR,
                "LANG=C.UTF-8",
                "PYTHONDONTWRITEBYTECODE=1",
            ],
            "Hostname": "sandbox",
            "NetworkDisabled": True,
            "OpenStdin": True,
            "StdinOnce": False,
            "AttachStdin": True,
            "AttachStdout": True,
            "AttachStderr": True,
            "Tty": False,
            "Labels": {
                LABEL_POOL: c.name,
                LABEL_INSTANCE: self.instance_id,
                LABEL_OWNER: self._owner,
            },
            "HostConfig": host_config,
        }

    async def start_sandbox(self) -> DockerSandbox:
        sandbox_id = new_sandbox_id()
        name = f"sandpool-{self.config.name}-{sandbox_id}"
        uid = self._uids.acquire()
        self._creating.add(name)
        try:
            sandbox = await self._start_container(sandbox_id, name, uid)
        finally:
            self._creating.discard(name)
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
        stream: Stream | None = None
        try:
            stream = self._attach(container.id)
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await stream.__aenter__()
                await container.start()
            sandbox = DockerSandbox(sandbox_id, container, stream, uid)
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self._wait_ready(sandbox)
        except BaseException as e:
            if stream is not None:
                await stream.close()
            await asyncio.shield(self._remove_and_release(container.id, uid))
            if isinstance(e, (*_DOCKER_ERRORS, ProtocolViolation)):
                raise BackendError(f"cannot start a container: {_describe(e)}") from None
            raise
        return sandbox

    def _attach(self, container_id: str) -> Stream:
        """The container's stdin/stdout/stderr, attached before it starts.

        aiodocker's own attach() first inspects the container to learn whether
        it has a TTY; ours never does, and the inspect would cost dockerd CPU on
        every start.
        """

        async def setup() -> tuple[URL, bytes | None, bool]:
            query: dict[str, str | int] = {
                "detachKeys": "", "logs": 0, "stdin": 1, "stdout": 1, "stderr": 1, "stream": 1,
            }
            return URL(f"containers/{container_id}/attach").with_query(query), None, False

        return Stream(self.docker, setup, aiohttp.ClientTimeout(connect=CALL_TIMEOUT_S))

    async def _create_container(self, name: str, uid: int) -> DockerContainer:
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                return await self.docker.containers.create(self.container_config(uid), name=name)
        except _DOCKER_ERRORS as e:
            # A create that timed out may still have made the container.
            await self._remove_and_release(name, uid)
            raise BackendError(f"cannot create a container: {_describe(e)}") from None

    async def _wait_ready(self, sandbox: DockerSandbox) -> None:
        frame = await self._next_frame(sandbox)
        if frame is None:
            raise BackendError(
                "the container exited before its runner was ready (is python3 in the image?)"
            )
        if frame[0] != READY:
            raise ProtocolViolation("the runner sent output before it was ready")

    async def _next_frame(self, sandbox: DockerSandbox) -> tuple[bytes, bytes] | None:
        """The next runner frame from the attached stream; None once the stream ends."""
        while not sandbox.pending:
            message = await sandbox.stream.read_out()
            if message is None:
                return None
            if message.stream != 1:
                # The runner's own stderr: only a crashed runner writes there.
                log.debug("runner_stderr", sandbox=sandbox.id, size=len(message.data))
                continue
            sandbox.pending.extend(sandbox.decoder.feed(message.data))
        return sandbox.pending.popleft()

    async def run(self, sandbox: DockerSandbox, request: RunRequest) -> RunResult:
        if not sandbox.alive:
            raise SandboxLostError(f"sandbox {sandbox.id} died while idle")
        began = time.monotonic()
        try:
            await sandbox.stream.write_in(encode_request(request.code, request.stdin))
        except (RuntimeError, ConnectionError, aiohttp.ClientError) as e:
            raise SandboxLostError(f"sandbox {sandbox.id} did not take its request: {e}") from None
        capture = OutputCapture(self.config.max_output_bytes)
        exit_code: int | None = None
        timed_out = ended = False
        try:
            async with asyncio.timeout(request.timeout_s):
                while (frame := await self._next_frame(sandbox)) is not None:
                    kind, payload = frame
                    if kind == EXIT:
                        exit_code = decode_exit(payload)
                        break
                    if kind != READY and not capture.add(kind, payload):
                        break  # over the cap: the pool destroys the sandbox next
                else:
                    ended = True
        except TimeoutError:
            timed_out = True
        except ProtocolViolation:
            # Garbage on the runner's channel: the sandbox is not trustworthy
            # any more; report what was captured and let the pool destroy it.
            log.warning("sandbox_protocol_violation", sandbox=sandbox.id)
        except _DOCKER_ERRORS as e:
            raise BackendError(f"lost the stream of sandbox {sandbox.id}: {_describe(e)}") from None
        execution_s = time.monotonic() - began
        if ended:
            # The runner died without its exit frame (OOM kill, crash): ask Docker.
            exit_code = await self._exit_code(sandbox)
        oom_killed = await self._oom_reported(sandbox, wait=ended or exit_code == 137)
        return RunResult.from_capture(
            capture,
            exit_code=exit_code,
            timed_out=timed_out,
            oom_killed=oom_killed,
            execution_s=execution_s,
        )

    async def _exit_code(self, sandbox: DockerSandbox) -> int:
        """The status Docker saw for a runner that died without its exit frame."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                info = await sandbox.container.wait()
                state = await sandbox.container.show()
        except _DOCKER_ERRORS as e:
            raise BackendError(
                f"sandbox {sandbox.id} died and Docker cannot say why: {_describe(e)}"
            ) from None
        if state["State"].get("OOMKilled"):
            self._oom_event(sandbox.container_id).set()
        return int(info.get("StatusCode", state["State"].get("ExitCode", 0)))

    async def _oom_reported(self, sandbox: DockerSandbox, *, wait: bool) -> bool:
        event = self._oom_event(sandbox.container_id)
        if event.is_set() or not wait:
            return event.is_set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(OOM_EVENT_GRACE_S):
                await event.wait()
        return event.is_set()

    def _oom_event(self, container_id: str) -> asyncio.Event:
        return self._oom.setdefault(container_id, asyncio.Event())

    async def destroy_sandbox(self, sandbox: DockerSandbox) -> None:
        self._sandboxes.pop(sandbox.container_id, None)
        sandbox.mark_destroyed()
        await sandbox.stream.close()
        try:
            await self._remove_and_release(sandbox.container_id, sandbox.uid)
        finally:
            self._oom.pop(sandbox.container_id, None)

    async def _remove_and_release(self, name_or_id: str, uid: int) -> None:
        """Remove the container, then free its uid: no process of it runs any more."""
        await self._remove(name_or_id)
        self._uids.release(uid)

    async def _remove(self, name_or_id: str) -> None:
        """Force-remove a container; one that is already gone is fine."""
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                await self.docker.containers.container(name_or_id).delete(force=True, v=True)
        except aiodocker.DockerError as e:
            if e.status == 404 or e.status == 409:  # gone, or removal already in progress
                return
            raise BackendError(f"cannot remove container {name_or_id}: {e.message}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise BackendError(f"cannot remove container {name_or_id}: {_describe(e)}") from None

    # --- reaping -----------------------------------------------------------

    async def _list(self, label: str) -> list[DockerContainer]:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            containers: list[DockerContainer] = await self.docker.containers.list(
                all=True, filters=json.dumps({"label": [label]})
            )
        return containers

    async def reap_orphans(self) -> int:
        """Remove sandpool containers whose daemon is gone (crashed or SIGKILLed).

        One that dockerd cannot remove (a root filesystem left busy by a dockerd
        restart stays so until reboot) is logged and skipped: it must not keep
        the others. Returns how many were removed; raises BackendError only
        when the containers cannot be listed.
        """
        reaped = 0
        unremovable: dict[str, str] = {}
        for info in await self._list(LABEL_POOL):
            labels = info["Labels"] or {}
            if labels.get(LABEL_INSTANCE) == self.instance_id or owner_alive(
                labels.get(LABEL_OWNER, "")
            ):
                continue
            try:
                await self._remove(str(info["Id"]))
            except BackendError as e:
                unremovable[str(info["Id"])[:12]] = e.message
                continue
            reaped += 1
        if reaped:
            log.info("reaped_orphans", pool=self.config.name, containers=reaped)
        if unremovable and unremovable.keys() != self._unremovable_logged:
            # Once per set, not at every sweep: dockerd says the same each time.
            log.warning("orphans_not_removed", pool=self.config.name, containers=unremovable)
        self._unremovable_logged = set(unremovable)
        return reaped

    async def sweep(self) -> None:
        """Remove this pool's containers the backend does not track; drop dead idle ones."""
        untracked: set[str] = set()
        for info in await self._list(f"{LABEL_INSTANCE}={self.instance_id}"):
            labels = info["Labels"] or {}
            if labels.get(LABEL_POOL) != self.config.name:
                continue
            container_id = str(info["Id"])
            names = [n.lstrip("/") for n in info["Names"] or []]
            sandbox = self._sandboxes.get(container_id)
            if sandbox is None and not self._creating.intersection(names):
                # The listing is a snapshot: a container being destroyed right now
                # looks untracked too. Only one untracked in two sweeps is a leak.
                untracked.add(container_id)
                if container_id in self._leak_suspects:
                    log.warning("leaked_container_removed", pool=self.config.name,
                                container=container_id[:12])
                    await self._remove(container_id)
            elif sandbox is not None and info["State"] != "running" and sandbox.alive:
                self._sandbox_died(sandbox)
        self._leak_suspects = untracked

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self.sweep()
                await self.reap_orphans()
            except (*_DOCKER_ERRORS, BackendError) as e:
                log.debug("sweep_failed", pool=self.config.name, error=_describe(e))

    def _sandbox_died(self, sandbox: DockerSandbox) -> None:
        if sandbox.mark_dead() and self.listener is not None:
            self.listener(sandbox, "died")

    # --- events ------------------------------------------------------------

    async def _watch_events(self) -> None:
        """Follow oom and die events of this pool's containers, reconnecting after outages."""
        filters = json.dumps(
            {
                "type": ["container"],
                "event": ["oom", "die"],
                "label": [
                    f"{LABEL_INSTANCE}={self.instance_id}",
                    f"{LABEL_POOL}={self.config.name}",
                ],
            }
        )
        while True:
            try:
                async with self.docker._query(
                    "events",
                    method="GET",
                    params={"filters": filters},
                    timeout=aiohttp.ClientTimeout(total=None, sock_read=None, connect=5.0),
                ) as response, response:  # the inner `with` releases the stream
                    async for line in response.content:
                        if line.strip():
                            self._on_event(json.loads(line))
            except (*_DOCKER_ERRORS, ValueError) as e:
                log.debug("docker_events_reconnect", pool=self.config.name, error=_describe(e))
            await asyncio.sleep(EVENTS_RETRY_S)

    def _on_event(self, event: dict[str, Any]) -> None:
        container_id = str(event.get("id", ""))
        action = event.get("Action") or event.get("status")
        sandbox = self._sandboxes.get(container_id)
        if action == "oom":
            self._oom_event(container_id).set()
            if self.listener is not None and sandbox is not None:
                self.listener(sandbox, "oom")
        elif action == "die" and sandbox is not None:
            self._sandbox_died(sandbox)


def _process_start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot; None if it is gone.

    Raises OSError when the answer cannot be read (EMFILE, EACCES): that proves
    nothing about the process, so callers must not take it for "gone".
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat_line = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 22, counted after the parenthesised command name, which may hold spaces.
    fields = stat_line.rpartition(")")[2].split()
    if len(fields) < 20:
        raise OSError(f"cannot parse /proc/{pid}/stat")
    return fields[19]


def _boot_id() -> str:
    """This boot's id. Raises OSError when it cannot be read."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    if not boot_id:
        raise OSError("empty /proc/sys/kernel/random/boot_id")
    return boot_id


def _pid_namespace() -> str:
    """This process's pid namespace inode (readlink: needs no file descriptor)."""
    return os.readlink("/proc/self/ns/pid").removeprefix("pid:[").rstrip("]")


def owner_label() -> str:
    """This daemon as host:boot-id:pid-namespace:pid:start-time.

    The start time guards against pid reuse, the boot id against a reboot, and
    the namespace against a daemon in a container that shares dockerd and the
    hostname, whose pids mean nothing here. Raises OSError when part of the
    identity cannot be read: a container must never carry a label that a
    reaper could later misjudge.
    """
    pid = os.getpid()
    start_time = _process_start_time(pid)
    if start_time is None:
        raise OSError("cannot read this process's own start time")
    return ":".join((socket.gethostname(), _boot_id(), _pid_namespace(), str(pid), start_time))


def owner_alive(label: str) -> bool:
    """Whether the daemon named by an owner label may still run.

    False only when its death is proven: a label from before this boot, or a
    pid that is gone or now belongs to a process started at another time (and
    a container no daemon ever claimed: no or a malformed label). True for
    another host or pid namespace, and whenever the proof fails (EMFILE, an
    unreadable /proc): a reaper that guessed "dead" would delete a live
    daemon's sandboxes.
    """
    parts = label.split(":")
    if len(parts) != 5:
        return False  # no owner label or an unknown format: nobody claims it
    host, boot_id, pid_namespace, pid, start_time = parts
    if host != socket.gethostname():
        return True
    try:
        if boot_id != _boot_id():
            return False  # the host rebooted since: that daemon is gone
        if pid_namespace != _pid_namespace():
            return True
        if not pid.isdigit():
            return False  # not a label any daemon wrote
        return _process_start_time(int(pid)) == start_time
    except OSError as e:
        log.warning("owner_unknown", owner=label, error=str(e), verdict="alive")
        return True


def _describe(error: BaseException) -> str:
    if isinstance(error, aiodocker.DockerError):
        return str(error.message)
    if isinstance(error, TimeoutError):
        return "Docker did not answer in time"
    return str(error) or type(error).__name__
