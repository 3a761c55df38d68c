"""A dedicated sandpool daemon for the benchmark, on the tests' launcher (tests/support.py).

Started as users start it (``python -m api.cli serve --config FILE --socket PATH
--log-format json``) and stopped with SIGTERM. Its containers carry
``sandpool.instance=<id>``; the benchmark counts what is left of them.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api.client import Client
from bench.machine import process_cpu_s
from tests.support import Daemon, DaemonFailed, launch_daemon, terminate_daemon, wait_started

__all__ = ["BenchDaemon", "DaemonFailed"]


@dataclass
class BenchDaemon:
    """A daemon to start in ``workdir`` with ``config_text``, and what the benchmark reads of it."""

    workdir: Path
    config_text: str
    daemon: Daemon | None = None
    ready_after_s: float = 0.0
    failed_start: bool = False  # start() raised: a non-zero exit status is expected

    @property
    def instance_id(self) -> str:
        return self.daemon.instance_id if self.daemon is not None else ""

    @property
    def socket(self) -> str:
        return str(self.workdir / "sandpool.sock")

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.pid

    def client(self) -> Client:
        assert self.daemon is not None
        return self.daemon.client(timeout_s=120)

    def log_tail(self, chars: int = 3000) -> str:
        return self.daemon.log_tail(chars) if self.daemon is not None else ""

    def start(self) -> None:
        """Start and wait until every pool has reached ``min_idle``. Raises DaemonFailed."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        began = time.perf_counter()
        self.daemon = launch_daemon(self.workdir, self.config_text)
        try:
            wait_started(self.daemon)
        except DaemonFailed:
            self.failed_start = True
            raise
        self.ready_after_s = time.perf_counter() - began

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
        assert self.daemon is not None
        return self.daemon.rss_kib()

    def hwm_kib(self) -> int:
        """VmHWM (peak RSS) of the daemon process."""
        assert self.daemon is not None
        return self.daemon.status_field("VmHWM:")

    def threads(self) -> int:
        assert self.daemon is not None
        return self.daemon.status_field("Threads:")

    def cpu_s(self) -> float:
        """utime + stime of the daemon process (all its threads), in seconds."""
        cpu_s = process_cpu_s(self.pid)
        if cpu_s is None:
            raise DaemonFailed(f"the daemon (pid {self.pid}) is gone:\n{self.log_tail()}")
        return cpu_s

    def stop(self) -> int | None:
        """SIGTERM and wait, SIGKILL after a minute; the exit status (None: never started)."""
        if self.daemon is None:
            return None
        with contextlib.suppress(DaemonFailed):  # it was SIGKILLed: the status says so
            terminate_daemon(self.daemon)
        return self.daemon.process.returncode
