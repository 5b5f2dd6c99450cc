"""Test zones and signers for DKIM, DMARC and ARC, served by a real dnsmasq.

Keys are made once per test process with `cryptography` (RSA 2048 for the
signers, 1024 for an old one) and published as DKIM key records; messages
are signed and ARC-sealed with dkimpy, exactly as a sending server would.
The zone `slow.test` is forwarded by dnsmasq to a socket that never
answers, so every name in it times out while the rest of the zones answer;
so is `_domainkey.keyslow.test`, whose DMARC record answers.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dns_server import Dnsmasq, SilentServer, _args, _free_port, _wait_ready

ZONES = (
    "bank.test",
    "shop.test",
    "news.test",
    "strict.test",
    "half.test",
    "broken.test",
    "lists.test",
    "relay.test",
    "evil.test",
    "example.test",
    "corp.test",
    "nodmarc.test",
    "keyslow.test",
)
SLOW = "slow.test"  # forwarded to the silent server: every lookup times out
# Only the keys of keyslow.test time out; its DMARC record answers.
SLOW_KEYS = "_domainkey.keyslow.test"


@dataclass(frozen=True)
class Key:
    private_pem: bytes
    public_b64: str

    @property
    def record(self) -> str:
        return f"v=DKIM1; k=rsa; p={self.public_b64}"


@functools.cache
def key(name: str, bits: int = 2048) -> Key:
    """An RSA key pair, made once per name (bits only matter the first time)."""
    k = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = k.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(pem, base64.b64encode(der).decode("ascii"))


def _split(s: str, n: int) -> list[str]:
    return [s[i : i + n] for i in range(0, len(s), n)]


def records() -> list[tuple[str, str | Sequence[str]]]:
    """Every TXT record of the test zones."""
    bank = key("bank")
    # The same key published twice: once as one long string that dnsmasq
    # splits into 255-byte strings itself, once split by us at 100 bytes
    # (as a zone file would), so both joins are exercised.
    split = ["v=DKIM1; k=rsa; p=" + bank.public_b64[:100], *_split(bank.public_b64[100:], 100)]
    return [
        ("k1._domainkey.bank.test", bank.record),
        ("k2._domainkey.bank.test", split),
        ("old._domainkey.bank.test", "v=DKIM1; k=rsa; p="),  # revoked
        ("bad._domainkey.bank.test", "v=DKIM1; k=rsa; p=AAAAB3NzaC1yc2E"),  # not a key
        ("k1._domainkey.mail.bank.test", key("mail.bank").record),
        ("k1._domainkey.strict.test", key("strict").record),
        ("k1._domainkey.mail.strict.test", key("mail.strict").record),
        ("k1._domainkey.shop.test", key("shop").record),
        ("k1._domainkey.evil.test", key("evil").record),
        ("k1._domainkey.example.test", key("example").record),
        ("arc._domainkey.lists.test", key("lists").record),
        ("arc._domainkey.relay.test", key("relay").record),
        ("_dmarc.bank.test", "v=DMARC1; p=reject; rua=mailto:d@bank.test"),
        ("_dmarc.shop.test", "v=DMARC1; p=quarantine; sp=none"),
        ("_dmarc.news.test", "v=DMARC1; p=none"),
        ("_dmarc.strict.test", "v=DMARC1; p=reject; adkim=s; aspf=s"),
        ("_dmarc.half.test", "v=DMARC1; p=reject; pct=50"),
        ("_dmarc.broken.test", "v=DMARC1; p=bogus"),
        ("_dmarc.corp.test", "v=DMARC1; p=none"),
        ("_dmarc.keyslow.test", "v=DMARC1; p=reject"),
        ("_dmarc.evil.test", "v=spf1 -all"),  # not a DMARC record: ignored
    ]


@contextlib.contextmanager
def auth_dns(tmp_path: Path, silent: SilentServer) -> Iterator[Dnsmasq]:
    """dnsmasq serving `records()`, forwarding `slow.test` to `silent`."""
    silent_port = silent.sock.getsockname()[1]
    proc: subprocess.Popen[bytes] | None = None
    for attempt in range(3):
        port = _free_port()
        log = tmp_path / f"auth-dnsmasq-{attempt}.log"
        args = _args(port, log, ZONES, (), (), records(), ())
        args.append(f"--server=/{SLOW}/127.0.0.1#{silent_port}")
        args.append(f"--server=/{SLOW_KEYS}/127.0.0.1#{silent_port}")
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _wait_ready(proc, port, ZONES[0])
        except RuntimeError:
            if attempt == 2:
                raise
            continue
        server = Dnsmasq(port, log, proc)
        try:
            yield server
        finally:
            server.stop()
            if proc.stderr is not None:
                proc.stderr.close()
        return


# ---------------------------------------------------------------- messages


def message(
    *,
    from_: str | Sequence[str] = "Ann <ann@bank.test>",
    subject: str = "Quarterly figures",
    message_id: str = "<m1@bank.test>",
    extra: Sequence[str] = (),
    body: str = "Hello,\r\n\r\nthe figures are attached.\r\n",
) -> bytes:
    """A plain message, CRLF line ends; `from_` a sequence gives several From fields."""
    froms = [from_] if isinstance(from_, str) else list(from_)
    head = [f"From: {f}" for f in froms]
    head += ["To: bob@example.test", f"Subject: {subject}", "Date: Mon, 5 Oct 2026 10:00:00 +0000"]
    if message_id:
        head.append(f"Message-ID: {message_id}")
    head += list(extra)
    return ("\r\n".join(head) + "\r\n\r\n" + body).encode()


def sign(msg: bytes, domain: str, selector: str = "k1", *, signer: str | None = None) -> bytes:
    """`msg` with a DKIM-Signature by `domain` prepended (key `signer`, default the domain)."""
    k = key(signer or domain.removesuffix(".test"))
    sig = dkimpy.sign(
        msg,
        selector.encode(),
        domain.encode(),
        k.private_pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return bytes(sig) + msg


def arc_seal(msg: bytes, sealer: str, ar: str) -> bytes:
    """`msg` ARC-sealed by `sealer` (selector `arc`), its own verdict given as `ar`."""
    with_ar = f"Authentication-Results: {sealer}; {ar}\r\n".encode() + msg
    k = key(sealer.removesuffix(".test"))
    headers = dkimpy.arc_sign(
        with_ar,
        b"arc",
        sealer.encode(),
        k.private_pem,
        sealer.encode(),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    assert headers, "dkimpy made no ARC set"
    return b"".join(headers) + with_ar
