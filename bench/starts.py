"""Process sandbox starts under a daemon that is not root, two versions side by side.

    sudo .venv/bin/python -m bench.nonroot_starts --before REV [--starts 40] [--rounds 3]
                                                  [--out F]

Checks ``REV`` out into a temporary git worktree. Each round runs, for ``REV``
and then for this working tree, one process backend (``max_size`` 8, alone in
its daemon) as uid 65534 in cgroup v1 memory, pids and cpu directories handed
to that uid, as systemd's ``Delegate=yes`` would hand them; the backend starts
and destroys ``--starts`` sandboxes one after another. Prints, and writes to
``--out`` as JSON, per round and side: the p50 of a start, and the host CPU per
start and destroy (the backend's process and its children's). Needs root (to
hand the cgroups over and become 65534), cgroup v1 and the docker group (the
image's root file system is exported as 65534). Method and results:
docs/process-tier.md.
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

# Run as 65534 with the measured checkout first on sys.path; standard library
# and that checkout's ``pool`` only, so it runs against an older tree too.
INNER = """
import asyncio, ctypes, json, resource, statistics, sys, time
from pool.backends.process import ProcessBackend
from pool.config import PoolConfig
from pool.uids import SandboxUids

ctypes.CDLL(None).prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL: bwrap refuses capabilities


def cpu_s():
    own, children = (resource.getrusage(who) for who in
                     (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


async def main(starts):
    # Each revision as it takes the count of the daemon's process sandboxes:
    # a Holders (since pool/quotas.py has one), SandboxUids' own_uid_sandboxes
    # (before), or not at all.
    extra = {}
    if "holders" in ProcessBackend.__init__.__code__.co_varnames:
        from pool.quotas import Holders
        extra["holders"] = Holders(own_uid=8)
        uids = SandboxUids()
    elif "own_uid_sandboxes" in SandboxUids.__init__.__code__.co_varnames:
        uids = SandboxUids(own_uid_sandboxes=8)
    else:
        uids = SandboxUids()
    backend = ProcessBackend(PoolConfig(name="bench", backend="process", max_size=8), "bench",
                             uids=uids, **extra)
    await backend.start()
    walls = []
    before = cpu_s()
    try:
        for _ in range(starts):
            started = time.perf_counter()
            sandbox = await backend.start_sandbox()
            walls.append((time.perf_counter() - started) * 1000)
            await backend.destroy_sandbox(sandbox)
    finally:
        await backend.close()
    print(json.dumps({"starts": starts, "start_p50_ms": round(statistics.median(walls), 1),
                      "cpu_ms_per_start": round((cpu_s() - before) / starts * 1000, 1)}))

asyncio.run(main(int(sys.argv[1])))
"""


def run_as_nobody(checkout: Path, starts: int, state: Path) -> dict[str, float]:
    """One backend of ``checkout`` as 65534 in freshly delegated cgroups, removed after."""
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
             sys.executable, "-c", INNER, str(starts)],
            capture_output=True, text=True, timeout=600, cwd="/",
            env={"PATH": os.environ["PATH"], "HOME": str(state), "STATE_DIRECTORY": str(state),
                 "PYTHONPATH": str(checkout)},
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{\"starts\"")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"nonroot_starts: {checkout}: {done.stderr.strip()[-1500:]}")
        return dict(json.loads(lines[-1]))
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
    parser.add_argument("--starts", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("nonroot_starts: run it as root (it hands cgroups to uid 65534)")
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        raise SystemExit("nonroot_starts: written for cgroup v1 controllers")
    worktree = Path(tempfile.mkdtemp(prefix="sandpool-bench-before-"))
    state = Path(tempfile.mkdtemp(prefix="sandpool-bench-nonroot-"))
    git = ["git", "-C", str(REPOSITORY)]
    subprocess.run([*git, "worktree", "add", "--detach", str(worktree), args.before],
                   check=True, capture_output=True)
    try:
        state.chmod(0o755)
        os.chown(state, NOBODY, NOBODY)
        rounds = []
        for number in range(1, args.rounds + 1):
            measured = {side: run_as_nobody(checkout, args.starts, state)
                        for side, checkout in (("before", worktree), ("after", REPOSITORY))}
            rounds.append(measured)
            print(f"round {number}: " + "; ".join(
                f"{side} start p50 {m['start_p50_ms']} ms, {m['cpu_ms_per_start']} ms CPU"
                for side, m in measured.items()), flush=True)
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
