"""The bounded soak (`make soak`, not part of `make test`): mixed load plus faults.

    python -m tests.soak [--duration 300] [--rate 6] [--no-dockerd-restart]

For ``--duration`` seconds it sends a paced mix of requests (plain output, stdin,
exceptions, timeouts, memory bombs, output floods) to a daemon of its own while
it kills random sandbox containers, SIGKILLs the daemon once and starts a
successor, and restarts dockerd once. Then it asserts that no container of any
instance is left, that every request got an answer (a result or a JSON 503),
and that the surviving daemon's RSS grew by less than 10 % after its warm-up.
It prints one JSON report and exits non-zero if an assertion failed.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from api.client import ApiError
from bench.stats import percentile
from tests.support import (
    Daemon,
    docker_containers,
    docker_volumes,
    restart_dockerd,
    start_daemon,
    stop_daemon,
)

CONFIG = """
[server]
metrics_address = "off"
shutdown_timeout_s = 10
[pools.python]
min_idle = 3
max_size = 8
timeout_s = 5
[pools.shell]
language = "shell"
min_idle = 1
max_size = 3
"""

MIX: list[tuple[str, dict[str, Any], int]] = [  # (code, options, weight)
    ("print('ok')", {}, 40),
    ("import sys; print(sys.stdin.read()[::-1])", {"stdin": "soak"}, 10),
    ("raise ValueError('expected')", {}, 10),
    ("import json; print(sum(json.loads('[1, 2, 3]')))", {}, 10),
    ("echo shell; exit 3", {"language": "shell"}, 8),
    ("while True: pass", {"timeout_s": 0.5}, 6),
    ("b = []\nwhile True: b.append(bytearray(2**24))", {}, 6),
    ("while True: print('x' * 65536)", {}, 5),
    ("import time; time.sleep(0.2); print('slow')", {}, 5),
]


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="sandpool-soak-"))
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.latencies_ms: list[float] = []
        self.failures: list[str] = []
        self.instances: list[str] = []
        self.daemon = self.start("first")
        self.stop = threading.Event()

    def start(self, name: str) -> Daemon:
        (self.tmp / name).mkdir()
        daemon = start_daemon(self.tmp / name, CONFIG)
        self.instances.append(daemon.instance_id)
        return daemon

    def one_request(self) -> None:
        code, options, _ = random.choices(MIX, weights=[w for *_, w in MIX])[0]
        daemon = self.daemon
        began = time.monotonic()
        try:
            with daemon.client() as client:
                result = client.run(code, **options)
            outcome = ("oom" if result["oom_killed"] else "timeout" if result["timed_out"]
                       else "truncated" if result["stdout_truncated"] else "ok")
        except ApiError as e:
            outcome = f"{e.status}:{e.code}"
            if e.status != 503 and e.code != "daemon_unreachable":
                self.fail(f"unexpected error {e.status} {e.code}: {e.message}")
        with self.lock:
            self.outcomes[outcome] += 1
            self.latencies_ms.append((time.monotonic() - began) * 1000)

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)

    def load(self) -> None:
        with ThreadPoolExecutor(8) as executor:
            start = time.monotonic()
            sent = 0
            while not self.stop.is_set():
                due = start + sent / self.args.rate
                time.sleep(max(0.0, due - time.monotonic()))
                executor.submit(self.one_request)
                sent += 1

    def kill_random_containers(self) -> None:
        while not self.stop.wait(15):
            try:
                running = docker_containers(f"sandpool.instance={self.daemon.instance_id}")
            except subprocess.CalledProcessError:
                continue  # dockerd is restarting: that fault is the other thread's
            if running:
                victim = random.choice(running)
                subprocess.run(["docker", "kill", victim], capture_output=True, timeout=30)

    def run(self) -> dict[str, Any]:
        duration = self.args.duration
        threads = [threading.Thread(target=self.load), threading.Thread(
            target=self.kill_random_containers)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(duration * 0.25)
            # A crash: SIGKILL, then a successor whose reaper must clean up.
            crashed = self.daemon
            crashed.process.send_signal(signal.SIGKILL)
            crashed.process.wait()
            self.daemon = self.start("second")
            if docker_containers(f"sandpool.instance={crashed.instance_id}"):
                self.fail("the successor did not reap the SIGKILLed daemon's containers")
            Path(crashed.socket).unlink(missing_ok=True)
            time.sleep(min(30.0, duration * 0.1))  # warm-up of the survivor
            rss_start = self.daemon.rss_kib()
            time.sleep(duration * 0.25)
            if not self.args.no_dockerd_restart:
                restart_dockerd(during=lambda: time.sleep(5))
            time.sleep(max(0.0, duration * 0.4 - 30))
            rss_end = self.daemon.rss_kib()
        finally:
            self.stop.set()
            for thread in threads:
                thread.join()
        stop_daemon(self.daemon)  # exit 0, nothing of its instance left
        leftovers = {i: docker_containers(f"sandpool.instance={i}") for i in self.instances}
        if any(leftovers.values()):
            self.fail(f"containers left behind: {leftovers}")
        # The killed daemon's sandboxes were reaped by the next one, volumes and all.
        volumes = {i: docker_volumes(f"sandpool.instance={i}") for i in self.instances}
        if any(volumes.values()):
            self.fail(f"volumes left behind: {volumes}")
        growth = (rss_end - rss_start) / rss_start
        if growth >= 0.10:
            self.fail(f"daemon RSS grew {growth:.1%} ({rss_start} -> {rss_end} KiB)")
        return {
            "duration_s": duration,
            "requests": sum(self.outcomes.values()),
            "outcomes": dict(self.outcomes),
            "latency_p50_ms": round(percentile(self.latencies_ms, 50), 2),
            "latency_p99_ms": round(percentile(self.latencies_ms, 99), 2),
            "rss_kib_after_warmup": rss_start,
            "rss_kib_at_end": rss_end,
            "rss_growth": round(growth, 4),
            "leftover_containers": sum(len(v) for v in leftovers.values()),
            "leftover_volumes": sum(len(v) for v in volumes.values()),
            "failures": self.failures,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=6.0, help="requests per second")
    parser.add_argument("--no-dockerd-restart", action="store_true")
    report = Soak(parser.parse_args()).run()
    print(json.dumps(report, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
