"""`kith queue list|show|hold|release|flush|delete` as subprocesses, beside a running queue.

The queue runs in the test's event loop over the same spool the `kith`
process opens, as in production the server does; the commands reach it
only through the spool. The downstream is a real smtp-sink; "down" is a
port nothing listens on, and the sink is started there later.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from postfix_server import free_port
from prometheus_client import CollectorRegistry
from sink import Sink, sink_root, smtp_sink, start_sink

from kithmail import config
from kithmail.queue import Queue
from kithmail.spool import Envelope, Outcome, Recipient, Spool, State

KITH = Path(sys.executable).parent / "kith"
MSG = b"From: ann@example.org\r\nSubject: for the queue\r\n\r\nbody text\r\n"


def write_config(tmp_path: Path, downstream: str) -> Path:
    cfg = tmp_path / "kithmail.toml"
    cfg.write_text(
        f"""\
[server]
hostname = "mx.kithmail.test"
data_dir = "{tmp_path / "var"}"

[domains]
local = ["example.test"]
downstream = "{downstream}"

[queue]
backoff = ["1h"]
"""
    )
    return cfg


def kith(cfg: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(KITH), "-c", str(cfg), "queue", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if ok and done.returncode != 0:
        raise AssertionError(f"kith queue {' '.join(args)}: {done.returncode} {done.stderr}")
    return done


def envelope(*rcpts: str) -> Envelope:
    return Envelope(
        received=time.time() - 90,
        client_ip="192.0.2.7",
        helo="client.example.org",
        mail_from="ann@example.org",
        recipients=tuple(Recipient(r, Outcome.DELIVER) for r in rcpts),
    )


async def wait_for(cond: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def akith(cfg: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(kith, cfg, *args, ok=ok)


def test_list_show_hold_release(tmp_path: Path) -> None:
    with smtp_sink() as sink:
        cfg = write_config(tmp_path, sink.url)
        settings = config.load(cfg)
        spool = Spool(tmp_path / "var" / "spool")
        held = spool.accept_sync(envelope("bob@example.test", "carol@example.test"), MSG)
        other = spool.accept_sync(envelope("dave@example.test"), MSG)

        listed = json.loads(kith(cfg, "list", "--json").stdout)
        assert [m["queue_id"] for m in listed] == [held, other]
        first = listed[0]
        assert first["sender"] == "ann@example.org" and first["size"] == len(MSG)
        assert first["held"] is False and first["age_seconds"] >= 90
        assert [(r["address"], r["state"]) for r in first["recipients"]] == [
            ("bob@example.test", "pending"),
            ("carol@example.test", "pending"),
        ]

        shown = kith(cfg, "show", held).stdout
        assert "<ann@example.org>" in shown and "bob@example.test  pending" in shown
        assert "Subject: for the queue" in shown and "body text" not in shown

        kith(cfg, "hold", held)
        assert f"{held} (on hold)" in kith(cfg, "list").stdout

        async def main() -> None:
            q = Queue(spool, settings, registry=CollectorRegistry())
            await q.start()
            try:
                await wait_for(lambda: spool.queue_ids_sync() == [held], "the other to go")
                # The held one was due as early and was not attempted.
                assert [r.state for r in spool.load_sync(held).recipients] == [State.PENDING] * 2
                assert len(sink.messages()) == 1
                await akith(cfg, "release", held)
                await wait_for(lambda: spool.queue_ids_sync() == [], "the released one to go")
            finally:
                await q.stop(5)

        asyncio.run(main())
        assert len(sink.messages()) == 2
        assert "0 message(s) in the queue" in kith(cfg, "list").stdout


def test_flush_retries_now_and_delete_ends_a_message(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, f"smtp://127.0.0.1:{port}")
    settings = config.load(cfg)
    spool = Spool(tmp_path / "var" / "spool")

    async def main(root: Path) -> Sink:
        q = Queue(spool, settings, registry=CollectorRegistry())
        await q.start()
        try:
            keep = await spool.accept(envelope("bob@example.test"), MSG)
            drop = await spool.accept(envelope("carol@example.test"), MSG)
            q.notify(keep)
            q.notify(drop)

            def both_deferred() -> bool:
                return all(
                    spool.load_sync(i).recipients[0].state is State.DEFERRED for i in (keep, drop)
                )

            await wait_for(both_deferred, "both deferred (downstream down)")
            listed = json.loads((await akith(cfg, "list", "--json")).stdout)
            assert listed[0]["recipients"][0]["detail"].startswith(
                f"attempt 1 via 127.0.0.1:{port}: 451 4.4."
            )

            out = (await akith(cfg, "delete", drop)).stdout
            assert "deleted" in out
            assert spool.queue_ids_sync() == [keep]

            sink = await asyncio.to_thread(start_sink, root, port)
            # Backoff is an hour: only the flush makes it go now.
            await akith(cfg, "flush", keep)
            await wait_for(lambda: spool.queue_ids_sync() == [], "delivery after flush")
            return sink
        finally:
            await q.stop(5)

    with sink_root() as root:
        sink = asyncio.run(main(root))
        try:
            [got] = sink.messages()
            assert b"<bob@example.test>" in got
        finally:
            sink.stop()


def test_unknown_ids_are_errors(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "maildir:" + str(tmp_path / "mail"))
    Spool(tmp_path / "var" / "spool")
    for action in ("show", "hold", "release", "delete", "flush"):
        done = kith(cfg, action, "0000000000000000000", ok=False)
        assert done.returncode == 1, (action, done.stdout, done.stderr)
        assert "not in the spool" in done.stderr
        done = kith(cfg, action, "../../etc/passwd", ok=False)
        assert done.returncode == 1 and "not a queue id" in done.stderr
