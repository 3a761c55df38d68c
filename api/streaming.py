"""``POST /v1/run`` answered as NDJSON: output lines as the program writes, then the result.

A client that sends ``Accept: application/x-ndjson`` gets one JSON object per
line: ``{"type": "stdout"|"stderr", "data": text}`` as output is captured, then
exactly one ``{"type": "result", ...}`` (the object a plain run answers) or
``{"type": "error", "code", "message"}`` if the run failed once the stream had
begun. The stream begins with its first line: an error before it (a full pool,
a backend that cannot start a sandbox) is the usual JSON error with its status.

The data lines carry exactly the bytes the capture keeps (``OutputCapture``'s
listener): joined, a stream's data equals the result's ``stdout``/``stderr``,
cap and truncation included. Each stream has its own incremental UTF-8 decoder
with U+FFFD, so a character split across two reads is decoded once, whole, as
``result_body`` decodes the whole stream. Why NDJSON and not SSE: docs/api.md.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import contextlib
import json
from collections.abc import Awaitable

from aiohttp import web

from pool.manager import PoolRun
from pool.wire import STDERR, STDOUT

NDJSON = "application/x-ndjson"
_KIND_NAMES = {STDOUT: "stdout", STDERR: "stderr"}


def wants_ndjson(request: web.Request) -> bool:
    """True if the ``Accept`` header names ``application/x-ndjson`` (with q > 0)."""
    for media_range in request.headers.get("Accept", "").split(","):
        media_type, *params = (part.strip() for part in media_range.split(";"))
        if media_type.lower() != NDJSON:
            continue
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


def ndjson_line(event: dict[str, object]) -> bytes:
    return json.dumps(event, ensure_ascii=False).encode() + b"\n"


class RunStream:
    """The NDJSON response of one run: ``listener`` goes into the run's request,
    ``follow`` writes what it hears until the run ends.

    Output waits in an unbounded queue; it holds at most the capture's two caps
    of bytes (``max_output_bytes`` each), as the capture itself does.
    """

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(headers={"Content-Type": NDJSON})
        self._pending: collections.deque[tuple[str, str]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._decoders = {
            kind: codecs.getincrementaldecoder("utf-8")("replace") for kind in _KIND_NAMES
        }

    @property
    def began(self) -> bool:
        """Whether the response's headers went out: from then on errors are lines."""
        return self.response.prepared

    def listener(self, kind: bytes, data: bytes) -> None:
        """OutputCapture's listener: decode ``data`` and queue it for the writer."""
        text = self._decoders[kind].decode(data)
        if text:
            self._pending.append((_KIND_NAMES[kind], text))
            self._wakeup.set()

    async def follow(self, run: Awaitable[PoolRun]) -> PoolRun:
        """Await ``run`` while writing its output as it is queued; return its PoolRun.

        Raises what ``run`` raises, and ConnectionError when the client is gone.
        Either way, and when ``follow`` is cancelled, the run is cancelled (the
        pool destroys its sandbox) and awaited before ``follow`` returns.
        """
        running = asyncio.ensure_future(run)
        running.add_done_callback(lambda _: self._wakeup.set())
        try:
            while not running.done():
                await self._wakeup.wait()
                self._wakeup.clear()
                if self._pending:
                    await self._write_pending()
        finally:
            if not running.done():
                running.cancel()
                # Only the run's own cancellation, which we asked for, is suppressed.
                with contextlib.suppress(asyncio.CancelledError):
                    await running
        pool_run = running.result()
        for kind, decoder in self._decoders.items():  # a character cut off at the end
            text = decoder.decode(b"", final=True)
            if text:
                self._pending.append((_KIND_NAMES[kind], text))
        if self._pending:
            await self._write_pending()
        return pool_run

    async def _write_pending(self) -> None:
        """Write what is queued in one write, consecutive pieces of one stream in one line."""
        lines: list[bytes] = []
        kind, text = self._pending.popleft()
        while self._pending:
            next_kind, next_text = self._pending.popleft()
            if next_kind == kind:
                text += next_text
                continue
            lines.append(ndjson_line({"type": kind, "data": text}))
            kind, text = next_kind, next_text
        lines.append(ndjson_line({"type": kind, "data": text}))
        await self.write(b"".join(lines))

    async def write(self, data: bytes) -> None:
        """Write ``data``, sending the headers first if the stream has not begun."""
        if not self.response.prepared:
            await self.response.prepare(self._request)
        await self.response.write(data)

    async def finish(self, event: dict[str, object]) -> web.StreamResponse:
        """Write the last line (the result or an error) and end the response."""
        await self.write(ndjson_line(event))
        await self.response.write_eof()
        return self.response
