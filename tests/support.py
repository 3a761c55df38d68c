"""What the tests, the soak, the hostile run and the benchmark share: no fixtures, no tests.

The daemon launcher starts ``python -m api.cli serve`` as a subprocess, exactly
as users start it, and waits until every pool is warm. The daemon's containers
carry ``sandpool.instance=<id>``; ``stop_daemon`` asserts that none is left.
Fixtures built on these live in conftest.py; test files import from here and
never from one another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from api.client import ApiError, Client
from metrics import Metrics
from pool.backends.process import cgroups as process_cgroups
from pool.config import WASM_IMAGE_MODULE, PoolConfig

REPOSITORY = Path(__file__).resolve().parent.parent
# The wasm pool compiles its module once (6-20 s) and Docker starts queue on a
# busy host: the time from exec to every pool at min_idle.
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0

# Its wasm pool runs the default python-wasm pool's module.
DAEMON_CONFIG = f"""
[server]
metrics_address = "off"
max_request_bytes = 262144
shutdown_timeout_s = 10

[pools.python]
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20
acquire_timeout_s = 30

[pools.shell]
language = "shell"
min_idle = 1
max_size = 2
timeout_s = 5

[pools.python-process]
backend = "process"
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20

[pools.python-fork]
backend = "fork"
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20

[pools.python-wasm]
backend = "wasm"
wasm_module = "{WASM_IMAGE_MODULE}"
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20

[pools.datasci]
image = "sandpool/datasci:bookworm"
preload = ["numpy", "pandas", "matplotlib.pyplot"]
memory_mb = 384
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20

[pools.datasci-process]
backend = "process"
image = "sandpool/datasci:bookworm"
preload = ["numpy", "pandas", "matplotlib.pyplot"]
memory_mb = 384
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20

[pools.tiny]
min_idle = 0
max_size = 1
max_queue = 1
acquire_timeout_s = 5
max_output_bytes = 4096
"""

# The Python pools of DAEMON_CONFIG, one per backend, and the data-science
# image (pandas preloaded) in two tiers: tests that any sandbox must pass are
# parametrized over them.
PYTHON_POOLS = [
    "python", "python-process", "python-fork", "python-wasm", "datasci", "datasci-process",
]
# SANDPOOL_TEST_DAEMON_IMAGE=1: the suites' daemons are the daemon's image run
# as a pod runs it (tests/daemon_image.py, tests/test_daemon_image.py), serving
# the tiers a pod serves, with the pool names and settings above.
IN_DAEMON_IMAGE = os.environ.get("SANDPOOL_TEST_DAEMON_IMAGE") == "1"
if IN_DAEMON_IMAGE:
    DAEMON_CONFIG = """
[server]
metrics_address = "off"
max_request_bytes = 262144
shutdown_timeout_s = 10

[pools.python-process]
backend = "process"
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20

[pools.python-wasm]
backend = "wasm"
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20

[pools.shell]
backend = "process"
language = "shell"
min_idle = 1
max_size = 2
timeout_s = 5
"""
    PYTHON_POOLS = ["python-process", "python-wasm"]

# CPython on WASI preview 1 has no processes and no signals: tests that need
# them cannot apply there; test_wasm_backend.py covers that tier's containment.
WASI_POOLS = frozenset({"python-wasm"})
# A sandbox's scratch directories, and code that copies /bin/true into each and
# runs it: ``ran`` maps each to the exit status, or to the errno's name if the
# exec failed (EACCES where the mount is noexec). Needs errno, shutil, subprocess.
SCRATCH_DIRECTORIES = ("/tmp", "/dev/shm", "/sandbox")
RUN_WRITTEN_PROGRAMS = f"""
ran = {{}}
for directory in {SCRATCH_DIRECTORIES!r}:
    program = shutil.copy("/bin/true", f"{{directory}}/written")
    try:
        ran[directory] = subprocess.run([program]).returncode
    except OSError as e:
        ran[directory] = errno.errorcode[e.errno]
"""

# Every metric family sandpool exports, as Prometheus names the series.
METRIC_NAMES = [
    "sandpool_request_duration_seconds",
    "sandpool_acquire_wait_seconds",
    "sandpool_execution_duration_seconds",
    "sandpool_sandbox_start_duration_seconds",
    "sandpool_sandbox_destroy_duration_seconds",
    "sandpool_sandboxes",
    "sandpool_queue_waiters",
    "sandpool_requests_total",
    "sandpool_oom_kills_total",
    "sandpool_timeouts_total",
    "sandpool_sandbox_start_failures_total",
    "sandpool_acquisitions_total",
    "sandpool_idle_target",
    "sandpool_build_info",
    "sandpool_client_errors_total",
    "sandpool_backend_up",
]


# The series Prometheus stores for each family type (the exposition format's suffixes).
SERIES_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count"),
    "counter": ("_total",),
    "gauge": ("",),
}


def exported_series() -> tuple[set[str], dict[str, str]]:
    """Sample names of a fresh registry with one pool, and each family's type.

    A labelled metric has no samples until its first child exists, so the family's
    type also says which series it will have: ``_bucket``/``_sum``/``_count`` for a
    histogram, ``_total`` for a counter, the bare name for a gauge.
    """
    metrics = Metrics(CollectorRegistry())
    metrics.pool_created("p")
    metrics.watch_pools(lambda: [("p", {"idle": 1}, 0)])
    metrics.set_build_info("0.0.0-test", {"docker": "27.0"})
    samples: set[str] = set()
    families: dict[str, str] = {}
    for family in metrics.registry.collect():
        families[family.name] = family.type
        samples.update(sample.name for sample in family.samples)
    return samples, families


def unexported_series(names: Iterable[str]) -> list[str]:
    """The ``sandpool_*`` series among ``names`` (a dashboard's or alert rules' queries)
    that sandpool never exports, sorted."""
    samples, families = exported_series()
    unknown = []
    for name in sorted(set(names)):
        if name in samples:
            continue
        if any(
            name == family + suffix
            for family, kind in families.items()
            for suffix in SERIES_SUFFIXES.get(kind, ())
        ):
            continue
        unknown.append(name)
    return unknown


class DaemonFailed(AssertionError):
    """The daemon exited before it was ready, was not ready in time, or ignored SIGTERM.

    An AssertionError, so a test that starts a daemon fails rather than errs;
    the message carries the tail of the daemon's log.
    """


@dataclass
class Daemon:
    """A running ``sandpool serve`` subprocess and the files it was started with."""

    process: subprocess.Popen[bytes]
    socket: str
    log_path: Path
    instance_id: str
    # What stop_daemon removes once the daemon has stopped (a container's cgroups).
    cleanup: Callable[[], None] | None = None
    # The daemon's image run with `docker run` (tests/daemon_image.py): process
    # is the attached `docker run`, which passes SIGTERM on.
    container: str | None = None

    @property
    def pid(self) -> int:
        if self.container is not None:
            from tests.daemon_image import daemon_pid

            return daemon_pid(self.container)
        return self.process.pid

    def client(self, timeout_s: float = 60) -> Client:
        return Client(self.socket, timeout_s=timeout_s)

    def pools(self) -> list[dict[str, Any]]:
        with self.client() as client:
            return client.pools()

    def rss_kib(self) -> int:
        """VmRSS of the daemon process."""
        return self.status_field("VmRSS:")

    def status_field(self, name: str) -> int:
        """A ``kB`` or count field of /proc/<pid>/status (``VmRSS:``, ``Threads:``)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
        raise AssertionError(f"no {name} in /proc/{self.pid}/status")

    def log_events(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line]

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def launch_daemon(
    workdir: Path,
    config: str = DAEMON_CONFIG,
    env: dict[str, str] | None = None,
    command_prefix: Sequence[str] = (),
    code_dir: Path = REPOSITORY,
) -> Daemon:
    """Write ``config`` to ``workdir`` and exec the daemon there; does not wait for it.

    The socket and the JSON log (stdout and stderr) are ``workdir``'s
    ``sandpool.sock`` and ``daemon.log``. ``command_prefix`` runs the daemon
    under another command (e.g. ``setpriv`` to run it as another user), which
    must exec it: ``process.pid`` is then that command's. ``code_dir`` is the
    working directory, so ``python -m`` imports that tree's ``api`` and ``pool``
    first (another checkout, to compare).
    """
    if IN_DAEMON_IMAGE:
        from tests.daemon_image import launch_container

        return launch_container(workdir, config, env)
    config_path = workdir / "sandpool.toml"
    config_path.write_text(textwrap.dedent(config))
    socket_path = workdir / "sandpool.sock"
    log_path = workdir / "daemon.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*command_prefix, sys.executable, "-m", "api.cli", "serve",
             "--config", str(config_path), "--socket", str(socket_path), "--log-format", "json"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            cwd=code_dir,
        )
    return Daemon(process, str(socket_path), log_path, instance_id="")


def wait_started(daemon: Daemon, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until the daemon logged its instance id and every pool has ``min_idle`` idle.

    Raises DaemonFailed if it exits first or is not ready within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise DaemonFailed(f"the daemon exited with {daemon.process.returncode} before it "
                               f"was ready:\n{daemon.log_tail()}")
        if not daemon.instance_id:
            daemon.instance_id = instance_from_log(daemon.log_path)
        else:
            try:
                if all(p["idle"] >= p["min_idle"] for p in daemon.pools()):
                    return
            except ApiError:
                pass  # not listening yet: the socket comes up once the pools are warm
        time.sleep(0.05)
    raise DaemonFailed(f"the daemon was not ready within {timeout_s:g} s:\n{daemon.log_tail()}")


def instance_from_log(log_path: Path) -> str:
    """The instance id the daemon logs as it starts; "" until then.

    Lines that are not JSON (an interpreter's traceback before logging is set
    up) are skipped.
    """
    try:
        lines = log_path.read_text(errors="replace").splitlines()
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


def start_daemon(
    workdir: Path,
    config: str = DAEMON_CONFIG,
    env: dict[str, str] | None = None,
    command_prefix: Sequence[str] = (),
    code_dir: Path = REPOSITORY,
) -> Daemon:
    """``launch_daemon`` then ``wait_started``: a daemon whose pools are warm.

    Raises DaemonFailed (an AssertionError) if it exits or is not ready in time.
    """
    daemon = launch_daemon(workdir, config, env, command_prefix, code_dir)
    try:
        wait_started(daemon)
    except DaemonFailed:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        if daemon.cleanup is not None:  # the image's delegated cgroups, say
            daemon.cleanup()
        raise
    return daemon


@contextlib.contextmanager
def running_daemon(workdir: Path, config: str = DAEMON_CONFIG) -> Iterator[Daemon]:
    """A warm daemon for a ``with`` block (a module's fixture), stopped and checked for leaks."""
    daemon = start_daemon(workdir, config)
    try:
        yield daemon
    finally:
        stop_daemon(daemon)


def terminate_daemon(daemon: Daemon, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM (unless it has exited) and wait; returns the exit status.

    Raises DaemonFailed if SIGTERM did not end it within ``timeout_s``; it has
    been SIGKILLed by then, so ``process.returncode`` is set.
    """
    if daemon.process.poll() is None:
        daemon.process.send_signal(signal.SIGTERM)
        try:
            daemon.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            daemon.process.kill()
            daemon.process.wait()
            raise DaemonFailed(
                f"the daemon did not stop within {timeout_s:g} s of SIGTERM") from None
    return daemon.process.returncode


def stop_daemon(daemon: Daemon) -> None:
    """SIGTERM, expect exit 0, and assert the daemon left no container and no socket behind.

    A daemon that had already exited (a test killed it) is only checked for leftovers.
    """
    try:
        if daemon.process.poll() is None:
            code = terminate_daemon(daemon)
            assert code == 0, daemon.log_tail()
    finally:
        if daemon.cleanup is not None:
            daemon.cleanup()
    leftovers = docker_containers(f"sandpool.instance={daemon.instance_id}")
    if leftovers:
        subprocess.run(["docker", "rm", "-f", "-v", *leftovers], capture_output=True, timeout=60)
    assert leftovers == [], f"containers left behind: {leftovers}"
    # Each Docker sandbox's devpts volume goes with its container (v=True).
    volumes = docker_volumes(f"sandpool.instance={daemon.instance_id}")
    if volumes:
        subprocess.run(["docker", "volume", "rm", "-f", *volumes], capture_output=True,
                       timeout=60)
    assert volumes == [], f"volumes left behind: {volumes}"
    assert not os.path.exists(daemon.socket), "socket file left behind"
    if daemon.process.returncode == 0:  # a killed daemon's are the next one's to sweep
        left = daemon_cgroups(daemon.process.pid)
        assert left == [], f"cgroups left behind: {left}"


def daemon_cgroups(pid: int) -> list[Path]:
    """The cgroups named after daemon ``pid`` (``sandpool-<pid>-*``) in every
    hierarchy, where a daemon this process started makes them: beside this
    process's own cgroup of one hierarchy or another (``pools_base``; a Docker
    pool's directory is at its cpu cgroup's path in every hierarchy). Not a
    walk of /sys/fs/cgroup: see ``pool_cgroup_dir``."""
    root = process_cgroups.CGROUP_ROOT
    lines = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    if (root / "cgroup.controllers").exists():
        hierarchies = [root]
    else:  # "cpu,cpuacct", "name=systemd" -> systemd, "" (hybrid's v2) -> unified
        hierarchies = [root / (controllers.removeprefix("name=") or "unified")
                       for _, controllers, _ in lines]
    found: set[Path] = set()
    for hierarchy in hierarchies:
        for path in {path for _, _, path in lines}:
            with contextlib.suppress(OSError):
                found.update((hierarchy / path.lstrip("/")).glob(f"sandpool-{pid}-*"))
    return sorted(found)


@contextlib.contextmanager
def docker_socket_relay(path: Path) -> Iterator[str]:
    """A unix socket at ``path`` relaying each connection to Docker's own: an
    engine behind a proxy, as docker-socket-proxy puts it. Yields the
    ``DOCKER_HOST`` that reaches it; a daemon using it must stop inside."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(64)
    held: list[socket.socket] = []

    def pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)  # the end of one direction, as sent

    def serve() -> None:
        while True:
            try:
                near, _ = server.accept()
                far = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                far.connect("/var/run/docker.sock")
            except OSError:
                return  # closed: the relay is over
            held.extend((near, far))
            for source, target in ((near, far), (far, near)):
                threading.Thread(target=pump, args=(source, target), daemon=True).start()

    accepting = threading.Thread(target=serve, daemon=True)
    accepting.start()
    try:
        yield f"unix://{path}"
    finally:
        server.shutdown(socket.SHUT_RDWR)  # wakes the accept
        server.close()
        accepting.join(timeout=10)
        for connection in held:
            connection.close()


def docker_containers(label: str) -> list[str]:
    """Ids of the containers, running or not, that carry ``label`` (``key=value``)."""
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={label}"],
        check=True, capture_output=True, text=True, timeout=30,
    )
    return out.stdout.split()


def docker_volumes(label: str) -> list[str]:
    """Names of the volumes that carry ``label`` (``key`` or ``key=value``)."""
    out = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", f"label={label}"],
        check=True, capture_output=True, text=True, timeout=30,
    )
    return out.stdout.split()


def no_container_starting() -> bool:
    """True when no sandpool container is in Docker's "created" state twice, 0.3 s apart."""
    for _ in range(2):
        created = subprocess.run(
            ["docker", "ps", "-aq", "--filter", "label=sandpool.pool", "--filter",
             "status=created"], capture_output=True, text=True, timeout=30,
        ).stdout.split()
        if created:
            return False
        time.sleep(0.3)
    return True


def restart_dockerd(during: Callable[[], None]) -> None:
    """Stop the engine, run ``during``, start it again the way `make` does."""
    pids = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True).stdout.split()
    assert pids, "dockerd is not running"
    # A container whose start dockerd's shutdown cuts short keeps its overlay
    # mounted after the restart, and no `docker rm` removes it any more (Docker
    # 20.10): wait until no sandbox of any daemon here is being started.
    wait_until(no_container_starting, "sandbox starts to finish", timeout_s=60)
    systemd = Path("/proc/1/comm").read_text().strip() == "systemd"
    volumes_before = set(all_volumes())
    try:
        if systemd:
            subprocess.run(["systemctl", "stop", "docker.socket", "docker"], check=True,
                           timeout=120)
        else:
            for pid in pids:
                os.kill(int(pid), signal.SIGTERM)
            wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids),
                       "dockerd to stop", timeout_s=60)
        during()
    finally:
        subprocess.run(["bash", str(REPOSITORY / "scripts" / "ensure-docker.sh")], check=True,
                       timeout=180, cwd=REPOSITORY)
        remove_half_made_volumes(volumes_before)


def all_volumes() -> list[str]:
    out = subprocess.run(["docker", "volume", "ls", "-q"], check=True, capture_output=True,
                         text=True, timeout=30)
    return out.stdout.split()


def remove_half_made_volumes(before: set[str]) -> None:
    """Remove the volumes a dockerd shutdown left half made, new since ``before``.

    A container created while dockerd 20.10 shuts down (a daemon refilling
    its pool) gets its volume's directory but not its record ("create <id>:
    database not open" in dockerd's log): after the restart it is a volume with
    no label and no option, which no daemon can tell from anyone else's
    (docs/security.md, PTYs). This restart made them, so this test removes them.
    """
    for name in set(all_volumes()) - before:
        inspected = subprocess.run(
            ["docker", "volume", "inspect", "-f", "{{len .Labels}} {{len .Options}}", name],
            capture_output=True, text=True, timeout=30)
        if inspected.stdout.split() == ["0", "0"]:
            subprocess.run(["docker", "volume", "rm", name], capture_output=True, timeout=30)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pool_cgroup_dir(daemon: Daemon, pool: str, controller: str = "cpu") -> Path | None:
    """A daemon's pool directory in the v1 ``controller`` hierarchy, or its v2
    directory; None where there is none.

    Found from the daemon's own cgroup, by the rules the daemon makes it with
    (pool/backends/process/cgroups.py), never by walking /sys/fs/cgroup:
    containers' directories come and go under a walk, which then fails with ENOENT.
    """
    pid = daemon.process.pid
    own = process_cgroups.own_cgroups(pid)
    root = process_cgroups.CGROUP_ROOT
    if (root / "cgroup.controllers").exists():
        base = process_cgroups.pools_base(own.get("", "/"), root, pid)
    elif controller in own:
        base = process_cgroups.pools_base(own[controller], root / controller, pid)
    else:
        return None
    found = base / f"sandpool-{daemon.process.pid}-{daemon.instance_id}-{pool}"
    return found if found.is_dir() else None


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``condition`` every 50 ms; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout_s:g} s: {what}")
        time.sleep(0.05)


def setting(pool: str, key: str) -> Any:
    """A pool's effective setting in the test daemon's config (the default when unset)."""
    table = tomllib.loads(textwrap.dedent(DAEMON_CONFIG))["pools"][pool]
    defaults = {f.name: f.default for f in dataclasses.fields(PoolConfig)}
    return table.get(key, defaults[key])


def wait_settled(daemon: Daemon, timeout_s: float = 60.0) -> None:
    """Until every pool has ``min_idle`` idle and none is starting a sandbox."""
    wait_until(lambda: all(p["idle"] >= p["min_idle"] and p["starting"] == 0
                           for p in daemon.pools()),
               "every pool settled at min_idle", timeout_s)


def host_processes_with(marker: str) -> list[int]:
    """Host pids whose command line contains the marker (sandboxed ones included)."""
    needle = marker.encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue  # exited while we looked
    return found


def processes_in_uid_range(base: int, count: int) -> list[int]:
    """Host pids whose real uid is in ``[base, base + count)`` (a daemon's sandbox uids)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue  # exited while we looked
        if base <= uid < base + count:
            found.append(int(entry))
    return found


def scrape(url: str, timeout_s: float = 10.0) -> str:
    """The Prometheus text the metrics endpoint at ``url`` serves (TCP, not the socket)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:
        return str(answer.read().decode())


def metric_sample(text: str, name: str, **labels: str) -> float:
    """The first ``name`` sample in Prometheus text format that has ``labels``; 0 if none.

    The sample may carry more labels than ``labels``.
    """
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.partition("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def skip_on_wasi(pool: str, why: str) -> None:
    if pool in WASI_POOLS:
        pytest.skip(f"{pool}: {why}")


def assert_out_of_memory(result: dict[str, Any], pool: str) -> None:
    """The verdict on code that ran out of memory, as each tier gives it."""
    if pool in WASI_POOLS:
        # The store's memory limit refuses the growth inside the guest, and the
        # host cannot see that refusal: the program's own MemoryError,
        # contained at memory_mb, not a kill.
        assert (result["exit_code"], result["oom_killed"]) == (1, False)
        assert str(result["stderr"]).rstrip().endswith("MemoryError")
    else:
        assert (result["exit_code"], result["oom_killed"]) == (137, True)


# --- wasm guests' threads -------------------------------------------------------------


SCHED_OTHER, SCHED_IDLE = 0, 5


def task_stats(pid: int) -> dict[int, tuple[int, int, int]]:
    """tid -> (policy, nice, user+system ticks) of every thread of ``pid``."""
    stats = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
            # proc(5) numbers fields from 1 with the name as 2: utime 14,
            # stime 15, nice 19, policy 41; fields[0] here is field 3.
            stats[int(task)] = (
                int(fields[38]), int(fields[16]), int(fields[11]) + int(fields[12])
            )
    return stats


def one_guest_config(cpus: float) -> str:
    """A daemon config with one wasm pool, ``wasm``, of one guest at a time at ``cpus``."""
    return f"""
[server]
metrics_address = "off"

[pools.wasm]
backend = "wasm"
min_idle = 1
max_size = 1
cpus = {cpus}
timeout_s = 30
"""
