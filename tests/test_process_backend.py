"""The process backend's lock-down and process hygiene.

What any sandbox must do runs from test_behaviour.py against the
``python-process`` pool too; here is what is specific to bubblewrap: the
isolation as seen from inside (through the real daemon), and the host's view of
the process trees (against the backend directly, which knows their pids).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import textwrap
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from api.client import Client
from pool.backends.base import RunRequest, Sandbox, SandboxEvent
from pool.backends.process import ProcessBackend, ProcessSandbox, definition
from pool.backends.process import cgroups as process_cgroups
from pool.backends.process import cpu as process_cpu
from pool.backends.process.cgroups import set_pool_cpu
from pool.config import PoolConfig
from pool.errors import BackendError, SandboxLostError
from pool.uids import SandboxUids
from tests.support import host_processes_with, start_daemon, stop_daemon, wait_until

POOL = "python-process"


def run(client: Client, code: str, **options: object) -> dict[str, object]:
    return client.run(textwrap.dedent(code), pool=POOL, **options)  # type: ignore[arg-type]


# --- seen from inside, through the daemon -----------------------------------


def test_no_network_but_loopback(sandboxed: Client) -> None:
    result = run(sandboxed, """
        import socket
        print(sorted(name for _, name in socket.if_nameindex()))
        try:
            socket.create_connection(("1.1.1.1", 53), timeout=2)
            print("tcp connected")
        except OSError:
            print("tcp blocked")
        try:
            socket.getaddrinfo("deb.debian.org", 80)
            print("dns resolved")
        except OSError:
            print("dns blocked")
    """)
    assert result["stdout"] == "['lo']\ntcp blocked\ndns blocked\n"


def test_host_filesystem_is_invisible_or_read_only(sandboxed: Client) -> None:
    result = run(sandboxed, """
        import os
        print(sorted(os.listdir("/etc")))
        hidden = ("/root", "/home", "/work", "/var", "/run", "/var/run/docker.sock", "/sys")
        print([path for path in hidden if os.path.exists(path)])
        for path in ("/evil", "/etc/evil", "/usr/bin/evil", "/dev/evil"):
            try:
                open(path, "w")
                print("wrote", path)
            except OSError as e:
                print(e.errno)
    """)
    etc, visible, *errors = str(result["stdout"]).splitlines()
    # The image's /etc (the Docker tier's too), never the host's: this host has
    # Docker's and containerd's configuration, the image has neither.
    assert "'debian_version'" in etc
    assert "'docker'" not in etc
    assert "'containerd'" not in etc
    assert visible == "[]"
    assert errors == ["30"] * 4  # EROFS everywhere but the tmpfs mounts


@pytest.mark.parametrize("directory", ["/tmp", "/dev/shm", "/sandbox"])
def test_scratch_space_is_writable_and_bounded(sandboxed: Client, directory: str) -> None:
    result = run(sandboxed, f"""
        import errno
        written = 0
        try:
            with open("{directory}/big", "wb") as f:
                while True:
                    f.write(b"x" * 2**20)
                    f.flush()
                    written += 1
        except OSError as e:
            print(e.errno in (errno.ENOSPC, errno.EFBIG), written)
    """, timeout_s=15)
    full, mib = str(result["stdout"]).split()
    assert full == "True"
    assert 1 <= int(mib) <= 16  # tmpfs_mb


def test_runs_as_nobody_without_privileges(sandboxed: Client) -> None:
    result = run(sandboxed, """
        import os
        print(os.getuid(), os.getgid(), os.getgroups())
        wanted = ("CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp:")
        print("".join(line for line in open("/proc/self/status") if line.startswith(wanted)))
    """)
    lines = str(result["stdout"]).splitlines()
    assert lines[0] == "65534 65534 []"
    assert "CapEff:\t0000000000000000" in lines
    assert "CapPrm:\t0000000000000000" in lines
    assert "CapBnd:\t0000000000000000" in lines
    assert "NoNewPrivs:\t1" in lines
    assert "Seccomp:\t2" in lines  # a filter is installed


def test_seccomp_blocks_what_a_sandbox_never_needs(sandboxed: Client) -> None:
    result = run(sandboxed, """
        import ctypes, errno, os, subprocess, threading
        libc = ctypes.CDLL(None, use_errno=True)
        def err(rc):
            return errno.errorcode.get(ctypes.get_errno(), "?") if rc == -1 else "allowed"
        print("ptrace", err(libc.ptrace(0, 0, None, None)))  # PTRACE_TRACEME: no capability needed
        print("mount", err(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)))
        print("unshare", err(libc.unshare(0)))  # a no-op the kernel allows anyone
        print("userns", err(libc.unshare(0x10000000)))
        print("clone3", err(libc.syscall(435, None, 0)))
        # What ordinary programs do still works: threads and subprocesses.
        t = threading.Thread(target=print, args=("thread ok",)); t.start(); t.join()
        echo = subprocess.run(["echo", "subprocess ok"], capture_output=True, text=True)
        print(echo.stdout, end="")
    """)
    assert str(result["stdout"]).splitlines() == [
        # Off the allowlist: ENOSYS, as from a kernel without the call
        # (pool/seccomp.py; tests/security/test_seccomp_policy.py has the rest).
        "ptrace ENOSYS",
        "mount ENOSYS",
        "unshare ENOSYS",
        "userns ENOSYS",
        "clone3 ENOSYS",  # so glibc falls back to clone(), whose flags the filter sees
        "thread ok",
        "subprocess ok",
    ]


def test_rlimits_come_from_the_pool_config(sandboxed: Client) -> None:
    result = run(sandboxed, """
        import resource as r
        for name in ("NPROC", "NOFILE", "CORE", "CPU", "FSIZE"):
            print(name, *r.getrlimit(getattr(r, "RLIMIT_" + name)))
    """)
    assert str(result["stdout"]).splitlines() == [
        "NPROC 64 64",  # pids_limit
        "NOFILE 1024 1024",
        "CORE 0 0",
        "CPU 21 22",  # max_timeout_s + 1: the daemon's clock always comes first
        f"FSIZE {16 * 2**20} {16 * 2**20}",  # tmpfs_mb
    ]


def test_a_detached_process_does_not_survive_the_request(sandboxed: Client) -> None:
    marker = f"sandpool-test-{uuid.uuid4().hex}"
    result = run(sandboxed, f"""
        import subprocess
        subprocess.Popen(["sh", "-c", "exec sleep 1000 {marker}"], start_new_session=True)
        print("started")
    """)
    assert result["stdout"] == "started\n"
    # The result is back; the pool destroys the sandbox right after. The
    # sleeper must disappear from the host's process list (zombies are checked
    # against the backend below: their command line is empty).
    wait_until(lambda: not host_processes_with(marker), "the sleeper to go", timeout_s=10)


def test_a_killed_daemon_takes_its_sandboxes_along(tmp_path: Path) -> None:
    config = """
        [server]
        metrics_address = "off"

        [pools.python-process]
        backend = "process"
        min_idle = 2
    """
    (tmp_path / "crashed").mkdir()
    (tmp_path / "successor").mkdir()
    crashed = start_daemon(tmp_path / "crashed", config)
    sandboxes = process_tree(crashed.process.pid) - process_tree_root(crashed.process.pid)
    assert len(sandboxes) >= 4  # two parked sandboxes: bwrap and the runner each
    cgroups = daemon_cgroups(crashed.process.pid)
    crashed.process.kill()
    crashed.process.wait()
    # --die-with-parent: nothing of the sandboxes outlives the daemon.
    wait_until(lambda: not sandboxes & host_processes(), "the sandboxes to go", timeout_s=10)
    # The next daemon sweeps the cgroups the killed one could not remove.
    successor = start_daemon(tmp_path / "successor", config)
    try:
        assert [path for path in cgroups if path.exists()] == []
    finally:
        stop_daemon(successor)


# --- seen from the host, against the backend --------------------------------


@pytest.fixture
async def backend() -> AsyncIterator[ProcessBackend]:
    name = f"t{uuid.uuid4().hex[:8]}"
    config = PoolConfig(name=name, backend="process", timeout_s=5, max_timeout_s=20)
    started = ProcessBackend(config, instance_id=uuid.uuid4().hex[:12])
    await started.start()
    try:
        yield started
    finally:
        await started.close()


@pytest.fixture
async def sandbox(backend: ProcessBackend) -> AsyncIterator[ProcessSandbox]:
    started = await backend.start_sandbox()
    try:
        yield started
    finally:
        await backend.destroy_sandbox(started)


def request(code: str, timeout_s: float = 5.0) -> RunRequest:
    return RunRequest(code=textwrap.dedent(code), stdin="", timeout_s=timeout_s)


LEAVE_PROCESSES_BEHIND = textwrap.dedent("""
    import os, subprocess, time
    subprocess.Popen(["sleep", "1000"], start_new_session=True)
    if os.fork() == 0:  # a double-forked daemon, orphaned inside the sandbox
        if os.fork() == 0:
            time.sleep(1000)
        os._exit(0)
    time.sleep(0.2)
    print("left", flush=True)
""")


async def test_sandbox_is_not_root_on_the_host(sandbox: ProcessSandbox) -> None:
    # The kernel exempts real uid 0 from RLIMIT_NPROC, so the tree must not run as it.
    assert sandbox.runner_pid is not None
    # As root, a uid of the sandbox's own from the range; else the daemon's.
    expected = str(sandbox.host_uid if os.geteuid() == 0 else os.geteuid())
    if os.geteuid() == 0:
        assert sandbox.host_uid in SandboxUids()
    for pid in (sandbox.bwrap_pid, sandbox.runner_pid):
        assert host_uids(pid) == [expected] * 4  # real, effective, saved, filesystem


async def test_destroy_leaves_nothing_in_the_host_process_list(
    backend: ProcessBackend, sandbox: ProcessSandbox
) -> None:
    result = await backend.run(sandbox, request(LEAVE_PROCESSES_BEHIND))
    assert result.stdout == b"left\n"
    tree = process_tree(sandbox.bwrap_pid)
    assert len(tree) >= 5  # bwrap, runner, the code, the sleeper, the orphan
    await backend.destroy_sandbox(sandbox)
    assert tree & host_processes() == set()  # gone by the time destroy returns, zombies too


async def test_timeout_kills_the_whole_tree_at_once(
    backend: ProcessBackend, sandbox: ProcessSandbox
) -> None:
    code = LEAVE_PROCESSES_BEHIND + "\nwhile True: pass\n"
    result = await backend.run(sandbox, request(code, timeout_s=1))
    assert result.timed_out is True
    assert result.exit_code is None
    assert result.stdout == b"left\n"
    # Not waiting for the pool's destroy: run() itself killed the tree.
    tree = {p for p in process_tree(sandbox.bwrap_pid) if p[0] != sandbox.bwrap_pid}
    await async_wait_until(lambda: not tree & host_processes())


async def test_a_sandbox_that_dies_idle_is_reported_and_never_used(
    backend: ProcessBackend, sandbox: ProcessSandbox
) -> None:
    events: list[tuple[Sandbox, SandboxEvent]] = []
    backend.listener = lambda box, event: events.append((box, event))
    assert sandbox.runner_pid is not None
    os.kill(sandbox.runner_pid, signal.SIGKILL)
    await async_wait_until(lambda: events == [(sandbox, "died")])
    assert sandbox.alive is False
    with pytest.raises(SandboxLostError):
        await backend.run(sandbox, request("print(1)"))


async def test_destroy_is_idempotent(backend: ProcessBackend, sandbox: ProcessSandbox) -> None:
    tree = process_tree(sandbox.bwrap_pid)
    await asyncio.gather(backend.destroy_sandbox(sandbox), backend.destroy_sandbox(sandbox))
    await backend.destroy_sandbox(sandbox)
    assert tree & host_processes() == set()


LIMIT_FILES = ("memory.limit_in_bytes", "memory.max", "pids.max", "cpu.cfs_quota_us", "cpu.max")


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon creates cgroups only as root")
async def test_cgroup_holds_the_tree_with_the_pool_limits(
    backend: ProcessBackend, sandbox: ProcessSandbox
) -> None:
    assert sandbox.cgroup is not None
    directories = list(sandbox.cgroup.dirs)
    limits = {
        name: path.read_text().strip()
        for directory in directories
        for name in LIMIT_FILES
        if (path := directory / name).exists()
    }
    assert limits.get("memory.limit_in_bytes", limits.get("memory.max")) == str(128 * 2**20)
    if "pids.max" in limits:
        assert limits["pids.max"] == "64"
    # cpus = 0.5, in force by hand-out (not during the runner's own start-up)
    if "cpu.cfs_quota_us" in limits:
        assert limits["cpu.cfs_quota_us"] == "50000"
    if "cpu.max" in limits:
        assert limits["cpu.max"] == "50000 100000"
    procs = {int(pid) for pid in (directories[0] / "cgroup.procs").read_text().split()}
    assert {sandbox.bwrap_pid, sandbox.runner_pid} <= procs  # born inside, not moved later
    await backend.destroy_sandbox(sandbox)
    assert [d for d in directories if d.exists()] == []


def pool_cpu_weight(backend: ProcessBackend) -> int | None:
    """The pool directory's cpu.shares (v1) or cpu.weight (v2); None without a cpu controller."""
    for pool_dir in pool_directories(backend):
        for file_name in ("cpu.shares", "cpu.weight"):
            if (path := pool_dir / file_name).exists():
                return int(path.read_text())
    return None


def test_pool_weights_per_cgroup_version_within_the_kernels_range(tmp_path: Path) -> None:
    for directory in ("v1", "v2", "memory"):
        (tmp_path / directory).mkdir()
    v1 = process_cgroups.CgroupTree(1, {"cpu": tmp_path / "v1", "memory": tmp_path / "memory"})
    v2 = process_cgroups.CgroupTree(2, {"unified": tmp_path / "v2"})
    weights = []
    for tree, weight, written in ((v1, 3, "v1/cpu.shares"), (v1, 10**6, "v1/cpu.shares"),
                                  (v2, 4, "v2/cpu.weight"), (v2, 10**6, "v2/cpu.weight")):
        process_cgroups.set_pool_cpu(tree, weight, False, was_idle=False)
        weights.append((tmp_path / written).read_text())
    assert weights == ["3072", "262144", "400", "10000"]
    assert not (tmp_path / "v1" / "cpu.idle").exists()  # never idle: the flag left alone
    # No cpu controller (v1 without the cpu hierarchy): nothing to weigh, nothing written.
    process_cgroups.set_pool_cpu(
        process_cgroups.CgroupTree(1, {"memory": tmp_path / "memory"}), 1, True, was_idle=False)
    assert list((tmp_path / "memory").iterdir()) == []


def test_an_idle_pool_writes_its_flag_alone_and_clears_it_before_its_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel refuses a weight for an idle cgroup, and resets it on clearing."""
    tree = process_cgroups.CgroupTree(1, {"cpu": tmp_path})
    (tmp_path / "cpu.idle").write_text("0")
    written: list[str] = []
    real_write = Path.write_text

    def write(path: Path, value: str) -> int:
        written.append(f"{path.name}={value}")
        return real_write(path, value)

    monkeypatch.setattr(Path, "write_text", write)
    process_cgroups.set_pool_cpu(tree, 1, True, was_idle=False)
    process_cgroups.set_pool_cpu(tree, 2, False, was_idle=True)
    assert written == ["cpu.idle=1", "cpu.idle=0", "cpu.shares=2048"]
    # A kernel without cpu.idle (before 5.15): the weight alone, one process's.
    (tmp_path / "cpu.idle").unlink()
    written.clear()
    process_cgroups.set_pool_cpu(tree, 1, True, was_idle=False)
    process_cgroups.set_pool_cpu(tree, 2, False, was_idle=True)
    assert written == ["cpu.shares=1024", "cpu.shares=2048"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon creates cgroups only as root")
async def test_a_start_weighs_its_pool_as_one_more_process_while_it_lasts(
    backend: ProcessBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    at_rest = pool_cpu_weight(backend)
    if at_rest is None:
        pytest.skip("no cpu controller here")
    during: list[int | None] = []
    spawn = backend._spawn

    async def spawn_and_look(*args: Any) -> ProcessSandbox:
        during.append(pool_cpu_weight(backend))
        return await spawn(*args)

    monkeypatch.setattr(backend, "_spawn", spawn_and_look)
    first, second = await asyncio.gather(backend.start_sandbox(), backend.start_sandbox())
    try:
        one = at_rest  # nothing starting: the default, one process's weight
        assert one in (1024, 100)
        # Each spawn saw at least its own start counted, and the two together at most.
        assert all(weight in (2 * one, 3 * one) for weight in during), during
        assert pool_cpu_weight(backend) == one  # back once both are ready
    finally:
        for started in (first, second):
            await backend.destroy_sandbox(started)


def pool_cpu_idle(backend: ProcessBackend) -> str | None:
    """The pool directory's cpu.idle; None without one (no cpu controller, Linux < 5.15)."""
    for pool_dir in pool_directories(backend):
        if (path := pool_dir / "cpu.idle").exists():
            return path.read_text().strip()
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon creates cgroups only as root")
async def test_a_busy_pools_refill_stays_behind_its_flag_until_a_request_waits(
    backend: ProcessBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the kernel's files: the refill a busy run leaves does not hand the busy
    code its pool's standing, but a start that a request waits for gets it."""
    if pool_cpu_idle(backend) is None:
        pytest.skip("no cpu.idle here")
    one = pool_cpu_weight(backend)  # nothing starting or running: one process's
    assert one in (1024, 100)
    busy = await backend.start_sandbox()
    running = asyncio.ensure_future(backend.run(busy, request("while True: pass", timeout_s=30)))
    seen: list[tuple[str | None, int | None]] = []  # (cpu.idle, weight) as each spawn began
    spawn = backend._spawn

    async def spawn_and_look(*args: Any) -> ProcessSandbox:
        seen.append((pool_cpu_idle(backend), pool_cpu_weight(backend)))
        return await spawn(*args)

    monkeypatch.setattr(backend, "_spawn", spawn_and_look)
    started: list[ProcessSandbox] = []
    try:
        await asyncio.to_thread(wait_until, lambda: pool_cpu_idle(backend) == "1",
                                "the busy run's pool is idle")
        started.append(await backend.start_sandbox())  # a refill nobody waits for
        backend.requests_waiting(True)
        started.append(await backend.start_sandbox())  # one a request waits for
        backend.requests_waiting(False)
        assert seen[0][0] == "1"  # the kernel's weight of an idle cgroup is its own
        assert seen[1] == ("0", 2 * one)
        assert len(seen) == 2
        await asyncio.to_thread(wait_until, lambda: pool_cpu_idle(backend) == "1",
                                "idle again once nothing is wanted")
    finally:
        for sandbox in (busy, *started):
            await backend.destroy_sandbox(sandbox)
        with contextlib.suppress(BackendError, SandboxLostError):  # its sandbox went
            await running


@pytest.mark.skipif(os.geteuid() != 0, reason="finds the tree by its cgroup, made only as root")
@pytest.mark.parametrize("delay_s", [0, 0.0002, 0.0005, 0.001, 0.003, 0.01, 0.03, 0.06, 0.12, 0.25])
async def test_a_cancelled_start_leaves_nothing(backend: ProcessBackend, delay_s: float) -> None:
    starting = asyncio.ensure_future(backend.start_sandbox())
    await asyncio.sleep(delay_s)  # somewhere in cgroup creation, spawn or readiness
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):  # we cancelled it ourselves
        await backend.destroy_sandbox(await starting)  # or it won the race: fine too
    # A cgroup leaked by an abandoned worker thread would appear within this.
    await asyncio.sleep(0.2)
    assert backend_cgroup_members(backend) == []
    assert sandbox_cgroups(backend) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="finds the tree by its cgroup, made only as root")
async def test_a_start_cancelled_while_its_pool_stands_back_leaves_nothing(
    backend: ProcessBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start is done, and its pool's weight goes back (a kernfs write, in a
    thread) when the cancel comes: nobody will receive the sandbox, so it goes."""
    standing_back = threading.Event()

    def slow_set_pool_cpu(tree: Any, weight: int, idle: bool, *, was_idle: bool) -> None:
        if weight == 1:  # the start's weight taken off again
            standing_back.set()
            time.sleep(0.3)
        set_pool_cpu(tree, weight, idle, was_idle=was_idle)

    monkeypatch.setattr(process_cpu, "set_pool_cpu", slow_set_pool_cpu)
    starting = asyncio.ensure_future(backend.start_sandbox())
    async with asyncio.timeout(10):
        while not standing_back.is_set():
            await asyncio.sleep(0.005)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    await asyncio.sleep(0.2)
    assert repr(backend).endswith("sandboxes=0>")
    assert backend_cgroup_members(backend) == []
    assert sandbox_cgroups(backend) == []


async def test_missing_interpreter_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(definition, "INTERPRETER", "/usr/bin/no-such-python3")
    backend = ProcessBackend(PoolConfig(name="broken", backend="process"), "broken")
    with pytest.raises(BackendError, match="image has no /usr/bin/no-such-python3") as raised:
        await backend.start()
    assert raised.value.code == "python_missing"


# --- the host's process list ------------------------------------------------

Process = tuple[int, int]  # pid and start time: a pid alone may be reused


def host_processes() -> set[Process]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat is not None:
                found.add((int(entry), int(stat[19])))
    return found


def host_uids(pid: int) -> list[str]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(line.split()[1:] for line in status if line.startswith("Uid:"))


def read_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state is [0], ppid [1])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> set[Process]:
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := read_stat(int(entry))) is not None:
            children.setdefault(int(stat[1]), []).append(int(entry))
            starts[int(entry)] = int(stat[19])
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree.add((pid, starts[pid]))
        todo.extend(children.get(pid, []))
    return tree


def process_tree_root(pid: int) -> set[Process]:
    stat = read_stat(pid)
    return set() if stat is None else {(pid, int(stat[19]))}


def daemon_cgroups(daemon_pid: int) -> list[Path]:
    """The cgroup directories a daemon made for its process pools (root only)."""
    return [
        path
        for controller, own in process_cgroups.own_cgroups().items()
        if controller
        for path in (process_cgroups.CGROUP_ROOT / controller / own.lstrip("/")).glob(
            f"sandpool-{daemon_pid}-*"
        )
    ]


async def test_a_sandbox_whose_destroy_gave_up_goes_with_its_pool() -> None:
    """A destroy gives up when its sandbox's processes outlast RMDIR_ATTEMPTS (a
    fork bomb on a host starved of CPU): its directory stays, and so did the
    pool's until the next daemon's sweep. Closing the pool kills what is left
    and removes both; planted as a sandbox is, in every one of its directories."""
    name = f"t{uuid.uuid4().hex[:8]}"
    backend = ProcessBackend(PoolConfig(name=name, backend="process"),
                             instance_id=uuid.uuid4().hex[:12])
    await backend.start()
    leftover = await asyncio.create_subprocess_exec("sleep", "300")
    planted = [directory / "given-up" for directory in pool_directories(backend)]
    try:
        for directory in planted:
            directory.mkdir()
            (directory / "cgroup.procs").write_text(str(leftover.pid))
        with structlog.testing.capture_logs() as logs:
            await backend.close()
        assert await asyncio.wait_for(leftover.wait(), 10) == -signal.SIGKILL
        assert pool_directories(backend) == []
        killed = sorted((e["path"], e["processes"]) for e in logs
                        if e["event"] == "pool_leftover_killed")
        assert killed == sorted((str(d), [f"{leftover.pid} sleep"]) for d in planted)
    finally:
        if leftover.returncode is None:
            leftover.kill()
            await leftover.wait()
        await backend.close()
        for directory in (*planted, *(d.parent for d in planted)):  # a close that failed
            with contextlib.suppress(OSError):
                directory.rmdir()


def backend_cgroup_members(backend: ProcessBackend) -> list[int]:
    """Host pids whose cgroup is one of this backend's, by /proc/PID/cgroup."""
    name = process_cgroups.cgroup_dir_name(backend.config.name, backend.instance_id)
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cgroups = Path(f"/proc/{entry}/cgroup").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if f"/{name}/" in cgroups:
                members.append(int(entry))
    return members


def pool_directories(backend: ProcessBackend) -> list[Path]:
    """This backend's pool directories: one per v1 controller, or the v2 one."""
    name = process_cgroups.cgroup_dir_name(backend.config.name, backend.instance_id)
    return [
        pool_dir
        for controller, own in process_cgroups.own_cgroups().items()
        for pool_dir in (process_cgroups.CGROUP_ROOT / controller / own.lstrip("/")).glob(name)
    ]


def sandbox_cgroups(backend: ProcessBackend) -> list[Path]:
    """The sandbox cgroup directories below this backend's pool directories."""
    return [
        sandbox_dir
        for pool_dir in pool_directories(backend)
        for sandbox_dir in pool_dir.iterdir()
        if sandbox_dir.is_dir()
    ]


async def async_wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def test_garbage_on_the_status_pipe_is_a_violation_keeping_the_output(
    backend: ProcessBackend, sandbox: ProcessSandbox
) -> None:
    # The code can find its status pipe, which carries framed outcome and
    # status: bytes there that are not frames end the run with no exit code
    # (the pool destroys the sandbox), and the output before them is kept.
    result = await backend.run(sandbox, request("""
        import os, sys
        print("out", flush=True)
        for fd in map(int, os.listdir("/proc/self/fd")):
            if fd > 2:
                try:
                    os.write(fd, b"xy")
                except OSError:
                    pass
        os._exit(7)
    """))
    assert (result.exit_code, result.stdout) == (None, b"out\n")
    assert not result.timed_out


async def test_a_run_ends_at_the_status_while_a_leftover_keeps_writing(
    backend: ProcessBackend, sandbox: ProcessSandbox
) -> None:
    # The stdout pipe never reaches EOF (a process the code left behind holds
    # it and keeps writing): the run still ends at the code's status.
    result = await backend.run(sandbox, request("""
        import os, time
        if os.fork() == 0:
            while True:
                os.write(1, b"x" * 100)
                time.sleep(0.001)
        print("done", flush=True)
    """))
    assert result.exit_code == 0
    assert b"done\n" in result.stdout


def test_a_dead_daemons_leftover_sandbox_process_is_killed_with_its_cgroup() -> None:
    """A sandbox that was starting when its daemon was SIGKILLed has no parent-death
    signal yet (bwrap's child mid-setup) and outlives it; the next daemon's sweep kills
    what is left in a dead daemon's sandbox cgroups, then removes them. A live daemon's
    are left alone."""
    own = process_cgroups.own_cgroups()
    if "memory" not in own:
        pytest.skip("no cgroup v1 memory hierarchy here")
    base = process_cgroups.CGROUP_ROOT / "memory" / own["memory"].lstrip("/")
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)  # a pid that no process has now: the "dead daemon"
    stale = base / f"sandpool-{dead}-{uuid.uuid4().hex[:12]}-p" / "sandbox"
    live = base / f"sandpool-{os.getpid()}-{uuid.uuid4().hex[:12]}-p" / "sandbox"
    orphans = []
    try:
        for directory in (stale, live):
            directory.mkdir(parents=True)
            orphan = subprocess.Popen(["sleep", "300"])
            orphans.append(orphan)
            (directory / "cgroup.procs").write_text(str(orphan.pid))
        with structlog.testing.capture_logs() as logs:
            process_cgroups.sweep_stale_cgroups(base)
        assert orphans[0].wait(timeout=10) == -signal.SIGKILL
        killed = [(e["path"], e["processes"]) for e in logs
                  if e["event"] == "stale_sandbox_killed"]
        assert killed == [(str(stale), [f"{orphans[0].pid} sleep"])]
        assert not stale.parent.exists()
        assert orphans[1].poll() is None  # its daemon (this test) is alive
        assert live.exists()
    finally:
        for orphan in orphans:
            orphan.kill()
            orphan.wait()
        for directory in (stale, live):
            for path in (directory, directory.parent):
                with contextlib.suppress(OSError):
                    path.rmdir()
