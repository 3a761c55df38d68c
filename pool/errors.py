"""One error family for sandpool.

Every error carries a stable snake_case ``code`` (the API puts it in its JSON
error body and the CLI prints ``message`` as its one readable line) and the HTTP
status the API answers with. Backend errors are translated into these at the
backend boundary; nothing else leaks out of ``pool``.
"""

from __future__ import annotations


class SandpoolError(Exception):
    """Base of every error sandpool reports to a user."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ConfigError(SandpoolError):
    """The configuration file or a command-line option is invalid."""

    code = "invalid_config"
    status = 400


class BadRequestError(SandpoolError):
    """The client sent a request that can never succeed as sent."""

    code = "invalid_request"
    status = 400


class ForbiddenError(SandpoolError):
    """The peer's credentials are not allowed to run code."""

    code = "forbidden"
    status = 403


class UnauthorizedError(SandpoolError):
    """No bearer token, or one that matches none (the TCP listener only)."""

    code = "unauthorized"
    status = 401


class PoolForbiddenError(ForbiddenError):
    """The bearer token may not run code in the pool the request names."""

    code = "pool_forbidden"


class UnknownPoolError(SandpoolError):
    code = "unknown_pool"
    status = 404


class UnavailableError(SandpoolError):
    """A pool cannot take the request now; the client may retry after ``retry_after_s``."""

    code = "pool_exhausted"
    status = 503

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class TokenBusyError(UnavailableError):
    """The bearer token has its ``max_concurrent`` runs in flight: 429, not 503, since the
    daemon could take the run; this client is over its share."""

    code = "token_busy"
    status = 429


class BackendError(SandpoolError):
    """The sandbox backend (dockerd, bubblewrap, wasmtime) failed or did not answer."""

    code = "backend_error"
    status = 503


class SandboxLostError(BackendError):
    """A sandbox died before it took its request; the pool retries with a fresh one."""

    code = "sandbox_lost"


class ImageBuildError(SandpoolError):
    """Building the sandbox image failed; ``message`` says why in one line."""

    code = "image_build_failed"


class UnsupportedMediaTypeError(BadRequestError):
    code = "unsupported_media_type"
    status = 415


class SessionNotFoundError(SandpoolError):
    """No live session of this id belongs to the caller: never confirms that it exists."""

    code = "session_not_found"
    status = 404


class SessionEndedError(SandpoolError):
    """The caller's session has ended; ``reason`` says why (docs/sessions.md)."""

    code = "session_ended"
    status = 410

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class SessionBusyError(SandpoolError):
    """A run of the session is in flight: a session runs one request at a time."""

    code = "session_busy"
    status = 409


class TooManySessionsError(UnavailableError):
    """The caller holds ``max_sessions_per_caller`` sessions: 429, this caller is over
    its share."""

    code = "too_many_sessions"
    status = 429


class RunInterruptedError(SandpoolError):
    """The daemon stopped (its drain ran out) while the run was in flight, and stopped
    it part-way. Not a 503: the code ran, may have had effects, and is not safe to
    send again blindly, which a proxy or client would do with a 503."""

    code = "run_interrupted"
    status = 500
