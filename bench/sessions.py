"""Sessions against single use, side by side in one run (docs/sessions.md).

Part one, per tier: ``print(1)`` as a session's run and as a ``/v1/run``,
interleaved pair by pair (the order flipping every pair, so drift in the
host's other load falls on both alike), each request sent once its pool is
quiet (``min_idle`` idle, nothing starting or busy), so that neither pays for
the other's refill; then session create and delete, each on a quiet pool.

Part two, the agent workload sessions were made for: the data analysis's CSV
in three steps (load it, a groupby summary, a PNG chart), as three single-use
runs that each send the CSV again and redo the earlier steps, and as one
session (the CSV sent once, the DataFrame kept). Every step waits for a quiet
pool, as an agent's think time between steps would let it refill; that wait
is not counted. The two paths alternate which goes first.

The section runs a daemon of its own rather than the earlier sections': the
same pools and conditions whether it runs inside ``python -m bench`` or alone
(``--only sessions``), small pools that start in seconds, and a sandbox uid
range of its own (other daemons may run on this host), so what its sandboxes
leave is found by uid.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.client import Client
from bench import sandpool_paths
from bench.daemon import BenchDaemon, DaemonFailed
from bench.stats import summarize
from bench.workloads import Analysis, Workload

UID_BASE = 1_920_000_000
UID_COUNT = 4096
QUIET_WAIT_S = 10.0  # a datasci sandbox's start is ~1 s of CPU; a loaded host takes longer
# Pacing of the print(1) pairs: at most one request per this many seconds, as
# low_load_latency paces the other sections (an idle vCPU's wake-up is in both).
PRINT1_PACE_S = {"docker": 0.2, "process": 0.04, "fork": 0.04}
WARM_UP_PAIRS = 1
MIN_SAMPLES = 5  # pairs taken even when the budget has run out
MIN_CYCLES = 3  # likewise create + delete (a datasci Docker one waits ~1.5 s for its refill)
PRINT1 = Workload("print1", "print(1)", "1\n")
# (min_idle, max_size, start_concurrency) of every pool. Two idle, not one: a
# pool hands out its oldest idle sandbox, and with one a single-use request
# would always take the sandbox that became ready a moment before (its first
# run measured slower: a datasci Docker sandbox's ran the analysis's load step
# in 160 ms against 65 ms for one idle longer); with two it takes one that has
# been idle for a refill's time at least, as in a warm pool. max_size leaves
# room for a session (max_sessions: half of it) beside a refill. Small pools
# start in seconds (a datasci sandbox's start in the docker and process tiers
# is ~1 s of CPU).
POOL_SIZES = (2, 4, 2)


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """The section's pools and how much of each to measure."""

    pools: tuple[sandpool_paths.PoolPlan, ...]
    print1_pools: tuple[str, ...]  # part one
    analysis_pools: tuple[str, ...]  # part two

    def without(self, names: set[str]) -> Plan:
        return Plan(tuple(p for p in self.pools if p.name not in names),
                    tuple(n for n in self.print1_pools if n not in names),
                    tuple(n for n in self.analysis_pools if n not in names))


def plan(datasci_backends: tuple[str, ...], sizes: tuple[int, int, int] = POOL_SIZES) -> Plan:
    """Each tier's plain Python pool and the datasci pools of ``datasci_backends``, all
    of (min_idle, max_size, start_concurrency) ``sizes``: print(1) on the plain pools
    and the Docker and fork datasci pools, the analysis on every datasci pool."""
    min_idle, max_size, concurrency = sizes
    plain = [p for p in sandpool_paths.plan_pools()
             if not p.preload and p.image is None and p.backend in PRINT1_PACE_S]
    datasci = [p for p in sandpool_paths.datasci_plans(
        {backend: sizes for backend, _ in sandpool_paths.DATASCI_TIERS})
        if p.backend in datasci_backends]
    pools = tuple(dataclasses.replace(p, min_idle=min_idle, max_size=max_size,
                                      start_concurrency=concurrency) for p in [*plain, *datasci])
    return Plan(
        pools=pools,
        print1_pools=tuple(p.name for p in [*plain, *datasci]
                           if p in plain or p.backend in ("docker", "fork")),
        analysis_pools=tuple(p.name for p in datasci),
    )


def daemon_config(pools: tuple[sandpool_paths.PoolPlan, ...] | list[sandpool_paths.PoolPlan]
                  ) -> str:
    config = sandpool_paths.daemon_config(list(pools))
    # The uid range goes into [server], the header's table.
    return config.replace(
        "[server]\n", f"[server]\nsandbox_uid_base = {UID_BASE}\nsandbox_uid_count = {UID_COUNT}\n",
        1)


def wait_quiet(client: Client, pool: str, timeout_s: float = QUIET_WAIT_S) -> bool:
    """Wait until ``pool`` has ``min_idle`` idle sandboxes, none starting and none busy;
    False if it was not so within ``timeout_s`` (the request goes anyway, and counts)."""
    deadline = time.perf_counter() + timeout_s
    while True:
        summary = next(p for p in client.pools() if p["name"] == pool)
        if (summary["idle"] >= summary["min_idle"] and not summary["starting"]
                and not summary["busy"]):
            return True
        if time.perf_counter() > deadline:
            return False
        time.sleep(0.02)


class _Timer:
    """Requests on one keep-alive client, each timed once its pool is quiet and its
    pacing interval has passed."""

    def __init__(self, client: Client, pool: str, pace_s: float) -> None:
        self.client = client
        self.pool = pool
        self.pace_s = pace_s
        self.next_send = 0.0
        self.not_quiet = 0  # requests sent after QUIET_WAIT_S without a quiet pool

    def request(self, method: str, path: str, body: Any = None) -> tuple[float, dict[str, Any]]:
        """(milliseconds, answer)."""
        self.not_quiet += not wait_quiet(self.client, self.pool)
        time.sleep(max(0.0, self.next_send - time.perf_counter()))
        sent = time.perf_counter()
        self.next_send = sent + self.pace_s
        answer = self.client.request(method, path, body)
        return (time.perf_counter() - sent) * 1000, answer

    def run(self, path: str, workload: Workload, session: bool) -> tuple[float, dict[str, Any]]:
        """One run of ``workload``, checked; raises RuntimeError on a wrong result."""
        elapsed_ms, result = self.request(
            "POST", path, workload.request_body(None if session else self.pool))
        if not workload.check(result):
            raise RuntimeError(f"{self.pool} {workload.name}: wrong result {result!r:.300}")
        return elapsed_ms, result

    def create(self) -> tuple[float, str]:
        elapsed_ms, session = self.request("POST", "/v1/sessions", {"pool": self.pool})
        return elapsed_ms, str(session["session_id"])

    def delete(self, session_id: str) -> float:
        elapsed_ms, answer = self.request("DELETE", f"/v1/sessions/{session_id}")
        if answer.get("ended") != "deleted":
            raise RuntimeError(f"{self.pool}: session {session_id} had ended: {answer}")
        return elapsed_ms


def print1_side_by_side(socket_path: str, pool: str, backend: str, samples: int, cycles: int,
                        time_left: Callable[[], float]) -> dict[str, Any]:
    """print(1) as a /v1/run and as a session's run in pairs, then session create + delete.

    Returns e2e and hand-out-to-result (``duration_ms``) summaries per path, and
    create, delete and their sum per cycle. Raises RuntimeError on a wrong result.
    """
    e2e: dict[str, list[float]] = {"single_use": [], "session": []}
    execution: dict[str, list[float]] = {"single_use": [], "session": []}
    create_ms: list[float] = []
    delete_ms: list[float] = []
    with Client(socket_path, timeout_s=60) as client:
        timer = _Timer(client, pool, PRINT1_PACE_S[backend])
        _, session_id = timer.create()
        try:
            path = {"single_use": "/v1/run", "session": f"/v1/sessions/{session_id}/run"}
            # Warm the daemon's code paths and the session's interpreter (its first
            # run in a fresh process is measured by the analysis, not here).
            for _ in range(WARM_UP_PAIRS):
                for kind in path:
                    timer.run(path[kind], PRINT1, kind == "session")
            for index in range(samples):
                if time_left() <= 0 and index >= MIN_SAMPLES:
                    break
                for kind in (("single_use", "session") if index % 2 == 0
                             else ("session", "single_use")):
                    elapsed_ms, result = timer.run(path[kind], PRINT1, kind == "session")
                    e2e[kind].append(elapsed_ms)
                    execution[kind].append(float(result["duration_ms"]))
        finally:
            timer.delete(session_id)
        for index in range(cycles):
            if time_left() <= 0 and index >= min(cycles, MIN_CYCLES):
                break
            elapsed_ms, session_id = timer.create()
            create_ms.append(elapsed_ms)
            delete_ms.append(timer.delete(session_id))
        not_quiet = timer.not_quiet
    return {
        "backend": backend,
        "pace_s": PRINT1_PACE_S[backend],
        "single_use": {"e2e": summarize(e2e["single_use"]),
                       "execution": summarize(execution["single_use"])},
        "session": {"e2e": summarize(e2e["session"]),
                    "execution": summarize(execution["session"])},
        "create": summarize(create_ms),
        "delete": summarize(delete_ms),
        "create_plus_delete": summarize([c + d for c, d in zip(create_ms, delete_ms,
                                                               strict=True)]),
        "requests_without_quiet_pool": not_quiet,
    }


def analysis_side_by_side(socket_path: str, pool: str, backend: str, analysis: Analysis,
                          repetitions: int, time_left: Callable[[], float]) -> dict[str, Any]:
    """The three-step analysis as single-use runs and as one session, ``repetitions`` times.

    Returns per path the total per analysis (single use: the three runs; session:
    create, the three runs and delete; also without create and delete) and each
    step's e2e and ``duration_ms``. Raises RuntimeError on a wrong result.
    """
    steps: dict[str, dict[str, list[float]]] = {
        kind: {name: [] for name in analysis.steps} for kind in ("single_use", "session")}
    executions: dict[str, dict[str, list[float]]] = {
        kind: {name: [] for name in analysis.steps} for kind in ("single_use", "session")}
    totals: dict[str, list[float]] = {"single_use": [], "session": [], "session_runs_only": []}
    create_ms: list[float] = []
    delete_ms: list[float] = []
    with Client(socket_path, timeout_s=60) as client:
        timer = _Timer(client, pool, 0.0)

        def single_use() -> None:
            total = 0.0
            for name, workload in zip(analysis.steps, analysis.single_use, strict=True):
                elapsed_ms, result = timer.run("/v1/run", workload, False)
                steps["single_use"][name].append(elapsed_ms)
                executions["single_use"][name].append(float(result["duration_ms"]))
                total += elapsed_ms
            totals["single_use"].append(total)

        def in_session() -> None:
            created_ms, session_id = timer.create()
            runs = 0.0
            try:
                for name, workload in zip(analysis.steps, analysis.session, strict=True):
                    elapsed_ms, result = timer.run(
                        f"/v1/sessions/{session_id}/run", workload, True)
                    steps["session"][name].append(elapsed_ms)
                    executions["session"][name].append(float(result["duration_ms"]))
                    runs += elapsed_ms
            finally:
                deleted_ms = timer.delete(session_id)
            create_ms.append(created_ms)
            delete_ms.append(deleted_ms)
            totals["session_runs_only"].append(runs)
            totals["session"].append(created_ms + runs + deleted_ms)

        for index in range(repetitions):
            if time_left() <= 0 and index >= min(repetitions, 3):
                break
            for path in (single_use, in_session) if index % 2 == 0 else (in_session, single_use):
                path()
        not_quiet = timer.not_quiet

    def described(kind: str) -> dict[str, Any]:
        return {"total": summarize(totals[kind]),
                "steps": {name: {"e2e": summarize(steps[kind][name]),
                                 "execution": summarize(executions[kind][name])}
                          for name in analysis.steps}}

    session = described("session")
    session["runs_only"] = summarize(totals["session_runs_only"])
    session["create"] = summarize(create_ms)
    session["delete"] = summarize(delete_ms)
    return {"backend": backend, "repetitions": len(totals["single_use"]),
            "single_use": described("single_use"), "session": session,
            "requests_without_quiet_pool": not_quiet}


def start(section: Plan, workdir: Path, daemons: list[BenchDaemon],
          say: Callable[[str], None]) -> tuple[BenchDaemon, Plan, dict[str, str]]:
    """The section's daemon: (daemon, the section without the pools it does not serve,
    why those did not start).

    A tier that cannot start here (no bubblewrap, not root) is left out with the
    other non-Docker pools and the Docker pools measured. Raises DaemonFailed when
    even they cannot start.
    """
    daemon = BenchDaemon(workdir / "sessions-daemon", daemon_config(section.pools))
    daemons.append(daemon)
    not_started: dict[str, str] = {}
    try:
        daemon.start()
    except DaemonFailed as e:
        others = {p.name for p in section.pools if p.backend != "docker"}
        if not others:
            raise
        not_started = dict.fromkeys(others, str(e)[-600:])
        say(f"left out {', '.join(sorted(others))}: the sessions daemon failed to start")
        daemon.stop()
        section = section.without(others)
        daemon = BenchDaemon(workdir / "sessions-daemon-docker", daemon_config(section.pools))
        daemons.append(daemon)
        daemon.start()
    served = {p["name"] for p in daemon.pools()}
    return daemon, section.without({p.name for p in section.pools} - served), not_started
