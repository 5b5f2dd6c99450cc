"""The quarantine digest end to end: held mail, a day passes, a digest, one click releases.

`kith serve --test-hooks` with layer 5 enforcing: mail from an outside
sender nobody knows is held (no DNS answers here, so no sender is
authenticated and no challenge leaves). The test clock then moves a day,
the server's daily pass sends each user a digest into their Maildir, and
the test reads it as the user would: its headers, its text, its links.
The links are followed over real HTTP on the public listener, as a
browser (GET, then POST from the page) or an attacker (tampered, expired,
cross-site, someone else's) would. DKIM signatures are verified with
dkimpy against the key record `kith dkim keygen` printed, served by a real
dnsmasq; the anti-virus hold uses a real clamd with the tests' signatures.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from clamd_server import EICAR, clamd_server
from dns_server import Dnsmasq, StartDnsmasq
from gateway import Gateway, run, running_gateway, send
from prometheus_client import REGISTRY

from kithmail import config, digest
from kithmail.db import Database
from kithmail.dkimkeys import keygen
from kithmail.layers import Action as LayerAction
from kithmail.layers import Layer, Verdict
from kithmail.public import SECURITY_HEADERS, bind, make_app, serve_public
from kithmail.quarantine import Quarantine
from kithmail.spool import Envelope, Outcome, Recipient, Spool, SpoolFullError

OUTSIDE = "127.0.0.70"
ANN, BOB = "ann@example.test", "bob@example.test"
DAY = 86400.0
LINK = re.compile(r"http://127\.0\.0\.1:\d+/digest/[a-z0-9]+")
SECTIONS: dict[str, dict[str, Any]] = {
    "recon": {"exempt_networks": ["127.0.0.0/24"]},
    "community": {"mode": "enforce", "sav": False},
    "digest": {"enabled": True, "link_ttl": "72h", "max_items": 5},
}


@pytest.fixture
def gw(tmp_path: Path) -> Iterator[Gateway]:
    with running_gateway(tmp_path / "gw", sections=SECTIONS) as g:
        yield g


def mail(subject: str, sender: str = "eve@remote.test", to: str = ANN, body: str = "Hi.") -> bytes:
    return (
        f"From: Eve <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{abs(hash(subject))}@remote.test>\r\n\r\n{body}\r\n"
    ).encode()


def hold(gw: Gateway, rcpts: list[str], data: bytes, sender: str = "eve@remote.test") -> None:
    replies = run(send(gw.port, OUTSIDE, sender, rcpts, data))
    assert replies[-1].code == 250, replies
    for r in rcpts:
        gw.wait_for(f"held for {r}", lambda r=r: held_ids(gw, r))


def held_ids(gw: Gateway, user: str) -> list[str]:
    out = gw.kith("quarantine", "list", user).stdout
    return re.findall(r"^([0-9a-z]{19}) ", out, re.M)


def digests(gw: Gateway, user: str) -> list[EmailMessage]:
    return [
        email.message_from_bytes(m, policy=email.policy.default)
        for m in gw.messages(user)
        if b"Auto-Submitted: auto-generated" in m
    ]


def passes(gw: Gateway) -> int:
    return gw.log_text().count("digest pass for the slot of")


def next_day(gw: Gateway) -> None:
    """Move the clock a day and wait for the server's digest pass."""
    before = passes(gw)
    gw.advance(DAY)
    gw.wait_for("the daily digest pass", lambda: passes(gw) > before)


def next_digest(gw: Gateway, user: str, before: int = 0) -> EmailMessage:
    """Move the clock a day and wait for the user's next digest."""
    gw.advance(DAY)
    found = gw.wait_for(f"a digest for {user}", lambda: len(digests(gw, user)) > before or None)
    assert found
    return digests(gw, user)[-1]


def text_of(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


def html_of(msg: EmailMessage) -> str:
    part = msg.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def links(msg: EmailMessage) -> dict[str, list[str]]:
    """The digest's links by label: "release" and "allow", in listing order."""
    out: dict[str, list[str]] = {"release": [], "allow": []}
    for line in text_of(msg).splitlines():
        m = LINK.search(line)
        if m is None:
            continue
        out["allow" if "Allow the sender" in line else "release"].append(m[0])
    return out


def http(
    url: str, form: dict[str, str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if form is not None else "GET")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    if data is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def origin(gw: Gateway) -> dict[str, str]:
    return {"Origin": f"http://127.0.0.1:{gw.public_port}"}


def form(body: str) -> dict[str, str]:
    m = re.search(r'name="form" value="([0-9a-f]+)"', body)
    assert m, body
    return {"form": m[1]}


def delivered_subjects(gw: Gateway, user: str) -> list[str]:
    return [
        str(email.message_from_bytes(m)["Subject"])
        for m in gw.messages(user)
        if b"Auto-Submitted: auto-generated" not in m
    ]


def _dnsfunc(server: Dnsmasq) -> Any:
    def lookup(name: bytes | str, timeout: float = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        q = dns.message.make_query(qname, dns.rdatatype.TXT)
        reply = dns.query.udp(q, "127.0.0.1", port=server.port, timeout=2)
        for rrset in reply.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None

    return lookup


# ---------------------------------------------------------------- tests


def test_held_mail_is_in_a_signed_digest_and_its_link_releases_it_once(
    tmp_path: Path, dnsmasq: StartDnsmasq
) -> None:
    _, record = keygen(tmp_path / "gw" / "var", "example.test", "kithmail")
    server = dnsmasq(
        zones=["example.test"],
        txt=[("kithmail._domainkey.example.test", re.findall(r'"([^"]*)"', record))],
    )
    with running_gateway(tmp_path / "gw", sections=SECTIONS) as gw:
        hold(gw, [ANN], mail("Invoice 42"))
        assert gw.messages(ANN) == []
        d = next_digest(gw, ANN)

        # Our own mail: never held by the community, though nobody "knows" us.
        assert d["To"].addresses[0].addr_spec == ANN
        assert d["From"].addresses[0].addr_spec == "quarantine@example.test"
        assert d["Auto-Submitted"] == "auto-generated"
        assert d["Subject"] == f"Held mail: 1 new message for {ANN}"
        raw = next(m for m in gw.messages(ANN) if b"auto-generated" in m)
        # As delivered, with whatever trace fields delivery added above the signature.
        assert dkim.verify(raw, dnsfunc=_dnsfunc(server))
        forged = raw.replace(b"Invoice 42", b"Invoice 43")
        assert not dkim.verify(forged, dnsfunc=_dnsfunc(server))

        text = text_of(d)
        assert "Invoice 42" in text and "eve@remote.test" in text
        assert "community.unknown" in text
        got = links(d)
        assert len(got["release"]) == 1 and len(got["allow"]) == 1
        release = got["release"][0]

        # GET shows what the link will do, twice (a scanner, then a person): nothing changes.
        for _ in range(2):
            status, body = http(release)
            assert status == 200, body
            assert "Release this message?" in body and "Invoice 42" in body
        assert len(held_ids(gw, ANN)) == 1 and delivered_subjects(gw, ANN) == []

        # POST from the page: exactly that message is delivered.
        status, body = http(release, form(body), origin(gw))
        assert status == 200 and "Released" in body, body
        gw.wait_for("the released message", lambda: delivered_subjects(gw, ANN))
        assert delivered_subjects(gw, ANN) == ["Invoice 42"]
        assert held_ids(gw, ANN) == []

        # Once only.
        status, body = http(release, form(body) if "form" in body else {"form": "x"}, origin(gw))
        assert status == 410 and "used already" in body
        status, body = http(got["allow"][0])
        assert status == 410 and "no longer held" in body

        # The next day, nothing new: no second digest.
        next_day(gw)
        assert len(digests(gw, ANN)) == 1
        status, metrics = http(f"http://127.0.0.1:{gw.web_port}/metrics")
        assert status == 200
        assert "kithmail_digests_sent_total 1.0" in metrics
        assert (
            'kithmail_digest_link_actions_total{action="release",result="digest.released"} 1.0'
            in (metrics)
        )
        assert 'result="digest.token_used"' not in metrics  # the replay never reached act


def test_allow_link_allows_the_sender_and_releases_all_their_held_mail(gw: Gateway) -> None:
    hold(gw, [ANN], mail("first", sender="zed@remote.test"), sender="zed@remote.test")
    hold(gw, [ANN], mail("second", sender="zed@remote.test"), sender="zed@remote.test")
    hold(gw, [ANN], mail("other"))
    d = next_digest(gw, ANN)
    assert d["Subject"] == f"Held mail: 3 new messages for {ANN}"
    text = text_of(d)
    # Newest first; each with its own links.
    assert text.index("other") < text.index("second") < text.index("first")
    allow = links(d)["allow"][2]  # "first"
    status, body = http(allow)
    assert status == 200 and "Allow this sender and release?" in body and "first" in body
    status, body = http(allow, form(body), origin(gw))
    assert status == 200 and "Sender allowed and released" in body
    gw.wait_for("both of zed's messages", lambda: len(delivered_subjects(gw, ANN)) == 2)
    assert sorted(delivered_subjects(gw, ANN)) == ["first", "second"]
    assert "zed@remote.test" in gw.kith("community", "list", ANN).stdout
    assert len(held_ids(gw, ANN)) == 1  # eve's stays held


def test_links_refuse_tampering_other_users_cross_site_blind_and_expired(gw: Gateway) -> None:
    hold(gw, [ANN, BOB], mail("for both", to=f"{ANN}, {BOB}"))
    d_ann = next_digest(gw, ANN)
    gw.wait_for("bob's digest", lambda: digests(gw, BOB))
    ann = links(d_ann)["release"][0]
    bob = links(digests(gw, BOB)[0])["release"][0]
    assert ann != bob

    # A tampered token (any character) is no token: 404, both ways.
    token = ann.rsplit("/", 1)[1]
    for i in (0, 20, 30, len(token) - 1):
        flipped = token[:i] + ("a" if token[i] != "a" else "b") + token[i + 1 :]
        assert http(ann.replace(token, flipped))[0] == 404
        status, _ = http(ann.replace(token, flipped), {"form": "0" * 32}, origin(gw))
        assert status == 404
    for path in ("/digest/", "/digest/x", "/digest/" + "a" * 83, "/digest/" + token + "a"):
        assert http(f"http://127.0.0.1:{gw.public_port}{path}")[0] == 404

    # Bob's token names his copy; pointed at Ann's copy it is forged.
    bob_token = bob.rsplit("/", 1)[1]
    ann_qid = token[:19]
    assert bob_token[:19] == ann_qid  # one message, two copies
    status, body = http(ann)
    page_form = form(body)
    # Bob's link cannot carry Ann's form tag, and acts only on Bob's copy.
    status, _ = http(bob, page_form, origin(gw))
    assert status == 400
    status, body = http(bob)
    status, body = http(bob, form(body), origin(gw))
    assert status == 200
    gw.wait_for("bob's copy", lambda: delivered_subjects(gw, BOB))
    assert held_ids(gw, BOB) == [] and held_ids(gw, ANN) == [ann_qid]
    assert delivered_subjects(gw, ANN) == []

    # Cross-site, and blind (no form tag from the page): refused, nothing happens.
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Referer": "https://evil.example/x"},
        {**origin(gw), "Sec-Fetch-Site": "cross-site"},
    ):
        assert http(ann, page_form, headers)[0] == 403
    assert http(ann, {}, origin(gw))[0] == 400
    assert http(ann, {"form": "0" * 32}, origin(gw))[0] == 400
    assert held_ids(gw, ANN) == [ann_qid]

    # A disabled account's links do nothing.
    database = Database.open(gw.data_dir / "kithmail.db")
    try:
        database.set_disabled(ANN, True)
        status, body = http(ann)
        assert status == 403 and "disabled" in body
        assert http(ann, page_form, origin(gw))[0] == 403
        database.set_disabled(ANN, False)
    finally:
        database.close()
    assert held_ids(gw, ANN) == [ann_qid]

    # After link_ttl the link is refused, with a page that says so.
    gw.advance(72 * 3600)
    status, body = http(ann)
    assert status == 410 and "expired" in body
    assert http(ann, page_form, origin(gw))[0] == 410
    assert held_ids(gw, ANN) == [ann_qid] and delivered_subjects(gw, ANN) == []


def test_a_user_who_opted_out_gets_no_digest(gw: Gateway) -> None:
    database = Database.open(gw.data_dir / "kithmail.db")
    try:
        bob_id = database.user(BOB).id
        assert digest.wants(database, bob_id)
        digest.set_wants(database, bob_id, False, actor="bob@example.test")
        assert not digest.wants(database, bob_id)
        audit = database.read("SELECT actor, action, target, detail FROM audit_log")
        assert (BOB, "digest.preference", BOB, "off") in audit
    finally:
        database.close()
    hold(gw, [ANN, BOB], mail("for both", to=f"{ANN}, {BOB}"))
    next_digest(gw, ANN)
    gw.wait_for("the pass's count", lambda: re.search(r"digest pass for .*: 1 sent", gw.log_text()))
    assert digests(gw, BOB) == []
    assert f"to {BOB}" not in gw.log_text()
    assert len(held_ids(gw, BOB)) == 1


def test_a_hostile_subject_is_neutralised_in_the_digest_and_on_the_page(gw: Gateway) -> None:
    # Encoded words decoding to CR LF + a header, a script tag, and a
    # right-to-left override that would reverse "exe.pdf" on screen.
    hostile = (
        "=?utf-8?q?Hello=0D=0ABcc:_victim@else.test=0D=0A=0D=0Abody?= "
        "=?utf-8?q?<script>alert(1)</script>_invoice=E2=80=AEfdp.exe?="
    )
    hold(gw, [ANN], mail(hostile))
    d = next_digest(gw, ANN)
    raw = next(m for m in gw.messages(ANN) if b"auto-generated" in m)
    head = raw.split(b"\r\n\r\n", 1)[0] if b"\r\n\r\n" in raw else raw.split(b"\n\n", 1)[0]
    assert b"victim" not in head and b"script" not in head
    assert d["Bcc"] is None
    text = text_of(d)
    assert "\u202e" not in text and "\u202e" not in html_of(d)
    (line,) = [x for x in text.splitlines() if "victim" in x]
    assert "Bcc: victim@else.test" in line and "invoice" in line  # one line, shown as text
    page = html_of(d)
    assert "<script>" not in page and "&lt;script&gt;" in page
    release = links(d)["release"][0]
    status, body = http(release)
    assert status == 200
    assert "<script>" not in body and "&lt;script&gt;" in body and "\u202e" not in body


def test_anti_virus_holds_get_no_link(tmp_path: Path) -> None:
    with clamd_server(tmp_path / "clamd") as clamd:
        sections = {**SECTIONS, "antivirus": {"clamd": clamd.unix, "on_virus": "quarantine"}}
        with running_gateway(tmp_path / "gw", sections=sections) as gw:
            hold(gw, [ANN], mail("nasty", body=EICAR.decode()))
            hold(gw, [ANN], mail("plain"))
            d = next_digest(gw, ANN)
            text = text_of(d)
            assert "nasty" in text and "antivirus" in text
            assert "Only an administrator can release this message." in text
            got = links(d)
            assert len(got["release"]) == 1 and len(got["allow"]) == 1  # "plain" only
            nasty = text[text.index("nasty") :]
            nasty = nasty[: nasty.index("\n\n")]
            assert LINK.search(nasty) is None


def test_kith_digest_send_now_and_the_daily_pass_do_not_repeat(gw: Gateway) -> None:
    hold(gw, [ANN], mail("by hand"))
    done = gw.kith("digest", "send", "--now", "--user", ANN)
    assert re.search(rf"^digest [0-9a-z]{{19}} to {ANN}$", done.stdout, re.M), done.stdout
    gw.wait_for("the digest", lambda: digests(gw, ANN))
    assert "by hand" in text_of(digests(gw, ANN)[0])
    assert "no digest due" in gw.kith("digest", "send", "--now", "--user", ANN).stdout
    # The daily pass finds nothing new for Ann.
    next_day(gw)
    assert len(digests(gw, ANN)) == 1
    assert "no digest due" in gw.kith("digest", "send").stdout
    bad = gw.kith("digest", "send", "--user", "nobody@example.test", check=False)
    assert bad.returncode == 1 and "nobody@example.test" in bad.stderr


@contextlib.contextmanager
def in_process(
    root: Path, subjects: list[str], **digest_settings: object
) -> Iterator[tuple[digest.Digest, Database, Spool, int]]:
    """A database, a spool holding `subjects` for Ann (held at 1 000 000 + i), and a Digest."""
    settings = config.from_mapping(
        {"server": {"data_dir": str(root)}, "digest": dict(digest_settings)}
    )
    database = Database.open(root / "kithmail.db")
    try:
        database.sync_domains(settings.domains.local)
        user, _ = database.add_user(ANN)
        spool = Spool(root / "spool")
        q = Quarantine(database, spool)
        why = Verdict(Layer.COMMUNITY, LayerAction.QUARANTINE, "community.unknown", "unknown")
        for i, subject in enumerate(subjects):
            env = Envelope(
                received=1_000_000.0 + i,
                client_ip="192.0.2.1",
                helo="x",
                mail_from="eve@remote.test",
                recipients=(Recipient(ANN, Outcome.QUARANTINE, (why,)),),
                tenant="default",
            )
            assert q.index_sync(spool.accept_sync(env, mail(subject))) == 1
        yield digest.Digest(database, q, settings), database, spool, user.id
    finally:
        database.close()


def test_a_digest_lists_at_most_max_items_then_says_how_many_more(tmp_path: Path) -> None:
    subjects = [f"message {i}" for i in range(7)]
    with in_process(tmp_path, subjects, max_items=3) as (d, _, spool, _):
        sent = d.pass_sync(spool, lambda _: None, now=2_000_000.0)
        assert len(sent) == 1
        raw = spool.load_sync(sent[0][1]).read_bytes()
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert msg["Subject"] == f"Held mail: 7 new messages for {ANN}"
        text = text_of(msg)
        listed = [s for s in subjects if s in text]
        assert listed == ["message 4", "message 5", "message 6"]  # the newest
        assert "... and 4 more held messages, not listed." in text
        assert len(LINK.findall(text)) == 6


def test_a_digest_that_cannot_be_spooled_is_sent_at_the_next_pass(tmp_path: Path) -> None:
    """digest_last moves only once the spool has the digest: a failure repeats, never skips."""
    with in_process(tmp_path, ["held while the disk was full"]) as (d, database, spool, uid):
        notified: list[str] = []
        now = 2_000_000.0

        def last() -> object:
            rows = database.read("SELECT digest_last FROM user_prefs WHERE user_id = ?", (uid,))
            return rows[0][0] if rows else None

        full = Spool(tmp_path / "spool", reserve_bytes=1 << 62)  # refuses every message
        failures = REGISTRY.get_sample_value("kithmail_digest_failures_total") or 0.0
        assert d.pass_sync(full, notified.append, now=now) == []
        assert REGISTRY.get_sample_value("kithmail_digest_failures_total") == failures + 1
        assert last() is None and notified == []
        with pytest.raises(SpoolFullError):
            d.send_sync(d.due_sync(now=now)[0], full, now=now)

        sent = d.pass_sync(spool, notified.append, now=now)
        assert [u for u, _ in sent] == [ANN] and notified == [sent[0][1]]
        assert last() == int(now) - digest.SETTLE
        body = spool.load_sync(sent[0][1]).read_bytes()
        assert b"held while the disk was full" in body
        assert d.pass_sync(spool, notified.append, now=now + 60) == []


def test_two_passes_that_find_the_same_user_due_send_one_digest(tmp_path: Path) -> None:
    """The server's daily pass and a `kith digest send` in another process may both
    find Ann due; whichever spools second sends nothing."""
    with in_process(tmp_path, ["held once"]) as (d, _database, spool, _uid):
        now = 2_000_000.0
        [mine], [theirs] = d.due_sync(now=now), d.due_sync(now=now)  # both read first
        before = set(spool.queue_ids_sync())
        sent = d.send_sync(mine, spool, now=now)
        assert sent is not None and set(spool.queue_ids_sync()) - before == {sent}
        assert d.send_sync(theirs, spool, now=now) is None
        assert set(spool.queue_ids_sync()) - before == {sent}
        # Later mail is listed by the next pass as before.
        assert d.due_sync(now=now + 60) == []


def test_with_digests_off_no_digest_is_sent(tmp_path: Path) -> None:
    sections = {**SECTIONS, "digest": {"enabled": False}}
    with running_gateway(tmp_path / "gw", sections=sections) as gw:
        hold(gw, [ANN], mail("quiet"))
        gw.advance(DAY)
        refused = gw.kith("digest", "send", "--now", check=False)
        assert refused.returncode == 1 and "enabled = false" in refused.stderr
        assert passes(gw) == 0 and digests(gw, ANN) == []
        assert len(held_ids(gw, ANN)) == 1


@contextlib.contextmanager
def public_app(app: Any) -> Iterator[int]:
    """`serve_public` in a thread of its own on a listening socket; its port."""
    socks = bind(["127.0.0.1:0"])
    port = socks[0].getsockname()[1]
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def main() -> None:
        holder["loop"] = asyncio.get_running_loop()
        holder["task"] = asyncio.ensure_future(serve_public(app, [], sockets=socks))
        ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            await holder["task"]

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield port
    finally:
        holder["loop"].call_soon_threadsafe(holder["task"].cancel)
        thread.join(10)


def test_a_fault_of_ours_is_a_503_with_the_security_headers_never_a_500(tmp_path: Path) -> None:
    with in_process(tmp_path, ["a", "b"]) as (d, database, _, uid):
        app = make_app(d.settings, database, None, digest=d)
        copies = d.quarantine.list_sync(ANN)
        expires = int(time.time()) + 3600
        first, second = (
            d.make_token(digest.Action.RELEASE, uid, ANN, h.queue_id, h.rcpt_index, expires)
            for h in copies
        )
        with public_app(app) as port:
            base = f"http://127.0.0.1:{port}/digest/"
            status, body = http(base + first)
            assert status == 200
            status, body = http(base + first, form(body))
            assert status == 200 and "Released" in body
            assert [h.subject for h in d.quarantine.list_sync(ANN)] == [copies[1].subject]
            tag = form(http(base + second)[1])
            database.close()  # now every read fails
            for got in (http(base + second), http(base + second, tag)):
                assert got[0] == 503 and "try again later" in got[1]
            req = urllib.request.Request(base + second)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            with e.value:
                for name, value in SECURITY_HEADERS:
                    assert e.value.headers[name.decode()] == value.decode()
