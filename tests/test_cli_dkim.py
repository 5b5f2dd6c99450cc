"""`kith dkim keygen` as a subprocess: the key file, its mode, and the record it prints.

The printed record is parsed back and its key checked against the private
key on disk (same modulus), and a message signed by `signer_for` with that
key verifies against the record as dkimpy reads it.
"""

from __future__ import annotations

import base64
import logging
import re
import stat
import subprocess
import sys
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kithmail.dkimkeys import signer_for

KITH = Path(sys.executable).parent / "kith"


def kith(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KITH), *args], capture_output=True, text=True, timeout=60, check=False
    )


def record_of(out: str) -> tuple[str, list[str]]:
    """(owner name, the TXT strings) of the one record line printed."""
    lines = [line for line in out.splitlines() if not line.startswith(";")]
    assert len(lines) == 1, out
    m = re.fullmatch(r"(\S+) IN TXT ((?:\"[^\"]*\" ?)+)", lines[0])
    assert m, lines[0]
    return m[1], re.findall(r"\"([^\"]*)\"", m[2])


def test_keygen_writes_a_private_key_0600_and_prints_its_record(tmp_path: Path) -> None:
    data = tmp_path / "var"
    done = kith("dkim", "keygen", "Example.TEST", "--data-dir", str(data))
    assert done.returncode == 0, done.stderr
    path = data / "dkim" / "example.test.kithmail.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    name, strings = record_of(done.stdout)
    assert name == "kithmail._domainkey.example.test."
    assert all(len(s) <= 255 for s in strings) and len(strings) >= 2  # 2048 bits need two
    value = "".join(strings)
    tags = dict(t.strip().split("=", 1) for t in value.split(";"))
    assert (tags["v"], tags["k"]) == ("DKIM1", "rsa")
    public = serialization.load_der_public_key(base64.b64decode(tags["p"]))
    private = serialization.load_pem_private_key(path.read_bytes(), None)
    assert isinstance(public, rsa.RSAPublicKey) and isinstance(private, rsa.RSAPrivateKey)
    assert public.key_size == 2048
    assert public.public_numbers() == private.public_key().public_numbers()

    sign = signer_for(data, "example.test")
    msg = b"From: a@example.test\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"
    signed = sign(msg)

    def dnsfunc(qname: bytes | str, timeout: float = 5) -> bytes:
        assert qname in (b"kithmail._domainkey.example.test.", "kithmail._domainkey.example.test.")
        return value.encode()

    assert dkim.verify(signed, dnsfunc=dnsfunc)


def test_keygen_with_a_selector_and_never_over_an_existing_key(tmp_path: Path) -> None:
    data = tmp_path / "var"
    first = kith("dkim", "keygen", "example.test", "--selector", "s2026", "--data-dir", str(data))
    assert first.returncode == 0, first.stderr
    path = data / "dkim" / "example.test.s2026.pem"
    before = path.read_bytes()
    assert record_of(first.stdout)[0] == "s2026._domainkey.example.test."
    again = kith("dkim", "keygen", "example.test", "--selector", "s2026", "--data-dir", str(data))
    assert again.returncode == 1
    assert "exists already" in again.stderr and "--selector" in again.stderr
    assert path.read_bytes() == before


def test_keygen_refuses_names_that_could_leave_the_key_directory(tmp_path: Path) -> None:
    data = tmp_path / "var"
    for args in (
        ("../../etc",),
        ("example.test", "--selector", "../x"),
        ("example.test", "--selector", "a.b"),
        ("exa mple.test",),
    ):
        done = kith("dkim", "keygen", *args, "--data-dir", str(data))
        assert done.returncode == 1, args
        assert "invalid" in done.stderr
    assert not (data / "dkim").exists() or not any((data / "dkim").iterdir())


def test_no_key_means_unsigned_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kithmail.dkim"):
        sign = signer_for(tmp_path, "example.test")
    msg = b"From: a@example.test\r\n\r\nx\r\n"
    assert sign(msg) == msg
    assert "no DKIM key for example.test" in caplog.text
