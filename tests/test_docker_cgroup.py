"""A Docker pool's own cpu cgroup (pool/backends/docker/cgroup.py): when it may
have one, and the directories it makes, removes and sweeps.

Against a real unix socket for the engine's identity, cgroup files in a
temporary directory, and the kernel's cgroups for what only the kernel can say
(a busy directory); tests/security/test_busy_neighbours.py checks a real daemon
and dockerd, through a socket proxy too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from pool.backends.docker import cgroup
from pool.backends.docker.cgroup import (
    EngineFacts,
    engine_facts,
    prepare_pool_cgroup,
    refused,
    remove_pool_cgroup,
)
from pool.backends.process import cgroups as process_cgroups
from tests.support import wait_until

LOCAL = EngineFacts(root=True, own_cpu="/", driver="cgroupfs", engine_cgroup_version="1",
                    peer_command="dockerd", same_cgroup_namespace=True)


def test_only_this_hosts_own_dockerd_on_cgroup_v1_cgroupfs_lets_a_pool_hold_its_cgroup() -> None:
    assert refused(LOCAL) == ""
    cases = {
        "not root": dataclasses.replace(LOCAL, root=False),
        "no cgroup v1 cpu hierarchy": dataclasses.replace(LOCAL, own_cpu=None),
        "systemd on cgroup v1": dataclasses.replace(LOCAL, driver="systemd"),
        "cgroupfs on cgroup v2": dataclasses.replace(LOCAL, engine_cgroup_version="2"),
        "peer is not a dockerd process visible here (socat)":
            dataclasses.replace(LOCAL, peer_command="socat"),
        "(another host or pid namespace)": dataclasses.replace(LOCAL, peer_command=None),
        "another cgroup namespace": dataclasses.replace(LOCAL, same_cgroup_namespace=False),
    }
    for reason, facts in cases.items():
        assert reason in refused(facts), (reason, facts)


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[str]:
    """A unix socket this test process listens on: a peer that is not dockerd. The
    kernel records the peer's credentials at listen(): nothing needs to accept."""
    path = tmp_path / "engine.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(4)
        yield f"unix://{path}"


def test_the_sockets_peer_is_read_from_the_kernel_not_from_what_the_engine_says(
    listening: str,
) -> None:
    info = {"CgroupDriver": "cgroupfs", "CgroupVersion": "1"}
    facts = engine_facts(listening, info)
    assert facts.peer_command == Path("/proc/self/comm").read_text().strip()
    assert facts.same_cgroup_namespace
    assert "not a dockerd process" in refused(dataclasses.replace(facts, root=True, own_cpu="/"))
    # A TCP engine or a socket nobody serves: no peer to see.
    for url in ("tcp://127.0.0.1:2375", listening + ".missing"):
        assert engine_facts(url, info).peer_command is None


@pytest.fixture
def hierarchies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cgroup v1 root with cpu (and cpuacct, a symlink to it) and memory."""
    for name in ("cpu", "memory"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cgroup.procs").write_text("")
    (tmp_path / "cpuacct").symlink_to("cpu")
    monkeypatch.setattr(cgroup, "CGROUP_ROOT", tmp_path)
    return tmp_path


def dead_pid() -> int:
    """A pid that was a process and is no more (reuse within the test is not expected)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           check=True, capture_output=True, text=True)
    return int(child.stdout)


def left_in(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for hierarchy in ("cpu", "memory")
                  for p in (root / hierarchy).glob("sandpool-*"))


def test_a_pools_directory_is_beside_the_daemon_and_leaves_every_hierarchy(
    hierarchies: Path,
) -> None:
    pool = prepare_pool_cgroup(f"sandpool-{os.getpid()}-i-python", "/")
    assert pool.parent == f"/sandpool-{os.getpid()}-i-python"
    directory = pool.tree.pool_dirs["cpu"]
    assert directory == hierarchies / "cpu" / pool.parent.lstrip("/")
    # The engine makes the same path in every hierarchy, and a container below it.
    (hierarchies / "memory" / pool.parent.lstrip("/")).mkdir()
    (directory / "c0ffee").mkdir()
    (directory / "c0ffee" / "cpu.idle").write_text("0")
    found = pool.sandbox("c0ffee")
    assert found is not None
    assert found.idle_file == directory / "c0ffee" / "cpu.idle"
    assert pool.sandbox("elsewhere") is None  # a container the engine put elsewhere
    (directory / "c0ffee" / "cpu.idle").unlink()
    (directory / "c0ffee").rmdir()  # the engine removes it with the container
    # ... but once in CI it left one, empty, in every hierarchy: the pool takes it.
    (hierarchies / "memory" / pool.parent.lstrip("/") / "c0ffee").mkdir()
    remove_pool_cgroup(pool)
    assert left_in(hierarchies) == []


def test_start_sweeps_dead_daemons_directories_from_every_hierarchy_and_no_live_ones(
    hierarchies: Path,
) -> None:
    dead = f"sandpool-{dead_pid()}-i-python"
    alive = f"sandpool-{os.getpid()}-j-python"
    for name in (dead, alive):
        for hierarchy in ("cpu", "memory"):
            (hierarchies / hierarchy / name / "c0ffee").mkdir(parents=True)
    pool = prepare_pool_cgroup(f"sandpool-{os.getpid()}-k-python", "/")
    assert left_in(hierarchies) == sorted([f"cpu/{alive}", f"memory/{alive}",
                                           f"cpu/{pool.parent[1:]}"])


def test_a_directory_the_engine_leaves_busy_is_killed_and_removed_in_every_hierarchy() -> None:
    """The kernel's answer, not a temporary directory's: a process still in the
    pool's directory once its containers are gone (what dockerd left after a
    restart, in CI) made rmdir say EBUSY in every hierarchy, and the directory
    stayed. Planted as runc places a container: in a directory of its own below
    the pool's, in every hierarchy, with children of its own."""
    own = process_cgroups.own_cgroups()
    root = process_cgroups.CGROUP_ROOT
    if os.geteuid() != 0 or "cpu" not in own or "memory" not in own:
        pytest.skip("needs root and cgroup v1 cpu and memory hierarchies")
    pool = prepare_pool_cgroup(f"sandpool-{os.getpid()}-{uuid.uuid4().hex[:12]}-leftover",
                               own["cpu"])
    relative = pool.parent.lstrip("/")
    busy = [root / hierarchy / relative / "c0ffee" for hierarchy in ("cpu", "memory")]
    empty = root / "memory" / relative / "dead"  # a container gone, its directory not
    # It forks once planted (a line on stdin), so its children are planted too.
    leftover = subprocess.Popen(["sh", "-c", "read planted; sleep 300 & sleep 300 & wait"],
                                stdin=subprocess.PIPE, start_new_session=True)
    try:
        for directory in (*busy, empty):
            directory.mkdir(parents=True, exist_ok=True)
        for directory in busy:
            (directory / "cgroup.procs").write_text(str(leftover.pid))
        assert leftover.stdin is not None
        leftover.stdin.write(b"\n")
        leftover.stdin.close()
        children = sleeping_children(leftover.pid, 2)
        planted = sorted([f"{leftover.pid} sh", *(f"{child} sleep" for child in children)])
        with structlog.testing.capture_logs() as logs:
            remove_pool_cgroup(pool)
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert [h.name for h in cgroup.hierarchies() if (h / relative).exists()] == []
        killed = [e for e in logs if e["event"] == "pool_leftover_killed"]
        assert {e["path"] for e in killed} == {str(directory) for directory in busy}
        assert [sorted(e["processes"]) for e in killed] == [planted, planted]  # named
        assert "cgroup_not_removed" not in [e["event"] for e in logs]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leftover.pid, signal.SIGKILL)
        leftover.wait()
        for hierarchy in cgroup.hierarchies():
            for directory in sorted((hierarchy / relative).glob("**/"), reverse=True):
                with contextlib.suppress(OSError):
                    directory.rmdir()


def sleeping_children(pid: int, count: int) -> list[int]:
    """The pids of ``pid``'s ``count`` children, once each has exec'd ``sleep``."""
    children: list[int] = []

    def started() -> bool:
        children[:] = [int(child) for child in
                       Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return len(children) == count and all(
            Path(f"/proc/{child}/comm").read_text().strip() == "sleep" for child in children)

    wait_until(started, f"process {pid} to start {count} sleeps", timeout_s=5)
    return children


def test_a_directory_that_refuses_removal_is_logged_and_left(hierarchies: Path) -> None:
    pool = prepare_pool_cgroup(f"sandpool-{os.getpid()}-i-python", "/")
    refusing = pool.tree.pool_dirs["cpu"] / "c0ffee"
    refusing.mkdir()
    (refusing / "not-a-cgroup-file").write_text("")  # rmdir: ENOTEMPTY, not EBUSY
    with structlog.testing.capture_logs() as logs:
        remove_pool_cgroup(pool)
    assert sorted(e["path"] for e in logs if e["event"] == "cgroup_not_removed") == [
        str(pool.tree.pool_dirs["cpu"]), str(refusing)]
