"""The daemon's reading of the wire (pool/wire.py): its errors as a sandpool error.

A sandbox that sends bytes the wire does not allow has crashed or is forging:
either way it is destroyed, and the request fails with ``sandbox_protocol_error``.
"""

from __future__ import annotations

from pool import wire
from pool.errors import SandpoolError


class ProtocolViolation(SandpoolError):
    """The sandbox sent bytes that are not runner frames (crashed or forged)."""

    code = "sandbox_protocol_error"


class FrameDecoder(wire.FrameDecoder):
    """pool.wire's decoder, raising ProtocolViolation."""

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        try:
            return super().feed(data)
        except wire.WireError as e:
            raise ProtocolViolation(str(e)) from None


def decode_exit(payload: bytes) -> int:
    """An exit status 0-255 from the sandbox's status channel. Raises ProtocolViolation."""
    try:
        return wire.decode_exit(payload)
    except wire.WireError as e:
        raise ProtocolViolation(str(e)) from None
