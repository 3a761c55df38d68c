"""Shares of host quotas: who holds them, and the floors the daemon warns under."""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import uuid

import pytest
from structlog.testing import capture_logs

from pool.backends.fork import ForkBackend
from pool.config import PoolConfig
from pool.quotas import FLOORS, Holders, small_shares
from pool.uids import SandboxUids

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a uid of its own)")


def test_holders_count_the_pools_that_share_each_quota() -> None:
    pools = [
        PoolConfig(name="d", backend="docker", max_size=8),
        PoolConfig(name="p", backend="process", max_size=4),
        PoolConfig(name="f", backend="fork", max_size=2),
        PoolConfig(name="w", backend="wasm", max_size=5),  # no host process, no PTY
    ]
    holders = Holders.of(pools)
    assert holders == Holders(own_uid=4, ptys=14)
    assert holders.of_ptys(pools[0]) == 14
    assert holders.of_own_uid(pools[1]) == 5  # and the daemon
    # A backend built alone counts its own pool.
    assert Holders().of_ptys(pools[0]) == 8
    assert Holders().of_own_uid(pools[1]) == 5


def test_only_shares_under_their_floor_are_reported() -> None:
    at_floor = {name: least for name, (least, _) in FLOORS.items()}
    assert small_shares(at_floor) == []
    assert small_shares({"RLIMIT_MSGQUEUE": resource.RLIM_INFINITY}) == []  # no limit at all
    (line,) = small_shares({**at_floor, "max_inotify_instances": 1})
    assert line.startswith("max_inotify_instances: 1 per sandbox (under 4)")
    assert "fs.inotify.max_user_instances" in line


def open_default_queue_as_fresh_uid(limit: int) -> int:
    """0 if a uid no one uses, with ``limit`` as RLIMIT_MSGQUEUE, can open a POSIX
    message queue of the kernel's default size; else the errno."""
    rt = ctypes.CDLL("librt.so.1", use_errno=True)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            uid = SandboxUids().base + 65000
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            resource.setrlimit(resource.RLIMIT_MSGQUEUE, (limit, limit))
            name = f"/sandpool-test-{os.getpid()}".encode()
            fd = rt.mq_open(name, os.O_CREAT | os.O_RDWR, 0o600, None)
            code = 0 if fd >= 0 else ctypes.get_errno()
            if fd >= 0:
                rt.mq_unlink(name)
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@needs_root
def test_the_message_queue_floor_holds_one_queue_of_the_default_size() -> None:
    floor, _ = FLOORS["RLIMIT_MSGQUEUE"]
    assert open_default_queue_as_fresh_uid(floor) == 0
    # 10 messages of 8 KiB alone do not fit: the floor counts the kernel's bookkeeping.
    assert open_default_queue_as_fresh_uid(10 * 8192) == errno.EMFILE


@needs_root
async def test_a_fork_pool_too_large_for_the_quotas_says_so_at_start() -> None:
    # 31 holders of the template's uid: 819200 bytes of queues each get 26425.
    config = PoolConfig(name=f"q{uuid.uuid4().hex[:6]}", backend="fork", max_size=30)
    backend = ForkBackend(config, f"test-{uuid.uuid4().hex[:8]}")
    with capture_logs() as logs:
        await backend.start()
        await backend.close()
    (warning,) = [e for e in logs if e["event"] == "quota_shares_small"]
    assert warning["pool"] == config.name
    assert any(line.startswith("RLIMIT_MSGQUEUE: ") for line in warning["shares"]), warning
    (ready,) = [e for e in logs if e["event"] == "fork_backend_ready"]
    assert ready["shares"]["RLIMIT_MSGQUEUE"] < FLOORS["RLIMIT_MSGQUEUE"][0]
