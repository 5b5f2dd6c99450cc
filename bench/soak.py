#!/usr/bin/env python3
"""Soak of kithmail's gateway (`kith serve`): a mixed load for N minutes, then the books.

For ``--minutes`` (10 by default; 0.2 works) one asyncio process offers an
open-loop load from many loopback source addresses (each connection binds
its own 127.x.y.z; Linux routes all of 127/8 to lo):

- **flood**: a never-seen source per connection that never retries
  (EHLO, MAIL, RCPT, QUIT); Recon must answer ``451 4.7.1``;
- **spam**: sources on a local block list (``[reputation] local_lists``);
  Recon defers each the first time, then Reputation refuses (5xx) — never 250;
- **legitimate mail** to many users, in four classes: from a *known* source
  (passed by Recon in a first round before the load) or a *new* one (it is
  deferred, waits ``min_delay`` and retries from the same address, as a real
  MTA does), and from a *member* of the recipient's community (SPF passes
  for its domain, so it is delivered; from a new source, Recon is skipped
  for it) or a *stranger* (held in the recipient's quarantine and, the first
  time, challenged by SAV);
- **SAV replies**: the challenges leave through ``[domains] outbound`` to a
  capture server in this process; half the strangers answer theirs by
  mailing the ``sav+<token>`` address from a known source, which releases
  everything held from them for that user and makes them members.

Meanwhile the downstream (bench/_soak_sink.py, which records every
delivered message's ``X-Soak-Id``) is killed with SIGKILL for 20 % of the
run (from 25 % to 45 %) and started again on the same port, and the gateway
gets SIGHUP twice, at 15 % and at 70 %, each time after its config file is
rewritten with one value changed (when this kithmail reloads on SIGHUP;
before that SIGHUP ended the server, so ``--sighup auto`` skips it and says
so). Two, because the first reload in a process costs a one-time step of
memory (about 7 MB a worker, measured: further reloads add nothing); the
second, inside the measured half, shows whether a reload leaks.

At the end it stops the load, lets the retries and replies finish, waits
(bounded) for the queue to drain, and checks and reports:

- **zero lost**: every message answered 250 is at the downstream or in a
  quarantine (the quarantine index in kithmail.db, by the queue id the 250
  named); duplicates are counted, and only a copy recorded within 2 s before
  the kill counts as "in flight when the downstream died";
- **memory**: the gateway's RSS (every process: the parent and each
  worker, /proc/PID/status VmRSS, sampled every second); the growth over
  the second half is the median of the last 5 % of the samples against the
  median of the 5 % after the midpoint; under 5 % passes;
- the **p50/p99 of the SMTP transaction** (MAIL to the 250 after the final
  dot, per accepted message, timed on the client) overall and per class;
- **messages and connections per second**, overall and per class.

The **baseline**, measured in the same run after the soak: the same mix's
legitimate share (the same rates, sizes and client code, from the same
kinds of sources) sent for ``--baseline-seconds`` to Postfix (smtpd, its
fsync'd queue, smtp) delivering to the same recording sink. Postfix is
DESIGN.md's SMTP baseline and does the same durable job; it greylists
nothing, so every message is accepted at once (``--baseline aiosmtpd`` uses
the bare aiosmtpd sink instead: no root needed, a floor for the library).

Pinning: with two cores the gateway (all its processes) runs on core 1 and
this process, the sinks and dnsmasq on core 0 (taskset); ``--no-pin`` turns
it off. The figures are for a machine others may be using: the CPU other
processes used during the load is recorded (``foreign_cpu_cores``).

Trusts: nothing outside this machine; all traffic is on 127.0.0.0/8 and
every name is under .example or .test (RFC 2606). Postfix needs root.

Run ``bench/soak.py --help``; bench/README.md says how to read the output.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _smtp_client as client
import _smtp_peers as peers
from core import finish, log, machine, workdir
from policy import source_tree
from smtp import background, cpu_busy, foreign_cpu, foreign_snapshot, read_cpu

HERE = os.path.dirname(os.path.abspath(__file__))
LOCAL_DOMAIN = "example.test"
HELO = "mta.soak-client.example"
SPF = "v=spf1 ip4:127.0.0.0/8 -all"
MEMBER_DOMAINS = 20
STRANGER_DOMAINS = 20
FLOOD_DOMAIN = "flood.example"
SPAM_DOMAIN = "spam.example"
WARMUP_SENDER = "warmup@warm.example"  # no SPF record: held, never challenged
LISTED_NET = "127.66.0.0/16"
KNOWN_NET = 20  # known sources: 127.20.0.x
SAV_ADDRESS = re.compile(rb"sav\+[a-z2-7]+@example\.test", re.IGNORECASE)
QUEUED_AS = re.compile(r"queued as (\S+)")
NEW_STRANGER_SHARE = 0.3  # of the strangers' messages: from a sender never seen before
LEGIT = ("member_known", "member_new", "stranger_known", "stranger_new")
CLASSES = ("flood", "spam", *LEGIT, "sav_reply")
# Where in the run (a fraction of it) each event happens.
KILL_AT, RESTART_AT, SIGHUP_AT = 0.25, 0.45, (0.15, 0.70)
IN_FLIGHT_WINDOW = 2.0  # s before the kill: a copy recorded then may come again
WORDS = client.WORDS


def rss_of(pid: int) -> int:
    """VmRSS of one process in bytes (0 when it is gone)."""
    return rss_parts_of(pid)[0]


def rss_parts_of(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, RssFile + RssShmem) of one process in bytes (zeros when it is gone).

    The split says what grows: anonymous memory is the process's own heap;
    file-backed pages include the core's LMDB map, which every worker maps
    and which each worker's VmRSS counts again.
    """
    got = {"VmRSS:": 0, "RssAnon:": 0, "RssFile:": 0, "RssShmem:": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":", 1)[0] + ":"
                if key in got:
                    got[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return got["VmRSS:"], got["RssAnon:"], got["RssFile:"] + got["RssShmem:"]


def cpu_of(pid: int) -> float:
    """utime + stime of one process in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def pct(lat: array.array[int], p: float) -> float | None:
    s = sorted(lat)
    return round(s[min(len(s) - 1, int(p * len(s)))] / 1e6, 3) if s else None


def lat_json(lat: array.array[int]) -> dict[str, float | None]:
    return {
        "p50_ms": pct(lat, 0.50),
        "p90_ms": pct(lat, 0.90),
        "p99_ms": pct(lat, 0.99),
        "max_ms": round(max(lat) / 1e6, 3) if lat else None,
    }


@dataclass
class ClassStats:
    """What one class of the load did."""

    arrivals: int = 0
    skipped: int = 0  # arrivals dropped because the generator had too many in flight
    connections: int = 0
    accepted: int = 0  # 250 at the end of DATA (legitimate classes, SAV replies)
    deferred_first: int = 0  # a legitimate message whose first attempt was deferred
    retries: int = 0
    gave_up: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # flood/spam RCPT, others' failures
    errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    lat: array.array[int] = field(default_factory=lambda: array.array("q"))

    def error(self, key: str, text: str) -> None:
        self.errors[key] += 1
        if len(self.examples) < 5:
            self.examples.append(text[:240])

    def as_json(self, seconds: float) -> dict[str, Any]:
        return {
            "arrivals": self.arrivals,
            "skipped_by_generator": self.skipped,
            "connections": self.connections,
            "accepted": self.accepted,
            "deferred_first": self.deferred_first,
            "retries": self.retries,
            "gave_up": self.gave_up,
            "answers": dict(self.answers),
            "errors": dict(self.errors),
            "error_examples": self.examples,
            "msgs_per_s": round(self.accepted / seconds, 2) if seconds else None,
            "conns_per_s": round(self.connections / seconds, 2) if seconds else None,
            "timed": "MAIL to the 250 after the final dot"
            if self.accepted
            else "connect to the reply to QUIT",
            **lat_json(self.lat),
        }


@dataclass
class Accepted:
    """A message the server answered 250: where it must end up."""

    sid: str
    rcpt: str
    cls: str
    qid: str
    sender: str
    at: float


@dataclass
class Outcome:
    """One SMTP session: the stage and reply it ended on."""

    code: int
    stage: str
    text: str
    lat_ns: int = 0  # MAIL to the final 250, when accepted


class Soak:
    def __init__(self, args: argparse.Namespace, work: str) -> None:
        self.a = args
        self.work = work
        self.rng = random.Random(args.seed)
        self.errors: list[str] = []
        ncpu = len(os.sched_getaffinity(0))
        self.pinned = ncpu >= 2 and shutil.which("taskset") is not None and not args.no_pin
        self.gen_cpus = "0" if self.pinned else ""
        self.srv_cpus = "1" if self.pinned else ""
        if self.pinned:
            os.sched_setaffinity(0, {0})
        self.users = [f"user{i}@{LOCAL_DOMAIN}" for i in range(args.users)]
        self.member_pool = [
            f"m{k}@mem{k % MEMBER_DOMAINS}.example" for k in range(args.users * 2 + 20)
        ]
        self.stranger_pool = [
            f"s{k}@str{k % STRANGER_DOMAINS}.example" for k in range(args.users * 3 + 20)
        ]
        self.members = {u: self.rng.sample(self.member_pool, 8) for u in self.users}
        self.strangers = {u: self.rng.sample(self.stranger_pool, 4) for u in self.users}
        self.known_sources = [f"127.{KNOWN_NET}.{i // 250}.{1 + i % 250}" for i in range(40)]
        self.listed_sources = [f"127.66.0.{i}" for i in range(1, 65)]
        self.bodies = [self._body(self.rng.randint(1_000, 20_000)) for _ in range(16)]
        self.stats = {c: ClassStats() for c in CLASSES}
        self.accepted: list[Accepted] = []
        self.ambiguous: set[str] = set()  # 250 may have been lost on the wire: a retry may double
        self.flood_n = 0
        self.new_strangers = 0
        self.new_n = 0
        self.seq = 0
        self.challenges: list[dict[str, Any]] = []
        self.other_outbound = 0
        self.sav_tasks: set[asyncio.Task[None]] = set()
        self.replied: set[str] = set()
        self.in_flight = 0
        self.load_over = False
        self.want_qid = True  # kithmail and Postfix name the queue id in their 250
        self.rss: list[tuple[float, int, int]] = []  # (t, total bytes, processes)
        self.rss_split: list[tuple[float, int, int]] = []  # (t, anon bytes, file bytes)
        self.cpu: dict[int, tuple[float, float]] = {}  # pid: (first, last) CPU seconds seen
        self.events: dict[str, float] = {}
        self.sighup: dict[str, Any] = {}
        self.procs: list[Any] = []

    # ---------------------------------------------------------------- data

    def _body(self, size: int) -> bytes:
        lines: list[str] = []
        used = 0
        while used < size:
            words: list[str] = []
            while len(" ".join(words)) < 60:
                words.append(self.rng.choice(WORDS))
            line = " ".join(words).capitalize()
            lines.append(line)
            used += len(line) + 2
        return ("\r\n".join(lines) + "\r\n").encode()

    def message(self, sid: str, sender: str, rcpt: str, subject: str) -> bytes:
        head = (
            f"From: <{sender}>\r\n"
            f"To: <{rcpt}>\r\n"
            f"Subject: {subject}\r\n"
            "Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
            f"Message-ID: <{sid}@soak-client.example>\r\n"
            f"X-Soak-Id: {sid}\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n"
        ).encode()
        return head + self.bodies[zlib.crc32(sid.encode()) % len(self.bodies)]

    def next_flood_source(self) -> str:
        n = self.flood_n
        self.flood_n += 1
        return f"127.{100 + n // 64516}.{1 + (n // 254) % 254}.{1 + n % 254}"

    def next_new_source(self) -> str:
        n = self.new_n
        self.new_n += 1
        return f"127.{30 + n // 64516}.{1 + (n // 254) % 254}.{1 + n % 254}"

    # ---------------------------------------------------------------- SMTP

    async def session(self, port: int, source: str, sender: str, rcpt: str, data: bytes) -> Outcome:
        """One connection, one transaction, QUIT; where it ended."""
        try:
            reader, writer = await asyncio.wait_for(client.connect("127.0.0.1", port, source), 30)
        except (OSError, TimeoutError) as e:
            return Outcome(0, "connect", f"{type(e).__name__}: {e}")
        stage = "greeting"
        try:
            code, text = await asyncio.wait_for(client.reply(reader, stage), 60)
            if code != 220:
                return Outcome(code, stage, text)
            steps: list[tuple[str, bytes, int]] = [
                ("EHLO", f"EHLO {HELO}\r\n".encode(), 250),
                ("MAIL", f"MAIL FROM:<{sender}>\r\n".encode(), 250),
                ("RCPT", f"RCPT TO:<{rcpt}>\r\n".encode(), 250),
                ("DATA", b"DATA\r\n", 354),
                ("end of DATA", data + b".\r\n", 250),
            ]
            t0 = 0
            for stage, line, want in steps:
                if stage == "MAIL":
                    t0 = time.perf_counter_ns()
                writer.write(line)
                code, text = await asyncio.wait_for(client.reply(reader, stage), 120)
                if code != want:
                    writer.write(b"QUIT\r\n")
                    with contextlib.suppress(client.SmtpError, OSError, TimeoutError):
                        await asyncio.wait_for(client.reply(reader, "QUIT"), 10)
                    return Outcome(code, stage, text)
            lat = time.perf_counter_ns() - t0
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(client.SmtpError, OSError, TimeoutError):
                await asyncio.wait_for(client.reply(reader, "QUIT"), 10)
            return Outcome(250, "end of DATA", text, lat)
        except client.SmtpError as e:
            return Outcome(e.code, e.stage, e.text)
        except (OSError, TimeoutError) as e:
            return Outcome(0, stage, f"{type(e).__name__}: {e}")
        finally:
            await client.close(writer)

    async def probe_rcpt(self, st: ClassStats, port: int, source: str, sender: str) -> None:
        """A flood or spam connection: EHLO, MAIL, RCPT, QUIT; the RCPT answer counted."""
        r = client.FloodResult()
        rcpt = self.rng.choice(self.users)
        await client._flood_one("127.0.0.1", port, source, HELO, sender, rcpt, r)
        st.connections += 1
        st.answers.update(r.answers)
        for k, n in r.errors.items():
            st.errors[k] += n
        for e in r.examples:
            if len(st.examples) < 5:
                st.examples.append(e)
        st.lat.extend(r.lat)

    async def deliver(
        self,
        st: ClassStats,
        cls: str,
        port: int,
        source: str,
        sender: str,
        rcpt: str,
        sid: str,
        record: bool = True,
    ) -> Outcome | None:
        """Send until 250, retrying as an MTA does: after a 4xx or a broken connection."""
        data = self.message(sid, sender, rcpt, f"soak {cls} {sid}")
        deadline = time.monotonic() + self.a.min_delay * 4 + 60
        attempt = 0
        while True:
            attempt += 1
            o = await self.session(port, source, sender, rcpt, data)
            st.connections += 1
            if o.code == 250:
                st.accepted += 1
                st.lat.append(o.lat_ns)
                if record:
                    m = QUEUED_AS.search(o.text)
                    self.accepted.append(
                        Accepted(sid, rcpt.lower(), cls, m[1] if m else "", sender, time.time())
                    )
                    if not m and self.want_qid:
                        st.error("no queue id", f"{sid}: 250 without a queue id: {o.text}")
                return o
            if attempt == 1 and o.code // 100 == 4 and o.stage == "RCPT":
                st.deferred_first += 1
            if o.code == 0 and o.stage == "end of DATA":
                self.ambiguous.add(sid)  # the data went out; the 250 may have been lost
            if o.code // 100 == 5:
                st.error(f"{o.stage} {o.code}", f"{sid} from {source}: {o.text}")
                return None
            if o.code // 100 != 4 or o.stage != "RCPT":
                st.answers[f"{o.stage} {o.code}"] += 1  # a temporary failure elsewhere
            if time.monotonic() > deadline:
                st.gave_up += 1
                st.error("gave up", f"{sid} from {source}: last {o.stage} {o.code} {o.text}")
                return None
            st.retries += 1
            wait = self.a.min_delay + 0.2 + self.rng.random() if o.code == 451 else 1.0
            await asyncio.sleep(wait)  # an MTA's retry interval, not a readiness wait

    # ---------------------------------------------------------------- the load

    def legit_arrival(self, cls: str, port: int) -> Awaitable[Any]:
        user = self.rng.choice(self.users)
        member = cls.startswith("member")
        if member:
            sender = self.rng.choice(self.members[user])
        elif self.rng.random() < NEW_STRANGER_SHARE:
            # Someone who never wrote before: a challenge (and maybe a reply) all run long.
            self.new_strangers += 1
            n = self.new_strangers
            sender = f"n{n}@str{n % STRANGER_DOMAINS}.example"
        else:
            sender = self.rng.choice(self.strangers[user])
        source = (
            self.rng.choice(self.known_sources) if cls.endswith("known") else self.next_new_source()
        )
        self.seq += 1
        sid = f"{cls}-{self.seq}"
        return self.deliver(self.stats[cls], cls, port, source, sender, user, sid)

    async def arrivals(
        self, rate: float, end: float, make: Callable[[], Awaitable[Any]], st: ClassStats
    ) -> None:
        """Poisson arrivals at `rate`/s until `end`; each a task (open loop)."""
        if rate <= 0:
            return
        tasks: set[asyncio.Task[Any]] = set()
        rng = random.Random(self.rng.random())
        nxt = time.monotonic()
        while True:
            nxt += rng.expovariate(rate)
            if nxt >= end:
                break
            delay = nxt - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival schedule
            st.arrivals += 1
            if self.in_flight >= self.a.max_in_flight:
                st.skipped += 1
                continue
            self.in_flight += 1
            t = asyncio.ensure_future(make())
            tasks.add(t)
            t.add_done_callback(self._done(tasks))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
        def done(t: asyncio.Task[Any]) -> None:
            tasks.discard(t)
            self.in_flight -= 1
            if not t.cancelled() and t.exception() is not None:
                self.errors.append(f"generator task failed: {t.exception()!r}")

        return done

    # ---------------------------------------------------------------- SAV

    def outbound_handler(self, port: int) -> Any:
        soak = self

        class Capture:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                raw = envelope.original_content or b""
                m = SAV_ADDRESS.search(raw)
                to = [r.lower() for r in envelope.rcpt_tos]
                if m is None or envelope.mail_from not in ("", "<>"):
                    soak.other_outbound += 1
                    return "250 OK"
                soak.on_challenge(port, to, m[0].decode().lower())
                return "250 OK"

        return Capture()

    def on_challenge(self, port: int, to: list[str], address: str) -> None:
        stranger = to[0] if to else ""
        k = int(stranger[1:].split("@")[0]) if stranger[1:].split("@")[0].isdigit() else 1
        replies = k % 2 == 0  # half the strangers answer their challenges
        self.challenges.append(
            {"to": stranger, "address": address, "at": time.time(), "answered": replies}
        )
        if not replies or self.load_over:
            return

        async def reply() -> None:
            await asyncio.sleep(0.5 + 2.5 * self.rng.random())  # a person reading mail
            self.seq += 1
            sid = f"sav-{self.seq}"
            source = self.rng.choice(self.known_sources)
            o = await self.deliver(
                self.stats["sav_reply"], "sav_reply", port, source, stranger, address, sid, False
            )
            if o is not None:
                self.replied.add(stranger)

        t = asyncio.ensure_future(reply())
        self.sav_tasks.add(t)
        t.add_done_callback(self.sav_tasks.discard)

    # ---------------------------------------------------------------- setup

    def write_config(self, path: str, dns_port: int, max_recipients: int = 100) -> None:
        c = self.cfg
        text = f"""\
# bench/soak.py: the gateway under soak
[server]
data_dir = "{c["data_dir"]}"
hostname = "kithmail.soak.test"
workers = {self.a.workers}
public_url = "http://127.0.0.1:{c["public"]}"

[server.listeners]
inbound = ["127.0.0.1:{c["port"]}"]
web = ["127.0.0.1:{c["web"]}"]
submission = ["127.0.0.1:{c["submission"]}"]
public = ["127.0.0.1:{c["public"]}"]
policy = ["127.0.0.1:{c["policy"]}"]

[domains]
local = ["{LOCAL_DOMAIN}"]
downstream = "smtp://127.0.0.1:{c["sink_port"]}"
outbound = "smtp://127.0.0.1:{c["outbound_port"]}"
trusted_networks = ["127.0.0.1/32"]

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "2s"

[recon]
min_delay = {self.a.min_delay}

[[reputation.local_lists]]
name = "soak-spam"
path = "{c["listed"]}"
kind = "block"
action = "reject"

[community]
mode = "enforce"
challenge_rate_per_domain = 1000000
challenge_rate_global = 1000000

[queue]
backoff = ["1s", "2s", "5s"]

[limits]
max_recipients = {max_recipients}
max_connections = 2000
max_connections_per_ip = 1000
connections_per_ip_per_minute = 10000000
messages_per_ip_per_minute = 10000000
messages_per_sender_per_minute = 10000000
"""
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def prepare_gateway(self, dns_port: int, sink_port: int, outbound_port: int) -> str:
        """Config, users, the block list and each user's community, before the start."""
        from kithmail import config
        from kithmail.db import Database
        from kithmail.runtime import open_core

        data_dir = os.path.join(self.work, "kithmail")
        os.makedirs(data_dir, exist_ok=True)
        listed = os.path.join(self.work, "listed.txt")
        with open(listed, "w") as f:
            f.write(f"# bench/soak.py: spam sources\n{LISTED_NET}\n")
        self.cfg: dict[str, Any] = {
            "data_dir": data_dir,
            "port": peers.free_port(),
            "web": peers.free_port(),
            "submission": peers.free_port(),
            "public": peers.free_port(),
            "policy": peers.free_port(),
            "sink_port": sink_port,
            "outbound_port": outbound_port,
            "listed": listed,
        }
        path = os.path.join(self.work, "kithmail.toml")
        self.write_config(path, dns_port)
        settings = config.load(path)
        try:
            from argon2 import PasswordHasher

            hasher: Any = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        except ImportError:
            hasher = None
        db = Database.open(settings.server.data_dir / "kithmail.db", hasher=hasher)
        try:
            db.sync_domains(settings.domains.local)
            for u in self.users:
                db.add_user(u, password="soak password, not secret")
        finally:
            db.close()
        core = open_core(settings)
        try:
            now = int(time.time())
            for u in self.users:
                core.community.add_many(u, self.members[u], "allow", "import", now)
            core.flush()
        finally:
            core.close()
        return path

    def pass_known_sources(self, port: int) -> dict[str, Any]:
        """The first round: each known source deferred once, then passed by its retry."""
        st = ClassStats()

        async def one(source: str) -> Outcome | None:
            self.seq += 1
            sid = f"warmup-{self.seq}"
            return await self.deliver(st, "warmup", port, source, WARMUP_SENDER, self.users[0], sid)

        async def go() -> list[Outcome | None]:
            return await asyncio.gather(*(one(s) for s in self.known_sources))

        t0 = time.monotonic()
        results = asyncio.run(go())
        ok = sum(1 for r in results if r is not None)
        out = {
            "sources": len(self.known_sources),
            "passed": ok,
            "deferred_first": st.deferred_first,
            "seconds": round(time.monotonic() - t0, 2),
            "note": f"each sends one message from {WARMUP_SENDER} (no SPF: held, not challenged), "
            "is deferred by Recon and passes on its retry after min_delay",
        }
        if ok != len(self.known_sources) or st.deferred_first != len(self.known_sources):
            self.errors.append(f"known sources not passed the real way: {out} {st.examples}")
        log(f"known sources: {out}")
        return out

    # ---------------------------------------------------------------- the run

    def start_sink(self, port: int, record: str, name: str) -> peers.Proc:
        p = peers.Proc(
            name,
            [sys.executable, os.path.join(HERE, "_soak_sink.py"), "127.0.0.1", str(port), record],
            os.path.join(self.work, f"{name}.log"),
            self.gen_cpus,
        )
        peers.wait_greeting(p, port)
        return p

    def gateway_pids(self) -> list[int]:
        return self.gw.pids() if self.gw.alive() else []

    async def sample_rss(self, stop: asyncio.Event, t0: float) -> None:
        while not stop.is_set():
            pids = self.gateway_pids()
            for pid in pids:
                c = cpu_of(pid)
                first, _ = self.cpu.get(pid, (c, c))
                self.cpu[pid] = (first, c)
            parts = [rss_parts_of(p) for p in pids]
            t = round(time.monotonic() - t0, 2)
            self.rss.append((t, sum(r for r, _, _ in parts), len(pids)))
            self.rss_split.append((t, sum(a for _, a, _ in parts), sum(f for _, _, f in parts)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)  # the sampling period

    async def timeline(self, t0: float, seconds: float, downstream: dict[str, Any]) -> None:
        """SIGHUP the gateway, kill the downstream, start it again, SIGHUP again, at their times."""

        async def at(frac: float) -> None:
            await asyncio.sleep(max(0.0, t0 + frac * seconds - time.monotonic()))

        await at(SIGHUP_AT[0])
        await self.reload(t0, 99)
        await at(KILL_AT)
        p: peers.Proc = downstream["proc"]
        p.proc.kill()
        p.proc.wait()
        self.events["downstream_killed"] = time.time()
        self.events["downstream_killed_at_s"] = round(time.monotonic() - t0, 2)
        log("downstream killed (SIGKILL)")
        await at(RESTART_AT)
        # From the launch: the gateway may deliver before our poll sees the greeting.
        self.events["downstream_restarted"] = time.time()
        downstream["proc"] = await asyncio.to_thread(
            self.start_sink, self.cfg["sink_port"], downstream["record"], "downstream-2"
        )
        self.procs.append(downstream["proc"])
        self.events["downstream_restarted_at_s"] = round(time.monotonic() - t0, 2)
        log("downstream started again")
        await at(SIGHUP_AT[1])
        await self.reload(t0, 100)

    async def reload(self, t0: float, max_recipients: int) -> None:
        """Rewrite the config with one value changed, SIGHUP, and look 2 s later."""
        if not self.sighup["send"]:
            return
        self.write_config(self.cfg_path, self.dns_port, max_recipients=max_recipients)
        before = self.gateway_pids()
        rss_before = sum(rss_of(p) for p in before)
        self.gw.proc.send_signal(signal.SIGHUP)
        at_s = round(time.monotonic() - t0, 2)
        log(f"SIGHUP sent ([limits] max_recipients now {max_recipients})")
        await asyncio.sleep(2.0)  # then look: the same processes, still greeting
        after = self.gateway_pids()
        greets = await self.greets()
        r = {
            "at_s": at_s,
            "change": f"[limits] max_recipients = {max_recipients}",
            "pids_before": before,
            "pids_after": after,
            "alive": self.gw.alive(),
            "greets_after": greets,
            "rss_before_bytes": rss_before,
            "rss_after_bytes": sum(rss_of(p) for p in after),
        }
        self.sighup["sent"] = True
        self.sighup.setdefault("reloads", []).append(r)
        self.sighup["log"] = [
            line
            for line in self.gw.tail(400_000).splitlines()
            if "reload" in line.lower() or "sighup" in line.lower()
        ][-8:]
        if not r["alive"] or not greets or before != after:
            self.errors.append(f"the gateway did not survive SIGHUP: {r}")

    async def greets(self) -> bool:
        try:
            r, w = await client.connect("127.0.0.1", self.cfg["port"], "127.0.0.1")
        except OSError:
            return False
        try:
            code, _ = await asyncio.wait_for(client.reply(r, "greeting"), 10)
            w.write(b"QUIT\r\n")
            return code == 220
        except (client.SmtpError, OSError, TimeoutError):
            return False
        finally:
            await client.close(w)

    async def load(self, seconds: float, downstream: dict[str, Any]) -> dict[str, Any]:
        a = self.a
        port = self.cfg["port"]
        loop = asyncio.get_running_loop()
        from aiosmtpd.smtp import SMTP

        capture = self.outbound_handler(port)
        out_server = await loop.create_server(
            lambda: SMTP(capture, hostname="outbound.soak.test", decode_data=False),
            "127.0.0.1",
            self.cfg["outbound_port"],
            reuse_address=True,
        )
        self.load_over = False
        stop = asyncio.Event()
        t0 = time.monotonic()
        sampler = asyncio.ensure_future(self.sample_rss(stop, t0))
        f0, c0, g0 = foreign_snapshot(), read_cpu(), time.process_time()
        end = t0 + seconds
        scale = a.rate_scale
        gens = [
            self.arrivals(
                a.flood_rate * scale,
                end,
                lambda: self.probe_rcpt(
                    self.stats["flood"],
                    port,
                    self.next_flood_source(),
                    f"promo{self.flood_n}@{FLOOD_DOMAIN}",
                ),
                self.stats["flood"],
            ),
            self.arrivals(
                a.spam_rate * scale,
                end,
                lambda: self.probe_rcpt(
                    self.stats["spam"],
                    port,
                    self.rng.choice(self.listed_sources),
                    f"offer{self.rng.randrange(10**6)}@{SPAM_DOMAIN}",
                ),
                self.stats["spam"],
            ),
        ]
        rates = {
            "member_known": a.member_known_rate,
            "member_new": a.member_new_rate,
            "stranger_known": a.stranger_known_rate,
            "stranger_new": a.stranger_new_rate,
        }
        for cls, rate in rates.items():
            gens.append(
                self.arrivals(
                    rate * scale,
                    end,
                    lambda cls=cls: self.legit_arrival(cls, port),  # type: ignore[misc]
                    self.stats[cls],
                )
            )
        tl = asyncio.ensure_future(self.timeline(t0, seconds, downstream))
        await asyncio.gather(*gens)
        load_s = time.monotonic() - t0
        self.load_over = True  # no new replies; the ones scheduled still go
        with contextlib.suppress(Exception):
            await tl
        if self.sav_tasks:
            await asyncio.gather(*list(self.sav_tasks), return_exceptions=True)
        settle_s = time.monotonic() - t0 - load_s
        foreign = foreign_cpu(f0, foreign_snapshot(), time.monotonic() - t0)
        busy = cpu_busy(c0, read_cpu())
        wall = time.monotonic() - t0
        gen = (time.process_time() - g0) / wall
        stop.set()
        await sampler
        out_server.close()
        await out_server.wait_closed()
        return {
            "load_seconds": round(load_s, 2),
            "settle_seconds": round(settle_s, 2),
            "gateway_cpu_s": round(sum(last - first for first, last in self.cpu.values()), 2),
            "gateway_cpu_note": "utime+stime of every gateway process, sampled each second",
            "cores_busy": busy,
            "generator_cpu_s_per_s": round(gen, 3),
            "foreign_cpu_cores": foreign,
            "note": "cores_busy: each core's use over the load (everything on the machine); "
            "generator: this process; foreign: processes not of this run (other jobs)",
        }

    # ---------------------------------------------------------------- the books

    def delivered(
        self, record: str
    ) -> tuple[Counter[tuple[str, str]], dict[tuple[str, str], list[float]]]:
        counts: Counter[tuple[str, str]] = Counter()
        times: dict[tuple[str, str], list[float]] = {}
        try:
            with open(record) as f:
                for line in f:
                    parts = line.rstrip("\n").split("\t")
                    if len(parts) != 3:
                        continue
                    key = (parts[1], parts[2])
                    counts[key] += 1
                    times.setdefault(key, []).append(float(parts[0]))
        except OSError:
            pass
        return counts, times

    def held(self) -> set[tuple[str, str]]:
        db = os.path.join(self.cfg["data_dir"], "kithmail.db")
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("SELECT queue_id, user FROM quarantine").fetchall()
        finally:
            conn.close()
        return {(str(q), str(u).lower()) for q, u in rows}

    def missing(self, record: str) -> list[Accepted]:
        got, _ = self.delivered(record)
        held = self.held()
        return [
            m for m in self.accepted if (m.sid, m.rcpt) not in got and (m.qid, m.rcpt) not in held
        ]

    def drain(self, record: str) -> float:
        """Wait (bounded) until every accepted message is delivered or held."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.a.drain_timeout:
            if not self.missing(record):
                break
            time.sleep(0.5)  # polling the sink's record and the quarantine index
        return round(time.monotonic() - t0, 2)

    def books(self, record: str, drain_s: float) -> dict[str, Any]:
        got, times = self.delivered(record)
        held = self.held()
        lost = self.missing(record)
        killed = self.events.get("downstream_killed", 0.0)
        dup_in_flight, dup_other = [], []
        for key, n in got.items():
            if n < 2:
                continue
            first = min(times[key])
            if killed - IN_FLIGHT_WINDOW <= first <= killed or key[0] in self.ambiguous:
                dup_in_flight.append(key)
            else:
                dup_other.append(key)
        by_class: dict[str, Counter[str]] = {}
        for m in self.accepted:
            c = by_class.setdefault(m.cls, Counter())
            c["accepted"] += 1
            if (m.sid, m.rcpt) in got:
                c["delivered"] += 1
            elif (m.qid, m.rcpt) in held:
                c["held"] += 1
            else:
                c["lost"] += 1
        # From the 250 to the downstream's record: the queue's part, outage included.
        delay, delay_down = array.array("q"), array.array("q")
        killed_at = self.events.get("downstream_killed", 0.0)
        restarted = self.events.get("downstream_restarted", 0.0)
        during = after = 0
        for m in self.accepted:
            t = times.get((m.sid, m.rcpt))
            if not t:
                continue
            down = bool(killed_at) and killed_at <= m.at < restarted
            if m.cls.startswith("member"):  # delivered at once: no hold, no SAV wait
                (delay_down if down else delay).append(int(max(0.0, min(t) - m.at) * 1e9))
            if down:
                during += 1
                after += min(t) >= restarted
        sav_at_sink = sum(1 for (sid, _) in got if sid.startswith("sav-"))
        unknown_at_sink = sum(
            n for (sid, _), n in got.items() if sid == "-" or sid.startswith(("flood", "spam"))
        )
        out = {
            "accepted": len(self.accepted),
            "delivered_distinct": sum(1 for m in self.accepted if (m.sid, m.rcpt) in got),
            "held": sum(1 for m in self.accepted if (m.qid, m.rcpt) in held),
            "lost": len(lost),
            "lost_examples": [vars(m) for m in lost[:10]],
            "duplicates": len(dup_in_flight) + len(dup_other),
            "duplicates_in_flight_at_kill": len(dup_in_flight),
            "duplicates_other": len(dup_other),
            "duplicate_examples": [list(k) for k in (dup_other or dup_in_flight)[:5]],
            "by_class": {k: dict(v) for k, v in sorted(by_class.items())},
            "sav_replies_delivered": sav_at_sink,
            "unexpected_at_sink": unknown_at_sink,
            "drain_s": drain_s,
            "delivery_delay": {
                "timed": "the client's 250 to the downstream's record, members' messages",
                "downstream_up": lat_json(delay),
                "accepted_while_down": lat_json(delay_down),
            },
            "outage": {
                "delivered_accepted_while_down": during,
                "of_them_delivered_after_restart": after,
            },
            "challenges": len(self.challenges),
            "challenges_answered": sum(1 for c in self.challenges if c["answered"]),
            "other_outbound": self.other_outbound,
            "strangers_released": sum(
                1 for m in self.accepted if m.cls.startswith("stranger") and (m.sid, m.rcpt) in got
            ),
            "members_held": sum(
                1 for m in self.accepted if m.cls.startswith("member") and (m.qid, m.rcpt) in held
            ),
        }
        if lost:
            self.errors.append(f"{len(lost)} messages answered 250 are neither delivered nor held")
        if dup_other:
            self.errors.append(
                f"{len(dup_other)} duplicates not in flight at the kill: {dup_other[:3]}"
            )
        if sav_at_sink or unknown_at_sink:
            self.errors.append(
                f"at the downstream: {sav_at_sink} SAV replies, {unknown_at_sink} unexpected"
            )
        if during != after:
            self.errors.append(
                f"{during - after} messages accepted while the downstream was down "
                "were recorded there before it was started again"
            )
        if out["members_held"]:
            self.errors.append(f"{out['members_held']} messages from community members were held")
        return out

    def checks_classes(self) -> None:
        s = self.stats
        for name in ("flood", "spam"):
            st = s[name]
            ok250 = sum(n for k, n in st.answers.items() if k.startswith("250") or k == "250")
            if ok250:
                self.errors.append(f"{name}: {ok250} RCPTs answered 250")
        flood_ok = sum(n for k, n in s["flood"].answers.items() if k.startswith("451 4.7.1"))
        if flood_ok != s["flood"].connections:
            self.errors.append(
                f"flood: {flood_ok}/{s['flood'].connections} answered 451 4.7.1: "
                f"{dict(s['flood'].answers)} {dict(s['flood'].errors)}"
            )
        spam_5 = sum(n for k, n in s["spam"].answers.items() if k[:1] == "5")
        if s["spam"].connections and not spam_5:
            self.errors.append(f"spam: no listed source was refused: {dict(s['spam'].answers)}")
        for name in CLASSES:
            st = s[name]
            if st.connections == 0:
                self.errors.append(f"class {name} not exercised")
            if st.gave_up or (name in LEGIT and st.errors):
                self.errors.append(f"{name}: {dict(st.errors)} {st.examples[:2]}")
            if name not in ("flood", "spam") and st.accepted == 0:
                self.errors.append(f"class {name}: nothing accepted")
        if s["stranger_new"].deferred_first == 0:
            self.errors.append("stranger_new: no new source was deferred first")

    def memory(self, seconds: float) -> dict[str, Any]:
        import statistics

        pts = [(t, b) for t, b, n in self.rss if n]
        if len(pts) < 4:
            return {"samples": len(pts), "growth_second_half_pct": None, "pass": None}
        w = max(0.05 * seconds, 2.0)
        mid = [b for t, b in pts if seconds / 2 <= t <= seconds / 2 + w] or [pts[len(pts) // 2][1]]
        end = [b for t, b in pts if seconds - w <= t <= seconds] or [pts[-1][1]]
        m0, m1 = statistics.median(mid), statistics.median(end)
        growth = 100.0 * (m1 - m0) / m0 if m0 else None
        half = [b for t, b in pts if t >= seconds / 2]
        step = max(1, len(pts) // 120)

        def growth_of(series: list[tuple[float, int]]) -> float | None:
            a = [b for t, b in series if seconds / 2 <= t <= seconds / 2 + w]
            z = [b for t, b in series if seconds - w <= t <= seconds]
            if not a or not z or not statistics.median(a):
                return None
            return round(
                100.0 * (statistics.median(z) - statistics.median(a)) / statistics.median(a), 2
            )

        split = [(t, a, f) for t, a, f in self.rss_split if a or f]
        anon = [(t, a) for t, a, _ in split]
        filed = [(t, f) for t, _, f in split]
        return {
            "samples": len(pts),
            "period_s": 1.0,
            "processes": max(n for _, _, n in self.rss),
            "window_s": round(w, 1),
            "rss_mid_bytes": int(m0),
            "rss_end_bytes": int(m1),
            "rss_max_second_half_bytes": max(half) if half else None,
            "rss_first_bytes": pts[0][1],
            "growth_second_half_pct": round(growth, 2) if growth is not None else None,
            "pass": growth is not None and growth < 5.0,
            "rule": "median RSS (sum of all gateway processes) over the last window against "
            "the window after the midpoint; pass under 5 %",
            "anon_mid_bytes": int(statistics.median([b for t, b in anon if t >= seconds / 2]))
            if anon
            else None,
            "anon_growth_second_half_pct": growth_of(anon),
            "file_growth_second_half_pct": growth_of(filed),
            "split_note": "RssAnon is the processes' own heap; RssFile+RssShmem are mapped "
            "pages, mostly the core's LMDB file, which each worker's RSS counts again",
            "series": [[t, b] for t, b in pts[::step]],
        }

    # ---------------------------------------------------------------- baseline

    def baseline(self, dns_port: int) -> dict[str, Any]:
        """The legitimate share, same rates and client, to Postfix (or the aiosmtpd sink)."""
        a = self.a
        kind = a.baseline
        if kind == "none":
            return {"server": "none", "skipped": "--baseline none"}
        record = os.path.join(self.work, f"baseline-{kind}.rec")
        sink_port = peers.free_port()
        procs: list[Any] = []
        info: dict[str, Any] = {"server": kind}
        try:
            if kind == "postfix":
                sink = self.start_sink(sink_port, record, "baseline-sink")
                procs.append(sink)
                pf = peers.start_postfix(
                    os.path.join(self.work, "postfix"), sink_port, self.srv_cpus
                )
                procs.append(pf)
                port = pf.port
                info["version"] = peers.postfix_version()
                info["durability"] = "queue file fsync'd before 250 (Postfix's default)"
            else:
                p = self.start_sink(sink_port, record, "baseline-aiosmtpd")
                if self.srv_cpus:
                    subprocess.run(
                        ["taskset", "-a", "-p", "-c", self.srv_cpus, str(p.proc.pid)],
                        capture_output=True,
                        check=False,
                    )
                procs.append(p)
                port = sink_port
                self.want_qid = False
            stats = {c: ClassStats() for c in LEGIT}
            accepted_before = len(self.accepted)
            saved, self.stats = self.stats, {**self.stats, **stats}
            seconds = a.baseline_seconds

            async def go() -> float:
                t0 = time.monotonic()
                end = t0 + seconds
                rates = {
                    "member_known": a.member_known_rate,
                    "member_new": a.member_new_rate,
                    "stranger_known": a.stranger_known_rate,
                    "stranger_new": a.stranger_new_rate,
                }
                await asyncio.gather(
                    *(
                        self.arrivals(
                            rate * a.rate_scale,
                            end,
                            lambda cls=cls: self.legit_arrival(cls, port),  # type: ignore[misc]
                            stats[cls],
                        )
                        for cls, rate in rates.items()
                    )
                )
                return time.monotonic() - t0

            load_s = asyncio.run(go())
            self.stats = saved
            sent = self.accepted[accepted_before:]
            del self.accepted[accepted_before:]
            t0 = time.monotonic()
            while time.monotonic() - t0 < a.drain_timeout:
                got, _ = self.delivered(record)
                if all((m.sid, m.rcpt) in got for m in sent):
                    break
                time.sleep(0.5)  # polling the sink's record
            got, _ = self.delivered(record)
            lost = sum(1 for m in sent if (m.sid, m.rcpt) not in got)
            lat = array.array("q")
            for st in stats.values():
                lat.extend(st.lat)
            conns = sum(st.connections for st in stats.values())
            info.update(
                {
                    "seconds": round(load_s, 2),
                    "accepted": len(sent),
                    "connections": conns,
                    "msgs_per_s": round(len(sent) / load_s, 2) if load_s else None,
                    "conns_per_s": round(conns / load_s, 2) if load_s else None,
                    **lat_json(lat),
                    "lost": lost,
                    "drain_s": round(time.monotonic() - t0, 2),
                    "errors": {k: dict(v.errors) for k, v in stats.items() if v.errors},
                    "what": "the soak's legitimate classes at the same rates, sizes and client; "
                    "nothing greylists, so every message is accepted at its first attempt",
                }
            )
            if lost:
                self.errors.append(f"baseline {kind}: {lost} accepted messages not at its sink")
            log(f"baseline {kind}: {info}")
        except (peers.StartError, OSError) as e:
            info["error"] = str(e)
            self.errors.append(f"baseline {kind}: {e}")
        finally:
            for p in reversed(procs):
                p.stop()
        return info

    # ---------------------------------------------------------------- main

    def sighup_supported(self) -> bool:
        """Whether this kithmail reloads on SIGHUP (before that, SIGHUP ends `kith serve`)."""
        import importlib.util

        spec = importlib.util.find_spec("kithmail.smtp.serve")
        if (
            spec is None
            or spec.origin is None
            or importlib.util.find_spec("kithmail.reload") is None
        ):
            return False
        with open(spec.origin) as f:
            return "SIGHUP" in f.read()

    def run(self) -> dict[str, Any]:
        a = self.a
        seconds = a.minutes * 60.0
        t_wait = time.monotonic()
        while True:
            self.background = background()
            busy = max(v for k, v in self.background.items() if k.startswith("cpu"))
            if busy < 0.25 or time.monotonic() - t_wait >= a.wait_idle:
                break
            log(f"waiting for an idle machine (--wait-idle): {self.background}")
        supported = self.sighup_supported()
        send = a.sighup == "yes" or (a.sighup == "auto" and supported)
        self.sighup = {"mode": a.sighup, "supported": supported, "send": send, "sent": False}
        if not send:
            self.sighup["note"] = (
                "skipped: this kithmail has no SIGHUP reload yet (SIGHUP would end kith serve)"
                if not supported
                else "skipped: --sighup no"
            )
        records = [(f"mem{j}.example", SPF) for j in range(MEMBER_DOMAINS)]
        records += [(f"str{j}.example", SPF) for j in range(STRANGER_DOMAINS)]
        records += [(HELO, SPF)]
        dns, self.dns_port = peers.start_dnsmasq(
            self.work, self.gen_cpus, records, ["example", "test"]
        )
        self.procs.append(dns)
        record = os.path.join(self.work, "downstream.rec")
        sink_port, outbound_port = peers.free_port(), peers.free_port()
        downstream: dict[str, Any] = {"record": record}
        info: dict[str, Any] = {}
        books: dict[str, Any] = {}
        mem: dict[str, Any] = {}
        load: dict[str, Any] = {}
        warm: dict[str, Any] = {}
        base: dict[str, Any] = {}
        try:
            try:
                t0 = time.monotonic()
                self.cfg_path = self.prepare_gateway(self.dns_port, sink_port, outbound_port)
                with open(self.cfg_path) as f:
                    info["config"] = f.read()
                info["prepare_s"] = round(time.monotonic() - t0, 2)
                downstream["proc"] = self.start_sink(sink_port, record, "downstream")
                self.procs.append(downstream["proc"])
                self.gw = peers.start_kith(
                    a.kith,
                    self.cfg_path,
                    self.cfg["port"],
                    os.path.join(self.work, "kithmail.log"),
                    self.srv_cpus,
                    a.workers,
                )
                info["workers"] = a.workers
                info["pids"] = self.gw.pids()
                for pid in info["pids"]:
                    self.cpu[pid] = (cpu_of(pid), cpu_of(pid))
                log(f"kithmail on 127.0.0.1:{self.cfg['port']}, pids {info['pids']}")
                warm = self.pass_known_sources(self.cfg["port"])
                log(f"soak for {seconds:.0f} s")
                load = asyncio.run(self.load(seconds, downstream))
                log(f"load done: {load}")
                drain_s = self.drain(record)
                books = self.books(record, drain_s)
                log(f"books: { {k: v for k, v in books.items() if not k.endswith('examples')} }")
                self.checks_classes()
                mem = self.memory(seconds)
                info["disk_bytes"] = self.disk()
                log(f"memory: { {k: v for k, v in mem.items() if k != 'series'} }")
            finally:
                if hasattr(self, "gw"):
                    info["exit_status"] = self.gw.stop()
                    info["log_tail"] = self.gw.tail(1500)
                    if info["exit_status"] not in (0, None):
                        self.errors.append(f"kithmail exited {info['exit_status']}")
                    self.reap_workers()
                for p in reversed(self.procs):
                    if p is not dns:
                        p.stop()
            base = self.baseline(self.dns_port)
        finally:
            dns.stop()
        return self.report(seconds, info, warm, load, books, mem, base)

    def report(
        self,
        seconds: float,
        info: dict[str, Any],
        warm: dict[str, Any],
        load: dict[str, Any],
        books: dict[str, Any],
        mem: dict[str, Any],
        base: dict[str, Any],
    ) -> dict[str, Any]:
        a = self.a
        load_s = load.get("load_seconds") or seconds
        classes = {c: self.stats[c].as_json(load_s) for c in CLASSES}
        lat = array.array("q")
        for c in (*LEGIT, "sav_reply"):
            lat.extend(self.stats[c].lat)
        accepted = sum(self.stats[c].accepted for c in CLASSES)
        conns = sum(self.stats[c].connections for c in CLASSES)
        overall = {
            "messages_accepted": accepted,
            "msgs_per_s": round(accepted / load_s, 2),
            "connections": conns,
            "conns_per_s": round(conns / load_s, 2),
            "transaction": {"timed": "MAIL to the 250 after the final dot", **lat_json(lat)},
        }
        ratios: dict[str, Any] = {}
        if base.get("p99_ms") and overall["transaction"]["p99_ms"]:
            legit = array.array("q")
            for c in LEGIT:
                legit.extend(self.stats[c].lat)
            legit_p99 = pct(legit, 0.99)
            legit_acc = sum(self.stats[c].accepted for c in LEGIT)
            ratios = {
                "legit_p99_ms": legit_p99,
                "baseline_p99_ms": base["p99_ms"],
                "p99_vs_baseline": round(legit_p99 / base["p99_ms"], 2) if legit_p99 else None,
                "legit_msgs_per_s": round(legit_acc / load_s, 2),
                "baseline_msgs_per_s": base.get("msgs_per_s"),
                "note": "both are offered the same rates (open loop), so msgs/s match when both "
                "keep up; kithmail's includes the retries greylisting asks for",
            }
        checks = {
            "zero_lost": books.get("lost") == 0 and bool(books),
            "duplicates_only_in_flight": books.get("duplicates_other") == 0 and bool(books),
            "every_class_exercised": all(self.stats[c].connections > 0 for c in CLASSES),
            "rss_growth_under_5pct": mem.get("pass"),
            "sighup": "survived" if self.sighup.get("sent") and self.gw_ok() else "not sent",
        }
        try:
            import aiosmtpd

            aiosmtpd_version = aiosmtpd.__version__
        except ImportError:
            aiosmtpd_version = "?"
        try:
            from kithmail import __version__ as kith_version
        except ImportError:
            kith_version = "?"
        return {
            "benchmark": "soak",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(self.work),
            "build_profile": a.profile,
            "command": [sys.executable, *sys.argv],
            "source": source_tree(),
            "seed": a.seed,
            "versions": {
                "kithmail": kith_version,
                "aiosmtpd": aiosmtpd_version,
                "postfix": peers.postfix_version(),
                "dnsmasq": peers.deb_version("dnsmasq-base"),
            },
            "dataset": {
                "users": len(self.users),
                "members_per_user": 8,
                "member_pool": len(self.member_pool),
                "strangers_per_user": 4,
                "strangers_note": "each stranger message is from one of the user's 4 strangers, "
                "or (30 %) from a new one; those with an even number answer their challenge",
                "stranger_pool": len(self.stranger_pool),
                "known_sources": len(self.known_sources),
                "listed_sources": len(self.listed_sources),
                "listed_network": LISTED_NET,
                "flood_sources_used": self.flood_n,
                "new_sources_used": self.new_n,
                "new_strangers": self.new_strangers,
                "new_stranger_share": NEW_STRANGER_SHARE,
                "message_bytes": sorted(len(b) + 300 for b in self.bodies),
            },
            "rates_per_s": {
                "flood": a.flood_rate * a.rate_scale,
                "spam": a.spam_rate * a.rate_scale,
                "member_known": a.member_known_rate * a.rate_scale,
                "member_new": a.member_new_rate * a.rate_scale,
                "stranger_known": a.stranger_known_rate * a.rate_scale,
                "stranger_new": a.stranger_new_rate * a.rate_scale,
                "arrivals": "Poisson, open loop (a slow server does not slow the offer)",
            },
            "minutes": a.minutes,
            "min_delay_s": a.min_delay,
            "timeline": {
                "downstream_killed_at_s": self.events.get("downstream_killed_at_s"),
                "downstream_restarted_at_s": self.events.get("downstream_restarted_at_s"),
                "sighup_at_s": [r["at_s"] for r in self.sighup.get("reloads", [])],
                "planned": {"kill": KILL_AT, "restart": RESTART_AT, "sighup": SIGHUP_AT},
            },
            "sighup": self.sighup,
            "pinning": {
                "applied": self.pinned,
                "note": "core 1: kith serve and all its workers (taskset -c 1); core 0: this "
                "process, the sinks and dnsmasq"
                if self.pinned
                else "not pinned",
            },
            "background": self.background,
            "known_sources_pass": warm,
            "load": load,
            "classes": classes,
            "overall": overall,
            "delivery": books,
            "memory": mem,
            "baseline": base,
            "ratios": ratios,
            "gateway": info,
            "checks": checks,
            "notes": [
                "flood and spam times run from connect to the reply to QUIT and include "
                "[limits] pregreet_wait (1 s, the default) for sources Recon has not passed",
                "the first SIGHUP in a process costs a one-time step of memory; see sighup.reloads "
                "(rss_before_bytes, rss_after_bytes); the second shows what a reload adds",
                "warmup messages (the known sources' first round) are held by design: no SPF, "
                "an unknown sender; they are in the books as class warmup",
            ],
            "correct": not self.errors,
            "errors": self.errors,
        }

    def disk(self) -> dict[str, int]:
        """Bytes under the gateway's data directory at the end, per part."""
        out: dict[str, int] = {}
        root = self.cfg["data_dir"]
        for name in sorted(os.listdir(root)):
            total = 0
            path = os.path.join(root, name)
            if os.path.isfile(path):
                total = os.path.getsize(path)
            for d, _, files in os.walk(path):
                for f in files:
                    with contextlib.suppress(OSError):
                        total += os.stat(os.path.join(d, f)).st_blocks * 512
            out[name] = total
        return out

    def reap_workers(self) -> None:
        """Kill any gateway worker left behind by a parent that died (by its pid, checked)."""
        left = []
        for pid in self.cpu:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if self.cfg_path.encode() not in f.read():
                        continue
            except OSError:
                continue
            left.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            self.errors.append(f"gateway processes {left} outlived kith serve's parent")

    def gw_ok(self) -> bool:
        rs = self.sighup.get("reloads", [])
        return bool(rs) and all(r["alive"] and r["greets_after"] for r in rs)


# --------------------------------------------------------------------------
# Output


def print_summary(rep: dict[str, Any]) -> None:
    m = rep["machine"]
    print(
        f"kithmail soak: {rep['minutes']} min, {rep['build_profile']} build, {m['cpu']}, "
        f"{m['cores']} cores; {rep['gateway'].get('workers')} workers; "
        f"pinning: {rep['pinning']['applied']}"
    )
    head = f"{'class':<15} {'conns':>7} {'accepted':>8} {'msg/s':>7} {'conn/s':>7} {'p50':>8} {'p99':>8}  answers"
    print(head)
    for name, c in rep["classes"].items():
        ans = ", ".join(f"{k}: {n}" for k, n in sorted(c["answers"].items()))
        print(
            f"{name:<15} {c['connections']:>7} {c['accepted']:>8} {c['msgs_per_s'] or 0:>7} "
            f"{c['conns_per_s'] or 0:>7} {c['p50_ms'] or '-':>8} {c['p99_ms'] or '-':>8}  {ans}"
        )
    o = rep["overall"]
    print(
        f"overall: {o['messages_accepted']} accepted ({o['msgs_per_s']} msg/s), "
        f"{o['connections']} connections ({o['conns_per_s']} conn/s), transaction p50 "
        f"{o['transaction']['p50_ms']} ms p99 {o['transaction']['p99_ms']} ms"
    )
    d = rep["delivery"]
    if d:
        print(
            f"delivery: {d['accepted']} answered 250: {d['delivered_distinct']} delivered, "
            f"{d['held']} held, {d['lost']} lost; duplicates {d['duplicates']} "
            f"({d['duplicates_in_flight_at_kill']} in flight at the kill); challenges "
            f"{d['challenges']}, strangers released {d['strangers_released']}"
        )
    mem = rep["memory"]
    if mem:
        print(
            f"memory: RSS {mem.get('rss_mid_bytes')} -> {mem.get('rss_end_bytes')} B over the "
            f"second half: {mem.get('growth_second_half_pct')} % (pass: {mem.get('pass')}); "
            f"anonymous {mem.get('anon_growth_second_half_pct')} %, "
            f"file-backed (LMDB map) {mem.get('file_growth_second_half_pct')} %"
        )
    b = rep["baseline"]
    if b.get("p99_ms") is not None:
        print(
            f"baseline {b['server']}: {b['accepted']} accepted ({b['msgs_per_s']} msg/s), p50 "
            f"{b['p50_ms']} ms p99 {b['p99_ms']} ms, lost {b['lost']}; ratios {rep['ratios']}"
        )
    print(f"sighup: {rep['sighup']}")
    print(f"checks: {rep['checks']}")
    if rep["errors"]:
        print("ERRORS: " + "; ".join(rep["errors"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Soak kithmail's gateway with a mixed load.")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the load (10)")
    p.add_argument("--json", metavar="PATH", help="write the results here (atomically)")
    p.add_argument("--users", type=int, default=100, help="local users (100)")
    p.add_argument("--workers", type=int, default=2, help="kith serve workers (2)")
    p.add_argument("--min-delay", type=float, default=3.0, help="Recon's min_delay, s (3)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiplies every rate (1)")
    p.add_argument("--flood-rate", type=float, default=100.0, help="flood connections/s (100)")
    p.add_argument("--spam-rate", type=float, default=5.0, help="listed-source connections/s (5)")
    p.add_argument("--member-known-rate", type=float, default=10.0, help="msgs/s (10)")
    p.add_argument("--member-new-rate", type=float, default=3.0, help="msgs/s (3)")
    p.add_argument("--stranger-known-rate", type=float, default=4.0, help="msgs/s (4)")
    p.add_argument("--stranger-new-rate", type=float, default=3.0, help="msgs/s (3)")
    p.add_argument("--max-in-flight", type=int, default=2000, help="generator tasks at once")
    p.add_argument(
        "--sighup",
        choices=("auto", "yes", "no"),
        default="auto",
        help="SIGHUP the gateway at 15 %% and 70 %% (auto: when this kithmail reloads on it)",
    )
    p.add_argument(
        "--baseline",
        choices=("postfix", "aiosmtpd", "none"),
        default="postfix",
        help="what gets the legitimate share after the soak (postfix needs root)",
    )
    p.add_argument("--baseline-seconds", type=float, help="(default: a fifth of the run, 10-60)")
    p.add_argument("--drain-timeout", type=float, default=180.0, help="bound on the drain, s")
    p.add_argument("--kith", help="the kith to serve with (default: beside this python)")
    p.add_argument("--profile", default="release", help="build profile to record")
    p.add_argument("--seed", type=int, default=20_240_909, help="data seed")
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="wait up to this many seconds for both cores under 25%% busy before starting",
    )
    p.add_argument("--dir", help="parent of the temporary directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    if a.minutes <= 0:
        p.error("--minutes must be above 0")
    if a.baseline_seconds is None:
        a.baseline_seconds = min(60.0, max(10.0, a.minutes * 60.0 / 5))
    a.kith = a.kith or os.path.join(os.path.dirname(sys.executable), "kith")
    if not os.access(a.kith, os.X_OK):
        p.error(f"{a.kith} not found: make bench installs it (or pass --kith)")
    if a.baseline == "postfix" and os.geteuid() != 0:
        p.error("--baseline postfix needs root (Postfix's master); use --baseline aiosmtpd")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with workdir("soak", args, shared=True) as work:
        report = Soak(args, work).run()
    return finish(args, report, print_summary)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
