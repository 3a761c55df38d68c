"""The multi-node simulation: three daemons behind HAProxy, one drained, one killed, under load.

``python -m deploy.simulate.run [--short] [--json FILE]`` (``make simulate``):

1. three nodes of ``sandpool/daemon:bookworm`` (deploy/simulate/nodes.py), each
   with the image's own config (a process pool ``python``, a wasm pool
   ``python-wasm``), behind HAProxy (deploy/simulate/balancer.py);
2. load: workers sending runs through ``sandpool_client.AsyncClient``
   (``retries=3``) to HAProxy, each run tagged with an ``X-Request-Id`` that the
   balancer and the daemons log;
3. node 2 is drained (SIGTERM, as the kubelet does after preStop), later node 3
   is killed (SIGKILL) while it has runs in flight; node 1 serves on;
4. then every outcome is counted and checked (``violations``): no failure that
   a retry could have avoided, every lost run is one that was in flight on the
   killed node and was reported as such, no run executed twice, no sandbox left.

The report is printed and, with ``--json``, written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextvars
import datetime
import json
import os
import platform
import random
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sandpool_client import AsyncClient, SandpoolClientError, Unavailable

from deploy.image.pod import containers_labelled, leftover_cgroups, remove_cgroup_parent
from deploy.simulate import nodes as cluster
from deploy.simulate.balancer import CHECK_TOKEN, SERVER_NAME, Balancer, start_balancer
from deploy.simulate.pki import make_pki

CLIENT_TOKEN = "load"
RUN_TIMEOUT_S = 5.0
CLIENT_RETRIES = 3
# Pools of the image's config and each one's share of the runs.
POOL_MIX = (("python", 0.85), ("python-wasm", 0.15))
SANDBOX_GONE_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Plan:
    """When things happen, in seconds from the start of the load."""

    workers: int
    drain_at_s: float
    kill_at_s: float
    end_at_s: float


FULL = Plan(workers=12, drain_at_s=20.0, kill_at_s=40.0, end_at_s=70.0)
SHORT = Plan(workers=8, drain_at_s=8.0, kill_at_s=16.0, end_at_s=26.0)


@dataclass
class Outcome:
    request_id: str
    pool: str
    started_s: float
    latency_ms: float
    kind: str  # ok, in_flight_lost, or the kind of failure
    detail: str = ""


@dataclass
class Report:
    plan: dict[str, Any]
    nodes: list[str]
    date: str = ""
    host: dict[str, object] = field(default_factory=dict)
    requests: int = 0
    ok: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    failures_retriable: int = 0
    in_flight_lost: int = 0
    in_flight_at_kill: int = 0
    # From the SIGKILL's sending to the node's exit, seconds on the load's clock:
    # a run in flight on the killed node started before its end and ended after its start.
    kill_window_s: tuple[float, float] | None = None
    client_retries: int = 0
    client_retried_requests: int = 0
    haproxy_retried_requests: int = 0
    haproxy_redispatched_requests: int = 0
    runs_per_node: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    drained_exit_code: int | None = None
    drain_s: float | None = None
    killed_exit_code: int | None = None
    events: list[str] = field(default_factory=list)
    startup_s: float = 0.0
    lost_runs: list[dict[str, object]] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def passed(self) -> bool:
        return not self.violations and not self.leaks


# The request id of the run a worker is sending; the transport stamps it on
# every attempt (the client's retries included) and records what each got.
CURRENT_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


class TaggingTransport(httpx.AsyncBaseTransport):
    """httpx's transport, plus ``X-Request-Id`` on each request and a record of attempts."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner
        self.attempts: dict[str, list[str]] = collections.defaultdict(list)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request_id = CURRENT_ID.get("")
        request.headers["X-Request-Id"] = request_id
        try:
            response = await self._inner.handle_async_request(request)
        except Exception as e:
            self.attempts[request_id].append(type(e).__name__)
            raise
        self.attempts[request_id].append(str(response.status_code))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


def classify(error: SandpoolClientError) -> str:
    """What a failed run means for the caller."""
    if isinstance(error, Unavailable):
        return f"unavailable:{error.code}"  # refused before running, retries used up
    if error.status == 502 or error.code == "connection_lost":
        # The request left, and the node went away with it: the run may have
        # executed. HAProxy answers 502, or closes the client's connection.
        return "in_flight_lost"
    return f"error:{error.code}"


async def one_run(client: AsyncClient, rng: random.Random, t0: float) -> Outcome:
    request_id = uuid.uuid4().hex
    CURRENT_ID.set(request_id)
    pool = rng.choices([p for p, _ in POOL_MIX], [w for _, w in POOL_MIX])[0]
    sleep_s = rng.uniform(0.05, 0.5) if pool == "python" else 0.0
    value = rng.randrange(10**9)
    code = f"import time\ntime.sleep({sleep_s:.3f})\nprint({value})\n"
    started = time.monotonic()
    try:
        result = await client.run(code, pool=pool, timeout_s=RUN_TIMEOUT_S)
    except SandpoolClientError as e:
        kind, detail = classify(e), f"{e.status} {e.code}: {e.message}"[:200]
    else:
        good = result.exit_code == 0 and result.stdout == f"{value}\n"
        kind = "ok" if good else "wrong_result"
        detail = "" if good else f"{result.exit_code} {result.stdout!r} {result.stderr[-200:]!r}"
    return Outcome(request_id, pool, started - t0, (time.monotonic() - started) * 1000, kind,
                   detail)


async def load(client: AsyncClient, workers: int, stop: asyncio.Event, t0: float,
               outcomes: list[Outcome]) -> None:
    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            outcomes.append(await one_run(client, rng, t0))

    async with asyncio.TaskGroup() as group:
        for i in range(workers):
            group.create_task(worker(i))


def host_facts() -> dict[str, object]:
    """What the figures depend on: the machine, how busy it was, the versions."""
    haproxy = subprocess.run(["haproxy", "-v"], capture_output=True, text=True, timeout=30)
    engine = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"],
                            capture_output=True, text=True, timeout=30)
    return {
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": platform.release(),
        "docker": engine.stdout.strip(),
        "haproxy": haproxy.stdout.split("\n")[0].removeprefix("HAProxy version ").split(" ")[0],
    }


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"still not true after {timeout_s:g} s: {what}")
        time.sleep(0.1)


def current_sessions(balancer: Balancer, server: str) -> int:
    for line in balancer.admin("show stat").splitlines():
        fields = line.split(",")
        if len(fields) > 4 and fields[1] == server:
            return int(fields[4] or 0)
    return 0


async def simulate(plan: Plan, work_dir: Path, say: Callable[[str], None] = print) -> Report:
    """Run the scenario; always removes every container, cgroup and process it started."""
    names = cluster.node_names(3)
    report = Report(plan=asdict(plan), nodes=names, date=datetime.datetime.now(
        datetime.UTC).isoformat(timespec="seconds"), host=host_facts())
    pki = make_pki(work_dir / "secrets", [SERVER_NAME, "127.0.0.1"], [CLIENT_TOKEN, CHECK_TOKEN])
    started: list[cluster.Node] = []
    balancer: Balancer | None = None
    t0 = time.monotonic()

    def event(what: str) -> None:
        line = f"{time.monotonic() - t0:6.1f}s {what}"
        report.events.append(line)
        say(line)

    try:
        for name in names:
            started.append(await asyncio.to_thread(cluster.start_node, name, pki))
        balancer = await asyncio.to_thread(
            start_balancer, work_dir / "haproxy", pki, {n.name: n.address for n in started})
        for node in started:
            await asyncio.to_thread(
                cluster.wait_ready, node, lambda n: balancer.server_states().get(n.name) == "UP")
        report.startup_s = round(time.monotonic() - t0, 1)
        say(f"3 nodes up behind HAProxy at {balancer.url} after {report.startup_s} s")
        verify = ssl.create_default_context(cafile=str(pki.ca_file))
        transport = TaggingTransport(httpx.AsyncHTTPTransport(verify=verify))
        outcomes: list[Outcome] = []
        stop = asyncio.Event()
        async with AsyncClient(base_url=balancer.url, token=pki.tokens[CLIENT_TOKEN],
                               retries=CLIENT_RETRIES, verify=verify,
                               transport=transport) as client:
            t0 = time.monotonic()
            async with asyncio.TaskGroup() as group:
                group.create_task(load(client, plan.workers, stop, t0, outcomes))
                group.create_task(faults(plan, balancer, started, report, event, t0, stop))
        await check(report, outcomes, transport, balancer, started)
    finally:
        if balancer is not None:
            balancer.stop()
        for node in started:
            if node.exit_code is None and node.running():
                cluster.signal_node(node, "TERM")
                await asyncio.to_thread(cluster.wait_exit, node)
            if node.exit_code is not None and node.exit_code not in (0, 137):
                report.leaks.append(f"{node.name} exited with {node.exit_code}")
            stayed = await asyncio.to_thread(cluster.remove, node)
            report.leaks += stayed
        remove_cgroup_parent(cluster.CGROUP_PARENT)
        report.leaks += [f"container {c}" for c in containers_labelled(cluster.LABEL)]
        report.leaks += [f"cgroup {c}" for c in leftover_cgroups(cluster.CGROUP_PARENT)]
        shutil.rmtree(work_dir / "secrets", ignore_errors=True)
    return report


async def faults(plan: Plan, balancer: Balancer, started: list[cluster.Node], report: Report,
                 event: Callable[[str], None], t0: float, stop: asyncio.Event) -> None:
    """Drain node 2, then kill node 3 with runs in flight, then end the load."""
    try:
        drained, killed = started[1], started[2]
        await asyncio.sleep(max(0.0, plan.drain_at_s - (time.monotonic() - t0)))
        event(f"SIGTERM {drained.name} (drain)")
        began = time.monotonic()
        cluster.signal_node(drained, "TERM")
        report.drained_exit_code = await asyncio.to_thread(cluster.wait_exit, drained)
        report.drain_s = round(time.monotonic() - began, 2)
        event(f"{drained.name} exited {report.drained_exit_code} after {report.drain_s} s")
        await asyncio.sleep(max(0.0, plan.kill_at_s - (time.monotonic() - t0)))
        # Two or more, so that the kill surely meets a run past its connection
        # (HAProxy counts a request still connecting, which a failure re-sends).
        try:
            await asyncio.to_thread(wait_for, lambda: current_sessions(balancer, killed.name) > 1,
                                    10.0, f"runs in flight on {killed.name}")
        except RuntimeError:
            await asyncio.to_thread(wait_for, lambda: current_sessions(balancer, killed.name) > 0,
                                    10.0, f"runs in flight on {killed.name}")
        # HAProxy's count is read just before the kill: a lower bound, since it
        # can send the node more requests until the node's sockets are gone.
        report.in_flight_at_kill = current_sessions(balancer, killed.name)
        kill_sent_s = time.monotonic() - t0
        cluster.signal_node(killed, "KILL")
        event(f"SIGKILL {killed.name} with {report.in_flight_at_kill} requests in flight")
        report.killed_exit_code = await asyncio.to_thread(cluster.wait_exit, killed)
        exited_s = (killed.exited_at or time.monotonic()) - t0
        report.kill_window_s = (round(kill_sent_s, 3), round(exited_s, 3))
        try:
            await asyncio.to_thread(wait_for, lambda: not cluster.sandbox_processes(killed),
                                    SANDBOX_GONE_TIMEOUT_S, f"{killed.name}'s sandboxes gone")
        except RuntimeError as e:
            report.leaks.append(str(e))
        event(f"{killed.name} gone (exit {report.killed_exit_code}), its sandboxes with it")
        await asyncio.sleep(max(0.0, plan.end_at_s - (time.monotonic() - t0)))
        event("load stopped")
    finally:
        stop.set()


def spans_kill(outcome: Outcome, kill_window_s: tuple[float, float] | None) -> bool:
    """Whether a run could have been in flight on the node when it was killed.

    Sent before the node's exit and answered after the SIGKILL was sent. A
    request sent once the node was gone is refused on connect, which HAProxy
    retries elsewhere, so it cannot be lost.
    """
    if kill_window_s is None:
        return False
    sent, exited = kill_window_s
    return outcome.started_s <= exited and outcome.started_s + outcome.latency_ms / 1000 >= sent


async def check(report: Report, outcomes: list[Outcome], transport: TaggingTransport,
                balancer: Balancer, started: list[cluster.Node]) -> None:
    """Count the outcomes and check every target; violations go into the report."""
    killed = started[2].name
    report.requests = len(outcomes)
    kinds = collections.Counter(o.kind for o in outcomes)
    report.ok = kinds.pop("ok", 0)
    report.in_flight_lost = kinds.pop("in_flight_lost", 0)
    report.failures = dict(kinds)
    report.failures_retriable = sum(n for k, n in kinds.items() if k.startswith("unavailable"))
    latencies = sorted(o.latency_ms for o in outcomes if o.kind == "ok")
    if latencies:
        report.latency_ms = {
            "p50": round(statistics.median(latencies), 1),
            "p99": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 1),
            "max": round(latencies[-1], 1),
        }
    violations = report.violations
    for outcome in outcomes:
        if outcome.kind not in ("ok", "in_flight_lost"):
            violations.append(f"{outcome.request_id} {outcome.kind}: {outcome.detail}")
    # The client retried only answers that mean "not run": 503 and 429.
    for request_id, attempts in transport.attempts.items():
        if len(attempts) > 1:
            report.client_retried_requests += 1
            report.client_retries += len(attempts) - 1
        if any(a not in ("503", "429") for a in attempts[:-1]):
            violations.append(f"{request_id}: the client retried after {attempts}")
    # HAProxy: one line per request; a lost run is one the killed node had, not retried.
    entries = {str(e["id"]): e for e in balancer.log_entries() if e.get("id")}
    for entry in entries.values():
        retries = str(entry.get("retries", "0"))
        if retries not in ("0", "+0"):
            report.haproxy_retried_requests += 1
            report.haproxy_redispatched_requests += retries.startswith("+")
        if entry.get("status") == 200:
            report.runs_per_node[str(entry["server"])] = (
                report.runs_per_node.get(str(entry["server"]), 0) + 1)
    lost = [o for o in outcomes if o.kind == "in_flight_lost"]
    for outcome in lost:
        logged = entries.get(outcome.request_id)
        report.lost_runs.append({"id": outcome.request_id, "client": outcome.detail,
                                 "started_s": round(outcome.started_s, 2),
                                 "latency_ms": round(outcome.latency_ms),
                                 "haproxy": logged})
        # On a kept-alive client connection HAProxy answers a node's abort by closing
        # the client's connection without a log line (RFC 9112 9.3.1: the client may
        # retry only if it knows the request is idempotent, which a run is not); on a
        # new one, with a 502 it logs. Either way it must not have sent it elsewhere.
        if logged is not None and (logged.get("server") != killed or logged.get("status") != 502):
            violations.append(f"{outcome.request_id} reported lost, but HAProxy logged {logged}")
        if not spans_kill(outcome, report.kill_window_s):
            violations.append(f"{outcome.request_id} reported lost, but it ran from "
                              f"{outcome.started_s:.2f} s for {outcome.latency_ms:.0f} ms, "
                              f"not across the kill {report.kill_window_s}")
    # The daemons: no run answered twice, no lost run answered anywhere else.
    seen: dict[str, list[str]] = collections.defaultdict(list)
    for node in started:
        for answered in node.request_events():
            request_id = str(answered.get("request_id", ""))
            if answered.get("path", "/v1/run") == "/v1/run" and "pool" in answered:
                seen[request_id].append(node.name)
    for request_id, where in seen.items():
        if len(where) > 1:
            violations.append(f"{request_id} ran {len(where)} times: {where}")
    for outcome in lost:
        elsewhere = [n for n in seen.get(outcome.request_id, []) if n != killed]
        if elsewhere:
            violations.append(f"{outcome.request_id} lost on {killed} but ran on {elsewhere}")
    for outcome in outcomes:
        if outcome.kind == "ok" and len(seen.get(outcome.request_id, [])) != 1:
            answered_by = seen.get(outcome.request_id)
            violations.append(f"{outcome.request_id} ok, answered by {answered_by}")
    if report.in_flight_at_kill and not lost:
        violations.append("runs were in flight on the killed node, and none was reported lost")


def render(report: Report, *, events: bool = True) -> str:
    """The report as text; ``events=False`` leaves out the timeline (printed as it happened)."""
    lines = [
        f"{report.date} on {report.host}",
        f"nodes: {', '.join(report.nodes)}",
        *(report.events if events else []),
        f"requests {report.requests}: ok {report.ok}, in flight on the killed node and "
        f"reported lost {report.in_flight_lost} (HAProxy counted {report.in_flight_at_kill} "
        f"in flight just before the kill, which lasted {report.kill_window_s} s)",
        f"failures by kind: {report.failures or 'none'} (retriable: {report.failures_retriable})",
        f"client retries: {report.client_retries} over {report.client_retried_requests} requests;"
        f" HAProxy retried {report.haproxy_retried_requests} requests "
        f"({report.haproxy_redispatched_requests} to another node)",
        f"runs answered per node: {report.runs_per_node}",
        f"latency of ok runs (ms): {report.latency_ms}",
        f"drained node: exit {report.drained_exit_code} after {report.drain_s} s; "
        f"killed node: exit {report.killed_exit_code}",
        *[f"lost run {lost['id']}: client {lost['client']!r}; HAProxy {lost['haproxy']}"
          for lost in report.lost_runs],
        f"leaks: {report.leaks or 'none'}",
        f"violations: {report.violations[:20] or 'none'}",
        "PASSED" if report.passed() else "FAILED",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.simulate.run",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--short", action="store_true", help="the shorter run of make test")
    parser.add_argument("--json", type=Path, help="write the report there as JSON")
    parser.add_argument("--keep", type=Path,
                        help="work in this directory and keep HAProxy's config and log there")
    args = parser.parse_args(argv)
    plan = SHORT if args.short else FULL
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        args.keep.chmod(0o755)
        report = asyncio.run(simulate(plan, args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="sandpool-simulate-") as work:
            Path(work).chmod(0o755)
            report = asyncio.run(simulate(plan, Path(work)))
    print(render(report, events=False))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=1) + "\n")
    return 0 if report.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
