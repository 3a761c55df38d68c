"""Who may hold a connection to the daemon, how many, and for how long.

Every open connection costs the daemon a file descriptor, whoever opened it. A
``ConnectionGate`` is the protocol factory of one listener (the API socket or the
metrics port): at accept it checks the peer and the caps, and a connection it
refuses is answered with a canned HTTP error and closed in the same loop step,
so it costs one descriptor for a moment and nothing else. An admitted connection
is handed to aiohttp's request handler unchanged; it must complete its first
request head within ``header_timeout_s`` (aiohttp's own keep-alive timer bounds
the idle time between requests).

Repeated events that an outsider can trigger at will (refusals, accept errors
when descriptors run out, malformed requests) are logged through a
``Throttle``: one line per event per interval, with the count of those left
out, never a traceback each.

The pure parts (``ConnectionCounter``, ``Throttle``, ``refusal``) do no I/O and
are tested apart in tests/test_connection_gate.py.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Hashable
from http import HTTPStatus
from typing import Any, Literal

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from pool.errors import ForbiddenError
from pool.procfs import NO_PEER, PeerCredentials, socket_peer

log = structlog.get_logger("sandpool.api")

Refusal = Literal["forbidden", "too_many_connections", "too_many_connections_from_peer"]
# Errors that say the host or the daemon ran out of something: they come in
# bursts as long as the shortage lasts, and a traceback adds nothing to them.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
LOG_INTERVAL_S = 10.0


class ConnectionCounter:
    """Open connections overall and per peer, against two caps. No I/O.

    Invariant: ``total == sum(per peer)``, and a peer with no open connection
    has no entry, so the table never holds more keys than open connections.
    """

    __slots__ = ("_per_peer", "max_per_peer", "max_total", "total")

    def __init__(self, max_total: int, max_per_peer: int) -> None:
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.total = 0
        self._per_peer: dict[Hashable, int] = {}

    def try_add(self, peer: Hashable) -> Refusal | None:
        """Count one more connection of ``peer``, or say which cap refuses it."""
        if self.total >= self.max_total:
            return "too_many_connections"
        held = self._per_peer.get(peer, 0)
        if held >= self.max_per_peer:
            return "too_many_connections_from_peer"
        self._per_peer[peer] = held + 1
        self.total += 1
        return None

    def remove(self, peer: Hashable) -> None:
        """Forget one connection of ``peer`` that ``try_add`` admitted."""
        held = self._per_peer[peer] - 1
        if held:
            self._per_peer[peer] = held
        else:
            del self._per_peer[peer]
        self.total -= 1

    def held_by(self, peer: Hashable) -> int:
        return self._per_peer.get(peer, 0)


class Throttle:
    """At most one line per key and interval; counts what it holds back. No I/O."""

    __slots__ = ("_clock", "_held_back", "_last", "interval_s")

    def __init__(
        self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held_back: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None if a line for ``key`` must be held back now; else how many were since the last."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held_back[key] = self._held_back.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held_back.pop(key, 0)


class ThrottledLog:
    """structlog warnings through a ``Throttle`` keyed by event name and listener.

    The keys are the few event names in this code times the two listeners, so
    the throttle's tables stay that small whatever the traffic, and a flood of
    the metrics port does not hide the socket's refusals.
    """

    def __init__(self, throttle: Throttle | None = None) -> None:
        self.throttle = throttle or Throttle()

    def warning(self, event: str, **fields: Any) -> None:
        held_back = self.throttle.admit(f"{event}:{fields.get('listener', '')}")
        if held_back is None:
            return
        if held_back:
            fields["suppressed"] = held_back
        log.warning(event, **fields)


def refusal(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error answer in sandpool's JSON shape, closing the connection."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    retry = "Retry-After: 1\r\n" if status == 503 else ""
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n{retry}Connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def peer_credentials(transport: asyncio.BaseTransport) -> PeerCredentials:
    """SO_PEERCRED of a Unix-socket transport (pool/procfs.py); NO_PEER on TCP."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return NO_PEER
    return socket_peer(sock)


class ConnectionGate:
    """The protocol factory of one listener: admits a connection, or answers and closes it.

    ``handler_factory`` makes aiohttp's protocol for an admitted connection
    (``web.Server`` is documented as such a factory). ``allowed`` (the socket
    only) decides on the peer's credentials; None admits every peer. Peers are
    uids on a Unix socket, IP addresses on TCP.
    """

    def __init__(
        self,
        listener: str,
        handler_factory: Callable[[], asyncio.Protocol],
        counter: ConnectionCounter,
        *,
        header_timeout_s: float,
        throttled_log: ThrottledLog,
        allowed: Callable[[PeerCredentials], bool] | None = None,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.listener = listener
        self.handler_factory = handler_factory
        self.counter = counter
        self.header_timeout_s = header_timeout_s
        self.allowed = allowed
        self._log = throttled_log
        self._on_refused = on_refused
        self._busy_answer = {
            reason: refusal(503, reason, f"sandpool's {listener} listener is at its "
                            f"{'per-peer ' if reason.endswith('peer') else ''}connection limit")
            for reason in ("too_many_connections", "too_many_connections_from_peer")
        }

    def __call__(self) -> GatedConnection:
        return GatedConnection(self)

    def admit(self, connection: GatedConnection, transport: asyncio.Transport) -> bool:
        """Count ``connection`` in, or answer it with an error, close it and return False."""
        peer: Hashable
        if self.allowed is not None:
            credentials = peer_credentials(transport)
            peer = credentials.uid
            if not self.allowed(credentials):
                self._log.warning("peer_denied", listener=self.listener, uid=credentials.uid,
                                  gid=credentials.gid, pid=credentials.pid)
                message = (f"uid {credentials.uid} (gid {credentials.gid}) may not use "
                           "this sandpool")
                answer = refusal(ForbiddenError.status, ForbiddenError.code, message)
                self._refuse(transport, "forbidden", answer)
                return False
        else:
            address = transport.get_extra_info("peername")
            peer = address[0] if isinstance(address, tuple) else address
        refused = self.counter.try_add(peer)
        if refused is not None:
            self._log.warning("connection_refused", listener=self.listener, reason=refused,
                              open=self.counter.total, peer_open=self.counter.held_by(peer))
            self._refuse(transport, refused, self._busy_answer[refused])
            return False
        connection.peer = peer
        return True

    def release(self, connection: GatedConnection) -> None:
        self.counter.remove(connection.peer)

    def header_timed_out(self, transport: asyncio.Transport) -> None:
        self._log.warning("header_timeout", listener=self.listener,
                          timeout_s=self.header_timeout_s)
        if self._on_refused is not None:
            self._on_refused(self.listener, "header_timeout")
        transport.close()

    def _refuse(self, transport: asyncio.Transport, reason: str, answer: bytes) -> None:
        if self._on_refused is not None:
            self._on_refused(self.listener, reason)
        # The socket is fresh, so the few hundred bytes fit its send buffer: the
        # write completes now and close() releases the descriptor in this step.
        # A client that already sent its request may see a reset instead.
        transport.write(answer)
        transport.close()


class GatedConnection(asyncio.Protocol):
    """One connection: forwards everything to aiohttp's handler once admitted.

    Invariant: ``handler`` is set only for a connection the counter counts, and
    ``connection_lost`` releases it exactly once.
    """

    __slots__ = ("_header_timer", "gate", "handler", "peer")

    def __init__(self, gate: ConnectionGate) -> None:
        self.gate = gate
        self.handler: asyncio.Protocol | None = None
        self.peer: Hashable = None
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        gate = self.gate
        if not gate.admit(self, transport):
            return
        self._header_timer = asyncio.get_running_loop().call_later(
            gate.header_timeout_s, gate.header_timed_out, transport
        )
        self.handler = gate.handler_factory()
        self.handler.connection_made(transport)

    def request_started(self) -> None:
        """The first request head arrived: from now on aiohttp's keep-alive timer rules."""
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received() if self.handler is not None else None

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        handler, self.handler = self.handler, None
        if handler is None:
            return  # refused: never counted
        self.request_started()  # cancels the header timer
        self.gate.release(self)
        handler.connection_lost(exc)


@web.middleware
async def mark_request_started(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Stop the header timer of the request's connection: its head is complete."""
    transport = request.transport
    if transport is not None:
        connection = transport.get_protocol()
        if isinstance(connection, GatedConnection):
            connection.request_started()
    return await handler(request)


class _ThrottledHandler(logging.Handler):
    """Hands stdlib log records to a ``ThrottledLog``, as one JSON line each at most."""

    def __init__(self, throttled_log: ThrottledLog) -> None:
        super().__init__(logging.WARNING)
        self.throttled_log = throttled_log

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"message": record.getMessage()}
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            # The client's fault (a malformed request, answered 400): the
            # parser's reason is enough, its traceback is the same every time.
            fields["error"] = f"{type(error).__name__}: {error.message.strip().splitlines()[0]}"
        elif error is not None:
            fields["exc_info"] = error  # a handler's bug: keep its traceback
        self.throttled_log.warning("http_error", **fields)


def http_server_logger(throttled_log: ThrottledLog) -> logging.Logger:
    """The logger for aiohttp's request handlers (``AppRunner(logger=...)``).

    aiohttp logs every malformed request with its traceback ("Error handling
    request"), through stdlib logging that nothing here configures, so each
    bad request from any local user wrote ~700 bytes of plain text to stderr.
    Through this logger they become throttled structlog lines.
    """
    logger = logging.getLogger("sandpool.http")
    logger.propagate = False
    logger.setLevel(logging.WARNING)  # aiohttp's debug lines (non-HTTP traffic) are dropped
    logger.handlers = [_ThrottledHandler(throttled_log)]
    return logger


def loop_exception_handler(
    throttled_log: ThrottledLog,
) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event-loop exception handler that logs each kind of error at most once per interval.

    asyncio reports a failed accept() (EMFILE, ENFILE) this way, once a second per
    listener for as long as descriptors are short, and retries the accept by
    itself. Resource errors are logged without a traceback; any other error
    keeps its traceback (it is a bug), throttled all the same.
    """

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "unhandled error in the event loop"))
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS:
            throttled_log.warning(
                "event_loop_resource_error", message=message,
                error=errno.errorcode.get(error.errno or 0, str(error.errno)),
                detail=error.strerror,
            )
            return
        fields: dict[str, Any] = {"message": message}
        if isinstance(error, BaseException):
            fields["exc_info"] = error
        throttled_log.warning("event_loop_error", **fields)

    return handle
