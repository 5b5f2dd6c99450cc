"""SAV tokens: short, signed names of one challenge, safe in a local part and a URL.

A token is 30 bytes in lower-case base32 without padding (48 characters of
``a-z2-7``): a version byte, a 9-byte random nonce, the expiry (Unix
seconds, 4 bytes, big-endian) and the first 16 bytes of an HMAC-SHA256
over the version, tenant, user, sender, held message's queue id, expiry
and nonce, each length-prefixed so no two field lists encode alike. The
token carries only what is needed to find its challenge (the nonce) and to
check it (expiry, MAC); the other fields are the challenge row's, so a MAC
that verifies proves the row is the one the token was made for. ``sav+`` and
48 characters make a 52-octet local part, under RFC 5321's 64.

The key is 32 random bytes in ``<data_dir>/sav.key``, created 0600 at first
use, atomically (two processes starting at once agree on one key).
Removing it invalidates every outstanding challenge, nothing more.

Trusts nothing in a token: its length, alphabet and version are checked
before anything is decoded, and the MAC is compared in constant time
(`hmac.compare_digest`). Standards: RFC 4648 §6 (base32), RFC 2104 (HMAC),
RFC 5321 §4.5.3.1.1 (local-part length), RFC 5233 (``+`` sub-addresses).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from kithmail.dkimkeys import create_file

__all__ = [
    "KEY_FILE",
    "LOCAL_PART",
    "TOKEN_LENGTH",
    "Decoded",
    "SavKeyError",
    "TokenData",
    "decode",
    "load_key",
    "mac",
    "make_token",
    "new_nonce",
    "parse_reply_address",
    "reply_address",
]

KEY_FILE: Final = "sav.key"
KEY_SIZE: Final = 32
VERSION: Final = 1
NONCE_SIZE: Final = 9
MAC_SIZE: Final = 16
_RAW_SIZE: Final = 1 + NONCE_SIZE + 4 + MAC_SIZE  # 30: a multiple of 5, so no padding
TOKEN_LENGTH: Final = _RAW_SIZE * 8 // 5  # 48
LOCAL_PART: Final = "sav"
_TOKEN = re.compile(rf"[a-z2-7]{{{TOKEN_LENGTH}}}")
_DOMAIN_SEP = b"kithmail-sav-token\0"


class SavKeyError(Exception):
    """The token key cannot be read or made; the message says what to do."""


@dataclass(frozen=True, slots=True)
class TokenData:
    """What a valid token names: whose challenge, to whom, about which held message."""

    tenant: str
    user: str  # the local recipient, folded
    sender: str  # the challenged envelope sender, folded
    queue_id: str  # the held message
    expires: int  # Unix seconds
    nonce: str  # hex; the challenge row's key


@dataclass(frozen=True, slots=True)
class Decoded:
    """A token taken apart, not yet checked against its row."""

    nonce: str  # hex
    expires: int
    mac: bytes


def load_key(data_dir: Path) -> bytes:
    """The HMAC key of ``<data_dir>/sav.key``, made (0600, atomically) when missing."""
    path = Path(data_dir) / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        try:
            create_file(path, secrets.token_bytes(KEY_SIZE))
            key = path.read_bytes()  # ours, or the one another process made first
        except OSError as e:
            raise SavKeyError(f"{path}: cannot create the SAV key: {e.strerror or e}") from None
    except OSError as e:
        raise SavKeyError(f"{path}: cannot read the SAV key: {e.strerror or e}") from None
    if len(key) != KEY_SIZE:
        raise SavKeyError(
            f"{path} holds {len(key)} bytes, not {KEY_SIZE}: remove it and a new key is made "
            "(outstanding challenges then stop working)"
        )
    return key


def new_nonce() -> str:
    """A fresh random nonce, as hex."""
    return secrets.token_hex(NONCE_SIZE)


def _field(value: str) -> bytes:
    b = value.encode("utf-8")
    if len(b) > 0xFFFF:
        raise ValueError("a token field is at most 65535 octets")
    return len(b).to_bytes(2, "big") + b


def mac(
    key: bytes, tenant: str, user: str, sender: str, queue_id: str, expires: int, nonce: str
) -> bytes:
    """The token's MAC over every field it binds (16 bytes)."""
    msg = b"".join(
        (
            _DOMAIN_SEP,
            bytes((VERSION,)),
            _field(tenant),
            _field(user),
            _field(sender),
            _field(queue_id),
            expires.to_bytes(4, "big"),
            bytes.fromhex(nonce),
        )
    )
    return hmac.new(key, msg, hashlib.sha256).digest()[:MAC_SIZE]


def make_token(
    key: bytes, tenant: str, user: str, sender: str, queue_id: str, expires: int, nonce: str
) -> str:
    """The token binding these fields: 48 characters of lower-case base32."""
    if not 0 < expires < 1 << 32:
        raise ValueError(f"expiry {expires} does not fit the token")
    raw = bytes.fromhex(nonce)
    if len(raw) != NONCE_SIZE:
        raise ValueError(f"a nonce is {NONCE_SIZE} bytes")
    packed = (
        bytes((VERSION,))
        + raw
        + expires.to_bytes(4, "big")
        + mac(key, tenant, user, sender, queue_id, expires, nonce)
    )
    return base64.b32encode(packed).decode("ascii").lower()


def decode(token: str) -> Decoded | None:
    """A token's parts; None for anything that is not a token of this version."""
    if not isinstance(token, str):
        return None
    t = token.lower()  # a mail system may change the case of a local part
    if not _TOKEN.fullmatch(t):
        return None
    try:
        raw = base64.b32decode(t.upper())
    except (binascii.Error, ValueError):
        return None
    if len(raw) != _RAW_SIZE or raw[0] != VERSION:
        return None
    nonce = raw[1 : 1 + NONCE_SIZE].hex()
    expires = int.from_bytes(raw[1 + NONCE_SIZE : 5 + NONCE_SIZE], "big")
    return Decoded(nonce, expires, raw[5 + NONCE_SIZE :])


def reply_address(token: str, domain: str) -> str:
    """``sav+<token>@<domain>``: where a reply to the challenge goes."""
    return f"{LOCAL_PART}+{token}@{domain}"


def parse_reply_address(address: str) -> str | None:
    """The token of a ``sav+<token>@domain`` address (any case); None for any other address.

    Only the shape is checked here: whether the token is valid is the
    challenge table's to say (`Sav.check`).
    """
    if not isinstance(address, str) or address.count("@") != 1:
        return None
    local, _, domain = address.partition("@")
    base, plus, token = local.partition("+")
    if not plus or base.lower() != LOCAL_PART or not domain:
        return None
    token = token.lower()
    return token if _TOKEN.fullmatch(token) else None
