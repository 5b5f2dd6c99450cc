#!/usr/bin/env python3
"""Benchmark of the Postfix policy service (`kith policy`) beside Postgrey.

Both servers answer the same seeded stream of Postfix policy requests
(request=smtpd_access_policy, protocol_state=RCPT, with the attributes
Postfix 3.7 sends) over 1, 10, 16 and 100 persistent connections: 90 % from
known sources (passed before the run, in both), 10 % from sources never seen
before. kithmail runs with a 5 M-prefix block list loaded and a Recon table
that also holds background rows; Postgrey (Debian's, BerkeleyDB synced on
every request) runs with its defaults and `--delay=60`.

The load generator is this process: an asyncio client where each connection
sends one request and awaits its answer, in a loop, for a fixed time (and at
most a fixed count). With two or more cores the generator is pinned to core 0
and each pinned server to core 1 (taskset); kithmail is measured once more
with `[server] workers = 2` unpinned, which shares core 0 with the generator
and is reported apart.

Every answer is checked: kithmail must defer (DEFER_IF_PERMIT) every new
source and answer DUNNO or PREPEND for every known one, and so must Postgrey
(or the two did not do the same work). A mismatch is listed in `errors` and
makes the exit status 1.

Trusts: nothing outside this machine. All traffic is on 127.0.0.1. Client
addresses come from documentation, link-local and reserved ranges (RFC 5737,
3927, 1112, 3849, 9637); names are under example.*/.test (RFC 2606).

Run ``bench/policy.py --help``; bench/README.md says how to read the output.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core import (
    _mixer,
    finish,
    fmt_rate,
    log,
    machine,
    recon_sources,
    reputation_prefixes,
    workdir,
)

try:
    from kithmail import _core, config
except ImportError as exc:  # pragma: no cover - setup error
    sys.exit(f"bench/policy.py needs kithmail installed ({exc}); run make bench")

MIN_DELAY = 60  # both servers: --delay=60 and [recon] min_delay = "60s"
PASS_AGE = 120  # known sources were first seen this long before the run
CONCURRENCY = (1, 10, 16, 100)
NEW_SHARE = 0.10
V6_SHARE = 0.20  # of known and of new sources
SLOTS_PER_SERVER = 8  # stream slots: one per concurrency; workers runs use 8..15
MAX_PER_RUN = 1 << 23  # new-source index space per slot
GOALS = {
    "rps_per_core": 20_000,
    "ratio_vs_postgrey": 10.0,
    "p99_ms_at_16": 2.0,
}

# The attributes Postfix 3.7 sends at RCPT (SMTPD_POLICY_README), in its order.
REQUEST = (
    "request=smtpd_access_policy\n"
    "protocol_state=RCPT\n"
    "protocol_name=ESMTP\n"
    "client_address={ip}\n"
    "client_name={name}\n"
    "client_port={port}\n"
    "reverse_client_name={name}\n"
    "server_address=192.0.2.25\n"
    "server_port=25\n"
    "helo_name={helo}\n"
    "sender={sender}\n"
    "recipient={rcpt}\n"
    "recipient_count=0\n"
    "queue_id=\n"
    "instance={{instance}}\n"
    "size=0\n"
    "etrn_domain=\n"
    "stress=\n"
    "sasl_method=\n"
    "sasl_username=\n"
    "sasl_sender=\n"
    "ccert_subject=\n"
    "ccert_issuer=\n"
    "ccert_fingerprint=\n"
    "ccert_pubkey_fingerprint=\n"
    "encryption_protocol=TLSv1.3\n"
    "encryption_cipher=TLS_AES_256_GCM_SHA384\n"
    "encryption_keysize=256\n"
    "policy_context=\n"
    "compatibility_level=3.6\n"
    "mail_version=3.7.11\n"
    "{extra}"
    "\n"
)

KNOWN, NEW = "known", "new"
OK_ANSWERS = {KNOWN: ("DUNNO", "PREPEND"), NEW: ("DEFER_IF_PERMIT",)}


# --------------------------------------------------------------------------
# The request stream


@dataclass
class Triplet:
    ip: str
    name: str
    helo: str
    sender: str
    rcpt: str

    def request(self, extra: str = "") -> str:
        """The request text with `{instance}` left to fill in."""
        return REQUEST.format(
            ip=self.ip,
            name=self.name,
            port=25000 + zlib.crc32(self.ip.encode()) % 30000,
            helo=self.helo,
            sender=self.sender,
            rcpt=self.rcpt,
            extra=extra,
        )


def known_triplets(rng: random.Random, n: int) -> list[Triplet]:
    """n known (client, sender, recipient) triplets from ranges no list covers.

    IPv4 from 169.254.0.0/16 and the three TEST-NETs, IPv6 one /64 each in
    3fff::/20: bench/core.py's generator never puts a prefix there, so these
    sources are on no block list and are answered by Recon's "known" path.
    """
    v4pool = [0xA9FE0000 + i for i in range(1, 65535)]
    v4pool += [b + i for b in (0xC0000200, 0xC6336400, 0xCB007100) for i in range(1, 255)]
    n6 = round(n * V6_SHARE)
    if n - n6 > len(v4pool):
        raise SystemExit(f"--known {n:,}: at most {len(v4pool) + n6:,} with this IPv4 pool")
    v4 = rng.sample(v4pool, n - n6)
    v6 = rng.sample(range(1 << 44), n6)
    ips = [f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}" for a in v4]
    for x in v6:
        w = (0x3FFF << 44) | x  # 3fff::/20 then 44 bits: one /64 each
        ips.append(f"{w >> 48:x}:{(w >> 32) & 0xFFFF:x}:{(w >> 16) & 0xFFFF:x}:{w & 0xFFFF:x}::25")
    rng.shuffle(ips)
    out = []
    for k, ip in enumerate(ips):
        dom = f"sender{k % 997}.example.net"
        out.append(
            Triplet(
                ip=ip,
                name=f"mta{k}.{dom}",
                helo=f"mta{k}.{dom}",
                sender=f"{('news', 'billing', 'noreply', 'alice', 'bob')[k % 5]}{k}@{dom}",
                rcpt=f"user{rng.randrange(5000)}@example.test",
            )
        )
    return out


class Stream:
    """The seeded request stream of one slot: the same for every server.

    A request is new with probability NEW_SHARE; a new source is unique (an
    address in 240.0.0.0/5 or a /48-spread /64 in 2001:db8::/32) with a
    unique sender domain, so it is new to both servers and never meets a
    pending retry. Otherwise it is a uniformly drawn known triplet.
    """

    def __init__(self, seed: int, slot: int, known: list[bytes], tails: list[bytes]) -> None:
        self.rng = random.Random(seed * 1000 + slot)
        self.slot = slot
        self.known = known  # request bytes up to "instance="
        self.tails = tails  # the rest
        self.n = 0
        self.n_new = 0
        mix_rng = random.Random(seed)
        self.mix4 = _mixer(mix_rng, 27)
        self.mix6 = _mixer(mix_rng, 32)

    def next(self) -> tuple[str, bytes]:
        rnd = self.rng.random
        i = self.n
        self.n += 1
        inst = f"{self.slot:x}{i:07x}.{i & 0xFFFF:04x}.0"
        if rnd() >= NEW_SHARE:
            k = int(rnd() * len(self.known))
            return KNOWN, self.known[k] + inst.encode() + self.tails[k]
        j = self.n_new
        self.n_new += 1
        if j >= MAX_PER_RUN:
            raise RuntimeError("more new sources than one stream slot holds")
        if rnd() < V6_SHARE:
            x = self.mix6((self.slot << 27) | j)
            ip = f"2001:db8:{x >> 16:x}:{x & 0xFFFF:x}::1"
        else:
            a = 0xF0000000 + self.mix4((self.slot << 23) | j)
            ip = f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}"
        dom = f"s{self.slot}x{j:x}.example.org"
        t = Triplet(ip, "unknown", f"mail.{dom}", f"info@{dom}", f"user{j % 5000}@example.test")
        return NEW, t.request().replace("{instance}", inst).encode()


def split_known(triplets: list[Triplet]) -> tuple[list[bytes], list[bytes]]:
    heads, tails = [], []
    for t in triplets:
        head, _, tail = t.request().partition("{instance}")
        heads.append(head.encode())
        tails.append(tail.encode())
    return heads, tails


# --------------------------------------------------------------------------
# The load generator


@dataclass
class Result:
    label: str
    concurrency: int
    seconds: float = 0.0
    requests: int = 0  # answered inside the measured window
    sent: int = 0  # all requests of the run, warm-up and drain included
    lat: array.array[int] = field(default_factory=lambda: array.array("q"))
    per_second: list[int] = field(default_factory=list)
    answers: dict[str, Counter[str]] = field(
        default_factory=lambda: {KNOWN: Counter(), NEW: Counter()}
    )
    mismatches: int = 0
    examples: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    error: str = ""

    def as_json(self) -> dict[str, Any]:
        lat = sorted(self.lat)
        n = len(lat)

        def pct(p: float) -> float | None:
            return round(lat[min(n - 1, int(p * n))] / 1000, 1) if n else None

        ps = sorted(self.per_second)
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "rps": round(self.requests / self.seconds, 1) if self.seconds else None,
            "rps_1s_median": ps[len(ps) // 2] if ps else None,
            "rps_1s": self.per_second,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "p999_us": pct(0.999),
            "max_us": round(lat[-1] / 1000, 1) if n else None,
            "mean_us": round(sum(lat) / n / 1000, 1) if n else None,
            "sent": self.sent,
            "answers": {k: dict(sorted(v.items())) for k, v in self.answers.items()},
            "checked": sum(sum(v.values()) for v in self.answers.values()),
            "mismatches": self.mismatches,
            "mismatch_examples": self.examples,
            "cpu": self.cpu,
            "bound": bound(self.cpu),
            "error": self.error,
        }


def bound(cpu: dict[str, float]) -> str:
    """Which side ran out of CPU, from the utilisation over the measured window."""
    if not cpu:
        return ""
    srv, gen = cpu.get("server", 0.0), cpu.get("generator", 0.0)
    cap = cpu.get("server_cores", 1.0)
    if srv >= 0.9 * cap:
        return "server CPU"
    if gen >= 0.9:
        return "generator CPU"
    return "neither CPU saturated (waiting: disk, scheduling or round trips)"


class Run:
    """One measurement: `conns` connections, warm-up, then `seconds` counted."""

    def __init__(
        self,
        label: str,
        source: Callable[[], tuple[str, bytes] | None],
        conns: int,
        warmup: float,
        seconds: float,
        max_requests: int,
        server_pids: Callable[[], list[int]],
        server_cores: float,
    ) -> None:
        self.r = Result(label, conns)
        self.source = source
        self.conns = conns
        self.warmup = warmup
        self.seconds = seconds
        self.max_requests = max_requests
        self.server_pids = server_pids
        self.server_cores = server_cores
        self.counting = False
        self.stopping = False
        self.t_start = 0
        self.t_end = 0
        self.outstanding = 0
        self.done: asyncio.Future[None] | None = None
        self.cpu0: tuple[float, float] = (0.0, 0.0)

    def issue(self, conn: Conn) -> None:
        if self.stopping or self.r.sent >= self.max_requests:
            self.stopping = True
            self.finish_if_idle()
            return
        item = self.source()
        if item is None:
            self.stopping = True
            self.finish_if_idle()
            return
        conn.kind, data = item
        self.r.sent += 1
        self.outstanding += 1
        conn.sent = time.perf_counter_ns()
        conn.transport.write(data)

    def answered(self, conn: Conn, answer: bytes, now: int) -> None:
        self.outstanding -= 1
        r = self.r
        word = answer[7:].split(None, 1)[0].decode("ascii", "replace") if answer else "?"
        r.answers[conn.kind][word] += 1
        if not answer.startswith(b"action=") or word not in OK_ANSWERS[conn.kind]:
            r.mismatches += 1
            if len(r.examples) < 5:
                r.examples.append(f"{conn.kind}: {answer[:160].decode('latin-1')!r}")
        if self.counting:
            r.requests += 1
            r.lat.append(now - conn.sent)
            sec = (now - self.t_start) // 1_000_000_000
            while len(r.per_second) <= sec:
                r.per_second.append(0)
            r.per_second[sec] += 1
        self.issue(conn)

    def finish_if_idle(self) -> None:
        if self.outstanding == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def cpu_now(self) -> tuple[float, float]:
        return sum(cpu_seconds(p) for p in self.server_pids()), time.process_time()

    def start_counting(self) -> None:
        self.cpu0 = self.cpu_now()
        self.t_start = time.perf_counter_ns()
        self.counting = True

    def stop_counting(self) -> None:
        self.t_end = time.perf_counter_ns()
        self.counting = False
        self.stopping = True
        srv, gen = self.cpu_now()
        wall = (self.t_end - self.t_start) / 1e9
        self.r.seconds = wall
        # A last partial second would understate its rate: drop it.
        if len(self.r.per_second) > int(wall):
            self.r.per_second = self.r.per_second[: int(wall)]
        self.r.cpu = {
            "server": round((srv - self.cpu0[0]) / wall, 3),
            "generator": round((gen - self.cpu0[1]) / wall, 3),
            "server_cores": self.server_cores,
        }
        self.finish_if_idle()

    async def go(self, port: int) -> Result:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        conns = []
        for _ in range(self.conns):
            _, c = await loop.create_connection(lambda: Conn(self), "127.0.0.1", port)
            conns.append(c)
        loop.call_later(self.warmup, self.start_counting)
        loop.call_later(self.warmup + self.seconds, self.stop_counting)
        for c in conns:
            self.issue(c)
        try:
            await asyncio.wait_for(self.done, self.warmup + self.seconds + 60)
        except TimeoutError:
            self.r.error = f"{self.outstanding} requests not answered 60 s after the end"
        lost = [c for c in conns if c.lost]
        if lost and not self.r.error:
            self.r.error = f"{len(lost)} connections closed by the server"
        for c in conns:
            c.transport.close()
        if not self.r.seconds:  # a count-bounded run that ended before its time
            self.stop_counting()
        return self.r


class Conn(asyncio.Protocol):
    def __init__(self, run: Run) -> None:
        self.run = run
        self.buf = b""
        self.kind = KNOWN
        self.sent = 0
        self.lost = False
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # One request in flight per connection: its answer is complete at "\n\n".
        buf = self.buf + data if self.buf else data
        if not buf.endswith(b"\n\n"):
            self.buf = buf
            return
        self.buf = b""
        self.run.answered(self, buf, time.perf_counter_ns())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.run.outstanding and not self.run.stopping:
            self.lost = True
            self.run.stopping = True
            self.run.outstanding = 0
            self.run.finish_if_idle()


# --------------------------------------------------------------------------
# Processes


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0.0


def children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, label: str, argv: list[str], port: int, logpath: str, cpus: str) -> None:
        self.label = label
        self.port = port
        self.cpus = cpus
        self.argv = ["taskset", "-c", cpus, *argv] if cpus else argv
        self.logpath = logpath
        self.logf = open(logpath, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv, stdout=self.logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)]

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.label} exited ({self.proc.returncode}): {self.tail()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise SystemExit(f"{self.label} not listening after {timeout:.0f} s: {self.tail()}")

    def tail(self) -> str:
        self.logf.flush()
        with open(self.logpath, "rb") as f:
            return f.read()[-2000:].decode("utf-8", "replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()
        return self.proc.returncode


# --------------------------------------------------------------------------
# The run


class Bench:
    def __init__(self, args: argparse.Namespace, work: str) -> None:
        self.args = args
        self.work = work
        self.rng = random.Random(args.seed)
        self.errors: list[str] = []
        self.sizes: dict[str, Any] = {}
        ncpu = len(os.sched_getaffinity(0))
        self.pinned = ncpu >= 2 and shutil.which("taskset") is not None and not args.no_pin
        self.all_cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        if self.pinned:
            os.sched_setaffinity(0, {0})

    # ---------------------------------------------------------------- setup

    def build_core(self, core_dir: str, triplets: list[Triplet]) -> dict[str, Any]:
        a = self.args
        now = int(time.time())
        t0 = now - PASS_AGE
        core = _core.Core(core_dir, min_delay=MIN_DELAY)  # the server's defaults otherwise
        t = time.perf_counter()
        log(f"reputation: generating {a.prefixes:,} prefixes")
        pfx = reputation_prefixes(self.rng, a.prefixes)
        log(f"reputation: loading {a.prefixes:,} prefixes as block list 'drop'")
        t = time.perf_counter()
        n = core.reputation.load("drop", "block", pfx.text(), action="reject", now=now)
        load_s = time.perf_counter() - t
        lst = next(x for x in core.reputation.lists() if x.name == "drop")
        n_v6 = len(pfx.v6)
        del pfx
        hits = [m for m in core.reputation.lookup_many([x.ip for x in triplets]) if m]
        if hits:
            self.errors.append(f"{len(hits)} known sources are on the block list")

        log(f"recon: {len(triplets):,} known sources + {a.recon_rows:,} background rows")
        background = recon_sources(self.rng, a.recon_rows)
        srcs = [x.ip for x in triplets] + background
        for lo in range(0, len(srcs), 100_000):
            core.recon.check_many(srcs[lo : lo + 100_000], t0)
        core.flush()
        for lo in range(0, len(srcs), 100_000):
            core.recon.check_many(srcs[lo : lo + 100_000], t0 + MIN_DELAY)
        core.flush()
        st = Counter(core.recon.peek(x.ip, now + 1).status for x in triplets)
        if st != Counter({"known": len(triplets)}):
            self.errors.append(f"known sources are not all known to Recon: {dict(st)}")
        rows = len(core.recon)
        core.close()
        return {
            "prefixes": n,
            "prefixes_ipv6": n_v6,
            "prefix_intervals": lst.intervals,
            "prefix_load_s": round(load_s, 2),
            "recon_rows": rows,
            "recon_background_rows": a.recon_rows,
        }

    def kith_config(self, data_dir: str, port: int, workers: int) -> str:
        text = (
            "# bench/policy.py: the policy service as measured\n"
            "[server]\n"
            f'data_dir = "{data_dir}"\n'
            + (f"workers = {workers}\n" if workers > 1 else "")
            + "[server.listeners]\n"
            f'policy = ["127.0.0.1:{port}"]\n'
            f'web = ["127.0.0.1:{free_port()}"]  # /metrics, where the server has it\n'
            "[recon]\n"
            f'min_delay = "{MIN_DELAY}s"\n'
        )
        path = os.path.join(self.work, f"kithmail-{workers}.toml")
        with open(path, "w") as f:
            f.write(text)
        config.load(path)  # fails here, not in the server, if the file is wrong
        return path

    def start_kith(self, data_dir: str, workers: int, cpus: str) -> Server:
        port = free_port()
        cfg = self.kith_config(data_dir, port, workers)
        label = f"kithmail ({workers} worker{'s' if workers > 1 else ''})"
        log(f"starting {label} on 127.0.0.1:{port}, cpus {cpus or 'any'}")
        s = Server(
            label,
            [self.args.kith, "policy", "-c", cfg],
            port,
            os.path.join(self.work, f"kithmail-{workers}.log"),
            cpus,
        )
        s.wait_ready()
        if workers > 1:
            deadline = time.monotonic() + 30
            while len(children(s.proc.pid)) < workers and time.monotonic() < deadline:
                time.sleep(0.1)
        return s

    def start_postgrey(self) -> Server:
        port = free_port()
        db = os.path.join(self.work, "postgrey")
        os.makedirs(db)
        argv = [self.args.postgrey, f"--inet=127.0.0.1:{port}", f"--dbdir={db}"]
        argv.append(f"--delay={MIN_DELAY}")
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgrey")
            os.chown(db, pw.pw_uid, pw.pw_gid)
        else:
            argv += [f"--user={pwd.getpwuid(os.getuid()).pw_name}", f"--group={os.getgid()}"]
        log(f"starting postgrey on 127.0.0.1:{port}, cpus {'1' if self.pinned else 'any'}")
        s = Server(
            "postgrey",
            argv,
            port,
            os.path.join(self.work, "postgrey.log"),
            "1" if self.pinned else "",
        )
        s.wait_ready()
        return s

    def prepass_postgrey(self, srv: Server, triplets: list[Triplet]) -> dict[str, Any]:
        """Pass every known triplet in Postgrey: first seen t0, retried t0 + delay.

        Postgrey takes the request's `policy_test_time` as its clock (its
        policy-test hook), so no real minute needs to pass.
        """
        t0 = int(time.time()) - PASS_AGE
        out: dict[str, Any] = {"t0": t0}
        for phase, when, want in (
            ("first", t0, "DEFER_IF_PERMIT"),
            ("retry", t0 + MIN_DELAY, "PREPEND"),
        ):
            reqs = [
                x.request(f"policy_test_time={when}\n").replace("{instance}", f"p{phase}{i:x}")
                for i, x in enumerate(triplets)
            ]
            it = iter(reqs)

            def source(it: Any = it) -> tuple[str, bytes] | None:
                nxt = next(it, None)
                return None if nxt is None else (KNOWN, nxt.encode())

            t = time.perf_counter()
            run = Run(f"postgrey pre-pass {phase}", source, 10, 0, 1e9, len(reqs), srv.pids, 1)
            r = asyncio.run(run.go(srv.port))
            got = {w: n for w, n in r.answers[KNOWN].items()}
            out[phase] = {"answers": got, "seconds": round(time.perf_counter() - t, 1)}
            if r.error or got != {want: len(triplets)}:
                self.errors.append(f"postgrey pre-pass {phase}: {got} {r.error}")
            log(f"postgrey pre-pass {phase}: {got} in {out[phase]['seconds']} s")
        return out

    # ---------------------------------------------------------------- measuring

    def measure(self, srv: Server, label: str, slot: int, conc: int, cores: float) -> Result:
        a = self.args
        stream = Stream(a.seed, slot, self.heads, self.tails)
        run = Run(label, stream.next, conc, a.warmup, a.seconds, a.max_requests, srv.pids, cores)
        r = asyncio.run(run.go(srv.port))
        if r.error:
            self.errors.append(f"{label} x{conc}: {r.error}")
        if r.mismatches:
            self.errors.append(
                f"{label} x{conc}: {r.mismatches} answers not as expected, e.g. {r.examples[:2]}"
            )
        j = r.as_json()
        log(
            f"{label:<28} x{conc:<3} {fmt_rate(j['rps']):>7}/s  p50 {j['p50_us']} us  "
            f"p99 {j['p99_us']} us  cpu server {r.cpu.get('server')} "
            f"generator {r.cpu.get('generator')}  {dict(r.answers[KNOWN])} {dict(r.answers[NEW])}"
        )
        return r

    def run(self) -> dict[str, Any]:
        a = self.args
        triplets = known_triplets(self.rng, a.known)
        self.heads, self.tails = split_known(triplets)
        data_dir = os.path.join(self.work, "kithmail")
        core_dir = os.path.join(data_dir, "core")
        os.makedirs(core_dir)
        self.sizes = self.build_core(core_dir, triplets)
        sample = Stream(a.seed, 99, self.heads, self.tails)
        req_bytes = [len(sample.next()[1]) for _ in range(1000)]

        ours_pinned = self.start_kith(data_dir, 1, "1" if self.pinned else "")
        pg = self.start_postgrey()
        prepass = self.prepass_postgrey(pg, triplets)
        rows: list[dict[str, Any]] = []
        try:
            for ci, c in enumerate(a.concurrency):
                ours = self.measure(ours_pinned, "kithmail", ci, c, 1)
                base = self.measure(pg, "postgrey", ci, c, 1)
                oj, bj = ours.as_json(), base.as_json()
                rows.append(
                    {
                        "concurrency": c,
                        "ours": oj,
                        "postgrey": bj,
                        "ratio_rps": round(oj["rps"] / bj["rps"], 2)
                        if oj["rps"] and bj["rps"]
                        else None,
                        "ratio_p99": round(bj["p99_us"] / oj["p99_us"], 2)
                        if oj["p99_us"] and bj["p99_us"]
                        else None,
                    }
                )
        finally:
            rc_ours = ours_pinned.stop()
            rc_pg = pg.stop()
        if rc_ours != 0:
            self.errors.append(f"kithmail exited {rc_ours}: {ours_pinned.tail()[-500:]}")

        workers_rows: list[dict[str, Any]] = []
        workers_ok = "workers" in config.Server.model_fields
        if a.workers > 1 and workers_ok:
            ours_w = self.start_kith(data_dir, a.workers, self.all_cpus if self.pinned else "")
            try:
                for ci, c in enumerate(a.concurrency):
                    r = self.measure(ours_w, f"kithmail {a.workers} workers", 8 + ci, c, a.workers)
                    workers_rows.append({"concurrency": c, "ours": r.as_json()})
            finally:
                rc = ours_w.stop()
            if rc != 0:
                self.errors.append(f"kithmail {a.workers} workers exited {rc}")

        return {
            "benchmark": "policy",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(self.work),
            "build_profile": a.profile,
            "command": [sys.executable, *sys.argv],
            "source": source_tree(),
            "quick": a.quick,
            "seed": a.seed,
            "kithmail": {
                "version": getattr(_core, "__version__", None),
                "module": getattr(_core, "__file__", None),
                "server": a.kith,
                "config": open(os.path.join(self.work, "kithmail-1.toml")).read(),
                "exit_status": rc_ours,
                "durability": "Recon and pending writes group-committed (LMDB, fsync) every "
                "100 ms, the server's default [recon] commit_window",
            },
            "postgrey": {
                "version": postgrey_version(),
                "argv": pg.argv,
                "exit_status": rc_pg,
                "durability": "BerkeleyDB transaction per request, synced at commit",
                "prepass": prepass,
            },
            "pinning": {
                "applied": self.pinned,
                "generator_cpus": [0] if self.pinned else "any",
                "server_cpus": [1] if self.pinned else "any",
                "note": "generator (this process) on core 0, kithmail and postgrey on core 1 "
                "(taskset -c 1), one at a time"
                if self.pinned
                else "not pinned (fewer than 2 cores, no taskset, or --no-pin)",
            },
            "sizes": {
                **self.sizes,
                "known_triplets": len(triplets),
                "known_ipv6": sum(":" in x.ip for x in triplets),
                "new_share": NEW_SHARE,
                "ipv6_share": V6_SHARE,
                "concurrency": a.concurrency,
                "seconds": a.seconds,
                "warmup_s": a.warmup,
                "max_requests_per_run": a.max_requests,
                "request_bytes_mean": round(sum(req_bytes) / len(req_bytes)),
                "min_delay_s": MIN_DELAY,
            },
            "results": rows,
            "workers": {
                "supported": workers_ok,
                "workers": a.workers,
                "note": f"{a.workers} kithmail workers (SO_REUSEPORT), unpinned: they share "
                "core 0 with the generator, so these figures are not per core",
                "results": workers_rows,
            },
            "goals": goals(rows, workers_rows),
            "correct": not self.errors,
            "errors": self.errors,
        }


def source_tree() -> dict[str, Any]:
    """The commit measured, and whether the tree had local changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "python", "rust"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
        return {"commit": head, "changed": [x[3:] for x in dirty if x.strip()]}
    except (OSError, subprocess.SubprocessError):
        return {}


def postgrey_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "postgrey"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def goals(rows: list[dict[str, Any]], workers_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals beside the measured figures; reported, never asserted."""
    out: dict[str, Any] = {}
    best = max(rows, key=lambda r: r["ours"]["rps"] or 0, default=None)
    if best:
        v = best["ours"]["rps"] or 0
        out["rps_per_core"] = {
            "goal": GOALS["rps_per_core"],
            "measured": v,
            "at_concurrency": best["concurrency"],
            "met": v >= GOALS["rps_per_core"],
            "note": "one worker pinned to one core; durable state = 100 ms group commit",
        }
    ratios = [r["ratio_rps"] for r in rows if r["ratio_rps"]]
    if ratios:
        out["ratio_vs_postgrey"] = {
            "goal": GOALS["ratio_vs_postgrey"],
            "measured_min": min(ratios),
            "measured_max": max(ratios),
            "met": min(ratios) >= GOALS["ratio_vs_postgrey"],
        }
    at16 = next((r for r in rows if r["concurrency"] == 16), None)
    if at16 and at16["ours"]["p99_us"] is not None:
        p99 = at16["ours"]["p99_us"] / 1000
        out["p99_ms_at_16"] = {
            "goal": GOALS["p99_ms_at_16"],
            "measured": round(p99, 3),
            "met": p99 <= GOALS["p99_ms_at_16"],
        }
    w16 = next((r for r in workers_rows if r["concurrency"] == 16), None)
    if w16 and w16["ours"]["p99_us"] is not None:
        out["p99_ms_at_16_workers"] = round(w16["ours"]["p99_us"] / 1000, 3)
    return out


# --------------------------------------------------------------------------
# Output


def fmt_us(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1000:.2f}ms" if x >= 1000 else f"{x:.0f}us"


def print_table(rep: dict[str, Any]) -> None:
    m, s, p = rep["machine"], rep["sizes"], rep["pinning"]
    print(
        f"kithmail policy benchmark: {rep['build_profile']} build, {m['cpu']}, {m['cores']} "
        f"cores, {m['python']}, storage {m['storage']['fstype']}; postgrey "
        f"{rep['postgrey']['version']}"
    )
    print(
        f"data: {s['prefixes']:,} block-list prefixes, Recon {s['recon_rows']:,} rows; stream "
        f"{s['known_triplets']:,} known triplets, {s['new_share']:.0%} new sources, "
        f"~{s['request_bytes_mean']} B/request; {s['seconds']} s per figure after "
        f"{s['warmup_s']} s warm-up"
    )
    print(f"pinning: {p['note']}")
    head = ["conns", "ours/s", "p50", "p99", "cpu srv/gen", "postgrey/s", "p50", "p99", "ratio"]
    lines = []
    for r in rep["results"]:
        o, b = r["ours"], r["postgrey"]
        lines.append(
            [
                str(r["concurrency"]),
                fmt_rate(o["rps"]),
                fmt_us(o["p50_us"]),
                fmt_us(o["p99_us"]),
                f"{o['cpu'].get('server', 0):.2f}/{o['cpu'].get('generator', 0):.2f}",
                fmt_rate(b["rps"]),
                fmt_us(b["p50_us"]),
                fmt_us(b["p99_us"]),
                f"x{r['ratio_rps']:.1f}" if r["ratio_rps"] else "-",
            ]
        )
    w = rep["workers"]
    wl = []
    for r in w["results"]:
        o = r["ours"]
        wl.append(
            [
                str(r["concurrency"]),
                fmt_rate(o["rps"]),
                fmt_us(o["p50_us"]),
                fmt_us(o["p99_us"]),
                f"{o['cpu'].get('server', 0):.2f}/{o['cpu'].get('generator', 0):.2f}",
                "",
                "",
                "",
                "",
            ]
        )
    widths = [max(len(x[i]) for x in [head, *lines, *wl]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(wd) for c, wd in zip(cells, widths, strict=True)).rstrip()

    print(line(head))
    print(line(["-" * wd for wd in widths]))
    for x in lines:
        print(line(x))
    if wl:
        print(f"kithmail, {w['note']}:")
        for x in wl:
            print(line(x))
    for r in rep["results"]:
        for who in ("ours", "postgrey"):
            o = r[who]
            print(
                f"  x{r['concurrency']} {who}: bound by {o['bound']}; answers known "
                f"{o['answers']['known']}, new {o['answers']['new']}"
            )
    g = rep["goals"]
    parts = []
    if "rps_per_core" in g:
        x = g["rps_per_core"]
        parts.append(
            f">= {x['goal']:,} req/s per core: {x['measured']:,.0f} ({'met' if x['met'] else 'not met'})"
        )
    if "ratio_vs_postgrey" in g:
        x = g["ratio_vs_postgrey"]
        parts.append(
            f">= x{x['goal']:.0f} Postgrey: x{x['measured_min']:.1f}..x{x['measured_max']:.1f} "
            f"({'met' if x['met'] else 'not met'})"
        )
    if "p99_ms_at_16" in g:
        x = g["p99_ms_at_16"]
        parts.append(
            f"p99 <= {x['goal']} ms at 16: {x['measured']:.2f} ms "
            f"({'met' if x['met'] else 'not met'})"
        )
    print("goals (reported, not asserted): " + "; ".join(parts))
    if rep["errors"]:
        print("ERRORS: " + "; ".join(rep["errors"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the Postfix policy service (kith policy) beside Postgrey."
    )
    p.add_argument("--json", metavar="PATH", help="write the results here (atomically)")
    p.add_argument("--quick", action="store_true", help="a smoke run: small data, 2 s per figure")
    p.add_argument("--seconds", type=float, help="measured seconds per figure (default 10)")
    p.add_argument("--warmup", type=float, help="seconds before each figure (default 1)")
    p.add_argument("--prefixes", type=int, help="block-list prefixes (default 5,000,000)")
    p.add_argument("--known", type=int, help="known triplets in the stream (default 20,000)")
    p.add_argument("--recon-rows", type=int, help="background Recon rows (default 1,000,000)")
    p.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(CONCURRENCY),
        help="connections, comma-separated (default 1,10,16,100)",
    )
    p.add_argument("--max-requests", type=int, default=4_000_000, help="per figure, a bound")
    p.add_argument("--workers", type=int, default=2, help="the unpinned run's workers (0: skip)")
    p.add_argument("--kith", help="the kith to serve with (default: beside this python)")
    p.add_argument("--postgrey", default="/usr/sbin/postgrey", help="the postgrey script")
    p.add_argument("--profile", default="release", help="build profile to record")
    p.add_argument("--seed", type=int, default=20_240_601, help="data seed")
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument("--dir", help="parent of the temporary directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    a.seconds = a.seconds or (2.0 if a.quick else 10.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if a.quick else 1.0)
    a.prefixes = a.prefixes or (200_000 if a.quick else 5_000_000)
    a.known = a.known or (2_000 if a.quick else 20_000)
    a.recon_rows = a.recon_rows if a.recon_rows is not None else (20_000 if a.quick else 1_000_000)
    if len(a.concurrency) > SLOTS_PER_SERVER:
        p.error(f"at most {SLOTS_PER_SERVER} concurrency levels")
    if not 0 < a.max_requests < MAX_PER_RUN:
        p.error(f"--max-requests must be under {MAX_PER_RUN:,}")
    a.kith = a.kith or os.path.join(os.path.dirname(sys.executable), "kith")
    for exe, what in ((a.kith, "kith (make bench installs it)"), (a.postgrey, "postgrey")):
        if not os.access(exe, os.X_OK):
            p.error(f"{exe} not found: install {what}")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with workdir("policy", args, shared=True) as work:
        report = Bench(args, work).run()
    return finish(args, report, print_table)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
