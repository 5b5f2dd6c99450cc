#!/usr/bin/env python3
"""Benchmark of kithmail._core's three hot tables, each figure beside a baseline.

Builds a Recon, a Reputation and a Community table in a temporary directory
with seeded synthetic data and measures, in the same run and on the same
data, the extension against:

- the same table in pure Python over py-lmdb (same key layout, a
  struct-packed value, the same decision logic) and, for Recon, a dict;
- a pure-Python longest-prefix match (one dict per prefix length) for
  Reputation;
- optionally the Rust floor (``--floor BIN``): the same loops in Rust with no
  Python, run on the very environment this script built.

Every answer of the measured calls is checked against the baseline on a
sample first (a fast wrong answer is worth nothing); a mismatch is reported
and makes the exit status 1.

Trusts: nothing outside this machine; it makes no network traffic. All
addresses are generated from a seed inside private, shared, benchmarking,
reserved (240.0.0.0/4) and documentation ranges (RFC 1918, 6598, 2544,
1112, 3849, 4193, 5737, 2606), never real hosts.

Run ``bench/core.py --help``; bench/README.md says how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import lmdb
except ImportError:  # pragma: no cover - setup error
    sys.exit("bench/core.py needs py-lmdb: pip install 'lmdb==3.0.0' (make bench does)")
try:
    from kithmail import _core
except ImportError as exc:  # pragma: no cover - setup error
    sys.exit(f"bench/core.py needs the built extension kithmail._core ({exc}); run make bench")

# --------------------------------------------------------------------------
# Constants shared by the extension and the baselines

T0 = 1_700_000_000  # a fixed clock: the tables never read the real time
MIN_DELAY = 60
RETRY_WINDOW = 86_400
PASS_TTL = 30 * 86_400
DAY = 86_400
BATCH = 1_000  # the batch size of every *_many measurement
SAMPLE_GROUP = 100  # single calls timed together for one latency sample
BUILD_BATCH = 100_000  # check_many batch while building Recon
BUILD_FLUSH_EVERY = 1_000_000  # sources per flush while building Recon
ENTRIES_PER_USER = 100
USERS_PER_TENANT = 1_000
MAP_SIZE = 64 << 30  # sparse, as the core's default

NEW, TOO_EARLY, PASSED, KNOWN = "new", "too_early", "passed", "known"

# The floor binary's keys (see --floor) and which of our rows they stand under.
FLOOR_KEYS = (
    "recon_known_hot",
    "recon_known_random",
    "recon_batch_sorted",
    "lpm_single",
    "lpm_batch",
    "community_member_hot",
)

_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Address helpers

V4MAPPED = b"\0" * 10 + b"\xff\xff"
ZERO8 = b"\0" * 8
_inet_pton = socket.inet_pton
_AF4 = socket.AF_INET
_AF6 = socket.AF_INET6


def v4str(n: int) -> str:
    return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def v6str(n: int) -> str:
    return ":".join(f"{(n >> s) & 0xFFFF:x}" for s in range(112, -16, -16))


def recon_key(ip: str) -> bytes:
    """The Recon key: the address masked to /32 (IPv4, mapped) or /64 (IPv6)."""
    if ":" in ip:
        b = _inet_pton(_AF6, ip)
        if b[:12] == V4MAPPED:
            return b
        return b[:8] + ZERO8
    return V4MAPPED + _inet_pton(_AF4, ip)


# --------------------------------------------------------------------------
# Seeded data


def _mixer(rng: random.Random, bits: int) -> Callable[[int], int]:
    """A seeded bijection on [0, 2**bits): odd multiplies and xor-shifts."""
    mask = (1 << bits) - 1
    a = rng.getrandbits(bits) | 1
    b = rng.getrandbits(bits)
    c = rng.getrandbits(bits) | 1
    s1, s2 = max(1, bits // 2), max(1, bits // 3)

    def mix(x: int) -> int:
        x = (x * a + b) & mask
        x ^= x >> s1
        x = (x * c) & mask
        return x ^ (x >> s2)

    return mix


# (first address, host bits): private and shared space first, then 240.0.0.0/4
# (reserved, never routed; its last address, broadcast, is left out).
RECON_POOLS = [
    (0x0A000000, 24),  # 10.0.0.0/8       RFC 1918
    (0x64400000, 22),  # 100.64.0.0/10    RFC 6598
    (0xAC100000, 20),  # 172.16.0.0/12    RFC 1918
    (0xC6120000, 17),  # 198.18.0.0/15    RFC 2544
]
RECON_RESERVED = (0xF0000000, 28)  # 240.0.0.0/4 RFC 1112


def recon_sources(rng: random.Random, n: int) -> list[str]:
    """n distinct IPv4 sources in a seeded pseudo-random order."""
    pools = list(RECON_POOLS)
    total = sum(1 << h for _, h in pools)
    if n > total * 3 // 4:  # room for cycle walking without crawling
        pools.append(RECON_RESERVED)
        total += (1 << RECON_RESERVED[1]) - 1
    if n > total:
        raise SystemExit(f"--size {n:,} is more than the {total:,} addresses the generator has")
    bits = max(8, (total - 1).bit_length())
    mix = _mixer(rng, bits)
    out: list[str] = []
    append = out.append
    i = 0
    b1 = 1 << 24
    b2 = b1 + (1 << 22)
    b3 = b2 + (1 << 20)
    b4 = b3 + (1 << 17)
    while len(out) < n:
        y = mix(i)
        i += 1
        if y >= total:
            continue
        if y < b1:
            a = 0x0A000000 + y
        elif y < b2:
            a = 0x64400000 + y - b1
        elif y < b3:
            a = 0xAC100000 + y - b2
        elif y < b4:
            a = 0xC6120000 + y - b3
        else:
            a = 0xF0000000 + y - b4
        append(f"{a >> 24}.{(a >> 16) & 255}.{(a >> 8) & 255}.{a & 255}")
    return out


# (network, prefix length, weight) of the ranges reputation prefixes come from.
V4_ROOTS = [
    (0xF0000000, 4, 60),  # 240.0.0.0/4    reserved
    (0x0A000000, 8, 25),  # 10.0.0.0/8
    (0x64400000, 10, 7),  # 100.64.0.0/10
    (0xAC100000, 12, 5),  # 172.16.0.0/12
    (0xC0A80000, 16, 2),  # 192.168.0.0/16
    (0xC6120000, 15, 1),  # 198.18.0.0/15
]
V6_ROOTS = [
    (0xFC << 120, 7, 90),  # fc00::/7       RFC 4193 unique local
    (0x20010DB8 << 96, 32, 10),  # 2001:db8::/32  RFC 3849 documentation
]
# Prefix lengths weighted roughly as public block lists are: many /24 and /32.
V4_LEN_W = {8: 1, 16: 40, 24: 350, 32: 400} | dict.fromkeys(range(9, 16), 2)
V4_LEN_W |= dict.fromkeys(range(17, 24), 20) | dict.fromkeys(range(25, 32), 10)
V6_LEN_W = {32: 5, 48: 40, 56: 20, 64: 30} | dict.fromkeys(range(33, 48), 1)
V6_LEN_W |= dict.fromkeys(range(49, 56), 2) | dict.fromkeys(range(57, 64), 2)
V6_SHARE = 0.2  # of prefixes and of lookups
NEST_SHARE = 0.25  # prefixes made inside an earlier one


def _cum(weights: dict[int, int]) -> tuple[list[int], list[int]]:
    keys = sorted(weights)
    cum, acc = [], 0
    for k in keys:
        acc += weights[k]
        cum.append(acc)
    return keys, cum


@dataclass
class Prefixes:
    v4: list[tuple[int, int]] = field(default_factory=list)  # (network int, length)
    v6: list[tuple[int, int]] = field(default_factory=list)

    def text(self) -> Iterator[str]:
        for net, ln in self.v4:
            yield f"{v4str(net)}/{ln}"
        for net, ln in self.v6:
            yield f"{v6str(net)}/{ln}"


def reputation_prefixes(rng: random.Random, n: int) -> Prefixes:
    """n distinct prefixes, /8../32 IPv4 and /32../64 IPv6, many nested."""
    out = Prefixes()
    fams = (
        (out.v4, 32, V4_ROOTS, _cum(V4_LEN_W), 32),
        (out.v6, 128, V6_ROOTS, _cum(V6_LEN_W), 64),
    )
    seen: tuple[set[tuple[int, int]], set[tuple[int, int]]] = (set(), set())
    roots_cum = [list(_cum({i: r[2] for i, r in enumerate(f[2])})[1]) for f in fams]
    rnd, getbits, choices = rng.random, rng.getrandbits, rng.choices
    made = 0
    while made < n:
        fi = 1 if rnd() < V6_SHARE else 0
        lst, width, roots, (lens, lcum), maxlen = fams[fi]
        if lst and rnd() < NEST_SHARE:
            pnet, plen = lst[int(rnd() * len(lst))]
        else:
            plen = maxlen
        if plen < maxlen:
            ln = min(maxlen, plen + 1 + int(rnd() * 16))
            net = pnet | (getbits(ln - plen) << (width - ln))
        else:
            ri = choices(range(len(roots)), cum_weights=roots_cum[fi])[0]
            rnet, rlen, _ = roots[ri]
            ln = max(rlen, choices(lens, cum_weights=lcum)[0])
            net = rnet | (getbits(ln - rlen) << (width - ln)) if ln > rlen else rnet
        key = (net, ln)
        if key in seen[fi]:
            continue
        seen[fi].add(key)
        lst.append(key)
        made += 1
    return out


# Ranges no generated prefix comes from, so a lookup there is a miss, as most
# lookups of real traffic are (TEST-NETs and link-local, RFC 5737, 3927; the
# IPv6 documentation prefix 3fff::/20, RFC 9637).
V4_MISS = [(0xA9FE0000, 16), (0xC0000200, 24), (0xC6336400, 24), (0xCB007100, 24)]
V6_MISS = [(0x3FFF << 112, 20)]
LPM_HIT_SHARE = 0.4  # inside a loaded prefix
LPM_ROOT_SHARE = 0.1  # anywhere in the ranges prefixes come from; the rest miss


def lpm_lookups(rng: random.Random, pfx: Prefixes, n: int) -> list[str]:
    """Lookups: 40 % inside a loaded prefix, 10 % in its ranges, 50 % misses."""
    out = []
    rnd, getbits = rng.random, rng.getrandbits
    for _ in range(n):
        v6 = (rnd() < V6_SHARE and bool(pfx.v6)) or not pfx.v4
        lst, width = (pfx.v6, 128) if v6 else (pfx.v4, 32)
        r = rnd()
        if r < LPM_HIT_SHARE:
            net, ln = lst[int(rnd() * len(lst))]
        elif r < LPM_HIT_SHARE + LPM_ROOT_SHARE:
            roots = V6_ROOTS if v6 else V4_ROOTS
            net, ln, _ = roots[int(rnd() * len(roots))]
        else:
            miss = V6_MISS if v6 else V4_MISS
            net, ln = miss[int(rnd() * len(miss))]
        addr = net | getbits(width - ln) if ln < width else net
        out.append(v6str(addr) if v6 else v4str(addr))
    return out


@dataclass
class CommunityData:
    users: list[str]
    tenants: int
    hot_entries: dict[int, list[str]]  # user index -> its entries (hot users only)
    org_entries: dict[int, tuple[list[str], list[str]]]  # tenant -> (allow, block)
    n_domains: int


def user_name(u: int, tenants: int) -> str:
    return f"user{u}@tenant{u % tenants}.example"


def org_name(t: int) -> str:
    # The tenant's pseudo-user that holds organisation entries (as tests/ name it).
    return f"tenant:tenant{t}.example"


def user_entries(rng: random.Random, n_domains: int) -> list[str]:
    """ENTRIES_PER_USER distinct entries: 85 addresses, 10 domains, 5 lists."""
    seen: set[str] = set()
    rr = rng.randrange
    while len(seen) < 85:
        seen.add(f"s{rr(5000)}@d{rr(n_domains)}.example.com")
    while len(seen) < 95:
        seen.add(f"@d{rr(n_domains)}.example.com")
    while len(seen) < ENTRIES_PER_USER:
        seen.add(f"list:l{rr(n_domains)}.lists.example.org")
    out = sorted(seen)
    rng.shuffle(out)
    return out


def community_queries(
    rng: random.Random, cd: CommunityData, n: int
) -> list[tuple[str, str, str | None, str | None]]:
    """Queries over the hot users, every probe depth of docs/core.md represented."""
    hot = sorted(cd.hot_entries)
    rr, rnd = rng.randrange, rng.random
    out: list[tuple[str, str, str | None, str | None]] = []
    for _ in range(n):
        u = hot[rr(len(hot))]
        ents = cd.hot_entries[u]
        t = u % cd.tenants
        user, org = cd.users[u], org_name(t)
        addrs = [e for e in ents if not e.startswith(("@", "list:"))]
        doms = [e for e in ents if e.startswith("@")]
        lists = [e[5:] for e in ents if e.startswith("list:")]
        list_id = f"l{rr(cd.n_domains)}.lists.example.org" if rnd() < 0.25 else None
        r = rnd()
        if r < 0.40:  # user address: one probe
            sender = addrs[rr(len(addrs))]
        elif r < 0.55:  # user domain: two probes
            sender = f"x{rr(10**6)}{doms[rr(len(doms))]}"
        elif r < 0.60:  # user list: three probes
            sender, list_id = f"n{rr(10**6)}@u{rr(10**6)}.example.org", lists[rr(len(lists))]
        elif r < 0.70:  # organisation: four to six probes
            oa, ob = cd.org_entries[t]
            e = (oa + ob)[rr(len(oa) + len(ob))]
            if e.startswith("list:"):
                sender, list_id = f"n{rr(10**6)}@u{rr(10**6)}.example.org", e[5:]
            elif e.startswith("@"):
                sender = f"x{rr(10**6)}{e}"
            else:
                sender = e
        else:  # unknown: every probe
            sender = f"n{rr(10**6)}@u{rr(10**6)}.example.org"
        if rnd() < 0.2:
            sender = sender.upper()  # folding must still match
        out.append((user, sender, list_id, org))
    return out


# --------------------------------------------------------------------------
# Baselines: the same tables in pure Python

REC = struct.Struct(">QQQII")  # first_seen, last_seen, pass_until, attempts, passes
COMM = struct.Struct(">BBQ")  # kind (0 allow, 1 block), source, added
SOURCES = ("outbound", "sav", "manual", "import", "admin", "journal")


def decide(raw: bytes | None, now: int) -> tuple[str, bytes | None]:
    """Recon's decision (docs/core.md) on a stored row: (status, row to write)."""
    if raw is None:
        return NEW, REC.pack(now, now, 0, 1, 0)
    first, last, until, attempts, passes = REC.unpack(raw)
    if until > now:
        if now + PASS_TTL - until > DAY:
            return KNOWN, REC.pack(first, now, now + PASS_TTL, attempts, passes)
        return KNOWN, None
    if until == 0 and now - first <= RETRY_WINDOW:
        last = max(last, now)
        if now - first < MIN_DELAY:
            return TOO_EARLY, REC.pack(first, last, 0, attempts + 1, passes)
        return PASSED, REC.pack(first, last, now + PASS_TTL, attempts + 1, passes + 1)
    return NEW, REC.pack(now, now, 0, 1, passes)  # an expired pass or no retry: start over


class PyLmdbRecon:
    """Recon over py-lmdb: a read per call, a write transaction only to change."""

    def __init__(self, env: lmdb.Environment, db: Any) -> None:
        self.env, self.db = env, db

    def check(self, ip: str, now: int) -> str:
        key = recon_key(ip)
        with self.env.begin(db=self.db) as txn:
            status, row = decide(txn.get(key), now)
        if row is not None:
            with self.env.begin(write=True, db=self.db) as txn:
                txn.put(key, row)
        return status

    def check_many(self, ips: Sequence[str], now: int) -> list[str]:
        out, writes = [], []
        with self.env.begin(db=self.db) as txn:
            get = txn.get
            for ip in ips:
                key = recon_key(ip)
                status, row = decide(get(key), now)
                out.append(status)
                if row is not None:
                    writes.append((key, row))
        if writes:
            writes.sort()  # LMDB writes in key order touch fewer pages
            with self.env.begin(write=True, db=self.db) as txn:
                txn.cursor().putmulti(writes)
        return out

    def check_commit_each(self, ip: str, now: int) -> str:
        """One transaction and one commit per check: the no-group-commit rival."""
        key = recon_key(ip)
        with self.env.begin(write=True, db=self.db) as txn:
            status, row = decide(txn.get(key), now)
            if row is not None:
                txn.put(key, row)
        return status


class DictRecon:
    """Recon in a dict: the same keys, packed rows and decision, no storage."""

    def __init__(self) -> None:
        self.d: dict[bytes, bytes] = {}

    def check(self, ip: str, now: int) -> str:
        key = recon_key(ip)
        status, row = decide(self.d.get(key), now)
        if row is not None:
            self.d[key] = row
        return status

    def check_many(self, ips: Sequence[str], now: int) -> list[str]:
        d = self.d
        out = []
        for ip in ips:
            key = recon_key(ip)
            status, row = decide(d.get(key), now)
            if row is not None:
                d[key] = row
            out.append(status)
        return out


class PyLpm:
    """Longest-prefix match: one dict per prefix length, probed longest first."""

    def __init__(self, pfx: Prefixes) -> None:
        self.v4 = self._tables(pfx.v4, 32)
        self.v6 = self._tables(pfx.v6, 128)

    @staticmethod
    def _tables(lst: list[tuple[int, int]], width: int) -> list[tuple[int, dict[int, str]]]:
        by_len: dict[int, dict[int, str]] = {}
        fmt = v4str if width == 32 else v6str
        for net, ln in lst:
            by_len.setdefault(ln, {})[net] = f"{fmt(net)}/{ln}"
        full = (1 << width) - 1
        return [
            (full ^ ((1 << (width - ln)) - 1), by_len[ln]) for ln in sorted(by_len, reverse=True)
        ]

    def lookup(self, ip: str) -> str | None:
        if ":" in ip:
            x = int.from_bytes(_inet_pton(_AF6, ip), "big")
            tables = self.v6
        else:
            x = int.from_bytes(_inet_pton(_AF4, ip), "big")
            tables = self.v4
        for mask, d in tables:
            hit = d.get(x & mask)
            if hit is not None:
                return hit
        return None

    def lookup_many(self, ips: Sequence[str]) -> list[str | None]:
        lookup = self.lookup
        return [lookup(ip) for ip in ips]


MemberAnswer = tuple[str, str | None, str | None]  # status, entry, scope


class PyLmdbCommunity:
    """Community over py-lmdb, keys user + NUL + entry, probes as docs/core.md."""

    def __init__(self, env: lmdb.Environment, db: Any) -> None:
        self.env, self.db = env, db

    def add_many(self, user: str, entries: Sequence[str], kind: int, source: int, now: int) -> None:
        p = user.lower().encode() + b"\0"
        row = COMM.pack(kind, source, now)
        items = sorted((p + e.lower().encode(), row) for e in entries)
        with self.env.begin(write=True, db=self.db) as txn:
            txn.cursor().putmulti(items)

    @staticmethod
    def _probe(
        get: Callable[[bytes], bytes | None],
        user: str,
        sender: str,
        list_id: str | None,
        org: str | None,
    ) -> MemberAnswer:
        s = sender.lower()
        ents = [s.encode(), s[s.rfind("@") :].encode()]
        if list_id is not None:
            ents.append(b"list:" + list_id.lower().encode())
        for scope, who in (("user", user), ("org", org)):
            if who is None:
                continue
            p = who.lower().encode() + b"\0"
            for e in ents:
                raw = get(p + e)
                if raw is not None:
                    status = "allowed" if raw[0] == 0 else "blocked"
                    return status, e.decode(), scope
        return "unknown", None, None

    def member(
        self, user: str, sender: str, list_id: str | None = None, org: str | None = None
    ) -> MemberAnswer:
        with self.env.begin(db=self.db) as txn:
            return self._probe(txn.get, user, sender, list_id, org)

    def member_many(
        self, queries: Sequence[tuple[str, str, str | None, str | None]]
    ) -> list[MemberAnswer]:
        probe = self._probe
        with self.env.begin(db=self.db) as txn:
            get = txn.get
            return [probe(get, *q) for q in queries]


# --------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    """Rates of repeated runs and per-call latency samples of one measurement."""

    rates: list[float]  # items per second, one per repeat
    lat_ns: list[float] = field(default_factory=list)  # per call
    items_per_call: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    def pct_ns(self, q: float) -> float | None:
        if not self.lat_ns:
            return None
        s = sorted(self.lat_ns)
        return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]

    def as_json(self, name: str) -> dict[str, Any]:
        med, p99 = self.pct_ns(0.5), self.pct_ns(0.99)
        d: dict[str, Any] = {
            "name": name,
            "ops_per_s": round(self.rate, 1),
            "ops_per_s_runs": [round(r, 1) for r in self.rates],
            "items_per_call": self.items_per_call,
            "median_ns": None if med is None else round(med, 1),
            "p99_ns": None if p99 is None else round(p99, 1),
        }
        d.update(self.extra)
        return d


def chunked(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


# One loop per call shape, so the timed loop holds no extra indirection; the
# same loop times our call and the baseline's.
def loop_1(fn: Callable[[Any], Any], chunks: list[Sequence[Any]]) -> list[int]:
    pc, samples = time.perf_counter_ns, []
    for chunk in chunks:
        a = pc()
        for x in chunk:
            fn(x)
        samples.append(pc() - a)
    return samples


def loop_2(fn: Callable[[Any, Any], Any], chunks: list[Sequence[Any]], arg: Any) -> list[int]:
    pc, samples = time.perf_counter_ns, []
    for chunk in chunks:
        a = pc()
        for x in chunk:
            fn(x, arg)
        samples.append(pc() - a)
    return samples


def loop_star(fn: Callable[..., Any], chunks: list[Sequence[Any]]) -> list[int]:
    pc, samples = time.perf_counter_ns, []
    for chunk in chunks:
        a = pc()
        for x in chunk:
            fn(*x)
        samples.append(pc() - a)
    return samples


def loop_until(
    fn: Callable[[Any, Any], Any], chunks: list[Sequence[Any]], arg: Any, deadline_ns: int
) -> tuple[list[int], int]:
    """loop_2 that stops after the chunk that passes `deadline_ns`; also says how many ran."""
    pc, samples, done = time.perf_counter_ns, [], 0
    for chunk in chunks:
        a = pc()
        for x in chunk:
            fn(x, arg)
        b = pc()
        samples.append(b - a)
        done += len(chunk)
        if b > deadline_ns:
            break
    return samples, done


def measure(
    run: Callable[[], list[int]], n_items: int, repeats: int, items_per_call: int, per_sample: int
) -> Timing:
    """One untimed warm-up run, then `repeats` timed runs of the same work."""
    gc.collect()
    run()
    rates: list[float] = []
    lat: list[float] = []
    gc.disable()
    try:
        for _ in range(repeats):
            t = time.perf_counter_ns()
            samples = run()
            dt = time.perf_counter_ns() - t
            rates.append(n_items * 1e9 / dt)
            lat.extend(s / per_sample for s in samples)
    finally:
        gc.enable()
    return Timing(rates, lat, items_per_call)


def single(
    fn: Callable[..., Any], ops: Sequence[Any], repeats: int, arg: Any = None, star: bool = False
) -> Timing:
    chunks = chunked(ops, SAMPLE_GROUP)
    if star:
        return measure(lambda: loop_star(fn, chunks), len(ops), repeats, 1, SAMPLE_GROUP)
    if arg is None:
        return measure(lambda: loop_1(fn, chunks), len(ops), repeats, 1, SAMPLE_GROUP)
    return measure(lambda: loop_2(fn, chunks, arg), len(ops), repeats, 1, SAMPLE_GROUP)


# A batch latency sample is one batch call.
def batch_loop(fn: Callable[..., Any], batches: list[Sequence[Any]], arg: Any) -> list[int]:
    pc, samples = time.perf_counter_ns, []
    if arg is None:
        for b in batches:
            a = pc()
            fn(b)
            samples.append(pc() - a)
    else:
        for b in batches:
            a = pc()
            fn(b, arg)
            samples.append(pc() - a)
    return samples


def batch(fn: Callable[..., Any], ops: Sequence[Any], repeats: int, arg: Any = None) -> Timing:
    batches = chunked(ops, BATCH)
    return measure(lambda: batch_loop(fn, batches, arg), len(ops), repeats, BATCH, 1)


def read_io() -> int:
    """Bytes this process dirtied for writing (/proc/self/io write_bytes).

    Counted when a page-cache page turns dirty, whole folios at a time, so on
    kernels with large folios it overstates what reaches the disk; the
    device's own counter (device_written) is the figure to quote.
    """
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def device_written(path: str) -> int:
    """Bytes written to the block device holding `path`, journal included.

    Device-wide: anything else writing to that device meanwhile is counted
    too, so run on an idle machine.
    """
    try:
        st = os.stat(path)
        with open(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat") as f:
            return int(f.read().split()[6]) * 512  # sectors written, always 512 octets
    except (OSError, ValueError, IndexError):
        return -1


def allocated(path: str) -> int:
    """Bytes allocated on disk for a file (LMDB's data file is sparse)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return -1


# --------------------------------------------------------------------------
# Machine


def machine(workdir: str) -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    fstype, mnt = "", ""
    try:
        real = os.path.realpath(workdir)
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                m = parts[1]
                if (real == m or real.startswith(m.rstrip("/") + "/")) and len(m) >= len(mnt):
                    mnt, fstype = m, parts[2]
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": mem,
        "memory_gib": round(mem / (1 << 30), 1),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "kernel": platform.release(),
        "platform": platform.platform(),
        "storage": {"dir": workdir, "mount": mnt, "fstype": fstype},
    }


# --------------------------------------------------------------------------
# The run


@dataclass
class Row:
    name: str
    table: str
    ours: Timing
    baselines: list[tuple[str, Timing]]
    floor_key: str | None = None
    floor_kind: str = "single"  # single: boundary ns per call; batch: % of floor
    correct: bool | None = None
    checked: int = 0
    unit: str = "ops/s"

    def as_json(self) -> dict[str, Any]:
        d = self.ours.as_json(self.name)
        d["table"] = self.table
        d["unit"] = self.unit
        bl = [t.as_json(n) for n, t in self.baselines]
        d["baseline"] = bl[0] if bl else None
        d["ratio"] = round(self.ours.rate / self.baselines[0][1].rate, 3) if bl else None
        d["baselines"] = [
            {**b, "ratio": round(self.ours.rate / t.rate, 3)}
            for b, (_, t) in zip(bl, self.baselines, strict=True)
        ]
        d["correct"] = self.correct
        d["checked"] = self.checked
        if self.floor_key:
            d["floor_key"] = self.floor_key
        return d


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.rows: list[Row] = []
        self.sizes: dict[str, Any] = {}
        self.notes: list[str] = []
        self.errors: list[str] = []
        n = args.size
        self.n_recon = n
        self.n_prefixes = max(10, n // 2)
        self.n_users = max(10, n // 100)
        self.hot = max(1, min(args.hot, n // 10))
        self.ops = args.ops
        self.repeats = args.repeats

    # ----------------------------------------------------------- helpers
    def add(self, row: Row) -> None:
        self.rows.append(row)
        base = row.baselines[0] if row.baselines else None
        txt = f"{row.name}: {row.ours.rate:,.0f} {row.unit}"
        if base:
            txt += f" (vs {base[0]} {base[1].rate:,.0f}, x{row.ours.rate / base[1].rate:.2f})"
        if row.correct is False:
            txt += "  WRONG ANSWERS"
        log(txt)

    def verify(self, what: str, ok: bool, detail: str = "") -> bool:
        if not ok:
            msg = f"{what}: answers differ from the baseline {detail}".rstrip()
            self.errors.append(msg)
            log("ERROR " + msg)
        return ok

    # ----------------------------------------------------------- Recon
    def build_recon(self, core: Any, base: PyLmdbRecon, dct: DictRecon, sources: list[str]) -> None:
        n = len(sources)
        t_pass = T0 + MIN_DELAY
        log(f"recon: building {n:,} sources (check at t0, again at t0+min_delay, flush)")

        def build(name: str, check_many: Callable[..., Any], flush: Callable[[], None]) -> float:
            t_total = 0.0
            wrong = 0
            for c in range(0, n, BUILD_FLUSH_EVERY):
                chunk = sources[c : c + BUILD_FLUSH_EVERY]
                for now, want in ((T0, NEW), (t_pass, PASSED)):
                    for b in range(0, len(chunk), BUILD_BATCH):
                        part = chunk[b : b + BUILD_BATCH]
                        t = time.perf_counter()
                        res = check_many(part, now)
                        t_total += time.perf_counter() - t
                        wrong += sum(1 for r in res if getattr(r, "status", r) != want)
                t = time.perf_counter()
                flush()
                t_total += time.perf_counter() - t
                if n > BUILD_FLUSH_EVERY:
                    log(f"  {name}: {min(n, c + BUILD_FLUSH_EVERY):,}/{n:,}")
            self.verify(f"recon build ({name})", wrong == 0, f"({wrong:,} unexpected statuses)")
            log(f"  {name}: {n:,} sources in {t_total:.1f} s ({n / t_total:,.0f}/s)")
            return t_total

        rec = core.recon
        t_ours = build("kithmail", rec.check_many, core.flush)
        t_lmdb = build("py-lmdb", base.check_many, lambda: None)
        t_dict = build("dict", dct.check_many, lambda: None)

        def one(t: float) -> Timing:
            return Timing([n / t], extra={"seconds": round(t, 3), "checks_per_s": 2 * n / t})

        self.add(
            Row(
                "recon build: check_many new+pass, sources/s",
                "recon",
                one(t_ours),
                [
                    ("py-lmdb check_many, commit per 100k", one(t_lmdb)),
                    ("dict check_many", one(t_dict)),
                ],
                correct=not any(e.startswith("recon build") for e in self.errors),
                checked=2 * n,
                unit="inserts/s",
            )
        )

    def measure_recon(
        self, core: Any, base: PyLmdbRecon, dct: DictRecon, sources: list[str]
    ) -> None:
        rng, rec = self.rng, core.recon
        now = T0 + MIN_DELAY + 1  # every source known; renewal would move <1 day: no writes
        hot = rng.sample(sources, self.hot)
        sets = {
            "hot": [hot[rng.randrange(len(hot))] for _ in range(self.ops)],
            "random": [sources[rng.randrange(len(sources))] for _ in range(self.ops)],
        }
        for label, ops in sets.items():
            sample = ops[: min(len(ops), 20_000)]
            ours_s = [r.status for r in map(rec.check, sample, [now] * len(sample))]
            ours_b = [r.status for b in chunked(sample, BATCH) for r in rec.check_many(b, now)]
            ok = all(s == KNOWN for s in ours_s) and ours_s == ours_b
            ok &= all(base.check(ip, now) == KNOWN for ip in sample)
            ok &= all(dct.check(ip, now) == KNOWN for ip in sample)
            self.verify(f"recon known {label}", ok)
            log(f"recon: check known {label} ({len(ops):,} ops x {self.repeats})")
            self.add(
                Row(
                    f"recon.check known {label}",
                    "recon",
                    single(rec.check, ops, self.repeats, now),
                    [
                        ("py-lmdb", single(base.check, ops, self.repeats, now)),
                        ("dict", single(dct.check, ops, self.repeats, now)),
                    ],
                    floor_key=f"recon_known_{label}",
                    correct=ok,
                    checked=len(sample),
                )
            )
            log(f"recon: check_many known {label} (batches of {BATCH:,})")
            self.add(
                Row(
                    f"recon.check_many known {label} (x{BATCH})",
                    "recon",
                    batch(rec.check_many, ops, self.repeats, now),
                    [
                        (
                            "py-lmdb, one txn per batch",
                            batch(base.check_many, ops, self.repeats, now),
                        ),
                        ("dict", batch(dct.check_many, ops, self.repeats, now)),
                    ],
                    floor_key="recon_known_hot" if label == "hot" else "recon_batch_sorted",
                    floor_kind="batch",
                    correct=ok,
                    checked=len(sample),
                )
            )
        self._random_ops = sets["random"]

    def measure_small_recon(self, work: str, core_kw: dict[str, Any]) -> str:
        """Recon on a table of only the hot-set size, so it stays in cache.

        The hot rows above draw 100 k sources from a 10 M table: each still
        lands on its own leaf page, so they measure memory. This table is
        the issue's "hot set (100 k sources)" as a whole; its floor is run
        on it separately (keys prefixed ``small_``).
        """
        n = self.hot
        core_dir = os.path.join(work, "small-core")
        base_dir = os.path.join(work, "small-pylmdb")
        os.makedirs(core_dir)
        os.makedirs(base_dir)
        rng = random.Random(self.args.seed + 1)
        sources = recon_sources(rng, n)
        core = _core.Core(core_dir, commit_window_ms=3_600_000, **core_kw)
        env = lmdb.open(base_dir, map_size=1 << 30, max_dbs=2, max_readers=64)
        base = PyLmdbRecon(env, env.open_db(b"recon"))
        dct = DictRecon()
        for table in (core.recon, base, dct):
            for now in (T0, T0 + MIN_DELAY):
                for b in chunked(sources, BATCH):
                    table.check_many(b, now)
        core.flush()
        core.close()
        del core
        gc.collect()
        core = _core.Core(core_dir, commit_window_ms=self.args.commit_window_ms, **core_kw)
        rec = core.recon
        now = T0 + MIN_DELAY + 1
        ops = [sources[rng.randrange(n)] for _ in range(self.ops)]
        sample = ops[:20_000]
        ok = all(r.status == KNOWN for r in map(rec.check, sample, [now] * len(sample)))
        ok &= all(base.check(ip, now) == KNOWN for ip in sample)
        self.verify("recon known small table", ok)
        self.sizes["recon_small_table"] = {"sources": len(rec)}
        log(f"recon: check known on a {n:,}-source table ({len(ops):,} ops x {self.repeats})")
        self.add(
            Row(
                f"recon.check known, {n // 1000}k-source table",
                "recon",
                single(rec.check, ops, self.repeats, now),
                [
                    ("py-lmdb", single(base.check, ops, self.repeats, now)),
                    ("dict", single(dct.check, ops, self.repeats, now)),
                ],
                floor_key="small_recon_known_hot",
                correct=ok,
                checked=len(sample),
            )
        )
        self.add(
            Row(
                f"recon.check_many known, {n // 1000}k-source table (x{BATCH})",
                "recon",
                batch(rec.check_many, ops, self.repeats, now),
                [
                    ("py-lmdb, one txn per batch", batch(base.check_many, ops, self.repeats, now)),
                    ("dict", batch(dct.check_many, ops, self.repeats, now)),
                ],
                floor_key="small_recon_batch_sorted",
                floor_kind="batch",
                correct=ok,
                checked=len(sample),
            )
        )
        core.close()
        del core, rec
        env.close()
        gc.collect()
        return core_dir

    def measure_inserts(
        self, core: Any, base: PyLmdbRecon, fresh: list[str], core_data: str, base_data: str
    ) -> None:
        rec = core.recon
        reps = self.ins_repeats
        n_ins, n_commit = self.n_ins, self.n_commit
        now = T0 + 2 * DAY
        log(
            f"recon: new-source inserts, group commit ({n_ins:,} x {reps}) vs commit "
            f"per insert ({n_commit:,} x {reps})"
        )

        def run(
            fn: Callable[[str, int], Any],
            count: int,
            flush: Callable[[], None],
            data: str,
            batched_fn: bool = False,
            budget_s: float | None = None,
        ) -> Timing:
            rates: list[float] = []
            lat: list[float] = []
            per: dict[str, list[float]] = {"device": [], "dirtied": [], "growth": []}
            done_all: list[int] = []
            for r in range(reps):
                part = fresh[r * n_ins : r * n_ins + count]
                gc.collect()
                before = (device_written(data), read_io(), allocated(data))
                t = time.perf_counter_ns()
                done = count
                if batched_fn:
                    samples = batch_loop(fn, chunked(part, BATCH), now)
                elif budget_s is None:
                    samples = loop_2(fn, chunked(part, SAMPLE_GROUP), now)
                else:
                    samples, done = loop_until(
                        fn, chunked(part, SAMPLE_GROUP), now, t + int(budget_s * 1e9)
                    )
                flush()
                dt = time.perf_counter_ns() - t
                after = (device_written(data), read_io(), allocated(data))
                rates.append(done * 1e9 / dt)
                lat.extend(s / (1 if batched_fn else SAMPLE_GROUP) for s in samples)
                done_all.append(done)
                for k, b0, b1 in zip(per, before, after, strict=True):
                    if b0 >= 0 and b1 >= 0:
                        per[k].append((b1 - b0) / done)

            def med(k: str) -> float | None:
                return round(statistics.median(per[k]), 1) if per[k] else None

            extra = {
                "inserts_per_run": min(done_all),
                "device_bytes_per_insert": med("device"),
                "dirtied_bytes_per_insert": med("dirtied"),
                "file_growth_per_insert": med("growth"),
            }
            return Timing(rates, lat, BATCH if batched_fn else 1, extra)

        ours = run(rec.check, n_ins, core.flush, core_data)
        # An fsync per insert: on a slow or busy disk, stop each run at its budget.
        commit_each = run(
            base.check_commit_each,
            n_commit,
            lambda: None,
            base_data,
            budget_s=2.0 if self.args.quick else 10.0,
        )
        per_batch = run(base.check_many, n_ins, lambda: None, base_data, batched_fn=True)
        sample = fresh[: min(n_ins, 1000)]
        shown = [rec.show(ip) for ip in sample]
        ok = all(e is not None and e.first_seen == now for e in shown)
        with base.env.begin(db=base.db) as txn:
            ok &= all(
                (raw := txn.get(recon_key(ip))) is not None and REC.unpack(raw)[0] == now
                for ip in sample
            )
        self.verify("recon inserts recorded", ok)
        self.add(
            Row(
                f"recon.check new source, group commit {self.args.commit_window_ms} ms",
                "recon",
                ours,
                [
                    ("py-lmdb, one txn+commit per insert", commit_each),
                    (f"py-lmdb check_many, one commit per {BATCH}", per_batch),
                ],
                correct=ok,
                checked=len(sample),
                unit="inserts/s",
            )
        )

    def measure_threads(self, core: Any, base: PyLmdbRecon) -> None:
        now = T0 + MIN_DELAY + 1
        ops = self._random_ops
        batches = chunked(ops, BATCH)
        log(f"recon: check_many from two threads vs one ({len(ops):,} checks per thread)")

        def rate(fn: Callable[..., Any], threads: int) -> float:
            barrier = threading.Barrier(threads + 1)

            def work() -> None:
                barrier.wait()
                for b in batches:
                    fn(b, now)

            ts = [threading.Thread(target=work) for _ in range(threads)]
            for t in ts:
                t.start()
            barrier.wait()
            t0 = time.perf_counter()
            for t in ts:
                t.join()
            return threads * len(ops) / (time.perf_counter() - t0)

        for name, fn in (
            ("recon.check_many known random, 2 threads", core.recon.check_many),
            ("py-lmdb check_many known random, 2 threads", base.check_many),
        ):
            rate(fn, 1)  # warm-up
            one, two = [], []
            for _ in range(self.repeats):
                one.append(rate(fn, 1))
                two.append(rate(fn, 2))
            self.add(
                Row(
                    name,
                    "recon",
                    Timing(two, items_per_call=BATCH, extra={"threads": 2}),
                    [("same, 1 thread", Timing(one, items_per_call=BATCH, extra={"threads": 1}))],
                )
            )

    # ----------------------------------------------------------- Reputation
    def reputation(self, core: Any) -> None:
        rng, rep = self.rng, core.reputation
        n = self.n_prefixes
        log(f"reputation: generating {n:,} prefixes")
        pfx = reputation_prefixes(rng, n)
        text = list(pfx.text())
        log(f"reputation: load of {len(text):,} prefixes")
        gc.collect()
        t = time.perf_counter()
        loaded = rep.load("bench-block", "block", text, action="reject", score=5, now=T0)
        t_load = time.perf_counter() - t
        log(f"  load: {t_load:.2f} s")
        t = time.perf_counter()
        lpm = PyLpm(pfx)
        t_py = time.perf_counter() - t
        lists = {x.name: x for x in rep.lists()}
        info = lists.get("bench-block")
        self.sizes["reputation"] = {
            "prefixes": len(text),
            "ipv4": len(pfx.v4),
            "ipv6": len(pfx.v6),
            "loaded": loaded,
            "intervals": getattr(info, "intervals", None),
            "lists": 1,
        }
        del text
        self.add(
            Row(
                "reputation.load block list, prefixes/s",
                "reputation",
                Timing(
                    [len(pfx.v4 + pfx.v6) / t_load],
                    extra={"seconds": round(t_load, 3), "prefixes": n},
                ),
                [
                    (
                        "pure-Python LPM build",
                        Timing([n / t_py], extra={"seconds": round(t_py, 3)}),
                    )
                ],
                correct=self.verify("reputation.load count", loaded == n, f"({loaded} != {n})"),
                unit="prefixes/s",
            )
        )

        ops = lpm_lookups(rng, pfx, self.ops)
        sample = ops[: min(len(ops), 20_000)]
        mism = 0
        hits = 0
        many = [m for b in chunked(sample, BATCH) for m in rep.lookup_many(b)]
        for ip, m, mb in zip(sample, map(rep.lookup, sample), many, strict=True):
            want = lpm.lookup(ip)
            hits += want is not None
            got = None if m is None else ipaddress.ip_network(m.prefix)
            gotb = None if mb is None else ipaddress.ip_network(mb.prefix)
            exp = None if want is None else ipaddress.ip_network(want)
            if got != exp or gotb != exp or (m is not None and m.kind != "block"):
                mism += 1
                if mism <= 3:
                    log(f"  mismatch {ip}: ours {got} / {gotb}, baseline {exp}")
        ok = self.verify("reputation lookup", mism == 0, f"({mism} of {len(sample)})")
        self.sizes["reputation"]["lookup_hit_share"] = round(hits / len(sample), 3)
        log(
            f"reputation: lookup ({len(ops):,} ops x {self.repeats}, {hits / len(sample):.0%} hits)"
        )
        self.add(
            Row(
                "reputation.lookup",
                "reputation",
                single(rep.lookup, ops, self.repeats),
                [("pure-Python LPM", single(lpm.lookup, ops, self.repeats))],
                floor_key="lpm_single",
                correct=ok,
                checked=len(sample),
            )
        )
        self.add(
            Row(
                f"reputation.lookup_many (x{BATCH})",
                "reputation",
                batch(rep.lookup_many, ops, self.repeats),
                [("pure-Python LPM", batch(lpm.lookup_many, ops, self.repeats))],
                floor_key="lpm_batch",
                floor_kind="batch",
                correct=ok,
                checked=len(sample),
            )
        )

    # ----------------------------------------------------------- Community
    def build_community(self, core: Any, base: PyLmdbCommunity) -> CommunityData:
        rng, com = self.rng, core.community
        n_users = self.n_users
        tenants = max(1, n_users // USERS_PER_TENANT)
        n_dom = max(1000, n_users * 2)
        hot_users = max(1, min(n_users, self.hot // ENTRIES_PER_USER, n_users // 100 or 1))
        hot_ids = set(rng.sample(range(n_users), hot_users))
        users = [user_name(u, tenants) for u in range(n_users)]
        cd = CommunityData(users, tenants, {}, {}, n_dom)
        log(
            f"community: building {n_users:,} users x {ENTRIES_PER_USER} entries "
            f"({tenants:,} tenants; one add_many, so one commit, per user)"
        )
        t_ours = t_base = 0.0
        src_import = SOURCES.index("import")
        pc = time.perf_counter
        for t in range(tenants):
            ents = user_entries(rng, n_dom)
            allow, block = ents[:50], ents[50:]
            cd.org_entries[t] = (allow, block)
            org = org_name(t)
            a = pc()
            com.add_many(org, allow, "allow", "admin", T0)
            com.add_many(org, block, "block", "admin", T0)
            b = pc()
            base.add_many(org, allow, 0, SOURCES.index("admin"), T0)
            base.add_many(org, block, 1, SOURCES.index("admin"), T0)
            c = pc()
            t_ours += b - a
            t_base += c - b
        step = max(1, n_users // 10)
        for u in range(n_users):
            ents = user_entries(rng, n_dom)
            if u in hot_ids:
                cd.hot_entries[u] = ents
            a = pc()
            com.add_many(users[u], ents, "allow", "import", T0)
            b = pc()
            base.add_many(users[u], ents, 0, src_import, T0)
            t_ours += b - a
            t_base += pc() - b
            if n_users >= 100_000 and (u + 1) % step == 0:
                log(f"  {u + 1:,}/{n_users:,} users")
        n_ent = (n_users + tenants) * ENTRIES_PER_USER
        self.sizes["community"] = {
            "users": n_users,
            "entries_per_user": ENTRIES_PER_USER,
            "tenants": tenants,
            "entries": n_ent,
            "hot_users": len(cd.hot_entries),
        }
        cnt_ok = all(com.count(users[u]) == ENTRIES_PER_USER for u in list(hot_ids)[:100])
        self.add(
            Row(
                "community.add_many build, entries/s",
                "community",
                Timing([n_ent / t_ours], extra={"seconds": round(t_ours, 3)}),
                [
                    (
                        "py-lmdb putmulti, one commit per user",
                        Timing([n_ent / t_base], extra={"seconds": round(t_base, 3)}),
                    )
                ],
                correct=self.verify("community count", cnt_ok),
                unit="entries/s",
            )
        )
        return cd

    def measure_community(self, core: Any, base: PyLmdbCommunity, cd: CommunityData) -> None:
        com = core.community
        hot = community_queries(self.rng, cd, min(self.hot, 100_000))
        ops = [hot[self.rng.randrange(len(hot))] for _ in range(self.ops)]
        sample = hot[: min(len(hot), 20_000)]
        many = [m for b in chunked(sample, BATCH) for m in com.member_many(b)]
        mism = 0
        dist: dict[str, int] = {}
        for q, m, mb in zip(sample, map(lambda q: com.member(*q), sample), many, strict=True):
            want = base.member(*q)
            dist[f"{want[0]}/{want[2]}"] = dist.get(f"{want[0]}/{want[2]}", 0) + 1
            got = (m.status, m.entry, m.scope)
            gotb = (mb.status, mb.entry, mb.scope)
            if got != want or gotb != want:
                mism += 1
                if mism <= 3:
                    log(f"  mismatch {q}: ours {got} / {gotb}, baseline {want}")
        ok = self.verify("community member", mism == 0, f"({mism} of {len(sample)})")
        self.sizes["community"]["hot_queries"] = len(hot)
        self.sizes["community"]["answers"] = {k: round(v / len(sample), 3) for k, v in dist.items()}
        log(f"community: member hot ({len(ops):,} ops x {self.repeats})")
        self.add(
            Row(
                "community.member hot",
                "community",
                single(com.member, ops, self.repeats, star=True),
                [("py-lmdb, same probes", single(base.member, ops, self.repeats, star=True))],
                floor_key="community_member_hot",
                correct=ok,
                checked=len(sample),
            )
        )
        self.add(
            Row(
                f"community.member_many hot (x{BATCH})",
                "community",
                batch(com.member_many, ops, self.repeats),
                [("py-lmdb, one txn per batch", batch(base.member_many, ops, self.repeats))],
                floor_key="community_member_hot",
                floor_kind="batch",
                correct=ok,
                checked=len(sample),
            )
        )

    # ----------------------------------------------------------- Floor
    def floor(self, core_dir: str) -> dict[str, Any]:
        bin_ = self.args.floor
        cmd = [bin_, "--dir", core_dir, "--ops", str(self.ops)]
        log(f"floor: {' '.join(cmd)}")
        out: dict[str, Any] = {"binary": bin_, "command": cmd, "ops": self.ops}
        t = time.perf_counter()
        try:
            p = subprocess.run(
                cmd, capture_output=True, text=True, timeout=self.args.floor_timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
            self.errors.append(f"floor: {out['error']}")
            log("ERROR floor: " + out["error"])
            return out
        out["seconds"] = round(time.perf_counter() - t, 3)
        out["exit_status"] = p.returncode
        try:
            res = json.loads(p.stdout)
            if not isinstance(res, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            out["error"] = f"no JSON object on stdout ({exc}); exit {p.returncode}"
            out["stderr_tail"] = p.stderr[-2000:]
            out["stdout_head"] = p.stdout[:2000]
            self.errors.append(f"floor: {out['error']}")
            log("ERROR floor: " + out["error"])
            return out
        out["results"] = res
        missing = [k for k in FLOOR_KEYS if not isinstance(res.get(k), int | float)]
        if missing:
            out["missing_keys"] = missing
            log(f"floor: missing keys {missing}")
        if p.returncode != 0:
            self.errors.append(f"floor exited {p.returncode}")
        return out

    def attach_floor(self, results: list[dict[str, Any]], floor: dict[str, Any]) -> None:
        res = floor.get("results") or {}
        for row, d in zip(self.rows, results, strict=True):
            fr = res.get(row.floor_key) if row.floor_key else None
            if not isinstance(fr, int | float) or fr <= 0:
                continue
            f: dict[str, Any] = {"key": row.floor_key, "ops_per_s": fr}
            if row.floor_kind == "single":
                f["boundary_ns"] = round(1e9 / row.ours.rate - 1e9 / fr, 1)
            else:
                f["pct_of_floor"] = round(100 * row.ours.rate / fr, 1)
            d["floor"] = f

    # ----------------------------------------------------------- main
    def run(self) -> dict[str, Any]:
        args = self.args
        parent = args.dir or None
        work = tempfile.mkdtemp(prefix="kithmail-bench-", dir=parent)
        core_dir = os.path.join(work, "core")
        base_dir = os.path.join(work, "pylmdb")
        os.makedirs(core_dir)
        os.makedirs(base_dir)
        log(f"working in {work}")
        try:
            return self._run(work, core_dir, base_dir)
        finally:
            if args.keep:
                log(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)

    def _run(self, work: str, core_dir: str, base_dir: str) -> dict[str, Any]:
        args = self.args
        self.ins_repeats = min(self.repeats, 5)
        self.n_ins = max(1000, self.ops // 2)
        # Each of these pays an fsync: a few thousand say all there is to say.
        self.n_commit = max(200, min(self.n_ins, 1000 if args.quick else 5000))
        core_kw = {
            "map_size": MAP_SIZE,
            "min_delay": MIN_DELAY,
            "retry_window": RETRY_WINDOW,
            "pass_ttl": PASS_TTL,
        }
        env = lmdb.open(base_dir, map_size=MAP_SIZE, max_dbs=4, max_readers=256)
        b_recon = PyLmdbRecon(env, env.open_db(b"recon"))
        b_comm = PyLmdbCommunity(env, env.open_db(b"community"))
        dct = DictRecon()

        log(f"recon: generating {self.n_recon:,} sources + {self.ins_repeats * self.n_ins:,} fresh")
        allsrc = recon_sources(self.rng, self.n_recon + self.ins_repeats * self.n_ins)
        sources, fresh = allsrc[: self.n_recon], allsrc[self.n_recon :]
        del allsrc

        # Build with a window long enough never to fire: each chunk ends in a flush.
        core = _core.Core(core_dir, commit_window_ms=3_600_000, **core_kw)
        self.build_recon(core, b_recon, dct, sources)
        core.close()
        del core
        gc.collect()
        # Measure as the server runs: the default (or given) commit window.
        core = _core.Core(core_dir, commit_window_ms=args.commit_window_ms, **core_kw)
        self.sizes["recon"] = {
            "sources": len(core.recon),
            "hot": self.hot,
            "ipv4_prefix": 32,
            "build_batch": BUILD_BATCH,
            "build_flush_every": BUILD_FLUSH_EVERY,
        }
        self.verify("recon rows", len(core.recon) == self.n_recon, f"({len(core.recon)})")

        self.reputation(core)
        cd = self.build_community(core, b_comm)

        self.measure_recon(core, b_recon, dct, sources)
        del dct  # the dict has served; give its memory back before the threads
        gc.collect()
        self.measure_threads(core, b_recon)
        self.measure_inserts(
            core,
            b_recon,
            fresh,
            os.path.join(core_dir, "data.mdb"),
            os.path.join(base_dir, "data.mdb"),
        )
        self.measure_community(core, b_comm, cd)
        small_dir = self.measure_small_recon(work, core_kw)

        stats: dict[str, Any]
        try:
            stats = dict(core.stats())
        except Exception as exc:  # stats are a nicety; never lose the run for them
            stats = {"error": repr(exc)}
        core.flush()
        core.close()
        del core
        env.close()
        self.sizes["core_env_bytes"] = allocated(os.path.join(core_dir, "data.mdb"))
        self.sizes["pylmdb_env_bytes"] = allocated(os.path.join(base_dir, "data.mdb"))

        results = [r.as_json() for r in self.rows]
        floor: dict[str, Any] | None = None
        if args.floor:
            floor = self.floor(core_dir)
            small = self.floor(small_dir)
            floor["small_table"] = small
            for k, v in (small.get("results") or {}).items():
                floor.setdefault("results", {})[f"small_{k}"] = v
            self.attach_floor(results, floor)

        return {
            "benchmark": "core",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(work),
            "build_profile": args.profile,
            "kithmail": {
                "version": getattr(_core, "__version__", None),
                "module": getattr(_core, "__file__", None),
            },
            "baselines": {"py-lmdb": getattr(lmdb, "__version__", None)},
            "command": [sys.executable, *sys.argv],
            "quick": args.quick,
            "seed": args.seed,
            "sizes": {
                **self.sizes,
                "size": args.size,
                "ops_per_run": self.ops,
                "repeats": self.repeats,
                "batch": BATCH,
                "latency_sample": f"{SAMPLE_GROUP} single calls or 1 batch call",
                "commit_window_ms": args.commit_window_ms,
                "inserts_per_run": self.n_ins,
                "commit_each_inserts_per_run": self.n_commit,
            },
            "core_stats": stats,
            "results": results,
            "floor": floor,
            "correct": not self.errors,
            "errors": self.errors,
        }


# --------------------------------------------------------------------------
# Output


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.2f}{suf}"
    return f"{x:.0f}"


def fmt_ns(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}ms"
    if x >= 1e4:
        return f"{x / 1e3:.1f}us"
    return f"{x:.0f}ns"


INSERT_BYTES = (
    ("device_bytes_per_insert", "bytes written to the block device per insert"),
    ("dirtied_bytes_per_insert", "page-cache bytes dirtied per insert (overstates)"),
    ("file_growth_per_insert", "data file growth per insert"),
)


def print_table(report: dict[str, Any]) -> None:
    rows = []
    for r in report["results"]:
        bls = r["baselines"] or [None]
        for i, b in enumerate(bls):
            fl = r.get("floor") or {}
            ftxt = ""
            if i == 0 and "boundary_ns" in fl:
                ftxt = f"{fmt_rate(fl['ops_per_s'])} ({fl['boundary_ns']:+.0f} ns/call)"
            elif i == 0 and "pct_of_floor" in fl:
                ftxt = f"{fmt_rate(fl['ops_per_s'])} ({fl['pct_of_floor']:.0f}%)"
            rows.append(
                [
                    r["name"] if i == 0 else "",
                    fmt_rate(r["ops_per_s"]) if i == 0 else "",
                    fmt_ns(r["median_ns"]) if i == 0 else "",
                    fmt_ns(r["p99_ns"]) if i == 0 else "",
                    b["name"] if b else "-",
                    fmt_rate(b["ops_per_s"]) if b else "-",
                    f"x{b['ratio']:.2f}" if b else "-",
                    ftxt,
                    {True: "", False: "WRONG", None: ""}[r["correct"]] if i == 0 else "",
                ]
            )
    head = ["operation", "ours/s", "p50", "p99", "baseline", "base/s", "ratio", "rust floor", ""]
    widths = [max(len(str(x[i])) for x in [*rows, head]) for i in range(len(head))]
    right = {1, 2, 3, 5, 6}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    m = report["machine"]
    print(
        f"kithmail core benchmark: {report['build_profile']} build, {m['cpu']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB, {m['python']}, "
        f"storage {m['storage']['fstype']}"
    )
    s = report["sizes"]
    print(
        f"sizes: recon {s['recon']['sources']:,} sources (hot {s['recon']['hot']:,}), "
        f"reputation {s['reputation']['prefixes']:,} prefixes, community "
        f"{s['community']['users']:,} users x {s['community']['entries_per_user']}; "
        f"{s['ops_per_run']:,} ops per run, median of {s['repeats']} runs; p50/p99 are per "
        f"call (a batch call for x{BATCH} rows)"
    )
    print(line(head))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    for r in report["results"]:
        for k, label in INSERT_BYTES:
            if r.get(k) is not None:
                vals = [f"ours {r[k]:,.0f}"] + [
                    f"{b['name']} {b[k]:,.0f}" for b in r["baselines"] if b.get(k) is not None
                ]
                print(f"{label}: " + "; ".join(vals))
    fl = report.get("floor")
    if fl and fl.get("error"):
        print(f"floor: {fl['error']}")
    if report["errors"]:
        print("ERRORS: " + "; ".join(report["errors"]))


@contextlib.contextmanager
def workdir(name: str, args: argparse.Namespace, *, shared: bool = False) -> Iterator[str]:
    """A fresh temporary directory for one bench (``--dir``), removed after unless ``--keep``.

    ``shared``: readable by all, for peers (Postfix, smtp-sink, postgrey)
    that run as their own users.
    """
    work = tempfile.mkdtemp(prefix=f"kithmail-bench-{name}-", dir=args.dir)
    if shared:
        os.chmod(work, 0o755)
    try:
        yield work
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def finish(args: argparse.Namespace, report: dict[str, Any], show: Any) -> int:
    """Show the report, write ``--json``; the exit status (1 when it has errors)."""
    show(report)
    if args.json:
        write_json(args.json, report)
        log(f"wrote {args.json}")
    if report["errors"]:
        log("FAILED: " + "; ".join(report["errors"]))
        return 1
    return 0


def write_json(path: str, report: dict[str, Any]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark kithmail._core's tables beside py-lmdb, dict and Rust baselines.",
    )
    p.add_argument(
        "--size",
        type=int,
        default=10_000_000,
        help="Recon sources (default 10,000,000); reputation gets size/2 prefixes, "
        "community size/100 users x 100 entries",
    )
    p.add_argument("--json", metavar="PATH", help="write the results here (atomically)")
    p.add_argument("--floor", metavar="BIN", help="the Rust floor binary (kithmail-floor)")
    p.add_argument("--quick", action="store_true", help="fewer ops and repeats: a smoke run")
    p.add_argument("--profile", default="release", help="build profile to record (default release)")
    p.add_argument("--seed", type=int, default=20_240_601, help="data seed")
    p.add_argument("--ops", type=int, help="ops per timed run (default 200,000; quick 20,000)")
    p.add_argument("--repeats", type=int, help="timed runs per figure (default 7; quick 3)")
    p.add_argument("--hot", type=int, default=100_000, help="hot set size (capped at size/10)")
    p.add_argument(
        "--commit-window-ms", type=int, default=100, help="Recon group-commit window to measure"
    )
    p.add_argument("--dir", help="parent of the temporary directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--floor-timeout", type=float, default=1800.0, help="seconds (default 1800)")
    a = p.parse_args(argv)
    if a.size < 1000:
        p.error("--size must be at least 1000")
    a.ops = a.ops or (20_000 if a.quick else 200_000)
    a.repeats = a.repeats or (3 if a.quick else 7)
    if a.ops < BATCH:
        p.error(f"--ops must be at least {BATCH}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mod = os.path.realpath(getattr(_core, "__file__", "") or "")
    src = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "python"))
    if args.profile == "release" and mod.startswith(src + os.sep):
        log(
            f"warning: kithmail._core comes from the source tree ({mod}), as maturin develop "
            "installs it; say --profile debug if it is a debug build"
        )
    return finish(args, Bench(args).run(), print_table)


if __name__ == "__main__":
    sys.exit(main())
