"""Process-tier latency with and without four CPU-busy wasm guests in the same daemon.

    .venv/bin/python -m bench.wasm_neighbours [--seconds 20] [--rate 10] [--wasm-cpus 0.5]

Starts its own daemon (a process pool and a wasm pool of four), sends
``print(1)`` to the process pool at a fixed rate and reports p50/p99 of the
round trip, first on a quiet daemon, then while four wasm guests spin in
``while True: pass`` (each held to ``--wasm-cpus``; 1 leaves them unmetered).
Method and results: docs/wasm-limits.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
from pathlib import Path

from api.client import ApiError, Client
from bench.machine import process_cpu_s
from bench.stats import percentile
from tests.support import Daemon, start_daemon, terminate_daemon

CONFIG = """
[server]
metrics_address = "off"

[pools.process]
backend = "process"
min_idle = 2
max_size = 4

[pools.wasm]
backend = "wasm"
min_idle = 4
max_size = 4
cpus = {wasm_cpus}
timeout_s = 60
max_timeout_s = 600
"""


def measure(socket: str, seconds: float, rate: float) -> list[float]:
    """Round trips of print(1) on the process pool, in ms, paced at ``rate`` per second."""
    latencies = []
    with Client(socket, timeout_s=60) as client:
        began = time.monotonic()
        sent = 0
        while time.monotonic() - began < seconds:
            due = began + sent / rate
            time.sleep(max(0.0, due - time.monotonic()))
            start = time.perf_counter()
            result = client.run("print(1)", pool="process")
            latencies.append((time.perf_counter() - start) * 1000)
            if result["stdout"] != "1\n":
                raise SystemExit(f"unexpected result: {result}")
            sent += 1
    return latencies


def daemon_cpu_s(daemon: Daemon) -> float:
    """User plus system CPU of the daemon (all its threads), in seconds."""
    cpu_s = process_cpu_s(daemon.pid)
    if cpu_s is None:
        raise SystemExit(f"the daemon exited:\n{daemon.log_tail()}")
    return cpu_s


def spin(socket: str, seconds: float) -> None:
    with contextlib.suppress(ApiError, OSError), Client(socket, timeout_s=seconds + 60) as client:
        client.run("while True: pass", pool="wasm", timeout_s=seconds)


def summary(name: str, latencies: list[float]) -> dict[str, object]:
    ordered = sorted(latencies)
    return {
        "phase": name,
        "requests": len(ordered),
        "p50_ms": round(percentile(ordered, 50), 2),
        "p99_ms": round(percentile(ordered, 99), 2),
        "max_ms": round(ordered[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--wasm-cpus", type=float, default=0.5, help="the wasm pool's cpus")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sandpool-neighbours-") as directory:
        daemon = start_daemon(Path(directory), CONFIG.format(wasm_cpus=args.wasm_cpus))
        socket = daemon.socket
        try:
            quiet = measure(socket, args.seconds, args.rate)
            spinners = [
                threading.Thread(target=spin, args=(socket, args.seconds + 5)) for _ in range(4)
            ]
            for spinner in spinners:
                spinner.start()
            time.sleep(1)  # the four guests are running
            cpu_before, began = daemon_cpu_s(daemon), time.monotonic()
            busy = measure(socket, args.seconds, args.rate)
            daemon_cores = (daemon_cpu_s(daemon) - cpu_before) / (time.monotonic() - began)
            for spinner in spinners:
                spinner.join()
        finally:
            terminate_daemon(daemon)
    busy_row = summary("4 busy wasm guests", busy) | {"daemon_cores": round(daemon_cores, 2)}
    for row in (summary("quiet", quiet), busy_row):
        print(json.dumps({"wasm_cpus": args.wasm_cpus} | row))


if __name__ == "__main__":
    main()
