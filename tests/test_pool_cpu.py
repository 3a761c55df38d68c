"""A pool's CPU standing (pool/backends/process/cpu.py): busy runs yield, starts weigh.

The counts and the writes they make, against cgroup files in a temporary
directory; tests/test_fork_backend.py checks the same on the kernel's files.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from pool.backends.process import cpu
from pool.backends.process.cgroups import CgroupTree, SandboxCgroup
from pool.backends.process.cpu import PoolCpu, Standing, standing


def test_a_pool_is_idle_only_while_busy_runs_are_all_it_does() -> None:
    def of(starting: int, short: int, busy: int, waiting: bool = False,
           weigh: bool = True) -> Standing:
        return standing(starting=starting, short=short, busy=busy, waiting=waiting,
                        weigh_starts=weigh)

    assert of(0, 0, 0) == Standing(1, False)
    assert of(0, 0, 2) == Standing(1, True)
    assert of(0, 1, 2) == Standing(1, False)  # a short run must not wait behind busy ones
    assert of(1, 0, 2, waiting=True) == Standing(2, False)  # nor a start a request waits for
    assert of(1, 0, 2) == Standing(1, True)  # a refill of the busy pool is its own work
    assert of(0, 0, 2, waiting=True) == Standing(1, True)  # no start: nothing to hurry
    assert of(3, 0, 0) == Standing(4, False)
    assert of(3, 0, 0, weigh=False) == Standing(1, False)


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CgroupTree, SandboxCgroup]:
    monkeypatch.setattr(cpu, "BUSY_AFTER_S", 0.02)
    pool_dir, sandbox_dir = tmp_path / "pool", tmp_path / "pool" / "sandbox"
    sandbox_dir.mkdir(parents=True)
    for directory in (pool_dir, sandbox_dir):
        (directory / "cpu.idle").write_text("0")
    (pool_dir / "cpu.shares").write_text("1024")
    return CgroupTree(1, {"cpu": pool_dir}), SandboxCgroup(dirs=[sandbox_dir],
                                                           idle_file=sandbox_dir / "cpu.idle")


def flags(tree: CgroupTree, sandbox: SandboxCgroup) -> tuple[str, str]:
    assert sandbox.idle_file is not None
    return (tree.pool_dirs["cpu"] / "cpu.idle").read_text(), sandbox.idle_file.read_text()


async def until(condition: object, what: str) -> None:
    """Wait (bounded) for a state; how long it takes is not what is tested."""
    for _ in range(500):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {what}")


def busy_run(pool: PoolCpu, sandbox: SandboxCgroup, ends: asyncio.Event) -> asyncio.Future[None]:
    """A single-use run in ``sandbox`` that lasts until ``ends`` is set."""
    async def run() -> None:
        async with pool.running(sandbox, kept=False):
            await ends.wait()

    return asyncio.ensure_future(run())


async def test_a_short_run_writes_nothing(
    files: tuple[CgroupTree, SandboxCgroup], monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, sandbox = files
    writes: list[object] = []
    monkeypatch.setattr(cpu, "set_pool_cpu", lambda *a, **k: writes.append(a))
    pool = PoolCpu(tree, weigh_starts=False)
    async with pool.running(sandbox, kept=False):
        pass
    async with pool.starting():
        pass
    assert writes == []
    assert flags(tree, sandbox) == ("0", "0")


async def test_a_busy_run_yields_in_its_pool_and_among_pools_until_it_ends(
    files: tuple[CgroupTree, SandboxCgroup],
) -> None:
    tree, sandbox = files
    pool = PoolCpu(tree, weigh_starts=True)
    ended = asyncio.Event()
    task = busy_run(pool, sandbox, ended)
    await until(lambda: flags(tree, sandbox) == ("1", "1"), "idle at both levels")
    # A short run in the same pool: the pool stands as usual before its code runs.
    other = SandboxCgroup(dirs=[], idle_file=None)
    async with pool.running(other, kept=False):
        assert flags(tree, sandbox) == ("0", "1")
    await until(lambda: flags(tree, sandbox) == ("1", "1"), "idle again after the short run")
    # A refill nobody waits for yet is the busy pool's own work: the pool stays idle.
    async with pool.starting():
        assert flags(tree, sandbox) == ("1", "1")
        # A request of the pool comes to wait: the start stands as usual at once,
        # weighing the pool as two processes.
        pool.requests_waiting(True)
        await until(lambda: flags(tree, sandbox)[0] == "0", "the start lifted the pool")
        assert (tree.pool_dirs["cpu"] / "cpu.shares").read_text() == "2048"
    await until(lambda: flags(tree, sandbox)[0] == "1", "idle again after the start")
    pool.requests_waiting(False)
    ended.set()
    await task
    await pool.close()
    # The single-use sandbox is destroyed next: only its pool's flag is undone.
    assert flags(tree, sandbox) == ("0", "1")
    assert repr(pool) == ("<PoolCpu starting=0 short=0 busy=0 waiting=False "
                          "Standing(weight=1, idle=False)>")


async def test_a_sessions_busy_run_is_undone_for_its_next_run(
    files: tuple[CgroupTree, SandboxCgroup],
) -> None:
    tree, sandbox = files
    pool = PoolCpu(tree, weigh_starts=False)
    async with pool.running(sandbox, kept=True):
        await until(lambda: flags(tree, sandbox) == ("1", "1"), "idle at both levels")
    assert flags(tree, sandbox) == ("0", "0")


async def test_a_cancelled_busy_run_leaves_the_pool_as_it_found_it(
    files: tuple[CgroupTree, SandboxCgroup],
) -> None:
    tree, sandbox = files
    pool = PoolCpu(tree, weigh_starts=True)
    task = busy_run(pool, sandbox, asyncio.Event())  # never set
    await until(lambda: flags(tree, sandbox)[0] == "1", "idle")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):  # we cancelled it ourselves
        await task
    assert pool.standing == Standing(1, False)
    assert flags(tree, sandbox)[0] == "0"


async def test_a_start_cancelled_while_the_standing_is_written_back_undoes_what_it_made(
    files: tuple[CgroupTree, SandboxCgroup], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write after a start can take a cancel; the sandbox made must not leak."""
    tree, _ = files
    writing, release = threading.Event(), threading.Event()
    written: list[int] = []

    def slow_write(tree: CgroupTree, weight: int, idle: bool, *, was_idle: bool) -> None:
        written.append(weight)
        if weight == 1:  # the write back after the start
            writing.set()
            release.wait(5)

    monkeypatch.setattr(cpu, "set_pool_cpu", slow_write)
    pool = PoolCpu(tree, weigh_starts=True)
    undone: list[str] = []

    async def make() -> str:
        return "sandbox-1"

    async def undo(made: str) -> None:
        undone.append(made)

    task = asyncio.ensure_future(pool.start(make, undo))
    await asyncio.to_thread(writing.wait, 5)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):  # we cancelled it ourselves
        await task
    assert written == [2, 1]
    assert undone == ["sandbox-1"]
    # Not cancelled: what was made is returned, and nothing is undone.
    assert await pool.start(make, undo) == "sandbox-1"
    assert undone == ["sandbox-1"]
