"""A busy run yields the CPU to everything else, in every tier.

A run still going ``BUSY_AFTER_S`` after its request is busy. A process or
fork sandbox then goes to ``cpu.idle`` at both levels of the cgroup tree: its
own cgroup among its pool's sandboxes, and its pool's among the other pools and
the daemon while the pool runs nothing else. A Docker container gets the least
CPU shares; a wasm guest's thread goes to SCHED_IDLE
(tests/security/test_wasm_limits.py). Each level is checked by what it does:
a process beside the busy sandbox, pinned to the same core, gets that core. A
check of the sandbox's own flag would pass with the pool's level gone, and then
a busy sandbox competes as an equal with every other pool.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from api.client import Client
from tests.support import Daemon, docker_containers, pool_cgroup_dir, wait_until

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


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon makes cgroups only as root")
@pytest.mark.skipif(os.cpu_count() == 1, reason="the busy sandbox and the test share the core")
@pytest.mark.parametrize("pool", ["python-process", "python-fork"])
def test_a_busy_sandbox_leaves_its_core_to_a_process_of_another_cgroup(
    daemon: Daemon, client: Client, pool: str
) -> None:
    directory = pool_cpu_dir(daemon, pool)
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


@pytest.mark.docker
def test_a_busy_container_gets_the_least_cpu_shares(daemon: Daemon, client: Client) -> None:
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
