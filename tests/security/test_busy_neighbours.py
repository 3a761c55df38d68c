"""A busy run yields the CPU to everything else, in every tier.

A run still going ``BUSY_AFTER_S`` after its request is busy. A process or
fork sandbox then goes to ``cpu.idle`` at both levels of the cgroup tree: its
own cgroup among its pool's sandboxes, and its pool's among the other pools and
the daemon while the pool runs nothing else. So does a Docker container where
its pool has a cgroup of its own (this host's dockerd, cgroupfs, v1:
pool/backends/docker/cgroup.py); where the engine keeps the containers, a busy
one gets the least CPU shares. A wasm guest's thread goes to SCHED_IDLE
(tests/security/test_wasm_limits.py) and, out of the daemon's weighted cgroup,
to one of a process's weight (pool/daemon_cpu.py). Each level is checked by what it does:
a process beside the busy sandbox, pinned to the same core, gets that core. A
check of the sandbox's own flag would pass with the pool's level gone, and then
a busy sandbox competes as an equal with every other pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from api.client import Client
from pool.backends.process.cgroups import CGROUP_ROOT, daemon_group_name, own_cgroups, unified_host
from pool.daemon_cpu import DAEMON_WEIGHT
from tests.support import (
    SCHED_IDLE,
    Daemon,
    docker_containers,
    docker_socket_relay,
    one_guest_config,
    pool_cgroup_dir,
    stop_daemon,
    task_stats,
    wait_until,
)

Spawn = Callable[..., Daemon]

# Pinned to core 0 and spinning for 3 s, it reports (monotonic, CPU time)
# every 20 ms: the clocks are the host's (a sandbox has no time namespace).
BUSY = """
import json, os, time
os.sched_setaffinity(0, {0})
samples = []
began = time.monotonic()
while (now := time.monotonic()) - began < 3.0:
    if not samples or now - samples[-1][0] >= 0.02:
        samples.append((now, time.process_time()))
print(json.dumps(samples))
"""

# The neighbour: an ordinary host process on the same core for 1.5 s.
NEIGHBOUR = """
import os, time
os.sched_setaffinity(0, {0})
began = time.monotonic()
while time.monotonic() - began < 1.5:
    pass
print(began, time.monotonic(), time.process_time())
"""


def pool_cpu_dir(daemon: Daemon, pool: str) -> Path | None:
    """The pool's cgroup directory holding cpu.idle (v1 cpu hierarchy or v2); None without."""
    found = pool_cgroup_dir(daemon, pool)
    return found if found is not None and (found / "cpu.idle").exists() else None


def idle(directory: Path) -> bool:
    return (directory / "cpu.idle").read_text().strip() == "1"


def cpu_between(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """CPU seconds the sandbox used between two instants of the monotonic clock."""
    def at(instant: float) -> float:
        before = [cpu for when, cpu in samples if when <= instant]
        return before[-1] if before else samples[0][1]
    return at(end) - at(start)


def docker_keeps_the_containers() -> str:
    """Why this host's Docker pools would not get cgroups of their own, read here
    from the host rather than from the daemon's own test (cgroup.py's ``refused``);
    "" where they should."""
    if "cpu" not in own_cgroups() or unified_host():
        return "no cgroup v1 cpu hierarchy"
    engine = subprocess.run(
        ["docker", "info", "--format", "{{.CgroupDriver}} v{{.CgroupVersion}}"],
        capture_output=True, text=True, timeout=30,
    ).stdout.strip()
    if engine != "cgroupfs v1":
        return f"the engine's cgroups are {engine or 'unknown'}"
    if os.environ.get("DOCKER_HOST"):
        return "DOCKER_HOST names another engine"
    return ""


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon makes cgroups only as root")
@pytest.mark.skipif(os.cpu_count() == 1, reason="the busy sandbox and the test share the core")
@pytest.mark.parametrize("pool", ["python-process", "python-fork",
                                  pytest.param("python", marks=pytest.mark.docker)])
def test_a_busy_sandbox_leaves_its_core_to_a_process_of_another_cgroup(
    daemon: Daemon, client: Client, pool: str
) -> None:
    if pool == "python" and (why := docker_keeps_the_containers()):
        pytest.skip(f"the engine keeps the Docker pool's containers: {why}")
    directory = pool_cpu_dir(daemon, pool)
    if directory is None and pool == "python":
        raise AssertionError("the Docker pool has no cgroup of its own on this host")
    if directory is None:
        pytest.skip("no cpu.idle here (cgroup without a cpu controller, or a kernel before 5.15)")
    answers: list[dict[str, object]] = []
    busy = threading.Thread(target=lambda: answers.append(
        client.run(BUSY, pool=pool, timeout_s=10)))
    busy.start()
    try:
        wait_until(lambda: idle(directory) and any(idle(d) for d in directory.iterdir()
                                                   if d.is_dir() and d.name != "template"),
                   f"{pool}'s cgroup and the busy sandbox's are idle", timeout_s=10)
        neighbour = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(NEIGHBOUR)],
            check=True, capture_output=True, text=True, timeout=30,
        )
    finally:
        busy.join()
    began, ended, neighbour_cpu = map(float, neighbour.stdout.split())
    (answer,) = answers
    assert answer["exit_code"] == 0, answer
    sandbox_cpu = cpu_between(json.loads(str(answer["stdout"])), began, ended)
    # Equals would split the core (the sandbox's quota is half of one); an idle
    # cgroup gets what the neighbour leaves, a few percent at most.
    assert sandbox_cpu < neighbour_cpu / 4, (sandbox_cpu, neighbour_cpu)
    assert not idle(directory)  # nothing busy any more


# One small Docker pool, for a daemon of its own.
DOCKER_ONLY = """
[server]
metrics_address = "off"
shutdown_timeout_s = 10

[pools.python]
min_idle = 1
max_size = 2
timeout_s = 5
max_timeout_s = 20
"""


@pytest.mark.docker
def test_behind_a_socket_proxy_a_busy_container_gets_the_least_cpu_shares(
    spawn_daemon: Spawn, tmp_path: Path
) -> None:
    """An engine reached through a proxy (docker-socket-proxy and the like) may
    be anywhere: its pools keep the engine's cgroups, and a busy container's
    shares are lowered through it."""
    with docker_socket_relay(tmp_path / "docker.sock") as docker_host:
        daemon = spawn_daemon(DOCKER_ONLY, env={"DOCKER_HOST": docker_host})
        with daemon.client() as client:
            busy_container_gets_the_least_shares(daemon, client)
        assert pool_cgroup_dir(daemon, "python") is None
        assert "peer is not a dockerd process" in daemon.log_path.read_text()
        stop_daemon(daemon)  # while the proxy still relays its removals


def busy_container_gets_the_least_shares(daemon: Daemon, client: Client) -> None:
    def busy_shares() -> bool:
        for container in docker_containers(f"sandpool.instance={daemon.instance_id}"):
            shares = subprocess.run(
                ["docker", "inspect", "--format", "{{.HostConfig.CpuShares}}", container],
                capture_output=True, text=True, timeout=30,
            ).stdout.strip()
            if shares == "2":
                return True
        return False

    assert not busy_shares()  # idle containers stand as usual
    answers: list[dict[str, object]] = []
    busy = threading.Thread(target=lambda: answers.append(client.run(
        "import time\nbegan = time.monotonic()\nwhile time.monotonic() - began < 3: pass",
        pool="python", timeout_s=10)))
    busy.start()
    try:
        wait_until(busy_shares, "a busy run's container has CpuShares 2", timeout_s=10)
    finally:
        busy.join()
    assert answers[0]["exit_code"] == 0


# --- the daemon and its wasm guests -------------------------------------------------


def daemon_cpu_cgroup(daemon: Daemon, role: str = "daemon") -> Path:
    """Where the daemon's cgroup v1 cpu cgroup ``sandpool-<pid>-<role>`` is to be:
    beside the cgroup it was started in (this test's). Skips the test where
    there is no cgroup v1 cpu hierarchy (cgroup v2 keeps a daemon serving wasm
    where it is)."""
    own = own_cgroups().get("cpu")
    if own is None or unified_host():
        pytest.skip("no cgroup v1 cpu hierarchy")
    return CGROUP_ROOT / "cpu" / own.lstrip("/") / daemon_group_name(daemon.pid, role)


def threads_cpu_cgroups(pid: int) -> set[str]:
    """The cpu cgroup of each thread of ``pid`` (v1), as /proc names it."""
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            found.add(own_cgroups(f"{pid}/task/{task}")["cpu"])
    return found


def thread_cpu_s(pid: int, tid: int) -> float:
    """CPU seconds a thread has run (schedstat: nanoseconds on a CPU, exact)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9


def tasks(directory: Path) -> list[int]:
    return [int(tid) for tid in (directory / "tasks").read_text().split()]


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon makes cgroups only as root")
def test_the_daemon_stands_above_its_pools_and_takes_its_cgroups_along(spawn_daemon: Spawn) -> None:
    daemon = spawn_daemon()
    group = daemon_cpu_cgroup(daemon)
    assert int((group / "cpu.shares").read_text()) == 1024 * DAEMON_WEIGHT
    # Every thread of the daemon, and the pools beside it, not inside it.
    assert threads_cpu_cgroups(daemon.pid) == {"/" + str(group.relative_to(CGROUP_ROOT / "cpu"))}
    pool_dir = pool_cgroup_dir(daemon, "python-process")
    assert pool_dir is not None
    assert pool_dir.parent == group.parent
    guests = daemon_cpu_cgroup(daemon, "guests")
    assert tasks(guests) == []  # no guest is busy
    stop_daemon(daemon)
    assert not group.exists()
    assert not guests.exists()


# One guest at a time, allowed a whole core: its share of core 0 is then the
# scheduler's to decide, not its quota's.
WASM_CONFIG = one_guest_config(1.0)


@contextlib.contextmanager
def busy_guest_on_core_0(daemon: Daemon) -> Iterator[int]:
    """A wasm request spinning for 4 s: yields its guest's thread id once the
    guest is busy, pinned to core 0 (beside the neighbour, as BUSY pins
    itself); the request must then answer."""
    answers: list[dict[str, object]] = []

    def spin() -> None:
        with daemon.client() as client:
            answers.append(client.run(
                "import time\nbegan = time.monotonic()\nwhile time.monotonic() - began < 4: pass",
                pool="wasm", timeout_s=10))

    def idle_threads() -> list[int]:  # a busy guest's (pool/backends/wasm/threads.py)
        return [tid for tid, (policy, _, _) in task_stats(daemon.pid).items()
                if policy == SCHED_IDLE]

    busy = threading.Thread(target=spin)
    busy.start()
    try:
        wait_until(lambda: idle_threads() != [], "a busy guest's thread", timeout_s=10)
        (guest,) = idle_threads()
        os.sched_setaffinity(guest, {0})
        yield guest
    finally:
        busy.join()
    assert answers[0]["exit_code"] == 0, answers


def neighbour_cpu_s() -> float:
    """Run NEIGHBOUR to its end; the CPU it got."""
    neighbour = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NEIGHBOUR)],
        check=True, capture_output=True, text=True, timeout=30,
    )
    return float(neighbour.stdout.split()[2])


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon makes cgroups only as root")
@pytest.mark.skipif(os.cpu_count() == 1, reason="the busy guest and the test share the core")
def test_a_busy_wasm_guest_takes_no_more_than_a_process_of_another_cgroup(
    spawn_daemon: Spawn
) -> None:
    """Its thread, alone in the daemon's cgroup (weighted 8 processes), would take
    that cgroup's weight, SCHED_IDLE or not: out of it, it stands as one process."""
    daemon = spawn_daemon(WASM_CONFIG)
    guests = daemon_cpu_cgroup(daemon, "guests")
    with busy_guest_on_core_0(daemon) as guest:
        before = thread_cpu_s(daemon.pid, guest)
        neighbour_cpu = neighbour_cpu_s()
        guest_cpu = thread_cpu_s(daemon.pid, guest) - before
        in_guests = guest in tasks(guests)
    # As equals they split core 0; with the daemon's weight the guest took
    # about eight ninths of it. (It also steps aside now: the test below.)
    assert guest_cpu < 2 * neighbour_cpu, (guest_cpu, neighbour_cpu)
    assert in_guests


@pytest.mark.skipif(os.cpu_count() == 1, reason="the busy guest and the test share the core")
def test_a_busy_wasm_guest_steps_aside_for_a_process_that_wants_its_core(
    spawn_daemon: Spawn
) -> None:
    """A busy guest cannot be in an idle cgroup (it is a thread of the daemon):
    it yields itself while it waits for a core (epoch.Courtesy). Beside a busy
    process on its core it then takes a small part of it, not half."""
    daemon = spawn_daemon(WASM_CONFIG)
    with busy_guest_on_core_0(daemon) as guest:
        alone_before = thread_cpu_s(daemon.pid, guest)
        time.sleep(0.5)
        alone = thread_cpu_s(daemon.pid, guest) - alone_before
        before = thread_cpu_s(daemon.pid, guest)
        neighbour_cpu = neighbour_cpu_s()
        guest_cpu = thread_cpu_s(daemon.pid, guest) - before
    assert alone > 0.4, alone  # alone on its core, it runs at full speed
    # As equals they would split core 0 (0.75 s each).
    assert guest_cpu < neighbour_cpu / 4, (guest_cpu, neighbour_cpu)
