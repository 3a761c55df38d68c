#!/usr/bin/env bash
# Tools the test suite needs besides Docker and bubblewrap (scripts/ensure-docker.sh).
# Quick when they are in place: one `command -v` per tool.
#
# systemd-analyze: tests/test_systemd_unit.py runs `systemd-analyze verify` on
# systemd/sandpool.service. It works offline, without systemd as PID 1. On Debian it
# comes with the `systemd` package, which installs no init: PID 1 stays what it is.
set -euo pipefail

say() { echo "sandpool: $*" >&2; }
have() { local path; path=$(command -v "$1") && [ -x "$path" ]; }

if ! have systemd-analyze; then
    if [ "$(id -u)" -eq 0 ] && have apt-get; then
        say "installing systemd (for systemd-analyze) with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
    else
        # Not fatal here: `make run` does not need it; the unit test says what to do.
        say "warning: systemd-analyze is missing; install Debian's systemd package, or run make as root"
    fi
fi

# haproxy: the load balancer of the multi-node simulation (deploy/simulate,
# tests/test_multinode.py, `make simulate`), run by it as a plain process.
if ! have haproxy; then
    if [ "$(id -u)" -eq 0 ] && have apt-get; then
        say "installing haproxy (for the multi-node simulation) with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy >/dev/null
        # Debian's package starts a haproxy service; the simulation runs its own.
        if have systemctl && [ -d /run/systemd/system ]; then
            systemctl disable --now haproxy >/dev/null 2>&1 || true
        fi
    else
        say "warning: haproxy is missing; install Debian's haproxy package, or run make as root"
    fi
fi
