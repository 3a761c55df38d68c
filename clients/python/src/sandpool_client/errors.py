"""One exception family: what went wrong decides the class, the daemon's stable code rides along.

    SandpoolClientError            every failure; .code, .message, .status
    ├── DaemonUnreachable          no answer: no socket, refused, the connection dropped
    ├── RequestTimeout             connected, but no answer within the read timeout
    └── ApiError                   the daemon answered with an error status
        ├── BadRequest             400, 404, 405, 413, 415: the request is wrong as sent
        │   ├── SessionNotFound    404 session_not_found: no such session of this caller
        │   └── SessionsUnsupported  400 sessions_unsupported: the pool's tier keeps no state
        ├── SessionEnded           410 session_ended: the session ended; .reason says why
        ├── SessionBusy            409 session_busy: a run of the session is in flight
        ├── Forbidden              401, 403: this caller may not run code here
        └── Unavailable            503: pool exhausted, daemon busy or stopping; 429: a
            │                      token's runs at its cap; .retry_after
            ├── TooManySessions    429 too_many_sessions: this caller's sessions at the cap
            └── SessionLimit       503 session_limit, session_memory: the pool's sessions
                                   or every session's memory at the cap

``code`` is the daemon's (``pool_exhausted``, ``invalid_timeout``...) for an
``ApiError``, and one of the client's own (``daemon_unreachable``,
``connection_lost``, ``request_timeout``, ``invalid_response``) otherwise. The
session classes are chosen by the daemon's code (docs/sessions.md), the others
by the status.
"""

from __future__ import annotations


class SandpoolClientError(Exception):
    """Base of every error this package raises.

    ``status`` is the HTTP status of the daemon's answer, None when there was none.
    """

    def __init__(self, message: str, *, code: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, " \
               f"message={self.message!r})"


class DaemonUnreachable(SandpoolClientError):
    """The daemon could not be reached, or the connection closed before its answer.

    ``code`` is ``daemon_unreachable`` when no connection was made (nothing ran)
    and ``connection_lost`` when it broke after the request left (it may have run).
    """


class RequestTimeout(SandpoolClientError):
    """The daemon took the request but did not answer within the read timeout.

    The run itself may still be going on; the daemon kills it at its own timeout.
    """


class ApiError(SandpoolClientError):
    """The daemon answered with an error: ``status``, and its stable ``code`` and ``message``.

    Raised as is for a status no subclass covers (500, an unexpected one).
    """

    status: int

    def __init__(self, message: str, *, code: str, status: int) -> None:
        super().__init__(message, code=code, status=status)


class BadRequest(ApiError):
    """The request can never succeed as sent (a bad field, an unknown pool, too large).

    Sending it again does not help; ``code`` says what to change.
    """


class Forbidden(ApiError):
    """The daemon refuses this caller: ``forbidden`` (the socket's peer uid or gid),
    ``unauthorized`` (401: no or an unknown bearer token) or ``pool_forbidden`` (403: the
    token may not use that pool)."""


class Unavailable(ApiError):
    """The daemon cannot take the run now: ``pool_exhausted``, ``acquire_timeout``,
    ``backend_unavailable``, ``server_busy``, ``shutting_down``, ``too_many_connections``,
    ``token_busy`` (429)...

    Nothing ran. ``retry_after`` is the daemon's ``Retry-After`` in seconds
    (None if it sent none); ``Client(retries=N)`` waits it out by itself.
    """

    def __init__(
        self, message: str, *, code: str, status: int, retry_after: float | None
    ) -> None:
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after


class SessionNotFound(BadRequest):
    """No session of this caller has that id (``session_not_found``, 404).

    The daemon answers the same for an id that never existed, another caller's,
    one that ended over an hour ago, and any id after a daemon restart.
    """


class SessionsUnsupported(BadRequest):
    """The pool's tier cannot keep state between runs (``sessions_unsupported``, 400):
    wasm, and JavaScript pools. Use ``run`` there, or another pool."""


class SessionEnded(ApiError):
    """The session ended and its sandbox is gone (``session_ended``, 410).

    ``reason`` is why: ``deleted``, ``expired``, ``idle``, ``timed_out``,
    ``oom_killed``, ``killed``, ``exited``, ``cancelled`` (this client left a run
    before its answer) or ``shutdown`` (None if the daemon sent none). Its state
    is lost; a new session starts from nothing.
    """

    def __init__(self, message: str, *, code: str, status: int, reason: str | None) -> None:
        super().__init__(message, code=code, status=status)
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, status={self.status}, " \
               f"reason={self.reason!r}, message={self.message!r})"


class SessionBusy(ApiError):
    """Another run of the same session is in flight (``session_busy``, 409).

    Nothing ran. A session runs one request at a time: wait for the other run.
    """


class TooManySessions(Unavailable):
    """This caller has as many sessions as it may (``too_many_sessions``, 429).

    Close one, or wait ``retry_after`` seconds.
    """


class SessionLimit(Unavailable):
    """The daemon cannot lease another sandbox now: ``session_limit`` (the pool's
    ``max_sessions``) or ``session_memory`` (every session's memory together), 503.

    Nothing was created; ``retry_after`` is the daemon's ``Retry-After``.
    """
