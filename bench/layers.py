#!/usr/bin/env python3
"""Benchmark of kithmail's layers 3 and 4 (SPF, DKIM/DMARC/ARC, clamd) per message.

One run measures, on the same seeded messages and against the same peers:

- **ours**, kithmail's layers as the SMTP listener calls them: (a) the SPF
  layer at RCPT (`spoofing.spf.for_pipeline` over `SpfChecker`: the MAIL
  FROM and the HELO identity, each pyspf check in a thread); (b)
  `Spoofing.message` at the end of DATA (DKIM, ARC and DMARC, keys through
  kithmail's async `Resolver`, dkimpy in a thread); (c) `Antivirus()(ctx)`
  (clamd's INSTREAM over its unix socket); (d) all of them as the pipeline
  runs them: `Pipeline.rcpt_spf` then `Pipeline.message` (Spoofing, then
  Antivirus), metrics on.
- **floors and baselines**, in the same run: pyspf's `spf.check2` and
  dkimpy's `dkim.verify` (and `dkim.arc_verify`, and the `_dmarc` TXT
  lookup with dnspython) called directly in a loop against the same DNS
  server, the cost our wrappers add to; clamd's INSTREAM over a plain
  blocking socket; `clamdscan --stream -` run once per message, the
  clamdscan-per-message way of scanning.

The messages are ~30 kB (seeded text and HTML, a small zip attachment),
each one different, DKIM-signed (RSA 2048, relaxed/relaxed) by a domain
whose key, DMARC record and SPF records a local dnsmasq serves from memory.
One clamd (Debian's) scans with the bench's own signature database (the
EICAR string), on a unix socket. kithmail's resolvers keep no cache, so
every check asks dnsmasq every time: that is the warm case measured.

Every answer is checked (spf=pass for both identities, dkim=pass,
dmarc=pass, arc=none, clean; and an EICAR message detected by every
scanner); a mismatch is counted beside the figure, listed in `errors` and
makes the exit status 1. Timing is never asserted.

With two or more cores this process runs on core 0 and the peers (clamd,
dnsmasq) on core 1 (taskset); clamdscan, a child of this process, runs on
core 0.

Trusts: nothing outside this machine. DNS and clamd are on loopback and a
unix socket; names are under .test (RFC 2606) and addresses from RFC 5737.

Run ``bench/layers.py --help``; bench/README.md says how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import email.message
import email.policy
import importlib.metadata
import io
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _layers_peers as peers
from _smtp_peers import StartError, deb_version
from core import finish, fmt_rate, log, machine, workdir
from policy import source_tree

try:
    import dkim as dkimpy
    import dns.name
    import dns.rdatatype
    import dns.resolver
    import spf as pyspf
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from kithmail import Core, config
    from kithmail.dns import Resolver
    from kithmail.layers.antivirus import Antivirus
    from kithmail.layers.spoofing import AuthResults, SpfResult, Spoofing
    from kithmail.layers.spoofing.spf import for_pipeline
    from kithmail.metrics import Metrics
    from kithmail.pipeline import MessageContext, Pipeline
    from kithmail.spf import SpfChecker
    from kithmail.tenants import TenantPolicy
except ImportError as exc:  # pragma: no cover - setup error
    sys.exit(f"bench/layers.py needs kithmail installed ({exc}); run make bench")

# pyspf's own DNS lookup (dnspython's default resolver) and the one
# kithmail.spf puts in its place when imported: the floors call pyspf as a
# program that never heard of kithmail would.
PYSPF_LOOKUP = pyspf.DNSLookup_dnspython
KITH_LOOKUP = pyspf.DNSLookup
assert KITH_LOOKUP is not PYSPF_LOOKUP, "kithmail.spf did not install its lookup"
# pyspf's lookup calls dns.resolver.query, which dnspython deprecates.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="spf")

SENDER_DOMAIN = "sender.test"
SELECTOR = "s2048"
FROM = f"Ann Example <ann.example@{SENDER_DOMAIN}>"
MAIL_FROM = f"bounces@{SENDER_DOMAIN}"
HELO = f"out1.{SENDER_DOMAIN}"
CLIENT_IP = "192.0.2.25"
LOCAL_DOMAIN = "example.test"
RCPT = f"bob@{LOCAL_DOMAIN}"
KEY_BITS = 2048
FOREIGN_LIMIT = 0.1  # cores used by other processes during a figure: not a clean figure
SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version"]
SIGNED_HEADERS.append(b"content-type")
DMARC = f"v=DMARC1; p=reject; rua=mailto:dmarc-reports@{SENDER_DOMAIN}"
# MAIL FROM: `mx` does not match the client, the include does (4 queries);
# HELO: `a` matches (2 queries). Realistic shapes, each within RFC 7208's limits.
SPF_RECORDS = [
    (SENDER_DOMAIN, f"v=spf1 mx include:_spf.{SENDER_DOMAIN} -all"),
    (f"_spf.{SENDER_DOMAIN}", "v=spf1 ip4:192.0.2.0/25 ip4:198.51.100.0/24 -all"),
    (HELO, "v=spf1 a -all"),
]
A_RECORDS = [(HELO, CLIENT_IP), (f"mx1.{SENDER_DOMAIN}", "203.0.113.10")]
MX_RECORDS = [(SENDER_DOMAIN, f"mx1.{SENDER_DOMAIN}", 10)]
ZONES = [SENDER_DOMAIN, LOCAL_DOMAIN]

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their can has been if more "
    "when will would who so no report quarter figures budget meeting agenda review team "
    "customer invoice order shipment delivery schedule project update summary draft please "
    "attached note regards thanks question answer proposal contract service account payment "
    "balance forecast sales growth margin region office week month year plan target result "
    "support request ticket release version feature issue change approval deadline minutes "
    "colleague manager partner supplier product price discount offer market analysis data"
)
WORDS = _WORDS.split()


# --------------------------------------------------------------------------
# Seeded messages


def _text(rng: random.Random, size: int) -> list[str]:
    """Paragraphs of seeded words, lines of at most 76 characters, about `size` bytes."""
    paras: list[str] = []
    total = 0
    while total < size:
        words = [rng.choice(WORDS) for _ in range(rng.randrange(40, 120))]
        words[0] = words[0].capitalize()
        text = " ".join(words) + "."
        lines, line = [], ""
        for w in text.split():
            if len(line) + len(w) + 1 > 76:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}" if line else w
        lines.append(line)
        para = "\n".join(lines)
        paras.append(para)
        total += len(para) + 2
    return paras


def _attachment(rng: random.Random, rows: int) -> bytes:
    """A zip holding one seeded CSV: the small attachment a business mail carries."""
    csv = ["date,region,product,units,price,total"]
    for d in range(rows):
        units, price = rng.randrange(1, 500), rng.randrange(100, 99_999) / 100
        region = rng.choice(("north", "south", "east", "west"))
        csv.append(
            f"2026-{1 + d % 12:02d}-{1 + d % 28:02d},{region},"
            f"P-{rng.randrange(10_000):04d},{units},{price:.2f},{units * price:.2f}"
        )
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo("figures.csv", date_time=(2026, 10, 5, 10, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, "\r\n".join(csv) + "\r\n")
    return out.getvalue()


def _compose(i: int, rng: random.Random, text_bytes: int, attachment: bytes, eicar: bool) -> bytes:
    m = email.message.EmailMessage()
    m["Received"] = (
        f"from app{i % 7}.int.{SENDER_DOMAIN} (app{i % 7}.int.{SENDER_DOMAIN} "
        f"[198.51.100.{10 + i % 200}]) by {HELO} with ESMTPS id {rng.getrandbits(48):012x}; "
        f"Mon, 5 Oct 2026 10:{i // 60 % 60:02d}:{i % 60:02d} +0000"
    )
    m["From"] = FROM
    m["To"] = f"Bob <{RCPT}>"
    m["Subject"] = " ".join(rng.choice(WORDS) for _ in range(6)).capitalize()
    m["Date"] = f"Mon, 5 Oct 2026 10:{i // 60 % 60:02d}:{i % 60:02d} +0000"
    m["Message-ID"] = f"<{i}.{rng.getrandbits(64):016x}@{SENDER_DOMAIN}>"
    paras = _text(rng, text_bytes * 3 // 5)
    m.set_content("\n\n".join(paras) + "\n\nAnn\n")
    html = "".join(f"<p>{p}</p>\n" for p in _text(rng, text_bytes * 2 // 5))
    m.add_alternative(f"<html><body>\n{html}<p>Ann</p>\n</body></html>\n", subtype="html")
    m.make_mixed()
    m.add_attachment(attachment, maintype="application", subtype="zip", filename="figures.zip")
    if eicar:
        m.add_attachment(
            peers.EICAR, maintype="application", subtype="octet-stream", filename="eicar.com"
        )
    return m.as_bytes(policy=email.policy.SMTP)


def make_message(i: int, seed: int, size: int, key_pem: bytes, *, eicar: bool = False) -> bytes:
    """Message `i` of the run: about `size` bytes once signed, CRLF line ends."""
    rng = random.Random(f"{seed}:{i}")
    attachment = _attachment(rng, 160)
    state = rng.getstate()
    text = max(1000, size - 1500 - len(attachment) * 4 // 3)
    raw = _compose(i, rng, text, attachment, eicar)
    # One correction, with the same seeded draws: land near `size` with the signature.
    rng.setstate(state)
    raw = _compose(i, rng, max(1000, text + size - len(raw) - 480), attachment, eicar)
    sig = dkimpy.sign(
        raw,
        SELECTOR.encode(),
        SENDER_DOMAIN.encode(),
        key_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=SIGNED_HEADERS,
    )
    return bytes(sig) + raw


def new_key() -> tuple[bytes, str]:
    """An RSA key pair: the private PEM and the DKIM key record."""
    k = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    pem = k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = k.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


@dataclass
class Message:
    raw: bytes
    lines: list[bytes]  # as the listener holds it: one line per item, CRLF kept
    header: tuple[bytes, ...]


def split(raw: bytes) -> Message:
    lines = raw.splitlines(keepends=True)
    end = lines.index(b"\r\n")
    return Message(raw, lines, tuple(lines[:end]))


# --------------------------------------------------------------------------
# Timing


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat, not iowait or idle)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_idle(limit: float) -> float:
    """Wait up to `limit` s for the machine to be under 25 % busy over a second; its load."""
    deadline = time.monotonic() + limit
    cores = os.cpu_count() or 1
    while True:
        b0, t0 = machine_busy(), time.monotonic()
        time.sleep(1.0)  # the window the load is measured over
        load = (machine_busy() - b0) / (time.monotonic() - t0) / cores
        if load < 0.25 or time.monotonic() >= deadline:
            return load
        log(f"machine {load:.0%} busy; waiting for it to be idle")


def _self_cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


Check = Callable[[int], Awaitable[str | None]]


@dataclass
class Impl:
    """One way of doing a row's checks: `check(i)` does message i, None when right."""

    name: str
    role: str  # "ours", "floor" or "baseline"
    check: Check
    pyspf_own_dns: bool = False  # pyspf's own lookup while it runs
    concurrency: int = 1  # messages in flight at once
    rates: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    count: int = 0
    wall: float = 0.0
    mismatches: int = 0
    examples: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    dns_queries: int = 0


@contextlib.contextmanager
def pyspf_lookup(own: bool) -> Any:
    pyspf.DNSLookup = PYSPF_LOOKUP if own else KITH_LOOKUP
    try:
        yield
    finally:
        pyspf.DNSLookup = KITH_LOOKUP


def pct(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    k = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[k] / 1e6


# --------------------------------------------------------------------------
# The run


class Bench:
    def __init__(self, a: argparse.Namespace, work: str) -> None:
        self.a = a
        self.work = work
        self.errors: list[str] = []
        self.pinned = False
        self.peer_cpus = ""
        self.messages: list[Message] = []
        self.eicar: Message | None = None
        self.results: list[dict[str, Any]] = []
        self.eicar_checks: dict[str, Any] = {}
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.unclean: list[str] = []
        self.background = 0.0
        self.have_clamdscan = os.path.exists(peers.CLAMDSCAN)
        self.skipped: list[str] = []
        if not self.have_clamdscan:
            self.skipped.append(
                f"the clamdscan baselines: {peers.CLAMDSCAN} is not installed "
                "(apt-get install --no-install-recommends clamdscan)"
            )
            log(f"WARNING: {peers.CLAMDSCAN} missing, its baselines are skipped")

    # ------------------------------------------------------------ setup

    def _pin(self) -> None:
        if self.a.no_pin or len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset"):
            return
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[0]})  # before any thread is made: they inherit it
        self.peer_cpus = str(cpus[1])
        self.pinned = True

    def _data(self) -> None:
        a = self.a
        t0 = time.perf_counter()
        self.key_pem, self.key_record = new_key()
        self.messages = [
            split(make_message(i, a.seed, a.size, self.key_pem)) for i in range(a.messages)
        ]
        self.eicar = split(make_message(a.messages, a.seed, a.size, self.key_pem, eicar=True))
        sizes = [len(m.raw) for m in self.messages]
        log(
            f"{len(sizes)} messages, {min(sizes):,}..{max(sizes):,} bytes "
            f"(mean {statistics.mean(sizes):,.0f}), made in {time.perf_counter() - t0:.1f}s"
        )

    def _peers(self) -> None:
        self.dnsmasq = peers.start_dnsmasq(
            self.work,
            self.peer_cpus,
            zones=ZONES,
            a=A_RECORDS,
            mx=MX_RECORDS,
            txt=[
                *SPF_RECORDS,
                (f"{SELECTOR}._domainkey.{SENDER_DOMAIN}", self.key_record),
                (f"_dmarc.{SENDER_DOMAIN}", DMARC),
            ],
        )
        self.clamd = peers.start_clamd(self.work, self.peer_cpus)
        log(f"dnsmasq on {self.dnsmasq.address}, clamd on {self.clamd.address}")

    def _layers(self) -> None:
        settings = config.from_mapping(
            {
                "dns": {"nameservers": [self.dnsmasq.address], "timeout": "5s"},
                "domains": {"local": [LOCAL_DOMAIN]},
                "antivirus": {"clamd": self.clamd.address},
            }
        )
        self.settings = settings
        self.policy = TenantPolicy("default", settings)
        self.resolver = Resolver.from_settings(settings.dns)
        self.checker = SpfChecker(settings.dns.nameservers, settings.dns.timeout)
        self.spf_layer = for_pipeline(self.checker)
        self.spoofing = Spoofing(self.resolver)
        self.antivirus = Antivirus()
        self.core = Core(os.path.join(self.work, "core"), map_size=1 << 28)
        self.pipeline = Pipeline(
            settings,
            self.core,
            self.resolver,
            self.checker,
            metrics=Metrics("smtp"),
            spf_layer=self.spf_layer,
            message_layers=[self.spoofing.message, self.antivirus],
            trusted_message_layers=[self.antivirus],
        )
        # The floors' DNS: dnspython's default resolver, which pyspf's own
        # lookup and dkimpy's get_txt use, pointed at the same dnsmasq.
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.dnsmasq.port
        r.domain = dns.name.root
        r.search = []
        dns.resolver.default_resolver = r
        self.floor_resolver = r

    def ctx(self, m: Message, auth: AuthResults) -> MessageContext:
        return MessageContext(
            policy=self.policy,
            client_ip=CLIENT_IP,
            helo=HELO,
            mail_from=MAIL_FROM,
            recipients=(RCPT,),
            header=m.header,
            data=m.lines,
            auth=auth,
            local_domains=frozenset({LOCAL_DOMAIN}),
        )

    # ------------------------------------------------------------ the checks

    def msg(self, i: int) -> Message:
        return self.messages[i % len(self.messages)]

    async def ours_spf(self, i: int) -> str | None:
        auth = AuthResults()
        v = await self.spf_layer(self.settings.spf, auth, CLIENT_IP, HELO, MAIL_FROM)
        return _spf_wrong(v.reason, auth)

    def floor_spf_mailfrom(self) -> str | None:
        res, exp = pyspf.check2(CLIENT_IP, MAIL_FROM, HELO)
        return None if res == "pass" else f"pyspf MAIL FROM {res}: {exp}"

    def floor_spf_both(self) -> str | None:
        res, exp = pyspf.check2(CLIENT_IP, MAIL_FROM, HELO)
        hres, hexp = pyspf.check2(CLIENT_IP, "", HELO)
        if (res, hres) != ("pass", "pass"):
            return f"pyspf MAIL FROM {res} ({exp}), HELO {hres} ({hexp})"
        return None

    async def ours_auth(self, i: int) -> str | None:
        m = self.msg(i)
        auth = AuthResults(spf_mailfrom=SPF_PASS, spf_helo=SPF_HELO_PASS)
        v = await self.spoofing.message(self.ctx(m, auth))
        return _auth_wrong(v.reason, auth)

    def floor_dkim(self, i: int) -> str | None:
        return None if dkimpy.verify(self.msg(i).raw) else "dkim.verify False"

    def floor_auth(self, i: int) -> str | None:
        raw = self.msg(i).raw
        if not dkimpy.verify(raw):
            return "dkim.verify False"
        cv, _, why = dkimpy.arc_verify(raw)
        if cv != dkimpy.CV_None:
            return f"arc_verify {cv!r}: {why}"
        ans = self.floor_resolver.resolve(f"_dmarc.{SENDER_DOMAIN}", "TXT")
        if not any(b"".join(r.strings).startswith(b"v=DMARC1") for r in ans):
            return "no DMARC record"
        return None

    async def ours_av(self, i: int) -> str | None:
        v = await self.antivirus(self.ctx(self.msg(i), AuthResults()))
        return None if v.reason == "antivirus.clean" else f"{v.reason}: {v.detail}"

    def floor_instream(self, raw: bytes) -> str:
        ans = peers.clamd_command(self.clamd.socket, b"zINSTREAM\0", raw)
        return ans.rstrip(b"\0").decode("latin-1")

    def floor_av(self, i: int) -> str | None:
        ans = self.floor_instream(self.msg(i).raw)
        return None if ans == "stream: OK" else ans

    def clamdscan(self, raw: bytes) -> tuple[int, str]:
        r = subprocess.run(
            [peers.CLAMDSCAN, f"--config-file={self.clamd.conf}", "--stream", "--no-summary", "-"],
            input=raw,
            capture_output=True,
            timeout=60,
            check=False,
        )
        return r.returncode, (r.stdout + r.stderr).decode("utf-8", "replace").strip()

    def base_clamdscan(self, i: int) -> str | None:
        rc, out = self.clamdscan(self.msg(i).raw)
        return None if rc == 0 and out == "stream: OK" else f"clamdscan {rc}: {out[:200]}"

    async def ours_pipeline(self, i: int) -> str | None:
        m = self.msg(i)
        auth = AuthResults()
        sv = await self.pipeline.rcpt_spf(
            self.policy, auth, client_ip=CLIENT_IP, helo=HELO, mail_from=MAIL_FROM
        )
        tv = await self.pipeline.message(self.ctx(m, auth))
        if sv is None:
            return "no SPF verdict"
        wrong = _spf_wrong(sv.reason, auth) or _auth_wrong(tv.verdicts[0].reason, auth)
        if wrong:
            return wrong
        got = [v.reason for v in tv.verdicts]
        if tv.decisive is not None or got != ["dmarc.pass", "antivirus.clean"]:
            return f"pipeline: decisive {tv.decisive}, verdicts {got}"
        return None

    def floor_pipeline(self, i: int, scan: str) -> str | None:
        wrong = self.floor_spf_both() or self.floor_auth(i)
        if wrong:
            return wrong
        return self.floor_av(i) if scan == "instream" else self.base_clamdscan(i)

    # ------------------------------------------------------------ rows

    def rows(self) -> list[tuple[str, str, list[Impl]]]:
        def sync(fn: Callable[[int], str | None]) -> Check:
            async def run(i: int) -> str | None:
                return fn(i)

            return run

        c = self.a.concurrency
        self.pool = concurrent.futures.ThreadPoolExecutor(c, thread_name_prefix="floor")

        def threaded(fn: Callable[[int], str | None]) -> Check:
            async def run(i: int) -> str | None:
                return await asyncio.get_running_loop().run_in_executor(self.pool, fn, i)

            return run

        return [
            (
                "spf",
                "the SPF layer at RCPT: MAIL FROM and HELO identities (6 DNS queries)",
                [
                    Impl("kithmail spf layer (for_pipeline)", "ours", self.ours_spf),
                    Impl(
                        "pyspf check2 MAIL FROM + HELO",
                        "floor",
                        sync(lambda i: self.floor_spf_both()),
                        pyspf_own_dns=True,
                    ),
                    Impl(
                        "pyspf check2 MAIL FROM only",
                        "floor",
                        sync(lambda i: self.floor_spf_mailfrom()),
                        pyspf_own_dns=True,
                    ),
                ],
            ),
            (
                "spoofing",
                "Spoofing.message: DKIM + ARC + DMARC (+ own domains) at end of DATA",
                [
                    Impl("kithmail Spoofing.message", "ours", self.ours_auth),
                    Impl("dkimpy verify + arc_verify + _dmarc TXT", "floor", sync(self.floor_auth)),
                    Impl("dkimpy dkim.verify", "floor", sync(self.floor_dkim)),
                ],
            ),
            (
                "antivirus",
                "Antivirus()(ctx): the whole message to clamd (INSTREAM, unix socket)",
                [
                    Impl("kithmail Antivirus", "ours", self.ours_av),
                    Impl("INSTREAM, blocking socket", "floor", sync(self.floor_av)),
                    Impl("clamdscan --stream per message", "baseline", sync(self.base_clamdscan)),
                ],
            ),
            (
                "pipeline",
                "Pipeline.rcpt_spf + Pipeline.message (Spoofing, Antivirus), metrics on",
                [
                    Impl("kithmail pipeline", "ours", self.ours_pipeline),
                    Impl(
                        "floors in series (pyspf, dkimpy, INSTREAM)",
                        "floor",
                        sync(lambda i: self.floor_pipeline(i, "instream")),
                        pyspf_own_dns=True,
                    ),
                    Impl(
                        "floors, clamdscan per message",
                        "baseline",
                        sync(lambda i: self.floor_pipeline(i, "clamdscan")),
                        pyspf_own_dns=True,
                    ),
                ],
            ),
            (
                f"pipeline x{c}",
                f"the same, {c} messages in flight at once (one asyncio loop; the floors "
                f"in {c} threads)",
                [
                    Impl("kithmail pipeline", "ours", self.ours_pipeline, concurrency=c),
                    Impl(
                        f"floors in series, {c} threads",
                        "floor",
                        threaded(lambda i: self.floor_pipeline(i, "instream")),
                        pyspf_own_dns=True,
                        concurrency=c,
                    ),
                    Impl(
                        f"floors, clamdscan, {c} threads",
                        "baseline",
                        threaded(lambda i: self.floor_pipeline(i, "clamdscan")),
                        pyspf_own_dns=True,
                        concurrency=c,
                    ),
                ],
            ),
        ]

    async def _round(self, impl: Impl, start: int, seconds: float, keep: bool) -> None:
        n = len(self.messages)
        clamd_pid, dns_pid = self.clamd.proc.proc.pid, self.dnsmasq.proc.proc.pid
        q0 = self.dnsmasq.dns_queries() if keep else 0
        me0, kids0 = _self_cpu()
        cl0, dn0 = _proc_cpu(clamd_pid), _proc_cpu(dns_pid)
        busy0 = machine_busy()
        count = 0
        done = 0

        async def worker() -> None:
            nonlocal count, done
            while True:
                i = count
                count += 1
                t0 = time.perf_counter_ns()
                wrong = await impl.check((start + i) % n)
                t1 = time.perf_counter_ns()
                done += 1
                if keep:
                    impl.samples.append(t1 - t0)
                    if wrong is not None:
                        impl.mismatches += 1
                        if len(impl.examples) < 3:
                            impl.examples.append(wrong)
                if time.perf_counter() >= deadline and count >= self.a.min_messages:
                    return

        with pyspf_lookup(impl.pyspf_own_dns):
            t_start = time.perf_counter()
            deadline = t_start + seconds
            await asyncio.gather(*(worker() for _ in range(impl.concurrency)))
            wall = time.perf_counter() - t_start
        count = done
        if not keep:
            return
        me1, kids1 = _self_cpu()
        busy = machine_busy() - busy0
        cpu = {
            "this_process": me1 - me0,
            "children": kids1 - kids0,
            "clamd": _proc_cpu(clamd_pid) - cl0,
            "dnsmasq": _proc_cpu(dns_pid) - dn0,
        }
        # What the machine was busy with beyond this process and the peers:
        # another job on it makes the figure unclean.
        cpu["foreign"] = max(0.0, busy - sum(cpu.values()))
        for k, v in cpu.items():
            impl.cpu[k] = impl.cpu.get(k, 0.0) + v
        impl.dns_queries += self.dnsmasq.dns_queries() - q0
        impl.rates.append(count / wall)
        impl.count += count
        impl.wall += wall

    async def measure(self) -> None:
        a = self.a
        for key, what, all_impls in self.rows():
            impls = all_impls
            if not self.have_clamdscan:
                impls = [x for x in all_impls if "clamdscan" not in x.name]
            if a.wait_idle > 0:
                wait_idle(min(a.wait_idle, 60.0))
            log(f"{key}: {what}")
            for impl in impls:
                await self._round(impl, 0, 0.0, keep=False)  # warm-up (min_messages)
            for r in range(a.rounds):
                start = (r * 7919) % len(self.messages)
                order = impls if r % 2 == 0 else impls[::-1]
                for impl in order:
                    await self._round(impl, start, a.seconds, keep=True)
            row = self._row(key, what, impls)
            self.results.append(row)
            ours = row["ours"]
            log(
                f"  ours {ours['msgs_per_s']:.0f}/s p50 {ours['p50_ms']:.2f}ms; "
                + "; ".join(
                    f"{b['name']} {b['msgs_per_s']:.0f}/s (x{b['ratio']:.2f})"
                    for b in row["baselines"]
                )
            )

    def _stats(self, impl: Impl) -> dict[str, Any]:
        s = sorted(impl.samples)
        rate = statistics.median(impl.rates)
        n = max(1, impl.count)
        out = {
            "name": impl.name,
            "role": impl.role,
            "concurrency": impl.concurrency,
            "msgs_per_s": round(rate, 1),
            "msgs_per_s_runs": [round(x, 1) for x in impl.rates],
            "p50_ms": round(pct(s, 0.50), 3),
            "p99_ms": round(pct(s, 0.99), 3),
            "mean_ms": round(statistics.mean(s) / 1e6, 3),
            "max_ms": round(s[-1] / 1e6, 3),
            "messages": impl.count,
            "seconds": round(impl.wall, 2),
            "cpu_ms_per_msg": {
                k: round(v * 1e3 / n, 3) for k, v in impl.cpu.items() if k != "foreign"
            },
            "foreign_cpu_cores": round(impl.cpu.get("foreign", 0.0) / max(impl.wall, 1e-9), 3),
            "dns_queries_per_msg": round(impl.dns_queries / n, 2),
            "mismatches": impl.mismatches,
            "checked": impl.count,
        }
        if impl.examples:
            out["mismatch_examples"] = impl.examples
        return out

    def _row(self, key: str, what: str, impls: list[Impl]) -> dict[str, Any]:
        ours = self._stats(impls[0])
        bases = []
        for impl in impls[1:]:
            b = self._stats(impl)
            b["ratio"] = round(ours["msgs_per_s"] / b["msgs_per_s"], 3)
            b["overhead_ms_per_msg"] = round(1e3 / ours["msgs_per_s"] - 1e3 / b["msgs_per_s"], 3)
            bases.append(b)
        for impl in impls:
            foreign = impl.cpu.get("foreign", 0.0) / max(impl.wall, 1e-9)
            if foreign >= FOREIGN_LIMIT:
                self.unclean.append(
                    f"{key}: {impl.name}: other processes used {foreign:.2f} cores meanwhile"
                )
            if impl.mismatches:
                self.errors.append(
                    f"{key}: {impl.name}: {impl.mismatches} of {impl.count} wrong, "
                    f"e.g. {impl.examples[0]}"
                )
        return {
            "name": key,
            "what": what,
            "ours": ours,
            "baselines": bases,
            "floor": bases[0]["name"],
            "ratio": bases[0]["ratio"],
            "correct": all(i.mismatches == 0 for i in impls),
        }

    # ------------------------------------------------------------ EICAR

    async def eicar_check(self) -> None:
        """One message with EICAR attached: every scanner must find it."""
        assert self.eicar is not None
        m = self.eicar
        want = peers.EICAR_NAME
        got: dict[str, str] = {}
        v = await self.antivirus(self.ctx(m, AuthResults()))
        got["kithmail Antivirus"] = f"{v.reason} {v.detail} {v.reply}"
        ok = {"kithmail Antivirus": v.reason == "antivirus.virus" and want in v.detail}
        ans = self.floor_instream(m.raw)
        got["INSTREAM, blocking socket"] = ans
        ok["INSTREAM, blocking socket"] = ans == f"stream: {want} FOUND"
        if self.have_clamdscan:
            rc, out = self.clamdscan(m.raw)
            got["clamdscan --stream"] = f"exit {rc}: {out}"
            ok["clamdscan --stream"] = rc == 1 and want in out
        auth = AuthResults()
        await self.pipeline.rcpt_spf(
            self.policy, auth, client_ip=CLIENT_IP, helo=HELO, mail_from=MAIL_FROM
        )
        tv = await self.pipeline.message(self.ctx(m, auth))
        d = tv.decisive
        got["kithmail pipeline"] = f"{d.reason if d else None} {tv.reply}"
        ok["kithmail pipeline"] = (
            d is not None
            and d.reason == "antivirus.virus"
            and tv.reply is not None
            and tv.reply.code == 554
        )
        for k, good in ok.items():
            if not good:
                self.errors.append(f"EICAR not detected by {k}: {got[k]}")
        self.eicar_checks = {
            "message_bytes": len(m.raw),
            "expected": want,
            "answers": got,
            "detected": ok,
            "mismatches": sum(not x for x in ok.values()),
        }

    # ------------------------------------------------------------ all

    def run(self) -> dict[str, Any]:
        self._pin()
        log(
            f"pinning: {'this process on core 0, peers on core ' + self.peer_cpus if self.pinned else 'none'}"
        )
        self._data()
        self._peers()
        try:
            self._layers()
            self.clamd_version = peers.clamd_command(self.clamd.socket, b"zVERSION\0")
            self.background = wait_idle(self.a.wait_idle)
            log(f"machine {self.background:.0%} busy before the run")
            asyncio.run(self._all())
        finally:
            for p in (self.clamd, self.dnsmasq):
                with contextlib.suppress(Exception):
                    p.stop()
            with contextlib.suppress(Exception):
                self.core.close()
            if self.pool is not None:
                self.pool.shutdown()
        return self.report()

    async def _all(self) -> None:
        # The executor the SPF and DKIM threads use, made on this (pinned) thread.
        await self.eicar_check()
        await self.measure()
        await self.eicar_check()  # again after the run: clamd still answers right

    def report(self) -> dict[str, Any]:
        a = self.a
        sizes = [len(m.raw) for m in self.messages]
        heads = [sum(len(x) for x in m.header) for m in self.messages]
        clamdscan_version = "?"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            clamdscan_version = subprocess.run(
                [peers.CLAMDSCAN, "--version"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
        mismatches = sum(
            r["ours"]["mismatches"] + sum(b["mismatches"] for b in r["baselines"])
            for r in self.results
        )
        with open("/proc/loadavg") as f:
            load = f.read().split()[:3]
        return {
            "benchmark": "layers",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(self.work),
            "build_profile": a.profile,
            "command": [sys.executable, *sys.argv],
            "source": source_tree(),
            "quick": a.quick,
            "seed": a.seed,
            "loadavg_at_end": [float(x) for x in load],
            "versions": {
                "kithmail": _version("kithmail"),
                "pyspf": _version("pyspf"),
                "dkimpy": _version("dkimpy"),
                "dnspython": _version("dnspython"),
                "cryptography": _version("cryptography"),
                "clamd": self.clamd_version.rstrip(b"\0").decode("latin-1"),
                "clamav_daemon_deb": deb_version("clamav-daemon"),
                "clamdscan": clamdscan_version,
                "dnsmasq": deb_version("dnsmasq-base"),
            },
            "message": {
                "count": len(sizes),
                "bytes_mean": round(statistics.mean(sizes)),
                "bytes_min": min(sizes),
                "bytes_max": max(sizes),
                "header_bytes_mean": round(statistics.mean(heads)),
                "lines_mean": round(statistics.mean(len(m.lines) for m in self.messages)),
                "structure": "multipart/mixed: multipart/alternative (text/plain, text/html; "
                "seeded words) + figures.zip (a seeded CSV, deflated, base64); each message "
                "different (seeded per index), cycled through in every round",
                "dkim": {
                    "key_bits": KEY_BITS,
                    "algorithm": "rsa-sha256",
                    "canonicalization": "relaxed/relaxed",
                    "domain": SENDER_DOMAIN,
                    "selector": SELECTOR,
                    "signed_headers": [h.decode() for h in SIGNED_HEADERS],
                    "note": "one new key per run (cryptography); the messages are seeded",
                },
                "arc": "none (a message sent directly: ARC finds no seal)",
                "envelope": {
                    "client_ip": CLIENT_IP,
                    "helo": HELO,
                    "mail_from": MAIL_FROM,
                    "rcpt": RCPT,
                    "from": FROM,
                },
                "expected": "spf=pass (MAIL FROM and HELO), dkim=pass, dmarc=pass (p=reject), "
                "arc=none, clamd clean",
            },
            "dns": {
                "server": "dnsmasq on 127.0.0.1, records from its command line, answered from "
                "memory, nothing forwarded (--cache-size=0: there is nothing to cache)",
                "records": {
                    "txt": [list(r) for r in SPF_RECORDS]
                    + [
                        [f"{SELECTOR}._domainkey.{SENDER_DOMAIN}", "v=DKIM1; k=rsa; p=<2048-bit>"],
                        [f"_dmarc.{SENDER_DOMAIN}", DMARC],
                    ],
                    "a": [list(r) for r in A_RECORDS],
                    "mx": [list(r) for r in MX_RECORDS],
                },
                "caching": "kithmail keeps no DNS cache: kithmail.dns.Resolver sets "
                "cache = None and SpfChecker's dnspython resolver has none, so every "
                "check asks dnsmasq; the 'warm cache' measured is a local server answering "
                "from memory on loopback. The floors' dnspython default resolver has none either.",
                "queries_per_msg": "dns_queries_per_msg of each figure: dnsmasq's own count "
                "of queries answered (logged on SIGUSR1) over the timed rounds",
            },
            "clamd": {
                "address": self.clamd.address,
                "config": self.clamd.config_lines,
                "signatures": "one: the EICAR test string (.ndb, by content); no official "
                "databases. A real install (main, daily, bytecode: millions of signatures) "
                "scans more slowly: this figure is clamd's floor on this message",
            },
            "pinning": {
                "applied": self.pinned,
                "this_process_cpus": [0] if self.pinned else "any",
                "peer_cpus": [int(self.peer_cpus)] if self.pinned else "any",
                "note": "this process (every layer and floor, its threads, and each "
                "clamdscan it runs) on core 0; clamd and dnsmasq on core 1 (taskset)"
                if self.pinned
                else "not pinned (fewer than 2 cores, no taskset, or --no-pin)",
            },
            "sizes": {
                "rounds": a.rounds,
                "seconds_per_round": a.seconds,
                "min_messages_per_round": a.min_messages,
                "warmup_messages": a.min_messages,
                "messages_in_pool": a.messages,
                "note": "each figure: `rounds` timed rounds of `seconds` each (and at least "
                "min_messages), ours and its baselines in turn (order reversed every other "
                "round), each round starting at the same message for all; msgs_per_s is the "
                "median of the rounds, p50/p99 over every message of every round (each "
                "message timed from start to its answer), one message at a time except in "
                "the `pipeline xN` row (N at once: N asyncio tasks for ours, N threads for "
                "the floors)",
                "concurrency": a.concurrency,
            },
            "results": self.results,
            "eicar": self.eicar_checks,
            "skipped": self.skipped,
            "background_load": round(self.background, 3),
            "unclean": self.unclean,
            "mismatches": mismatches,
            "correct": not self.errors,
            "errors": self.errors,
        }


SPF_PASS = SpfResult("mailfrom", SENDER_DOMAIN, "pass", CLIENT_IP)
SPF_HELO_PASS = SpfResult("helo", HELO, "pass", CLIENT_IP)


def _spf_wrong(reason: str, auth: AuthResults) -> str | None:
    mf, he = auth.spf_mailfrom, auth.spf_helo
    if reason != "spf.pass" or mf is None or he is None:
        return f"spf {reason}: mailfrom {mf}, helo {he}"
    if (mf.result, he.result) != ("pass", "pass"):
        return f"spf mailfrom {mf.result} ({mf.detail}), helo {he.result} ({he.detail})"
    return None


def _auth_wrong(reason: str, auth: AuthResults) -> str | None:
    dkim = [(d.result, d.domain) for d in auth.dkim]
    dmarc = auth.dmarc.result if auth.dmarc else None
    arc = auth.arc.result if auth.arc else None
    if (
        reason != "dmarc.pass"
        or dkim != [("pass", SENDER_DOMAIN)]
        or dmarc != "pass"
        or arc != "none"
    ):
        return f"spoofing {reason}: dkim {dkim}, dmarc {dmarc}, arc {arc}"
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------
# Output


def print_table(rep: dict[str, Any]) -> None:
    m, v, msg = rep["machine"], rep["versions"], rep["message"]
    print(
        f"kithmail layers 3-4 benchmark: {rep['build_profile']} build, {m['cpu']}, "
        f"{m['cores']} cores, {m['python']}; pyspf {v['pyspf']}, dkimpy {v['dkimpy']}, "
        f"dnspython {v['dnspython']}, {v['clamd']} (clamav-daemon {v['clamav_daemon_deb']})"
    )
    print(
        f"message: {msg['bytes_mean']:,} B mean ({msg['bytes_min']:,}..{msg['bytes_max']:,}), "
        f"{msg['count']} different, DKIM rsa-sha256 {msg['dkim']['key_bits']}-bit relaxed/relaxed; "
        f"one message at a time (but the xN row); {rep['sizes']['rounds']} rounds x {rep['sizes']['seconds_per_round']}s"
    )
    print(f"pinning: {rep['pinning']['note']}")
    print("DNS: no cache in kithmail; every check asks dnsmasq (answers from memory, loopback)")
    head = [
        "layer",
        "implementation",
        "msgs/s",
        "p50",
        "p99",
        "ratio",
        "+ms/msg",
        "cpu ms/msg self/kids/clamd/dns",
        "other",
        "dns q",
        "wrong",
    ]
    rows = []
    for r in rep["results"]:
        for i, x in enumerate([r["ours"], *r["baselines"]]):
            c = x["cpu_ms_per_msg"]
            rows.append(
                [
                    r["name"] if i == 0 else "",
                    x["name"],
                    fmt_rate(x["msgs_per_s"]),
                    f"{x['p50_ms']:.2f}ms",
                    f"{x['p99_ms']:.2f}ms",
                    f"x{x['ratio']:.2f}" if i else "",
                    f"{x['overhead_ms_per_msg']:+.2f}" if i else "",
                    f"{c['this_process']:.2f}/{c['children']:.2f}/{c['clamd']:.2f}/{c['dnsmasq']:.2f}",
                    f"{x['foreign_cpu_cores']:.2f}",
                    f"{x['dns_queries_per_msg']:g}",
                    f"{x['mismatches']}/{x['checked']}",
                ]
            )
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    print(
        "ratio: ours msgs/s / that row's; +ms/msg: what ours costs per message beyond it "
        "(1000/ours - 1000/theirs)"
    )
    e = rep["eicar"]
    if e:
        print(
            f"EICAR ({e['expected']}): "
            + ", ".join(f"{k} {'found' if ok else 'MISSED'}" for k, ok in e["detected"].items())
        )
    for what in rep["unclean"]:
        print(f"NOT CLEAN (rerun on an idle machine): {what}")
    for what in rep["skipped"]:
        print(f"SKIPPED: {what}")
    if rep["errors"]:
        print("ERRORS: " + "; ".join(rep["errors"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark kithmail's SPF, DKIM/DMARC/ARC and clamd layers per message "
        "beside pyspf, dkimpy, clamd's INSTREAM and clamdscan."
    )
    p.add_argument("--json", metavar="PATH", help="write the results here (atomically)")
    p.add_argument("--quick", action="store_true", help="a smoke run (about 30 s)")
    p.add_argument("--seconds", type=float, help="seconds per timed round (3; quick 0.3)")
    p.add_argument("--rounds", type=int, help="timed rounds per figure (5; quick 2)")
    p.add_argument(
        "--min-messages", type=int, help="at least this many per round, and the warm-up (20; 3)"
    )
    p.add_argument("--messages", type=int, help="different messages in the pool (300; quick 30)")
    p.add_argument(
        "--concurrency", type=int, default=8, help="messages in flight in the last row (8)"
    )
    p.add_argument("--size", type=int, default=30_000, help="message bytes, about (30000)")
    p.add_argument("--profile", default="release", help="build profile to record")
    p.add_argument("--seed", type=int, default=20_261_005, help="data seed")
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="wait up to this many seconds for the machine to be under 25%% busy first, "
        "and up to min(this, 60) before each figure",
    )
    p.add_argument("--dir", help="parent of the temporary directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    a.seconds = a.seconds or (0.3 if a.quick else 3.0)
    a.rounds = a.rounds or (2 if a.quick else 5)
    a.min_messages = a.min_messages or (3 if a.quick else 20)
    a.messages = a.messages or (30 if a.quick else 300)
    for tool in (peers.CLAMD, peers.DNSMASQ):
        if not os.path.exists(tool):
            p.error(
                f"{tool} missing: apt-get install --no-install-recommends clamav-daemon dnsmasq"
            )
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with workdir("layers", args) as work:
            report = Bench(args, work).run()
    except StartError as e:
        log(f"FAILED to start a peer: {e}")
        return 1
    return finish(args, report, print_table)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
