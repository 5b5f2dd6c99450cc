"""The gateway in front of another mail server: lmtp:// delivery and call-ahead.

A gateway in front of Exchange does not know its users: with
`verify_recipients = "downstream"` the gateway asks the downstream server
(a real LMTP server on loopback, aiosmtpd's) whether a recipient exists, at
RCPT, and caches the answer. An unknown recipient gets 550 5.1.1 at RCPT —
never accept-then-bounce — and a known one is delivered over LMTP.
"""

from __future__ import annotations

from pathlib import Path

from gateway import run, running_gateway, send
from lmtp_server import lmtp_server


def test_call_ahead_refuses_unknown_and_delivers_known_over_lmtp(tmp_path: Path) -> None:
    with lmtp_server() as down:
        down.handler.rcpt_replies["ghost@example.test"] = "550 5.1.1 No such user"
        with running_gateway(
            tmp_path / "gw",
            users=(),  # the gateway knows no users: the downstream does
            sections={
                "domains": {"downstream": down.url, "verify_recipients": "downstream"},
                "recon": {"exempt_networks": ["127.0.0.0/24"]},
            },
        ) as gw:
            bad = run(send(gw.port, "127.0.0.7", "bob@remote.test", ["ghost@example.test"]))
            assert (bad[2].code, bad[2].status) == (550, "5.1.1"), bad[2]
            again = run(send(gw.port, "127.0.0.7", "bob@remote.test", ["ghost@example.test"]))
            assert again[2].code == 550
            # The second answer came from the cache: one probe only.
            assert down.handler.rcpts.count("ghost@example.test") == 1
            ok = run(send(gw.port, "127.0.0.7", "bob@remote.test", ["zoe@example.test"]))
            assert ok[-1].code == 250, ok
            gw.wait_for("the LMTP delivery", lambda: down.handler.messages)
            got = down.handler.messages[0]
            assert got.rcpt_tos == ["zoe@example.test"]
            assert got.mail_from == "bob@remote.test"
            assert b"Received: from client.example ([127.0.0.7])" in got.data
