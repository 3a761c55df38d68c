"""A dedicated sandpool daemon for the benchmark: started as users start it, stopped with SIGTERM.

``python -m api.cli serve --config FILE --socket PATH --log-format json``, as in
tests/conftest.py. Its containers carry ``sandpool.instance=<id>``; ``stop``
checks that none of them is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.client import ApiError, Client

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 180.0  # the wasm pool compiles its module once (6-20 s), Docker starts queue
STOP_TIMEOUT_S = 60.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class DaemonFailed(RuntimeError):
    """The daemon exited or did not get ready; the message carries its log's tail."""


@dataclass
class BenchDaemon:
    workdir: Path
    config_text: str
    process: subprocess.Popen[bytes] | None = None
    instance_id: str = ""
    started_s: float = 0.0
    ready_after_s: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    failed_start: bool = False  # start() raised: a non-zero exit status is expected

    @property
    def socket(self) -> str:
        return str(self.workdir / "sandpool.sock")

    @property
    def log_path(self) -> Path:
        return self.workdir / "daemon.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def client(self) -> Client:
        return Client(self.socket, timeout_s=120)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start(self) -> None:
        """Start and wait until every pool has reached ``min_idle``. Raises DaemonFailed."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "sandpool.toml"
        config_path.write_text(self.config_text)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        began = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "serve", "--config", str(config_path),
                 "--socket", self.socket, "--log-format", "json"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            )
        self.started_s = time.monotonic()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.failed_start = True
                raise DaemonFailed(f"the daemon exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            if not self.instance_id:
                self.instance_id = self._instance_from_log()
            if self.instance_id and os.path.exists(self.socket):
                try:
                    with self.client() as client:
                        pools = client.pools()
                    if all(p["idle"] >= p["min_idle"] for p in pools):
                        self.ready_after_s = time.perf_counter() - began
                        return
                except ApiError:
                    pass
            time.sleep(0.1)
        self.failed_start = True
        raise DaemonFailed(f"the daemon was not ready within {START_TIMEOUT_S:g} s:\n"
                           f"{self.log_tail()}")

    def _instance_from_log(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("instance"):
                return str(event["instance"])
        return ""

    def pools(self) -> list[dict[str, Any]]:
        with self.client() as client:
            return client.pools()

    def wait_idle(self, pool: str, at_least: int, timeout_s: float = 60.0) -> bool:
        """Wait until ``pool`` has ``at_least`` idle sandboxes and none busy; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while time.monotonic() < deadline:
                summary = next(p for p in client.pools() if p["name"] == pool)
                if summary["idle"] >= at_least and summary["busy"] == 0:
                    return True
                time.sleep(0.05)
        return False

    def rss_kib(self) -> int:
        """VmRSS of the daemon process, from /proc/<pid>/status."""
        return self._status_field("VmRSS:")

    def hwm_kib(self) -> int:
        """VmHWM (peak RSS) of the daemon process."""
        return self._status_field("VmHWM:")

    def _status_field(self, name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
        raise DaemonFailed(f"no {name} in /proc/{self.pid}/status")

    def cpu_s(self) -> float:
        """utime + stime of the daemon process (all its threads), in seconds."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        # Fields 14 and 15 of stat(5), counted after the parenthesised command name.
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def threads(self) -> int:
        return self._status_field("Threads:")

    def stop(self) -> int | None:
        """SIGTERM and wait, SIGKILL after STOP_TIMEOUT_S; the exit status (None: never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
