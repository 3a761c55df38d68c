"""The simulation's nodes: daemon containers of the daemon's image, run as pods run it.

Each node is ``sandpool/daemon:bookworm`` started with the pod's flags
(``deploy.image.pod.pod_flags``), the image's own configuration, the TLS
certificate and tokens mounted where the Kubernetes Secrets go, and a cgroup
delegated to it. A node is drained with SIGTERM (what the kubelet sends after
preStop) or killed with SIGKILL (a node lost); its container's log outlives it
until ``remove``. Every container carries ``LABEL``, so a leftover is found.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy.image.pod import (
    DAEMON_IMAGE,
    REPOSITORY,
    cgroup_processes,
    container_address,
    container_exists,
    delegate_cgroups,
    docker,
    pod_flags,
    remove_cgroups,
)
from deploy.simulate.pki import Pki

LABEL = "sandpool.simulate=1"
CGROUP_PARENT = "sandpool-simulate"
IMAGE_CONFIG = REPOSITORY / "deploy" / "image" / "sandpool.toml"
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


@dataclass
class Node:
    """One daemon container."""

    name: str
    address: str = ""
    started_at: float = 0.0
    exit_code: int | None = None
    exited_at: float | None = None  # time.monotonic() when `docker wait` saw it exit
    log_lines: list[str] = field(default_factory=list)

    def running(self) -> bool:
        out = docker("inspect", "--format", "{{.State.Running}}", self.name)
        return out.returncode == 0 and out.stdout.strip() == "true"

    def request_events(self) -> list[dict[str, object]]:
        """The daemon's ``request`` log events (one per answered run), from its container log."""
        events = []
        for line in self.log_lines or self.read_log():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "request":
                events.append(event)
        return events

    def read_log(self) -> list[str]:
        out = docker("logs", self.name)
        return (out.stdout + out.stderr).splitlines()


def start_node(name: str, pki: Pki, config: Path = IMAGE_CONFIG) -> Node:
    """Start a node; it is ready when its /readyz answers (``wait_ready``)."""
    if container_exists(name):
        raise RuntimeError(f"a container named {name} exists already")
    argv = [
        "run", "--detach", "--name", name, "--label", LABEL,
        *pod_flags(None),
        *delegate_cgroups(CGROUP_PARENT, name),
        "--volume", f"{config}:/etc/sandpool/sandpool.toml:ro",
        "--volume", f"{pki.tls_dir}:/etc/sandpool/tls:ro",
        "--volume", f"{pki.tokens_dir}:/etc/sandpool/tokens:ro",
        DAEMON_IMAGE, "serve", "--config", "/etc/sandpool/sandpool.toml", "--log-format", "json",
    ]  # fmt: skip
    out = docker(*argv)
    if out.returncode != 0:
        remove_cgroups(CGROUP_PARENT, name)
        raise RuntimeError(f"docker run of {name} failed: {out.stderr.strip()}")
    return Node(name=name, address=container_address(name), started_at=time.monotonic())


def wait_ready(node: Node, ready: object, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until ``ready(node)`` (a callable: the balancer's view, or a probe) is true.

    Raises RuntimeError with the tail of the node's log if the container exits first.
    """
    assert callable(ready)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready(node):
            return
        if not node.running():
            raise RuntimeError(f"{node.name} exited before it was ready:\n"
                               + "\n".join(node.read_log()[-20:]))
        time.sleep(0.25)
    raise RuntimeError(f"{node.name} not ready within {timeout_s:g} s:\n"
                       + "\n".join(node.read_log()[-20:]))


def signal_node(node: Node, signal_name: str) -> None:
    out = docker("kill", "--signal", signal_name, node.name)
    if out.returncode != 0:
        raise RuntimeError(f"docker kill --signal {signal_name} {node.name}: {out.stderr.strip()}")


def wait_exit(node: Node, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Wait for the container to exit; its exit status (SIGKILL after ``timeout_s``)."""
    out = docker("wait", node.name, timeout_s=timeout_s + 10)
    if out.returncode != 0:
        signal_node(node, "KILL")
        out = docker("wait", node.name)
    node.exited_at = time.monotonic()  # before the log is read: the kill window ends here
    node.exit_code = int(out.stdout.strip() or -1)
    node.log_lines = node.read_log()
    return node.exit_code


def sandbox_processes(node: Node) -> list[int]:
    """Processes still in the node's delegated cgroups: its sandboxes (the daemon and
    tini stay in the container's own cgroup)."""
    return cgroup_processes(CGROUP_PARENT, node.name)


def remove(node: Node) -> list[str]:
    """Remove the container and its cgroups; return what could not be removed."""
    if not node.log_lines:
        node.log_lines = node.read_log()
    docker("rm", "--force", node.name)
    deadline = time.monotonic() + 30
    while container_exists(node.name) and time.monotonic() < deadline:
        time.sleep(0.2)
    stayed = remove_cgroups(CGROUP_PARENT, node.name)
    if container_exists(node.name):
        stayed.append(f"container {node.name}")
    return stayed


def node_names(count: int) -> list[str]:
    run = secrets.token_hex(3)
    return [f"sandpool-sim-{run}-node{i}" for i in range(1, count + 1)]
