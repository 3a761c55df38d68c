"""``Client`` and ``AsyncClient``: the same methods, one blocking, one for asyncio.

Both keep a pool of keep-alive connections (httpx's), so an agent calling
hundreds of times a minute pays no connection set-up per call, and both are
safe to share: between threads (``Client``) or tasks (``AsyncClient``).
Everything but the I/O is in ``protocol.py``, so the two cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from types import TracebackType
from typing import Any

import httpx

from sandpool_client import protocol
from sandpool_client.errors import Unavailable
from sandpool_client.models import OutputChunk, PoolInfo, RunResult, SessionInfo
from sandpool_client.session import AsyncSession, AsyncSessionStarter, Session
from sandpool_client.unix import unix_transport

# The host part of every URL on the Unix socket: the daemon ignores it.
SOCKET_BASE_URL = "http://sandpool"


def _version() -> str:
    try:
        return metadata.version("sandpool-client")
    except metadata.PackageNotFoundError:  # imported from a bare source tree
        return "unknown"


USER_AGENT = f"sandpool-client/{_version()}"
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class _Settings:
    """What both clients are built from, checked once."""

    where: str  # the socket path or the URL, as messages name it
    base_url: str
    uds: str | None
    headers: dict[str, str]
    retries: int
    request_timeout_s: float
    queue_slack_s: float
    connect_timeout_s: float
    max_retry_wait_s: float

    @classmethod
    def build(
        cls,
        socket: str | os.PathLike[str] | None,
        base_url: str | None,
        token: str | None,
        retries: int,
        request_timeout_s: float,
        queue_slack_s: float,
        connect_timeout_s: float,
        max_retry_wait_s: float,
    ) -> _Settings:
        if socket is not None and base_url is not None:
            raise ValueError("give either socket= or base_url=, not both")
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        headers = {"User-Agent": USER_AGENT}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if base_url is not None:
            uds, where = None, base_url
        else:
            uds = where = protocol.socket_path(socket)
            base_url = SOCKET_BASE_URL
        return cls(where=where, base_url=base_url, uds=uds, headers=headers, retries=retries,
                   request_timeout_s=request_timeout_s, queue_slack_s=queue_slack_s,
                   connect_timeout_s=connect_timeout_s, max_retry_wait_s=max_retry_wait_s)

    def timeout(self, run_timeout_s: float | None = None) -> httpx.Timeout:
        read_s = protocol.read_timeout_s(
            run_timeout_s, self.request_timeout_s, self.queue_slack_s
        )
        return httpx.Timeout(read_s, connect=self.connect_timeout_s)

    def retry_wait_s(self, error: Unavailable, attempt: int, retry: bool) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``; None: raise ``error``.

        ``retry`` False: never (a session's run, which must not be sent twice).
        """
        if not retry or attempt >= self.retries:
            return None
        return protocol.retry_wait_s(error, self.max_retry_wait_s)


class Client:
    """A blocking client of one sandpool daemon.

    ``socket``: the daemon's Unix socket (default ``$SANDPOOL_SOCKET``, else
    ``/run/sandpool/sandpool.sock``). ``base_url`` and ``token`` are for a TCP
    listener (``https://host:port``, the token sent as ``Authorization: Bearer``;
    ``server.listen`` on the daemon); ``verify`` takes an ``ssl.SSLContext`` that
    trusts a private CA's certificate.

    ``retries``: how many times a run refused with 503 (pool exhausted, daemon
    busy) or 429 (the token's runs at their cap) is sent again, each after the
    daemon's ``Retry-After`` (a wait over ``max_retry_wait_s`` is not waited
    out). Off by default: a caller that can do something else should hear
    about a full pool at once.

    A run's read timeout is the larger of ``request_timeout_s`` and its
    ``timeout_s`` plus ``queue_slack_s``, so a long run is never reported as a
    timeout of its own request. ``transport`` replaces httpx's (tests, proxies).
    Raises ValueError for socket= and base_url= together.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        base_url: str | None = None,
        token: str | None = None,
        retries: int = 0,
        request_timeout_s: float = protocol.DEFAULT_REQUEST_TIMEOUT_S,
        queue_slack_s: float = protocol.DEFAULT_QUEUE_SLACK_S,
        connect_timeout_s: float = protocol.DEFAULT_CONNECT_TIMEOUT_S,
        max_retry_wait_s: float = protocol.DEFAULT_MAX_RETRY_WAIT_S,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._settings = _Settings.build(socket, base_url, token, retries, request_timeout_s,
                                         queue_slack_s, connect_timeout_s, max_retry_wait_s)
        if transport is None and self._settings.uds is not None:
            transport = unix_transport(self._settings.uds)
        self._http = httpx.Client(
            base_url=self._settings.base_url, headers=self._settings.headers,
            transport=transport, verify=verify,
            # On the socket, an HTTP_PROXY in the environment must not capture
            # the requests (httpx would route http://sandpool through it).
            trust_env=self._settings.uds is None,
        )

    def run(
        self,
        code: str,
        *,
        pool: str | None = None,
        language: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
        files: Mapping[str, bytes | str] | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
        on_output: Callable[[OutputChunk], object] | None = None,
    ) -> RunResult:
        """Run ``code`` in a fresh sandbox and wait for its result.

        ``pool`` wins over ``language``; with neither, the pool ``python``.
        ``files`` maps a path relative to the sandbox's working directory to
        its content (bytes go as base64, str as UTF-8 text); ``env`` and
        ``argv`` reach the program. Left None, each is the daemon's default.

        A program that fails is a result (``exit_code``, ``timed_out``...), not
        an exception. Raises BadRequest (a bad field, unknown pool), Unavailable
        (503, after the retries), Forbidden, ApiError, RequestTimeout,
        DaemonUnreachable. Costs one request, plus one per retry.

        ``on_output``, if given, is called with each OutputChunk as the program
        writes it (the run is streamed: ``stream``); an exception it raises ends
        the run, whose sandbox the daemon then destroys.
        """
        body = protocol.run_body(code, pool=pool, language=language, stdin=stdin,
                                 timeout_s=timeout_s, files=files, env=env, argv=argv)
        return self._run(protocol.RUN_PATH, body, timeout_s, on_output, retry=True)

    def stream(
        self,
        code: str,
        *,
        pool: str | None = None,
        language: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
        files: Mapping[str, bytes | str] | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
    ) -> Generator[OutputChunk | RunResult, None, None]:
        """Run ``code`` like ``run``, yielding its output as it is written, then its result.

        Yields OutputChunk values as the daemon captures them, and last the
        RunResult (the one ``run`` returns). Leaving the loop early closes the
        connection: the daemon kills and destroys the sandbox. Raises like
        ``run`` before the first event (503s retried as ``run`` does); after it,
        ApiError for a run that failed (status 200: the error was the stream's
        last line) and DaemonUnreachable (``connection_lost``) if the stream
        breaks. Costs one request, held open for the run.
        """
        body = protocol.run_body(code, pool=pool, language=language, stdin=stdin,
                                 timeout_s=timeout_s, files=files, env=env, argv=argv)
        return self._stream(protocol.RUN_PATH, body, timeout_s, retry=True)

    def session(
        self,
        pool: str | None = None,
        *,
        ttl_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> Session:
        """Lease one sandbox of ``pool`` to this caller: its runs share one interpreter.

        ``ttl_s``: the longest the session may live; ``idle_timeout_s``: how long
        it may wait for a run. Left None, each is the daemon's default (600 s and
        300 s); the daemon caps both. Use it as a context manager (``with
        sandpool.session(pool="python") as session:``), which closes it at the
        end, or call ``close()``.

        Raises SessionsUnsupported (a tier that keeps no state), TooManySessions
        (429), SessionLimit (503), and like ``run``; 503s and 429s are retried
        as ``run`` does, since nothing was created. Costs one request, and one
        sandbox of the pool until the session ends.
        """
        body = protocol.session_body(pool=pool, ttl_s=ttl_s, idle_timeout_s=idle_timeout_s)
        document = self._request("POST", protocol.SESSIONS_PATH, body, self._settings.timeout())
        return Session(self, SessionInfo.from_json(document))

    def resume_session(self, session_id: str) -> Session:
        """A ``Session`` for a live session of this caller known by its id (``GET``).

        For a process that kept the id of a session another one created. Raises
        SessionNotFound (no such session of this caller), SessionEnded, and like
        ``run``. Costs one request.
        """
        document = self._request("GET", protocol.session_path(session_id), None,
                                 self._settings.timeout())
        return Session(self, SessionInfo.from_json(document))

    def sessions(self) -> list[SessionInfo]:
        """This caller's live sessions (``GET /v1/sessions``). Raises like ``run``."""
        document = self._request("GET", protocol.SESSIONS_PATH, None, self._settings.timeout())
        return SessionInfo.list_from_json(document)

    def _run(
        self, path: str, body: Mapping[str, Any], timeout_s: float | None,
        on_output: Callable[[OutputChunk], object] | None, *, retry: bool,
    ) -> RunResult:
        if on_output is not None:
            # Closed at once if on_output raises, not when the traceback lets go of it.
            with contextlib.closing(self._stream(path, body, timeout_s, retry=retry)) as events:
                for event in events:
                    if isinstance(event, RunResult):
                        return event
                    on_output(event)
            raise protocol.stream_ended_early(self._settings.where)  # stream never ends so
        document = self._request("POST", path, body, self._settings.timeout(timeout_s),
                                 retry=retry)
        return RunResult.from_json(document)

    def _stream(
        self, path: str, body: Mapping[str, Any], timeout_s: float | None, *, retry: bool,
    ) -> Generator[OutputChunk | RunResult, None, None]:
        content = protocol.encode_json(body)
        attempt = 0
        while True:
            try:
                with self._http.stream(
                    "POST", path, content=content, headers=protocol.STREAM_HEADERS,
                    timeout=self._settings.timeout(timeout_s),
                ) as response:
                    if response.status_code != 200:
                        response.read()
                        protocol.decode_answer(response)  # raises the error it means
                        raise protocol.stream_ended_early(self._settings.where)
                    for line in response.iter_lines():
                        if line:
                            event = protocol.stream_event(line)
                            yield event
                            if isinstance(event, RunResult):
                                return
                raise protocol.stream_ended_early(self._settings.where)
            except httpx.TransportError as e:
                raise protocol.transport_error(e, self._settings.where) from e
            except Unavailable as e:  # only ever before the first event
                wait_s = self._settings.retry_wait_s(e, attempt, retry)
                if wait_s is None:
                    raise
            attempt += 1
            time.sleep(wait_s)

    def pools(self) -> list[PoolInfo]:
        """The daemon's pools with their sandboxes by state (``GET /v1/pools``).

        Raises like ``run``.
        """
        document = self._request("GET", "/v1/pools", None, self._settings.timeout())
        return PoolInfo.list_from_json(document)

    def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None,
        deadlines: httpx.Timeout, *, retry: bool = True,
    ) -> Any:
        content = None if body is None else protocol.encode_json(body)
        headers = None if body is None else JSON_HEADERS
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    method, path, content=content, headers=headers, timeout=deadlines
                )
            except httpx.TransportError as e:
                raise protocol.transport_error(e, self._settings.where) from e
            try:
                return protocol.decode_answer(response)
            except Unavailable as e:
                wait_s = self._settings.retry_wait_s(e, attempt, retry)
                if wait_s is None:
                    raise
            attempt += 1
            time.sleep(wait_s)

    def close(self) -> None:
        """Close the kept connections. The client is not used after this."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Client {self._settings.where}>"


class AsyncClient:
    """The asyncio twin of ``Client``: the same arguments, ``await``-ed methods,
    ``async with`` for its lifetime."""

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        base_url: str | None = None,
        token: str | None = None,
        retries: int = 0,
        request_timeout_s: float = protocol.DEFAULT_REQUEST_TIMEOUT_S,
        queue_slack_s: float = protocol.DEFAULT_QUEUE_SLACK_S,
        connect_timeout_s: float = protocol.DEFAULT_CONNECT_TIMEOUT_S,
        max_retry_wait_s: float = protocol.DEFAULT_MAX_RETRY_WAIT_S,
        verify: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = _Settings.build(socket, base_url, token, retries, request_timeout_s,
                                         queue_slack_s, connect_timeout_s, max_retry_wait_s)
        if transport is None and self._settings.uds is not None:
            transport = httpx.AsyncHTTPTransport(uds=self._settings.uds)
        self._http = httpx.AsyncClient(
            base_url=self._settings.base_url, headers=self._settings.headers,
            transport=transport, verify=verify, trust_env=self._settings.uds is None,
        )

    async def run(
        self,
        code: str,
        *,
        pool: str | None = None,
        language: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
        files: Mapping[str, bytes | str] | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
        on_output: Callable[[OutputChunk], object] | None = None,
    ) -> RunResult:
        """``Client.run``, awaited. ``on_output`` may be a coroutine function: each
        call is awaited before the next chunk is read."""
        body = protocol.run_body(code, pool=pool, language=language, stdin=stdin,
                                 timeout_s=timeout_s, files=files, env=env, argv=argv)
        return await self._run(protocol.RUN_PATH, body, timeout_s, on_output, retry=True)

    def stream(
        self,
        code: str,
        *,
        pool: str | None = None,
        language: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
        files: Mapping[str, bytes | str] | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
    ) -> AsyncGenerator[OutputChunk | RunResult, None]:
        """``Client.stream`` as an async iterator. To stop early and have the sandbox
        destroyed at once, close it: ``async with contextlib.aclosing(...)`` or
        ``await events.aclose()`` (an abandoned async generator closes only when
        collected)."""
        body = protocol.run_body(code, pool=pool, language=language, stdin=stdin,
                                 timeout_s=timeout_s, files=files, env=env, argv=argv)
        return self._stream(protocol.RUN_PATH, body, timeout_s, retry=True)

    def session(
        self,
        pool: str | None = None,
        *,
        ttl_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> AsyncSessionStarter:
        """``Client.session`` for asyncio: ``async with sandpool.session(pool=...) as
        session:`` creates it on entry and closes it on exit; ``session = await
        sandpool.session(...)`` creates it, to be closed with ``await session.close()``.

        Raises like ``Client.session`` when entered or awaited.
        """
        body = protocol.session_body(pool=pool, ttl_s=ttl_s, idle_timeout_s=idle_timeout_s)
        return AsyncSessionStarter(self, body)

    async def resume_session(self, session_id: str) -> AsyncSession:
        """``Client.resume_session``, awaited."""
        document = await self._request("GET", protocol.session_path(session_id), None,
                                       self._settings.timeout())
        return AsyncSession(self, SessionInfo.from_json(document))

    async def sessions(self) -> list[SessionInfo]:
        """``Client.sessions``, awaited."""
        document = await self._request("GET", protocol.SESSIONS_PATH, None,
                                       self._settings.timeout())
        return SessionInfo.list_from_json(document)

    async def _create_session(self, body: Mapping[str, Any]) -> AsyncSession:
        document = await self._request("POST", protocol.SESSIONS_PATH, body,
                                       self._settings.timeout())
        return AsyncSession(self, SessionInfo.from_json(document))

    async def _run(
        self, path: str, body: Mapping[str, Any], timeout_s: float | None,
        on_output: Callable[[OutputChunk], object] | None, *, retry: bool,
    ) -> RunResult:
        if on_output is not None:
            events = self._stream(path, body, timeout_s, retry=retry)
            try:
                async for event in events:
                    if isinstance(event, RunResult):
                        return event
                    called = on_output(event)
                    if inspect.isawaitable(called):
                        await called
            finally:
                await events.aclose()  # at once, not when the generator is collected
            raise protocol.stream_ended_early(self._settings.where)  # stream never ends so
        document = await self._request(
            "POST", path, body, self._settings.timeout(timeout_s), retry=retry
        )
        return RunResult.from_json(document)

    async def _stream(
        self, path: str, body: Mapping[str, Any], timeout_s: float | None, *, retry: bool,
    ) -> AsyncGenerator[OutputChunk | RunResult, None]:
        content = protocol.encode_json(body)
        attempt = 0
        while True:
            try:
                async with self._http.stream(
                    "POST", path, content=content, headers=protocol.STREAM_HEADERS,
                    timeout=self._settings.timeout(timeout_s),
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                        protocol.decode_answer(response)  # raises the error it means
                        raise protocol.stream_ended_early(self._settings.where)
                    async for line in response.aiter_lines():
                        if line:
                            event = protocol.stream_event(line)
                            yield event
                            if isinstance(event, RunResult):
                                return
                raise protocol.stream_ended_early(self._settings.where)
            except httpx.TransportError as e:
                raise protocol.transport_error(e, self._settings.where) from e
            except Unavailable as e:  # only ever before the first event
                wait_s = self._settings.retry_wait_s(e, attempt, retry)
                if wait_s is None:
                    raise
            attempt += 1
            await asyncio.sleep(wait_s)

    async def pools(self) -> list[PoolInfo]:
        """``Client.pools``, awaited."""
        document = await self._request("GET", "/v1/pools", None, self._settings.timeout())
        return PoolInfo.list_from_json(document)

    async def _request(
        self, method: str, path: str, body: Mapping[str, Any] | None,
        deadlines: httpx.Timeout, *, retry: bool = True,
    ) -> Any:
        content = None if body is None else protocol.encode_json(body)
        headers = None if body is None else JSON_HEADERS
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    method, path, content=content, headers=headers, timeout=deadlines
                )
            except httpx.TransportError as e:
                raise protocol.transport_error(e, self._settings.where) from e
            try:
                return protocol.decode_answer(response)
            except Unavailable as e:
                wait_s = self._settings.retry_wait_s(e, attempt, retry)
                if wait_s is None:
                    raise
            attempt += 1
            await asyncio.sleep(wait_s)

    async def close(self) -> None:
        """Close the kept connections. The client is not used after this."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncClient {self._settings.where}>"
