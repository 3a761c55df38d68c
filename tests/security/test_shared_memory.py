"""Shared memory counts against memory_mb, and a tier that cannot count it does not start.

RLIMIT_AS does not see memfds, tmpfs files or SysV/POSIX shared memory: only a
memory cgroup does. A request that fills memfds past memory_mb must end in the
OOM verdict; a process pool whose daemon cannot create a memory cgroup refuses
to start instead of promising a limit it cannot keep.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from api.client import Client

pytestmark = pytest.mark.docker

REPOSITORY = Path(__file__).resolve().parents[2]

# 16 MiB per memfd (RLIMIT_FSIZE is tmpfs_mb there), up to 1.5 GiB in all.
MEMFD_FILL = """
import os
held = []
chunk = b'x' * (1 << 20)
for _ in range(96):
    fd = os.memfd_create('fill')
    for _ in range(16):
        os.write(fd, chunk)
    held.append(fd)
print('held', len(held) * 16, 'MiB')
"""


@pytest.mark.parametrize("pool", ["python", "python-process", "python-fork"])
def test_memfds_past_memory_mb_end_in_the_oom_verdict(client: Client, pool: str) -> None:
    result = client.run(MEMFD_FILL, pool=pool, timeout_s=15)
    assert "held" not in result["stdout"], result
    assert result["oom_killed"] is True, result
    assert result["exit_code"] == 137, result


NON_ROOT_START = textwrap.dedent("""
    import asyncio
    from pool.backends.process import ProcessBackend
    from pool.config import PoolConfig
    from pool.errors import BackendError

    async def main() -> None:
        backend = ProcessBackend(PoolConfig(name="nonroot", backend="process"), "nonroot")
        try:
            await backend.start()
        except BackendError as e:
            print("refused:", e.code)
            return
        await backend.close()
        print("started")

    asyncio.run(main())
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_a_daemon_that_cannot_make_a_memory_cgroup_refuses_the_process_tier() -> None:
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", NON_ROOT_START],
        capture_output=True, text=True, timeout=60, cwd=REPOSITORY,
        env={"PATH": os.environ["PATH"], "HOME": "/tmp", "PYTHONPATH": str(REPOSITORY)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "refused: process_needs_cgroups", done.stdout + done.stderr
