"""An exit code is 0-255 or null, whatever the sandboxed code writes.

The code shares its process with the end of the status channel (the runner's
private pipe in Docker, the direct-mode status pipe in the process tier, the
status file in wasm), so it can write any four bytes there. The daemon takes
them as a claim and refuses what no process status can be.
"""

from __future__ import annotations

import struct

import pytest

from api.client import Client
from pool.protocol import ProtocolViolation, decode_exit
from tests.support import PYTHON_POOLS, WASI_POOLS

pytestmark = pytest.mark.docker

# Writes the forged status to every pipe the code holds besides 0-2 (one of
# them is the status channel), then outlives the run's timeout: only the
# runner stopping the code at the forgery ends the run in time.
FORGE_PIPES = """
import os, stat, struct
for name in os.listdir('/proc/self/fd'):
    fd = int(name)
    if fd > 2:
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                # A well-formed exit frame: only the status inside it is forged.
                os.write(fd, struct.pack('>cI', b'X', 4) + struct.pack('>i', {value}))
        except OSError:
            pass
import time; time.sleep(60)
"""

# WASI carries statuses above 125 through a status file the runner writes.
FORGE_WASI_FILE = """
import os
with open('/.sandpool/status', 'w') as f:
    f.write('{value}')
os._exit(125)
"""


@pytest.mark.parametrize("value", [-1, 2**31 - 1, 256, -128])
@pytest.mark.parametrize("pool", PYTHON_POOLS)
def test_a_forged_status_never_gives_an_impossible_exit_code(
    client: Client, pool: str, value: int
) -> None:
    template = FORGE_WASI_FILE if pool in WASI_POOLS else FORGE_PIPES
    result = client.run(template.format(value=value), pool=pool, timeout_s=10)
    exit_code = result["exit_code"]
    assert exit_code != value
    assert exit_code is None or 0 <= exit_code <= 255, result
    assert not result["timed_out"], result


# Not a frame the status channel carries: kind "Z". Then, as above, a sleep
# past the run's timeout.
GARBLE_PIPES = FORGE_PIPES.replace("struct.pack('>cI', b'X', 4) + struct.pack('>i', {value})",
                                   "struct.pack('>cI', b'Z', 0)")


@pytest.mark.parametrize("pool", [p for p in PYTHON_POOLS if p not in WASI_POOLS])
def test_garbage_on_the_status_channel_stops_the_code_at_once(client: Client, pool: str) -> None:
    """Nothing from a garbled channel is trusted: the code is stopped, not waited for."""
    assert GARBLE_PIPES != FORGE_PIPES
    result = client.run(GARBLE_PIPES, pool=pool, timeout_s=10)
    assert not result["timed_out"], result
    assert result["exit_code"] is None or 0 <= result["exit_code"] <= 255, result


@pytest.mark.parametrize("pool", PYTHON_POOLS)
def test_a_plausible_status_claim_is_still_the_programs_own(client: Client, pool: str) -> None:
    # The boundary: 255 is a status a program may give itself.
    result = client.run("raise SystemExit(255)", pool=pool, timeout_s=10)
    assert result["exit_code"] == 255, result


def test_status_frame_packing_matches_the_decoder() -> None:
    assert decode_exit(struct.pack(">i", 0)) == 0
    assert decode_exit(struct.pack(">i", 255)) == 255
    for impossible in (-1, 256, 2**31 - 1, -(2**31)):
        with pytest.raises(ProtocolViolation):
            decode_exit(struct.pack(">i", impossible))
