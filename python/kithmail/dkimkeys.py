"""DKIM signing keys of our own domains: made by `kith dkim keygen`, used to sign what we send.

`keygen` makes an RSA 2048 key for one (domain, selector), writes it as
``<data_dir>/dkim/<domain>.<selector>.pem`` (PKCS#1 PEM, mode 0600, created
atomically and never overwritten: a new key takes a new selector, so mail
signed with the old one still verifies while its record is published), and
returns the DNS TXT record to publish. `signer_for` gives a function that
DKIM-signs a message as that domain, or hands it back unchanged — and says
so in the log — when the domain has no key yet.

Trusts: its own key files (written by `keygen`, read back from our own
data directory); the domain and selector only after checking them, so that
neither can name a file outside ``dkim/``. Signs only messages we composed.

Standards: RFC 6376 (DKIM: §3.6.1 the key record, §3.4.2 relaxed header and
body canonicalisation, §5.4 which fields to sign), RFC 8301 (rsa-sha256,
keys of at least 1024 bits; we make 2048), RFC 1035 §3.3.14 (TXT
character-strings of at most 255 octets), RFC 5322.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Final

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

__all__ = [
    "DEFAULT_SELECTOR",
    "DkimKeyError",
    "Signer",
    "create_file",
    "key_path",
    "keygen",
    "record_strings",
    "signer_for",
    "unsigned",
]

log = logging.getLogger("kithmail.dkim")

Signer = Callable[[bytes], bytes]

DEFAULT_SELECTOR: Final = "kithmail"
KEY_BITS: Final = 2048
# What a challenge, digest or DSN signs (RFC 6376 §5.4.1: From is required;
# the rest are the fields a reader trusts). A field named here but absent
# from the message is signed as absent, so it cannot be added in transit.
SIGNED_HEADERS: Final = (
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"auto-submitted",
    b"reply-to",
    b"in-reply-to",
    b"mime-version",
    b"content-type",
)

# One DNS label (RFC 1035 §2.3.1, with '_' as underscore names use it).
# RFC 6376 §3.1 allows a selector of several labels; ours are one, so that
# "<domain>.<selector>.pem" names one pair only ("example.test.uk.s1.pem"
# could otherwise be example.test with selector "uk.s1").
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_SELECTOR = re.compile(_LABEL)
_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})+")


class DkimKeyError(Exception):
    """A key cannot be made or read; the message says what to do."""


def _domain(domain: str) -> str:
    try:
        d = domain.strip().rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise DkimKeyError(f"invalid domain {domain!r}") from None
    if not _DOMAIN.fullmatch(d):
        raise DkimKeyError(f"invalid domain {domain!r}")
    return d


def _selector(selector: str) -> str:
    s = selector.strip().lower()
    if len(s) > 63 or not _SELECTOR.fullmatch(s):
        raise DkimKeyError(
            f"invalid selector {selector!r} (one DNS label: letters, digits, '-', '_')"
        )
    return s


def key_path(data_dir: Path, domain: str, selector: str) -> Path:
    """``<data_dir>/dkim/<domain>.<selector>.pem`` for a checked domain and selector."""
    return Path(data_dir) / "dkim" / f"{_domain(domain)}.{_selector(selector)}.pem"


def create_file(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` unless it exists; True when this call made it.

    Atomic and safe against a concurrent creator: the data is written to a
    private temporary name in the same directory, fsync'd, then linked to
    ``path`` (link fails if ``path`` exists, where a rename would replace
    it), and the directory fsync'd. A reader never sees a partial file.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            made = True
        except FileExistsError:
            made = False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return made


def record_strings(value: str, size: int = 255) -> list[str]:
    """A TXT value cut into character-strings of at most ``size`` octets (ASCII only)."""
    if not value.isascii():
        raise ValueError("a DKIM key record is ASCII")
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]


def keygen(data_dir: Path, domain: str, selector: str = DEFAULT_SELECTOR) -> tuple[Path, str]:
    """Make an RSA 2048 key for ``domain`` and ``selector``; (its file, the DNS record to publish).

    The record is one zone-file line, ``S._domainkey.D. IN TXT "v=DKIM1;
    k=rsa; p=…"``, its value split into quoted strings of at most 255
    octets. DkimKeyError when that key exists already (choose another
    selector to rotate) or the names are invalid.
    """
    d = _domain(domain)
    s = _selector(selector)
    path = key_path(data_dir, d, s)
    if path.exists():
        raise DkimKeyError(f"{path} exists already; to rotate, make a key with another --selector")
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,  # PKCS#1, as dkimpy reads it
        serialization.NoEncryption(),
    )
    if not create_file(path, pem):
        raise DkimKeyError(f"{path} was made by someone else meanwhile; it was left alone")
    return path, _record(d, s, key.public_key())


def _record(domain: str, selector: str, public: rsa.RSAPublicKey) -> str:
    # SubjectPublicKeyInfo, as every DKIM verifier reads p= (RFC 6376 §3.6.1).
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    value = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
    strings = " ".join(f'"{s}"' for s in record_strings(value))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


def _keys_of(data_dir: Path, domain: str) -> list[tuple[str, Path]]:
    """(selector, file) of every key of ``domain``, newest file first."""
    folder = Path(data_dir) / "dkim"
    prefix = f"{domain}."
    found: list[tuple[float, str, Path]] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for e in entries:
        name = e.name
        if not (name.startswith(prefix) and name.endswith(".pem")) or not e.is_file():
            continue
        selector = name[len(prefix) : -len(".pem")]
        if not _SELECTOR.fullmatch(selector):  # "example.test.uk.s1.pem" is not ours
            continue
        found.append((e.stat().st_mtime, selector, Path(e.path)))
    found.sort(key=lambda t: (-t[0], t[1]))
    return [(s, p) for _, s, p in found]


def signer_for(data_dir: Path, domain: str, selector: str | None = None) -> Signer:
    """A function signing a message as ``domain`` (relaxed/relaxed, rsa-sha256).

    With ``selector`` that key; without, the newest key file of the domain.
    With no key at all, the function returns each message unchanged (and the
    absence is logged once, here): mail still goes out, unsigned, and an
    operator sees why. The key is read once, now; a message given to the
    function is CRLF-terminated bytes, and it returns the message with its
    DKIM-Signature field first.
    """
    d = _domain(domain)
    if selector is not None:
        s = _selector(selector)
        path = key_path(data_dir, d, s)
        chosen: tuple[str, Path] | None = (s, path) if path.is_file() else None
    else:
        keys = _keys_of(data_dir, d)
        chosen = keys[0] if keys else None
    if chosen is None:
        log.warning(
            "no DKIM key for %s in %s: mail from it goes out unsigned "
            "(make one with `kith dkim keygen %s`)",
            d,
            Path(data_dir) / "dkim",
            d,
        )
        return unsigned
    s, path = chosen
    try:
        private = path.read_bytes()
    except OSError as e:
        raise DkimKeyError(f"{path}: cannot read: {e.strerror or e}") from None
    sel, dom = s.encode("ascii"), d.encode("ascii")

    def sign(message: bytes) -> bytes:
        field = dkim.sign(
            message,
            sel,
            dom,
            private,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=list(SIGNED_HEADERS),
        )
        if not field:
            raise DkimKeyError(f"dkimpy made no signature for {d} with {path}")
        return bytes(field) + message

    return sign


def unsigned(message: bytes) -> bytes:
    """The signer of a domain without a key: the message unchanged."""
    return message
