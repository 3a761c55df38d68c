"""llm-sandbox (PyPI), the most-used Python peer with a container pool, on the same image.

Two ways of using it, both measured per request end to end:

- ``session``: ``SandboxSession`` opened and closed per request (a fresh container
  each time, like sandpool's single-use sandboxes);
- ``pool``: its ``DockerPoolManager`` with ``PooledSandboxSession`` — containers are
  pre-started, but *reused* across requests (llm-sandbox returns them to the pool),
  so this is not single-use isolation.

What it takes to run llm-sandbox against ``sandpool/python:bookworm`` without a
registry (recorded in the result next to its figures):

- ``skip_environment_setup=True``: its setup creates a venv and runs
  ``pip install --upgrade pip``, which needs a network and ensurepip;
- a root user (its default) and a writable root filesystem (its default): it
  copies the code in with ``put_archive`` and runs ``mkdir -p`` through ``exec``;
  the image's read-only sandpool settings would refuse both;
- a keep-alive command with an init (``sleep infinity`` under ``--init``): the
  image has no ``CMD``, and without an init ``docker stop`` waits 10 s for
  ``sleep`` to ignore SIGTERM;
- ``python3``: the image has no ``python`` binary, which llm-sandbox runs. The
  session path overrides the Python handler's command to ``python3 {file}``; the
  pool path always runs ``<workdir>/.sandbox-venv/bin/python``, so a read-only bind
  mount puts a one-symlink ``bin/python -> /usr/bin/python3`` there.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench import docker_paths
from bench.docker_paths import LABEL_RUN
from bench.stats import summarize
from bench.workloads import Workload

REQUIREMENTS = [
    "skip_environment_setup=True (its environment setup needs pip and a network)",
    "root user and writable root filesystem (its defaults: code is copied in with "
    "put_archive and `mkdir -p` runs through exec)",
    "keep-alive command `sleep infinity` with --init (the image has no CMD; without "
    "an init, docker stop waits 10 s)",
    "python3 instead of python: handler command overridden (session); a read-only bind "
    "mount of a one-symlink .sandbox-venv/bin/python (pool)",
]


def _runtime_configs(run_id: str) -> dict[str, Any]:
    # The seed's limits where llm-sandbox allows them (not read_only: see above).
    return {
        "command": "sleep infinity",
        "init": True,
        "labels": {LABEL_RUN: run_id},
        "network_mode": "none",
        "mem_limit": "128m",
        "memswap_limit": "128m",
        "nano_cpus": 500_000_000,
        "pids_limit": 64,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=16m"},
    }


def llm_sandbox(
    run_id: str,
    workloads: tuple[Workload, ...],
    samples: int,
    time_left: Callable[[], float],
    pool_time_left: Callable[[], Callable[[], float]],
) -> dict[str, Any]:
    """Both llm-sandbox paths; a ``skipped`` or ``error`` entry instead of numbers if it cannot run.

    ``time_left`` bounds the session path; ``pool_time_left()`` is called when the
    pool path begins and bounds it.
    """
    try:
        import llm_sandbox as package  # type: ignore[import-untyped]
        from llm_sandbox import SandboxSession
        from llm_sandbox.pool import (  # type: ignore[import-untyped]
            PoolConfig,
            PooledSandboxSession,
            create_pool_manager,
        )
    except ImportError as e:
        return {"skipped": f"llm-sandbox is not installed (pip install -e '.[bench]'): {e}"}
    logging.getLogger("llm_sandbox").setLevel(logging.WARNING)
    version = getattr(package, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("llm-sandbox")
    out: dict[str, Any] = {"version": version, "requirements": REQUIREMENTS}

    def check(result: Any, workload: Workload, where: str) -> None:
        if result.exit_code != 0 or result.stdout != workload.expected_stdout:
            raise RuntimeError(
                f"llm-sandbox {where}: exit {result.exit_code}, "
                f"stdout {result.stdout[:200]!r}, stderr {result.stderr[:300]!r}"
            )

    session_out: dict[str, Any] = {
        "description": "SandboxSession opened, run() and closed per request "
                       "(create + start + exec mkdir + put_archive + exec python3 + stop + remove)",
    }
    try:
        for workload in workloads:
            samples_ms: list[float] = []
            for _ in range(samples + 1):
                if len(samples_ms) > 1 and time_left() <= 0:  # one kept sample at least
                    break
                began = time.perf_counter()
                session = SandboxSession(
                    lang="python", image=docker_paths.IMAGE, skip_environment_setup=True,
                    runtime_configs=_runtime_configs(run_id), verbose=False,
                )
                session.language_handler.config = dataclasses.replace(
                    session.language_handler.config, execution_commands=["python3 {file}"]
                )
                with session:
                    result = session.run(workload.code)
                samples_ms.append((time.perf_counter() - began) * 1000)
                check(result, workload, "session")
            session_out[workload.name] = {"result": summarize(samples_ms[1:])}
    except Exception as e:  # a peer's failure is a finding to record, not a crash
        session_out["error"] = f"{type(e).__name__}: {e}"
    out["session"] = session_out

    pool_out: dict[str, Any] = {
        "description": "DockerPoolManager(min 2, max 4) + PooledSandboxSession per request; "
                       "containers are reused, not single-use",
    }
    with tempfile.TemporaryDirectory(prefix="sandpool-bench-venv-") as shim:
        os.makedirs(os.path.join(shim, "bin"))
        os.symlink("/usr/bin/python3", os.path.join(shim, "bin", "python"))
        os.chmod(shim, 0o755)
        runtime = _runtime_configs(run_id)
        runtime["volumes"] = {shim: {"bind": "/sandbox/.sandbox-venv", "mode": "ro"}}
        manager = None
        time_left = pool_time_left()
        try:
            manager = create_pool_manager(
                backend="docker",
                config=PoolConfig(min_pool_size=2, max_pool_size=4),
                lang="python", image=docker_paths.IMAGE, runtime_configs=runtime,
                skip_environment_setup=True,
            )
            for workload in workloads:
                samples_ms = []
                for _ in range(samples + 1):
                    if len(samples_ms) > 1 and time_left() <= 0:  # one kept sample at least
                        break
                    began = time.perf_counter()
                    with PooledSandboxSession(pool_manager=manager) as pooled:
                        result = pooled.run(workload.code)
                    samples_ms.append((time.perf_counter() - began) * 1000)
                    check(result, workload, "pool")
                pool_out[workload.name] = {"result": summarize(samples_ms[1:])}
        except Exception as e:  # recorded, as above
            pool_out["error"] = f"{type(e).__name__}: {e}"
        finally:
            if manager is not None:
                manager.close()
    out["pool"] = pool_out
    return out
