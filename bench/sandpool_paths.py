"""sandpool through its Unix socket: low-load latency per backend, and an open-loop load test.

Low load: requests one at a time at a fixed rate (the stdlib client users use,
one keep-alive connection), so the pool refills between them; just before each
request ``GET /v1/pools`` records whether a sandbox was idle, so the hand-out
figure (``queued_ms``) counts only hand-outs of an idle sandbox.

Open loop: arrivals follow a Poisson process at a fixed rate on their own
schedule, whatever the daemon does (a closed loop would slow down with the
daemon and hide its queue). Latency is measured from each request's *scheduled*
arrival, so a late client cannot hide queueing either. Rates rise step by step
until the queue grows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from api.client import ApiError, Client
from bench import docker_paths
from bench.machine import CpuMeter
from bench.stats import percentile, summarize
from bench.workloads import Workload
from pool.config import (
    DATASCI_CPUS,
    DATASCI_IMAGE,
    DATASCI_PRELOAD,
    DEFAULT_IMAGE,
    default_pools,
)

# A step counts as saturated ("the queue grows") when any of these holds:
MAX_ERROR_FRACTION = 0.01  # rejections (503) or failures above 1 % of arrivals
MIN_ACHIEVED_FRACTION = 0.9  # completions fall below 90 % of the arrivals
DRAIN_FLOOR_S = 1.0  # or the last answer comes over 1 s after the last arrival (a backlog)
# Separately, the latency knee: p99 above 10x the first step's and above 100 ms.
# A pool that runs dry now and then shows it before its queue grows: a request
# then waits for one start (Docker: ~0.3-0.5 s), once, and the pool keeps up.
P99_GROWTH = 10.0
P99_FLOOR_MS = 100.0
# After the ladder, steps between the highest unsaturated rate and the lowest
# saturated one (geometric midpoints): with rates x 1.6 apart, "sustained"
# could otherwise sit up to 60 % below the pool's capacity. Not when the two
# are already within REFINED_ENOUGH of each other.
REFINE_STEPS = 2
REFINED_ENOUGH = 1.1
REFILL_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class PoolPlan:
    """A pool the benchmark daemon serves, with the settings the run used."""

    name: str
    backend: str
    min_idle: int
    max_size: int
    start_concurrency: int
    low_load_rate_per_s: float
    first_load_rate_per_s: float  # docker: replaced by a fraction of the churn ceiling
    image: str | None = None  # None: the run's image for docker, the default for process
    preload: tuple[str, ...] = ()
    memory_mb: int | None = None  # None: the pool default
    cpus: float | None = None  # None: the pool default
    wasm_module: str | None = None  # None: the pinned default module

    def toml(self) -> str:
        image = self.image or (docker_paths.IMAGE if self.backend == "docker" else None)
        extra = f'image = "{image}"\n' if image else ""
        if self.wasm_module is not None:
            extra += f'wasm_module = "{self.wasm_module}"\n'
        if self.preload:
            extra += "preload = [" + ", ".join(f'"{m}"' for m in self.preload) + "]\n"
        if self.memory_mb is not None:
            extra += f"memory_mb = {self.memory_mb}\n"
        if self.cpus is not None:
            extra += f"cpus = {self.cpus}\n"
        return (
            f'[pools.{self.name}]\nbackend = "{self.backend}"\nlanguage = "python"\n{extra}'
            f"min_idle = {self.min_idle}\nmax_size = {self.max_size}\n"
            f"start_concurrency = {self.start_concurrency}\n"
            # Deep queue and long acquire timeout: overload shows as latency and
            # completions first, and as 503s only when the queue is really full.
            "max_queue = 256\nacquire_timeout_s = 20.0\ntimeout_s = 10.0\n"
        )


# Low-load pacing per backend: slow enough that the pool is back at min_idle
# before the next request (a Docker refill is ~150-300 ms of dockerd work here).
LOW_LOAD_RATE = {"docker": 5.0, "process": 25.0, "wasm": 10.0, "fork": 25.0}
# A fork sandbox is a fork of a warm interpreter, not an interpreter's start:
# its steps begin higher so that they reach its ceiling within load_steps.
FIRST_LOAD_RATE = {"docker": 2.0, "process": 10.0, "wasm": 4.0, "fork": 20.0}
# Docker: 6 starts at once keep dockerd as busy as the churn ceiling's 4
# workers do, since a pool start also waits for the runner (docs/performance.md).
POOL_SIZES = {"docker": (8, 16, 6), "process": (8, 16, 4), "wasm": (4, 8, 2),
              "fork": (8, 16, 4)}


# Guests from a memory image start in ~12 ms of CPU, not ~290: the steps begin
# higher, as the process tier's do, so that they reach its ceiling.
IMAGE_WASM_FIRST_LOAD_RATE = 10.0


# A preloaded fork pool (datasci-fork) under print(1): what a sandbox with the
# data-science imports costs the host when its request costs nothing. Its
# sandboxes are forks of a ~100 MiB interpreter: its steps begin lower.
PRELOADED_FIRST_LOAD_RATE = {"fork": 10.0}
PRELOADED_POOL_SIZES = {"fork": (4, 16, 4)}


def plan_pools(docker_sizes: tuple[int, int, int] | None = None) -> list[PoolPlan]:
    """One benchmark pool per Python pool of sandpool's default configuration whose
    print(1) is worth measuring: each tier's plain pool, and a fork pool with a preload;
    beside a wasm pool on a module of its own (guests from a memory image), one on
    the pinned default module.

    A preloaded pool keeps its image, ``preload`` and ``memory_mb``. Those of the
    other tiers are left out: a sandbox start there imports the preload again
    (~1 s of CPU), and ``datasci_plans`` measures them with the data analysis.
    ``docker_sizes`` is (min_idle, max_size, start_concurrency) of the Docker pool.
    """
    plans = []
    for pool in default_pools():
        if pool.language != "python":
            continue
        preloaded = bool(pool.preload) or pool.image != DEFAULT_IMAGE
        if preloaded and pool.backend not in PRELOADED_FIRST_LOAD_RATE:
            continue
        sizes = PRELOADED_POOL_SIZES if preloaded else POOL_SIZES
        min_idle, max_size, concurrency = sizes.get(pool.backend, (4, 8, 2))
        if pool.backend == "docker" and docker_sizes is not None:
            min_idle, max_size, concurrency = docker_sizes
        first_rate = (PRELOADED_FIRST_LOAD_RATE if preloaded else FIRST_LOAD_RATE).get(
            pool.backend, 4.0)
        if pool.backend == "wasm" and pool.wasm_module is not None:
            first_rate = IMAGE_WASM_FIRST_LOAD_RATE
        plans.append(PoolPlan(
            name=pool.name, backend=pool.backend, min_idle=min_idle, max_size=max_size,
            start_concurrency=concurrency,
            low_load_rate_per_s=LOW_LOAD_RATE.get(pool.backend, 5.0),
            first_load_rate_per_s=first_rate,
            image=pool.image if preloaded else None, preload=pool.preload,
            memory_mb=pool.memory_mb if preloaded else None, wasm_module=pool.wasm_module,
        ))
        if pool.backend == "wasm" and pool.wasm_module is not None:
            # Beside it, the pinned CPython 3.12 module, whose guests each start
            # an interpreter (no memory image): what the image saves, same run.
            plans.append(dataclasses.replace(
                plans[-1], name=PINNED_WASM_POOL, wasm_module=None,
                first_load_rate_per_s=FIRST_LOAD_RATE["wasm"]))
    return plans


PINNED_WASM_POOL = "python-wasm-cpython312"


# The datasci pools' memory; their image, preload and CPU quota are the default
# configuration's (pool.config).
DATASCI_MEMORY_MB = 512
# A datasci sandbox's start is ~0.3-1 s of CPU (the imports and the warm-up),
# so pacing and the first load step are well below print(1)'s. A fork sandbox
# pays the imports once per pool (its template's), then a fork of a large
# interpreter (~10 ms of CPU) per sandbox: its pacing is the analysis's own.
DATASCI_LOW_LOAD_RATE = {"docker": 2.0, "process": 3.0, "fork": 8.0}
DATASCI_FIRST_LOAD_RATE = {"docker": 0.5, "process": 1.0, "fork": 2.0}
# Four warm sandboxes in every tier, so their memory compares; the fork pool
# may grow to 16 (autosize) when print(1) arrives at tens per second.
DATASCI_POOL_SIZES = {"docker": (4, 8, 2), "process": (4, 8, 2), "fork": (4, 16, 4)}
DATASCI_TIERS = (("docker", ""), ("process", "-process"), ("fork", "-fork"))


def datasci_plans(sizes: dict[str, tuple[int, int, int]] | None = None) -> list[PoolPlan]:
    """The data-science pools, docker, process and fork tier, on the datasci image with preload.

    ``sizes`` maps a backend to (min_idle, max_size, start_concurrency).
    """
    plans = []
    for backend, suffix in DATASCI_TIERS:
        min_idle, max_size, concurrency = (sizes or DATASCI_POOL_SIZES)[backend]
        plans.append(PoolPlan(
            name=f"datasci{suffix}", backend=backend, min_idle=min_idle, max_size=max_size,
            start_concurrency=concurrency,
            low_load_rate_per_s=DATASCI_LOW_LOAD_RATE[backend],
            first_load_rate_per_s=DATASCI_FIRST_LOAD_RATE[backend],
            image=DATASCI_IMAGE, preload=DATASCI_PRELOAD, memory_mb=DATASCI_MEMORY_MB,
            cpus=DATASCI_CPUS,
        ))
    return plans


def daemon_config(plans: list[PoolPlan]) -> str:
    header = (
        "# Written by bench/ for one benchmark run.\n[server]\n"
        'metrics_address = "off"\nmax_concurrent_requests = 1024\nshutdown_timeout_s = 20.0\n'
    )
    return header + "".join("\n" + plan.toml() for plan in plans)


def low_load_latency(
    socket_path: str,
    pool: str,
    workload: Workload,
    samples: int,
    rate_per_s: float,
    time_left: Callable[[], float],
) -> dict[str, Any]:
    """Sequential requests, each once the pool is back at ``min_idle``, at most ``rate_per_s``.

    Returns e2e, hand-out (idle sandbox only) and execution summaries. At low
    load a refill has long finished when the next request comes; waiting for
    it (at most REFILL_WAIT_S) makes that so on a busy host too.
    """
    e2e_ms: list[float] = []
    outside_ms: list[float] = []  # e2e minus the daemon's queued_ms and duration_ms
    handout_idle_ms: list[float] = []
    handout_all_ms: list[float] = []
    execution_ms: list[float] = []
    not_idle = 0
    failures: dict[str, int] = {}
    with Client(socket_path, timeout_s=60) as client:
        body = workload.request_body(pool)
        for _ in range(3):  # connect, and warm the daemon's code paths
            client.request("POST", "/v1/run", body)
        next_send = time.perf_counter()
        for _ in range(samples):
            if time_left() <= 0 and len(e2e_ms) >= 10:
                break
            refill_deadline = time.perf_counter() + REFILL_WAIT_S
            while True:
                summary = next(p for p in client.pools() if p["name"] == pool)
                refilled = summary["idle"] >= summary["min_idle"] and not summary["starting"]
                if refilled or time.perf_counter() > refill_deadline:
                    break
                time.sleep(0.02)
            time.sleep(max(0.0, next_send - time.perf_counter()))
            sent = time.perf_counter()
            next_send = sent + 1 / rate_per_s
            try:
                result = client.request("POST", "/v1/run", body)
            except ApiError as e:  # counted, not fatal: dockerd may restart under us
                failures[e.code] = failures.get(e.code, 0) + 1
                if sum(failures.values()) > max(5, samples // 10):
                    break
                continue
            e2e_ms.append((time.perf_counter() - sent) * 1000)
            if not workload.check(result):
                raise RuntimeError(f"sandpool {pool}: wrong result {result!r:.300}")
            handout_all_ms.append(float(result["queued_ms"]))
            execution_ms.append(float(result["duration_ms"]))
            outside_ms.append(e2e_ms[-1] - handout_all_ms[-1] - execution_ms[-1])
            if summary["idle"] >= 1:
                handout_idle_ms.append(float(result["queued_ms"]))
            else:
                not_idle += 1
    return {
        "rate_per_s": rate_per_s,
        "e2e": summarize(e2e_ms),
        "handout_idle": summarize(handout_idle_ms),
        "handout_all": summarize(handout_all_ms),
        "execution": summarize(execution_ms),
        "outside_backend": summarize(outside_ms),
        "requests_without_idle_sandbox": not_idle,
        "failed": failures,
    }


def api_floor(socket_path: str, samples: int, pause_s: float) -> dict[str, Any]:
    """Round trips of GET /healthz on one keep-alive connection: the HTTP floor under every run.

    A run's e2e minus its ``duration_ms`` and ``queued_ms``, compared with this,
    shows what the daemon adds around the backend beyond HTTP itself. Measure
    it with the pause the low-load runs have between requests: an idle vCPU
    here takes a few hundred microseconds to wake, and back-to-back round
    trips never let it sleep.
    """
    floor_ms: list[float] = []
    with Client(socket_path, timeout_s=10) as client:
        client.request("GET", "/healthz")
        for _ in range(samples):
            sent = time.perf_counter()
            client.request("GET", "/healthz")
            floor_ms.append((time.perf_counter() - sent) * 1000)
            time.sleep(pause_s)
    return summarize(floor_ms)


@dataclass(slots=True)
class _Outcome:
    scheduled: float
    sent: float = 0.0
    done: float = 0.0
    status: int = 0
    code: str = ""
    queued_ms: float = 0.0
    duration_ms: float = 0.0
    correct: bool = False


async def _one(
    session: aiohttp.ClientSession, body: dict[str, Any], workload: Workload, outcome: _Outcome,
    timeout_s: float,
) -> None:
    loop = asyncio.get_running_loop()
    outcome.sent = loop.time()
    try:
        async with asyncio.timeout(timeout_s), session.post(
            "http://sandpool/v1/run", json=body
        ) as response:
            document = await response.json()
            outcome.status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        outcome.code = f"client:{type(e).__name__}"
    else:
        if outcome.status == 200:
            outcome.queued_ms = float(document["queued_ms"])
            outcome.duration_ms = float(document["duration_ms"])
            outcome.correct = workload.check(document)
            if not outcome.correct:
                outcome.code = "wrong_result"
        else:
            outcome.code = str(document.get("error", {}).get("code", outcome.status))
    outcome.done = loop.time()


async def open_loop_step(
    socket_path: str, pool: str, workload: Workload, rate_per_s: float, duration_s: float,
    seed: int, request_timeout_s: float = 40.0,
) -> dict[str, Any]:
    """Poisson arrivals at ``rate_per_s`` for ``duration_s``; waits for every answer."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    body = workload.request_body(pool)
    outcomes: list[_Outcome] = []
    # A Poisson process conditioned on its count: exactly rate x duration
    # arrivals, each uniform over the step. The bursts are Poisson's, but the
    # realized rate is the offered one (unconditioned, a 15 s step at 6/s
    # arrives at 4.6-7.8/s, and which rate was sustained becomes a lottery).
    offsets = sorted(rng.uniform(0, duration_s) for _ in range(round(rate_per_s * duration_s)))
    connector = aiohttp.UnixConnector(path=socket_path, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # One warm connection, so the first arrivals do not pay for connecting.
        async with session.get("http://sandpool/v1/pools") as response:
            await response.read()
        start = loop.time() + 0.05
        async with asyncio.TaskGroup() as group:
            for offset in offsets:
                arrival = start + offset
                delay = arrival - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                outcome = _Outcome(scheduled=arrival)
                outcomes.append(outcome)
                group.create_task(
                    _one(session, body, workload, outcome, request_timeout_s)
                )
    ok = [o for o in outcomes if o.correct]
    rejected = [o for o in outcomes if o.status == 503]
    failed = [o for o in outcomes if not o.correct and o.status != 503]
    last_done = max((o.done for o in outcomes), default=start)
    # Rates are counted inside one window that skips the ramp-up, so boundary
    # effects cancel: under load, completions in the window equal arrivals in
    # it; past capacity, they are the capacity.
    window_start = start + min(1.0, duration_s * 0.2)
    window_end = start + duration_s
    window_s = window_end - window_start
    arrived = sum(window_start <= o.scheduled < window_end for o in outcomes)
    completed = sum(window_start <= o.done < window_end for o in ok)
    e2e_ms = [(o.done - o.scheduled) * 1000 for o in ok]
    lag_ms = [(o.sent - o.scheduled) * 1000 for o in outcomes]
    return {
        "offered_per_s": rate_per_s,
        "duration_s": duration_s,
        "arrivals": len(outcomes),
        "ok": len(ok),
        "rejected": len(rejected),
        "failed": len(failed),
        "error_codes": sorted({o.code for o in (*rejected, *failed)}),
        "window_s": round(window_s, 3),
        "arrived_per_s": round(arrived / window_s, 2),
        "achieved_ok_per_s": round(completed / window_s, 2),
        "drain_s": round(max(0.0, last_done - window_end), 3),
        "e2e": summarize(e2e_ms),
        "handout": summarize([o.queued_ms for o in ok]),
        "execution": summarize([o.duration_ms for o in ok]),
        "client_lag_p99_ms": round(percentile(lag_ms, 99), 3) if lag_ms else None,
    }


def saturation(step: dict[str, Any]) -> str | None:
    """Why this step counts as saturated (the queue grows), or None."""
    arrivals = max(step["arrivals"], 1)
    if (step["rejected"] + step["failed"]) / arrivals > MAX_ERROR_FRACTION:
        return f"{step['rejected']} rejected and {step['failed']} failed of {arrivals}"
    if step["achieved_ok_per_s"] < MIN_ACHIEVED_FRACTION * step["arrived_per_s"]:
        return (f"completed {step['achieved_ok_per_s']}/s of {step['arrived_per_s']}/s arrived "
                f"(< {MIN_ACHIEVED_FRACTION:.0%})")
    if step["drain_s"] > DRAIN_FLOOR_S:
        return f"backlog: last answer {step['drain_s']:.2f} s after the last arrival"
    return None


def latency_knee(step: dict[str, Any], first: dict[str, Any] | None) -> str | None:
    """Why this step is past the latency knee, or None (not a saturation)."""
    if first is None or not step["e2e"].get("n") or not first["e2e"].get("n"):
        return None
    p99, base = step["e2e"]["p99_ms"], first["e2e"]["p99_ms"]
    if p99 > P99_GROWTH * base and p99 > P99_FLOOR_MS:
        return f"p99 {p99:.1f} ms > {P99_GROWTH:g}x the first step's {base:.1f} ms"
    return None


def refining_rate(steps: list[dict[str, Any]]) -> float | None:
    """The geometric midpoint of the highest unsaturated and the lowest saturated
    offered rate above it; None when there is no such pair or they are close enough."""
    held = [s["offered_per_s"] for s in steps if not s["saturated"]]
    if not held:
        return None
    low = max(held)
    failed = [s["offered_per_s"] for s in steps if s["saturated"] and s["offered_per_s"] > low]
    if not failed or min(failed) <= low * REFINED_ENOUGH:
        return None
    return round(math.sqrt(low * min(failed)), 2)


def load_test(
    socket_path: str,
    pool: str,
    workload: Workload,
    rates: list[float],
    step_s: float,
    time_left: Callable[[], float],
    settle: Callable[[], None],
    meter: CpuMeter | None = None,
) -> dict[str, Any]:
    """Open-loop steps at rising rates, until two have saturated (or time runs out),
    then up to REFINE_STEPS between the last rate that held and the first that did not.

    The step after the first saturated one shows the pool's capacity under
    overload (completions per second while the queue grows). Steps are listed
    by offered rate; a refining one says so (``refined``).
    """
    steps: list[dict[str, Any]] = []
    stopped = "all rates run"

    def measure(rate: float) -> dict[str, Any]:
        settle()
        if meter is not None:
            meter.start()
        step = asyncio.run(
            open_loop_step(socket_path, pool, workload, rate, step_s, seed=len(steps))
        )
        if meter is not None:
            step["cpu"] = meter.stop()
            # Everything the daemon did for these requests: HTTP, hand-out, run,
            # destroy and refill (settling between steps is outside the meter).
            daemon_s = step["cpu"].pop("daemon_cpu_s", None)
            host_s = step["cpu"].pop("host_cpu_s", None)
            step["daemon_cpu_ms_per_request"] = (
                round(daemon_s * 1000 / step["ok"], 3) if daemon_s and step["ok"] else None
            )
            step["host_cpu_ms_per_request"] = (
                round(host_s * 1000 / step["ok"], 1) if host_s and step["ok"] else None
            )
        step["saturated"] = saturation(step)
        step["latency_knee"] = latency_knee(step, steps[0] if steps else None)
        steps.append(step)
        return step

    saturated_steps = 0
    for rate in rates:
        if steps and time_left() < step_s * 2:
            stopped = "time budget"
            break
        saturated_steps += bool(measure(rate)["saturated"])
        if saturated_steps >= 2:
            stopped = "saturated"
            break
    for _ in range(REFINE_STEPS):
        between = refining_rate(steps)
        if between is None or time_left() < step_s * 2:
            break
        measure(between)["refined"] = True
    steps.sort(key=lambda step: step["offered_per_s"])
    healthy = [s for s in steps if not s["saturated"]]
    return {
        "workload": workload.name,
        "step_s": step_s,
        "steps": steps,
        "stopped": stopped,
        "max_unsaturated_offered_per_s": max((s["offered_per_s"] for s in healthy), default=None),
        "sustained_ok_per_s": max((s["achieved_ok_per_s"] for s in healthy), default=None),
        "peak_ok_per_s": max((s["achieved_ok_per_s"] for s in steps), default=None),
    }
