"""Every Docker and process sandbox of a root daemon runs as a host uid of its own.

The kernel keeps some quotas per host uid (inotify instances, POSIX message
queue bytes, RLIMIT_NPROC): sandboxes sharing a uid share them. Here, the uids
themselves and their range; that one sandbox spending such a quota leaves
another its own is an attack of the adversarial suite
(``test_one_sandbox_spending_a_per_user_quota_leaves_another_its_own``), which
also runs against the daemon's image, where a non-root daemon's process
sandboxes each get a share of its uid's.
"""

from __future__ import annotations

import pytest

from api.client import Client
from pool.config import parse_config
from pool.errors import ConfigError
from pool.uids import SandboxUids

pytestmark = pytest.mark.docker


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
