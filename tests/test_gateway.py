"""The gateway end to end: `kith serve` on loopback, mail from outside to a Maildir.

What a mail admin checks first: a never-seen source is deferred with a
451 4.7.1 and a reason; its retry after min_delay passes and the message
lands in the user's Maildir with our Received header; a known source
passes at once; the transaction is logged in one line.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

from gateway import (
    Client,
    Gateway,
    Reply,
    free_port,
    make_gateway,
    message,
    run,
    running_gateway,
    send,
)


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


def test_two_workers_share_the_port_and_deliver_everything(tmp_path: Path) -> None:
    with running_gateway(
        tmp_path,
        sections={"server": {"workers": 2}, "recon": {"exempt_networks": ["127.0.3.0/24"]}},
    ) as gw:

        async def many() -> list[list[Reply]]:
            return await asyncio.gather(
                *(
                    send(
                        gw.port,
                        f"127.0.3.{i}",
                        "bob@remote.test",
                        ["ann@example.test"],
                        message(f"w{i}"),
                    )
                    for i in range(1, 31)
                )
            )

        gw.wait_for("both workers", lambda: gw.log_text().count("kithmail ready") == 2)
        results = run(many())
        assert [r[-1].code for r in results] == [250] * 30
        got = gw.wait_for("30 deliveries", lambda: len(gw.messages("ann@example.test")) == 30)
        assert got
        pids = set(re.findall(r"kithmail\.smtp\.transaction\[(\d+)\]", gw.log_text()))
        assert len(pids) == 2, pids  # both workers took connections
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.web_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        accepted = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith('kithmail_smtp_messages_total{result="accepted"}')
        ]
        assert accepted == [30.0], accepted  # merged across the two workers


def test_ipv6_listener_where_configured(tmp_path: Path) -> None:
    gw = make_gateway(tmp_path, sections={"recon": {"min_delay": "60s"}})
    port6 = free_port()
    text = gw.config.read_text()
    v4 = f'"127.0.0.1:{gw.port}"'
    assert v4 in text
    gw.config.write_text(text.replace(v4, f'{v4}, "[::1]:{port6}"', 1))
    gw.start()
    try:

        async def over_v6(source: str) -> list[Reply]:
            c, hello = await Client.connect(port6, source, host="::1")
            assert hello is not None and hello.code == 220
            try:
                return await c.transaction("bob@remote.test", ["ann@example.test"], message("v6"))
            finally:
                await c.close()

        # ::1 is not in this config's trusted_networks: an outsider, judged by Recon.
        r = run(over_v6("::1"))
        assert (r[2].code, r[2].status) == (451, "4.7.1"), r[2]
        gw.wait_for("the transaction's log line", lambda: "client=::1" in gw.log_text())
    finally:
        gw.stop()
        gw.kill()
