"""What the numbers were measured on: hardware, kernel, Docker, Python, and how busy it was."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _first(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.partition(":")[2].strip() or line.partition("=")[2].strip('"')
    except OSError:
        return None
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent.parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of one process (all its threads) in seconds; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # Fields 14 and 15 of proc(5), counted after the parenthesised command name.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def pids_named(comm: str) -> list[int]:
    """Pids whose /proc/<pid>/comm is ``comm`` (e.g. containerd)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class CpuMeter:
    """CPU used between ``start()`` and ``stop()``: the daemon, dockerd, containerd, the host.

    Per process in % of one core; the host's busy share in % of all cores. It
    tells whether a limit is the daemon's own event loop or the machine.
    """

    def __init__(self, daemon_pid: int) -> None:
        self.pids = {"daemon": daemon_pid}
        engine = dockerd_pid()
        if engine is not None:
            self.pids["dockerd"] = engine
        for pid in pids_named("containerd")[:1]:
            self.pids["containerd"] = pid
        self._before: dict[str, float | None] = {}
        self._host: tuple[int, int] = (0, 0)
        self._wall = 0.0

    @staticmethod
    def _host_ticks() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    def start(self) -> None:
        self._before = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        self._host = self._host_ticks()
        self._wall = time.monotonic()

    def stop(self) -> dict[str, float | None]:
        wall = max(time.monotonic() - self._wall, 1e-9)
        out: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            now, before = process_cpu_s(pid), self._before.get(name)
            used = None if now is None or before is None else now - before
            out[f"{name}_cpu_percent"] = None if used is None else round(used / wall * 100, 1)
            if name == "daemon":
                out["daemon_cpu_s"] = used
        busy, total = self._host_ticks()
        spent = max(total - self._host[1], 1)
        busy_share = (busy - self._host[0]) / spent
        out["host_busy_percent"] = round(busy_share * 100, 1)
        # Every core's busy time in the window, whoever spent it.
        out["host_cpu_s"] = round(busy_share * (os.cpu_count() or 1) * wall, 3)
        return out


def dockerd_pid() -> int | None:
    """The engine's pid from its pid file: a change during a run means dockerd restarted."""
    try:
        return int(Path("/var/run/docker.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def describe_machine(docker_version: dict[str, Any], docker_info: dict[str, Any]) -> dict[str, Any]:
    """Cores, memory, kernel, distribution, Docker and Python versions, load at start."""
    mem_kib = _first("/proc/meminfo", "MemTotal:")
    os_release = _first("/etc/os-release", "PRETTY_NAME=")
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cores": os.cpu_count(),
        "cpu_model": _first("/proc/cpuinfo", "model name"),
        "memory_mib": int(mem_kib.split()[0]) // 1024 if mem_kib else None,
        "kernel": platform.release(),
        "os": os_release,
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "docker_server": docker_version.get("Version"),
        "docker_api": docker_version.get("ApiVersion"),
        "containerd": next(
            (c.get("Version") for c in docker_version.get("Components") or []
             if c.get("Name") == "containerd"), None,
        ),
        "docker_runtime": docker_info.get("DefaultRuntime"),
        "storage_driver": docker_info.get("Driver"),
        "cgroup": f"v{docker_info.get('CgroupVersion', '?')} ({docker_info.get('CgroupDriver')})",
        "containers_running_at_start": docker_info.get("ContainersRunning"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "dockerd_pid_at_start": dockerd_pid(),
        "sandpool_commit": commit,
        "sandpool_tree_dirty": bool(dirty) if dirty is not None else None,
    }
