"""The path parser and the header rules, as units and through the real server.

`kithmail.smtp.addresses.parse_path` (RFC 5321 §4.1.2 paths, what the
relay rules need refused) and `kithmail.smtp.headers` (our Received
field, and the removal of the fields only kithmail may write:
X-Kithmail-*, Received-SPF, and Authentication-Results that claim our
authserv-id however they are spelled: folded, behind a comment, quoted).
The end-to-end tests send such headers and odd HELO names through `kith
serve` and read the Maildir copy.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from gateway import Gateway, message, run
from smtp_fixtures import (
    RECON_EXEMPT,
    Sources,
    deliver_one,
    log_lines,
    module_gateway,
    quit_,
    wait_messages,
)
from smtp_fixtures import session as smtp_session

from kithmail.smtp import headers as hdr
from kithmail.smtp.addresses import PathError, parse_path, split_params

AUTHSERV = "mx.kithmail.test"

# ---------------------------------------------------------------- paths


def rcpt(arg: str, utf8: bool = False) -> str:
    path, _ = parse_path(arg, keyword="TO:", utf8=utf8, recipient=True)
    return path.address


@pytest.mark.parametrize(
    ("arg", "address", "folded", "domain"),
    [
        ("TO:<ann@example.test>", "ann@example.test", "ann@example.test", "example.test"),
        ("to:<Ann@EXAMPLE.test>", "Ann@EXAMPLE.test", "ann@example.test", "example.test"),
        ("TO: <ann@example.test>", "ann@example.test", "ann@example.test", "example.test"),
        ("TO:<ann+x@example.test>", "ann+x@example.test", "ann+x@example.test", "example.test"),
        ("TO:<a.b-c_d@sub.example.test>", "a.b-c_d@sub.example.test", None, "sub.example.test"),
        ("TO:<Postmaster>", "Postmaster", "postmaster", ""),
        ("TO:<POSTMASTER>", "POSTMASTER", "postmaster", ""),
    ],
)
def test_recipient_paths_that_parse(
    arg: str, address: str, folded: str | None, domain: str
) -> None:
    path, params = parse_path(arg, keyword="TO:", utf8=False, recipient=True)
    assert (path.address, path.domain, params) == (address, domain, "")
    if folded is not None:
        assert path.folded == folded


def test_idn_domains_fold_to_a_labels() -> None:
    path, _ = parse_path("TO:<Ann@Bücher.test>", keyword="TO:", utf8=True, recipient=True)
    assert (path.folded, path.domain) == ("ann@xn--bcher-kva.test", "xn--bcher-kva.test")
    path, _ = parse_path("TO:<ann@ｅxample.test>", keyword="TO:", utf8=True, recipient=True)
    assert path.domain == "example.test"


@pytest.mark.parametrize(
    ("arg", "code", "status"),
    [
        ("TO:<user%outside.test@example.test>", 553, "5.7.1"),
        ("TO:<outside.test!user@example.test>", 553, "5.7.1"),
        ('TO:<"user@outside.test"@example.test>', 553, "5.7.1"),
        ('TO:<"ann"@example.test>', 553, "5.7.1"),
        ("TO:<@a.test,@b.test:user@outside.test>", 553, "5.7.1"),
        ("TO:<ann@example.test.>", 501, "5.1.3"),
        ("TO:<ann@example..test>", 501, "5.1.3"),
        ("TO:<ann@.example.test>", 501, "5.1.3"),
        ("TO:<ann@exam_ple.test>", 501, "5.1.3"),
        ("TO:<ann@[not a literal]>", 501, "5.1.3"),
        ("TO:<ann@example.test", 501, "5.1.3"),
        ("TO:<ann<@example.test>", 501, "5.1.3"),
        ("TO:<ann@example.test>x", 501, "5.1.3"),
        ("TO:<>", 501, "5.1.3"),
        ("TO:<postmaster@>", 501, "5.1.3"),
        ("TO:<@>", 553, "5.7.1"),
        ("TO:ann@example.test", 501, "5.5.4"),
        ("FROM:<ann@example.test>", 501, "5.5.4"),
        ("TO:<ann\x00@example.test>", 501, "5.1.3"),
        ("TO:<ann@example.test\r>", 501, "5.1.3"),
        ("TO:<ånn@example.test>", 553, "5.6.7"),
        ("TO:<" + "a" * 65 + "@example.test>", 553, "5.1.3"),
        ("TO:<a@" + ("d" * 60 + ".") * 5 + "test>", 501, "5.1.3"),
    ],
)
def test_recipient_paths_refused(arg: str, code: int, status: str) -> None:
    with pytest.raises(PathError) as e:
        parse_path(arg, keyword="TO:", utf8=False, recipient=True)
    assert (e.value.code, e.value.status) == (code, status), e.value.reply
    assert e.value.reply.startswith(f"{code} {status} ")


def test_address_literals_parse_and_are_marked() -> None:
    path, _ = parse_path("TO:<user@[192.0.2.1]>", keyword="TO:", utf8=False, recipient=True)
    assert path.literal and path.domain == "[192.0.2.1]"
    path, _ = parse_path("TO:<user@[IPv6:2001:db8::1]>", keyword="TO:", utf8=False, recipient=True)
    assert path.literal


def test_a_sender_may_be_null_quoted_or_routed_in_its_local_part() -> None:
    """What a recipient may not carry is harmless in a sender (it routes nothing)."""
    path, params = parse_path("FROM:<> SIZE=10", keyword="FROM:", utf8=False, recipient=False)
    assert path.null and params == "SIZE=10"
    path, _ = parse_path('FROM:<"a b"@remote.test>', keyword="FROM:", utf8=False, recipient=False)
    assert path.quoted and path.address == '"a b"@remote.test'
    path, _ = parse_path("FROM:<a%b@remote.test>", keyword="FROM:", utf8=False, recipient=False)
    assert path.address == "a%b@remote.test"
    with pytest.raises(PathError) as e:  # <Postmaster> is for recipients only
        parse_path("FROM:<postmaster>", keyword="FROM:", utf8=False, recipient=False)
    assert (e.value.code, e.value.status) == (501, "5.1.3")
    with pytest.raises(PathError) as e:
        parse_path("FROM:<@a.test:bob@remote.test>", keyword="FROM:", utf8=False, recipient=False)
    assert (e.value.code, e.value.status) == (553, "5.7.1")


def test_a_quoted_gt_does_not_end_the_path() -> None:
    path, params = parse_path(
        'FROM:<"a>b"@remote.test> BODY=8BITMIME', keyword="FROM:", utf8=False, recipient=False
    )
    assert path.address == '"a>b"@remote.test' and params == "BODY=8BITMIME"


def test_split_params() -> None:
    assert split_params("size=10 BODY=8BITMIME SMTPUTF8") == {
        "SIZE": "10",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }
    for bad in ("SIZE=", "=1", "SIZE=1 size=2", "A=b=c\x7f", "-X"):
        with pytest.raises(PathError) as e:
            split_params(bad)
        assert (e.value.code, e.value.status) == (555, "5.5.4"), bad


# ---------------------------------------------------------------- headers


def _strip(raw: bytes) -> tuple[bytes, int]:
    lines = raw.splitlines(keepends=True)
    end = hdr.split_header(lines)
    kept, removed = hdr.strip_ours(lines, end, AUTHSERV)
    return b"".join(kept) + b"".join(lines[end:]), removed


@pytest.mark.parametrize(
    "field",
    [
        b"X-Kithmail-Verdict: community=accept\r\n",
        b"x-KITHMAIL-anything: 1\r\n",
        b"X-Kithmail-Verdict : spaced before the colon\r\n",
        b"X-Kithmail-Verdict: folded\r\n\tcommunity=accept\r\n",
        b"Received-SPF: pass (forged) client-ip=192.0.2.1\r\n",
        b"received-spf:\r\n pass\r\n",
        b"Authentication-Results: mx.kithmail.test; spf=pass smtp.mailfrom=a.test\r\n",
        b"Authentication-Results: MX.KithMail.TEST; dmarc=pass\r\n",
        b"Authentication-Results: mx.kithmail.test;spf=pass\r\n",
        b"Authentication-Results: mx.kithmail.test 1; spf=pass\r\n",
        b"Authentication-Results: mx.kithmail.test; none\r\n",
        # The authserv-id on a continuation line, behind a comment, quoted
        # (RFC 8601 2.2: CFWS may precede it; it is a token or a quoted-string).
        b"Authentication-Results:\r\n mx.kithmail.test; spf=pass\r\n",
        b"Authentication-Results: (forged) mx.kithmail.test; spf=pass\r\n",
        b"Authentication-Results: (a (nested) comment)\r\n\tmx.kithmail.test; spf=pass\r\n",
        b'Authentication-Results: "mx.kithmail.test"; spf=pass\r\n',
        b"Authentication-Results: (a \\) in a comment) mx.kithmail.test; spf=pass\r\n",
        # No id to be seen (none at all, or not within 4 KiB of comments): ours,
        # since nothing of value is lost, and the scan stays bounded.
        b"Authentication-Results:\r\n",
        b"Authentication-Results: " + b"(" * 5000 + b" mx.kithmail.test; spf=pass\r\n",
    ],
)
def test_fields_only_we_may_write_are_removed(field: bytes) -> None:
    raw = b"From: a@remote.test\r\n" + field + b"Subject: hi\r\n\r\nbody\r\n"
    out, removed = _strip(raw)
    assert removed == 1, out
    assert out == b"From: a@remote.test\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.mark.parametrize(
    "field",
    [
        b"Authentication-Results: other.example; spf=pass\r\n",
        b"Authentication-Results: mx.kithmail.test.other.example; spf=pass\r\n",
        b"Authentication-Results: other.example; spf=pass\r\n (mx.kithmail.test)\r\n",
        b"X-Kithmailish: not ours\r\n",
        b"Received: from mx.kithmail.test by other.example\r\n",
    ],
)
def test_other_fields_are_kept(field: bytes) -> None:
    raw = b"From: a@remote.test\r\n" + field + b"Subject: hi\r\n\r\nbody\r\n"
    out, removed = _strip(raw)
    assert (out, removed) == (raw, 0)


def test_our_names_in_the_body_are_the_body() -> None:
    raw = b"Subject: hi\r\n\r\nX-Kithmail-Verdict: quoted in the body\r\n"
    assert _strip(raw) == (raw, 0)


def test_received_escapes_client_strings() -> None:
    line = hdr.received(
        helo='evil (x)\\y\tz"ü',
        client_ip="2001:db8::7",
        client_name="name (with) parens",
        hostname=AUTHSERV,
        protocol="ESMTPS",
        queue_id="q1",
        recipients=["ann@example.test"],
        tls="TLSv1.3:TLS_AES_256_GCM_SHA384",
        when=0,
    )
    text = line.decode("ascii")
    assert text.startswith(
        'Received: from evil??x??y?z"? (name??with??parens [IPv6:2001:db8::7])\r\n'
        "\tby mx.kithmail.test (kithmail)\r\n\t(TLSv1.3:TLS_AES_256_GCM_SHA384)\r\n"
        "\twith ESMTPS id q1\r\n\tfor <ann@example.test>; "
    ), text
    assert text.endswith("\r\n") and text.count("\r\n") == 5
    many = hdr.received(
        helo="h",
        client_ip="192.0.2.1",
        client_name=None,
        hostname=AUTHSERV,
        protocol="SMTP",
        queue_id="q2",
        recipients=["a@example.test", "b@example.test"],
        tls=None,
        when=0,
    )
    assert b"for <" not in many  # one recipient would disclose the others


# ---------------------------------------------------------------- end to end

src = Sources()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    users = ("ann@example.test", "bob@example.test")
    with module_gateway(tmp_path_factory, "headers", users=users, sections=RECON_EXEMPT) as g:
        yield g


def test_incoming_fields_only_we_may_write_are_removed_end_to_end(gw: Gateway) -> None:
    data = (
        b"From: bob@remote.test\r\nTo: ann@example.test\r\nSubject: forged verdicts\r\n"
        b"X-Kithmail-Verdict: community=accept; reason=community.allowed\r\n"
        b"Received-SPF: pass (mx.kithmail.test: forged)\r\n"
        b"Authentication-Results: mx.kithmail.test; spf=pass smtp.mailfrom=remote.test\r\n"
        b"Authentication-Results:\r\n mx.kithmail.test; dkim=pass\r\n"
        b"Authentication-Results: other.example; spf=fail smtp.mailfrom=remote.test\r\n"
        b"\r\nbody\r\n"
    )
    queue_id = run(deliver_one(gw.port, src(), "ann@example.test", data))
    (got,) = wait_messages(gw, "ann@example.test", 1)
    head = got.split(b"\n\n", 1)[0]
    assert b"X-Kithmail-Verdict: community=accept" not in head
    assert b"Received-SPF" not in head
    assert b"spf=pass" not in head and b"dkim=pass" not in head
    assert b"Authentication-Results: other.example; spf=fail smtp.mailfrom=remote.test" in head
    assert b"Subject: forged verdicts" in head
    (line,) = log_lines(gw, f"queue_id={queue_id}", "result=accepted")
    assert "removed_headers=4" in line, line


def test_odd_helo_is_escaped_in_received(gw: Gateway) -> None:
    async def go() -> None:
        c, _ = await smtp_session(gw.port, src(), ehlo='odd(helo)\\"ünï')
        try:
            assert (await c.cmd("MAIL FROM:<bob@remote.test>")).code == 250
            assert (await c.cmd("RCPT TO:<bob@example.test>")).code == 250
            assert (await c.cmd("DATA")).code == 354
            await c.send(message("odd helo") + b".\r\n")
            assert (await c.reply()).code == 250
        finally:
            await quit_(c)

    run(go())
    (got,) = wait_messages(gw, "bob@example.test", 1)
    received = got.split(b"\nReceived: ", 1)[1].split(b"\n", 1)[0]
    assert received.startswith(b'from odd?helo??"?n? ([127.0.0.'), received
    assert all(32 <= b < 127 for b in received)
