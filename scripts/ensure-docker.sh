#!/usr/bin/env bash
# Make sure a Docker engine answers, installing and starting one if needed, and
# that bubblewrap is installed. Quick (one `docker info`) when both are in place.
#
# As root on Debian/Ubuntu: installs docker.io and runc with apt-get when dockerd is
# missing, starts dockerd through systemd when systemd is PID 1, else in the
# background with its log in .state/dockerd.log. Runtime is Docker's default, runc:
# crun fails on this kind of host ("cgroups in hybrid mode not supported").
set -euo pipefail
cd "$(dirname "$0")/.."

state_dir=.state
log="$state_dir/dockerd.log"
wait_s=${SANDPOOL_DOCKER_WAIT_S:-60}
# Root-only tools live in sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { echo "sandpool: $*" >&2; }
is_root() { [ "$(id -u)" -eq 0 ]; }
# `command -v` alone also names a file that is not executable.
have() { local path; path=$(command -v "$1") && [ -x "$path" ]; }
engine_answers() { have docker && timeout 20 docker info >/dev/null 2>&1; }
# No pgrep: procps is not on a minimal Debian.
dockerd_running() {
    local comm
    for comm in /proc/[0-9]*/comm; do
        [ "$(cat "$comm" 2>/dev/null)" = dockerd ] && return 0
    done
    return 1
}

apt_updated=
apt_install() {
    if ! have apt-get; then
        say "cannot install $* on this host (no apt-get): install it and run make again"
        exit 1
    fi
    if [ -z "$apt_updated" ]; then
        say "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
    say "installing $* with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_bubblewrap() {
    have bwrap && return 0
    if is_root; then
        apt_install bubblewrap
    else
        say "warning: bubblewrap (bwrap) is not installed; install it, or run make as root"
    fi
}

start_dockerd() {
    if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
        say "starting Docker with systemctl"
        systemctl start docker
        return
    fi
    mkdir -p "$state_dir"
    say "starting dockerd in the background (log: $log)"
    # Its own session and no tie to make's stdout/stderr: it outlives make and does
    # not keep make's output pipe open.
    setsid nohup dockerd >>"$log" 2>&1 </dev/null &
}

ensure_bubblewrap

if engine_answers; then
    exit 0
fi

if ! is_root; then
    if ! have dockerd; then
        say "sandpool needs a Docker engine: install docker.io and start dockerd, or run \`make run\` / \`make test\` as root"
    elif ! have docker; then
        say "sandpool needs the docker command: install docker.io (or docker-ce-cli), or run make as root"
    else
        say "the Docker engine does not answer to you: start it (\`sudo systemctl start docker\`) and make sure you may use /var/run/docker.sock (the docker group), or run make as root"
    fi
    exit 1
fi

if ! have dockerd || ! have docker; then
    apt_install docker.io runc
fi

# dockerd may be starting already (a service, or another make); start it only if not.
if ! dockerd_running; then
    start_dockerd
fi

for ((waited = 0; waited < wait_s; waited++)); do
    if engine_answers; then
        runtime=$(docker info --format '{{.DefaultRuntime}}' 2>/dev/null || true)
        if [ "$runtime" != runc ]; then
            say "warning: Docker's default runtime is '$runtime', not runc; sandboxes may fail to start"
        fi
        exit 0
    fi
    sleep 1
done

if [ -f "$log" ]; then
    say "the Docker engine did not answer within ${wait_s}s: see $log"
    tail -n 5 "$log" >&2
else
    say "the Docker engine did not answer within ${wait_s}s: see \`journalctl -u docker\`"
fi
exit 1
