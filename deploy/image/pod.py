"""The daemon's image run by ``docker run`` as a pod runs it: the flags, and the cgroup.

``pod_flags`` are the ``docker run`` equivalents of the pod's securityContext and
volumes (docs/kubernetes-image.md has the table): uid 65534, no capability,
no-new-privileges, the seccomp profile of deploy/seccomp, an unmasked /proc, a
read-only root with the writable directories as tmpfs, a cgroup namespace of
its own. The tests (tests/daemon_image.py) and the multi-node simulation
(deploy/simulate) both start the image with them, so what is proven is what is
documented.

The process tier needs a memory cgroup it may write (docs/process-tier.md), and
a container's own cgroup is read-only to it. ``delegate_cgroups`` delegates one
as systemd's ``Delegate=yes`` does: made on the host (cgroup v1, as on the
development host), chowned to the daemon's uid, bind-mounted over the
container's ``/sys/fs/cgroup/<controller>``. Every function here blocks.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
DAEMON_IMAGE = "sandpool/daemon:bookworm"
SECCOMP_PROFILE = REPOSITORY / "deploy" / "seccomp" / "sandpool-daemon.json"
DAEMON_UID = 65534
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_CONTROLLERS = ("memory", "pids", "cpu")
# What each container's sandboxes may hold together, as a pod's memory limit would.
CONTAINER_MEMORY_BYTES = 4 * 1024**3
DOCKER_TIMEOUT_S = 120


def pod_flags(
    socket_dir: Path | None,
    *,
    seccomp: str | None = str(SECCOMP_PROFILE),
    unmasked_proc: bool = True,
    uid: int = DAEMON_UID,
) -> list[str]:
    """The ``docker run`` flags equivalent to the pod's securityContext and volumes.

    ``socket_dir`` is bind-mounted at /run/sandpool (None: a tmpfs, as in a pod
    without the DaemonSet's hostPath). ``seccomp`` is the profile's path; None
    leaves the engine's default profile. ``unmasked_proc`` is
    ``systempaths=unconfined`` (the pod's ``procMount: Unmasked``).
    """
    flags = [
        "--user", f"{uid}:{uid}",
        "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        *(["--security-opt", "systempaths=unconfined"] if unmasked_proc else []),
        "--read-only",
        # emptyDirs in the pod: the compiled wasm module's cache (mapped
        # executable, so not noexec) and the daemon's temporary files.
        "--tmpfs", f"/var/lib/sandpool:rw,exec,nosuid,nodev,size=512m,uid={uid},"
                   f"gid={uid},mode=0700",
        "--tmpfs", "/tmp:rw,noexec,nosuid,nodev,size=64m",
        "--cgroupns", "private",
    ]  # fmt: skip
    if socket_dir is None:
        flags += ["--tmpfs", f"/run/sandpool:rw,noexec,nosuid,nodev,size=1m,uid={uid},gid={uid}"]
    else:
        flags += ["--volume", f"{socket_dir}:/run/sandpool"]
    if seccomp is not None:
        flags += ["--security-opt", f"seccomp={seccomp}"]
    return flags


def cgroup_v1() -> bool:
    return not (CGROUP_ROOT / "cgroup.controllers").exists()


def delegated_cgroups(parent: str, name: str) -> list[Path]:
    return [CGROUP_ROOT / c / parent / name for c in CGROUP_CONTROLLERS]


def delegate_cgroups(parent: str, name: str, uid: int = DAEMON_UID) -> list[str]:
    """Make cgroup v1 directories ``<controller>/<parent>/<name>`` owned by ``uid``;
    return the ``--mount`` flags that put them over the container's own.

    Raises RuntimeError on a cgroup v2 host (not written for it: there the
    daemon would have to live in the delegated cgroup itself).
    """
    if not cgroup_v1():
        raise RuntimeError("the cgroup delegation of deploy/image/pod.py is for cgroup v1 hosts")
    flags = []
    for controller, directory in zip(CGROUP_CONTROLLERS, delegated_cgroups(parent, name),
                                     strict=True):
        directory.mkdir(parents=True, exist_ok=True)
        if controller == "memory":
            (directory / "memory.limit_in_bytes").write_text(str(CONTAINER_MEMORY_BYTES))
        for path in [directory, directory / "cgroup.procs", directory / "tasks"]:
            os.chown(path, uid, uid)
        flags += ["--mount", f"type=bind,source={directory},target=/sys/fs/cgroup/{controller}"]
    return flags


def cgroup_processes(parent: str, name: str | None = None) -> list[int]:
    """Pids in the delegated cgroups of ``name`` (every name under ``parent`` if None)."""
    pids: set[int] = set()
    for controller in CGROUP_CONTROLLERS:
        base = CGROUP_ROOT / controller / parent
        top = base / name if name is not None else base
        if not top.exists():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def remove_cgroups(parent: str, name: str) -> list[str]:
    """Remove ``name``'s delegated cgroups, deepest first (a killed daemon leaves
    its empty sandbox cgroups, as a killed pod leaves its cgroup to the kubelet);
    return what stayed, which a caller reports as a leak."""
    stayed = []
    for directory in delegated_cgroups(parent, name):
        if not directory.exists():
            continue
        for path in sorted((p for p in directory.rglob("*") if p.is_dir()),
                           key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()
        try:
            directory.rmdir()
        except OSError as e:
            stayed.append(f"{directory}: {e.strerror}")
    return stayed


def remove_cgroup_parent(parent: str) -> None:
    """Remove ``parent`` itself once it is empty; one still holding a cgroup stays."""
    for controller in CGROUP_CONTROLLERS:
        with contextlib.suppress(FileNotFoundError, OSError):
            (CGROUP_ROOT / controller / parent).rmdir()


def leftover_cgroups(parent: str) -> list[str]:
    """Every delegated cgroup directory still under ``parent``."""
    found = []
    for controller in CGROUP_CONTROLLERS:
        base = CGROUP_ROOT / controller / parent
        if base.exists():
            found += [str(p) for p in base.rglob("*") if p.is_dir()]
    return found


def docker(*args: str, timeout_s: float = DOCKER_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout_s)


def containers_labelled(label: str) -> list[str]:
    """Names of the containers, running or not, that carry ``label``."""
    out = docker("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}")
    if out.returncode != 0:
        raise RuntimeError(f"docker ps failed: {out.stderr.strip()}")
    return out.stdout.split()


def container_exists(name: str) -> bool:
    return bool(docker("ps", "-aq", "--filter", f"name=^{name}$").stdout.strip())


def container_address(name: str) -> str:
    """The container's IPv4 address on Docker's default bridge, reachable from the host."""
    out = docker("inspect", "--format", "{{.NetworkSettings.IPAddress}}", name)
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"no address for container {name}: {out.stderr.strip()}")
    return out.stdout.strip()


def daemon_pid(name: str) -> int:
    """The host pid of the daemon in container ``name``: the one child of its tini."""
    out = docker("inspect", "--format", "{{.State.Pid}}", name)
    init = int(out.stdout.strip())
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    if len(children) != 1:
        raise RuntimeError(f"tini in {name} has children {children}")
    return int(children[0])
