"""The daemon's image (``sandpool/daemon:bookworm``) run the way a pod runs it.

``launch_container`` starts it with ``docker run`` and exactly the flags of
``pod_flags`` (docs/kubernetes-image.md lists them beside the pod settings they
stand for), the config written by the caller, and the socket's directory
bind-mounted from the host, and returns the same ``Daemon`` the launcher in
support.py returns for a daemon on the host: the suites' fixtures use it as
they are (``SANDPOOL_TEST_DAEMON_IMAGE=1``, see support.py). The process is the
attached ``docker run``, which passes SIGTERM on to the container; the
container is started with ``--rm`` and its delegated cgroups
(``deploy.image.pod.delegate_cgroups``) are removed by the daemon's
``cleanup``, so nothing is left however the test ended.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from deploy.image.pod import (
    DAEMON_IMAGE,
    DAEMON_UID,
    SECCOMP_PROFILE,
    container_address,
    container_exists,
    daemon_pid,
    delegate_cgroups,
    pod_flags,
    remove_cgroups,
)
from deploy.image.pod import leftover_cgroups as cgroups_under
from tests.support import REPOSITORY, Daemon

__all__ = ["DAEMON_IMAGE", "container_address", "daemon_pid"]

# Every container and cgroup the tests make carries this, so a test can find leftovers.
CONTAINER_LABEL = "sandpool.test.daemon-image=1"
CGROUP_PARENT = "sandpool-daemon-image"
BUILD_TIMEOUT_S = 1800


def leftover_cgroups() -> list[str]:
    """Every delegated cgroup directory of these tests still on the host."""
    return cgroups_under(CGROUP_PARENT)


def leftover_containers() -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={CONTAINER_LABEL}"],
        check=True, capture_output=True, text=True, timeout=60,
    )
    return out.stdout.split()


def ensure_daemon_image() -> None:
    """Build the image unless it is current (``make daemon-image``); AssertionError
    with the build's last lines if the build fails."""
    built = subprocess.run(
        [sys.executable, "-m", "deploy.image.build"], cwd=REPOSITORY,
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]


def launch_container(
    workdir: Path,
    config: str,
    env: dict[str, str] | None = None,
    *,
    seccomp: str | None = str(SECCOMP_PROFILE),
    unmasked_proc: bool = True,
    delegate: bool = True,
    extra_flags: tuple[str, ...] = (),
) -> Daemon:
    """Write ``config`` to ``workdir`` and start the image on it; does not wait.

    Returns a ``Daemon`` whose ``socket`` is the host side of the container's
    socket and whose ``cleanup`` removes the container and its cgroups.
    ``seccomp``, ``unmasked_proc`` and ``delegate`` (the delegated cgroups) can
    each be taken away, to show what stops working without them.
    """
    config_path = workdir / "sandpool.toml"
    config_path.write_text(textwrap.dedent(config))
    config_path.chmod(0o644)
    socket_dir = workdir / "run"
    socket_dir.mkdir()
    os.chown(socket_dir, DAEMON_UID, DAEMON_UID)
    log_path = workdir / "daemon.log"
    name = f"sandpool-test-daemon-{secrets.token_hex(4)}"
    environment = [arg for key in (env or {}) for arg in ("--env", key)]
    argv = [
        "docker", "run", "--rm", "--name", name, "--label", CONTAINER_LABEL,
        *pod_flags(socket_dir, seccomp=seccomp, unmasked_proc=unmasked_proc),
        *(delegate_cgroups(CGROUP_PARENT, name) if delegate else []),
        "--volume", f"{config_path}:/etc/sandpool/sandpool.toml:ro",
        *environment, *extra_flags,
        DAEMON_IMAGE, "serve", "--config", "/etc/sandpool/sandpool.toml", "--log-format", "json",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})

    def cleanup() -> None:
        subprocess.run(["docker", "rm", "--force", name], capture_output=True, timeout=120)
        deadline = time.monotonic() + 30
        while container_exists(name) and time.monotonic() < deadline:
            time.sleep(0.2)
        stayed = remove_cgroups(CGROUP_PARENT, name)
        assert stayed == [], f"cgroups left behind: {stayed}"

    return Daemon(process, str(socket_dir / "sandpool.sock"), log_path, instance_id="",
                  cleanup=cleanup, container=name)

