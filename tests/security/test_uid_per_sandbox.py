"""Every Docker and process sandbox runs as a host uid of its own.

The kernel keeps some quotas per host uid (inotify instances, POSIX message
queue bytes, RLIMIT_NPROC): sandboxes sharing a uid share them, so one could
use a quota up and make the others fail. Here one sandbox takes every inotify
instance its uid may have and holds them while another sandbox of the same
pool, running at the same time, needs one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from api.client import Client
from pool.config import parse_config
from pool.errors import ConfigError
from pool.uids import SandboxUids
from tests.support import Daemon

pytestmark = pytest.mark.docker

HOG_INOTIFY = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
held = 0
while True:
    if libc.inotify_init1(0) < 0:
        break
    held += 1
print('held', held, 'then', os.strerror(ctypes.get_errno()), flush=True)
time.sleep(4)
"""

NEEDS_INOTIFY = """
import ctypes, os, time
time.sleep(1.5)  # after the hog has taken its share
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
print('ok' if fd >= 0 else os.strerror(ctypes.get_errno()))
"""


@pytest.mark.parametrize("pool", ["python", "python-process", "python-fork"])
def test_one_sandbox_exhausting_a_per_user_quota_leaves_the_others_theirs(
    daemon: Daemon, pool: str
) -> None:
    def run(code: str) -> dict[str, object]:
        with daemon.client() as client:
            return client.run(code, pool=pool, timeout_s=15)

    with ThreadPoolExecutor(2) as workers:
        hog = workers.submit(run, HOG_INOTIFY)
        other = workers.submit(run, NEEDS_INOTIFY)
        hog_result, other_result = hog.result(timeout=60), other.result(timeout=60)
    # The precondition: the hog reached its uid's limit, not its fd limit.
    assert "then Too many open files" in str(hog_result["stdout"]), hog_result
    held = int(str(hog_result["stdout"]).split()[1])
    assert held < 1000, hog_result  # below RLIMIT_NOFILE: the per-user quota stopped it
    assert other_result["stdout"] == "ok\n", other_result


def test_docker_sandboxes_see_their_own_uid_from_the_range(client: Client) -> None:
    seen = {
        client.run("import os; print(os.getuid(), os.getgid())", pool="python")["stdout"]
        for _ in range(3)
    }
    assert len(seen) == 3, seen  # a fresh uid each time, never shared
    for line in seen:
        uid, gid = (int(v) for v in line.split())
        assert uid == gid
        assert uid in SandboxUids(), line


def test_uids_are_held_until_released_and_reused_last() -> None:
    uids = SandboxUids(base=100_000, count=3)
    first, second, third = uids.acquire(), uids.acquire(), uids.acquire()
    assert [first, second, third] == [100_000, 100_001, 100_002]
    with pytest.raises(Exception, match="sandbox uids are in use"):
        uids.acquire()
    uids.release(second)
    uids.release(second)  # idempotent
    uids.release(first)
    assert uids.acquire() == second  # the one released first comes back first
    assert uids.acquire() == first


def test_a_uid_range_smaller_than_the_pools_can_hold_is_refused() -> None:
    document = {"server": {"sandbox_uid_count": 5}, "pools": {"a": {"max_size": 4},
                                                             "b": {"max_size": 2}}}
    with pytest.raises(ConfigError, match="sandbox_uid_count"):
        parse_config(document)
