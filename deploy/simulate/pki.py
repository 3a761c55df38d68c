"""Throw-away TLS material and tokens for daemons run from the daemon's image.

What a Kubernetes Secret would hold, laid out as the image's config reads it:
``tls/tls.crt`` and ``tls/tls.key`` (a server certificate from a private CA
made here, for every name and address given), ``tokens/tokens.toml`` (one
``[[tokens]]`` table per token, SHA-256 only), and beside them ``ca.crt`` and
the tokens themselves for the clients. Files the daemon (uid 65534) reads are
made readable to it; the CA key is never written.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAEMON_UID = 65534
VALID_FOR = datetime.timedelta(days=2)


@dataclass(frozen=True, slots=True)
class Pki:
    """Where the files are, and the client's side of them."""

    directory: Path
    ca_file: Path
    tls_dir: Path  # tls.crt, tls.key: mounted at /etc/sandpool/tls
    tokens_dir: Path  # tokens.toml: mounted at /etc/sandpool/tokens
    tokens: dict[str, str]  # name -> the bearer token itself


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(directory: Path, hosts: list[str], token_names: list[str]) -> Pki:
    """Write a CA, a server certificate for ``hosts`` (DNS names or IP addresses)
    and a tokens file for ``token_names`` under ``directory``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("sandpool simulation CA"))
        .issuer_name(_name("sandpool simulation CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID_FOR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    certificate = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID_FOR)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    tls_dir = directory / "tls"
    tokens_dir = directory / "tokens"
    for sub in (directory, tls_dir, tokens_dir):
        sub.mkdir(parents=True, exist_ok=True)
        sub.chmod(0o755)
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tls_dir / "tls.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tls_dir / "tls.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    tokens = {name: secrets.token_urlsafe(32) for name in token_names}
    (tokens_dir / "tokens.toml").write_text("".join(
        f'[[tokens]]\nname = "{name}"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
        f"max_concurrent = 64\n\n"
        for name, token in tokens.items()))
    # As a Secret volume with fsGroup would: readable by the daemon, no one else.
    for path in (tls_dir / "tls.key", tls_dir / "tls.crt", tokens_dir / "tokens.toml"):
        os.chown(path, DAEMON_UID, DAEMON_UID)
        path.chmod(0o400)
    return Pki(directory, ca_file, tls_dir, tokens_dir, tokens)
