"""The hardened container definition and the labels that find a pool's containers again.

Every limit comes from the pool config; the seccomp profile is sandpool's own
allowlist, the one the process tier compiles. Nothing here talks to Docker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pool import guest
from pool.config import PoolConfig
from pool.seccomp import docker_profile
from pool.wire import RELAY, WORKDIR, RunnerArguments

LABEL_POOL = "sandpool.pool"
LABEL_INSTANCE = "sandpool.instance"
# The daemon that made the container (ownership.owner_label()): the reaper
# removes a container only when that daemon is proven gone, so two daemons
# sharing one dockerd never reap each other's sandboxes.
LABEL_OWNER = "sandpool.owner"


def labels_of(listed: Any) -> dict[str, str]:
    """The labels of a container as ``GET /containers/json`` lists it (null for none)."""
    return dict(listed["Labels"] or {})


def own_devpts(c: PoolConfig) -> bool:
    """Whether pool ``c``'s containers get a devpts instance of their own, with a
    share of the host's PTYs: not under gVisor, whose PTYs are its own kernel's."""
    return not (c.runtime or "").startswith("runsc")


def container_definition(
    c: PoolConfig, *, uid: int, instance_id: str, owner: str, guest_dir: Path, ptys: int,
    cgroup_parent: str | None = None,
) -> dict[str, Any]:
    """The body of POST /containers/create for one sandbox of pool ``c``.

    ``uid`` is the sandbox's own host uid (and gid), ``owner`` this daemon's
    owner label, ``guest_dir`` the installed runner (``guest.install()``),
    ``ptys`` the most PTYs the sandbox may hold (pool/quotas.py), ``cgroup_parent``
    the pool's own cgroup (cgroup.py), or None for the engine's.
    Reads the seccomp profile (cached after the first call); raises what
    ``docker_profile`` raises.
    """
    memory = c.memory_mb * 1024 * 1024
    tmpfs_opts = f"rw,nosuid,nodev,noexec,size={c.tmpfs_mb}m"
    host_config: dict[str, Any] = {
        "NetworkMode": "none",
        "PidsLimit": c.pids_limit,
        "Memory": memory,
        "MemorySwap": memory,  # swap equal to memory: no swap at all
        "NanoCpus": int(c.cpus * 1e9),
        "ReadonlyRootfs": True,
        "Tmpfs": {
            "/tmp": f"{tmpfs_opts},mode=1777",
            WORKDIR: f"{tmpfs_opts},uid={uid},gid={uid},mode=0700",
        },
        "CapDrop": ["ALL"],
        # sandpool's own seccomp allowlist, the one the process tier
        # compiles, instead of the engine's default; Docker takes it inline.
        "SecurityOpt": ["no-new-privileges", f"seccomp={docker_profile()}"],
        # The private IPC namespace's /dev/shm (nosuid, nodev, noexec): Docker's
        # own 64 MiB otherwise, whatever tmpfs_mb says.
        "ShmSize": c.tmpfs_mb * 1024 * 1024,
        "IpcMode": "private",
        "Ulimits": [
            {"Name": "core", "Soft": 0, "Hard": 0},
            {"Name": "nofile", "Soft": 1024, "Hard": 1024},
        ],
        # Output reaches the daemon only through the attached stream, so a
        # flood can never fill the host's disk.
        "LogConfig": {"Type": "none", "Config": {}},
        "AutoRemove": False,
        # Read-only whatever the code does: it cannot change the next
        # sandbox's runner (there is none: each container is used once).
        "Mounts": [{
            "Type": "bind", "Source": str(guest_dir), "Target": guest.GUEST_DIR,
            "ReadOnly": True,
        }],
    }
    labels = {LABEL_POOL: c.name, LABEL_INSTANCE: instance_id, LABEL_OWNER: owner}
    if own_devpts(c):
        host_config["Mounts"].append({
            # A devpts instance of the container's own, with its share of the
            # host's PTYs as max (the engine's has none): an anonymous volume
            # of the local driver, which the engine mounts and removes with
            # the container (delete with v=True). Labelled like the container,
            # so one whose container went without it (lost in a dockerd
            # restart, removed by hand) is found again (reaper.py).
            "Type": "volume", "Target": "/dev/pts",
            "VolumeOptions": {"Labels": labels, "DriverConfig": {"Name": "local", "Options": {
                "type": "devpts", "device": "devpts",
                "o": f"nosuid,noexec,newinstance,ptmxmode=0666,mode=0620,max={ptys}",
            }}},
        })
    if c.runtime:
        host_config["Runtime"] = c.runtime
    if cgroup_parent is not None:
        host_config["CgroupParent"] = cgroup_parent
    return {
        "Image": c.image,
        "Cmd": [
            "python3", "-I", guest.path_in_sandbox(guest.RUNNER),
            *RunnerArguments(RELAY, c.language, preload=list(c.preload)).to_argv(),
        ],
        # No user namespace: the uid is the host's, one per sandbox, so no
        # two sandboxes share a per-user kernel quota (pool/uids.py).
        "User": f"{uid}:{uid}",
        "WorkingDir": WORKDIR,
        "Env": [
            "PATH=/usr/local/bin:/usr/bin:/bin",
            "HOME=" + WORKDIR,
            "LANG=C.UTF-8",
            "PYTHONDONTWRITEBYTECODE=1",
        ],
        "Hostname": "sandbox",
        "NetworkDisabled": True,
        # stdin stays open with no TTY: the request is one frame written on
        # the attached stream and the result comes back as frames on it.
        "OpenStdin": True,
        "StdinOnce": False,
        "AttachStdin": True,
        "AttachStdout": True,
        "AttachStderr": True,
        "Tty": False,
        "Labels": labels,
        "HostConfig": host_config,
    }
