"""STARTTLS certificates and the server context: real files, real handshakes.

A server built on `kithmail.tls.server_context` listens on loopback (a
port of its own per test) and a stdlib `ssl` client completes, or fails, a
real TLS handshake with it.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kithmail import config
from kithmail.tls import TlsError, ensure_certificate, server_context

HOST = "mx.example.test"


def settings(data_dir: Path, **server: Any) -> config.Settings:
    return config.from_mapping(
        {"server": {"data_dir": str(data_dir), "hostname": HOST, **server}}, "<test>"
    )


def client_context(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client as most MTAs are: encrypts, does not verify the certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    server_errors: list[Exception] | None = None,
) -> tuple[str, bytes]:
    """One connection over loopback: the TLS version agreed and the certificate presented.

    The server accepts in a thread of its own; a failed handshake raises the
    client's error (ssl.SSLError), and the server's own is appended to
    ``server_errors``.
    """
    errors = server_errors if server_errors is not None else []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(100))
            except (ssl.SSLError, OSError) as e:
                errors.append(e)
            finally:
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            return client(port, client_ctx)
        finally:
            thread.join(timeout=30)


def client(port: int, ctx: ssl.SSLContext) -> tuple[str, bytes]:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname=HOST) as tls,
    ):
        tls.sendall(b"EHLO client.test\r\n")
        assert tls.recv(100) == b"EHLO client.test\r\n"
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return str(tls.version()), der


def der_of(cert_path: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "var"


# --- the self-signed certificate -------------------------------------------------------------


def test_ensure_certificate_makes_a_private_key_and_a_named_certificate(data_dir: Path) -> None:
    cert_path, key_path = ensure_certificate(data_dir, HOST)
    assert (cert_path, key_path) == (data_dir / "tls" / "cert.pem", data_dir / "tls" / "key.pem")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((data_dir / "tls").stat().st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=700) < lifetime < datetime.timedelta(days=740)
    assert cert.not_valid_before_utc < datetime.datetime.now(datetime.UTC)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == cert.public_key()
    # Nothing half-written is left beside them.
    assert sorted(p.name for p in (data_dir / "tls").iterdir()) == [".lock", "cert.pem", "key.pem"]


def test_ensure_certificate_keeps_a_good_one(data_dir: Path) -> None:
    cert_path, key_path = ensure_certificate(data_dir, HOST)
    cert, key = cert_path.read_bytes(), key_path.read_bytes()
    assert ensure_certificate(data_dir, HOST.upper()) == (cert_path, key_path)
    assert (cert_path.read_bytes(), key_path.read_bytes()) == (cert, key)


def test_ensure_certificate_renews_for_another_hostname_or_a_lost_key(data_dir: Path) -> None:
    cert_path, key_path = ensure_certificate(data_dir, HOST)
    first = cert_path.read_bytes()
    ensure_certificate(data_dir, "mail.example.test")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.example.test"]
    second = cert_path.read_bytes()
    assert second != first
    key_path.unlink()
    ensure_certificate(data_dir, "mail.example.test")
    assert cert_path.read_bytes() != second
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == x509.load_pem_x509_certificate(cert_path.read_bytes()).public_key()


def test_ensure_certificate_renews_one_about_to_expire(data_dir: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, HOST)])
    old = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=700))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    tls_dir = data_dir / "tls"
    tls_dir.mkdir(parents=True)
    (tls_dir / "cert.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    (tls_dir / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path, _ = ensure_certificate(data_dir, HOST)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.not_valid_after_utc - now > datetime.timedelta(days=700)


def test_ensure_certificate_for_an_ip_address_and_a_unicode_name(tmp_path: Path) -> None:
    cert_path, _ = ensure_certificate(tmp_path / "a", "192.0.2.25")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.25"]
    cert_path, _ = ensure_certificate(tmp_path / "b", "mx.bücher.test")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.xn--bcher-kva.test"]
    with pytest.raises(TlsError, match="hostname"):
        ensure_certificate(tmp_path / "c", "bad..name")


ENSURE = """
import sys, time, hashlib
from pathlib import Path
from kithmail.tls import ensure_certificate
data_dir, go = Path(sys.argv[1]), Path(sys.argv[2])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
cert, key = ensure_certificate(data_dir, "mx.example.test")
print(hashlib.sha256(cert.read_bytes()).hexdigest(), flush=True)
"""


def test_processes_starting_at_once_share_one_matching_pair(tmp_path: Path, data_dir: Path) -> None:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE, str(data_dir), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline() == "ready\n"
        go.touch()
        results = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in results]
    assert len({out for out, _ in results}) == 1  # every process got the same certificate
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(data_dir / "tls" / "cert.pem", data_dir / "tls" / "key.pem")


# --- the server context ----------------------------------------------------------------------


def test_handshake_with_the_self_signed_certificate(data_dir: Path) -> None:
    ctx = server_context(settings(data_dir))
    version, der = handshake(ctx, client_context())
    assert version == "TLSv1.3"
    assert der == der_of(data_dir / "tls" / "cert.pem")
    assert ctx.verify_mode == ssl.CERT_NONE


def test_min_version_12_serves_a_12_only_client(data_dir: Path) -> None:
    ctx = server_context(settings(data_dir, tls_min_version="1.2"))
    version, _ = handshake(ctx, client_context(maximum=ssl.TLSVersion.TLSv1_2))
    assert version == "TLSv1.2"


def test_min_version_13_refuses_a_12_only_client(data_dir: Path) -> None:
    ctx = server_context(settings(data_dir, tls_min_version="1.3"))
    server_errors: list[Exception] = []
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        handshake(ctx, client_context(maximum=ssl.TLSVersion.TLSv1_2), server_errors)
    assert [type(e) for e in server_errors] == [ssl.SSLError]
    assert "UNSUPPORTED_PROTOCOL" in str(server_errors[0])
    version, _ = handshake(ctx, client_context())
    assert version == "TLSv1.3"


def test_configured_certificate_is_served(tmp_path: Path, data_dir: Path) -> None:
    cert, key = ensure_certificate(tmp_path / "elsewhere", "mail.example.test")
    ctx = server_context(settings(data_dir, tls_cert=str(cert), tls_key=str(key)))
    _, der = handshake(ctx, client_context())
    assert der == der_of(cert)
    assert not (data_dir / "tls").exists()  # nothing self-signed was made


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return ensure_certificate(tmp_path / "good", HOST)


def test_missing_files_are_named(tmp_path: Path, data_dir: Path, pair: tuple[Path, Path]) -> None:
    cert, key = pair
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsError, match=rf"^{missing}: cannot read the TLS certificate"):
        server_context(settings(data_dir, tls_cert=str(missing), tls_key=str(key)))
    with pytest.raises(TlsError, match=rf"^{missing}: cannot read the TLS key"):
        server_context(settings(data_dir, tls_cert=str(cert), tls_key=str(missing)))


def test_garbage_files_are_named(tmp_path: Path, data_dir: Path, pair: tuple[Path, Path]) -> None:
    cert, key = pair
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(TlsError, match=rf"^{junk}: not a PEM certificate$"):
        server_context(settings(data_dir, tls_cert=str(junk), tls_key=str(key)))
    with pytest.raises(TlsError, match=rf"^{junk}: not a PEM private key$"):
        server_context(settings(data_dir, tls_cert=str(cert), tls_key=str(junk)))
    # The certificate where the key belongs, and the other way round.
    with pytest.raises(TlsError, match=rf"^{cert}: not a PEM private key$"):
        server_context(settings(data_dir, tls_cert=str(cert), tls_key=str(cert)))
    with pytest.raises(TlsError, match=rf"^{key}: not a PEM certificate$"):
        server_context(settings(data_dir, tls_cert=str(key), tls_key=str(key)))


def test_a_key_of_another_certificate_is_named(
    tmp_path: Path, data_dir: Path, pair: tuple[Path, Path]
) -> None:
    cert, _ = pair
    _, other_key = ensure_certificate(tmp_path / "other", HOST)
    with pytest.raises(TlsError, match=rf"^{other_key}: does not match the certificate {cert}"):
        server_context(settings(data_dir, tls_cert=str(cert), tls_key=str(other_key)))


def test_an_encrypted_key_is_named(tmp_path: Path, data_dir: Path, pair: tuple[Path, Path]) -> None:
    cert, key = pair
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    locked = tmp_path / "locked.pem"
    locked.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TlsError, match=rf"^{locked}: the key is encrypted"):
        server_context(settings(data_dir, tls_cert=str(cert), tls_key=str(locked)))


def test_tls_error_is_a_value_error() -> None:
    assert issubclass(TlsError, ValueError)
