"""Shared fixtures: a real sandpool daemon on a real Unix socket, with real dockerd.

The daemon runs as a subprocess (``python -m api.cli serve``), exactly as users
start it (tests/support.py's launcher). Its containers carry
``sandpool.instance=<id>``; after the session the fixture stops the daemon with
SIGTERM and asserts that none of them is left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

# Before the import: support's asserts (the daemon's exit status, leftovers,
# the out-of-memory verdict) then report their operands like a test's own.
pytest.register_assert_rewrite("tests.support")

from api.client import Client  # noqa: E402
from tests.support import DAEMON_CONFIG, Daemon, running_daemon, start_daemon, stop_daemon  # noqa: E402


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("daemon")) as running:
        yield running


@pytest.fixture
def spawn_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start dedicated daemons; each is stopped (and checked for leaks) even if the test fails."""
    started: list[Daemon] = []

    def spawn(
        config: str = DAEMON_CONFIG,
        env: dict[str, str] | None = None,
        command_prefix: Sequence[str] = (),
    ) -> Daemon:
        directory = tmp_path / f"daemon{len(started)}"
        directory.mkdir()
        started.append(start_daemon(directory, config, env, command_prefix))
        return started[-1]

    yield spawn
    for running in started:
        stop_daemon(running)


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with daemon.client() as c:
        yield c


@pytest.fixture
def sandboxed(client: Client, request: pytest.FixtureRequest) -> Iterator[Client]:
    """The daemon's client; after the test, the test module's ``POOL`` must still answer."""
    yield client
    answer = client.run("print('serving')", pool=request.module.POOL)
    assert answer["stdout"] == "serving\n"
