"""The Docker reaper removes only what is proven orphaned.

A reaper that cannot read its own identity or another daemon's (file
descriptors exhausted, /proc unreadable) must take the owner for alive: the
README promises that two daemons sharing one dockerd never reap each other's
sandboxes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

from tests.support import Daemon, docker_containers

pytestmark = pytest.mark.docker

VICTIM_CONFIG = """
[server]
metrics_address = "off"

[pools.victim]
min_idle = 2
max_size = 2
"""

# A second daemon's reaper, run once it has exhausted its own file descriptors.
# The Docker connection it opened at start stays pooled, so listing containers
# still works; only the proofs of ownership (reads of /proc) fail.
EXHAUSTED_REAPER = textwrap.dedent("""
    import asyncio, errno, os, resource
    from pool.backends.docker import DockerBackend, ownership
    from pool.config import PoolConfig

    async def main() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        backend = DockerBackend(PoolConfig(name="reaper-probe"), "reaper-probe")
        await backend.start()
        held = []
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as e:
            assert e.errno == errno.EMFILE, e
        try:
            try:
                ownership._boot_id()
            except OSError as e:
                print("identity:", errno.errorcode[e.errno or 0])
            print("reaped:", await backend.reap_orphans())
        finally:
            for fd in held:
                os.close(fd)
        await backend.close()

    asyncio.run(main())
""")


def test_a_reaper_without_file_descriptors_removes_no_live_daemons_containers(
    spawn_daemon: Callable[..., Daemon],
) -> None:
    victim = spawn_daemon(VICTIM_CONFIG)
    before = set(docker_containers(f"sandpool.instance={victim.instance_id}"))
    assert len(before) == 2
    done = subprocess.run(
        [sys.executable, "-c", EXHAUSTED_REAPER],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # The precondition: the reaper really could not read its identity, yet listed.
    assert "identity: EMFILE" in done.stdout, done.stdout
    assert "reaped: 0" in done.stdout, done.stdout
    assert before <= set(docker_containers(f"sandpool.instance={victim.instance_id}"))
    with victim.client() as client:
        assert client.run("print(7)", pool="victim")["stdout"] == "7\n"
