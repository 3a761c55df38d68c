"""The API over TCP for other hosts: TLS, and bearer tokens known only by their hashes.

The Unix socket trusts the kernel (file mode, SO_PEERCRED); a TCP peer proves
nothing but the token it presents. So the TCP listener serves TLS only, and
every request on it, to any path, must carry ``Authorization: Bearer TOKEN``
whose SHA-256 is one of the configured tokens'; a token may be limited to some
pools and to a number of runs in flight. The daemon keeps no token, only its
hash, and logs a token's name, never the token (docs/remote.md).

``TokenTable`` is pure (no I/O) and tested apart; ``open_remote`` reads the
certificate, key and tokens file once at start.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import ssl
import tomllib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from api.connections import ThrottledLog
from pool.config import Config, TokenConfig, check_unique_tokens, parse_address, parse_tokens
from pool.errors import (
    ConfigError,
    PoolForbiddenError,
    SandpoolError,
    TokenBusyError,
    UnauthorizedError,
)

log = structlog.get_logger("sandpool.api")

TOKEN: web.RequestKey[TokenConfig] = web.RequestKey("sandpool_token", TokenConfig)
TOKEN_BYTES = 32  # of randomness in a token `sandpool token new` makes
WWW_AUTHENTICATE = 'Bearer realm="sandpool"'


def token_sha256(token: str) -> str:
    """Hex SHA-256 of a token's UTF-8 bytes: what the configuration stores."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe): for a person to store, never the daemon."""
    return f"sp_{secrets.token_urlsafe(TOKEN_BYTES)}"


class TokenTable:
    """The tokens the TCP listener accepts and the runs each has in flight. No I/O.

    Invariant: ``in_flight(name)`` is the number of ``admit`` calls for that
    token not yet matched by ``release``, and never above its ``max_concurrent``.
    """

    def __init__(self, tokens: Iterable[TokenConfig]) -> None:
        self.tokens = tuple(tokens)
        self._digests = [(bytes.fromhex(t.sha256), t) for t in self.tokens]
        self._in_flight: dict[str, int] = {}

    def authenticate(self, authorization: str | None) -> TokenConfig:
        """The token an ``Authorization`` header carries; raises UnauthorizedError.

        The presented token is hashed and compared with every stored hash in
        constant time, all of them each time, so neither the comparison nor
        the position of a match in the table shows in the answer's timing.
        """
        scheme, _, presented = (authorization or "").partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise UnauthorizedError("this listener needs an 'Authorization: Bearer TOKEN' header")
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: TokenConfig | None = None
        for stored, token in self._digests:
            if hmac.compare_digest(stored, digest):
                found = token
        if found is None:
            raise UnauthorizedError("the bearer token is not one this daemon accepts")
        return found

    def may_use(self, token: TokenConfig, pool: str) -> bool:
        return token.pools is None or pool in token.pools

    def admit(self, token: TokenConfig, pool: str) -> None:
        """Count a run of ``token`` in ``pool`` in; ``release`` must follow.

        Raises PoolForbiddenError (the token may not use the pool) or
        TokenBusyError (its max_concurrent runs are in flight); neither counts.
        """
        if not self.may_use(token, pool):
            raise PoolForbiddenError(f"token {token.name!r} may not run code in pool {pool!r}")
        held = self._in_flight.get(token.name, 0)
        if held >= token.max_concurrent:
            raise TokenBusyError(
                f"token {token.name!r} has its {token.max_concurrent} runs in flight"
            )
        self._in_flight[token.name] = held + 1

    def release(self, token: TokenConfig) -> None:
        held = self._in_flight[token.name] - 1
        if held:
            self._in_flight[token.name] = held
        else:
            del self._in_flight[token.name]

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)


@dataclass(slots=True)
class RemoteListener:
    """What the TCP listener needs, loaded and checked before any pool starts.

    ``sockets`` are bound (``api.server.bind_remote``) but not listening until
    the server starts; ``close`` closes those the server did not take over.
    """

    host: str
    port: int
    tls: ssl.SSLContext
    tokens: TokenTable
    sockets: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def open_remote(config: Config) -> RemoteListener | None:
    """Load the TCP listener's certificate, key and tokens; None when ``listen`` is "off".

    Raises SandpoolError ``tls_unusable`` when the certificate or key does not
    load, ConfigError when the tokens file cannot be read or is invalid, or a
    token names a pool that does not exist. Reads two or three small files.
    """
    server = config.server
    if server.listen == "off":
        return None
    host, port = parse_address(server.listen, "server.listen")
    # ServerConfig.validate refuses listen without both.
    assert server.tls_cert is not None
    assert server.tls_key is not None
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        tls.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise SandpoolError(
            f"cannot load server.tls_cert {server.tls_cert} with server.tls_key "
            f"{server.tls_key}: {reason}", code="tls_unusable",
        ) from None
    tokens = server.tokens
    if server.tokens_file is not None:
        tokens += read_tokens_file(server.tokens_file)
        check_unique_tokens(tokens, f"server.tokens and {server.tokens_file}")
    pools = {p.name for p in config.pools}
    for token in tokens:
        unknown = sorted(set(token.pools or ()) - pools)
        if unknown:
            raise ConfigError(f"token {token.name!r}: no pool {unknown[0]!r}")
    return RemoteListener(host, port, tls, TokenTable(tokens))


def read_tokens_file(path: str) -> tuple[TokenConfig, ...]:
    """The ``[[tokens]]`` tables of a TOML file; raises ConfigError (``tokens_file_unusable``)."""
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read server.tokens_file {path}: {e.strerror}",
                          code="tokens_file_unusable") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"server.tokens_file {path} is not valid TOML: {e}",
                          code="tokens_file_unusable") from None
    extra = sorted(set(document) - {"tokens"})
    if extra:
        raise ConfigError(f"{path}: unknown key {extra[0]} (allowed: tokens)",
                          code="tokens_file_unusable")
    return parse_tokens(document.get("tokens", []), f"{path}: tokens")


def bearer_auth(tokens: TokenTable, throttled_log: ThrottledLog) -> Middleware:
    """The middleware of the TCP listener's app: every request must carry a known token.

    It runs inside the JSON error middleware, which answers its UnauthorizedError
    with 401 and ``WWW-Authenticate``. A refusal is logged with the peer's
    address, throttled, never with what the peer sent.
    """

    @web.middleware
    async def authenticate(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            request[TOKEN] = tokens.authenticate(request.headers.get("Authorization"))
        except UnauthorizedError:
            throttled_log.warning("unauthorized", listener="remote", peer=request.remote,
                                  path=request.path)
            raise
        token = request[TOKEN]
        # Every log line of the request names its token; none ever holds the token.
        with structlog.contextvars.bound_contextvars(token=token.name):
            return await handler(request)

    return authenticate
