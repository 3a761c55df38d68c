"""The HTTP contract: every bad input is a JSON error with a stable code, never a 5xx."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from api.client import ApiError, Client
from tests.support import (
    DAEMON_CONFIG,
    PYTHON_POOLS,
    WASI_POOLS,
    Daemon,
    start_daemon,
    stop_daemon,
)


class Raw(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def raw(daemon: Daemon, method: str, path: str, body: bytes | None = None,
        content_type: str | None = "application/json") -> tuple[int, dict[str, Any], Any]:
    connection = Raw(daemon.socket)
    headers = {"Content-Type": content_type} if content_type else {}
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    document = json.loads(response.read())
    connection.close()
    return response.status, dict(response.getheaders()), document


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (b"\xff\xfe", 400, "invalid_encoding"),
    (b"[1, 2]", 400, "invalid_request"),
    (b"{}", 400, "missing_code"),
    (b'{"code": 5}', 400, "invalid_type"),
    (b'{"code": "1", "stdin": 5}', 400, "invalid_type"),
    (b'{"code": "1", "timeout_s": 0}', 400, "invalid_timeout"),
    (b'{"code": "1", "timeout_s": -1}', 400, "invalid_timeout"),
    (b'{"code": "1", "timeout_s": 1e9}', 400, "invalid_timeout"),
    (b'{"code": "1", "timeout_s": "5"}', 400, "invalid_timeout"),
    (b'{"code": "1", "timeout_s": true}', 400, "invalid_timeout"),
    (b'{"code": "1", "timeout_s": NaN}', 400, "invalid_timeout"),
    (b'{"code": "1", "timeout": 5}', 400, "unknown_field"),
    (b'{"code": "1", "pool": "nope"}', 404, "unknown_pool"),
    (b'{"code": "1", "language": "cobol"}', 400, "unknown_language"),
])
def test_bad_run_requests(daemon: Daemon, body: bytes, status: int, code: str) -> None:
    got_status, _, document = raw(daemon, "POST", "/v1/run", body)
    assert (got_status, document["error"]["code"]) == (status, code)
    assert document["error"]["message"]


def test_wrong_method_and_path(daemon: Daemon) -> None:
    status, _, document = raw(daemon, "GET", "/v1/run")
    assert (status, document["error"]["code"]) == (405, "method_not_allowed")
    status, _, document = raw(daemon, "GET", "/v2/nothing")
    assert (status, document["error"]["code"]) == (404, "not_found")


def test_wrong_content_type(daemon: Daemon) -> None:
    status, _, document = raw(daemon, "POST", "/v1/run", b"code=1",
                              "application/x-www-form-urlencoded")
    assert (status, document["error"]["code"]) == (415, "unsupported_media_type")


def test_body_over_the_limit(daemon: Daemon) -> None:
    body = json.dumps({"code": "#" * 300_000}).encode()
    status, _, document = raw(daemon, "POST", "/v1/run", body)
    assert (status, document["error"]["code"]) == (413, "request_too_large")


def test_nul_bytes_in_code_are_accepted(client: Client) -> None:
    result = client.run("print('a')\0")
    assert result["exit_code"] == 1
    assert "null" in str(result["stderr"]).lower()
    assert client.run("print('a\\0b'.count('\\0'))")["stdout"] == "1\n"


def test_exhausted_pool_answers_503_with_retry_after(daemon: Daemon, client: Client) -> None:
    # Pool "tiny": max_size 1, max_queue 1. One runs, one queues, the third is refused.
    def tiny(code: str) -> dict[str, Any]:
        with daemon.client() as c:
            return c.run(code, pool="tiny")

    with ThreadPoolExecutor(2) as executor:
        running = executor.submit(tiny, "import time; time.sleep(2); print('ran')")
        wait_for(lambda: pool_counts(client, "tiny")["busy"] == 1)
        queued = executor.submit(tiny, "print('queued')")
        time.sleep(0.3)  # let it reach the queue
        status, headers, document = raw(daemon, "POST", "/v1/run", b'{"code": "1", "pool": "tiny"}')
        assert status == 503
        assert document["error"]["code"] == "pool_exhausted"
        assert int(headers["Retry-After"]) >= 1
        assert running.result(timeout=30)["stdout"] == "ran\n"
        assert queued.result(timeout=30)["stdout"] == "queued\n"


def pool_counts(client: Client, name: str) -> dict[str, Any]:
    return next(p for p in client.pools() if p["name"] == name)


def wait_for(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_pools_health_and_readiness(client: Client) -> None:
    pools = {p["name"]: p for p in client.pools()}
    # Exactly the configured pools; each backend's engineer adds one to DAEMON_CONFIG.
    assert set(pools) == set(tomllib.loads(DAEMON_CONFIG)["pools"])
    assert pools["python"]["backend"] == "docker"
    assert pools["python-process"]["backend"] == "process"
    assert pools["shell"]["language"] == "shell"
    assert set(pools["python"]) == {"name", "backend", "language", "runtime", "idle", "busy",
                                    "starting", "min_idle", "max_size", "problem",
                                    "leased", "max_sessions"}
    assert {p["problem"] for p in pools.values()} == {None}  # all warm, every backend up
    # The image's runtime label and the pinned wasm module say what runs where.
    for name in ("python", "python-process"):
        assert pools[name]["runtime"]["version"].startswith("3.11"), pools[name]
    assert pools["python-wasm"]["runtime"]["version"].startswith("3.")
    assert client.request("GET", "/healthz") == {"status": "ok"}
    assert client.request("GET", "/readyz")["ready"] is True


def test_output_cap_per_pool(client: Client) -> None:
    result = client.run("print('y' * 10000)", pool="tiny")
    assert result["stdout_truncated"] is True
    assert result["stdout"] == "y" * 4096
    assert result["exit_code"] is None


def test_cli_run_and_status(daemon: Daemon) -> None:
    base = [sys.executable, "-m", "api.cli"]
    done = subprocess.run([*base, "run", "--socket", daemon.socket, "-c",
                           "import sys; print('out'); print('err', file=sys.stderr); sys.exit(9)"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (9, "out\n", "err\n")
    done = subprocess.run([*base, "run", "--socket", daemon.socket, "--timeout", "0.5", "-c",
                           "while True: pass"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 124
    assert done.stderr == "sandpool: the program timed out and was killed\n"
    done = subprocess.run([*base, "run", "--socket", daemon.socket, "-l", "shell", "-"],
                          input="echo from-stdin", capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "from-stdin\n")
    done = subprocess.run([*base, "status", "--socket", daemon.socket],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.split("\n")[0].split()[:3] == ["name", "backend", "language"]


def test_cli_errors_are_one_line(daemon: Daemon, tmp_path: Any) -> None:
    base = [sys.executable, "-m", "api.cli"]
    done = subprocess.run([*base, "run", "--socket", str(tmp_path / "none.sock"), "-c", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 125
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("sandpool: ")
    done = subprocess.run([*base, "run", "--socket", daemon.socket, "--pool", "nope", "-c", "1"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (125, "sandpool: no pool named 'nope'\n")


def test_second_daemon_on_the_same_socket_is_refused(daemon: Daemon, tmp_path: Any) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[server]\nmetrics_address = "off"\n[pools.python]\nmin_idle = 0\n')
    done = subprocess.run([sys.executable, "-m", "api.cli", "serve", "--config", str(config),
                           "--socket", daemon.socket], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"another sandpool daemon is already listening on {daemon.socket}" in done.stderr


def test_stale_socket_is_replaced(tmp_path: Any) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "sandpool.sock"))
    stale.close()  # the file stays, nobody listens: what a crashed daemon leaves
    fresh = start_daemon(tmp_path, '[server]\nmetrics_address = "off"\n'
                                   '[pools.python]\nmin_idle = 1\nmax_size = 2\n')
    try:
        with fresh.client() as client:
            assert client.run("print(2)")["stdout"] == "2\n"
    finally:
        stop_daemon(fresh)


def test_bad_config_names_the_key(tmp_path: Any) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[pools.python]\nmemory_mb = 'lots'\n")
    done = subprocess.run([sys.executable, "-m", "api.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr == "sandpool: pools.python.memory_mb must be of type int, not str\n"


def test_client_raises_api_error(client: Client) -> None:
    with pytest.raises(ApiError) as caught:
        client.run("1", pool="nope")
    assert (caught.value.status, caught.value.code) == (404, "unknown_pool")


# --- files, env and argv: what the daemon refuses before any sandbox runs --------
# (What a sandbox does with them, and the files, results and error it returns,
# is tested per tier against the real engines.)


def run_body(**fields: Any) -> bytes:
    return json.dumps({"code": "print(1)", **fields}).encode()


@pytest.mark.parametrize(("body", "code"), [
    (run_body(files={"a.txt": "x"}), "invalid_files"),
    (run_body(files=[{"path": "a.txt"}]), "invalid_files"),
    (run_body(files=[{"path": "a.txt", "content": "x", "encoding": "gzip"}]), "invalid_files"),
    (run_body(files=[{"path": "/etc/passwd", "content": "x"}]), "invalid_path"),
    (run_body(files=[{"path": "../escape", "content": "x"}]), "invalid_path"),
    (run_body(files=[{"path": "a/../../escape", "content": "x"}]), "invalid_path"),
    (run_body(files=[{"path": "a\0b", "content": "x"}]), "invalid_path"),
    (run_body(files=[{"path": "..\\escape", "content": "x"}]), "invalid_path"),
    (run_body(files=[{"path": "x" * 256, "content": "x"}]), "invalid_path"),
    (run_body(files=[{"path": "a", "content": "not base64!", "encoding": "base64"}]),
     "invalid_file_content"),
    (run_body(files=[{"path": "a", "content": ""}, {"path": "a", "content": ""}]),
     "duplicate_path"),
    (run_body(files=[{"path": "a", "content": ""}, {"path": "a/b", "content": ""}]),
     "path_conflict"),
    (run_body(files=[{"path": f"f{i}", "content": ""} for i in range(33)]), "too_many_files"),
    (run_body(env={"1BAD": "x"}), "invalid_env"),
    (run_body(env={"A": 1}), "invalid_env"),
    (run_body(env={"A": "x\0y"}), "invalid_env"),
    (run_body(env=["A=1"]), "invalid_env"),
    (run_body(argv="-v"), "invalid_argv"),
    (run_body(argv=["a\0b"]), "invalid_argv"),
    (run_body(argv=[""] * 257), "invalid_argv"),
])
def test_bad_files_env_and_argv_are_400(daemon: Daemon, body: bytes, code: str) -> None:
    status, _, document = raw(daemon, "POST", "/v1/run", body)
    assert (status, document["error"]["code"]) == (400, code)
    assert document["error"]["message"]


def test_file_size_limits_are_the_pools(spawn_daemon: Callable[..., Daemon]) -> None:
    small = spawn_daemon('[server]\nmetrics_address = "off"\n'
                         "[pools.python]\nmin_idle = 0\nmax_size = 1\n"
                         "max_file_bytes = 4\nmax_files_bytes = 6\n")
    status, _, document = raw(small, "POST", "/v1/run",
                              run_body(files=[{"path": "a", "content": "12345"}]))
    assert (status, document["error"]["code"]) == (400, "file_too_large")
    assert document["error"]["message"] == (
        "files[0] 'a' holds 5 bytes; pool 'python' takes at most 4 per file"
    )
    status, _, document = raw(small, "POST", "/v1/run", run_body(files=[
        {"path": "a", "content": "1234"}, {"path": "b", "content": "MTIz", "encoding": "base64"},
    ]))
    assert (status, document["error"]["code"]) == (400, "files_too_large")
    # At the limits exactly, the run goes ahead; the same limits cap what comes back.
    with small.client() as client:
        result = client.run(
            "import os\nos.makedirs('out', exist_ok=True)\n"
            "open('out/big', 'w').write('0123456789')\n"
            "print(open('a').read() + open('b').read())",
            files={"a": "1234", "b": b"12"},
        )
    assert (result["exit_code"], result["stdout"]) == (0, "123412\n")
    assert result["files"] == [{"path": "out/big", "type": "file", "size": 10,
                                "content": base64.b64encode(b"0123").decode(),
                                "truncated": True}]


def test_the_client_sends_files_env_and_argv(client: Client) -> None:
    # Refused ones prove what the client put on the wire: bytes as base64, str as text.
    with pytest.raises(ApiError) as caught:
        client.run("1", files={"ok": b"\xff\x00", "../x": "text"})
    assert (caught.value.status, caught.value.code) == (400, "invalid_path")
    assert caught.value.message == "files[1].path '../x' has a '..' component"
    with pytest.raises(ApiError) as caught:
        client.run("1", env={"A B": "x"})
    assert caught.value.code == "invalid_env"
    with pytest.raises(ApiError) as caught:
        client.run("1", argv=["ok", "\0"])
    assert (caught.value.code, caught.value.message) == ("invalid_argv",
                                                         "argv[1] holds a NUL byte")


def test_a_result_always_carries_files_results_and_error(client: Client) -> None:
    result = client.run("print(1)")
    assert result["stdout"] == "1\n"
    assert isinstance(result["files"], list)
    assert isinstance(result["results"], list)
    assert (result["files_omitted"], result["results_omitted"]) == (0, 0)
    assert "error" in result


def test_cli_file_and_env_errors_are_one_line(daemon: Daemon, tmp_path: Any) -> None:
    base = [sys.executable, "-m", "api.cli", "run", "--socket", daemon.socket]
    data = tmp_path / "data.csv"
    data.write_text("a,b\n")
    done = subprocess.run([*base, "--file", f"{data}=../data.csv", "-c", "1"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (
        125, "sandpool: files[0].path '../data.csv' has a '..' component\n")
    done = subprocess.run([*base, "--file", str(data), "--file", f"{data}=in/copy.csv", "-e",
                           "MODE=x=y", "--arg=-v", "--out-dir", str(tmp_path / "kept"),
                           "-c", "print(1)"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "1\n", "")
    assert not (tmp_path / "kept").exists()  # nothing came back, nothing was made
    done = subprocess.run([*base, "--file", str(tmp_path / "missing.csv"), "-c", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 125
    assert done.stderr.startswith("sandpool: ")
    assert done.stderr.count("\n") == 1
    done = subprocess.run([*base, "--env", "NOVALUE", "-c", "1"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (
        125, "sandpool: --env 'NOVALUE': expected NAME=VALUE\n")
    done = subprocess.run([*base, "--env", "1X=y", "-c", "1"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (
        125, "sandpool: env name '1X' must match [A-Za-z_][A-Za-z0-9_]*\n")


# --- files in and out, results and the error, through every Python tier ----------


@pytest.mark.parametrize("pool", PYTHON_POOLS)
def test_files_env_and_argv_reach_the_program_and_out_comes_back(
    client: Client, pool: str
) -> None:
    code = (
        "import os, sys\n"
        "print(open('data/in.csv').read().strip(), open('raw.bin', 'rb').read(),\n"
        "      os.environ['MODE'], sys.argv[1:])\n"
        "os.makedirs('out/sub')\n"
        "open('out/sub/r.bin', 'wb').write(bytes(range(256)))\n"
        "open('out/empty', 'w').close()\n"
        "{'answer': 6 * 7}\n"
    )
    result = client.run(code, pool=pool, files={"data/in.csv": "a,é\n", "raw.bin": b"\0\xff"},
                        env={"MODE": "x=y é"}, argv=["-v", "", "two words"])
    assert (result["exit_code"], result["stderr"]) == (0, "")
    assert result["stdout"] == "a,é b'\\x00\\xff' x=y é ['-v', '', 'two words']\n"
    files = {entry["path"]: entry for entry in result["files"]}
    assert set(files) == {"out/sub/r.bin", "out/empty"}
    assert base64.b64decode(files["out/sub/r.bin"]["content"]) == bytes(range(256))
    assert (files["out/sub/r.bin"]["size"], files["out/sub/r.bin"]["truncated"]) == (256, False)
    assert (files["out/empty"]["content"], files["out/empty"]["size"]) == ("", 0)
    assert result["results"] == [
        {"type": "text/plain", "data": "{'answer': 42}", "truncated": False}]
    assert (result["files_omitted"], result["results_omitted"], result["error"]) == (0, 0, None)


@pytest.mark.parametrize("pool", PYTHON_POOLS)
def test_an_uncaught_exception_is_the_error_and_stays_on_stderr(
    client: Client, pool: str
) -> None:
    result = client.run("def f():\n    return {}['total']\nf()\n", pool=pool)
    assert result["exit_code"] == 1
    error = result["error"]
    assert (error["name"], error["value"]) == ("KeyError", "'total'")
    assert "return {}['total']" in error["traceback"]
    assert "KeyError: 'total'" in result["stderr"]
    assert result["results"] == []


@pytest.mark.parametrize("pool", PYTHON_POOLS)
def test_a_file_given_to_one_run_is_not_in_the_next(client: Client, pool: str) -> None:
    client.run("open('out/kept', 'w')", pool=pool, files={"secret.txt": "s", "out/kept": ""})
    result = client.run(
        "import os; print(sorted(os.listdir('.')), os.path.exists('out'))", pool=pool
    )
    assert "secret.txt" not in result["stdout"]
    assert result["files"] == []


# WASI's preopened directories refuse symlink() (EPERM): nothing to report there.
@pytest.mark.parametrize("pool", [p for p in PYTHON_POOLS if p not in WASI_POOLS])
def test_a_symlink_under_out_is_reported_never_followed(client: Client, pool: str) -> None:
    result = client.run(
        "import os\nos.makedirs('out', exist_ok=True)\nos.symlink('/etc/passwd', 'out/link')\n",
        pool=pool,
    )
    assert result["exit_code"] == 0, result["stderr"]
    assert result["files"] == [{"path": "out/link", "type": "symlink", "size": len("/etc/passwd"),
                                "content": None, "truncated": False}]


def test_cli_saves_what_a_run_returns(daemon: Daemon, tmp_path: Any) -> None:
    data = tmp_path / "data.csv"
    data.write_text("a,b\n1,2\n")
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "run", "--socket", daemon.socket, "--file", str(data),
         "--out-dir", str(tmp_path / "kept"), "-c",
         "import os\nos.makedirs('out', exist_ok=True)\n"
         "open('out/copy.csv', 'w').write(open('data.csv').read())\n1 + 1"],
        capture_output=True, text=True, timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "2\n", "")
    assert (tmp_path / "kept/out/copy.csv").read_text() == "a,b\n1,2\n"
