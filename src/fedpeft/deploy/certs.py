"""TLS material for a deployment: a private CA and a SuperLink server certificate.

``flower-superlink`` serves its Fleet, Control and Runtime APIs over one HTTPS port and
needs ``--ssl-ca-certfile``, ``--ssl-certfile`` and ``--ssl-keyfile``; SuperNodes and
``flwr`` verify the server with the CA certificate (``--root-certificates`` /
``root-certificates`` in ``$FLWR_HOME/config.toml``). The server certificate lists every
host name and IP address clients use to reach the SuperLink as SubjectAltNames (TLS
clients check SANs, not the common name); ``localhost`` and ``127.0.0.1`` are always
included so the SuperLink's own ServerApp process and local tools can connect.

Everything is generated with the ``cryptography`` library (no ``openssl`` shell-outs).
Private keys are written with mode 0600 and never overwritten unless ``force`` is set.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertFiles", "DeployError", "make_certs", "split_hosts", "write_private", "write_public"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
VALID_DAYS = 365


class DeployError(ValueError):
    """Bad input for a deploy helper; the message is one line for the user (CLI exit 2)."""


@dataclass(frozen=True)
class CertFiles:
    """Paths of the files :func:`make_certs` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]


def write_private(path: Path, data: bytes, force: bool) -> None:
    """Write a secret file created with mode 0600 (never world-readable, not even briefly)."""
    if path.exists() and not force:
        raise DeployError(f"{path} exists; refusing to overwrite a key (pass --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # in case the umask or an ACL widened it


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (certificate, public key) with mode 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def split_hosts(hosts: list[str] | tuple[str, ...]) -> tuple[list[x509.GeneralName], tuple[str, ...]]:
    """SubjectAltNames for ``hosts`` plus the defaults (IP addresses as IP SANs, others as DNS)."""
    names: list[str] = []
    for host in [*DEFAULT_HOSTS, *hosts]:
        host = host.strip().strip("[]")  # accept "[::1]" as written in host:port form
        if not host:
            raise DeployError("empty --host; pass a host name or an IP address")
        if any(c.isspace() for c in host) or "/" in host:
            raise DeployError(f"invalid --host {host!r}: a host name or an IP address, without port or scheme")
        if host not in names:
            names.append(host)
    sans: list[x509.GeneralName] = []
    for host in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans, tuple(names)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certs(out_dir: Path, hosts: list[str] | tuple[str, ...] = (), force: bool = False,
               days: int = VALID_DAYS) -> CertFiles:
    """Create ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` (signed by the CA) in ``out_dir``.

    Keys are ECDSA P-384. The CA is a path-length-0 CA that can sign certificates only;
    the server certificate is for TLS server authentication with ``hosts`` (plus
    localhost and 127.0.0.1) as SubjectAltNames. Raises :class:`DeployError` if a key
    exists and ``force`` is false (nothing is written then).
    """
    if days < 1:
        raise DeployError(f"invalid --days {days}: must be >= 1")
    out = Path(out_dir)
    files = CertFiles(out / "ca.crt", out / "ca.key", out / "server.crt", out / "server.key", ())
    if not force:
        for existing in (files.ca_key, files.server_key):
            if existing.exists():
                raise DeployError(f"{existing} exists; refusing to overwrite a key (pass --force to replace it)")
    sans, names = split_hosts(hosts)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, names[-1] if hosts else "localhost")]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    write_private(files.ca_key, _pem_key(ca_key), force)
    write_private(files.server_key, _pem_key(server_key), force)
    write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_public(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return CertFiles(files.ca_cert, files.ca_key, files.server_cert, files.server_key, names)
