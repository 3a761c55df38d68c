"""Write ``sandpool-daemon.json``: Docker's default seccomp profile plus one rule.

``docker-default.json`` is Docker's default profile verbatim (moby/moby
``vendor/github.com/moby/profiles/seccomp/default.json`` at commit 35797366,
May 2026; Apache-2.0). It allows the namespace and mount calls only to a
process holding ``CAP_SYS_ADMIN``, and ``pivot_root`` never; the daemon holds no
capability at all, so the one rule added here allows, unconditionally, exactly
the calls bubblewrap and the namespaces' maker and nsenter (process tier) and
the wasm tier's scratch helper make to build their sandboxes. Each name was measured
necessary: removing it stops a pool from starting (docs/kubernetes-image.md, "The seccomp profile").

The sandboxes themselves then install sandpool's own allowlist (pool/seccomp.py),
which denies every one of these calls again.

``python -m deploy.seccomp.generate`` rewrites the file; ``--check`` fails if the
committed file differs from what this would write (``tests/test_daemon_image.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DOCKER_DEFAULT = HERE / "docker-default.json"
PROFILE = HERE / "sandpool-daemon.json"

# Each call, the tiers whose pools do not start without it (measured: each
# removed in turn, tests/test_daemon_image.py), and what they use it for.
NAMESPACE_CALLS: dict[str, tuple[tuple[str, ...], str]] = {
    "clone": (("process",), "bwrap: clone() with CLONE_NEWUSER, NEWNS, NEWPID, NEWNET, "
              "NEWIPC, NEWUTS, NEWCGROUP"),
    "unshare": (("process", "wasm"), "each process sandbox's user and mount namespaces, made "
                "by util-linux unshare with its quotas and scratch "
                "(pool/backends/process/userns.py); bwrap --disable-userns; the wasm "
                "scratch helper's user and mount namespaces"),
    "setns": (("process",), "nsenter: starts bwrap in the sandbox's namespaces"),
    "mount": (("process",), "bwrap: the sandbox's root, its binds, /proc, /dev, scratch"),
    "umount2": (("process",), "bwrap: detaches the old root after pivot_root"),
    "pivot_root": (("process",), "bwrap: enters the sandbox's root"),
    "sethostname": (("process",), "bwrap --hostname sandbox"),
    "fsopen": (("wasm",), "wasm scratch: a tmpfs made with the new mount API, attached nowhere"),
    "fsconfig": (("wasm",), "wasm scratch: the tmpfs's size"),
    "fsmount": (("wasm",), "wasm scratch: the mount's file descriptor"),
}


def profile() -> dict[str, Any]:
    """Docker's default profile with the sandpool rule appended."""
    base: dict[str, Any] = json.loads(DOCKER_DEFAULT.read_text())
    rule = {
        "names": list(NAMESPACE_CALLS),
        "action": "SCMP_ACT_ALLOW",
        "comment": "sandpool: the namespace and mount calls bubblewrap, the process tier's "
                   "namespace maker and nsenter, and the wasm tier's scratch helper make, "
                   "for a daemon without CAP_SYS_ADMIN",
    }
    base["syscalls"] = [*base["syscalls"], rule]
    return base


def render() -> str:
    return json.dumps(profile(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv == ["--check"]:
        if PROFILE.read_text() != text:
            print(f"{PROFILE} is stale: run python -m deploy.seccomp.generate", file=sys.stderr)
            return 1
        return 0
    PROFILE.write_text(text)
    print(f"wrote {PROFILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
