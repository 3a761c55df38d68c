"""A small synchronous client for sandpool's Unix-socket API (the standard library's HTTP).

What sandpool's own tests, soak and benchmarks drive the daemon with. Programs
of users, and ``sandpool run``, use the ``sandpool_client`` distribution
instead (clients/python, docs/client.md): sync and async, typed results.

    with Client("/run/sandpool/sandpool.sock") as client:
        result = client.run("print(1)")
        result["stdout"]  # "1\\n"
        result = client.run(code, files={"data.csv": csv_bytes})
        save_files(result, "results")  # what the code left under out/

One keep-alive connection per client, so an agent calling it hundreds of times
a minute pays no connection set-up per call. Not thread-safe: use one per thread.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from sandpool_client.protocol import file_entry

DEFAULT_SOCKET = os.environ.get("SANDPOOL_SOCKET", "/run/sandpool/sandpool.sock")


class ApiError(Exception):
    """The daemon answered with an error (``code`` is stable) or could not be reached."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _StaleConnection(ConnectionError):
    """A reused connection closed before any byte of the answer."""


class Client:
    """Talks to one sandpool daemon. Raises ApiError for every failure.

    HTTP/1.1 by hand rather than http.client: the request leaves in one write
    and the answer is parsed without the email package, which saves ~0.3 ms a
    call here (profiled; a warm run costs ~2 ms end to end).
    """

    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, timeout_s: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._socket: socket.socket | None = None

    def run(
        self,
        code: str,
        *,
        language: str | None = None,
        pool: str | None = None,
        stdin: str | None = None,
        timeout_s: float | None = None,
        files: Mapping[str, bytes | str] | None = None,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Run ``code`` in a fresh sandbox and return the result object of POST /v1/run.

        ``files`` maps a path relative to the sandbox's working directory to its
        content, encoded as the SDK encodes it (text where that is lossless,
        else base64).
        """
        body: dict[str, Any] = {"code": code}
        for key, value in (
            ("language", language),
            ("pool", pool),
            ("stdin", stdin),
            ("timeout_s", timeout_s),
        ):
            if value is not None:
                body[key] = value
        if files is not None:
            body["files"] = [file_entry(path, content) for path, content in files.items()]
        if env is not None:
            body["env"] = dict(env)
        if argv is not None:
            body["argv"] = list(argv)
        return self.request("POST", "/v1/run", body)

    def pools(self) -> list[dict[str, Any]]:
        pools: list[dict[str, Any]] = self.request("GET", "/v1/pools")["pools"]
        return pools

    def request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One JSON request; an error answer raises ApiError with its stable code."""
        status, raw = self.request_raw(method, path, body)
        try:
            document: dict[str, Any] = json.loads(raw)
        except ValueError:
            raise ApiError(status, "invalid_response",
                           f"sandpool answered {status} without JSON") from None
        if status >= 400:
            error = document.get("error", {})
            raise ApiError(status, str(error.get("code", "unknown")),
                           str(error.get("message", f"HTTP {status}")))
        return document

    def request_raw(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """(status, body bytes) of one request on the keep-alive connection."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: sandpool\r\nContent-Length: {len(payload)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        message = head.encode() + b"\r\n" + payload
        reused = self._socket is not None
        try:
            try:
                return self._exchange(message)
            except _StaleConnection:
                if not reused:
                    raise
                # The daemon closed an idle keep-alive connection before reading
                # anything of ours: nothing ran, so sending again is safe.
                return self._exchange(message)
        except FileNotFoundError:
            self.close()
            raise ApiError(0, "daemon_unreachable",
                           f"no sandpool daemon at {self.socket_path} (start it: sandpool serve)"
                           ) from None
        except PermissionError:
            self.close()
            raise ApiError(0, "daemon_unreachable",
                           f"permission denied on {self.socket_path} "
                           "(are you in the socket's group?)") from None
        except (OSError, ValueError) as e:
            self.close()
            raise ApiError(0, "daemon_unreachable",
                           f"cannot talk to sandpool at {self.socket_path}: {e}") from None

    def _exchange(self, message: bytes) -> tuple[int, bytes]:
        sock = self._connect()
        try:
            # The daemon may have closed the connection: an idle keep-alive one
            # it timed out (nothing of ours was read: stale, sent again), or a new
            # one it refused at accept, whose answer (403, 503) waits to be read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(message)
            buffer = bytearray()
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    raise _StaleConnection() if not buffer else ConnectionError("connection closed")
                buffer += chunk
            status_line, *header_lines = buffer[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = buffer[end + 4 :]
            length = int(headers.get("content-length", -1))
            while length < 0 or len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    if length < 0:
                        break  # no length: the body ends with the connection
                    raise ConnectionError("connection closed mid-answer")
                body += chunk
        except BaseException:
            self.close()
            raise
        if length < 0 or headers.get("connection", "").lower() == "close":
            self.close()
        return int(status_line.split()[1]), bytes(body)

    def _connect(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.socket_path)
            except OSError:
                sock.close()
                raise
            self._socket = sock
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def save_files(result: Mapping[str, Any], directory: str | os.PathLike[str]) -> list[str]:
    """Write the regular files of a run's result under ``directory``, at their ``out/...`` paths.

    Returns the paths written (those the result reports as something else, a
    symlink or a FIFO, have no content and are skipped). A truncated file is
    written as far as it came back. Never follows a symlink at a file's own
    name, so a stale link in ``directory`` cannot send content elsewhere.
    Raises ValueError for a path that is not plain and relative (the daemon
    never sends one), OSError when a file cannot be written.
    """
    written = []
    for entry in result.get("files", []):
        path = str(entry["path"])
        parts = path.split("/")
        if path.startswith("/") or "\0" in path or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"refusing to write the returned path {path!r}")
        if entry["type"] != "file" or entry["content"] is None:
            continue
        target = os.path.join(directory, *parts)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(target, flags, 0o666), "wb") as f:
            f.write(base64.b64decode(entry["content"]))
        written.append(path)
    return written
