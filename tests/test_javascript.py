"""JavaScript pools through a real daemon: node pre-warmed in the docker and process tiers.

One daemon for the module, with docker pools on sandpool/node:bookworm
(``sandpool image build --profile node``; ``make setup`` builds it) and a
process pool running from that image's root file system. Every test runs in
both tiers, as a user would see them through the socket.
"""

from __future__ import annotations

import base64
import dataclasses
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from api.client import Client
from pool.backends.process.definition import runner_limits
from pool.config import NODE_IMAGE, parse_config
from pool.errors import ConfigError
from tests.support import Daemon, running_daemon

DOCKER, PROCESS, SMALL = "javascript", "javascript-process", "javascript-small"

CONFIG = f"""
[server]
metrics_address = "off"
max_request_bytes = 262144
shutdown_timeout_s = 10

[pools.{DOCKER}]
language = "javascript"
image = "{NODE_IMAGE}"
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20

[pools.{SMALL}]
language = "javascript"
image = "{NODE_IMAGE}"
min_idle = 1
max_size = 1
max_output_bytes = 4096

[pools.{PROCESS}]
backend = "process"
language = "javascript"
image = "{NODE_IMAGE}"
min_idle = 2
max_size = 4
timeout_s = 5
max_timeout_s = 20
"""


@pytest.fixture(scope="module")
def js_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("js-daemon"), CONFIG) as running:
        yield running


@pytest.fixture
def js(js_daemon: Daemon) -> Iterator[Client]:
    with js_daemon.client() as client:
        yield client


@pytest.fixture(params=[DOCKER, PROCESS])
def pool(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run(client: Client, code: str, pool: str, **options: Any) -> dict[str, Any]:
    return client.run(textwrap.dedent(code), pool=pool, **options)


def test_the_pools_say_they_run_javascript(js: Client) -> None:
    languages = {p["name"]: p["language"] for p in js.pools()}
    assert languages[DOCKER] == "javascript"


def test_output_and_a_clean_exit(js: Client, pool: str) -> None:
    result = run(js, "console.log('hello', 6 * 7); console.error('warn')", pool)
    assert (result["stdout"], result["stderr"], result["exit_code"]) == ("hello 42\n", "warn\n", 0)
    assert (result["timed_out"], result["oom_killed"], result["error"]) == (False, False, None)


def test_a_language_request_reaches_a_javascript_pool(js: Client) -> None:
    result = js.request("POST", "/v1/run", {"language": "javascript", "code": "console.log(1)"})
    assert (result["pool"], result["stdout"]) == (DOCKER, "1\n")


@pytest.mark.parametrize(("code", "status"), [
    ("process.exit(3)", 3),
    ("process.exitCode = 4", 4),
    ("setTimeout(() => { process.exitCode = 5 }, 20)", 5),
    ("process.exit()", 0),
    ("process.kill(process.pid, 'SIGTERM')", 128 + 15),
])
def test_exit_codes(js: Client, pool: str, code: str, status: int) -> None:
    assert run(js, code, pool)["exit_code"] == status


def test_exit_listeners_run_before_the_outcome(js: Client, pool: str) -> None:
    result = run(js, """
        process.on('exit', (code) => {
          require('fs').writeFileSync('out/at-exit', String(code));
          console.log('exit', code);
        });
        process.exitCode = 6;
    """, pool)
    assert (result["stdout"], result["exit_code"]) == ("exit 6\n", 6)
    assert [(f["path"], base64.b64decode(f["content"])) for f in result["files"]] == [
        ("out/at-exit", b"6")]


def test_the_event_loop_drains_before_the_end(js: Client, pool: str) -> None:
    result = run(js, """
        setTimeout(() => console.log('later'), 100);
        Promise.resolve().then(() => console.log('soon'));
        console.log('now');
    """, pool)
    assert result["stdout"] == "now\nsoon\nlater\n"


def test_an_uncaught_exception_is_the_error_and_goes_to_stderr(js: Client, pool: str) -> None:
    result = run(js, """
        function total(order) {
          return order.items.length;
        }
        total({});
    """, pool)
    assert result["exit_code"] == 1
    error = result["error"]
    assert (error["name"], error["value"]) == (
        "TypeError", "Cannot read properties of undefined (reading 'length')")
    assert "at total (/sandbox/main.js:3:" in error["traceback"]
    assert error["traceback"] in result["stderr"]
    assert "node_runner" not in result["stderr"]  # no frame of sandpool's own


def test_an_unhandled_rejection_is_the_error(js: Client, pool: str) -> None:
    result = run(js, """
        async function load() { throw new RangeError('no rows'); }
        load();
        setTimeout(() => console.log('never'), 500);
    """, pool)
    assert (result["exit_code"], result["stdout"]) == (1, "")
    assert (result["error"]["name"], result["error"]["value"]) == ("RangeError", "no rows")
    assert "RangeError: no rows" in result["stderr"]


def test_a_syntax_error_points_at_the_line(js: Client, pool: str) -> None:
    result = run(js, "const a = 1;\nconst b = ;\n", pool)
    assert (result["exit_code"], result["error"]["name"]) == (1, "SyntaxError")
    assert "/sandbox/main.js:2" in result["stderr"]


def test_es_module_syntax_runs_as_a_module(js: Client, pool: str) -> None:
    result = run(js, """
        import { readFileSync } from 'node:fs';
        import { helper } from './lib.mjs';
        const text = await Promise.resolve(readFileSync('data.txt', 'utf8'));
        console.log(helper(text), import.meta.url);
    """, pool, files={"data.txt": "abc",
                      "lib.mjs": "export const helper = (s) => s.toUpperCase();"})
    assert (result["stdout"], result["exit_code"]) == (
        "ABC file:///sandbox/.sandpool-main.mjs\n", 0)


def test_commonjs_has_require_module_and_its_names(js: Client, pool: str) -> None:
    result = run(js, """
        const path = require('path');
        const { helper } = require('./lib.js');
        console.log(require.main === module, __dirname, path.basename(__filename), helper());
    """, pool, files={"lib.js": "exports.helper = () => 'lib';"})
    assert result["stdout"] == "true /sandbox main.js lib\n"


def test_stdin_argv_and_env(js: Client, pool: str) -> None:
    result = run(js, """
        const fs = require('fs');
        console.log(JSON.stringify(fs.readFileSync(0, 'utf8')), process.argv.slice(2),
                    process.env.MODE);
    """, pool, stdin="a\nb", argv=["-v", "", "two words"], env={"MODE": "x=y é"})
    assert result["stdout"] == "\"a\\nb\" [ '-v', '', 'two words' ] x=y é\n"


def test_stdin_as_a_stream(js: Client, pool: str) -> None:
    result = run(js, """
        const lines = [];
        require('readline').createInterface({ input: process.stdin })
          .on('line', (line) => lines.push(Number(line)))
          .on('close', () => console.log(lines.reduce((a, b) => a + b, 0)));
    """, pool, stdin="1\n2\n39\n")
    assert result["stdout"] == "42\n"


def test_files_in_and_out_and_a_symlink_never_followed(js: Client, pool: str) -> None:
    result = run(js, """
        const fs = require('fs');
        const rows = fs.readFileSync('data/in.csv', 'utf8').trim().split('\\n');
        fs.mkdirSync('out/sub');
        fs.writeFileSync('out/sub/count.txt', String(rows.length));
        fs.writeFileSync('out/raw.bin', Buffer.from([0, 255]));
        fs.symlinkSync('/etc/passwd', 'out/link');
    """, pool, files={"data/in.csv": "a,b\n1,2\n3,4\n"})
    assert result["exit_code"] == 0, result["stderr"]
    files = {f["path"]: f for f in result["files"]}
    assert set(files) == {"out/sub/count.txt", "out/raw.bin", "out/link"}
    assert base64.b64decode(files["out/sub/count.txt"]["content"]) == b"3"
    assert base64.b64decode(files["out/raw.bin"]["content"]) == b"\0\xff"
    assert files["out/link"] == {"path": "out/link", "type": "symlink",
                                 "size": len("/etc/passwd"), "content": None, "truncated": False}


def test_process_exit_still_returns_the_files(js: Client, pool: str) -> None:
    result = run(js, "require('fs').writeFileSync('out/x', 'x'); process.exit(7)", pool)
    assert result["exit_code"] == 7
    assert [f["path"] for f in result["files"]] == ["out/x"]


def test_a_file_given_to_one_run_is_not_in_the_next(js: Client, pool: str) -> None:
    run(js, "require('fs').writeFileSync('left.txt', 'x')", pool, files={"secret.txt": "s"})
    result = run(js, "console.log(require('fs').readdirSync('.'))", pool)
    assert result["stdout"] == "[ 'out' ]\n"
    assert result["files"] == []


def test_a_busy_loop_times_out(js: Client, pool: str) -> None:
    result = run(js, "while (true) {}", pool, timeout_s=1)
    assert (result["timed_out"], result["exit_code"], result["oom_killed"]) == (True, None, False)


def test_a_memory_bomb_is_an_oom_kill(js: Client, pool: str) -> None:
    result = run(js, """
        const blocks = [];
        for (;;) blocks.push(Buffer.alloc(16 * 2 ** 20, 1));
    """, pool, timeout_s=15)
    assert result["timed_out"] is False
    assert (result["exit_code"], result["oom_killed"]) == (137, True)
    assert run(js, "console.log('still serving')", pool)["stdout"] == "still serving\n"


def test_there_is_no_network(js: Client, pool: str) -> None:
    result = run(js, """
        require('http').get('http://1.1.1.1/', () => console.log('reached'))
          .on('error', (e) => console.log('http', e.code));
        fetch('http://1.1.1.1/').then(() => console.log('fetched'),
                                     (e) => console.log('fetch', e.cause?.code ?? e.name));
    """, pool)
    # No route at all: a sandbox has no interface but loopback (down or unconnected).
    assert sorted(result["stdout"].splitlines()) == ["fetch ENETUNREACH", "http ENETUNREACH"]


def test_output_past_the_cap_is_cut(js: Client) -> None:
    result = run(js, "for (let i = 0; i < 2000; i++) console.log('x'.repeat(100));",
                 SMALL)
    assert (result["stdout_truncated"], len(result["stdout"])) == (True, 4096)
    result = run(js, "for (let i = 0; i < 2000; i++) console.error('e'.repeat(100));",
                 SMALL)
    assert (result["stderr_truncated"], result["stdout_truncated"]) == (True, False)



# --- configuration, no daemon ------------------------------------------------------


def test_a_javascript_pool_is_configured_in_the_docker_and_process_tiers() -> None:
    config = parse_config({"pools": {
        "js": {"language": "javascript", "image": NODE_IMAGE},
        "js-process": {"language": "javascript", "backend": "process", "memory_mb": 64},
    }})
    assert [(p.backend, p.language) for p in config.pools] == [
        ("docker", "javascript"), ("process", "javascript")]
    process = config.pools[1]
    assert "RLIMIT_AS" not in runner_limits(process)  # V8's reservations: the cgroup decides
    assert "RLIMIT_AS" in runner_limits(dataclasses.replace(process, language="python"))


@pytest.mark.parametrize(("table", "message"), [
    ({"language": "javascript", "backend": "wasm"}, "the wasm backend runs only python"),
    ({"language": "javascript", "memory_mb": 32}, "memory_mb must be at least 64"),
    ({"language": "javascript", "preload": ["fs"]}, "applies to python pools only"),
    ({"language": "typescript"}, "must be one of python, shell, javascript"),
])
def test_a_javascript_pool_that_cannot_work_is_refused(
    table: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"pools": {"js": table}})
