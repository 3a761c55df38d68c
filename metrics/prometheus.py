"""Every Prometheus metric sandpool exports, recorded through one object.

Names and labels are a contract with dashboards and alerts: keep them.
Tests build ``Metrics(CollectorRegistry())`` for a private registry.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# From 100 µs (a warm hand-out) to a minute (the longest allowed run).
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_LIFECYCLE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A session lives seconds (a failed first run) to its ttl (server.session_max_ttl_s: 1 h).
_SESSION_LIFETIME_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)
_SESSION_RUNS_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100, 250)
# ok: exit code 0; failed: the program exited non-zero; error: the daemon or
# backend failed it; rejected: a 503; disconnected: the client left mid-run.
OUTCOMES = ("ok", "failed", "error", "timeout", "oom", "rejected", "disconnected")
# Whether a request found an idle sandbox (hit) or waited for one, or was
# refused waiting (miss): the hit ratio is hit / (hit + miss).
ACQUISITION_RESULTS = ("hit", "miss")
STATES = ("idle", "busy", "leased", "starting", "destroying")

# (pool name) -> (state -> count, waiters); read at scrape time, never polled.
PoolSnapshot = Callable[[], Iterable[tuple[str, dict[str, int], int]]]


class _PoolCollector(Collector):
    def __init__(self, snapshot: PoolSnapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sandboxes = GaugeMetricFamily(
            "sandpool_sandboxes", "Sandboxes by pool and state", labels=["pool", "state"]
        )
        waiters = GaugeMetricFamily(
            "sandpool_queue_waiters", "Requests waiting for a warm sandbox", labels=["pool"]
        )
        for pool, counts, queued in self._snapshot():
            for state in STATES:
                sandboxes.add_metric([pool, state], counts.get(state, 0))
            waiters.add_metric([pool], queued)
        yield sandboxes
        yield waiters

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # labels vary with config; collected fresh each scrape


class Metrics:
    """The metrics of one daemon, in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # (metric, *label values) -> child: ``labels()`` validates and locks on
        # every call, and the request path records four series per request.
        self._children: dict[tuple[object, ...], Any] = {}
        r = self.registry
        self.request_duration = Histogram(
            "sandpool_request_duration_seconds",
            "Request received to response sent",
            ["pool", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.acquire_wait = Histogram(
            "sandpool_acquire_wait_seconds",
            "Time waiting for a warm sandbox",
            ["pool"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.execution_duration = Histogram(
            "sandpool_execution_duration_seconds",
            "Code handed over to result",
            ["pool"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.start_duration = Histogram(
            "sandpool_sandbox_start_duration_seconds",
            "Sandbox create to ready in the pool",
            ["pool"],
            buckets=_LIFECYCLE_BUCKETS,
            registry=r,
        )
        self.destroy_duration = Histogram(
            "sandpool_sandbox_destroy_duration_seconds",
            "Sandbox destruction",
            ["pool"],
            buckets=_LIFECYCLE_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "sandpool_requests", "Requests by outcome", ["pool", "outcome"], registry=r
        )
        self.client_errors = Counter(
            "sandpool_client_errors",
            "Requests answered with a 4xx, by error code",
            ["code"],
            registry=r,
        )
        self.backend_up = Gauge(
            "sandpool_backend_up",
            "1 while the pool's backend starts sandboxes, 0 once it keeps failing",
            ["pool"],
            registry=r,
        )
        self.oom_kills = Counter(
            "sandpool_oom_kills", "OOM kills reported for sandpool sandboxes", ["pool"], registry=r
        )
        self.timeouts = Counter(
            "sandpool_timeouts", "Runs killed at their timeout", ["pool"], registry=r
        )
        self.start_failures = Counter(
            "sandpool_sandbox_start_failures",
            "Sandboxes that failed to start",
            ["pool"],
            registry=r,
        )
        self.acquisitions = Counter(
            "sandpool_acquisitions",
            "Requests by whether an idle sandbox was there (hit) or not (miss)",
            ["pool", "result"],
            registry=r,
        )
        self.idle_target = Gauge(
            "sandpool_idle_target",
            "Idle sandboxes the pool keeps warm: min_idle, raised by demand up to max_idle",
            ["pool"],
            registry=r,
        )
        self.build_info = Gauge(
            "sandpool_build_info",
            "sandpool and backend versions",
            ["version", "python", "backends"],
            registry=r,
        )
        # Refusals are logged at most once per 10 s, so these count them all.
        self.connections_open = Gauge(
            "sandpool_connections_open", "Open connections by listener", ["listener"], registry=r
        )
        self.connections_refused = Counter(
            "sandpool_connections_refused",
            "Connections closed by the daemon at once or for a late request head",
            ["listener", "reason"],
            registry=r,
        )

        self.sessions_active = Gauge(
            "sandpool_sessions_active", "Sessions alive now", ["pool"], registry=r
        )
        self.session_lifetime = Histogram(
            "sandpool_session_lifetime_seconds",
            "Session creation to end",
            ["pool"],
            buckets=_SESSION_LIFETIME_BUCKETS,
            registry=r,
        )
        self.session_runs = Histogram(
            "sandpool_session_runs",
            "Runs per session, observed at its end",
            ["pool"],
            buckets=_SESSION_RUNS_BUCKETS,
            registry=r,
        )
        self.sessions_ended = Counter(
            "sandpool_sessions_ended",
            "Sessions ended, by reason (docs/sessions.md)",
            ["pool", "reason"],
            registry=r,
        )

    def watch_pools(self, snapshot: PoolSnapshot) -> None:
        """Export pool depth and queue length, read from ``snapshot`` at each scrape."""
        self.registry.register(_PoolCollector(snapshot))

    def set_build_info(self, version: str, backends: dict[str, str]) -> None:
        described = ",".join(f"{name}={v}" for name, v in sorted(backends.items()))
        self.build_info.labels(version, platform.python_version(), described).set(1)

    def pool_created(self, pool: str) -> None:
        """Create every labelled series at zero so a scrape shows them before traffic."""
        for outcome in OUTCOMES:
            self.requests.labels(pool, outcome)
            self.request_duration.labels(pool, outcome)
        for result in ACQUISITION_RESULTS:
            self.acquisitions.labels(pool, result)
        self.idle_target.labels(pool)
        self.backend_up.labels(pool).set(1)
        for metric in (
            self.oom_kills, self.timeouts, self.start_failures, self.acquire_wait,
            self.execution_duration, self.start_duration, self.destroy_duration,
        ):
            metric.labels(pool)

    def request_finished(self, pool: str, outcome: str, duration_s: float) -> None:
        self._series(self.requests, pool, outcome).inc()
        self._series(self.request_duration, pool, outcome).observe(duration_s)
        if outcome == "timeout":
            self._series(self.timeouts, pool).inc()

    def client_errors_expected(self, codes: Iterable[str]) -> None:
        """Create the 4xx series of ``codes`` at zero, so rate() sees the first one."""
        for code in codes:
            self.client_errors.labels(code)

    def client_error(self, code: str) -> None:
        self._series(self.client_errors, code).inc()

    def sandbox_acquired(self, pool: str, wait_s: float) -> None:
        self._series(self.acquire_wait, pool).observe(wait_s)

    def acquisition(self, pool: str, *, hit: bool) -> None:
        self._series(self.acquisitions, pool, "hit" if hit else "miss").inc()

    def idle_target_set(self, pool: str, target: int) -> None:
        self.idle_target.labels(pool).set(target)

    def sandbox_ran(self, pool: str, execution_s: float) -> None:
        self._series(self.execution_duration, pool).observe(execution_s)

    def sandbox_started(self, pool: str, duration_s: float) -> None:
        self._series(self.start_duration, pool).observe(duration_s)

    def sandbox_start_failed(self, pool: str) -> None:
        self._series(self.start_failures, pool).inc()

    def sandbox_destroyed(self, pool: str, duration_s: float) -> None:
        self._series(self.destroy_duration, pool).observe(duration_s)

    def backend_state(self, pool: str, *, up: bool) -> None:
        self.backend_up.labels(pool).set(1 if up else 0)

    def oom_killed(self, pool: str) -> None:
        self._series(self.oom_kills, pool).inc()

    def sessions_expected(self, pool: str, reasons: Iterable[str]) -> None:
        """Create a session pool's series at zero, so a scrape shows them before traffic."""
        self.sessions_active.labels(pool).set(0)
        self.session_lifetime.labels(pool)
        self.session_runs.labels(pool)
        for reason in reasons:
            self.sessions_ended.labels(pool, reason)

    def session_started(self, pool: str) -> None:
        self.sessions_active.labels(pool).inc()

    def session_ended(self, pool: str, reason: str, lifetime_s: float, runs: int) -> None:
        self.sessions_active.labels(pool).dec()
        self._series(self.session_lifetime, pool).observe(lifetime_s)
        self._series(self.session_runs, pool).observe(runs)
        self._series(self.sessions_ended, pool, reason).inc()

    def watch_connections(self, listener: str, open_count: Callable[[], float]) -> None:
        """Export ``listener``'s open connections, read from ``open_count`` at each scrape."""
        self.connections_open.labels(listener).set_function(open_count)

    def connection_refused(self, listener: str, reason: str) -> None:
        self._series(self.connections_refused, listener, reason).inc()

    def _series(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child
