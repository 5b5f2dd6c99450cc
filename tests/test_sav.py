"""SAV: tokens, the no-backscatter rules, the challenge message, and verification by reply.

Against a real SQLite database (`kithmail.db`), a real spool, and for the
DKIM signature a real dnsmasq serving the key record `kith dkim keygen`
printed. The clock is the tests' own. Every refusal is asserted by its
reason and by the `suppressed` row it leaves; every challenge by what is in
the spool (envelope and bytes), read back the way a receiver would.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import hmac
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from types import FrameType
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from dns_server import Dnsmasq, StartDnsmasq

from kithmail import config
from kithmail.db import Database
from kithmail.dkimkeys import keygen
from kithmail.layers.spoofing.results import AuthResults, DkimResult, SpfResult
from kithmail.sav import Sav, TokenData, header_fields, parse_reply_address, reply_address
from kithmail.sav.tokens import TOKEN_LENGTH, SavKeyError, load_key
from kithmail.spool import Outcome, QueueId, Spool, SpoolFullError

USER = "ann@example.test"
SENDER = "bob@example.org"
HELD = "0000000000000000001"
T0 = 1_800_000_000.0
HELD_MSG = (
    b"From: Bob Example <bob@example.org>\r\n"
    b"To: ann@example.test\r\n"
    b"Subject: Lunch on Friday?\r\n"
    b"Message-ID: <m1@example.org>\r\n"
    b"\r\n"
    b"THE SECRET BODY LINE that must never be quoted\r\n"
)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    sav: Sav
    db: Database
    spool: Spool
    clock: Clock
    settings: config.Settings
    data_dir: Path


def make_env(tmp_path: Path, **community: Any) -> Env:
    data_dir = tmp_path / "var"
    settings = config.from_mapping(
        {
            "server": {
                "hostname": "mx.example.test",
                "data_dir": str(data_dir),
                "public_url": "https://mail.example.test/",
            },
            "domains": {"local": ["example.test", "example.net"]},
            "community": community,
        }
    )
    clock = Clock()
    db = Database.open(data_dir / "kithmail.db", clock=clock)
    db.sync_domains(settings.domains.local)
    return Env(
        Sav(db, settings, clock=clock), db, Spool(data_dir / "spool"), clock, settings, data_dir
    )


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = make_env(tmp_path)
    yield e
    e.db.close()


def spf_pass(domain: str = "example.org") -> AuthResults:
    return AuthResults(spf_mailfrom=SpfResult("mailfrom", domain, "pass", client_ip="192.0.2.1"))


def dkim_pass(domain: str) -> AuthResults:
    return AuthResults(
        spf_mailfrom=SpfResult("mailfrom", "example.org", "none"),
        dkim=[DkimResult("pass", domain, "s1")],
    )


def headers(extra: bytes = b"") -> list[tuple[str, str]]:
    return header_fields(extra + HELD_MSG)


def rows(db: Database) -> list[tuple[object, ...]]:
    return db.read(
        "SELECT tenant, user, sender, domain, queue_id, state, why FROM challenges ORDER BY id"
    )


async def challenge(
    env: Env,
    *,
    user: str = USER,
    sender: str = SENDER,
    auth: AuthResults | None = None,
    hdrs: list[tuple[str, str]] | None = None,
    queue_id: str = HELD,
) -> tuple[QueueId | None, str]:
    return await env.sav.challenge(
        env.spool,
        tenant="default",
        user=user,
        sender=sender,
        queue_id=queue_id,
        headers=headers() if hdrs is None else hdrs,
        auth=spf_pass() if auth is None else auth,
    )


def sent_challenge(env: Env, queue_id: QueueId) -> tuple[bytes, EmailMessage, str]:
    """(raw bytes, parsed message, token) of a spooled challenge."""
    msg = env.spool.load_sync(queue_id)
    raw = msg.read_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    token = parse_reply_address(str(parsed["Reply-To"].addresses[0].addr_spec))
    assert token is not None
    return raw, parsed, token


def send_one(env: Env, **kw: Any) -> tuple[QueueId, str]:
    qid, reason = asyncio.run(challenge(env, **kw))
    assert qid is not None, reason
    return qid, sent_challenge(env, qid)[2]


# --- tokens ----------------------------------------------------------------------------------


def test_token_round_trip_and_shape(env: Env) -> None:
    _, token = send_one(env)
    assert len(token) == TOKEN_LENGTH == 48
    assert re.fullmatch(r"[a-z2-7]+", token)
    address = reply_address(token, "example.test")
    assert len(address.partition("@")[0]) <= 64  # RFC 5321 §4.5.3.1.1
    assert parse_reply_address(address) == token
    assert parse_reply_address(address.upper()) == token  # a relay may change the case
    data = env.sav.check_token(token)
    assert data == TokenData(
        tenant="default",
        user=USER,
        sender=SENDER,
        queue_id=HELD,
        expires=int(T0 + env.settings.community.token_ttl),
        nonce=data.nonce if data else "",
    )
    assert [r[5] for r in rows(env.db)] == ["sent"]


@pytest.mark.parametrize(
    "address",
    [
        "ann@example.test",
        "sav@example.test",
        "sav+short@example.test",
        "sav+" + "a" * 47 + "1@x",
        "savx+" + "a" * 48 + "@example.test",
        "sav+" + "a" * 48,
        "sav+" + "a" * 48 + "@a@b",
    ],
)
def test_parse_reply_address_refuses_anything_else(address: str) -> None:
    assert parse_reply_address(address) is None


def _flip(token: str, i: int) -> str:
    c = token[i]
    return token[:i] + ("b" if c != "b" else "c") + token[i + 1 :]


def test_tampered_tokens_are_refused_and_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    _, token = send_one(env)
    assert env.sav.check(_flip(token, 47)) == "sav.token_forged"  # the MAC
    assert env.sav.check(_flip(token, 24)) == "sav.token_forged"  # the expiry
    assert env.sav.check(_flip(token, 5)) == "sav.token_unknown"  # the nonce: no such row
    assert env.sav.check(_flip(token, 0)) == "sav.token_malformed"  # the version
    assert env.sav.check(token[:-1]) == "sav.token_malformed"
    assert env.sav.check(token + "a") == "sav.token_malformed"
    assert env.sav.check("A" * 48) == "sav.token_malformed"  # folds to a valid base32 of version 0
    with caplog.at_level("WARNING", logger="kithmail.sav"):
        assert env.sav.check_token(_flip(token, 47)) is None
    assert "sav.token_forged" in caplog.text
    # The same token under another key: the MAC does not verify.
    other = Sav(env.db, env.settings, clock=env.clock, key=b"k" * 32)
    assert other.check(token) == "sav.token_forged"
    assert env.sav.check(token) != "sav.token_forged"  # the original still stands


def test_a_token_for_another_row_does_not_verify(env: Env) -> None:
    """The MAC binds the row's fields: a token made for other fields fails on this row."""
    _, token = send_one(env)
    data = env.sav.check_token(token)
    assert data is not None
    forged = env.sav.make_token(
        "default", "eve@example.test", SENDER, HELD, data.expires, data.nonce
    )
    assert env.sav.check(forged) == "sav.token_forged"


def test_expired_token(env: Env) -> None:
    _, token = send_one(env)
    env.clock.now = T0 + env.settings.community.token_ttl - 1
    assert isinstance(env.sav.check(token), TokenData)
    env.clock.now = T0 + env.settings.community.token_ttl
    assert env.sav.check(token) == "sav.token_expired"
    assert env.sav.check_token(token) is None
    assert env.sav.sweep() == (1, 0)
    assert env.sav.check(token) == "sav.token_expired"


def test_a_token_confirms_once_and_a_replay_is_refused(env: Env) -> None:
    _, token = send_one(env)
    data = env.sav.check_token(token)
    assert data is not None
    calls: list[tuple[str, str, str]] = []

    async def on_verified(tenant: str, user: str, sender: str) -> None:
        calls.append((tenant, user, sender))

    assert asyncio.run(env.sav.confirm(data, on_verified)) is True
    assert asyncio.run(env.sav.confirm(data, on_verified)) is False
    assert calls == [("default", USER, SENDER)]
    assert env.sav.check(token) == "sav.token_used"
    assert env.sav.check_token(token) is None
    assert [r[5:] for r in rows(env.db)] == [("verified", "sav.verified.reply")]
    audit = env.db.read("SELECT actor, action, tenant, target FROM audit_log")
    assert audit == [(f"sav:{SENDER}", "sav.verified", "default", USER)]


def test_a_failing_on_verified_leaves_the_token_usable(env: Env) -> None:
    _, token = send_one(env)
    data = env.sav.check_token(token)
    assert data is not None

    async def broken(tenant: str, user: str, sender: str) -> None:
        raise RuntimeError("quarantine unavailable")

    with pytest.raises(RuntimeError):
        asyncio.run(env.sav.confirm(data, broken))
    assert env.sav.check_token(token) == data
    assert asyncio.run(env.sav.confirm(data)) is True


def test_the_mac_is_compared_in_constant_time(env: Env) -> None:
    """hmac.compare_digest is the comparison check() makes, seen by the profiler."""
    _, token = send_one(env)
    seen: list[object] = []

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "c_call":
            seen.append(arg)

    sys.setprofile(profile)
    try:
        env.sav.check(_flip(token, 47))
    finally:
        sys.setprofile(None)
    assert hmac.compare_digest in seen


def test_the_key_is_made_once_0600_and_a_bad_one_refused(tmp_path: Path) -> None:
    key = load_key(tmp_path)
    path = tmp_path / "sav.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) == 32 and load_key(tmp_path) == key
    assert [p.name for p in tmp_path.iterdir()] == ["sav.key"]
    path.write_bytes(b"short")
    with pytest.raises(SavKeyError, match="remove it"):
        load_key(tmp_path)


# --- the no-backscatter rules ----------------------------------------------------------------


def refused(env: Env, reason: str, **kw: Any) -> None:
    """The challenge is refused for `reason`, recorded as such, and nothing is spooled."""
    before = env.spool.queue_ids_sync()
    qid, got = asyncio.run(challenge(env, **kw))
    assert (qid, got) == (None, reason)
    last = rows(env.db)[-1]
    assert last[5:] == ("suppressed", reason)
    assert last[1] == kw.get("user", USER) and last[4] == kw.get("queue_id", HELD)
    assert env.spool.queue_ids_sync() == before


def test_spf_pass_and_aligned_dkim_are_challenged(env: Env) -> None:
    assert asyncio.run(challenge(env))[1] == "sav.challenge"
    got = asyncio.run(
        challenge(env, sender="carol@example.org", auth=dkim_pass("mail.example.org"))
    )
    assert got[1] == "sav.challenge"
    assert len(env.spool.queue_ids_sync()) == 2


def test_null_sender(env: Env) -> None:
    refused(env, "sav.null_sender", sender="")
    assert rows(env.db)[-1][2] == ""
    assert env.spool.queue_ids_sync() == []


@pytest.mark.parametrize(
    "field",
    [
        b"List-Id: Friends <friends.lists.example.org>\r\n",
        b"List-Unsubscribe: <mailto:leave@example.org>\r\n",
        b"Precedence: bulk\r\n",
        b"Precedence: list\r\n",
        b"Precedence: junk\r\n",
        b"Auto-Submitted: auto-generated\r\n",
        b"Auto-Submitted: auto-replied (vacation)\r\n",
        b"Auto-Submitted: \r\n",
    ],
)
def test_list_bulk_and_automatic_mail(env: Env, field: bytes) -> None:
    refused(env, "sav.bulk", hdrs=headers(field))
    assert env.spool.queue_ids_sync() == []


def test_auto_submitted_no_is_personal(env: Env) -> None:
    assert (
        asyncio.run(challenge(env, hdrs=headers(b"Auto-Submitted: no\r\n")))[1] == "sav.challenge"
    )


@pytest.mark.parametrize("sender", ["eve@example.test", "eve@sub.example.test", "eve@EXAMPLE.NET"])
def test_a_sender_in_our_own_domains(env: Env, sender: str) -> None:
    domain = sender.rpartition("@")[2].lower()
    refused(env, "sav.own_domain", sender=sender, auth=spf_pass(domain))
    assert env.spool.queue_ids_sync() == []


@pytest.mark.parametrize(
    "auth",
    [
        AuthResults(),
        AuthResults(spf_mailfrom=SpfResult("mailfrom", "example.org", "softfail")),
        AuthResults(spf_mailfrom=SpfResult("mailfrom", "example.org", "neutral")),
        AuthResults(spf_helo=SpfResult("helo", "example.org", "pass")),
        AuthResults(spf_mailfrom=SpfResult("mailfrom", "other.example", "pass")),
        AuthResults(dkim=[DkimResult("pass", "unrelated.example", "s")]),
        AuthResults(dkim=[DkimResult("fail", "example.org", "s")]),
    ],
    ids=[
        "none",
        "softfail",
        "neutral",
        "helo-only",
        "spf-other-domain",
        "dkim-unaligned",
        "dkim-fail",
    ],
)
def test_an_unauthenticated_sender(env: Env, auth: AuthResults) -> None:
    refused(env, "sav.unauthenticated", auth=auth)
    assert env.spool.queue_ids_sync() == []


def test_once_per_user_and_sender_per_interval(env: Env) -> None:
    send_one(env)
    env.clock.now = T0 + env.settings.community.challenge_interval - 1
    refused(env, "sav.interval", queue_id="0000000000000000002")
    # Another user, or the same user and another sender, is not the same pair.
    assert asyncio.run(challenge(env, user="cid@example.test"))[1] == "sav.challenge"
    env.clock.now = T0 + env.settings.community.challenge_interval
    assert asyncio.run(challenge(env, queue_id="0000000000000000003"))[1] == "sav.challenge"
    assert len(env.spool.queue_ids_sync()) == 3


def test_per_domain_rate(tmp_path: Path) -> None:
    env = make_env(tmp_path, challenge_rate_per_domain=2)
    try:
        for user in ("a@example.test", "b@example.test"):
            assert asyncio.run(challenge(env, user=user))[1] == "sav.challenge"
        refused(env, "sav.rate_domain", user="c@example.test")
        # Another sender domain has its own allowance.
        got = asyncio.run(
            challenge(
                env, user="c@example.test", sender="x@example.com", auth=spf_pass("example.com")
            )
        )
        assert got[1] == "sav.challenge"
        env.clock.now = T0 + 3600
        assert asyncio.run(challenge(env, user="d@example.test"))[1] == "sav.challenge"
        assert len(env.spool.queue_ids_sync()) == 4
    finally:
        env.db.close()


def test_global_rate(tmp_path: Path) -> None:
    env = make_env(tmp_path, challenge_rate_global=2)
    try:
        for domain in ("example.org", "example.com"):
            got = asyncio.run(challenge(env, sender=f"x@{domain}", auth=spf_pass(domain)))
            assert got[1] == "sav.challenge"
        refused(env, "sav.rate_global", sender="x@example.info", auth=spf_pass("example.info"))
        assert len(env.spool.queue_ids_sync()) == 2
    finally:
        env.db.close()


def test_sav_off(tmp_path: Path) -> None:
    env = make_env(tmp_path, sav=False)
    try:
        refused(env, "sav.disabled")
        assert env.spool.queue_ids_sync() == []
    finally:
        env.db.close()


def test_should_challenge_alone_writes_only_refusals(env: Env) -> None:
    ok = env.sav.should_challenge(
        tenant="default",
        user=USER,
        sender=SENDER,
        queue_id=HELD,
        headers=headers(),
        auth=spf_pass(),
    )
    assert ok == (True, "sav.challenge")
    assert rows(env.db) == []


# --- the challenge ---------------------------------------------------------------------------


def test_the_challenge_envelope_and_fields(env: Env) -> None:
    qid, token = send_one(env)
    spooled = env.spool.load_sync(qid)
    assert spooled.envelope.mail_from == ""  # RFC 3834 §3.3
    assert [(r.address, r.outcome) for r in spooled.envelope.recipients] == [
        (SENDER, Outcome.DELIVER)
    ]
    raw, msg, _ = sent_challenge(env, qid)
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["From"].addresses[0].addr_spec == "postmaster@example.test"
    assert str(msg["To"]) == "Bob Example <bob@example.org>"
    assert msg["Reply-To"].addresses[0].addr_spec == f"sav+{token}@example.test"
    assert re.fullmatch(r"<[0-9a-f]{32}\.sav@example\.test>", str(msg["Message-ID"]))
    assert msg["In-Reply-To"] == "<m1@example.org>"
    assert msg["Date"].datetime.timestamp() == T0
    assert msg["Subject"] == "Please confirm your message: Lunch on Friday?"
    assert msg.get_content_type() == "multipart/alternative"
    text = msg.get_body(("plain",))
    page = msg.get_body(("html",))
    assert text is not None and page is not None
    link = f"https://mail.example.test/sav/{token}"
    assert link in text.get_content() and f'href="{link}"' in page.get_content()
    assert USER in text.get_content() and "Lunch on Friday?" in text.get_content()
    assert b"SECRET BODY" not in raw and b"THE SECRET" not in raw
    assert raw.isascii()  # 7-bit: no SMTPUTF8 or 8BITMIME needed on the way out
    assert b"\n" not in raw.replace(b"\r\n", b"")


HOSTILE = [
    "=?utf-8?q?x=0D=0ABcc:_victim@example.com?=",
    "hi\r\nBcc: victim@example.com",
    "hi\nBcc: victim@example.com",
    "hi\rBcc: victim@example.com",
    "=?utf-8?b?aGkNCkJjYzogdmljdGltQGV4YW1wbGUuY29t?=",  # "hi\r\nBcc: victim@…", encoded
    "caf\u00e9 \u202eevil\u202c \u0000 done",
]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_subject_and_display_name_cannot_inject_fields(env: Env, hostile: str) -> None:
    hdrs = [("from", f'"{hostile}" <bob@example.org>'), ("subject", hostile)]
    qid, reason = asyncio.run(challenge(env, hdrs=hdrs))
    assert qid is not None, reason
    raw, msg, _ = sent_challenge(env, qid)
    head = raw.partition(b"\r\n\r\n")[0]
    names = [
        line.split(b":", 1)[0].lower()
        for line in head.split(b"\r\n")
        if line[:1] not in (b" ", b"\t")
    ]
    assert sorted(names) == sorted(
        [
            b"content-type",
            b"mime-version",
            b"from",
            b"to",
            b"reply-to",
            b"subject",
            b"date",
            b"message-id",
            b"auto-submitted",
        ]
    )
    # Their text may still be shown (inside a quoted name or an encoded word), never as a field.
    assert not re.search(rb"\r\nbcc:", b"\r\n" + head.lower())
    assert head.isascii()
    subject = str(msg["Subject"])
    assert "\r" not in subject and "\n" not in subject and "\u202e" not in subject
    assert "\x00" not in subject
    assert msg["To"].addresses[0].addr_spec == SENDER
    assert len(msg["To"].addresses) == 1
    assert "Bcc" not in msg


def test_a_non_ascii_subject_is_re_encoded_and_a_long_one_cut(env: Env) -> None:
    hdrs = [("subject", "=?iso-8859-1?q?Caf=E9_=E0_midi?=")]
    qid, _ = send_one(env, hdrs=hdrs)
    raw, msg, _ = sent_challenge(env, qid)
    assert str(msg["Subject"]) == "Please confirm your message: Café à midi"
    assert b"=?utf-8?" in raw.partition(b"\r\n\r\n")[0]
    hdrs = [("subject", "x" * 5000)]
    qid, _ = send_one(env, user="cid@example.test", hdrs=hdrs)
    _, msg, _ = sent_challenge(env, qid)
    assert 30 < len(str(msg["Subject"])) <= 30 + 120


def _dnsfunc(server: Dnsmasq) -> Any:
    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        reply = dns.query.udp(
            dns.message.make_query(qname, dns.rdatatype.TXT),
            "127.0.0.1",
            port=server.port,
            timeout=2,
        )
        for rrset in reply.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None

    return lookup


def test_the_challenge_is_dkim_signed_by_the_recipients_domain(
    env: Env, dnsmasq: StartDnsmasq
) -> None:
    _, record = keygen(env.data_dir, "example.test", "kithmail")
    strings = re.findall(r'"([^"]*)"', record)
    server = dnsmasq(zones=["example.test"], txt=[("kithmail._domainkey.example.test", strings)])
    qid, _ = send_one(env)
    raw, msg, _ = sent_challenge(env, qid)
    assert raw.startswith(b"DKIM-Signature:")
    sig = str(msg["DKIM-Signature"]).replace(" ", "")
    assert "d=example.test;" in sig and "s=kithmail;" in sig and "c=relaxed/relaxed;" in sig
    signed = dict(t.split("=", 1) for t in sig.replace("\r\n", "").split(";") if "=" in t)[
        "h"
    ].lower()
    for name in ("from", "to", "subject", "date", "message-id", "auto-submitted"):
        assert name in signed.split(":")
    assert dkim.verify(raw, dnsfunc=_dnsfunc(server))
    assert ("TXT", "kithmail._domainkey.example.test") in [q[:2] for q in server.queries()]
    # And a change in transit breaks it.
    assert not dkim.verify(
        raw.replace(b"Lunch on Friday", b"Lunch on Monday"), dnsfunc=_dnsfunc(server)
    )


def test_without_a_key_the_challenge_goes_unsigned(env: Env) -> None:
    qid, _ = send_one(env)
    raw, _, _ = sent_challenge(env, qid)
    assert b"DKIM-Signature" not in raw


# --- verification by reply -------------------------------------------------------------------

REPLY = b"From: Bob <bob@example.org>\r\nSubject: Re: Please confirm\r\n\r\nyes\r\n"


def test_a_reply_from_the_authenticated_sender_counts(env: Env) -> None:
    _, token = send_one(env)
    data, reason = env.sav.verify_reply(token, SENDER, spf_pass(), header_fields(REPLY))
    assert reason == "sav.verified" and data is not None
    assert (data.user, data.sender, data.queue_id) == (USER, SENDER, HELD)
    # Case of the sender and of the token do not matter.
    data2, _ = env.sav.verify_reply(
        token.upper(), "Bob@Example.ORG", dkim_pass("example.org"), header_fields(REPLY)
    )
    assert data2 == data
    assert rows(env.db)[-1][5] == "sent"  # verify_reply changes nothing; confirm does


@pytest.mark.parametrize(
    ("sender", "auth", "extra", "reason"),
    [
        ("", None, b"", "sav.reply_null_sender"),
        (SENDER, None, b"Auto-Submitted: auto-replied\r\n", "sav.reply_automatic"),
        (SENDER, None, b"X-Autoreply: yes\r\n", "sav.reply_automatic"),
        (
            SENDER,
            None,
            b"Content-Type: multipart/report; report-type=delivery-status\r\n",
            "sav.reply_automatic",
        ),
        (SENDER, None, b"Precedence: bulk\r\n", "sav.reply_automatic"),
        ("mallory@example.org", None, b"", "sav.reply_wrong_sender"),
        (
            SENDER,
            AuthResults(spf_mailfrom=SpfResult("mailfrom", "example.org", "fail")),
            b"",
            "sav.reply_unauthenticated",
        ),
    ],
    ids=[
        "null-sender",
        "auto-submitted",
        "x-autoreply",
        "dsn",
        "bulk",
        "wrong-sender",
        "unauthenticated",
    ],
)
def test_replies_that_do_not_count(
    env: Env, sender: str, auth: AuthResults | None, extra: bytes, reason: str
) -> None:
    _, token = send_one(env)
    got = env.sav.verify_reply(token, sender, auth or spf_pass(), header_fields(extra + REPLY))
    assert got == (None, reason)
    assert rows(env.db)[-1][5] == "sent"


def test_a_reply_with_a_bad_expired_or_spent_token(env: Env) -> None:
    _, token = send_one(env)
    h = header_fields(REPLY)
    assert env.sav.verify_reply(_flip(token, 47), SENDER, spf_pass(), h) == (
        None,
        "sav.token_forged",
    )
    data, _ = env.sav.verify_reply(token, SENDER, spf_pass(), h)
    assert data is not None and asyncio.run(env.sav.confirm(data)) is True
    assert env.sav.verify_reply(token, SENDER, spf_pass(), h) == (None, "sav.token_used")
    _, token2 = send_one(env, user="cid@example.test")
    env.clock.now += env.settings.community.token_ttl
    assert env.sav.verify_reply(token2, SENDER, spf_pass(), h) == (None, "sav.token_expired")


def test_a_failed_spool_leaves_no_row_behind(env: Env, tmp_path: Path) -> None:
    """A challenge that never reached the spool does not count toward the limits."""
    full = Spool(tmp_path / "full", reserve_bytes=1 << 62)  # more than any disk: always "full"
    with pytest.raises(SpoolFullError):
        asyncio.run(
            env.sav.challenge(
                full,
                tenant="default",
                user=USER,
                sender=SENDER,
                queue_id=HELD,
                headers=headers(),
                auth=spf_pass(),
            )
        )
    assert rows(env.db) == []
    assert asyncio.run(challenge(env))[1] == "sav.challenge"


def index(env: Env, queue_id: str, user: str = USER) -> None:
    """A quarantine index row for a held copy, as the quarantine module writes it."""
    with env.db.write() as conn:
        conn.execute(
            "INSERT INTO quarantine (queue_id, rcpt_index, tenant, user, sender, subject, size,"
            " layer, reason, held_at, expires_at) VALUES (?, 0, 'default', ?, ?, 'x', 1,"
            " 'community', 'community.unknown', 0, 0)",
            (queue_id, user, SENDER),
        )


def note(env: Env, queue_id: str) -> object:
    return env.db.read("SELECT sav FROM quarantine WHERE queue_id = ?", (queue_id,))[0][0]


def test_the_quarantine_index_is_told_what_sav_did(env: Env) -> None:
    second = "0000000000000000002"
    index(env, HELD)
    index(env, second)
    _, token = send_one(env)
    assert note(env, HELD) == "sav.challenge"
    assert asyncio.run(challenge(env, queue_id=second)) == (None, "sav.interval")
    assert note(env, second) == "sav.interval"
    data = env.sav.check_token(token)
    assert data is not None and asyncio.run(env.sav.confirm(data)) is True
    assert note(env, HELD) == "sav.verified"
