"""``Session`` and ``AsyncSession``: one sandbox leased to this caller, its runs sharing state.

A session's runs execute one after another in the same interpreter, like a
notebook's cells: globals, imports, files and the working directory stay. Its
sandbox is never given back to a pool; it is destroyed when the session ends
(``close()``, its ``ttl_s``, its ``idle_timeout_s``, a run that timed out or
ran out of memory: docs/sessions.md). The requests and their parsing are the
client's (``client.py``, ``protocol.py``); this module holds a session's id
and the rules that are a session's own:

- A run is sent once: never again after a 503 or a broken connection, as a
  run without a session may be, since it may have changed the session's state.
- ``close()`` is idempotent, and a session that already ended is not an error
  there: the point of closing, that its sandbox is gone, holds either way.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sandpool_client import protocol
from sandpool_client.errors import SessionEnded, SessionNotFound
from sandpool_client.models import OutputChunk, RunResult, SessionInfo, ended_reason_from_json

if TYPE_CHECKING:  # client.py imports this module
    from sandpool_client.client import AsyncClient, Client


class _SessionBase:
    """What both flavours keep: the session as created, and how it ended once closed."""

    def __init__(self, info: SessionInfo) -> None:
        self._created = info
        self._path = protocol.session_path(info.session_id)
        self._run_path = protocol.session_path(info.session_id, "run")
        self._closed = False
        self._ended: str | None = None

    @property
    def id(self) -> str:
        """The session's id: 256 random bits, usable only by the caller that created it."""
        return self._created.session_id

    @property
    def pool(self) -> str:
        """The pool whose sandbox the session holds."""
        return self._created.pool

    @property
    def created_at(self) -> datetime:
        return self._created.created_at

    @property
    def expires_at(self) -> datetime:
        """The latest the session can live (UTC): its creation plus its ``ttl_s``."""
        return self._created.expires_at

    @property
    def idle_timeout_s(self) -> float:
        """How long the session may wait for a run before the daemon ends it."""
        return self._created.idle_timeout_s

    def _record_end(self, reason: str | None) -> str | None:
        self._closed, self._ended = True, reason
        return reason

    def __repr__(self) -> str:
        state = f" ended={self._ended}" if self._closed else ""
        return f"<{type(self).__name__} {self.id} pool={self.pool}{state}>"


def _reason_gone(error: SessionEnded | SessionNotFound) -> str | None:
    """Why a session that a DELETE found gone had ended. The daemon answers a DELETE of an
    ended session with 200 and its reason; a 410 (a daemon that does not) says it too,
    and a 404 means it ended over an hour ago or before a restart: nobody knows why."""
    return error.reason if isinstance(error, SessionEnded) else None


class Session(_SessionBase):
    """A session of a ``Client`` (``Client.session``): runs that keep their state.

    A context manager that closes the session at its end. Safe to share between
    threads as its client is, but the daemon runs one request of a session at a
    time (a second one in flight raises SessionBusy).
    """

    def __init__(self, client: Client, info: SessionInfo) -> None:
        super().__init__(info)
        self._client = client

    def run(
        self,
        code: str,
        *,
        stdin: str | None = None,
        timeout_s: float | None = None,
        files: Mapping[str, bytes | str] | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
        on_output: Callable[[OutputChunk], object] | None = None,
    ) -> RunResult:
        """Run ``code`` in the session's interpreter, after its earlier runs, and wait.

        Takes what ``Client.run`` takes but the pool, and answers the same
        RunResult. ``files`` are written relative to the current working
        directory; the result's ``files`` are what is new or changed under
        ``out/`` since the previous run. A run that times out or runs out of
        memory ends the session: its result says so, and later calls raise
        SessionEnded. So does a RequestTimeout here: the daemon kills the run
        its client left.

        Raises SessionEnded (``.reason``), SessionNotFound, SessionBusy, and
        like ``Client.run``, but is never sent twice: ``Client(retries=)`` does
        not apply. Costs one request.
        """
        body = protocol.run_body(code, pool=None, language=None, stdin=stdin,
                                 timeout_s=timeout_s, files=files, env=env, argv=argv)
        return self._client._run(self._run_path, body, timeout_s, on_output, retry=False)

    def stream(
        self,
        code: str,
        *,
        stdin: str | None = None,
        timeout_s: float | None = None,
        files: Mapping[str, bytes | str] | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
    ) -> Generator[OutputChunk | RunResult, None, None]:
        """``run``, yielding the output as it is written, then the RunResult
        (``Client.stream``). Leaving the loop early kills the run's program, which
        ends the session (reason ``cancelled``: nobody can tell what state it left)."""
        body = protocol.run_body(code, pool=None, language=None, stdin=stdin,
                                 timeout_s=timeout_s, files=files, env=env, argv=argv)
        return self._client._stream(self._run_path, body, timeout_s, retry=False)

    def info(self) -> SessionInfo:
        """The session as the daemon sees it now: runs, busy, when it idles out (``GET``).

        Raises SessionEnded, SessionNotFound, and like ``Client.run``.
        """
        return SessionInfo.from_json(
            self._client._request("GET", self._path, None, self._client._settings.timeout())
        )

    def close(self) -> str | None:
        """End the session: the daemon destroys its sandbox (``DELETE``).

        Returns why it ended: ``deleted``, or the reason it had ended for
        already (``idle``, ``timed_out``...); None when the daemon has forgotten
        it (ended over an hour ago, or a restart). Idempotent: after the first
        call that answered, it returns that reason without a request. Raises
        DaemonUnreachable, RequestTimeout, ApiError: then the session may live
        on until its idle timeout.
        """
        if self._closed:
            return self._ended
        try:
            document = self._client._request(
                "DELETE", self._path, None, self._client._settings.timeout()
            )
        except (SessionEnded, SessionNotFound) as e:
            return self._record_end(_reason_gone(e))
        return self._record_end(ended_reason_from_json(document))

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncSession(_SessionBase):
    """``Session`` for asyncio (``AsyncClient.session``): the same methods, awaited, and
    ``async with`` for its lifetime."""

    def __init__(self, client: AsyncClient, info: SessionInfo) -> None:
        super().__init__(info)
        self._client = client

    async def run(
        self,
        code: str,
        *,
        stdin: str | None = None,
        timeout_s: float | None = None,
        files: Mapping[str, bytes | str] | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
        on_output: Callable[[OutputChunk], object] | None = None,
    ) -> RunResult:
        """``Session.run``, awaited; ``on_output`` may be a coroutine function."""
        body = protocol.run_body(code, pool=None, language=None, stdin=stdin,
                                 timeout_s=timeout_s, files=files, env=env, argv=argv)
        return await self._client._run(self._run_path, body, timeout_s, on_output, retry=False)

    def stream(
        self,
        code: str,
        *,
        stdin: str | None = None,
        timeout_s: float | None = None,
        files: Mapping[str, bytes | str] | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
    ) -> AsyncGenerator[OutputChunk | RunResult, None]:
        """``Session.stream`` as an async iterator; close it to leave early
        (``contextlib.aclosing``), as ``AsyncClient.stream``."""
        body = protocol.run_body(code, pool=None, language=None, stdin=stdin,
                                 timeout_s=timeout_s, files=files, env=env, argv=argv)
        return self._client._stream(self._run_path, body, timeout_s, retry=False)

    async def info(self) -> SessionInfo:
        """``Session.info``, awaited."""
        return SessionInfo.from_json(await self._client._request(
            "GET", self._path, None, self._client._settings.timeout()
        ))

    async def close(self) -> str | None:
        """``Session.close``, awaited."""
        if self._closed:
            return self._ended
        try:
            document = await self._client._request(
                "DELETE", self._path, None, self._client._settings.timeout()
            )
        except (SessionEnded, SessionNotFound) as e:
            return self._record_end(_reason_gone(e))
        return self._record_end(ended_reason_from_json(document))

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # A task cancelled inside the block still closes: the cancellation was
        # delivered already, so this await runs unless the task is cancelled again
        # (then the daemon's idle timeout ends the session).
        await self.close()


class AsyncSessionStarter:
    """What ``AsyncClient.session`` returns: ``await`` it for an AsyncSession, or enter it
    (``async with``) to have the session closed at the block's end.

    Nothing is sent until then.
    """

    def __init__(self, client: AsyncClient, body: Mapping[str, Any]) -> None:
        self._client = client
        self._body = body
        self._session: AsyncSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._client._create_session(self._body).__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._client._create_session(self._body)
        return self._session

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
