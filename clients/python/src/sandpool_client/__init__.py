"""A client for sandpool: run untrusted code in single-use sandboxes, sync or async.

    from sandpool_client import Client

    with Client() as sandpool:                      # $SANDPOOL_SOCKET or the default socket
        result = sandpool.run("print(6 * 7)", timeout_s=5)
        result.stdout, result.exit_code             # ('42\\n', 0)

``stream`` (or ``run(on_output=...)``) yields output as the program writes it.
``session`` leases one sandbox whose runs keep their state, like notebook cells:

    with sandpool.session(pool="python") as session:
        session.run("x = 41")
        session.run("print(x + 1)").stdout          # '42\n'

``AsyncClient`` has the same methods for asyncio. Errors are one family
(``SandpoolClientError``); see ``sandpool_client.errors``.
"""

from sandpool_client.client import AsyncClient, Client
from sandpool_client.errors import (
    ApiError,
    BadRequest,
    DaemonUnreachable,
    Forbidden,
    RequestTimeout,
    SandpoolClientError,
    SessionBusy,
    SessionEnded,
    SessionLimit,
    SessionNotFound,
    SessionsUnsupported,
    TooManySessions,
    Unavailable,
)
from sandpool_client.models import (
    OutFile,
    OutputChunk,
    PoolInfo,
    RichResult,
    RunError,
    RunResult,
    SessionInfo,
)
from sandpool_client.protocol import DEFAULT_SOCKET
from sandpool_client.session import AsyncSession, Session

__all__ = [
    "DEFAULT_SOCKET",
    "ApiError",
    "AsyncClient",
    "AsyncSession",
    "BadRequest",
    "Client",
    "DaemonUnreachable",
    "Forbidden",
    "OutFile",
    "OutputChunk",
    "PoolInfo",
    "RequestTimeout",
    "RichResult",
    "RunError",
    "RunResult",
    "SandpoolClientError",
    "Session",
    "SessionBusy",
    "SessionEnded",
    "SessionInfo",
    "SessionLimit",
    "SessionNotFound",
    "SessionsUnsupported",
    "TooManySessions",
    "Unavailable",
]
