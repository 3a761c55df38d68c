"""Sandbox starts of two versions side by side: what one start and destroy costs.

    sudo .venv/bin/python -m bench.starts --before REV [--backends process,docker]
                                          [--user root|nobody] [--starts 40] [--rounds 3]
                                          [--out F]

Checks ``REV`` out into a temporary git worktree. Each round runs, for each
backend, ``REV`` and this working tree in turn (the order flips every round):
one backend of that checkout (``max_size`` 8, alone in its process) starts and
destroys ``--starts`` sandboxes one after another. Prints, and writes to
``--out`` as JSON, per round, backend and side: the p50 of a start, the CPU per
start and destroy of the backend's process and its children, and the host's
busy CPU per start and destroy (``/proc/stat``: dockerd, containerd and the
shims included, and whatever else ran).

``--user nobody`` (process backend only) runs the backend as uid 65534 in
cgroup v1 memory, pids and cpu directories handed to that uid, as systemd's
``Delegate=yes`` would hand them (needs cgroup v1 and the docker group: the
image's root file system is exported as 65534). Needs root either way.
Method and results: docs/process-tier.md, docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import grp
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
NOBODY = 65534
CONTROLLERS = ("memory", "pids", "cpu")
CGROUP_ROOT = Path("/sys/fs/cgroup")

BACKENDS = ("process", "docker")
# One backend's starts, run with the measured checkout first on sys.path
# (as root, or as 65534); standard library and that checkout's ``pool`` only,
# so it runs against an older tree too.
INNER = """
import asyncio, ctypes, json, os, resource, statistics, sys, time
from pool.config import PoolConfig
from pool.uids import SandboxUids

if os.geteuid() != 0:
    ctypes.CDLL(None).prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL: bwrap refuses capabilities


def cpu_s():
    own, children = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def host_busy_s():
    ticks = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


async def main(kind, starts):
    if kind == "docker":
        from pool.backends.docker import DockerBackend as Backend
    else:
        from pool.backends.process import ProcessBackend as Backend
    # Each revision as it takes the count of the daemon's process sandboxes:
    # a Holders (since pool/quotas.py has one), SandboxUids' own_uid_sandboxes
    # (before), or not at all.
    extra = {}
    if "holders" in Backend.__init__.__code__.co_varnames:
        from pool.quotas import Holders
        extra["holders"] = Holders(own_uid=8)
        uids = SandboxUids()
    elif "own_uid_sandboxes" in SandboxUids.__init__.__code__.co_varnames:
        uids = SandboxUids(own_uid_sandboxes=8)
    else:
        uids = SandboxUids()
    backend = Backend(PoolConfig(name="bench", backend=kind, max_size=8), "bench",
                      uids=uids, **extra)
    await backend.start()
    walls = []
    try:
        await backend.destroy_sandbox(await backend.start_sandbox())  # caches warm, not counted
        before, host_before = cpu_s(), host_busy_s()
        for _ in range(starts):
            started = time.perf_counter()
            sandbox = await backend.start_sandbox()
            walls.append((time.perf_counter() - started) * 1000)
            await backend.destroy_sandbox(sandbox)
        # What a destroy leaves running (a container's removal in the engine)
        # is counted on the host's side: it settles within this wait.
        await asyncio.sleep(0.5)
        own, host = cpu_s() - before, host_busy_s() - host_before
    finally:
        await backend.close()
    print(json.dumps({"starts": starts, "start_p50_ms": round(statistics.median(walls), 1),
                      "cpu_ms_per_start": round(own / starts * 1000, 1),
                      "host_cpu_ms_per_start": round(host / starts * 1000, 1)}))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def measured(done: subprocess.CompletedProcess[str], checkout: Path) -> dict[str, float]:
    """INNER's figures from its output; exits with its last words if it failed."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("{\"starts\"")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"starts: {checkout}: {done.stderr.strip()[-1500:]}")
    return dict(json.loads(lines[-1]))


def run_as_root(checkout: Path, kind: str, starts: int) -> dict[str, float]:
    """One backend of ``checkout``, in this user's cgroups."""
    done = subprocess.run(
        [sys.executable, "-c", INNER, kind, str(starts)], capture_output=True, text=True,
        timeout=600, cwd="/", env={**os.environ, "PYTHONPATH": str(checkout)},
    )
    return measured(done, checkout)


def run_as_nobody(checkout: Path, starts: int, state: Path) -> dict[str, float]:
    """One process backend of ``checkout`` as 65534 in freshly delegated cgroups, removed after."""
    name = f"sandpool-bench-nonroot-{secrets.token_hex(4)}"
    made = []
    try:
        for controller in CONTROLLERS:
            directory = CGROUP_ROOT / controller / name
            directory.mkdir()
            made.append(directory)
            for path in (directory, directory / "cgroup.procs", directory / "tasks"):
                os.chown(path, NOBODY, NOBODY)
        join = " && ".join(f"echo $$ > {d}/cgroup.procs" for d in made)
        docker = grp.getgrnam("docker").gr_gid
        done = subprocess.run(
            ["/bin/sh", "-c", f'{join} && exec "$@"', "sh",
             "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={docker}",
             # Only to read this checkout's interpreter where it is not world-readable.
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
             sys.executable, "-c", INNER, "process", str(starts)],
            capture_output=True, text=True, timeout=600, cwd="/",
            env={"PATH": os.environ["PATH"], "HOME": str(state), "STATE_DIRECTORY": str(state),
                 "PYTHONPATH": str(checkout)},
        )
        return measured(done, checkout)
    finally:
        for directory in made:
            for _ in range(100):  # until the backend's last process is gone
                try:
                    for child in sorted(directory.glob("*/"), reverse=True):
                        child.rmdir()
                    directory.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the revision to compare with")
    parser.add_argument("--backends", default="process,docker",
                        help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--user", choices=("root", "nobody"), default="root")
    parser.add_argument("--starts", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    if not backends or set(backends) - set(BACKENDS):
        raise SystemExit(f"starts: --backends takes {', '.join(BACKENDS)}, not {args.backends!r}")
    if os.geteuid() != 0:
        raise SystemExit("starts: run it as root (Docker, bubblewrap's cgroups, uid 65534)")
    if args.user == "nobody" and backends != ["process"]:
        raise SystemExit("starts: --user nobody measures the process backend only")
    if args.user == "nobody" and (CGROUP_ROOT / "cgroup.controllers").exists():
        raise SystemExit("starts: --user nobody is written for cgroup v1 controllers")
    worktree = Path(tempfile.mkdtemp(prefix="sandpool-bench-before-"))
    state = Path(tempfile.mkdtemp(prefix="sandpool-bench-nonroot-"))
    git = ["git", "-C", str(REPOSITORY)]
    subprocess.run([*git, "worktree", "add", "--detach", str(worktree), args.before],
                   check=True, capture_output=True)
    try:
        state.chmod(0o755)
        os.chown(state, NOBODY, NOBODY)
        rounds: list[dict[str, dict[str, dict[str, float]]]] = []
        for number in range(1, args.rounds + 1):
            sides = [("before", worktree), ("after", REPOSITORY)]
            if number % 2 == 0:  # neither side always runs on the host the other warmed
                sides.reverse()
            this_round: dict[str, dict[str, dict[str, float]]] = {}
            for kind in backends:
                this_round[kind] = {
                    side: run_as_nobody(checkout, args.starts, state) if args.user == "nobody"
                    else run_as_root(checkout, kind, args.starts)
                    for side, checkout in sides
                }
                print(f"round {number}, {kind}: " + "; ".join(
                    f"{side} start p50 {m['start_p50_ms']} ms, {m['cpu_ms_per_start']} ms CPU, "
                    f"{m['host_cpu_ms_per_start']} ms host" for side, m in this_round[kind].items()
                ), flush=True)
            rounds.append(this_round)
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(worktree)],
                       capture_output=True)
        shutil.rmtree(state, ignore_errors=True)
    if args.out is not None:
        args.out.write_text(json.dumps({
            "command": " ".join(sys.argv), "when": datetime.datetime.now(datetime.UTC)
            .isoformat(timespec="seconds"), "before": args.before,
            "after": subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True,
                                    capture_output=True, text=True).stdout.strip() + " + tree",
            "rounds": rounds,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
