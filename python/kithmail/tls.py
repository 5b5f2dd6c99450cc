"""STARTTLS: the server's certificate and its `ssl.SSLContext`.

With ``[server] tls_cert``/``tls_key`` set, those files serve; without, a
self-signed certificate is made once under ``<data_dir>/tls/`` (ECDSA
P-256, the hostname as its subject alternative name, valid two years) and
made again when it is within 30 days of expiry or names another host.
Sending MTAs rarely verify an MX's certificate (RFC 7435, opportunistic
TLS), so a self-signed one still encrypts; give a real one for MTA-STS or
DANE.

Trusts the operator's files only as far as they parse: an unreadable,
malformed or encrypted certificate or key, or a key that does not match
the certificate, is a `TlsError` naming the file. Clients are not asked for
certificates. Several processes may start at once: the key and
certificate are written under an exclusive lock, each to a temporary
file, fsync'd and renamed into place, so none sees a torn or mismatched
pair.

Standards: RFC 3207 (STARTTLS), RFC 8446 and 5246 (TLS 1.3 and 1.2),
RFC 5280 (X.509), RFC 7435 (opportunistic security).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from kithmail.config import Settings

__all__ = ["TlsError", "ensure_certificate", "server_context"]

VALIDITY: Final = datetime.timedelta(days=730)
RENEW_BEFORE: Final = datetime.timedelta(days=30)
# Backdated a little, so that a peer whose clock is behind ours accepts it.
BACKDATE: Final = datetime.timedelta(hours=1)
MIN_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(ValueError):
    """A certificate or key that cannot serve; the message names the file."""


def ensure_certificate(data_dir: Path, hostname: str) -> tuple[Path, Path]:
    """``<data_dir>/tls/cert.pem`` and ``key.pem``, made (self-signed) when missing or stale.

    Stale: it expires within 30 days, or it does not name ``hostname``.
    """
    tls_dir = Path(data_dir) / "tls"
    cert_path, key_path = tls_dir / "cert.pem", tls_dir / "key.pem"
    name = _san_name(hostname)
    if _usable(cert_path, key_path, name):
        return cert_path, key_path
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _locked(tls_dir / ".lock"):
        # Again, under the lock: another process may have made it meanwhile.
        if not _usable(cert_path, key_path, name):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _self_signed(key, name)
            # The key first: a crash between the two leaves no certificate,
            # so the next start makes both again rather than pairing them wrong.
            _write_atomically(
                key_path,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                mode=0o600,
            )
            _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert_path, key_path


def server_context(settings: Settings) -> ssl.SSLContext:
    """The SSLContext STARTTLS serves with, from ``[server]``.

    ``tls_cert``/``tls_key`` when set, else `ensure_certificate`. Offers TLS
    from ``tls_min_version`` up, Python's default ciphers (forward-secret
    AEAD suites only), no client certificates.
    """
    server = settings.server
    if server.tls_cert is not None and server.tls_key is not None:
        cert_path, key_path = server.tls_cert, server.tls_key
    else:
        cert_path, key_path = ensure_certificate(server.data_dir, server.hostname)
    _check_certificate(cert_path)
    _check_key(key_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSIONS[server.tls_min_version]
    ctx.verify_mode = ssl.CERT_NONE
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as e:
        raise TlsError(
            f"{key_path}: does not match the certificate {cert_path} ({e.reason or e})"
        ) from None
    except OSError as e:
        raise TlsError(f"{cert_path}: cannot read: {e.strerror or e}") from None
    return ctx


# --- checking ------------------------------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"{path}: cannot read the TLS {what}: {e.strerror or e}") from None


def _check_certificate(path: Path) -> x509.Certificate:
    data = _read(path, "certificate")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsError(f"{path}: not a PEM certificate") from None
    return chain[0]


def _check_key(path: Path) -> None:
    data = _read(path, "key")
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsError(f"{path}: the key is encrypted; give it unencrypted (mode 0600)") from None
    except ValueError:
        raise TlsError(f"{path}: not a PEM private key") from None
    except UnsupportedAlgorithm as e:
        raise TlsError(f"{path}: unusable private key: {e}") from None


def _usable(cert_path: Path, key_path: Path, name: x509.GeneralName) -> bool:
    """Whether our own certificate is there, parses, names ``name`` and has a month left."""
    if not key_path.exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    now = datetime.datetime.now(datetime.UTC)
    return name in san and cert.not_valid_after_utc - now > RENEW_BEFORE


# --- making ----------------------------------------------------------------------------------


def _san_name(hostname: str) -> x509.GeneralName:
    """The hostname as a subjectAltName: an IP address, or a DNS name in A-labels."""
    try:
        return x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        pass
    try:
        return x509.DNSName(hostname.rstrip(".").encode("idna").decode("ascii").lower())
    except UnicodeError:
        raise TlsError(
            f"[server] hostname {hostname!r} is not a host name a certificate can carry"
        ) from None


def _self_signed(key: ec.EllipticCurvePrivateKey, name: x509.GeneralName) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    common_name = str(name.value)[:64]  # the CN is limited to 64 characters (RFC 5280)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([name]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (flock), released when the block ends."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``path`` as temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
