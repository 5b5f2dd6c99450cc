"""End to end: a real Postfix asks `kith policy` at RCPT, swaks is the client.

Postfix (Debian's, a private instance: postfix_server.py) relays what it
accepts for example.test to smtp-sink, one file per message. Clients send
from loopback addresses other than 127.0.0.1 (Postfix's only mynetworks and
kithmail's only trusted network), so kithmail sees them as outsiders:
a new source is greylisted (Postfix's 450 with kithmail's text, nothing
queued), its retry after `[recon] min_delay` (2 s) is delivered, and a
block-listed source ends with a 5xx and nothing delivered.

Waits are bounded polls (retry every 0.5 s for at most 10 s), never a sleep
of a guessed length. Recon counts whole seconds, so a retry within 1 s of
the first attempt is always too early, and a pass is never sooner than 1 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postfix_server import (
    Attempt,
    KithPolicy,
    Postfix,
    kith_policy,
    postfix_instance,
    swaks,
)

MIN_DELAY = 2  # [recon] min_delay in kith_policy's config
RETRY_EVERY = 0.5
RETRY_FOR = 10.0


@pytest.fixture
def policy(tmp_path: Path) -> Iterator[KithPolicy]:
    with kith_policy(tmp_path, min_delay=f"{MIN_DELAY}s") as server:
        yield server


@pytest.fixture
def postfix(policy: KithPolicy, tmp_path: Path) -> Iterator[Postfix]:
    with postfix_instance(policy.port, keep_logs=tmp_path) as pf:
        yield pf


def greylisted(a: Attempt) -> bool:
    return a.rcpt_code == 450 and "Greylisted" in a.rcpt_reply


def retry_while_greylisted(
    pf: Postfix, source: str, *, sender: str, to: str, subject: str
) -> list[tuple[float, float, Attempt]]:
    """Send until the reply is not a greylisting (or RETRY_FOR passes).

    Every attempt as (monotonic start, monotonic end, Attempt); a test
    asserts on the last one. Nothing may reach the sink while deferred.
    """
    attempts: list[tuple[float, float, Attempt]] = []
    deadline = time.monotonic() + RETRY_FOR
    while True:
        start = time.monotonic()
        a = swaks(pf, source, sender=sender, to=to, subject=subject)
        attempts.append((start, time.monotonic(), a))
        if not greylisted(a) or time.monotonic() > deadline:
            return attempts
        assert a.queue_id is None, a.output
        assert pf.delivered() == []
        time.sleep(RETRY_EVERY)


def test_new_source_is_greylisted_then_its_retry_is_delivered(postfix: Postfix) -> None:
    source = "127.0.0.5"
    attempts = retry_while_greylisted(
        postfix, source, sender="ann@sender-one.example", to="bob@example.test", subject="gl-5"
    )
    first_start, _, first = attempts[0]
    # Postfix's 450 around kithmail's DEFER_IF_PERMIT text; nothing queued.
    assert first.rcpt_code == 450, first.output
    assert first.rcpt_reply.startswith("450 4.7.1 <bob@example.test>: "), first.rcpt_reply
    assert "Greylisted: this server is new to us" in first.rcpt_reply
    assert first.queue_id is None

    _, last_end, last = attempts[-1]
    assert last.rcpt_code == 250, last.output
    assert last.queue_id is not None, last.output
    for _, _, a in attempts[:-1]:
        assert greylisted(a), a.output
    # Retries within 1 s of the first attempt are always too early ...
    for _, end, a in attempts:
        if end - first_start < MIN_DELAY - 1:
            assert greylisted(a), f"passed {end - first_start:.2f} s after the first attempt"
    # ... and the pass came after min_delay (counted in whole seconds).
    assert last_end - first_start > MIN_DELAY - 1

    postfix.wait_sent(last.queue_id)
    files = postfix.delivered()
    assert len(files) == 1, files
    text = files[0].read_text(errors="replace")
    assert "Subject: gl-5" in text
    assert f"[{source}]" in text  # Postfix's Received: names the real client


def test_block_listed_source_is_rejected_and_nothing_is_delivered(
    postfix: Postfix, policy: KithPolicy, tmp_path: Path
) -> None:
    source = "127.0.0.7"
    listed = tmp_path / "block.txt"
    listed.write_text(f"# the test's own block list\n{source}/32\n")
    policy.kith("reputation", "load", str(listed), "--name", "postfix-e2e", "--kind", "block")

    # Recon runs first (DESIGN.md): a never-seen listed source may be
    # greylisted before Reputation rejects it; what it ends with is a 5xx.
    attempts = retry_while_greylisted(
        postfix, source, sender="eve@sender-two.example", to="bob@example.test", subject="bl-7"
    )
    last = attempts[-1][2]
    assert 500 <= last.rcpt_code < 600, last.output
    assert last.rcpt_reply.startswith(f"{last.rcpt_code} 5.7.1 <bob@example.test>: ")
    assert f"Client host [{source}] is on a local block list" in last.rcpt_reply
    assert all(a.queue_id is None for _, _, a in attempts)
    assert postfix.delivered() == []
    postfix.wait_log(f"NOQUEUE: reject: RCPT from unknown[{source}]: {last.rcpt_code} ")


def test_trusted_network_skips_recon(postfix: Postfix) -> None:
    # 127.0.0.1 is kithmail's trusted network: DUNNO at once. (It is Postfix's
    # mynetworks too, but a DEFER_IF_PERMIT before permit_mynetworks would
    # still defer: a 250 here is kithmail's doing.)
    a = swaks(
        postfix,
        "127.0.0.1",
        sender="ops@sender-three.example",
        to="bob@example.test",
        subject="trusted",
    )
    assert a.rcpt_code == 250, a.output
    assert a.queue_id is not None
    postfix.wait_sent(a.queue_id)
    assert len(postfix.delivered()) == 1
