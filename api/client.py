"""A small synchronous client for sandpool's Unix-socket API (standard library only).

    with Client("/run/sandpool/sandpool.sock") as client:
        result = client.run("print(1)")
        result["stdout"]  # "1\\n"

One keep-alive connection per client, so an agent calling it hundreds of times
a minute pays no connection set-up per call. Not thread-safe: use one per thread.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any

DEFAULT_SOCKET = os.environ.get("SANDPOOL_SOCKET", "/run/sandpool/sandpool.sock")


class ApiError(Exception):
    """The daemon answered with an error (``code`` is stable) or could not be reached."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    """Talks to one sandpool daemon. Raises ApiError for every failure."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, timeout_s: float = 120.0) -> None:
        self.socket_path = socket_path
        self._connection = _UnixConnection(socket_path, timeout_s)

    def run(
        self,
        code: str,
        *,
        language: str | None = None,
        pool: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Run ``code`` in a fresh sandbox and return the result object of POST /v1/run."""
        body: dict[str, Any] = {"code": code}
        for key, value in (
            ("language", language),
            ("pool", pool),
            ("stdin", stdin),
            ("timeout_s", timeout_s),
        ):
            if value is not None:
                body[key] = value
        return self.request("POST", "/v1/run", body)

    def pools(self) -> list[dict[str, Any]]:
        pools: list[dict[str, Any]] = self.request("GET", "/v1/pools")["pools"]
        return pools

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            self._connection.request(method, path, body=payload, headers=headers)
            response = self._connection.getresponse()
            raw = response.read()
        except FileNotFoundError:
            self.close()
            raise ApiError(
                0,
                "daemon_unreachable",
                f"no sandpool daemon at {self.socket_path} (start it: sandpool serve)",
            ) from None
        except PermissionError:
            self.close()
            raise ApiError(
                0,
                "daemon_unreachable",
                f"permission denied on {self.socket_path} (are you in the socket's group?)",
            ) from None
        except (OSError, http.client.HTTPException) as e:
            self.close()
            raise ApiError(
                0, "daemon_unreachable", f"cannot talk to sandpool at {self.socket_path}: {e}"
            ) from None
        try:
            document: dict[str, Any] = json.loads(raw)
        except ValueError:
            raise ApiError(
                response.status,
                "invalid_response",
                f"sandpool answered {response.status} without JSON",
            ) from None
        if response.status >= 400:
            error = document.get("error", {})
            raise ApiError(
                response.status,
                str(error.get("code", "unknown")),
                str(error.get("message", f"HTTP {response.status}")),
            )
        return document

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
