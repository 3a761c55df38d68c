"""``python -m bench [--quick]``: the whole benchmark in one run, results in bench/results/.

Order: machine description, churn ceiling, the cold paths (seed docker-py,
aiodocker, llm-sandbox), then a dedicated sandpool daemon with the plain
Python pool of each tier (docker, process, fork, wasm: idle CPU, low-load
latency per pool, open-loop print(1) load per pool; beside the wasm pool on its
memory image, one on the pinned module without) and the preloaded fork
pool (its open-loop print(1) load), then a Docker-only daemon with 16 warm
sandboxes (RSS, idle CPU), then the data analysis (a cold ``docker run`` of
the datasci image, and a daemon with datasci pools in the docker, process and
fork tiers: low-load latency, a warm sandbox's RSS, PSS and USS, open-loop
load; then the fork pool's warm memory again with 16 warm, in a daemon of its
own), then sessions against single use (bench/sessions.py: print(1) per
tier, and a three-step analysis of the same CSV, in a daemon of their own).
Each section has a time budget so the full run stays under 18 minutes; a
section that runs out records fewer samples (``n``). ``--only datasci`` or
``--only sessions`` runs that section alone (with the machine description), as
the full run does it.
Every container and daemon the run starts is gone when it ends, or it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiodocker import Docker as aiodocker_client
from aiodocker import DockerError

from bench import docker_paths, peers, report, sandbox_memory, sandpool_paths, sessions
from bench.daemon import BenchDaemon, DaemonFailed
from bench.machine import CpuMeter, describe_machine, dockerd_pid
from bench.workloads import (
    DATASCI_ROWS,
    Workload,
    build_analysis,
    build_datasci_workload,
    build_workloads,
)
from pool.config import DATASCI_CPUS, DATASCI_IMAGE
from tests.support import processes_in_uid_range

RESULTS = Path(__file__).resolve().parent / "results"
# Quick runs (make bench-quick, the test suite) must not litter bench/results/.
QUICK_RESULTS = Path(__file__).resolve().parent.parent / ".state" / "bench-quick"


@dataclass(frozen=True)
class Mode:
    name: str
    budget_s: float
    churn_s: float
    cold_samples: int
    seed_budget_s: float
    aiodocker_budget_s: float
    llm_session_budget_s: float
    llm_pool_budget_s: float
    latency_samples: int
    latency_budget_s: float  # per pool and workload, scaled by the backend's pacing
    idle_window_s: float
    load_step_s: dict[str, float]  # per backend
    load_steps: int
    load_budget_s: dict[str, float]  # per backend
    rss_warm: int
    docker_rate_fractions: tuple[float, ...]
    start_cpu_samples: int
    datasci_cold_samples: int
    datasci_floor_runs: int
    datasci_cold_budget_s: float
    datasci_latency_samples: int
    datasci_print1_samples: int
    datasci_latency_budget_s: float
    datasci_load_step_s: dict[str, float]  # per backend
    datasci_load_steps: int
    datasci_load_budget_s: dict[str, float]  # per backend
    sessions_print1_samples: int  # pairs: one single-use run and one session run
    sessions_cycles: int  # session create + delete
    sessions_print1_budget_s: dict[str, float]  # per backend, both paths together
    sessions_analysis_repetitions: int  # each one analysis per path
    sessions_analysis_budget_s: dict[str, float]  # per backend
    sessions_datasci_backends: tuple[str, ...]  # the datasci pools of the sessions daemon
    pool_sizes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    datasci_sizes: dict[str, tuple[int, int, int]] = field(default_factory=dict)


FULL = Mode(
    name="full", budget_s=1080, churn_s=8.0, cold_samples=30, seed_budget_s=35,
    aiodocker_budget_s=40, llm_session_budget_s=40, llm_pool_budget_s=25,
    latency_samples=200, latency_budget_s=45, idle_window_s=10.0,
    # Docker rates are a few per second: longer steps, so each counts enough arrivals.
    # Docker steps are long enough that the 8 warm sandboxes a step starts
    # with cannot hide a refill rate below the arrival rate (a backlog shows).
    # Fork rates reach hundreds per second: a 3 s step counts hundreds of
    # arrivals, and eight of them (20/s to 537/s) fit a budget of 35 s; the
    # preloaded fork pool's (10/s to 268/s) too.
    load_step_s={"docker": 15.0, "process": 6.0, "wasm": 6.0, "fork": 3.0}, load_steps=8,
    # The fork tier's sections took the docker load test's and the peers' last
    # ~100 s (a full run measured 982 s before): the run stays under 15 minutes
    # (16 with the sessions section, ~100 s more; 18 with the pinned wasm
    # module's pool beside python-wasm, ~140 s more).
    load_budget_s={"docker": 90.0, "process": 50.0, "wasm": 50.0, "fork": 35.0},
    rss_warm=16,
    docker_rate_fractions=(0.5, 0.75, 0.9, 1.0, 1.1, 1.25), start_cpu_samples=8,
    datasci_cold_samples=12, datasci_floor_runs=30, datasci_cold_budget_s=60,
    datasci_latency_samples=100, datasci_print1_samples=30, datasci_latency_budget_s=50,
    datasci_load_step_s={"docker": 12.0, "process": 12.0, "fork": 4.0}, datasci_load_steps=7,
    datasci_load_budget_s={"docker": 60.0, "process": 60.0, "fork": 30.0},
    # ~90 s with the daemon's start: a Docker pair or analysis waits for a refill
    # (a datasci sandbox's start is ~1 s of CPU), a fork one hardly.
    sessions_print1_samples=60, sessions_cycles=8,
    sessions_print1_budget_s={"docker": 6.0, "process": 3.0, "fork": 3.0},
    sessions_analysis_repetitions=9,
    sessions_analysis_budget_s={"docker": 18.0, "process": 12.0, "fork": 6.0},
    sessions_datasci_backends=("docker", "process", "fork"),
)
QUICK = Mode(
    name="quick", budget_s=95, churn_s=0.8, cold_samples=1, seed_budget_s=4,
    aiodocker_budget_s=4, llm_session_budget_s=3, llm_pool_budget_s=3,
    latency_samples=6, latency_budget_s=2, idle_window_s=1.0,
    load_step_s={"docker": 1.5, "process": 1.5, "wasm": 1.5, "fork": 1.5}, load_steps=2,
    load_budget_s={"docker": 6.0, "process": 6.0, "wasm": 6.0, "fork": 6.0}, rss_warm=4,
    docker_rate_fractions=(0.25, 0.5), start_cpu_samples=1,
    pool_sizes={"docker": (2, 4, 2), "process": (2, 4, 2), "wasm": (2, 4, 1),
                "fork": (2, 4, 2)},
    datasci_cold_samples=1, datasci_floor_runs=2, datasci_cold_budget_s=5,
    datasci_latency_samples=4, datasci_print1_samples=3, datasci_latency_budget_s=3,
    datasci_load_step_s={"docker": 1.5, "process": 1.5, "fork": 1.5}, datasci_load_steps=2,
    datasci_load_budget_s={"docker": 6.0, "process": 6.0, "fork": 6.0},
    datasci_sizes={"docker": (1, 2, 1), "process": (1, 2, 1), "fork": (2, 4, 2)},
    sessions_print1_samples=2, sessions_cycles=1,
    sessions_print1_budget_s={"docker": 1.0, "process": 1.0, "fork": 1.0},
    sessions_analysis_repetitions=1,
    sessions_analysis_budget_s={"docker": 1.0, "process": 1.0, "fork": 1.0},
    # The fork tier's datasci pool alone: it starts in a second, where a docker
    # or process one imports the preload per sandbox; every tier runs the same
    # code of the section, and the plain pools cover each tier's sessions.
    sessions_datasci_backends=("fork",),
)
GEOMETRIC_STEP = 1.6  # process and wasm: rates rise by this factor per step
CPU_BOUND_PERCENT = 85.0  # a load step this busy (all cores) counts as CPU-bound


class Clock:
    """The run's global deadline, and per-section budgets inside it."""

    def __init__(self, budget_s: float) -> None:
        self.began = time.monotonic()
        self.deadline = self.began + budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def section(self, budget_s: float) -> Callable[[], float]:
        end = min(time.monotonic() + budget_s, self.deadline)
        return lambda: end - time.monotonic()

    def share(self, budget_s: float, budgets_left_s: float) -> Callable[[], float]:
        """A section of ``budget_s``, or of its share of what is left of the run when that
        is less than ``budgets_left_s`` (the budgets of this section and of those still to
        come): when the run is late each is cut in proportion, and the last is measured too.
        """
        now = time.monotonic()
        fair_s = max(0.0, self.deadline - now) * budget_s / max(budgets_left_s, budget_s)
        end = now + min(budget_s, fair_s)
        return lambda: end - time.monotonic()


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _section(doc: dict[str, Any], name: str, run: Callable[[], Any]) -> Any:
    """Run one section; an exception becomes an ``error`` entry and a line in ``errors``."""
    began = time.monotonic()
    print(f"bench: {name} ...", file=sys.stderr, flush=True)
    try:
        result = run()
    except Exception as e:  # one failed section must not lose the others' numbers
        message = f"{name}: {type(e).__name__}: {e}"
        doc["errors"].append(message)
        print(f"bench: {message}", file=sys.stderr, flush=True)
        result = {"error": f"{type(e).__name__}: {e}"}
    if isinstance(result, dict):
        result.setdefault("section_s", round(time.monotonic() - began, 1))
    print(f"bench: {name} done in {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
    return result


def _part(doc: dict[str, Any], name: str, run: Callable[..., dict[str, Any]], *args: Any,
          **kwargs: Any) -> dict[str, Any]:
    """``run(*args, **kwargs)`` inside a section: a failure is recorded and the section goes on."""
    try:
        return run(*args, **kwargs)
    except Exception as e:  # the other pools' numbers are still worth having
        message = f"{name}: {type(e).__name__}: {e}"
        doc["errors"].append(message)
        _say(message)
        return {"error": f"{type(e).__name__}: {e}"}


def _idle_cpu(daemon: BenchDaemon, window_s: float) -> dict[str, Any]:
    cpu_before, wall_before = daemon.cpu_s(), time.monotonic()
    time.sleep(window_s)
    cpu_s, wall_s = daemon.cpu_s() - cpu_before, time.monotonic() - wall_before
    return {"window_s": round(wall_s, 2), "cpu_s": round(cpu_s, 3),
            "cpu_percent_of_one_core": round(cpu_s / wall_s * 100, 3)}


def _load_rates(plan: sandpool_paths.PoolPlan, mode: Mode, ceiling: float | None) -> list[float]:
    if plan.backend == "docker" and ceiling:
        # Quick mode only checks the mechanics: enough arrivals to count.
        floor = 2.0 if mode is QUICK else 0.0
        return [max(floor, round(ceiling * f, 2)) for f in mode.docker_rate_fractions]
    return [round(plan.first_load_rate_per_s * GEOMETRIC_STEP**i, 2)
            for i in range(mode.load_steps)]


def churn(run_id: str, mode: Mode) -> dict[str, Any]:
    """The churn ceiling, and what a pool sandbox costs beyond a churn cycle."""
    out = asyncio.run(docker_paths.churn_ceiling(run_id, (1, 2, 4), mode.churn_s))
    out["sandbox_start_cpu"] = asyncio.run(
        docker_paths.sandbox_start_cpu(run_id, mode.start_cpu_samples))
    return out


def run_sandpool(doc: dict[str, Any], mode: Mode, clock: Clock, workloads: tuple[Workload, ...],
                 workdir: Path, daemons: list[BenchDaemon]) -> dict[str, Any]:
    """The benchmark daemon: idle CPU, low-load latency and the load test per pool."""
    plans = sandpool_paths.plan_pools(mode.pool_sizes.get("docker"))
    if mode.pool_sizes:
        sized = []
        for plan in plans:
            min_idle, max_size, concurrency = mode.pool_sizes.get(plan.backend, (2, 4, 2))
            sized.append(dataclasses.replace(plan, min_idle=min_idle, max_size=max_size,
                                             start_concurrency=concurrency))
        plans = sized
    out: dict[str, Any] = {"pools_not_started": {}}
    for plan in [p for p in plans if p.image and not _image_present(p.image)]:
        out["pools_not_started"][plan.name] = f"the image {plan.image} is not built"
        plans.remove(plan)
    out["config"] = sandpool_paths.daemon_config(plans)
    daemon = BenchDaemon(workdir / "daemon", out["config"])
    daemons.append(daemon)
    while True:
        try:
            daemon.start()
            break
        except DaemonFailed as e:
            # A default pool whose backend cannot start on this host (a missing
            # library, no bwrap) is recorded and left out; the others are measured.
            others = [p for p in plans if p.backend != "docker"]
            if not others:
                raise
            failed = [p for p in others if f"{p.backend} backend" in str(e)
                      or f"backends/{p.backend}.py" in str(e)
                      or f"backends/{p.backend}/" in str(e)
                      or f"{p.backend} tier" in str(e)] or others
            out["pools_not_started"].update({p.name: str(e)[-600:] for p in failed})
            _say(f"left out {', '.join(p.name for p in failed)}: the daemon failed to start")
            daemon.stop()
            plans = [p for p in plans if p not in failed]
            out["config"] = sandpool_paths.daemon_config(plans)
            daemon = BenchDaemon(workdir / f"daemon-{len(daemons)}", out["config"])
            daemons.append(daemon)
    _say(f"daemon {daemon.instance_id} ready after {daemon.ready_after_s:.1f} s")
    out["instance"] = daemon.instance_id
    out["ready_after_s"] = round(daemon.ready_after_s, 2)
    served = {p["name"]: p for p in daemon.pools()}  # what the daemon really serves
    out["pools"] = list(served.values())
    plans = [p for p in plans if p.name in served]
    time.sleep(min(2.0, mode.idle_window_s))  # let the last starts' bookkeeping settle
    out["rss_warm_mib"] = round(daemon.rss_kib() / 1024, 1)
    out["idle_cpu"] = _idle_cpu(daemon, mode.idle_window_s)
    out["api_floor"] = sandpool_paths.api_floor(daemon.socket, mode.latency_samples, 0.002)
    out["api_floor_paced"] = sandpool_paths.api_floor(
        daemon.socket, mode.latency_samples, 1 / sandpool_paths.LOW_LOAD_RATE["process"])

    out["latency"] = {}
    for plan in plans:
        if plan.preload:  # its print(1) latency is measured beside its data analysis
            continue
        entry: dict[str, Any] = {"backend": plan.backend}
        rate = plan.low_load_rate_per_s
        for workload in workloads:
            daemon.wait_idle(plan.name, plan.min_idle)
            budget = clock.section(mode.latency_budget_s * (5.0 / rate if rate < 5 else 1.0))
            entry[workload.name] = _part(
                doc, f"{plan.name} {workload.name} latency", sandpool_paths.low_load_latency,
                daemon.socket, plan.name, workload, mode.latency_samples, rate, budget)
            _say(f"{plan.name} {workload.name}: e2e {entry[workload.name].get('e2e')}")
        out["latency"][plan.name] = entry

    ceiling = doc["churn_ceiling"].get("ceiling_ops_per_s")
    out["load"] = {}
    print1 = workloads[0]
    for plan in plans:
        budget = clock.section(mode.load_budget_s.get(plan.backend, 50.0))
        load = _part(
            doc, f"{plan.name} load", sandpool_paths.load_test,
            daemon.socket, plan.name, print1, _load_rates(plan, mode, ceiling),
            mode.load_step_s.get(plan.backend, 6.0), budget,
            settle=lambda name=plan.name, floor=plan.min_idle: daemon.wait_idle(name, floor),
            meter=CpuMeter(daemon.pid),
        )
        load["backend"] = plan.backend
        load["pool_settings"] = {"min_idle": plan.min_idle, "max_size": plan.max_size,
                                 "start_concurrency": plan.start_concurrency,
                                 "preload": list(plan.preload)}
        out["load"][plan.name] = load
        _say(f"{plan.name} load: sustained {load.get('sustained_ok_per_s')}/s, "
             f"peak {load.get('peak_ok_per_s')}/s, {load.get('stopped')}")
    out["rss_after_load_mib"] = round(daemon.rss_kib() / 1024, 1)
    out["peak_rss_mib"] = round(daemon.hwm_kib() / 1024, 1)
    docker_load = next((v for v in out["load"].values() if v["backend"] == "docker"), None)
    if docker_load and ceiling and docker_load.get("steps"):
        churn_levels = doc["churn_ceiling"]["workers"]
        churn_cpu_ms = churn_levels[str(doc["churn_ceiling"]["best_workers"])].get(
            "host_cpu_ms_per_cycle")
        # Host CPU per request where the pool was busiest: its full cost per
        # sandbox, comparable with a churn cycle's only if the host was as busy.
        busiest = max(docker_load["steps"], key=lambda st: st["achieved_ok_per_s"])
        cpu_bound = (busiest.get("cpu") or {}).get("host_busy_percent", 0) >= CPU_BOUND_PERCENT
        sandbox_cpu_ms = busiest.get("host_cpu_ms_per_request") if cpu_bound else None
        out["docker_vs_ceiling"] = {
            "churn_host_cpu_ms_per_cycle": churn_cpu_ms,
            "sandbox_host_cpu_ms_per_request": sandbox_cpu_ms,
            # On a CPU-bound host, the share of the ceiling single-use work can reach.
            "cpu_bound_fraction": round(churn_cpu_ms / sandbox_cpu_ms, 3)
            if churn_cpu_ms and sandbox_cpu_ms else None,
            "ceiling_ops_per_s": ceiling,
            "peak_ok_per_s": docker_load["peak_ok_per_s"],
            "peak_fraction": round(docker_load["peak_ok_per_s"] / ceiling, 3),
            "sustained_ok_per_s": docker_load["sustained_ok_per_s"],
            "sustained_fraction": round((docker_load["sustained_ok_per_s"] or 0) / ceiling, 3),
        }
    out["stop_status"] = daemon.stop()
    out["leftover_containers"] = len(asyncio.run(
        docker_paths.list_labelled(f"sandpool.instance={daemon.instance_id}")))
    return out


def run_rss(mode: Mode, workdir: Path, daemons: list[BenchDaemon]) -> dict[str, Any]:
    """A Docker-only daemon with ``rss_warm`` warm sandboxes: its RSS and idle CPU."""
    warm = mode.rss_warm
    config = (
        "# Written by bench/: RSS with warm Docker sandboxes.\n[server]\n"
        'metrics_address = "off"\n\n[pools.python]\nbackend = "docker"\n'
        f'image = "{docker_paths.IMAGE}"\nmin_idle = {warm}\nmax_size = {warm}\n'
        "start_concurrency = 4\n"
    )
    daemon = BenchDaemon(workdir / "rss-daemon", config)
    daemons.append(daemon)
    daemon.start()
    daemon.wait_idle("python", warm)
    time.sleep(min(2.0, mode.idle_window_s))
    pools = daemon.pools()
    out = {
        "warm_docker_sandboxes": pools[0]["idle"],
        "rss_mib": round(daemon.rss_kib() / 1024, 2),
        "threads": daemon.threads(),
        "ready_after_s": round(daemon.ready_after_s, 2),
        "config": config,
        "idle_cpu": _idle_cpu(daemon, mode.idle_window_s),
    }
    out["stop_status"] = daemon.stop()
    out["leftover_containers"] = len(asyncio.run(
        docker_paths.list_labelled(f"sandpool.instance={daemon.instance_id}")))
    return out


def _image_present(image: str) -> bool:
    async def query() -> bool:
        async with aiodocker_client() as docker:
            try:
                await docker.images.inspect(image)
            except DockerError as e:
                if e.status == 404:
                    return False
                raise
        return True

    return asyncio.run(query())


def _datasci_rates(plan: sandpool_paths.PoolPlan, mode: Mode) -> list[float]:
    return [round(plan.first_load_rate_per_s * GEOMETRIC_STEP**i, 2)
            for i in range(mode.datasci_load_steps)]


def _sandbox_memory(daemon: BenchDaemon, plan: sandpool_paths.PoolPlan) -> dict[str, Any]:
    """RSS, PSS and USS of the pool's warm sandboxes, all idle (its min_idle of them);
    for a fork pool also its template's."""
    if not daemon.wait_idle(plan.name, plan.min_idle):
        raise RuntimeError(f"{plan.name} did not get back to {plan.min_idle} idle sandboxes")
    time.sleep(0.5)  # a refill's last bookkeeping
    if plan.backend == "docker":
        roots = asyncio.run(sandbox_memory.docker_sandbox_roots(daemon.instance_id, plan.name))
        return sandbox_memory.warm_sandboxes(roots)
    return sandbox_memory.cgroup_sandboxes(daemon.pid, daemon.instance_id, plan.name)


def run_datasci(doc: dict[str, Any], mode: Mode, clock: Clock, run_id: str, workload: Workload,
                workdir: Path, daemons: list[BenchDaemon]) -> dict[str, Any]:
    """The data analysis: a cold docker run, then datasci pools in the docker, process and
    fork tiers."""
    image = DATASCI_IMAGE
    if not _image_present(image):
        return {"skipped": f"the image {image} is not built (make setup, or "
                           "sandpool image build --profile datasci)"}
    plans = sandpool_paths.datasci_plans(mode.datasci_sizes or None)
    out: dict[str, Any] = {}
    out["cold"] = _part(
        doc, "datasci cold docker run", docker_paths.seed_docker_py_datasci, run_id, workload,
        image, sandpool_paths.DATASCI_MEMORY_MB, DATASCI_CPUS,
        mode.datasci_cold_samples, clock.section(mode.datasci_cold_budget_s),
        workdir / "datasci-cold")
    _say(f"datasci cold: {_get(out, 'cold', workload.name, 'result')}")
    out["floor"] = _part(
        doc, "datasci floor", docker_paths.datasci_floor, run_id, workload, image,
        sandpool_paths.DATASCI_MEMORY_MB, DATASCI_CPUS,
        mode.datasci_floor_runs, workdir / "datasci-floor")
    _say(f"datasci floor: {out['floor'].get('wall')}")
    out["config"] = sandpool_paths.daemon_config(plans)
    out["pools_not_started"] = {}
    daemon = BenchDaemon(workdir / "datasci-daemon", out["config"])
    daemons.append(daemon)
    try:
        daemon.start()
    except DaemonFailed as e:
        # Without bubblewrap (or not root) the process and fork tiers cannot
        # start: the docker tier is still measured.
        others = [p for p in plans if p.backend != "docker"]
        if not others:
            raise
        failed = [p for p in others if p.name in str(e) or f"backends/{p.backend}/" in str(e)
                  or f"{p.backend} tier" in str(e)] or others
        out["pools_not_started"] = {p.name: str(e)[-600:] for p in failed}
        _say(f"left out {', '.join(p.name for p in failed)}: the daemon failed to start")
        daemon.stop()
        plans = [p for p in plans if p not in failed]
        out["config"] = sandpool_paths.daemon_config(plans)
        daemon = BenchDaemon(workdir / "datasci-daemon-fewer", out["config"])
        daemons.append(daemon)
        daemon.start()
    _say(f"datasci daemon {daemon.instance_id} ready after {daemon.ready_after_s:.1f} s")
    out["instance"] = daemon.instance_id
    out["ready_after_s"] = round(daemon.ready_after_s, 2)
    out["pools"] = daemon.pools()
    served = {p["name"] for p in out["pools"]}
    plans = [p for p in plans if p.name in served]
    out["pool_settings"] = {p.name: {"backend": p.backend, "min_idle": p.min_idle,
                                     "max_size": p.max_size,
                                     "start_concurrency": p.start_concurrency,
                                     "memory_mb": p.memory_mb, "cpus": p.cpus,
                                     "preload": list(p.preload)} for p in plans}
    out["latency"], out["print1_latency"], out["memory"], out["load"] = {}, {}, {}, {}
    print1 = build_workloads()[0]
    for plan in plans:
        daemon.wait_idle(plan.name, plan.min_idle)
        latency = _part(
            doc, f"{plan.name} datasci latency", sandpool_paths.low_load_latency,
            daemon.socket, plan.name, workload, mode.datasci_latency_samples,
            plan.low_load_rate_per_s, clock.section(mode.datasci_latency_budget_s))
        latency["backend"] = plan.backend
        out["latency"][plan.name] = latency
        _say(f"{plan.name} datasci: e2e {latency.get('e2e')}")
        # What a preloaded sandbox adds to any request, the analysis aside.
        daemon.wait_idle(plan.name, plan.min_idle)
        out["print1_latency"][plan.name] = _part(
            doc, f"{plan.name} print(1) latency", sandpool_paths.low_load_latency,
            daemon.socket, plan.name, print1, mode.datasci_print1_samples,
            plan.low_load_rate_per_s, clock.section(mode.datasci_latency_budget_s / 2))
        out["memory"][plan.name] = _part(doc, f"{plan.name} memory", _sandbox_memory, daemon, plan)
        _say(f"{plan.name} warm sandbox memory: {out['memory'][plan.name]}")
    # Each load test gets at most its share of what is left of the run, so that
    # the last pool is measured too when the run is late.
    budgets_s = [mode.datasci_load_budget_s[plan.backend] for plan in plans]
    for index, plan in enumerate(plans):
        load = _part(
            doc, f"{plan.name} datasci load", sandpool_paths.load_test,
            daemon.socket, plan.name, workload, _datasci_rates(plan, mode),
            mode.datasci_load_step_s[plan.backend],
            clock.share(budgets_s[index], sum(budgets_s[index:])),
            settle=lambda name=plan.name, floor=plan.min_idle: daemon.wait_idle(name, floor),
            meter=CpuMeter(daemon.pid),
        )
        load["backend"] = plan.backend
        load["pool_settings"] = out["pool_settings"][plan.name]
        out["load"][plan.name] = load
        _say(f"{plan.name} datasci load: sustained {load.get('sustained_ok_per_s')}/s, "
             f"peak {load.get('peak_ok_per_s')}/s, {load.get('stopped')}")
    out["stop_status"] = daemon.stop()
    out["leftover_containers"] = len(asyncio.run(
        docker_paths.list_labelled(f"sandpool.instance={daemon.instance_id}")))
    fork = next((plan for plan in plans if plan.backend == "fork"), None)
    if fork is not None:
        out["memory_many"] = {fork.name: _part(
            doc, f"{fork.name} memory, {mode.rss_warm} warm", _fork_memory_many, fork,
            mode.rss_warm, workdir, daemons)}
        _say(f"{fork.name} with {mode.rss_warm} warm: {out['memory_many'][fork.name]}")
    return out


def _fork_memory_many(plan: sandpool_paths.PoolPlan, warm: int, workdir: Path,
                      daemons: list[BenchDaemon]) -> dict[str, Any]:
    """A fork pool's warm sandbox memory with ``warm`` of them idle, in a daemon of its
    own: their PSS shares the template's pages among more processes than at min_idle."""
    many = dataclasses.replace(plan, min_idle=warm, max_size=warm)
    daemon = BenchDaemon(workdir / f"{plan.name}-{warm}-warm", sandpool_paths.daemon_config([many]))
    daemons.append(daemon)
    daemon.start()
    try:
        return {"warm": warm, **_sandbox_memory(daemon, many)}
    finally:
        daemon.stop()


def run_sessions(doc: dict[str, Any], mode: Mode, clock: Clock, workload: Workload,
                 workdir: Path, daemons: list[BenchDaemon]) -> dict[str, Any]:
    """Sessions against single use, in a daemon of their own (bench/sessions.py):
    print(1) and create + delete per tier, then the three-step analysis per datasci pool."""
    section = sessions.plan(mode.sessions_datasci_backends)
    out: dict[str, Any] = {"pools_not_started": {}}
    image = DATASCI_IMAGE
    if not _image_present(image):
        missing = {p.name for p in section.pools if p.image == image}
        out["pools_not_started"] = dict.fromkeys(
            missing, f"the image {image} is not built (sandpool image build --profile datasci)")
        section = section.without(missing)
    daemon, section, not_started = sessions.start(section, workdir, daemons, _say)
    out["pools_not_started"].update(not_started)
    _say(f"sessions daemon {daemon.instance_id} ready after {daemon.ready_after_s:.1f} s")
    out["config"] = daemon.config_text
    out["instance"] = daemon.instance_id
    out["ready_after_s"] = round(daemon.ready_after_s, 2)
    out["pools"] = daemon.pools()
    backend = {p.name: p.backend for p in section.pools}
    out["print1"], out["analysis"] = {}, {}
    for name in section.print1_pools:
        entry = out["print1"][name] = _part(
            doc, f"sessions {name} print(1)", sessions.print1_side_by_side, daemon.socket,
            name, backend[name], mode.sessions_print1_samples, mode.sessions_cycles,
            clock.section(mode.sessions_print1_budget_s[backend[name]]))
        _say(f"sessions {name} print(1) p50: single use "
             f"{_get(entry, 'single_use', 'e2e', 'p50_ms')} ms, session "
             f"{_get(entry, 'session', 'e2e', 'p50_ms')} ms, create + delete "
             f"{_get(entry, 'create_plus_delete', 'p50_ms')} ms")
    analysis = build_analysis(workload)
    for name in section.analysis_pools:
        entry = out["analysis"][name] = _part(
            doc, f"sessions {name} analysis", sessions.analysis_side_by_side, daemon.socket,
            name, backend[name], analysis, mode.sessions_analysis_repetitions,
            clock.section(mode.sessions_analysis_budget_s[backend[name]]))
        _say(f"sessions {name} analysis p50: single use "
             f"{_get(entry, 'single_use', 'total', 'p50_ms')} ms, session "
             f"{_get(entry, 'session', 'total', 'p50_ms')} ms")
    with daemon.client() as client:
        # Every session above was deleted: none may be left, and no sandbox leased.
        out["sessions_left"] = len(client.request("GET", "/v1/sessions")["sessions"])
        out["leased_left"] = sum(p["leased"] for p in client.pools())
    out["stop_status"] = daemon.stop()
    out["leftover_containers"] = len(asyncio.run(
        docker_paths.list_labelled(f"sandpool.instance={daemon.instance_id}")))
    out["leftover_sandbox_processes"] = len(
        processes_in_uid_range(sessions.UID_BASE, sessions.UID_COUNT))
    return out


ONLY = ("datasci", "sessions")  # the sections --only runs alone
REFERENCE_NAME = re.compile(r"\d{4}-\d{2}-\d{2}\.json")


def reference_run(out_dir: Path, own_name: str) -> dict[str, Any] | None:
    """The latest full run in ``out_dir`` named by its date alone, other than this one.

    Its print(1) p50 per backend, to compare this run's with: a comparison
    across runs, so across whatever else the host was doing then.
    """
    names = sorted(p.name for p in out_dir.glob("*.json")
                   if REFERENCE_NAME.fullmatch(p.name) and p.stem != own_name)
    for name in reversed(names):
        old = json.loads((out_dir / name).read_text())
        if old.get("mode") != "full":
            continue
        latency = (old.get("sandpool") or {}).get("latency") or {}
        return {"name": old["name"], "started_at": old.get("started_at"),
                "loadavg_at_start": (old.get("machine") or {}).get("loadavg_at_start"),
                "print1_p50_ms": {backend: _get(entry, "print1", "e2e", "p50_ms")
                                  for backend, (_, entry) in plain_pools(latency).items()}}
    return None


def plain_pools(latency: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each backend's plain pool in a run's latency section, by backend: (name, entry).

    The first of a backend is the tier's own (``plan_pools`` lists it first); a
    later one of the same backend (the pinned wasm module's, say) is not. What
    a run's targets and the next run's reference both compare.
    """
    pools: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, entry in latency.items():
        pools.setdefault(entry["backend"], (name, entry))
    return pools


def _get(doc: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """sandpool's own targets against this run's numbers (met is None when not measured)."""
    sp = doc["sandpool"]
    pools = plain_pools(sp.get("latency") or {})
    rows: list[dict[str, Any]] = []

    def add(target: str, value: float | None, limit: float, unit: str, *, at_least: bool = False,
            detail: str = "") -> None:
        if value is None:
            rows.append({"target": target, "measured": "not measured", "value": None,
                         "met": None})
            return
        met = value >= limit if at_least else value <= limit
        shown = f"{value:.3g}{unit}" + (f" ({detail})" if detail else "")
        rows.append({"target": target, "measured": shown, "value": value, "met": met})

    docker = pools.get("docker", (None, {}))[1]
    add("docker pool p50 ≤ 3 ms (print(1), low load)", _get(docker, "print1", "e2e", "p50_ms"),
        3.0, " ms")
    add("docker pool p99 ≤ 10 ms (print(1), low load)", _get(docker, "print1", "e2e", "p99_ms"),
        10.0, " ms")
    seed = _get(doc, "cold_paths", "seed_docker_py", "print1", "result", "p50_ms")
    ours = _get(docker, "print1", "e2e", "p50_ms")
    add("docker pool ≥ 50x faster than the seed's path (p50, print(1))",
        round(seed / ours, 1) if seed and ours else None, 50.0, "x", at_least=True,
        detail=f"seed {seed:.0f} ms" if seed else "")
    add("hand-out p99 ≤ 1 ms (docker, idle sandbox)",
        _get(docker, "print1", "handout_idle", "p99_ms"), 1.0, " ms")
    versus = sp.get("docker_vs_ceiling") or {}
    add("sustained single-use throughput ≥ 90 % of the churn ceiling",
        versus.get("sustained_fraction"), 0.9, "", at_least=True,
        detail=f"{versus.get('sustained_ok_per_s')}/s of {versus.get('ceiling_ops_per_s')}/s; "
        f"CPU bound {versus.get('cpu_bound_fraction')}" if versus else "")
    add("process pool p50 ≤ 1.5 ms", _get(pools.get("process", (None, {}))[1],
                                          "print1", "e2e", "p50_ms"), 1.5, " ms")
    add("wasm pool p50 ≤ 3 ms", _get(pools.get("wasm", (None, {}))[1],
                                     "print1", "e2e", "p50_ms"), 3.0, " ms")
    wasm_name = pools.get("wasm", ("python-wasm", {}))[0]
    load = (sp.get("load") or {}).get(wasm_name) or {}
    pinned = (sp.get("load") or {}).get(sandpool_paths.PINNED_WASM_POOL) or {}
    detail = _load_detail(load) + (f"; `{sandpool_paths.PINNED_WASM_POOL}` (no image) "
                                   f"{pinned.get('sustained_ok_per_s')}/s" if pinned else "")
    add(f"wasm pool `{wasm_name}` from a memory image: sustained single-use print(1) ≥ 50/s",
        load.get("sustained_ok_per_s"), 50.0, "/s", at_least=True, detail=detail)
    datasci = doc.get("datasci") or {}
    fork_targets(doc, pools, datasci, add)
    cold = _get(datasci, "cold", "datasci", "result", "p50_ms")
    for plan in sandpool_paths.datasci_plans():
        name, entry = plan.name, (datasci.get("latency") or {}).get(plan.name) or {}
        ours = _get(entry, "e2e", "p50_ms")
        add(f"datasci pool `{name}` ({plan.backend}) p50 ≤ 80 ms (1 MB CSV, pandas, "
            "one PNG)", ours, 80.0, " ms")
        add(f"datasci pool `{name}` ≥ 10x faster than a cold docker run (p50, same run)",
            round(cold / ours, 1) if cold and ours else None, 10.0, "x", at_least=True,
            detail=f"cold {cold:.0f} ms" if cold else "")
    reference = doc.get("reference") or {}
    for backend in ("docker", "process", "fork", "wasm"):
        entry = pools.get(backend, (None, {}))[1]
        before = (reference.get("print1_p50_ms") or {}).get(backend)
        now = _get(entry, "print1", "e2e", "p50_ms")
        # Unchanged: within 25 % or 0.5 ms of the reference run's p50, whichever is wider
        # (run-to-run spread on this shared host is about that).
        limit = max(before * 1.25, before + 0.5) if before else 0.0
        bound = f"≤ {limit:.2f} ms" if before else f"that run has no {backend} pool"
        add(f"{backend} pool print(1) p50 unchanged since {reference.get('name')} "
            f"({bound}; across runs)", now if before else None, limit, " ms",
            detail=f"then {before:.2f} ms" if before else "")
    rss = sp.get("rss") or {}
    add(f"daemon RSS ≤ 80 MB with {rss.get('warm_docker_sandboxes', 16)} warm Docker sandboxes",
        rss.get("rss_mib"), 80 * 1000**2 / 1024**2, " MiB")
    idle = rss.get("idle_cpu") or sp.get("idle_cpu") or {}
    add("idle CPU ≈ 0 (≤ 1 % of one core)", idle.get("cpu_percent_of_one_core"), 1.0, " %")
    return rows


Add = Callable[..., None]


def _load_detail(load: dict[str, Any]) -> str:
    """How far a load test went: a sustained rate it never saturated past is a floor."""
    if not load.get("steps"):
        return ""
    top = max(step["offered_per_s"] for step in load["steps"])
    # The ladder may stop at its time budget after one saturated step, or
    # refining steps may saturate: only a test with none gives a floor.
    saturated = any(step.get("saturated") for step in load["steps"])
    floor = "" if saturated else "; a floor: no step saturated"
    return (f"peak {load.get('peak_ok_per_s')}/s, steps up to {top:g}/s offered, "
            f"stopped: {load.get('stopped')}{floor}")


def fork_targets(doc: dict[str, Any], pools: dict[str, tuple[str, dict[str, Any]]],
                 datasci: dict[str, Any], add: Add) -> None:
    """The fork tier's targets: its plain pool's print(1) latency and throughput, and
    its datasci pool's throughput, data analysis and warm memory."""
    sp = doc["sandpool"]
    name, entry = pools.get("fork", ("python-fork", {}))
    add(f"fork pool `{name}` p50 ≤ 1.5 ms (print(1), low load)",
        _get(entry, "print1", "e2e", "p50_ms"), 1.5, " ms")
    load = (sp.get("load") or {}).get(name) or {}
    add(f"fork pool `{name}` sustained single-use print(1) ≥ 150/s",
        load.get("sustained_ok_per_s"), 150.0, "/s", at_least=True, detail=_load_detail(load))
    plan = next(p for p in sandpool_paths.datasci_plans() if p.backend == "fork")
    load = (sp.get("load") or {}).get(plan.name) or {}
    add(f"fork pool `{plan.name}` sustained single-use print(1) ≥ 40/s (numpy, pandas, "
        "matplotlib.pyplot preloaded)", load.get("sustained_ok_per_s"), 40.0, "/s",
        at_least=True, detail=_load_detail(load))
    add(f"fork pool `{plan.name}` data analysis p50 ≤ 60 ms (1 MB CSV, pandas, one PNG)",
        _get(datasci, "latency", plan.name, "e2e", "p50_ms"), 60.0, " ms")
    memory = (datasci.get("memory") or {}).get(plan.name) or {}
    template = memory.get("template") or {}
    detail = (f"median of {memory['sandboxes']} warm sandboxes of "
              f"{memory['processes_per_sandbox']} processes, sharing the template's pages; "
              f"USS {memory['uss_mib_median']} MiB each; template PSS {template.get('pss_mib')} "
              "MiB" if memory.get("sandboxes") else "")
    add(f"fork pool `{plan.name}` PSS ≤ 10 MiB per warm sandbox (datasci preload)",
        memory.get("pss_mib_median"), 10.0, " MiB", detail=detail)
    many = (datasci.get("memory_many") or {}).get(plan.name) or {}
    add(f"fork pool `{plan.name}` PSS ≤ 10 MiB per warm sandbox with {many.get('warm', 16)} "
        "warm (datasci preload)", many.get("pss_mib_median"), 10.0, " MiB",
        detail=f"USS {many['uss_mib_median']} MiB each" if many.get("sandboxes") else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a few samples of every section (< 60 s), for `make test`")
    parser.add_argument("--out", type=Path, help="directory for the results (default: "
                        "bench/results, or .state/bench-quick with --quick)")
    parser.add_argument("--name", help="base name of the result files (default: the date)")
    parser.add_argument("--note", default="", help="a line printed at the top of the markdown")
    parser.add_argument("--docker-pool", metavar="MIN_IDLE,MAX_SIZE,START_CONCURRENCY",
                        default="8,16,4", help="the Docker pool's sizes (default 8,16,4)")
    parser.add_argument("--only", choices=ONLY, help="run this section alone (its own daemon, "
                        "as in the whole run), results named <date>-<section>")
    parser.add_argument("--image", default=docker_paths.IMAGE,
                        help="the image of every Docker path (default %(default)s); "
                        "for A/B runs of an image change")
    args = parser.parse_args(argv)
    docker_paths.IMAGE = args.image
    mode = QUICK if args.quick else FULL
    if not args.quick:
        sizes = tuple(int(x) for x in args.docker_pool.split(","))
        if len(sizes) != 3:
            parser.error("--docker-pool takes MIN_IDLE,MAX_SIZE,START_CONCURRENCY")
        mode = Mode(**{**mode.__dict__, "pool_sizes": {}})
        sandpool_paths.POOL_SIZES["docker"] = sizes
    # SIGTERM unwinds like Ctrl-C, so the finally below stops daemons and removes containers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    clock = Clock(mode.budget_s)
    run_id = uuid.uuid4().hex[:12]
    workloads = build_workloads()
    datasci = build_datasci_workload()
    date = time.strftime("%Y-%m-%d")
    doc: dict[str, Any] = {
        "schema": report.SCHEMA,
        "name": args.name or "-".join(
            [date, *(["quick"] if mode is QUICK else []), *([args.only] if args.only else [])]),
        "mode": mode.name,
        "only": args.only,
        "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": run_id,
        "note": args.note,
        "image": docker_paths.IMAGE,
        "errors": [],
    }
    version, info = asyncio.run(docker_paths.docker_description())
    doc["machine"] = describe_machine(version, info)
    doc["workloads"] = {
        "print1": {"code": workloads[0].code, "expected_stdout": workloads[0].expected_stdout},
        "realistic": {
            "description": f"parse an embedded {len(workloads[1].code) // 1000} KB JSON document "
                           "of 120 orders, total revenue per customer, print one JSON line",
            "code_bytes": len(workloads[1].code),
            "expected_stdout": workloads[1].expected_stdout,
        },
        "datasci": {
            "description": f"a {len(datasci.files[0][1]) / 1e6:.2f} MB CSV of {DATASCI_ROWS} "
                           "orders uploaded with the request (files), read with pandas, "
                           "revenue summed per region (groupby), one matplotlib bar chart "
                           "shown (plt.show(): a PNG in the response's results)",
            "code": datasci.code,
            "csv_bytes": len(datasci.files[0][1]),
            "rows": DATASCI_ROWS,
            "expected_stdout": datasci.expected_stdout,
            "result_types": list(datasci.result_types),
        },
    }
    doc["churn_ceiling"] = {}
    doc["cold_paths"] = {}
    doc["sandpool"] = {}
    doc["datasci"] = {}
    doc["sessions"] = {}
    daemons: list[BenchDaemon] = []
    exit_status = 0
    with tempfile.TemporaryDirectory(prefix="sandpool-bench-") as tmp:
        try:
            if not args.only:  # else the one section named
                doc["churn_ceiling"] = _section(doc, "churn ceiling", lambda: churn(run_id, mode))
                cold = doc["cold_paths"]
                cold["seed_docker_py"] = _section(doc, "seed docker-py path", lambda: (
                    docker_paths.seed_docker_py(run_id, workloads, mode.cold_samples,
                                                clock.section(mode.seed_budget_s))))
                cold["aiodocker_cold"] = _section(doc, "aiodocker cold", lambda: asyncio.run(
                    docker_paths.aiodocker_cold(run_id, workloads, mode.cold_samples,
                                                clock.section(mode.aiodocker_budget_s))))
                cold["llm_sandbox"] = _section(doc, "llm-sandbox", lambda: peers.llm_sandbox(
                    run_id, workloads, mode.cold_samples, clock.section(mode.llm_session_budget_s),
                    lambda: clock.section(mode.llm_pool_budget_s)))
                doc["sandpool"] = _section(doc, "sandpool daemon", lambda: run_sandpool(
                    doc, mode, clock, workloads, Path(tmp), daemons))
                doc["sandpool"]["rss"] = _section(doc, "daemon RSS", lambda: run_rss(
                    mode, Path(tmp), daemons))
            if args.only in (None, "datasci"):
                doc["datasci"] = _section(doc, "data analysis", lambda: run_datasci(
                    doc, mode, clock, run_id, datasci, Path(tmp), daemons))
            if args.only in (None, "sessions"):
                doc["sessions"] = _section(doc, "sessions", lambda: run_sessions(
                    doc, mode, clock, datasci, Path(tmp), daemons))
        except KeyboardInterrupt:
            doc["errors"].append("interrupted")
            exit_status = 130
        finally:
            for daemon in daemons:
                status = daemon.stop()
                if status not in (0, None) and not daemon.failed_start:
                    doc["errors"].append(f"daemon {daemon.instance_id} exited with {status}: "
                                         f"{daemon.log_tail(800)}")
            run_label = f"{docker_paths.LABEL_RUN}={run_id}"
            leftovers = asyncio.run(docker_paths.list_labelled(run_label))
            for daemon in daemons:
                if daemon.instance_id:
                    leftovers += asyncio.run(docker_paths.list_labelled(
                        f"sandpool.instance={daemon.instance_id}"))
            doc["cleanup"] = {"leftover_containers": len(leftovers),
                              "daemons_started": len(daemons)}
            if leftovers:
                asyncio.run(docker_paths.remove_labelled(run_label))
                for daemon in daemons:
                    if daemon.instance_id:
                        asyncio.run(docker_paths.remove_labelled(
                            f"sandpool.instance={daemon.instance_id}"))
                doc["errors"].append(f"{len(leftovers)} containers were left behind (removed)")
    out_dir = args.out or (QUICK_RESULTS if mode is QUICK else RESULTS)
    # The targets are the other sections'; a section run alone has none.
    doc["reference"] = None if args.only else reference_run(RESULTS, doc["name"])
    doc["targets"] = [] if args.only else targets(doc)
    doc["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["dockerd_restarted_during_run"] = dockerd_pid() != doc["machine"]["dockerd_pid_at_start"]
    doc["duration_s"] = round(clock.elapsed(), 1)
    paths = report.write(doc, out_dir)
    print(report.markdown(doc))
    print(f"bench: wrote {', '.join(paths.values())} in {doc['duration_s']:.0f} s",
          file=sys.stderr)
    if doc["errors"] and not exit_status:
        exit_status = 1
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
