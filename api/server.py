"""The HTTP wiring of the API on a Unix socket (aiohttp), and /metrics over TCP.

The API knows pools, not backends: request -> api -> pool -> backend -> result -> api.
What a body holds is ``api/schema.py``'s; this module owns routes, listeners, the
peer check, status codes and the drain. Every error is a JSON body
``{"error": {"code", "message"}}`` with a stable code; no client input produces a
5xx or a stack trace.

``ApiServer.start()`` is where the daemon starts listening (``api/daemon.py``'s
``serve`` calls it once every pool is warm).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import resource
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from importlib import metadata
from typing import Protocol

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.connections import (
    ConnectionCounter,
    ConnectionGate,
    ThrottledLog,
    http_server_logger,
    mark_request_started,
    peer_credentials,
)
from api.openapi import build_document
from api.remote import TOKEN, WWW_AUTHENTICATE, RemoteListener, bearer_auth
from api.schema import (
    ERROR_CODES,
    decode_json_object,
    parse_run,
    parse_session,
    parse_session_run,
    pool_summary,
    result_body,
)
from api.streaming import RunStream, wants_ndjson
from metrics import Metrics
from pool.backends.base import RunRequest, RunResult
from pool.backends.runtime import Runtime
from pool.config import Config, PoolConfig, ServerConfig, parse_address
from pool.errors import (
    BadRequestError,
    PoolForbiddenError,
    RunInterruptedError,
    SandpoolError,
    SessionEndedError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedMediaTypeError,
)
from pool.manager import PoolRun
from pool.procfs import PeerCredentials
from pool.sessions import Sessions

log = structlog.get_logger("sandpool.api")

# An error answer's stable code, for the request-tracking middleware.
ERROR_CODE: web.ResponseKey[str] = web.ResponseKey("sandpool_error_code", str)
LISTEN_BACKLOG = 128  # aiohttp's default: connections the kernel queues before accept()
_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}
REQUEST_ID_HEADER = "X-Request-Id"
# A client's id is kept only if it is a short token: it goes into every log
# line of the request, so no spaces, quotes or control characters.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")


def error_response(
    status: int, code: str, message: str, *, retry_after_s: int | None = None,
    reason: str | None = None,
) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    error = {"code": code, "message": message}
    if reason is not None:  # session_ended: why it ended
        error["reason"] = reason
    response = web.json_response({"error": error}, status=status, headers=headers)
    response[ERROR_CODE] = code  # for the request-tracking middleware's log and counter
    return response


def request_id(request: web.Request) -> str:
    """The client's ``X-Request-Id`` if it is a sane token, else a new random one."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turn every failure into a JSON error body with a stable code."""
    try:
        return await handler(request)
    except UnavailableError as e:
        return error_response(e.status, e.code, e.message, retry_after_s=e.retry_after_s)
    except SessionEndedError as e:
        return error_response(e.status, e.code, e.message, reason=e.reason)
    except UnauthorizedError as e:
        response = error_response(e.status, e.code, e.message)
        response.headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        return response
    except SandpoolError as e:
        return error_response(
            e.status, e.code, e.message, retry_after_s=1 if e.status == 503 else None
        )
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "http_error")
        message = {
            404: f"no such endpoint: {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
            413: "the request body is larger than the server accepts",
        }.get(e.status, e.reason)
        return error_response(e.status, code, message)


class ServedPool(Protocol):
    """What the API uses of a pool (``pool.manager.Pool`` of any backend): never its backend."""

    name: str
    config: PoolConfig

    async def run(self, request: RunRequest) -> PoolRun: ...

    async def ready(self) -> bool: ...

    def not_ready_reason(self) -> str: ...

    def problem(self) -> str | None: ...

    def counts(self) -> dict[str, int]: ...

    def runtime(self) -> Runtime: ...


class ApiServer:
    """Serves the run API on the configured Unix socket, and /metrics over TCP; with
    ``server.listen``, the run API over TLS too, behind bearer tokens (api/remote.py).

    Each listener admits connections through its own ``ConnectionGate``: the
    peer check (socket) and connection caps apply before anything is served.
    """

    def __init__(
        self,
        config: Config,
        pools: Mapping[str, ServedPool],
        metrics: Metrics,
        force_exit: asyncio.Event | None = None,
        bound: BoundSockets | None = None,
        remote: RemoteListener | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self.config = config
        self.sessions = sessions  # None: the session endpoints answer 404 (not served)
        self.remote = remote  # the TCP listener's TLS and tokens (api/remote.py), if any
        self._bound = bound  # taken before the pools warmed (bind_sockets), else at start()
        self.force_exit = force_exit  # set by a second signal: skip the drain
        self.pools = pools  # fixed for the server's lifetime, keyed by pool name
        self._pool_configs = {name: pool.config for name, pool in pools.items()}
        self.metrics = metrics
        metrics.client_errors_expected(
            e.code for e in ERROR_CODES if e.status is None or 400 <= e.status < 500
        )
        self.socket_path = config.server.socket
        self._runs: set[asyncio.Task[object]] = set()  # handlers of /v1/run in flight
        self._draining = False
        self._runners: list[web.AppRunner] = []
        self._listeners: list[asyncio.Server] = []
        self._throttled_log = ThrottledLog()
        self._http_logger = http_server_logger(self._throttled_log)
        self.gates: dict[str, ConnectionGate] = {}
        self._openapi: bytes | None = None  # the document, serialized on first request

    # --- lifecycle ---------------------------------------------------------

    def make_app(self, *inner: Middleware) -> web.Application:
        """The run API's aiohttp application: its routes and error middleware, no listener.

        ``inner`` middlewares run inside the error middleware (the TCP listener's token check).
        """
        app = web.Application(
            middlewares=[mark_request_started, self.track_requests, json_errors, *inner],
            client_max_size=self.config.server.max_request_bytes,
        )
        app.router.add_post("/v1/run", self.handle_run)
        if self.sessions is not None:
            app.router.add_post("/v1/sessions", self.handle_session_create)
            app.router.add_get("/v1/sessions", self.handle_session_list)
            app.router.add_get("/v1/sessions/{session_id}", self.handle_session_get)
            app.router.add_delete("/v1/sessions/{session_id}", self.handle_session_delete)
            app.router.add_post("/v1/sessions/{session_id}/run", self.handle_session_run)
        app.router.add_get("/v1/pools", self.handle_pools)
        app.router.add_get("/healthz", self.handle_healthz)
        app.router.add_get("/readyz", self.handle_readyz)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/openapi.json", self.handle_openapi)
        return app

    async def start(self) -> None:
        """Listen on the Unix socket (and the metrics TCP address unless "off").

        Raises SandpoolError when the socket or the metrics address is taken.
        """
        server = self.config.server
        loop = asyncio.get_running_loop()
        warn_if_caps_near_fd_limit(server)
        bound = self._bound if self._bound is not None else bind_sockets(server)
        runner = web.AppRunner(
            self.make_app(),
            handle_signals=False,
            access_log=None,
            # A client that disconnects mid-run cancels its handler, which
            # destroys the sandbox at once instead of letting the code run on.
            handler_cancellation=True,
            shutdown_timeout=server.shutdown_timeout_s,
            keepalive_timeout=server.keepalive_timeout_s,
            logger=self._http_logger,
        )
        await runner.setup()
        self._runners.append(runner)
        gate = self.make_gate("api", runner, server.max_connections,
                              server.max_connections_per_peer, allowed=self.peer_allowed)
        # Our own listener instead of web.UnixSite, so that the gate, not
        # aiohttp, is the protocol factory; runner.cleanup() still closes the
        # connections aiohttp's web.Server tracks.
        self._listeners.append(
            await loop.create_unix_server(gate, sock=bound.unix, backlog=LISTEN_BACKLOG)
        )
        if bound.metrics:
            metrics_app = web.Application(
                middlewares=[mark_request_started, self.track_requests, json_errors]
            )
            metrics_app.router.add_get("/metrics", self.handle_metrics)
            metrics_runner = web.AppRunner(
                metrics_app, handle_signals=False, access_log=None,
                keepalive_timeout=server.keepalive_timeout_s, logger=self._http_logger,
            )
            await metrics_runner.setup()
            self._runners.append(metrics_runner)
            gate = self.make_gate("metrics", metrics_runner, server.metrics_max_connections,
                                  server.metrics_max_connections_per_peer)
            for metrics_socket in bound.metrics:
                self._listeners.append(
                    await loop.create_server(gate, sock=metrics_socket, backlog=LISTEN_BACKLOG)
                )
        if self.remote is not None:
            await self.start_remote(self.remote)

    async def start_remote(self, remote: RemoteListener) -> None:
        """Serve the API over TLS on ``server.listen``, every request behind a bearer token.

        Its own connection caps, per peer IP address as on the metrics port; a
        TLS handshake must complete within ``header_timeout_s`` as a request head must.
        """
        server = self.config.server
        loop = asyncio.get_running_loop()
        if not remote.sockets:
            bind_remote(remote)
        runner = web.AppRunner(
            self.make_app(bearer_auth(remote.tokens, self._throttled_log)),
            handle_signals=False, access_log=None, handler_cancellation=True,
            shutdown_timeout=server.shutdown_timeout_s,
            keepalive_timeout=server.keepalive_timeout_s, logger=self._http_logger,
        )
        await runner.setup()
        self._runners.append(runner)
        gate = self.make_gate("remote", runner, server.listen_max_connections,
                              server.listen_max_connections_per_peer)
        for sock in remote.sockets:
            self._listeners.append(await loop.create_server(
                gate, sock=sock, backlog=LISTEN_BACKLOG, ssl=remote.tls,
                ssl_handshake_timeout=server.header_timeout_s,
            ))

    def make_gate(
        self,
        listener: str,
        runner: web.AppRunner,
        max_connections: int,
        max_per_peer: int,
        allowed: Callable[[PeerCredentials], bool] | None = None,
    ) -> ConnectionGate:
        assert runner.server is not None  # set up
        counter = ConnectionCounter(max_connections, max_per_peer)
        self.metrics.watch_connections(listener, lambda: counter.total)
        gate = ConnectionGate(
            listener, runner.server, counter,
            header_timeout_s=self.config.server.header_timeout_s,
            throttled_log=self._throttled_log,
            allowed=allowed,
            on_refused=self.metrics.connection_refused,
        )
        self.gates[listener] = gate
        return gate

    def peer_allowed(self, peer: PeerCredentials) -> bool:
        """allowed_uids/allowed_gids on the peer's SO_PEERCRED; root always passes."""
        return is_peer_allowed(self.config.server, peer)

    async def close(self) -> None:
        """Stop accepting, let runs in flight finish, then stop the rest and unlink the socket.

        Runs still going after ``shutdown_timeout_s`` (or at once when
        ``force_exit`` is set) are cancelled: their sandboxes are destroyed and their clients
        get a 503 ``shutting_down`` answer.
        """
        self._draining = True
        for listener in self._listeners:
            listener.close()  # no new connections; keep-alive ones get 503
        self._listeners.clear()
        if self._runs:
            log.info("draining", in_flight=len(self._runs))
            waits: list[asyncio.Task[object]] = [asyncio.ensure_future(asyncio.wait(self._runs))]
            if self.force_exit is not None:
                waits.append(asyncio.ensure_future(self.force_exit.wait()))
            await asyncio.wait(
                waits, timeout=self.config.server.shutdown_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in waits:
                waiter.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
            if self._runs:
                log.warning("drain_cancelled_runs", cancelled=len(self._runs))
                for task in self._runs:
                    task.cancel("shutting down")
                await asyncio.gather(*self._runs, return_exceptions=True)
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- handlers ----------------------------------------------------------

    @web.middleware
    async def track_requests(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Give the request its id (in every log line of it, and in the response's header);
        log and count a 4xx answer by its error code."""
        rid = request_id(request)
        with structlog.contextvars.bound_contextvars(request_id=rid):
            response = await handler(request)
            if not response.prepared:  # a streamed answer sent its headers already
                response.headers[REQUEST_ID_HEADER] = rid
            if 400 <= response.status < 500:
                code = response.get(ERROR_CODE, "http_error")
                self.metrics.client_error(code)
                log_after_response("request_refused", status=response.status,
                                   code=code, method=request.method, path=request.path)
        return response

    async def handle_run(self, request: web.Request) -> web.StreamResponse:
        received = time.monotonic()
        self._admit_run()
        parsed = parse_run(await self._read_body(request), self._pool_configs)
        pool = self.pools[parsed.pool]
        return await self._answer_run(request, received, pool.name, parsed.request, pool.run)

    def _admit_run(self) -> None:
        if self._draining:
            raise UnavailableError("sandpool is shutting down", code="shutting_down")
        if len(self._runs) >= self.config.server.max_concurrent_requests:
            raise UnavailableError(
                "sandpool is at its limit of concurrent requests", code="server_busy"
            )

    async def _read_body(self, request: web.Request) -> dict[str, object]:
        # A body that came with the headers (the usual case) needs no timer.
        body_timeout_s = None if request.content.is_eof() else self.config.server.body_timeout_s
        try:
            async with asyncio.timeout(body_timeout_s):
                return await read_json_object(request)
        except TimeoutError:
            raise BadRequestError(
                "the request body did not arrive in time", code="body_timeout"
            ) from None

    async def _answer_run(
        self,
        request: web.Request,
        received: float,
        pool_name: str,
        run_request: RunRequest,
        start: Callable[[RunRequest], Awaitable[PoolRun]],
    ) -> web.StreamResponse:
        """Run ``run_request`` through ``start`` (a pool's run, or a session's) and answer:
        JSON, or NDJSON as it runs; drain, token and metrics as for every run."""
        pool = self.pools[pool_name]
        token = request.get(TOKEN)  # set on the TCP listener only
        if token is not None:
            assert self.remote is not None
            self.remote.tokens.admit(token, pool.name)  # 403 pool_forbidden, 429 token_busy
        # Accept: application/x-ndjson streams the output (api/streaming.py).
        stream = RunStream(request) if wants_ndjson(request) else None
        started: list[None] = []  # a sandbox took the request: the code may have run
        run_request = replace(run_request, on_start=lambda: started.append(None))
        task = asyncio.current_task()
        assert task is not None
        self._runs.add(task)
        outcome = "error"
        failure: SandpoolError | None = None  # the last line of a stream that began
        try:
            if stream is None:
                run = await start(run_request)
            else:
                listened = replace(run_request, output_listener=stream.listener)
                run = await stream.follow(start(listened))
            outcome = result_outcome(run.result)
        except UnavailableError as e:
            outcome = "rejected"
            if stream is None or not stream.began:
                raise
            failure = e
        except SandpoolError as e:
            if stream is None or not stream.began:
                raise
            failure = e
        except ConnectionError:
            if stream is None:
                raise
            # A write to the client failed: it went away; the run was cancelled
            # and the pool destroyed the sandbox.
            outcome = "disconnected"
            return stream.response
        except asyncio.CancelledError:
            if not self._draining:
                # The client went away; the pool destroyed the sandbox.
                outcome = "disconnected"
                raise
            # We cancelled it ourselves to finish shutting down: tell the client
            # whether the code may have run (never 503 then: that one is retried).
            task.uncancel()
            failure = RunInterruptedError(
                "sandpool shut down while the run was in flight; it was stopped part-way"
            ) if started else UnavailableError(
                "sandpool shut down before the run started; nothing ran", code="shutting_down"
            )
            if stream is None or not stream.began:
                raise failure from None
        finally:
            self._runs.discard(task)
            if token is not None:
                assert self.remote is not None
                self.remote.tokens.release(token)
            duration_s = time.monotonic() - received
            self.metrics.request_finished(pool.name, outcome, duration_s)
            if outcome in ("error", "rejected", "disconnected"):
                log_after_response(pool=pool.name, outcome=outcome,
                                   duration_ms=round(duration_s * 1000, 3))
        if failure is not None:
            assert stream is not None
            return await finish_stream(
                stream, {"type": "error", "code": failure.code, "message": failure.message}
            )
        result = run.result
        log_after_response(
            pool=pool.name,
            sandbox=run.sandbox_id,
            outcome=outcome,
            duration_ms=round(duration_s * 1000, 3),
            queued_ms=round(run.acquire_wait_s * 1000, 3),
            stdout_bytes=len(result.stdout),
            stderr_bytes=len(result.stderr),
            exit_code=result.exit_code,
        )
        answer = result_body(result, pool.name, run.sandbox_id, run.acquire_wait_s)
        if stream is not None:
            return await finish_stream(stream, {"type": "result", **answer})
        return web.json_response(answer)

    # --- sessions (pool/sessions.py, docs/sessions.md) -----------------------

    async def handle_session_create(self, request: web.Request) -> web.Response:
        assert self.sessions is not None
        if self._draining:
            raise UnavailableError("sandpool is shutting down", code="shutting_down")
        parsed = parse_session(await self._read_body(request), self._pool_configs)
        token = request.get(TOKEN)
        if token is not None and token.pools is not None and parsed.pool not in token.pools:
            raise PoolForbiddenError(f"this token may not use pool {parsed.pool!r}")
        session = await self.sessions.create(
            caller(request), parsed.pool, parsed.ttl_s, parsed.idle_timeout_s
        )
        return web.json_response(session.describe(), status=201)

    async def handle_session_list(self, request: web.Request) -> web.Response:
        assert self.sessions is not None
        owned = self.sessions.owned_by(caller(request))
        return web.json_response({"sessions": [s.describe() for s in owned]})

    async def handle_session_get(self, request: web.Request) -> web.Response:
        assert self.sessions is not None
        session_id = request.match_info["session_id"]
        with structlog.contextvars.bound_contextvars(session=session_id):
            session = self.sessions.get(caller(request), session_id)
        return web.json_response(session.describe())

    async def handle_session_delete(self, request: web.Request) -> web.Response:
        assert self.sessions is not None
        session_id = request.match_info["session_id"]
        with structlog.contextvars.bound_contextvars(session=session_id):
            reason = self.sessions.delete(caller(request), session_id)
        return web.json_response({"session_id": session_id, "ended": reason})

    async def handle_session_run(self, request: web.Request) -> web.StreamResponse:
        assert self.sessions is not None
        sessions = self.sessions
        received = time.monotonic()
        session_id = request.match_info["session_id"]
        owner = caller(request)
        with structlog.contextvars.bound_contextvars(session=session_id):
            self._admit_run()
            session = sessions.get(owner, session_id)  # 404 or 410 before the body is read
            run_request = parse_session_run(await self._read_body(request), session.pool.config)
            return await self._answer_run(
                request, received, session.pool.name, run_request,
                partial(sessions.run, owner, session_id),
            )

    async def handle_pools(self, request: web.Request) -> web.Response:
        token = request.get(TOKEN)  # a token lists only the pools it may use
        summaries = [
            pool_summary(p.config, p.counts(), p.runtime(), p.problem())
            for p in self.pools.values()
            if token is None or token.pools is None or p.name in token.pools
        ]
        return web.json_response({"pools": summaries})

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def handle_readyz(self, request: web.Request) -> web.Response:
        ready = {name: await pool.ready() for name, pool in self.pools.items()}
        reasons = {name: self.pools[name].not_ready_reason()
                   for name, is_ready in ready.items() if not is_ready}
        status = 200 if all(ready.values()) else 503
        return web.json_response(
            {"ready": status == 200, "pools": ready, "reasons": reasons}, status=status
        )

    async def handle_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            document = build_document(metadata.version("sandpool"))
            self._openapi = json.dumps(document).encode()
        return web.Response(body=self._openapi, content_type="application/json")


async def finish_stream(stream: RunStream, event: dict[str, object]) -> web.StreamResponse:
    """Write a stream's last line; a client gone by then is not an error (the run ended)."""
    with contextlib.suppress(ConnectionError):
        await stream.finish(event)
    return stream.response


def log_after_response(event: str = "request", **fields: object) -> None:
    """Log ``event`` once the response is on its way, not before.

    Rendering the line costs ~0.1 ms; run as a callback after the handler's
    step (in which aiohttp writes the response), it stays off the latency path.
    """
    asyncio.get_running_loop().call_soon(partial(log.info, event, **fields))


async def read_json_object(request: web.Request) -> dict[str, object]:
    """The request body as a JSON object; every way it can be wrong is a 4xx."""
    content_type = request.headers.get("Content-Type")
    if content_type is not None and request.content_type != "application/json":
        raise UnsupportedMediaTypeError("the request body must be application/json")
    return decode_json_object(await request.read())


def warn_if_caps_near_fd_limit(server: ServerConfig) -> None:
    """Log a warning when the connection caps alone could take half the daemon's fds.

    The caps bound what clients can hold only if the descriptors are there:
    past RLIMIT_NOFILE, accept() and the sandboxes' own pipes fail alike.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    caps = server.max_connections
    if server.metrics_address != "off":
        caps += server.metrics_max_connections
    if server.listen != "off":
        caps += server.listen_max_connections
    if soft != resource.RLIM_INFINITY and caps > soft // 2:
        log.warning("connection_caps_near_fd_limit", connections=caps, rlimit_nofile=soft,
                    hint="raise LimitNOFILE or lower server.max_connections")


def is_peer_allowed(server: ServerConfig, peer: PeerCredentials) -> bool:
    """Both lists empty: the socket's file mode alone decides. Root always passes."""
    if not server.allowed_uids and not server.allowed_gids:
        return True
    return peer.uid == 0 or peer.uid in server.allowed_uids or peer.gid in server.allowed_gids


def caller(request: web.Request) -> str:
    """Who owns what this request creates: the bearer token's name on the TCP listener,
    the peer's uid (SO_PEERCRED, taken at connect) on the Unix socket."""
    token = request.get(TOKEN)
    if token is not None:
        return f"token:{token.name}"
    transport = request.transport
    uid = peer_credentials(transport).uid if transport is not None else -1
    return f"uid:{uid}"


def result_outcome(result: RunResult) -> str:
    if result.oom_killed:
        return "oom"
    if result.timed_out:
        return "timeout"
    return "ok" if result.exit_code == 0 else "failed"  # the program's own failure


@dataclass(slots=True)
class BoundSockets:
    """The listeners' sockets, bound but not listening: a connection is refused until
    ``ApiServer.start()`` listens on them once the pools are warm."""

    socket_path: str
    unix: socket.socket
    metrics: list[socket.socket]  # one per address the metrics host resolves to; [] when off

    def close(self) -> None:
        """Close what ``ApiServer`` did not take over, and remove the socket file."""
        for sock in (self.unix, *self.metrics):
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


def bind_sockets(server: ServerConfig) -> BoundSockets:
    """Bind the metrics address, then the Unix socket (mode ``socket_mode``), without listening.

    Done before the pools warm, so a clash ends start-up at once and leaves no socket
    file. Raises SandpoolError (``metrics_address_in_use``, ``socket_in_use``,
    ``socket_unusable``).
    """
    metrics: list[socket.socket] = []
    if server.metrics_address != "off":
        host, port = parse_address(server.metrics_address, "server.metrics_address")
        try:
            metrics = bind_tcp(host, port)
        except OSError as e:
            raise SandpoolError(
                f"cannot listen for metrics on {server.metrics_address}: "
                f"{e.strerror or e}", code="metrics_address_in_use",
            ) from None
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        prepare_socket_path(server.socket)
        try:
            unix.bind(server.socket)
        except OSError as e:
            raise SandpoolError(f"cannot use socket path {server.socket}: {e.strerror}",
                                code="socket_unusable") from None
        os.chmod(server.socket, server.socket_mode)
    except BaseException:
        for sock in (unix, *metrics):
            sock.close()
        raise
    return BoundSockets(server.socket, unix, metrics)


def bind_remote(remote: RemoteListener) -> None:
    """Bind the TCP listener's address (``server.listen``) into ``remote.sockets``.

    Raises SandpoolError ``listen_address_in_use``.
    """
    try:
        remote.sockets = bind_tcp(remote.host, remote.port)
    except OSError as e:
        raise SandpoolError(
            f"cannot listen on server.listen {remote.host}:{remote.port}: {e.strerror or e}",
            code="listen_address_in_use",
        ) from None


def bind_tcp(host: str, port: int) -> list[socket.socket]:
    """A bound TCP socket per address ``host`` resolves to, as ``loop.create_server`` binds.

    Raises OSError (the address is taken or not local, the name does not resolve).
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


def prepare_socket_path(path: str) -> None:
    """Create the socket's directory; replace a stale socket, refuse a live daemon's."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
            raise SandpoolError(
                f"cannot use socket path {path}: {e.strerror}", code="socket_unusable"
            ) from None
    else:
        raise SandpoolError(
            f"another sandpool daemon is already listening on {path}", code="socket_in_use"
        )
    finally:
        probe.close()
    os.unlink(path)
