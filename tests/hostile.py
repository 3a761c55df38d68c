"""Hostile neighbours (`make hostile`, beside `make soak`, not part of `make test`).

    python -m tests.hostile [--phase-s 30] [--rounds 2] [--neighbour-rate 0.5] [--attacks a,b]
                            [--tenants a,b] [--out FILE]

One daemon serves tenant pools (``python``, ``python-process``, ``python-fork``,
``python-wasm``)
and, beside each, a neighbouring pool of the same tier. Three phases of
``--phase-s`` seconds each carry the same paced ``print('ok')`` traffic on the
tenant pools:

1. ``quiet``: the tenants alone;
2. ``neighbours``: each neighbouring pool gets benign requests at
   ``--neighbour-rate``, each computing for 1.5 s within its pool's ``cpus``:
   what a busy, well-behaved neighbour costs on this host (a sandbox start per
   request, and its CPU share);
3. ``hostile``: the same pace, but each request is the next resource attack
   (file descriptors, per-user quotas, shared memory, scratch space, forks,
   output, CPU, forged exit codes), while hundreds of idle connections are
   held on the socket and the metrics port.

What the attacks cost the tenants is the difference between phases 2 and 3.
The three phases run ``--rounds`` times in turn, each phase's samples pooled
across rounds, so that a host whose speed drifts over minutes (a VM) weighs on
every phase alike. The tenants' client stands for callers elsewhere: as root
with a cgroup v1 cpu hierarchy it runs in a cpu cgroup of the daemon's weight
(pool/daemon_cpu.py), so its own waits for CPU behind the sandboxes are not
counted as the daemon's latency (``client_weight`` in the report; null where
it ran as it was started).
Then the daemon is stopped and nothing may be left: containers of its
instance, its cgroups, processes running as a sandbox uid, wasm run
directories. It prints one JSON report (tenant latency per pool and phase,
p50/p99, where it went, the tenant pools' starts and destroys, the daemon's
warnings, the requests that waited for a sandbox, every failure) and exits
non-zero if a tenant request failed or something was left. Latency is
reported, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from api.client import ApiError, Client
from bench.stats import percentile
from pool.backends.process.cgroups import CGROUP_ROOT, WEIGHT_OF_ONE, own_cgroups
from pool.config import WASM_IMAGE_MODULE
from pool.daemon_cpu import DAEMON_WEIGHT
from pool.uids import SandboxUids
from tests.support import (
    Daemon,
    DaemonFailed,
    docker_containers,
    docker_volumes,
    free_port,
    metric_sample,
    processes_in_uid_range,
    scrape,
    start_daemon,
    stop_daemon,
)

TENANT_RATES = {  # requests/s
    "python": 1.0, "python-process": 4.0, "python-fork": 4.0, "python-wasm": 2.0,
}
ATTACKER_POOLS = {"python": "hostile", "python-process": "hostile-process",
                  "python-fork": "hostile-fork", "python-wasm": "hostile-wasm"}
POOL_COUNTERS = ("start_duration_seconds_count", "start_duration_seconds_sum",
                 "start_failures_total", "destroy_duration_seconds_count",
                 "destroy_duration_seconds_sum")
QUEUED_NOTED_MS = 5.0  # a tenant's request that waited this long for a sandbox is listed
NEIGHBOURS_BEFORE_S = 2.0
IDLE_CONNECTIONS = 300  # on the socket and on the metrics port each


def config(metrics_port: int) -> str:
    # The wasm pools run the default python-wasm pool's module (guests from a
    # memory image).
    tenants = f"""
[pools.python]
min_idle = 3
max_size = 6
timeout_s = 5
[pools.python-process]
backend = "process"
min_idle = 3
max_size = 6
timeout_s = 5
[pools.python-fork]
backend = "fork"
min_idle = 3
max_size = 6
timeout_s = 5
[pools.python-wasm]
backend = "wasm"
wasm_module = "{WASM_IMAGE_MODULE}"
min_idle = 2
max_size = 4
timeout_s = 5
"""
    attackers = "".join(
        f"""
[pools.{name}]
backend = "{backend}"
{f'wasm_module = "{WASM_IMAGE_MODULE}"' if backend == "wasm" else ""}
min_idle = 1
max_size = 2
timeout_s = 4
max_timeout_s = 4
"""
        for name, backend in (("hostile", "docker"), ("hostile-process", "process"),
                              ("hostile-fork", "fork"), ("hostile-wasm", "wasm"))
    )
    return f"""
[server]
metrics_address = "127.0.0.1:{metrics_port}"
shutdown_timeout_s = 10
{tenants}{attackers}"""


# Each attack as a request body; "wasm" marks the ones WASI can run at all.
ATTACKS: list[tuple[str, str, bool]] = [  # (name, code, runs under WASI)
    ("open_files", """
held = []
while True:
    held.append(open('/tmp/f%d' % len(held), 'w'))
""", True),
    ("fill_scratch", """
with open('/tmp/fill', 'wb') as f:
    while True:
        f.write(b'x' * (1 << 20))
""", True),
    ("cpu", "while True: pass", True),
    ("memory", "b = []\nwhile True: b.append(bytearray(1 << 24))", True),
    ("output_flood", "while True: print('x' * 65536)", True),
    ("forged_exit", """
with open('/.sandpool/status', 'w') as f:
    f.write('4000000000')
import os; os._exit(125)
""", True),
    ("memfd", """
import os
held = []
while True:
    fd = os.memfd_create('x')
    for _ in range(16):
        os.write(fd, b'x' * (1 << 20))
    held.append(fd)
""", False),
    ("inotify", """
import ctypes, time
libc = ctypes.CDLL(None)
while libc.inotify_init1(0) >= 0:
    pass
time.sleep(3)
""", False),
    ("ptys", """
import os, time
for _ in range(4):  # four processes, each up to its fds, until the sandbox's devpts is full
    if os.fork() == 0:
        try:
            while True:
                os.open('/dev/ptmx', os.O_RDWR | os.O_NOCTTY)
        except OSError:
            time.sleep(3)
        os._exit(0)
time.sleep(3)
""", False),
    ("fork_bomb", """
import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(30)
    except OSError:
        time.sleep(0.01)
""", False),
    ("status_pipe", """
import os, stat, struct
for name in os.listdir('/proc/self/fd'):
    try:
        if int(name) > 2 and stat.S_ISFIFO(os.fstat(int(name)).st_mode):
            os.write(int(name), struct.pack('>i', -1))
    except OSError:
        pass
""", False),
]


# What a neighbour may legitimately do with its sandbox: compute for about as
# long as an attack runs on average (half of them hit the 3 s timeout, half
# end at their limit at once), within the pool's cpus.
BUSY_NEIGHBOUR = """
import time
began = time.monotonic()
while time.monotonic() - began < 1.5:
    pass
print('neighbour')
"""


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="sandpool-hostile-"))
        self.metrics_port = free_port()
        try:
            self.daemon: Daemon = start_daemon(self.tmp, config(self.metrics_port))
        except DaemonFailed:  # its message carries the log's tail: nothing to keep
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.lock = threading.Lock()
        self.latencies: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        # Per phase and pool, each request's time split as the daemon saw it:
        # waiting for a sandbox (queued_ms), running in it (duration_ms), the rest.
        self.parts: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list)))
        self.failures: list[str] = []
        self.attacks: dict[str, int] = defaultdict(int)
        self.phase = "quiet"
        # What a tenant's pool running dry is set beside: each tenant request
        # that waited for a sandbox (pool, phase, began, queued_ms), and each
        # neighbour's request (what it ran, pool, began, ended).
        self.queued: list[tuple[str, str, float, float]] = []
        self.neighbour_runs: list[tuple[str, str, float, float]] = []
        # Per phase and tenant pool, POOL_COUNTERS' growth over the phase.
        self.counters: dict[str, dict[str, dict[str, float]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(float)))
        # Each phase's name and start, as the daemon's log stamps time.
        self.phase_starts: list[tuple[str, str]] = []

    def tenant(self, pool: str, stop: threading.Event) -> None:
        interval = 1.0 / TENANT_RATES[pool]
        with Client(self.daemon.socket, timeout_s=30) as client:
            next_at = time.monotonic()
            while not stop.is_set():
                next_at += interval
                began = time.monotonic()
                phase = self.phase
                result = None
                try:
                    result = client.run("print('ok')", pool=pool, timeout_s=5)
                    if result["stdout"] != "ok\n" or result["exit_code"] != 0:
                        self.fail(f"{pool}: wrong answer {result}")
                except ApiError as e:
                    self.fail(f"{pool}: {e.status} {e.code}: {e.message}")
                latency = (time.monotonic() - began) * 1000
                with self.lock:
                    if result is not None and result["queued_ms"] > QUEUED_NOTED_MS:
                        self.queued.append((pool, phase, began, result["queued_ms"]))
                    self.latencies[phase][pool].append(latency)
                    if result is not None:
                        parts = self.parts[phase][pool]
                        parts["queued"].append(result["queued_ms"])
                        parts["run"].append(result["duration_ms"])
                        parts["rest"].append(
                            latency - result["queued_ms"] - result["duration_ms"])
                stop.wait(max(0.0, next_at - time.monotonic()))

    def neighbour(self, tenant_pool: str, stop: threading.Event, *, hostile: bool) -> None:
        """The pool beside ``tenant_pool``, at a fixed pace: benign code, or the attacks in turn.

        Each request costs a sandbox start whatever it runs, so both phases
        churn alike and the difference between them is what the attacks cost.
        """
        pool = ATTACKER_POOLS[tenant_pool]
        wasm = tenant_pool == "python-wasm"
        attacks = [(name, code) for name, code, on_wasi in ATTACKS
                   if (on_wasi or not wasm) and name in self.args.attacks]
        if not hostile or not attacks:
            attacks = [("benign", BUSY_NEIGHBOUR)]
        interval = 1.0 / self.args.neighbour_rate
        next_at = time.monotonic()
        with Client(self.daemon.socket, timeout_s=30) as client:
            while not stop.is_set():
                for name, code in attacks:
                    next_at += interval
                    if stop.wait(max(0.0, next_at - time.monotonic())):
                        break
                    began = time.monotonic()
                    try:
                        result = client.run(code, pool=pool, timeout_s=3)
                    except ApiError as e:
                        if e.status >= 500 and e.status != 503:
                            self.fail(f"attack {name} on {pool}: {e.status} {e.code}")
                        continue
                    code_seen = result["exit_code"]
                    if code_seen is not None and not 0 <= code_seen <= 255:
                        self.fail(f"attack {name} on {pool}: exit code {code_seen}")
                    with self.lock:
                        self.attacks[name] += 1
                        self.neighbour_runs.append((name, pool, began, time.monotonic()))

    def idle_connections(self, stop: threading.Event) -> None:
        """Hundreds of connections that never send a byte, reopened when dropped."""
        held: list[socket.socket] = []
        try:
            while not stop.is_set():
                held = [s for s in held if _still_open(s)]
                while len(held) < 2 * IDLE_CONNECTIONS and not stop.is_set():
                    try:
                        if len(held) % 2:
                            s = socket.create_connection(("127.0.0.1", self.metrics_port), 2)
                        else:
                            s = socket.socket(socket.AF_UNIX)
                            s.settimeout(2)
                            s.connect(self.daemon.socket)
                    except OSError:
                        break  # refused or over a cap: the daemon's choice
                    held.append(s)
                    with self.lock:
                        self.attacks["idle_connection"] += 1
                stop.wait(1.0)
        finally:
            for s in held:
                s.close()

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)

    def phase_run(self, name: str, *, neighbours: bool, attack: bool) -> None:
        self.phase = name
        self.phase_starts.append((name, utc_now()))
        stop = threading.Event()
        workers = [threading.Thread(target=self.tenant, args=(p, stop)) for p in self.args.tenants]
        if neighbours:
            workers += [threading.Thread(target=self.neighbour, args=(p, stop),
                                         kwargs={"hostile": attack})
                        for p in self.args.tenants]
        if attack and "idle_connection" in self.args.attacks:
            workers.append(threading.Thread(target=self.idle_connections, args=(stop,)))
        before = self.pool_counters()
        for worker in workers:
            worker.start()
        stop.wait(self.args.phase_s)
        stop.set()
        for worker in workers:
            worker.join()
        after = self.pool_counters()
        for pool in self.args.tenants:
            for counter, value in after[pool].items():
                self.counters[name][pool][counter] += value - before[pool][counter]

    def pool_counters(self) -> dict[str, dict[str, float]]:
        """Each tenant pool's sandbox start and destroy counters, from /metrics."""
        text = scrape(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout_s=30)
        return {pool: {counter: metric_sample(text, f"sandpool_sandbox_{counter}", pool=pool)
                       for counter in POOL_COUNTERS} for pool in self.args.tenants}

    def run(self) -> dict[str, Any]:
        try:
            with weighted_client() as client_weight:
                for _ in range(self.args.rounds):
                    self.phase_run("quiet", neighbours=False, attack=False)
                    self.phase_run("neighbours", neighbours=True, attack=False)
                    self.phase_run("hostile", neighbours=True, attack=True)
            daemon_pid = self.daemon.process.pid
        finally:
            stop_daemon(self.daemon)
        complaints = self.complaints()
        leftovers = self.leftovers(daemon_pid)
        if any(leftovers.values()):
            self.fail(f"left behind: {leftovers}")
        return {
            "phase_s": self.args.phase_s,
            "rounds": self.args.rounds,
            "client_weight": client_weight,
            "tenant_latency_ms": {
                phase: {pool: summary(values) for pool, values in pools.items()}
                for phase, pools in self.latencies.items()
            },
            # Where a tenant's time went: each part's own p50/p99 (ms).
            "tenant_parts_ms": {
                phase: {pool: {part: summary(values) for part, values in parts.items()}
                        for pool, parts in pools.items()}
                for phase, pools in self.parts.items()
            },
            # Whether a tenant pool that ran dry started slower or destroyed slower.
            "tenant_sandboxes": {
                phase: {pool: sandbox_figures(counters) for pool, counters in pools.items()}
                for phase, pools in self.counters.items()
            },
            "attacks_run": dict(self.attacks),
            "queued_requests": self.queued_requests(),
            # What the daemon warned of, by event and pool, phase by phase: a
            # tenant pool's failed starts say why it ran dry.
            "daemon_warnings": complaints,
            "leftovers": leftovers,
            "failures": self.failures,
        }

    def queued_requests(self) -> list[dict[str, Any]]:
        """Each tenant request that waited for a sandbox, with the neighbours'
        requests that ran in the NEIGHBOURS_BEFORE_S before it (their sandboxes'
        destroys and refills follow them)."""
        return [
            {"pool": pool, "phase": phase, "queued_ms": queued_ms,
             "neighbours_before": sorted(
                 f"{name} on {where}" for name, where, began, ended in self.neighbour_runs
                 if began < at and ended > at - NEIGHBOURS_BEFORE_S)}
            for pool, phase, at, queued_ms in self.queued
        ]

    def complaints(self) -> dict[str, dict[str, int]]:
        counted: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        phases = iter(self.phase_starts)
        phase, next_phase = "start", next(phases, None)
        for event in self.daemon.log_events():
            while next_phase is not None and str(event.get("timestamp", "")) >= next_phase[1]:
                phase, next_phase = next_phase[0], next(phases, None)
            if event.get("level") in ("warning", "error", "critical"):
                what = f"{event.get('event')} {event.get('pool', '')}".strip()
                counted[phase][what] += 1
        return {phase: dict(events) for phase, events in counted.items()}

    def leftovers(self, daemon_pid: int) -> dict[str, list[str]]:
        uids = SandboxUids()
        processes = [str(pid) for pid in processes_in_uid_range(uids.base, uids.count)]
        cgroups = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/**/sandpool-{daemon_pid}-*")]
        run_dirs = [str(p) for p in Path(tempfile.gettempdir()).glob("sandpool-wasm-*")
                    if f"-{daemon_pid}-" in p.name]
        return {
            "containers": docker_containers(f"sandpool.instance={self.daemon.instance_id}"),
            "volumes": docker_volumes(f"sandpool.instance={self.daemon.instance_id}"),
            "cgroups": cgroups,
            "sandbox_uid_processes": processes,
            "wasm_run_dirs": run_dirs,
        }


@contextlib.contextmanager
def weighted_client() -> Iterator[int | None]:
    """This process (the tenants' and neighbours' client, not the daemon, started
    before) in a cpu cgroup weighted like the daemon, while the phases run.
    Yields the weight in processes' weights, or None where it stays as it is
    (not root, or no cgroup v1 cpu hierarchy)."""
    own = own_cgroups().get("cpu")
    if os.geteuid() != 0 or own is None:
        yield None
        return
    home = CGROUP_ROOT / "cpu" / own.lstrip("/")
    group = home / f"hostile-client-{os.getpid()}"
    name, one, _ = WEIGHT_OF_ONE[1]
    group.mkdir()
    try:
        (group / name).write_text(str(one * DAEMON_WEIGHT))
        (group / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield DAEMON_WEIGHT
        finally:
            (home / "cgroup.procs").write_text(str(os.getpid()))
    finally:
        group.rmdir()


def _still_open(s: socket.socket) -> bool:
    """Whether the daemon kept the connection (no EOF, no reset); closes it if not."""
    try:
        s.setblocking(False)
        if s.recv(1, socket.MSG_PEEK) != b"":
            return True  # it answered something (a 503, say): still open until it closes
    except BlockingIOError:
        return True
    except OSError:
        pass
    s.close()
    return False


def sandbox_figures(counters: dict[str, float]) -> dict[str, float]:
    starts, destroys = counters["start_duration_seconds_count"], counters[
        "destroy_duration_seconds_count"]
    return {
        "starts": starts,
        "start_mean_ms": round(1000 * counters["start_duration_seconds_sum"] / starts, 1)
        if starts else 0.0,
        "start_failures": counters["start_failures_total"],
        "destroy_mean_ms": round(1000 * counters["destroy_duration_seconds_sum"] / destroys, 1)
        if destroys else 0.0,
    }


def utc_now() -> str:
    """Now, as structlog's TimeStamper(fmt="iso", utc=True) writes it: compared as text."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 2) if values else 0.0,
        "p99": round(percentile(values, 99), 2) if values else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2,
                        help="the three phases, this many times in turn (samples pooled)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    parser.add_argument("--neighbour-rate", type=float, default=0.5,
                        help="requests per second in each neighbouring pool (both phases)")
    every = [name for name, _, _ in ATTACKS] + ["idle_connection"]
    parser.add_argument("--attacks", type=lambda v: v.split(","), default=every,
                        help=f"comma-separated subset of: {','.join(every)}")
    parser.add_argument("--tenants", type=lambda v: v.split(","), default=list(TENANT_RATES),
                        help="comma-separated subset of the tenant pools, each with its "
                             f"neighbour: {','.join(TENANT_RATES)} (the others stay idle)")
    args = parser.parse_args()
    if unknown := set(args.tenants) - set(TENANT_RATES):
        parser.error(f"--tenants: no such tenant pool: {', '.join(sorted(unknown))}")
    try:
        run = Run(args)
    except DaemonFailed as e:
        print(f"hostile: the daemon did not start: {e}", file=sys.stderr)
        return 2
    report = run.run()
    if report["failures"]:
        report["daemon_directory"] = str(run.tmp)  # its log, kept for a look
    else:
        shutil.rmtree(run.tmp, ignore_errors=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
