"""What any sandbox must do, checked through the real daemon and its Unix socket.

Parametrized over Python pools so later backends (process, wasm) run the same
tests; the Docker-only checks live in test_docker_isolation.py.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from api.client import Client
from pool import guest
from tests.support import (
    PYTHON_POOLS,
    Daemon,
    assert_out_of_memory,
    setting,
    skip_on_wasi,
    wait_settled,
)


@pytest.fixture(params=PYTHON_POOLS)
def pool(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(client: Client, code: str, pool: str, **options: object) -> dict[str, object]:
    return client.run(textwrap.dedent(code), pool=pool, **options)  # type: ignore[arg-type]


def test_print(client: Client, pool: str) -> None:
    result = run(client, "print('hello', 6 * 7)", pool)
    assert result["stdout"] == "hello 42\n"
    assert result["stderr"] == ""
    assert result["exit_code"] == 0
    assert result["timed_out"] is False
    assert result["oom_killed"] is False
    assert result["pool"] == pool
    assert float(result["duration_ms"]) >= 0  # type: ignore[arg-type]


def test_the_runner_starts_from_the_bytecode_the_daemon_compiled(client: Client, pool: str) -> None:
    # The runner is imported, not run, so its bytecode comes from the guest
    # directory's __pycache__ (pool/guest.py): a start does not compile it.
    # Asked of the sandbox's own interpreter, under the sandbox's own mount.
    skip_on_wasi(pool, "the wasm tier runs its runner once, in the template its guests copy")
    module = guest.path_in_sandbox(f"{guest.RUNNER_MODULE}.py")
    code = f"""
        import json, subprocess, sys
        probe = subprocess.run(
            [sys.executable, "-I", "-v", "-c",
             "import sys; sys.path.insert(0, {guest.GUEST_DIR!r}); import {guest.RUNNER_MODULE}"],
            capture_output=True, text=True)
        print(json.dumps({{"tag": sys.implementation.cache_tag, "status": probe.returncode,
                          "lines": [l for l in probe.stderr.splitlines() if {module!r} in l]}}))
    """
    seen = json.loads(str(run(client, code, pool)["stdout"]))
    assert seen["status"] == 0, seen
    if seen["tag"] != sys.implementation.cache_tag:
        pytest.skip(f"the image's Python ({seen['tag']}) is not the daemon's: it compiles")
    bytecode = guest.path_in_sandbox(guest.runner_bytecode_path() or "")
    assert f"# {bytecode} matches {module}" in seen["lines"], seen


def test_stdin_is_the_requests_data(client: Client, pool: str) -> None:
    code = "import sys; data = sys.stdin.read(); print(len(data), data.upper())"
    result = run(client, code, pool, stdin="abc\ndef")
    assert result["stdout"] == "7 ABC\nDEF\n"


def test_no_stdin_reads_empty(client: Client, pool: str) -> None:
    assert run(client, "import sys; print(repr(sys.stdin.read()))", pool)["stdout"] == "''\n"


@pytest.mark.parametrize(("code", "status"), [
    ("import sys; sys.exit(3)", 3),
    ("raise SystemExit(0)", 0),
    ("import sys; sys.exit('bye')", 1),
    ("import os; os._exit(7)", 7),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 128 + 15),
])
def test_exit_codes(client: Client, pool: str, code: str, status: int) -> None:
    if "signal" in code:
        skip_on_wasi(pool, "WASI has no signals, so os.kill does not exist")
    assert run(client, code, pool)["exit_code"] == status


def test_exception_exits_1_with_a_traceback(client: Client, pool: str) -> None:
    result = run(client, """
        def f():
            return 1 / 0
        f()
    """, pool)
    assert result["exit_code"] == 1
    stderr = str(result["stderr"])
    assert stderr.startswith("Traceback (most recent call last):")
    assert "return 1 / 0" in stderr  # the source line is shown
    assert stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "runner" not in stderr  # no frame of sandpool's own


def test_syntax_error(client: Client, pool: str) -> None:
    result = run(client, "print(", pool)
    assert result["exit_code"] == 1
    assert "SyntaxError" in str(result["stderr"])


def test_name_is_main(client: Client, pool: str) -> None:
    assert run(client, "print(__name__)", pool)["stdout"] == "__main__\n"


def test_output_is_utf8_with_replacement(client: Client, pool: str) -> None:
    code = "import sys; sys.stdout.buffer.write('é'.encode() + b'\\xff\\n')"
    assert run(client, code, pool)["stdout"] == "é\ufffd\n"


def test_timeout_of_a_busy_loop(client: Client, pool: str) -> None:
    result = run(client, "while True: pass", pool, timeout_s=1)
    assert result["timed_out"] is True
    assert result["exit_code"] is None
    assert result["oom_killed"] is False


def test_timeout_of_a_sleep_keeps_earlier_output(client: Client, pool: str) -> None:
    result = run(client, "import time; print('before', flush=True); time.sleep(60)", pool,
                 timeout_s=1)
    assert result["timed_out"] is True
    assert result["stdout"] == "before\n"


def test_memory_bomb_is_an_oom_kill_not_a_timeout(client: Client, pool: str) -> None:
    result = run(client, "blocks = []\nwhile True: blocks.append(bytearray(16 * 2**20))", pool,
                 timeout_s=15)
    assert result["timed_out"] is False
    assert_out_of_memory(result, pool)


def test_fork_bomb_is_contained(client: Client, pool: str) -> None:
    skip_on_wasi(pool, "WASI has no processes, so os.fork does not exist")
    result = run(client, """
        import os
        forks = 0
        try:
            for _ in range(10_000):
                if os.fork() == 0:
                    import time; time.sleep(30)
                forks += 1
        except OSError as e:
            print("stopped after", forks, e.errno)
    """, pool, timeout_s=10)
    assert str(result["stdout"]).startswith("stopped after")
    assert int(str(result["stdout"]).split()[2]) < 100
    assert run(client, "print('still serving')", pool)["stdout"] == "still serving\n"


FLOODS = 24


def test_output_flood_is_truncated_and_daemon_memory_stays_flat(
    daemon: Daemon, client: Client, pool: str
) -> None:
    cap = setting(pool, "max_output_bytes")

    def flood() -> None:
        result = run(client, "while True: print('x' * 10**6)", pool, timeout_s=10)
        assert result["stdout_truncated"] is True
        assert result["timed_out"] is False
        assert len(str(result["stdout"])) == cap

    # Measured with every pool settled, after a first flood: the allocator keeps
    # what one capture needed, and a refill under way holds a sandbox's worth.
    flood()
    wait_settled(daemon)
    before = daemon.rss_kib()
    for _ in range(FLOODS):
        flood()
    wait_settled(daemon)
    # A daemon that kept each run's output (as a reference cycle among a run's
    # objects did, until the cyclic collector came by) would have grown by
    # FLOODS caps; settled, the RSS wanders by up to ~9 MiB (wasm pools' refills).
    assert daemon.rss_kib() - before < FLOODS * cap // 1024 // 2


def test_stderr_flood_is_truncated(client: Client, pool: str) -> None:
    result = run(client, "import sys\nwhile True: sys.stderr.write('e' * 65536)", pool)
    assert result["stderr_truncated"] is True
    assert result["stdout_truncated"] is False


def test_state_does_not_carry_over(client: Client, pool: str) -> None:
    write = run(client, """
        import os
        open('/tmp/secret', 'w').write('leak')
        open('state', 'w').write('leak')
        print(os.getpid())
    """, pool)
    assert write["exit_code"] == 0
    read = run(client, """
        import os
        print(os.path.exists('/tmp/secret'), os.path.exists('state'))
    """, pool)
    assert read["stdout"] == "False False\n"
    assert read["sandbox_id"] != write["sandbox_id"]


def test_concurrent_requests_all_answered_with_unique_sandboxes(
    daemon: Daemon, pool: str
) -> None:
    def one(i: int) -> dict[str, object]:
        with daemon.client() as c:
            return run(c, f"import time; time.sleep(0.05); print({i})", pool)

    with ThreadPoolExecutor(16) as executor:
        results = list(executor.map(one, range(16)))
    assert [r["stdout"] for r in results] == [f"{i}\n" for i in range(16)]
    assert len({r["sandbox_id"] for r in results}) == 16


def test_pool_returns_to_min_idle(client: Client, pool: str) -> None:
    for _ in range(3):
        run(client, "print(1)", pool)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (summary,) = [p for p in client.pools() if p["name"] == pool]
        if summary["idle"] == summary["min_idle"] and summary["busy"] == 0:
            break
        time.sleep(0.1)
    assert summary["idle"] == summary["min_idle"]
    assert summary["busy"] == 0
