"""The daemon's cgroup standing (pool/daemon_cpu.py), against a cgroupfs made of files.

What the kernel does with the values is tested against real cgroups in
tests/security/test_busy_neighbours.py (cgroup v1 on the test host); here,
which files each cgroup version gets, in which order, and what is refused:
cgroup v2 is tested only here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool import daemon_cpu
from pool.backends.process import cgroups
from pool.daemon_cpu import DAEMON_WEIGHT, lower_daemon, raise_daemon, yield_guest_thread


@pytest.fixture
def cgroupfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(daemon_cpu, "CGROUP_ROOT", tmp_path)
    yield tmp_path
    lower_daemon()  # this process's standing is module state: never left to the next test


def started_in(monkeypatch: pytest.MonkeyPatch, paths: dict[str, str]) -> None:
    monkeypatch.setattr(daemon_cpu, "own_cgroups", lambda: paths)


def test_v1_weighs_the_daemon_and_parks_busy_guests_beside_it(
    cgroupfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = cgroupfs / "cpu" / "system.slice"
    home.mkdir(parents=True)
    started_in(monkeypatch, {"cpu": "/system.slice", "memory": "/"})
    assert raise_daemon(serves_wasm=True) == ""
    group = home / f"sandpool-{os.getpid()}-daemon"
    guests = home / f"sandpool-{os.getpid()}-guests"
    assert (group / "cpu.shares").read_text() == str(1024 * DAEMON_WEIGHT)
    assert (group / "cgroup.procs").read_text() == str(os.getpid())
    assert list(guests.iterdir()) == []  # a new cgroup's weight: one process's
    yield_guest_thread(4321)
    assert (guests / "tasks").read_text() == "4321"
    # Pools go beside the daemon's cgroup, not inside it.
    assert cgroups.pools_base(f"/system.slice/{group.name}", cgroupfs / "cpu") == home
    lower_daemon()
    assert (home / "cgroup.procs").read_text() == str(os.getpid())


def test_v1_without_wasm_pools_makes_no_guests_cgroup(
    cgroupfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cgroupfs / "cpu").mkdir()
    started_in(monkeypatch, {"cpu": "/"})
    assert raise_daemon(serves_wasm=False) == ""
    assert [p.name for p in (cgroupfs / "cpu").iterdir()] == [f"sandpool-{os.getpid()}-daemon"]
    yield_guest_thread(4321)  # nowhere to go: stays put
    assert not (cgroupfs / "cpu" / f"sandpool-{os.getpid()}-guests").exists()


def test_v1_a_cgroup_it_cannot_make_leaves_the_daemon_as_it_was(
    cgroupfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = cgroupfs / "cpu"
    home.mkdir()
    (home / f"sandpool-{os.getpid()}-guests").write_text("")  # mkdir fails: EEXIST
    started_in(monkeypatch, {"cpu": "/"})
    assert raise_daemon(serves_wasm=True) == "File exists"
    assert sorted(p.name for p in home.iterdir()) == [f"sandpool-{os.getpid()}-guests"]
    started_in(monkeypatch, {"memory": "/"})
    assert raise_daemon(serves_wasm=False) == "no cgroup v1 cpu controller"


def test_v2_weighs_the_daemons_leaf_beside_its_pools(
    cgroupfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cgroupfs / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    started_in(monkeypatch, {"": "/"})
    assert raise_daemon(serves_wasm=False) == ""
    leaf = cgroupfs / cgroups.CGROUP_DAEMON_LEAF
    assert (leaf / "cgroup.procs").read_text() == str(os.getpid())
    # Controllers go down only once the daemon has left ("no internal processes").
    assert (cgroupfs / "cgroup.subtree_control").read_text() == "+cpu"
    assert (leaf / "cpu.weight").read_text() == str(100 * DAEMON_WEIGHT)
    assert cgroups.pools_base(f"/{leaf.name}", cgroupfs) == cgroupfs
    lower_daemon()  # v2 keeps the daemon in its leaf: only the weight goes back
    assert (leaf / "cpu.weight").read_text() == "100"


def test_v2_refuses_what_it_cannot_do_right(
    cgroupfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cgroupfs / "cgroup.controllers").write_text("memory pids\n")
    started_in(monkeypatch, {"": "/"})
    # A busy guest's thread cannot leave the daemon's cgroup, and would take its weight.
    assert "wasm" in raise_daemon(serves_wasm=True)
    assert raise_daemon(serves_wasm=False) == f"no cpu controller delegated to {cgroupfs}"
    service = cgroupfs / "system.slice" / "sandpool.service"
    service.mkdir(parents=True)
    started_in(monkeypatch, {"": "/system.slice/sandpool.service"})
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert raise_daemon(serves_wasm=False) == (
        f"{service} is not delegated (systemd: Delegate=yes)")
    assert list(service.iterdir()) == []
    assert not (cgroupfs / cgroups.CGROUP_DAEMON_LEAF).exists()
