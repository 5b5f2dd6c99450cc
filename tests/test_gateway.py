"""The gateway end to end: `kith serve` on loopback, mail from outside to a Maildir.

What a mail admin checks first: a never-seen source is deferred with a
451 4.7.1 and a reason; its retry after min_delay passes and the message
lands in the user's Maildir with our Received header; a known source
passes at once; the transaction is logged in one line.
"""

from __future__ import annotations

import time
from pathlib import Path

from gateway import Gateway, message, run, running_gateway, send


def test_new_source_is_deferred_then_its_retry_is_delivered(tmp_path: Path) -> None:
    with running_gateway(tmp_path) as gw:
        first = run(send(gw.port, "127.0.0.20", "bob@remote.test", ["ann@example.test"]))
        rcpt = first[2]
        assert (rcpt.code, rcpt.status) == (451, "4.7.1"), rcpt
        assert "Greylisted" in rcpt.text
        assert gw.messages("ann@example.test") == []
        time.sleep(2.2)  # min_delay is 2 s: the retry must come after it
        again = run(
            send(
                gw.port,
                "127.0.0.20",
                "bob@remote.test",
                ["ann@example.test"],
                message("second try"),
            )
        )
        assert again[2].code == 250, again[2]
        done = again[-1]
        assert (done.code, done.status) == (250, "2.0.0"), done
        queue_id = done.text.rsplit(" ", 1)[1]
        got = gw.wait_for("delivery to ann", lambda: gw.messages("ann@example.test"))
        assert len(got) == 1
        assert b"Subject: second try" in got[0]
        assert f"id {queue_id}".encode() in got[0]
        assert b"Received: from client.example ([127.0.0.20])" in got[0]
        log = gw.log_text()
        assert f"queue_id={queue_id}" in log and "recon.passed" in log


def _gw_started(gw: Gateway) -> None:
    assert gw.proc is not None
