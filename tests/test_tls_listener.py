"""The TCP listener (``server.listen``): TLS only, bearer tokens, a token's pools and cap.

The token table alone first (pure), then a real daemon with a process pool,
a certificate from a throw-away CA made here with ``cryptography``, and the
real client over TLS (``sandpool_client.Client(base_url=..., verify=...)``).
Error answers are checked against the daemon's own OpenAPI document, which
tests/test_openapi.py counts on for these codes.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import ipaddress
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012
from sandpool_client import AsyncClient, Client, Forbidden, RunResult, Unavailable
from sandpool_client.errors import DaemonUnreachable

from api.remote import TokenTable, new_token, read_tokens_file, token_sha256
from pool.config import TokenConfig, parse_config
from pool.errors import (
    ConfigError,
    PoolForbiddenError,
    TokenBusyError,
    UnauthorizedError,
)
from tests.support import REPOSITORY, Daemon, free_port, launch_daemon, running_daemon

# --- the token table alone ---------------------------------------------------


def table(*tokens: TokenConfig) -> TokenTable:
    return TokenTable(tokens)


def test_a_token_is_known_by_its_hash_only() -> None:
    secret = new_token()
    token = TokenConfig("ci", token_sha256(secret))
    tokens = table(TokenConfig("other", token_sha256(new_token())), token)
    assert tokens.authenticate(f"Bearer {secret}") is token
    assert tokens.authenticate(f"bearer  {secret} ") is token  # the scheme is case-blind
    for header in (None, "", secret, f"Basic {secret}", "Bearer ", f"Bearer {secret}x",
                   f"Bearer {token.sha256}"):  # the hash itself is no token
        with pytest.raises(UnauthorizedError):
            tokens.authenticate(header)


def test_a_token_runs_in_its_pools_up_to_its_cap() -> None:
    limited = TokenConfig("limited", token_sha256("a"), pools=("python",), max_concurrent=2)
    tokens = table(limited)
    with pytest.raises(PoolForbiddenError):
        tokens.admit(limited, "shell")
    tokens.admit(limited, "python")
    tokens.admit(limited, "python")
    with pytest.raises(TokenBusyError) as busy:
        tokens.admit(limited, "python")
    assert (busy.value.status, busy.value.code, busy.value.retry_after_s) == (429, "token_busy", 1)
    assert tokens.in_flight("limited") == 2  # refusals count nothing
    tokens.release(limited)
    tokens.admit(limited, "python")
    tokens.release(limited)
    tokens.release(limited)
    assert tokens.in_flight("limited") == 0


@pytest.mark.parametrize(("server", "code", "message"), [
    ({"listen": "127.0.0.1:8443"}, "tls_required",
     "server.listen needs server.tls_cert and server.tls_key: the TCP listener serves TLS only"),
    ({"listen": "127.0.0.1:8443", "tls_cert": "/c", "tls_key": "/k"}, "tokens_required",
     "server.listen needs [[server.tokens]] or server.tokens_file: the TCP listener answers "
     "bearer tokens only"),
    ({"listen": "127.0.0.1:8443", "tls_cert": "c", "tls_key": "/k", "tokens_file": "/t"},
     "invalid_config", "server.tls_cert must be an absolute path"),
    ({"tokens": [{"name": "a", "sha256": "00"}]}, "invalid_config",
     "server.tokens.a.sha256 must be the 64 hex digits of the token's SHA-256 "
     "(`sandpool token new` prints it)"),
    ({"tokens": [{"name": "a", "sha256": "0" * 64}, {"name": "a", "sha256": "1" * 64}]},
     "duplicate_token", "server.tokens: a given twice"),
    ({"tokens": [{"name": "a", "sha256": "0" * 64, "pools": ["nope"]}]}, "invalid_config",
     "server.tokens.a.pools: no pool 'nope'"),
    ({"tokens": [{"name": "a", "sha256": "0" * 64, "token": "x"}]}, "invalid_config",
     "unknown key server.tokens[0].token (allowed: max_concurrent, name, pools, sha256)"),
])
def test_config_refuses_an_unsafe_listener(
    server: dict[str, Any], code: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": server, "pools": {"python": {"backend": "fake"}}})
    assert (caught.value.code, caught.value.message) == (code, message)


def test_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(f'[[tokens]]\nname = "a"\nsha256 = "{"A" * 64}"\npools = ["python"]\n')
    assert read_tokens_file(str(path)) == (TokenConfig("a", "a" * 64, ("python",)),)
    path.write_text("[[tokens]]\nname = \"a\"\n")
    with pytest.raises(ConfigError, match="sha256 must be the 64 hex digits"):
        read_tokens_file(str(path))
    with pytest.raises(ConfigError) as caught:
        read_tokens_file(str(tmp_path / "missing.toml"))
    assert caught.value.code == "tokens_file_unusable"


# --- a real daemon over TLS ---------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA's certificate: what clients trust
    cert: Path  # the daemon's, for 127.0.0.1, signed by the CA
    key: Path


def make_certificates(where: Path) -> Certificates:
    """A throw-away CA and a server certificate for IP 127.0.0.1 it signs (P-256)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sandpool test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = Certificates(where / "ca.pem", where / "cert.pem", where / "key.pem")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    paths.key.chmod(0o600)
    return paths


@dataclass(frozen=True)
class Remote:
    daemon: Daemon
    url: str
    port: int
    certificates: Certificates
    tokens: dict[str, str]  # name -> the token itself, which only the test knows

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certificates.ca))

    def client(self, token: str | None) -> Client:
        return Client(base_url=self.url, token=token, verify=self.trust())

    def raw(self) -> httpx.Client:
        """An HTTP client without the sandpool client's headers: answers as they come."""
        return httpx.Client(base_url=self.url, verify=self.trust(), timeout=60)


# Per peer IP: three connections at once (the refusal test opens a fourth).
CONFIG = """
[server]
metrics_address = "off"
listen = "127.0.0.1:{port}"
tls_cert = "{cert}"
tls_key = "{key}"
tokens_file = "{tokens_file}"
listen_max_connections = 16
listen_max_connections_per_peer = 3

[[server.tokens]]
name = "full"
sha256 = "{full}"
max_concurrent = 1

[pools.python]
backend = "process"
min_idle = 1
max_size = 3
timeout_s = 10

[pools.other]
backend = "process"
min_idle = 0
max_size = 1
"""


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    workdir = tmp_path_factory.mktemp("tls")
    certificates = make_certificates(workdir)
    tokens = {"full": new_token(), "limited": new_token()}
    tokens_file = workdir / "tokens.toml"
    tokens_file.write_text(textwrap.dedent(f"""
        [[tokens]]
        name = "limited"
        sha256 = "{token_sha256(tokens["limited"])}"
        pools = ["python"]
    """))
    port = free_port()
    config = CONFIG.format(port=port, cert=certificates.cert, key=certificates.key,
                           tokens_file=tokens_file, full=token_sha256(tokens["full"]))
    with running_daemon(workdir, config) as daemon:
        yield Remote(daemon, f"https://127.0.0.1:{port}", port, certificates, tokens)


@pytest.fixture(scope="module")
def document(remote: Remote) -> dict[str, Any]:
    with remote.raw() as http:
        answer = http.get("/openapi.json",
                          headers={"Authorization": f"Bearer {remote.tokens['full']}"})
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


def check_error(document: dict[str, Any], answer: httpx.Response, status: int, code: str,
                path: str = "/v1/run", method: str = "post") -> None:
    """``answer`` is ``status`` with ``code``, and a body the OpenAPI document gives for it."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["error"]["code"] == code
    registry: Registry[Any] = Registry().with_resource(
        "urn:sandpool:openapi", DRAFT202012.create_resource(document))
    pointer = (f"#/paths/{path.replace('/', '~1')}/{method}/responses/{status}"
               "/content/application~1json/schema")
    Draft202012Validator({"$ref": f"urn:sandpool:openapi{pointer}"},
                         registry=registry).validate(body)
    headers = document["paths"][path][method]["responses"][str(status)].get("headers", {})
    for name, header in headers.items():
        if header.get("required"):
            assert name in answer.headers, f"{status} without {name}"


def test_a_run_over_tls(remote: Remote) -> None:
    with remote.client(remote.tokens["full"]) as client:
        result = client.run("print(6 * 7)", pool="python")
        assert isinstance(result, RunResult)
        assert (result.stdout, result.exit_code) == ("42\n", 0)
        assert {p.name for p in client.pools()} == {"python", "other"}
    with remote.client(remote.tokens["limited"]) as client:
        assert client.run("print('limited')").stdout == "limited\n"
        assert [p.name for p in client.pools()] == ["python"]  # only the pools it may use


async def test_an_async_run_over_tls(remote: Remote) -> None:
    async with AsyncClient(base_url=remote.url, token=remote.tokens["full"],
                           verify=remote.trust()) as client:
        result = await client.run("print('async')", pool="other")
    assert result.stdout == "async\n"


def test_no_token_or_a_wrong_one_is_401(remote: Remote, document: dict[str, Any]) -> None:
    with remote.raw() as http:
        for headers in ({}, {"Authorization": f"Bearer {new_token()}"},
                        {"Authorization": f"Bearer {token_sha256(remote.tokens['full'])}"},
                        {"Authorization": f"Basic {remote.tokens['full']}"}):
            answer = http.post("/v1/run", json={"code": "print(1)"}, headers=headers)
            check_error(document, answer, 401, "unauthorized")
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        # Every path, not only /v1/run: nothing is served before the token is checked.
        for path in ("/v1/pools", "/healthz", "/metrics", "/nope"):
            assert http.get(path).status_code == 401, path
    with remote.client(new_token()) as client, pytest.raises(Forbidden) as caught:
        client.run("print(1)")
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")


def test_a_pool_the_token_may_not_use_is_403(remote: Remote, document: dict[str, Any]) -> None:
    with remote.raw() as http:
        answer = http.post("/v1/run", json={"code": "print(1)", "pool": "other"},
                           headers={"Authorization": f"Bearer {remote.tokens['limited']}"})
    check_error(document, answer, 403, "pool_forbidden")
    with remote.client(remote.tokens["limited"]) as client, pytest.raises(Forbidden) as caught:
        client.run("print(1)", pool="other")
    assert caught.value.code == "pool_forbidden"


def test_a_token_over_its_cap_is_429(remote: Remote, document: dict[str, Any]) -> None:
    """"full" has max_concurrent 1: while one of its runs sleeps, a second is refused,
    though the pool has sandboxes free; another token is not held back by it."""
    started = threading.Event()
    outcome: list[object] = []

    def long_run() -> None:
        # A probe below may take the token's one slot first: then this run is
        # refused with 429 and sent again after Retry-After, by the client.
        with Client(base_url=remote.url, token=remote.tokens["full"], verify=remote.trust(),
                    retries=10) as client:
            started.set()
            outcome.append(client.run("import time; time.sleep(5); print('slept')"))

    runner = threading.Thread(target=long_run)
    runner.start()
    try:
        started.wait(10)
        deadline = time.monotonic() + 10
        with remote.raw() as http:
            while True:  # until the long run is in flight
                answer = http.post("/v1/run", json={"code": "print(1)"},
                                   headers={"Authorization": f"Bearer {remote.tokens['full']}"})
                if answer.status_code == 429 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            check_error(document, answer, 429, "token_busy")
            assert int(answer.headers["Retry-After"]) >= 1
        with remote.client(remote.tokens["limited"]) as client:
            assert client.run("print(2)").stdout == "2\n"
        with remote.client(remote.tokens["full"]) as client, pytest.raises(Unavailable) as busy:
            client.run("print(1)")
        assert (busy.value.status, busy.value.code) == (429, "token_busy")
    finally:
        runner.join(30)
    assert isinstance(outcome[0], RunResult)
    assert outcome[0].stdout == "slept\n"
    with remote.client(remote.tokens["full"]) as client:  # its slot came back
        assert client.run("print(3)").stdout == "3\n"


def test_plain_http_on_the_tls_port_gets_nothing(remote: Remote) -> None:
    def plain_request() -> bytes:
        connection = http.client.HTTPConnection("127.0.0.1", remote.port, timeout=10)
        try:
            connection.request("GET", "/healthz",
                               headers={"Authorization": f"Bearer {remote.tokens['full']}"})
            return connection.getresponse().read()
        finally:
            connection.close()

    with pytest.raises((http.client.HTTPException, OSError)):
        plain_request()
    # A client that does not trust the certificate does not get through either.
    with Client(base_url=remote.url, token=remote.tokens["full"]) as client, \
            pytest.raises(DaemonUnreachable):
        client.run("print(1)")


def test_connections_are_capped_per_peer_ip(remote: Remote) -> None:
    trust = remote.trust()
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(3):
            held.append(trust.wrap_socket(socket.create_connection(("127.0.0.1", remote.port)),
                                          server_hostname="127.0.0.1"))
        extra = trust.wrap_socket(socket.create_connection(("127.0.0.1", remote.port)),
                                  server_hostname="127.0.0.1")
        with extra:
            extra.settimeout(10)
            answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503")
        assert b'"too_many_connections_from_peer"' in answer
    finally:
        for sock in held:
            sock.close()


def test_the_unix_socket_needs_no_token(remote: Remote) -> None:
    with remote.daemon.client() as client:
        assert client.pools()


def test_no_token_is_ever_logged(remote: Remote) -> None:
    with remote.client(remote.tokens["limited"]) as client:
        client.run("print(1)")
    log = remote.daemon.log_path.read_text()
    for name, token in remote.tokens.items():
        assert token not in log
        assert hashlib.sha256(token.encode()).hexdigest() not in log
        assert f'"token": "{name}"' in log  # its name is, on its requests' lines


def test_the_daemon_refuses_a_certificate_that_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    config = CONFIG.format(port=free_port(), cert=tmp_path / "cert.pem",
                           key=tmp_path / "key.pem", tokens_file=tmp_path / "tokens.toml",
                           full="0" * 64).replace('tokens_file = ', '# tokens_file = ')
    daemon = launch_daemon(tmp_path, config)
    try:
        assert daemon.process.wait(timeout=60) == 1
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
    lines = daemon.log_path.read_text().splitlines()
    assert any(line.startswith(f"sandpool: cannot load server.tls_cert {tmp_path}/cert.pem with "
                           f"server.tls_key {tmp_path}/key.pem: ") for line in lines), lines
    assert not (tmp_path / "sandpool.sock").exists()


def test_token_new_prints_the_token_once_and_its_hash(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "api.cli", "token", "new", "ci"],
                          capture_output=True, text=True, timeout=30, cwd=REPOSITORY)
    assert done.returncode == 0, done.stderr
    token = done.stderr.strip()
    assert len(token) > 40
    assert token not in done.stdout
    # What stdout holds goes into a config file as it is.
    document = tomllib.loads("[server]\n" + done.stdout)
    parsed = parse_config({**document, "pools": {"python": {"backend": "fake"}}})
    assert parsed.server.tokens == (TokenConfig("ci", token_sha256(token)),)


def test_a_session_belongs_to_its_token(remote: Remote, document: dict[str, Any]) -> None:
    """On the TCP listener a session's owner is its token: another token gets what an
    unknown id gets, and a token may hold sessions only in its pools."""
    full = {"Authorization": f"Bearer {remote.tokens['full']}"}
    limited = {"Authorization": f"Bearer {remote.tokens['limited']}"}
    with remote.raw() as http:
        created = http.post("/v1/sessions", json={"pool": "python"}, headers=full)
        assert created.status_code == 201, created.text
        session = created.json()["session_id"]
        try:
            ran = http.post(f"/v1/sessions/{session}/run", json={"code": "x = 5"}, headers=full)
            assert ran.status_code == 200, ran.text
            template = "/v1/sessions/{session_id}"
            for method, path in (("get", f"/v1/sessions/{session}"),
                                 ("delete", f"/v1/sessions/{session}"),
                                 ("post", f"/v1/sessions/{session}/run")):
                answer = http.request(method.upper(), path, json={"code": "print(x)"}
                                      if method == "post" else None, headers=limited)
                check_error(document, answer, 404, "session_not_found",
                            template + ("/run" if method == "post" else ""), method)
            assert http.get("/v1/sessions", headers=limited).json() == {"sessions": []}
            answer = http.post(f"/v1/sessions/{session}/run", json={"code": "print(x)"},
                               headers=full)
            assert answer.json()["stdout"] == "5\n"
            check_error(document, http.post("/v1/sessions", json={"pool": "other"},
                                            headers=limited),
                        403, "pool_forbidden", "/v1/sessions")
        finally:
            http.delete(f"/v1/sessions/{session}", headers=full)
