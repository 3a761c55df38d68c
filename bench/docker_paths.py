"""Cold Docker paths and the churn ceiling: a container per request, no pool.

Every container made here carries the label ``sandpool.bench=<run id>`` (and
none of sandpool's own labels, so no daemon's reaper touches it); the harness
lists that label at the end and fails if anything is left.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
import aiohttp

from bench.machine import CpuMeter
from bench.stats import summarize
from bench.workloads import Workload
from pool.backends.docker import DockerBackend
from pool.config import PoolConfig

T = TypeVar("T")
LABEL_RUN = "sandpool.bench"
DOCKER_URL = "unix:///var/run/docker.sock"
# The final leftover check waits this long for an engine that is restarting
# (other suites on this host restart dockerd to test outages).
ENGINE_WAIT_S = 120.0
IMAGE = "sandpool/python:bookworm"  # python -m bench --image changes it, for A/B runs
CALL_TIMEOUT_S = 60.0  # one Docker call; aiodocker's own defaults never time out
# The seed's settings (the `docker run` path sandpool replaced): network disabled,
# read-only, tmpfs /tmp, pids 64, 128 MiB with swap equal to memory, half a CPU.
SEED_SETTINGS: dict[str, Any] = {
    "network_disabled": True,
    "network_mode": "none",
    "read_only": True,
    "tmpfs": {"/tmp": "rw,nosuid,nodev,size=16m"},
    "pids_limit": 64,
    "mem_limit": "128m",
    "memswap_limit": "128m",
    "nano_cpus": 500_000_000,
}


def sandpool_container_config(run_id: str) -> dict[str, Any]:
    """sandpool's hardened container definition (pool/backends/docker/definition.py), labelled.

    Built by the Docker backend itself with a default pool config, so the
    churn ceiling uses exactly the settings the pool's containers get.
    """
    config = DockerBackend(PoolConfig(name="bench", image=IMAGE), run_id).container_config()
    config["Labels"] = {LABEL_RUN: run_id}
    return config


def _cold_config(run_id: str, code: str) -> dict[str, Any]:
    config = copy.deepcopy(sandpool_container_config(run_id))
    config.update(
        Cmd=["python3", "-I", "-c", code], OpenStdin=False, StdinOnce=False,
        AttachStdin=False, AttachStdout=False, AttachStderr=False,
    )
    # The output has to be read back after the container exits.
    config["HostConfig"]["LogConfig"] = {"Type": "json-file", "Config": {}}
    return config


def seed_docker_py(
    run_id: str, workloads: tuple[Workload, ...], samples: int, time_left: Callable[[], float]
) -> dict[str, Any]:
    """docker-py ``containers.run`` + ``wait`` + ``logs`` + ``remove`` per request (the seed)."""
    try:
        import docker  # the bench extra
    except ImportError:
        return {"skipped": "docker-py is not installed (pip install -e '.[bench]')"}
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=120)
    out: dict[str, Any] = {
        "description": "docker-py containers.run(detach) + wait + logs + remove(force), "
                       "one container per request",
        "settings": SEED_SETTINGS,
    }
    try:
        for workload in workloads:
            result_ms: list[float] = []
            total_ms: list[float] = []
            for _ in range(samples + 1):  # the first one warms caches and is dropped
                if len(total_ms) > 1 and time_left() <= 0:  # one kept sample at least
                    break
                began = time.perf_counter()
                container = client.containers.run(
                    IMAGE, ["python3", "-c", workload.code], detach=True,
                    labels={LABEL_RUN: run_id}, **SEED_SETTINGS,
                )
                try:
                    status = container.wait(timeout=60)
                    stdout = container.logs(stdout=True, stderr=False).decode()
                    got_result = time.perf_counter()
                finally:
                    container.remove(force=True)
                ended = time.perf_counter()
                if status["StatusCode"] != 0 or stdout != workload.expected_stdout:
                    raise RuntimeError(f"seed path: wrong result {status} {stdout[:200]!r}")
                result_ms.append((got_result - began) * 1000)
                total_ms.append((ended - began) * 1000)
            out[workload.name] = {
                "result": summarize(result_ms[1:]), "with_remove": summarize(total_ms[1:]),
            }
    finally:
        client.close()
    return out


async def aiodocker_cold(
    run_id: str, workloads: tuple[Workload, ...], samples: int, time_left: Callable[[], float]
) -> dict[str, Any]:
    """aiodocker create + start + wait + logs + delete per request, sandpool's hardening."""
    out: dict[str, Any] = {
        "description": "aiodocker create + start + wait + log + delete(force) per request; "
                       "sandpool's hardened container settings, json-file log driver",
    }
    async with aiodocker.Docker(url=DOCKER_URL) as docker:
        for workload in workloads:
            config = _cold_config(run_id, workload.code)
            result_ms: list[float] = []
            total_ms: list[float] = []
            for _ in range(samples + 1):
                if len(total_ms) > 1 and time_left() <= 0:  # one kept sample at least
                    break
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    began = time.perf_counter()
                    container = await docker.containers.create(config)
                    try:
                        await container.start()
                        status = await container.wait()
                        lines = await container.log(stdout=True, stderr=False)
                        got_result = time.perf_counter()
                    finally:
                        await container.delete(force=True)
                    ended = time.perf_counter()
                stdout = "".join(lines)
                if status["StatusCode"] != 0 or stdout != workload.expected_stdout:
                    raise RuntimeError(f"aiodocker cold: wrong result {status} {stdout[:200]!r}")
                result_ms.append((got_result - began) * 1000)
                total_ms.append((ended - began) * 1000)
            out[workload.name] = {
                "result": summarize(result_ms[1:]), "with_remove": summarize(total_ms[1:]),
            }
    return out


async def churn_ceiling(
    run_id: str, workers: tuple[int, ...], duration_s: float
) -> dict[str, Any]:
    """Raw container create + start + delete per second with 1, 2 and 4 workers.

    Each worker churns one container at a time with sandpool's exact container
    settings (its runner waits on stdin, as in the pool). Sustained single-use
    throughput cannot exceed the best of these rates: every sandpool sandbox
    costs at least one such cycle, plus attach and the runner's start.
    """
    config = sandpool_container_config(run_id)
    results: dict[str, Any] = {}
    async with aiodocker.Docker(url=DOCKER_URL) as docker:

        async def cycle(create_start_ms: list[float], delete_ms: list[float]) -> None:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                began = time.perf_counter()
                container = await docker.containers.create(config)
                try:
                    await container.start()
                    started = time.perf_counter()
                finally:
                    await container.delete(force=True)
                ended = time.perf_counter()
            create_start_ms.append((started - began) * 1000)
            delete_ms.append((ended - started) * 1000)

        async def worker(deadline: float, create_start_ms: list[float],
                         delete_ms: list[float]) -> None:
            while time.perf_counter() < deadline:
                await cycle(create_start_ms, delete_ms)

        for count in workers:
            warm: list[float] = []
            await asyncio.gather(*(cycle(warm, []) for _ in range(count)))
            create_start_ms: list[float] = []
            delete_ms: list[float] = []
            meter = CpuMeter(os.getpid())
            meter.start()
            began = time.perf_counter()
            async with asyncio.TaskGroup() as group:
                for _ in range(count):
                    group.create_task(worker(began + duration_s, create_start_ms, delete_ms))
            elapsed = time.perf_counter() - began  # includes the cycles in flight at the deadline
            host_cpu_s = meter.stop()["host_cpu_s"] or 0.0
            results[str(count)] = {
                "cycles": len(delete_ms),
                "elapsed_s": round(elapsed, 3),
                "ops_per_s": round(len(delete_ms) / elapsed, 2),
                "host_cpu_ms_per_cycle": round(host_cpu_s * 1000 / max(len(delete_ms), 1), 1),
                "create_start": summarize(create_start_ms),
                "delete": summarize(delete_ms),
            }
    best = max(results, key=lambda k: results[k]["ops_per_s"])
    return {
        "description": "aiodocker create + start + delete(force) in a loop per worker, "
                       "sandpool's hardened container definition (runner waiting on stdin)",
        "duration_s_per_level": duration_s,
        "workers": results,
        "ceiling_ops_per_s": results[best]["ops_per_s"],
        "best_workers": int(best),
    }


def container_cpu_ms(container_id: str) -> float | None:
    """CPU the container's processes have used, from its cgroup (v1 or v2), or None."""
    for path, scale in (
        (f"/sys/fs/cgroup/cpuacct/docker/{container_id}/cpuacct.usage", 1e-6),
        (f"/sys/fs/cgroup/cpuacct/system.slice/docker-{container_id}.scope/cpuacct.usage", 1e-6),
        (f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/cpu.stat", 1e-3),
        (f"/sys/fs/cgroup/docker/{container_id}/cpu.stat", 1e-3),
    ):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        if path.endswith("cpu.stat"):
            fields = dict(line.split() for line in text.splitlines() if line.strip())
            return int(fields["usage_usec"]) * scale
        return int(text) * scale
    return None


async def sandbox_start_cpu(run_id: str, samples: int) -> dict[str, Any]:
    """CPU inside one container until its runner is parked, against a bare interpreter.

    The churn ceiling deletes each container before anything in it runs; a
    pool sandbox also starts Python and the runner. Both waits read stdin, with
    sandpool's container definition; CPU comes from the container's cgroup
    once it stops growing.
    """
    runner = sandpool_container_config(run_id)
    variants = {
        "runner": runner,
        "bare_python": {**runner, "Cmd": ["python3", "-I", "-c", "import sys; sys.stdin.read()"]},
    }
    out: dict[str, Any] = {}
    async with aiodocker.Docker(url=DOCKER_URL) as docker:
        for name, config in variants.items():
            used_ms: list[float] = []
            for _ in range(samples):
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    container = await docker.containers.create(config)
                    try:
                        await container.start()
                        used = await _settled_cpu_ms(container.id)
                    finally:
                        await container.delete(force=True)
                if used is None:
                    return {"skipped": "no readable cgroup CPU counter for containers here"}
                used_ms.append(used)
            out[name] = summarize(used_ms)
    return out


async def _settled_cpu_ms(container_id: str) -> float | None:
    """The container's CPU once it has not grown for 0.3 s (at most 10 s)."""
    last, unchanged = None, 0
    for _ in range(100):
        await asyncio.sleep(0.1)
        now = container_cpu_ms(container_id)
        if now is None:
            return None
        unchanged = unchanged + 1 if now == last else 0
        if unchanged == 3:
            break
        last = now
    return last


async def _when_engine_answers(query: Callable[[aiodocker.Docker], Awaitable[T]]) -> T:
    """Run ``query``, waiting up to ENGINE_WAIT_S for an engine that does not answer."""
    deadline = time.monotonic() + ENGINE_WAIT_S
    while True:
        try:
            async with aiodocker.Docker(url=DOCKER_URL) as docker, asyncio.timeout(
                CALL_TIMEOUT_S
            ):
                return await query(docker)
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError) as e:
            unreachable = not isinstance(e, aiodocker.DockerError) or e.status == 900
            if not unreachable or time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


async def list_labelled(label: str) -> list[str]:
    """Ids of all containers (any state) carrying ``label`` (``key`` or ``key=value``)."""

    async def query(docker: aiodocker.Docker) -> list[str]:
        containers = await docker.containers.list(
            all=True, filters=json.dumps({"label": [label]})
        )
        return [str(c.id) for c in containers]

    return await _when_engine_answers(query)


async def remove_labelled(label: str) -> int:
    """Force-remove every container carrying ``label``; how many there were."""
    ids = await list_labelled(label)
    async with aiodocker.Docker(url=DOCKER_URL) as docker:
        for container_id in ids:
            try:
                async with asyncio.timeout(CALL_TIMEOUT_S):
                    await docker.containers.container(container_id).delete(force=True)
            except aiodocker.DockerError as e:
                if e.status != 404:
                    raise
    return len(ids)


async def docker_description() -> tuple[dict[str, Any], dict[str, Any]]:
    """(GET /version, GET /info) of the local engine, once it answers."""

    async def query(docker: aiodocker.Docker) -> tuple[dict[str, Any], dict[str, Any]]:
        return await docker.version(), await docker.system.info()

    return await _when_engine_answers(query)
