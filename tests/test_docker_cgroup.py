"""A Docker pool's own cpu cgroup (pool/backends/docker/cgroup.py): when it may
have one, and the directories it makes, removes and sweeps.

Against a real unix socket for the engine's identity, and cgroup files in a
temporary directory; tests/security/test_busy_neighbours.py checks a real
daemon and dockerd, through a socket proxy too.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool.backends.docker import cgroup
from pool.backends.docker.cgroup import (
    EngineFacts,
    engine_facts,
    prepare_pool_cgroup,
    refused,
    remove_pool_cgroup,
)

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
