"""Messages written to attack the page that shows them.

Each carries script where a careless page would run it: a ``<script>``
subject written plainly, one hidden in an RFC 2047 encoded word, a
``javascript:`` link and ``<script>`` in the text part, an HTML part with
``<script>``, ``onload``, a ``javascript:`` link, a ``<meta refresh>`` and a
remote image (a tracking pixel), and a U+202E RIGHT-TO-LEFT OVERRIDE in
the From display name, the subject and an attachment's file name
(``invoice<U+202E>gpj.exe`` reads as ``invoiceexe.jpg``).
"""

from __future__ import annotations

import base64

RLO = "\u202e"
SCRIPT_SUBJECT = "<script>alert('subject')</script>"
ENCODED_SCRIPT = (
    "=?utf-8?b?" + base64.b64encode(b"<script>alert('encoded')</script>").decode() + "?="
)
RLO_NAME = "=?utf-8?b?" + base64.b64encode(f"Bank{RLO}evil".encode()).decode() + "?="
RLO_FILE = "invoice%E2%80%AEgpj.exe"  # RFC 2231: invoice<U+202E>gpj.exe

TEXT_BODY = (
    "Dear customer,\r\n"
    "Click <a href=\"javascript:alert('text-link')\">here</a>\r\n"
    "<script>alert('text')</script>\r\n"
    "javascript:alert('bare')\r\n"
)
HTML_BODY = (
    '<html><head><meta http-equiv="refresh" content="0;url=http://evil.test/">'
    "<script>alert('html')</script></head>"
    "<body onload=\"alert('onload')\"><p>Your <b>invoice</b></p>"
    "<a href=\"javascript:alert('html-link')\">pay now</a>"
    '<img src="http://evil.test/pixel.png" onerror="alert(\'img\')">'
    "<svg><script>alert('svg')</script></svg></body></html>"
)


def plain(sender: str = "eve@remote.test", rcpt: str = "ann@example.test") -> bytes:
    """A plain message whose subject is a script tag, written plainly."""
    return (
        f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {SCRIPT_SUBJECT}\r\n"
        "Message-ID: <plain-hostile@remote.test>\r\n\r\n" + TEXT_BODY
    ).encode()


def rich(sender: str = "eve@remote.test", rcpt: str = "ann@example.test") -> bytes:
    """Encoded-word script subject with a U+202E, text and HTML parts, a U+202E file name."""
    subject_rlo = "=?utf-8?b?" + base64.b64encode(f"Re: {RLO}txt.exe".encode()).decode() + "?="
    return (
        f"From: {RLO_NAME} <{sender}>\r\n"
        f"To: {rcpt}\r\n"
        f"Subject: {ENCODED_SCRIPT} {subject_rlo}\r\n"
        "Message-ID: <rich-hostile@remote.test>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n'
        "\r\n"
        "--b1\r\n"
        'Content-Type: multipart/alternative; boundary="b2"\r\n'
        "\r\n"
        "--b2\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n" + TEXT_BODY + "--b2\r\n"
        "Content-Type: text/html; charset=utf-8\r\n"
        "\r\n" + HTML_BODY + "\r\n"
        "--b2--\r\n"
        "--b1\r\n"
        "Content-Type: application/octet-stream\r\n"
        f"Content-Disposition: attachment; filename*=utf-8''{RLO_FILE}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        "\r\n"
        "TVqQAAMAAAAEAAAA\r\n"
        "--b1--\r\n"
    ).encode()


RLO_SENDER = f"gpj.exe{RLO}ann@remote.test"  # reads "ann@remote.testexe.jpg"-ish


async def send_rlo_sender(port: int, rcpt: str = "ann@example.test") -> int:
    """One message whose envelope sender (SMTPUTF8) and From carry a U+202E; the final code."""
    from gateway import Client

    c, greeting = await Client.connect(port, "127.0.0.2")
    assert greeting is not None and greeting.code == 220
    try:
        await c.cmd("EHLO client.example")
        assert (await c.cmd(f"MAIL FROM:<{RLO_SENDER}> SMTPUTF8")).code == 250
        assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        await c.send(
            (
                f"From: {RLO_SENDER}\r\nTo: {rcpt}\r\nSubject: from {RLO_SENDER}\r\n"
                "Message-ID: <rlo-sender@remote.test>\r\n\r\nhi\r\n.\r\n"
            ).encode()
        )
        return (await c.reply()).code
    finally:
        await c.cmd("QUIT")
        await c.close()


def broken(rcpt: str = "ann@example.test") -> bytes:
    """Broken MIME: an unknown charset, bad base64, a boundary never closed, a nameless part."""
    return (
        f"From: eve@remote.test\r\nTo: {rcpt}\r\nSubject: broken mime\r\n"
        "Message-ID: <broken@remote.test>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="never"\r\n\r\n'
        "--never\r\n"
        "Content-Type: text/plain; charset=x-no-such-charset\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        "!!!not base64 at all===\r\n"
        "--never\r\n"
        "Content-Type: application/pdf\r\n"
        'Content-Disposition: attachment; filename="=?bogus?q?x?="\r\n\r\n'
        "%PDF-1.4 truncated\r\n"
    ).encode()
