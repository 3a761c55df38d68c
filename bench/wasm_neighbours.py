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
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from api.client import ApiError, Client
from bench.stats import percentile

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


def wait_ready(client: Client, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the daemon exited")
        with contextlib.suppress(ApiError, OSError):
            if all(p["idle"] >= p["min_idle"] for p in client.pools()):
                return
        time.sleep(0.2)
    raise SystemExit("the daemon did not become ready")


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


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of the process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


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
        config = Path(directory) / "sandpool.toml"
        config.write_text(CONFIG.format(wasm_cpus=args.wasm_cpus))
        socket = str(Path(directory) / "sandpool.sock")
        with open(Path(directory) / "daemon.log", "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "serve", "--config", str(config),
                 "--socket", socket, "--log-format", "json"],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
            )
        try:
            with Client(socket, timeout_s=10) as client:
                wait_ready(client, daemon)
            quiet = measure(socket, args.seconds, args.rate)
            spinners = [
                threading.Thread(target=spin, args=(socket, args.seconds + 5)) for _ in range(4)
            ]
            for spinner in spinners:
                spinner.start()
            time.sleep(1)  # the four guests are running
            cpu_before, began = cpu_seconds(daemon.pid), time.monotonic()
            busy = measure(socket, args.seconds, args.rate)
            daemon_cores = (cpu_seconds(daemon.pid) - cpu_before) / (time.monotonic() - began)
            for spinner in spinners:
                spinner.join()
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    busy_row = summary("4 busy wasm guests", busy) | {"daemon_cores": round(daemon_cores, 2)}
    for row in (summary("quiet", quiet), busy_row):
        print(json.dumps({"wasm_cpus": args.wasm_cpus} | row))


if __name__ == "__main__":
    main()
