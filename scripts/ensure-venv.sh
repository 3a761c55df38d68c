#!/usr/bin/env bash
# Create .venv and install sandpool, its client (clients/python) and its test tools,
# pinned by constraints.txt.
# make runs this only when a pyproject.toml, constraints.txt or this script is newer
# than the stamp .venv/.installed, so a second `make` spends no time here.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp="$venv/.installed"

say() { echo "sandpool: $*" >&2; }

if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian and Ubuntu ship the venv module (ensurepip) in a separate package.
        rm -rf "$venv"
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
            py_version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
            say "python3 cannot create a venv; installing python3-venv with apt-get"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${py_version}-venv" \
                || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
            python3 -m venv "$venv"
        else
            say "python3 cannot create a virtual environment: install python3-venv, or run make as root"
            exit 1
        fi
    fi
fi

rm -f "$stamp"
# The client distribution (clients/python) in the same resolve: sandpool
# depends on it, and it is not on any package index.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -e ./clients/python -e '.[test]' -c constraints.txt
touch "$stamp"
