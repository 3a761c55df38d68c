"""Cold Docker paths and the churn ceiling: a container per request, no pool.

Every container made here carries the label ``sandpool.bench=<run id>`` (and
none of sandpool's own labels, so no daemon's reaper touches it); the harness
lists that label at the end and fails if anything is left.
"""

from __future__ import annotations

import asyncio
import copy
import functools
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
from bench.workloads import PNG_SIGNATURE, Workload
from pool.backends.docker import DockerBackend
from pool.config import PoolConfig
from pool.wire import MATPLOTLIB_CACHE, WORKDIR

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


def _seed_client() -> Any:
    """A docker-py client, or None when the bench extra is not installed."""
    try:
        import docker  # type: ignore[import-untyped]  # the bench extra, without stubs
    except ImportError:
        return None
    return docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=120)


def _seed_samples(
    client: Any, samples: int, time_left: Callable[[], float],
    run_one: Callable[[], tuple[float, float]],
) -> dict[str, Any]:
    """``run_one()`` (result ms, with-remove ms) ``samples`` + 1 times; the first is dropped."""
    result_ms: list[float] = []
    total_ms: list[float] = []
    for _ in range(samples + 1):  # the first one warms caches and is dropped
        if len(total_ms) > 1 and time_left() <= 0:  # one kept sample at least
            break
        result, total = run_one()
        result_ms.append(result)
        total_ms.append(total)
    return {"result": summarize(result_ms[1:]), "with_remove": summarize(total_ms[1:])}


def seed_docker_py(
    run_id: str, workloads: tuple[Workload, ...], samples: int, time_left: Callable[[], float]
) -> dict[str, Any]:
    """docker-py ``containers.run`` + ``wait`` + ``logs`` + ``remove`` per request (the seed)."""
    client = _seed_client()
    if client is None:
        return {"skipped": "docker-py is not installed (pip install -e '.[bench]')"}
    out: dict[str, Any] = {
        "description": "docker-py containers.run(detach) + wait + logs + remove(force), "
                       "one container per request",
        "settings": SEED_SETTINGS,
    }

    def run_one(workload: Workload) -> tuple[float, float]:
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
        return (got_result - began) * 1000, (ended - began) * 1000

    try:
        for workload in workloads:
            out[workload.name] = _seed_samples(
                client, samples, time_left, functools.partial(run_one, workload))
    finally:
        client.close()
    return out


def seed_docker_py_datasci(
    run_id: str, workload: Workload, image: str, memory_mb: int, cpus: float, samples: int,
    time_left: Callable[[], float], workdir: Path,
) -> dict[str, Any]:
    """The seed's path for the data analysis: a ``docker run`` of ``image`` per request.

    The seed's settings but the pool's memory and CPU; the uploaded files are
    bind-mounted read-only into the working directory, and the script is the
    workload's with ``plt.show()`` replaced by a ``savefig`` into a
    bind-mounted ``out/`` (the result is read once the PNG is read back). The
    image's font cache is copied to a writable MPLCONFIGDIR first, as the
    pool's runner does, else matplotlib rebuilds it in every container.
    """
    client = _seed_client()
    if client is None:
        return {"skipped": "docker-py is not installed (pip install -e '.[bench]')"}
    code = workload.code.replace("plt.show()", 'plt.savefig("out/chart.png")')
    if code == workload.code:
        raise ValueError("the datasci workload must call plt.show()")
    settings = {**SEED_SETTINGS, "mem_limit": f"{memory_mb}m", "memswap_limit": f"{memory_mb}m",
                "nano_cpus": int(cpus * 1e9), "working_dir": WORKDIR,
                "environment": {"MPLCONFIGDIR": "/tmp/matplotlib"}}
    command = ["sh", "-c", f"cp -R {MATPLOTLIB_CACHE} /tmp/matplotlib && exec python3 -c \"$0\"",
               code]
    inputs = workdir / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    volumes = {}
    for path, content in workload.files:
        (inputs / path).write_bytes(content)
        volumes[str(inputs / path)] = {"bind": f"{WORKDIR}/{path}", "mode": "ro"}
    out: dict[str, Any] = {
        "description": f"docker-py containers.run(detach) of {image} + wait + logs + read the "
                       "PNG + remove(force), one container per request; the CSV bind-mounted "
                       "read-only, the PNG written to a bind-mounted out/",
        "settings": {key: value for key, value in settings.items() if key != "environment"},
        "image": image,
        "code": code,
    }
    runs = 0

    def run_one() -> tuple[float, float]:
        nonlocal runs
        runs += 1
        out_dir = workdir / f"out-{runs}"
        out_dir.mkdir()
        out_dir.chmod(0o777)  # the image's user (nobody) writes the PNG
        began = time.perf_counter()
        container = client.containers.run(
            image, command, detach=True, labels={LABEL_RUN: run_id},
            volumes={**volumes, str(out_dir): {"bind": f"{WORKDIR}/out", "mode": "rw"}},
            **settings,
        )
        try:
            status = container.wait(timeout=60)
            stdout = container.logs(stdout=True, stderr=False).decode()
            png = (out_dir / "chart.png").read_bytes() if status["StatusCode"] == 0 else b""
            got_result = time.perf_counter()
            if status["StatusCode"] != 0:
                stderr = container.logs(stdout=False, stderr=True).decode()
                raise RuntimeError(f"cold datasci: exit {status} {stderr[-600:]!r}")
        finally:
            container.remove(force=True)
        ended = time.perf_counter()
        if stdout != workload.expected_stdout or not png.startswith(PNG_SIGNATURE):
            raise RuntimeError(f"cold datasci: wrong result {stdout[:200]!r}, {len(png)} B PNG")
        return (got_result - began) * 1000, (ended - began) * 1000

    try:
        out[workload.name] = _seed_samples(client, samples, time_left, run_one)
    finally:
        client.close()
    return out


_FLOOR_SCRIPT = """\
import contextlib, io, json, shutil, sys, time
shutil.copytree({cache!r}, "/tmp/matplotlib", dirs_exist_ok=True)
import numpy, pandas, matplotlib.pyplot as plt
# The runner's warm-up after preload: one small CSV grouped, one figure to PNG.
pandas.read_csv(io.StringIO("k,v\\na,1\\nb,2\\n")).groupby("k")["v"].sum()
plt.figure().gca().plot([0, 1], [1, 0], label="warm")
plt.legend(); plt.savefig(io.BytesIO(), format="png"); plt.close("all")
code = compile(sys.argv[1], "<workload>", "exec")
wall, cpu, ok = [], [], True
for _ in range({runs}):
    out = io.StringIO()
    began, began_cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(out):
        exec(code, {{"__name__": "__main__"}})
    wall.append((time.perf_counter() - began) * 1000)
    cpu.append((time.process_time() - began_cpu) * 1000)
    ok = ok and out.getvalue() == {expected!r}
print(json.dumps({{"wall_ms": wall, "cpu_ms": cpu, "ok": ok}}))
"""


def datasci_floor(
    run_id: str, workload: Workload, image: str, memory_mb: int, cpus: float, runs: int,
    workdir: Path,
) -> dict[str, Any]:
    """The workload's own cost: run ``runs`` + 1 times in one warm interpreter, in one container.

    No sandbox, no HTTP, no fork: the imports and the runner's warm-up are done
    once before the first run, ``plt.show()`` becomes a PNG rendered into
    memory and the figure closed. The first run is what a preloaded sandbox
    can at best do (its code paths run once); the others, with every lazy
    cache filled, are the floor under any sandbox's latency for this workload
    on this host. Same image, memory and CPU quota as the pool.
    """
    client = _seed_client()
    if client is None:
        return {"skipped": "docker-py is not installed (pip install -e '.[bench]')"}
    code = workload.code.replace(
        "plt.show()", '_png = io.BytesIO(); plt.savefig(_png, format="png"); plt.close("all")')
    code = "import io\n" + code
    script = _FLOOR_SCRIPT.format(cache=MATPLOTLIB_CACHE, runs=runs + 1,
                                  expected=workload.expected_stdout)
    inputs = workdir / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    volumes = {}
    for path, content in workload.files:
        (inputs / path).write_bytes(content)
        volumes[str(inputs / path)] = {"bind": f"{WORKDIR}/{path}", "mode": "ro"}
    container = client.containers.run(
        image, ["python3", "-c", script, code], detach=True, labels={LABEL_RUN: run_id},
        volumes=volumes, working_dir=WORKDIR, environment={"MPLCONFIGDIR": "/tmp/matplotlib"},
        **{**SEED_SETTINGS, "mem_limit": f"{memory_mb}m", "memswap_limit": f"{memory_mb}m",
           "nano_cpus": int(cpus * 1e9)},
    )
    try:
        status = container.wait(timeout=120)
        stdout = container.logs(stdout=True, stderr=False).decode()
        stderr = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
        client.close()
    if status["StatusCode"] != 0:
        raise RuntimeError(f"datasci floor: exit {status} {stderr[-600:]!r}")
    measured = json.loads(stdout)
    if not measured["ok"]:
        raise RuntimeError("datasci floor: wrong output")
    return {
        "description": "the workload exec'd in one warm interpreter (imports done, first run "
                       "dropped), plt.show() replaced by a PNG rendered into memory; one "
                       "container of the image with the pool's memory and cpus",
        "first_run_wall_ms": round(measured["wall_ms"][0], 1),
        "first_run_cpu_ms": round(measured["cpu_ms"][0], 1),
        "wall": summarize(measured["wall_ms"][1:]),
        "cpu": summarize(measured["cpu_ms"][1:]),
    }


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
                        await container.delete(force=True, v=True)
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
                    await container.delete(force=True, v=True)
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
                        await container.delete(force=True, v=True)
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
                    await docker.containers.container(container_id).delete(force=True, v=True)
            except aiodocker.DockerError as e:
                if e.status != 404:
                    raise
    return len(ids)


async def docker_description() -> tuple[dict[str, Any], dict[str, Any]]:
    """(GET /version, GET /info) of the local engine, once it answers."""

    async def query(docker: aiodocker.Docker) -> tuple[dict[str, Any], dict[str, Any]]:
        return await docker.version(), dict(await docker.system.info())

    return await _when_engine_answers(query)
