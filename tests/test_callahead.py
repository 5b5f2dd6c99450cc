"""Call-ahead against real downstreams: smtp-sink and aiosmtpd's LMTP server.

Probes are counted where they land (the sink's command log, the LMTP
handler's RCPT list), so caching and sharing are proved by the peer, not
by the client's own counter. Time moves by a clock the test owns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from lmtp_server import LmtpServer, lmtp_server
from postfix_server import free_port
from sink import smtp_sink

from kithmail.queue.callahead import CallAhead


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lmtp() -> Iterator[LmtpServer]:
    with lmtp_server() as server:
        server.handler.rcpt_replies["nobody@example.test"] = "550 5.1.1 no such user"
        server.handler.rcpt_replies["busy@example.test"] = "450 4.2.1 try later"
        yield server


def make(url: str, clock: Clock | None = None, **kw: float) -> CallAhead:
    return CallAhead(
        url,
        hostname="mx.kithmail.test",
        ttl=kw.pop("ttl", 3600),
        negative_ttl=kw.pop("negative_ttl", 600),
        timeout=kw.pop("timeout", 5),
        clock=clock or Clock(),
        max_entries=int(kw.pop("max_entries", 100)),
    )


def test_lmtp_exists_unknown_tempfail_and_what_is_cached(lmtp: LmtpServer) -> None:
    async def main() -> None:
        ca = make(lmtp.url)
        assert await ca.check("bob@example.test") == "exists"
        assert await ca.check("nobody@example.test") == "unknown"
        assert await ca.check("busy@example.test") == "tempfail"
        # Again: the first two from the cache, the tempfail asked anew.
        assert await ca.check("BOB@example.test") == "exists"
        assert await ca.check("nobody@example.test") == "unknown"
        assert await ca.check("busy@example.test") == "tempfail"

    asyncio.run(main())
    assert lmtp.handler.rcpts == [
        "bob@example.test",
        "nobody@example.test",
        "busy@example.test",
        "busy@example.test",
    ]
    assert lmtp.handler.messages == []  # a probe never sends a message


def test_entries_expire_after_their_ttl(lmtp: LmtpServer) -> None:
    clock = Clock()

    async def main() -> None:
        ca = make(lmtp.url, clock, ttl=100, negative_ttl=10)
        assert await ca.check("bob@example.test") == "exists"
        assert await ca.check("nobody@example.test") == "unknown"
        clock.now += 11  # the negative entry is stale, the positive is not
        assert await ca.check("bob@example.test") == "exists"
        assert await ca.check("nobody@example.test") == "unknown"
        clock.now += 100
        assert await ca.check("bob@example.test") == "exists"

    asyncio.run(main())
    assert lmtp.handler.rcpts == [
        "bob@example.test",
        "nobody@example.test",
        "nobody@example.test",
        "bob@example.test",
    ]


def test_concurrent_checks_share_one_probe(lmtp: LmtpServer) -> None:
    async def main() -> list[str]:
        ca = make(lmtp.url)
        answers = await asyncio.gather(*(ca.check("carol@example.test") for _ in range(20)))
        assert ca.probes == 1
        return list(answers)

    assert asyncio.run(main()) == ["exists"] * 20
    assert lmtp.handler.rcpts == ["carol@example.test"]


def test_the_cache_is_bounded_lru(lmtp: LmtpServer) -> None:
    async def main() -> None:
        ca = make(lmtp.url, max_entries=2)
        for a in ("a@example.test", "b@example.test", "a@example.test", "c@example.test"):
            assert await ca.check(a) == "exists"
        # b was the least recently used: evicted; a and c are still cached.
        for a in ("a@example.test", "c@example.test", "b@example.test"):
            assert await ca.check(a) == "exists"

    asyncio.run(main())
    assert lmtp.handler.rcpts == [
        "a@example.test",
        "b@example.test",
        "c@example.test",
        "b@example.test",
    ]


def test_smtp_sink_exists_and_cached() -> None:
    async def main(url: str) -> None:
        ca = make(url)
        assert await ca.check("bob@example.test") == "exists"
        assert await ca.check("bob@example.test") == "exists"

    with smtp_sink() as sink:
        asyncio.run(main(sink.url))
        assert sink.rcpts() == ["<bob@example.test>"]
        assert "MAIL FROM:<>" in sink.log()
        assert sink.messages() == []


def test_smtp_sink_5xx_is_unknown_4xx_is_tempfail() -> None:
    async def main(url: str) -> str:
        return await make(url).check("bob@example.test")

    with smtp_sink("-f", "RCPT") as sink:
        assert asyncio.run(main(sink.url)) == "unknown"
    with smtp_sink("-r", "RCPT") as sink:
        assert asyncio.run(main(sink.url)) == "tempfail"
    with smtp_sink("-r", "MAIL") as sink:  # not the address's fault
        assert asyncio.run(main(sink.url)) == "tempfail"


def test_nothing_listening_or_too_slow_is_tempfail_and_not_cached() -> None:
    async def down() -> list[str]:
        ca = make(f"smtp://127.0.0.1:{free_port()}")
        return [await ca.check("bob@example.test"), await ca.check("bob@example.test")]

    assert asyncio.run(down()) == ["tempfail", "tempfail"]

    async def slow(url: str) -> str:
        return await make(url, timeout=0.5).check("bob@example.test")

    with smtp_sink("-W", "RCPT:30") as sink:  # answers RCPT after 30 s
        assert asyncio.run(slow(sink.url)) == "tempfail"


def test_a_maildir_downstream_cannot_be_asked() -> None:
    with pytest.raises(ValueError, match="smtp:// or lmtp://"):
        make("maildir:/var/mail")
