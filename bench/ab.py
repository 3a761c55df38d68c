"""Request latency of two versions of sandpool side by side, in one run.

    .venv/bin/python -m bench.ab --before REV [--requests 200] [--rate 8] [--pools P,...]
                                 [--workload print1|datasci] [--out F]

Checks ``REV`` out into a temporary git worktree, starts one daemon from it
and one from this working tree (the measured pools only, disjoint sandbox uid
ranges), and sends the workload (``print(1)``, or the benchmark's data
analysis: a 1 MB CSV in, a groupby, one PNG out) to each pool of both daemons
in alternation, the order flipping every round, paced at ``--rate`` rounds per
second so the pools are back at ``min_idle`` between requests. Both daemons
share the host, so noise (other load, dockerd) falls on both alike, and both
get the same requests from this tree's client. Prints, and writes to
``--out`` as JSON, p50/p99/max per pool and side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import tempfile
import time
from pathlib import Path

from api.client import Client
from bench.stats import percentile
from bench.workloads import Workload, build_datasci_workload, build_workloads
from pool.config import DATASCI_CPUS, DATASCI_IMAGE, DATASCI_PRELOAD, WASM_IMAGE_MODULE
from tests.support import REPOSITORY, Daemon, start_daemon, terminate_daemon

SERVER = """
[server]
metrics_address = "off"
sandbox_uid_base = {uid_base}
max_request_bytes = 16777216
"""
POOL_CONFIGS = {
    "python": 'backend = "docker"',
    "python-process": 'backend = "process"',
    "python-wasm": f'backend = "wasm"\nwasm_module = "{WASM_IMAGE_MODULE}"',
    "datasci-fork": f'backend = "fork"\nimage = "{DATASCI_IMAGE}"\n'
                    f"preload = {json.dumps(list(DATASCI_PRELOAD))}\n"
                    f"memory_mb = 512\ncpus = {DATASCI_CPUS}\ntimeout_s = 30",
}
POOLS = tuple(POOL_CONFIGS)
DEFAULT_POOLS = ("python", "python-process", "python-wasm")
WORKLOADS = {"print1": lambda: build_workloads()[0], "datasci": build_datasci_workload}


def config(pools: list[str], uid_base: int) -> str:
    return SERVER.format(uid_base=uid_base) + "".join(
        f"\n[pools.{pool}]\n{POOL_CONFIGS[pool]}\nmin_idle = 2\nmax_size = 4\n" for pool in pools
    )


UID_BASES = {"before": 1_900_000_000, "after": 1_900_100_000}


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPOSITORY), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def round_trip_ms(client: Client, pool: str, workload: Workload) -> float:
    start = time.perf_counter()
    result = client.request("POST", "/v1/run", workload.request_body(pool))
    elapsed = (time.perf_counter() - start) * 1000
    if not workload.check(result):
        raise SystemExit(f"unexpected result from {pool}: {result}")
    return elapsed


def measure(
    daemons: dict[str, Daemon], pools: list[str], requests: int, rate: float, workload: Workload
) -> dict[str, dict[str, list[float]]]:
    """side -> pool -> latencies in ms; a warm-up round first, not counted."""
    latencies: dict[str, dict[str, list[float]]] = {
        side: {pool: [] for pool in pools} for side in daemons
    }
    clients = {side: daemon.client() for side, daemon in daemons.items()}
    try:
        for pool in pools:
            for client in clients.values():
                round_trip_ms(client, pool, workload)
        began = time.monotonic()
        for index in range(requests):
            time.sleep(max(0.0, began + index / rate - time.monotonic()))
            sides = list(daemons) if index % 2 == 0 else list(reversed(daemons))
            for pool in pools:
                for side in sides:
                    latencies[side][pool].append(round_trip_ms(clients[side], pool, workload))
    finally:
        for client in clients.values():
            client.close()
    return latencies


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(percentile(ordered, 50), 2),
        "p99_ms": round(percentile(ordered, 99), 2),
        "max_ms": round(ordered[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the git revision to compare against")
    parser.add_argument("--requests", type=int, default=200, help="rounds per pool and side")
    parser.add_argument("--rate", type=float, default=8.0, help="rounds per second")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument("--pools", default=",".join(DEFAULT_POOLS),
                        help=f"which of {', '.join(POOLS)} to measure "
                        f"(default: {','.join(DEFAULT_POOLS)})")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="print1",
                        help="what each request runs (default: print1)")
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]()
    pools = [pool for pool in args.pools.split(",") if pool]
    if not set(pools) <= set(POOLS):
        parser.error(f"--pools: each of {', '.join(POOLS)}")
    before_commit = git("rev-parse", args.before)
    after_commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    with tempfile.TemporaryDirectory(prefix="sandpool-ab-") as directory:
        root = Path(directory)
        worktree = root / "before"
        git("worktree", "add", "--detach", str(worktree), before_commit)
        daemons: dict[str, Daemon] = {}
        try:
            for side, code_dir in (("before", worktree), ("after", REPOSITORY)):
                workdir = root / f"{side}-run"
                workdir.mkdir()
                daemons[side] = start_daemon(
                    workdir, config(pools, UID_BASES[side]), code_dir=code_dir
                )
            latencies = measure(daemons, pools, args.requests, args.rate, workload)
        finally:
            for daemon in daemons.values():
                terminate_daemon(daemon)
            git("worktree", "remove", "--force", str(worktree))
    result = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": f"python -m bench.ab --before {args.before} --requests {args.requests} "
        f"--rate {args.rate} --pools {','.join(pools)} --workload {args.workload}",
        "before": before_commit,
        "after": after_commit + (" + uncommitted changes" if dirty else ""),
        "requests_per_pool_and_side": args.requests,
        "pools": {
            pool: {side: summary(latencies[side][pool]) for side in latencies} for pool in pools
        },
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
