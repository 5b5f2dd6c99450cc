#!/usr/bin/env python3
"""Benchmark of layer 5, the community, at the end of DATA and on a verifying reply.

Builds, with seeded synthetic data in a temporary directory, a core whose
community table holds N users x 100 entries (100,000 users by default) and
the same rows in a py-lmdb database (key ``user \\0 entry``, value the kind,
source and time, as bench/core.py lays it out), then measures in the same run:

- end-of-DATA decisions per second for messages of 1, 10 and 100 recipients
  through ``Community.decide`` (an authenticated From; members, blocked and
  unknown senders mixed), beside the same layer code over py-lmdb, the six
  probes alone in pure Python over py-lmdb, and the core's lookups alone;
- the release of 100 held messages of one sender for one user in a real
  spool and database: ``on_verified``'s work (the community entry added,
  then ``Quarantine.release_sender_sync``) until all 100 copies are marked
  pending and their flush requested; beside the spool's own part alone.

Every answer is compared between the implementations (a fast wrong answer is
worth nothing); a mismatch is reported and makes the exit status 1.

Trusts: nothing outside this machine; it makes no network traffic. Every
address is made up under example.com/.net/.org/.test (RFC 2606).

Run ``bench/community.py --help``; bench/README.md says how to read the output.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core import COMM, SOURCES, T0, finish, fmt_ns, fmt_rate, log, machine, workdir

try:
    import lmdb
except ImportError:  # pragma: no cover - setup error
    sys.exit("bench/community.py needs py-lmdb: pip install 'lmdb==3.0.0' (make bench does)")
try:
    from kithmail import _core, config
    from kithmail.db import Database
    from kithmail.layers import Action, Layer, Verdict
    from kithmail.layers.community import Community, org_user
    from kithmail.layers.spoofing.dmarc import default_psl
    from kithmail.layers.spoofing.results import AuthResults, DkimResult, DmarcResult
    from kithmail.pipeline import MessageContext
    from kithmail.quarantine import Quarantine
    from kithmail.spool import Envelope, Outcome, Recipient, Spool, State
    from kithmail.tenants import Policies, TenantPolicy
except ImportError as exc:  # pragma: no cover - setup error
    sys.exit(f"bench/community.py needs the installed kithmail ({exc}); run make bench")

ENTRIES_PER_USER = 100
USERS_PER_TENANT = 1_000
POOL_ADDR, POOL_DOM, POOL_LIST, POOL_BLOCK = 200, 40, 10, 50  # per tenant
PICK_ADDR, PICK_DOM, PICK_LIST, PICK_BLOCK = 20, 5, 2, 5  # per user
BLOCKING_USERS = 10  # one user in this many also blocks PICK_BLOCK senders
ORG_ALLOW, ORG_BLOCK = 50, 50
RCPTS = (1, 10, 100)
HELD = 100  # messages released by one verifying reply
LOCAL = "example.test"
MAP_SIZE = 64 << 30


# --------------------------------------------------------------------------
# Seeded data


def user_name(u: int, tenants: int) -> str:
    return f"user{u}@tenant{u % tenants}.example"


def tenant_name(t: int) -> str:
    return f"tenant{t}.example"


@dataclass
class Pools:
    """One tenant's popular senders: many users have some of them."""

    addr: list[str]
    dom: list[str]
    lists: list[str]
    block: list[str]
    org_allow: list[str]
    org_block: list[str]
    holders: dict[str, list[int]] = field(default_factory=dict)  # entry -> users


def make_pools(t: int) -> Pools:
    return Pools(
        addr=[f"s{i}@pop{i % 37}.t{t}.example.net" for i in range(POOL_ADDR)],
        dom=[f"@news{i}.t{t}.example.net" for i in range(POOL_DOM)],
        lists=[f"list:l{i}.t{t}.lists.example.org" for i in range(POOL_LIST)],
        block=[f"spam{i}@bulk{i % 10}.t{t}.example.net" for i in range(POOL_BLOCK)],
        org_allow=[f"partner{i}@org{i % 5}.t{t}.example.net" for i in range(ORG_ALLOW - 5)]
        + [f"@supplier{i}.t{t}.example.net" for i in range(5)],
        org_block=[f"fraud{i}@bad{i % 5}.t{t}.example.net" for i in range(ORG_BLOCK - 10)]
        + [f"@junk{i}.t{t}.example.net" for i in range(10)],
    )


def user_rows(rng: random.Random, pools: Pools, u: int, n_dom: int) -> tuple[list[str], list[str]]:
    """One user's (allowed, blocked) entries, 100 in all, the pools' holders noted."""
    picks = (
        rng.sample(pools.addr, PICK_ADDR)
        + rng.sample(pools.dom, PICK_DOM)
        + rng.sample(pools.lists, PICK_LIST)
    )
    block = rng.sample(pools.block, PICK_BLOCK) if u % BLOCKING_USERS == 0 else []
    for e in picks + block:
        pools.holders.setdefault(e, []).append(u)
    own: set[str] = set()
    rr = rng.randrange
    while len(own) < ENTRIES_PER_USER - len(picks) - len(block):
        own.add(f"c{rr(10**6)}@d{rr(n_dom)}.example.com")
    return picks + sorted(own), block


@dataclass
class Message:
    ctx: MessageContext
    users: list[str]
    queries: list[tuple[str, str, str | None, str | None]]  # as the layer asks them
    kind: str


class Messages:
    """Messages of one tenant each: the From authenticated by DMARC, recipients mixed."""

    def __init__(self, rng: random.Random, pools: list[Pools], n_users: int, tenants: int) -> None:
        self.rng, self.pools = rng, pools
        self.n_users, self.tenants = n_users, tenants
        self.settings = config.Settings()
        self.psl = default_psl()

    def make(self, n_rcpt: int) -> Message:
        rng = self.rng
        rr, rnd = rng.randrange, rng.random
        t = rr(self.tenants)
        p = self.pools[t]
        list_entry: str | None = None
        holders: list[int] = []
        r = rnd()
        if r < 0.35:
            kind, e = "user address", p.addr[rr(len(p.addr))]
            sender, holders = e, p.holders.get(e, [])
        elif r < 0.50:
            kind, e = "user domain", p.dom[rr(len(p.dom))]
            sender, holders = f"x{rr(10**6)}{e}", p.holders.get(e, [])
        elif r < 0.60:
            kind, e = "user block", p.block[rr(len(p.block))]
            sender, holders = e, p.holders.get(e, [])
        elif r < 0.70:
            kind = "organisation"
            e = (p.org_allow + p.org_block)[rr(len(p.org_allow) + len(p.org_block))]
            sender = f"x{rr(10**6)}{e}" if e.startswith("@") else e
        elif r < 0.75:
            kind, list_entry = "user list", p.lists[rr(len(p.lists))]
            sender, holders = f"n{rr(10**6)}@u{rr(10**6)}.example.org", p.holders[list_entry]
        else:
            kind = "unknown"
            sender = f"n{rr(10**6)}@u{rr(10**6)}.example.org"
            if rnd() < 0.5:  # a list nobody has: every one of the six probes
                list_entry = f"list:x{rr(10**6)}.lists.example.org"
        if rnd() < 0.2:
            sender = sender.upper()  # folding must still match
        # Half the recipients (when there are that many) hold the sender.
        chosen: list[int] = []
        seen: set[int] = set()
        per_tenant = self.n_users // self.tenants
        while len(chosen) < n_rcpt:
            if holders and rnd() < 0.5:
                u = holders[rr(len(holders))]
            else:
                u = t + self.tenants * rr(per_tenant)
            if u not in seen:
                seen.add(u)
                chosen.append(u)
        users = [user_name(u, self.tenants) for u in chosen]
        domain = sender.rpartition("@")[2].lower()
        dkim = [DkimResult("pass", domain)]
        header = [f"From: Someone <{sender}>\r\n".encode(), b"Subject: hello\r\n"]
        listed = None
        if list_entry is not None:
            listed = list_entry[5:]
            header.append(f"List-Id: A list <{listed}>\r\n".encode())
            dkim.append(DkimResult("pass", listed.split(".", 1)[1]))
        auth = AuthResults(
            dkim=dkim,
            dmarc=DmarcResult("pass", domain, self.psl.privatesuffix(domain) or domain),
            header_from=sender,
        )
        ctx = MessageContext(
            TenantPolicy(tenant_name(t), self.settings),
            "192.0.2.7",
            "mail.example.net",
            sender,
            tuple(users),
            tuple(header),
            [*header, b"\r\n", b"body\r\n"],
            auth=auth,
        )
        org = org_user(tenant_name(t))
        folded = _core.normalize_address(sender)
        queries = [(u, folded, listed, org) for u in users]
        return Message(ctx, users, queries, kind)


# --------------------------------------------------------------------------
# Baselines: the table in pure Python over py-lmdb


class PyMembership:
    """What the layer reads of the core's Membership."""

    __slots__ = ("entry", "scope", "source", "status")

    def __init__(self, status: str, entry: str | None, scope: str | None, source: str | None):
        self.status, self.entry, self.scope, self.source = status, entry, scope, source


UNKNOWN = PyMembership("unknown", None, None, None)


class PyLmdbCommunity:
    """The community table over py-lmdb: keys user \\0 entry, probes in docs/core.md's order."""

    def __init__(self, env: lmdb.Environment, db: Any) -> None:
        self.env, self.db = env, db

    def add_many(self, user: str, entries: Sequence[str], kind: int, source: int, now: int) -> None:
        p = user.lower().encode() + b"\0"
        row = COMM.pack(kind, source, now)
        items = sorted((p + e.lower().encode(), row) for e in entries)
        with self.env.begin(write=True, db=self.db) as txn:
            txn.cursor().putmulti(items)

    @staticmethod
    def probe(
        get: Callable[[bytes], bytes | None],
        user: str,
        sender: str,
        list_id: str | None,
        org: str | None,
    ) -> PyMembership:
        """User address, user domain, user list, org address, org domain, org list."""
        s = sender.lower()
        ents = [s, s[s.rfind("@") :]]
        if list_id is not None:
            ents.append("list:" + list_id.lower())
        enc = [e.encode() for e in ents]
        for scope, who in (("user", user), ("org", org)):
            if who is None:
                continue
            p = who.lower().encode() + b"\0"
            for e, b in zip(ents, enc, strict=True):
                raw = get(p + b)
                if raw is not None:
                    status = "allowed" if raw[0] == 0 else "blocked"
                    return PyMembership(status, e, scope, SOURCES[raw[1]])
        return UNKNOWN

    def member(
        self, user: str, sender: str, list_id: str | None = None, org: str | None = None
    ) -> PyMembership:
        with self.env.begin(db=self.db) as txn:
            return self.probe(txn.get, user, sender, list_id, org)

    def member_many(
        self, queries: Sequence[tuple[str, str, str | None, str | None]]
    ) -> list[PyMembership]:
        probe = self.probe
        with self.env.begin(db=self.db) as txn:
            get = txn.get
            return [probe(get, *q) for q in queries]


class PyCore:
    """Just enough of `Core` for `Community`: its `.community`."""

    def __init__(self, community: PyLmdbCommunity) -> None:
        self.community = community


# --------------------------------------------------------------------------
# Timing and machine state


def read_cpu() -> tuple[int, int]:
    """All cores: (busy, total) jiffies from /proc/stat (busy: not idle, iowait, steal)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6], sum(v[:8])


def busy_share(seconds: float = 0.5) -> float:
    a = read_cpu()
    time.sleep(seconds)  # a measuring window, not a wait for readiness
    b = read_cpu()
    return round((b[0] - a[0]) / max(1, b[1] - a[1]), 3)


def settle(limit: float) -> dict[str, float]:
    """Wait up to `limit` s for the machine to be under 25 % busy; what it was."""
    t0 = time.monotonic()
    busy = busy_share()
    while busy >= 0.25 and time.monotonic() - t0 < limit:
        busy = busy_share()
    return {"busy": busy, "waited_s": round(time.monotonic() - t0, 1)}


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(q * len(s) + 0.999999) - 1))]


@dataclass
class Figure:
    name: str
    rates: list[float] = field(default_factory=list)  # decisions/s per run
    msg_rates: list[float] = field(default_factory=list)
    lat_ns: list[float] = field(default_factory=list)  # per message

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "decisions_per_s": round(statistics.median(self.rates), 1),
            "decisions_per_s_runs": [round(x, 1) for x in self.rates],
            "messages_per_s": round(statistics.median(self.msg_rates), 1),
            "p50_us": round(pct(self.lat_ns, 0.5) / 1e3, 2),
            "p99_us": round(pct(self.lat_ns, 0.99) / 1e3, 2),
            "messages_timed": len(self.lat_ns),
        }


# --------------------------------------------------------------------------
# The run


class Bench:
    def __init__(self, args: argparse.Namespace, work: str) -> None:
        self.a = args
        self.work = work
        self.rng = random.Random(args.seed)
        self.errors: list[str] = []
        self.sizes: dict[str, Any] = {}

    def build(self, core: Any, base: PyLmdbCommunity) -> list[Pools]:
        n_users, rng = self.a.users, self.rng
        tenants = max(1, n_users // USERS_PER_TENANT)
        n_dom = max(1000, n_users * 2)
        pools = [make_pools(t) for t in range(tenants)]
        com, pc = core.community, time.perf_counter
        admin, imp = SOURCES.index("admin"), SOURCES.index("import")
        t_ours = t_base = 0.0
        commits = 0
        log(f"building {n_users:,} users x {ENTRIES_PER_USER} entries ({tenants} tenants)")
        for t, p in enumerate(pools):
            org = org_user(tenant_name(t))
            a = pc()
            com.add_many(org, p.org_allow, "allow", "admin", T0)
            com.add_many(org, p.org_block, "block", "admin", T0)
            b = pc()
            base.add_many(org, p.org_allow, 0, admin, T0)
            base.add_many(org, p.org_block, 1, admin, T0)
            t_ours += b - a
            t_base += pc() - b
            commits += 2
        step = max(1, n_users // 10)
        for u in range(n_users):
            allow, block = user_rows(rng, pools[u % tenants], u, n_dom)
            user = user_name(u, tenants)
            a = pc()
            com.add_many(user, allow, "allow", "import", T0)
            if block:
                com.add_many(user, block, "block", "import", T0)
            b = pc()
            base.add_many(user, allow, 0, imp, T0)
            if block:
                base.add_many(user, block, 1, imp, T0)
            t_ours += b - a
            t_base += pc() - b
            commits += 1 + bool(block)
            if (u + 1) % step == 0:
                log(f"  {u + 1:,}/{n_users:,} users")
        n_ent = n_users * ENTRIES_PER_USER + tenants * (ORG_ALLOW + ORG_BLOCK)
        ok = all(
            com.count(user_name(u, tenants)) == ENTRIES_PER_USER for u in range(0, n_users, 997)
        )
        if not ok:
            self.errors.append("community: a user's entry count is not 100 after the load")
        self.sizes["community"] = {
            "users": n_users,
            "tenants": tenants,
            "entries_per_user": ENTRIES_PER_USER,
            "entries": n_ent,
            "commits": commits,
            "per_user": {
                "popular_addresses": PICK_ADDR,
                "popular_domains": PICK_DOM,
                "lists": PICK_LIST,
                "own_addresses": ENTRIES_PER_USER - PICK_ADDR - PICK_DOM - PICK_LIST,
                "blocked_every_nth_user": [PICK_BLOCK, BLOCKING_USERS],
            },
            "per_tenant_pools": {
                "addresses": POOL_ADDR,
                "domains": POOL_DOM,
                "lists": POOL_LIST,
                "blocked": POOL_BLOCK,
                "org_allow": ORG_ALLOW,
                "org_block": ORG_BLOCK,
            },
        }
        self.load = {
            "ours": {
                "what": "Community.add_many, one call (one commit) per user and kind",
                "seconds": round(t_ours, 2),
                "entries_per_s": round(n_ent / t_ours, 1),
            },
            "baseline": {
                "what": "py-lmdb putmulti, one write txn (one commit) per user and kind",
                "seconds": round(t_base, 2),
                "entries_per_s": round(n_ent / t_base, 1),
            },
            "ratio": round(t_base / t_ours, 2),
        }
        log(
            f"load: ours {t_ours:.1f} s ({n_ent / t_ours:,.0f} entries/s), "
            f"py-lmdb {t_base:.1f} s ({n_ent / t_base:,.0f} entries/s)"
        )
        return pools

    def check(
        self,
        n: int,
        msgs: list[Message],
        ours: Community,
        theirs: Community,
        core: Any,
        base: PyLmdbCommunity,
    ) -> dict[str, Any]:
        """Every message: the two layers' verdicts and the two tables' answers agree."""
        bad = checked = 0
        shares: dict[str, int] = {}
        first: list[str] = []
        for m in msgs:
            a = ours.decide(m.ctx, m.users)
            b = theirs.decide(m.ctx, m.users)
            ca = core.community.member_many(m.queries)
            cb = base.member_many(m.queries)
            for i in range(len(m.users)):
                checked += 1
                shares[a[i].reason] = shares.get(a[i].reason, 0) + 1
                va = (a[i].action, a[i].reason, a[i].detail)
                vb = (b[i].action, b[i].reason, b[i].detail)
                ta = (ca[i].status, ca[i].entry, ca[i].scope, ca[i].source)
                tb = (cb[i].status, cb[i].entry, cb[i].scope, cb[i].source)
                if va != vb or ta != tb:
                    bad += 1
                    if len(first) < 3:
                        first.append(f"{m.queries[i]}: {va} / {vb}; {ta} / {tb}")
        if bad:
            self.errors.append(f"{n} recipients: {bad} of {checked} answers differ")
            for f in first:
                log(f"MISMATCH {f}")
        total = sum(shares.values())
        return {
            "checked": checked,
            "mismatches": bad,
            "verdict_shares": {k: round(v / total, 3) for k, v in sorted(shares.items())},
        }

    def decisions(
        self, core: Any, base: PyLmdbCommunity, pools: list[Pools]
    ) -> list[dict[str, Any]]:
        a = self.a
        tenants = len(pools)
        gen = Messages(self.rng, pools, a.users, tenants)
        ours = Community(core, psl=gen.psl)
        theirs = Community(PyCore(base), psl=gen.psl)  # type: ignore[arg-type]
        cm, bm = core.community, base
        out = []
        for n in RCPTS:
            n_msgs = max(20, a.decisions // n)
            msgs = [gen.make(n) for _ in range(n_msgs)]
            kinds: dict[str, int] = {}
            for m in msgs:
                kinds[m.kind] = kinds.get(m.kind, 0) + 1
            correct = self.check(n, msgs, ours, theirs, core, base)

            def core_lookups(m: Message) -> object:
                q = m.queries
                return cm.member(*q[0]) if len(q) == 1 else cm.member_many(q)

            impls: list[tuple[str, Callable[[Message], object]]] = [
                ("Community.decide (core)", lambda m: ours.decide(m.ctx, m.users)),
                ("Community.decide over py-lmdb", lambda m: theirs.decide(m.ctx, m.users)),
                ("py-lmdb six probes alone", lambda m: bm.member_many(m.queries)),
                ("core lookups alone", core_lookups),
            ]
            figs = [Figure(name) for name, _ in impls]
            idle = settle(min(a.wait_idle, 60.0)) if a.wait_idle else None
            log(f"{n} recipients: {n_msgs:,} messages, {a.repeats} runs each")
            pc = time.perf_counter_ns
            for rep in range(a.repeats + 1):  # the first is a warm-up
                order = list(range(len(impls)))
                if rep % 2:
                    order.reverse()
                for i in order:
                    fn = impls[i][1]
                    lat: list[float] = []
                    gc.collect()
                    gc.disable()
                    try:
                        t0 = pc()
                        for m in msgs:
                            s = pc()
                            fn(m)
                            lat.append(pc() - s)
                        el = pc() - t0
                    finally:
                        gc.enable()
                    if rep:
                        figs[i].rates.append(n_msgs * n / el * 1e9)
                        figs[i].msg_rates.append(n_msgs / el * 1e9)
                        figs[i].lat_ns.extend(lat)
            res = [f.as_json() for f in figs]
            for r in res[1:]:
                r["ratio"] = round(res[0]["decisions_per_s"] / r["decisions_per_s"], 2)
            out.append(
                {
                    "recipients": n,
                    "messages": n_msgs,
                    "message_kinds": {k: round(v / n_msgs, 3) for k, v in sorted(kinds.items())},
                    **correct,
                    "idle_before": idle,
                    "ours": res[0],
                    "baselines": res[1:],
                }
            )
            log(
                f"  ours {res[0]['decisions_per_s']:,.0f} decisions/s, "
                f"py-lmdb layer {res[1]['decisions_per_s']:,.0f}"
            )
        return out

    def release(self, core: Any) -> dict[str, Any]:
        """100 held copies of one sender for one user: on_verified until all are pending."""
        a = self.a
        data_dir = Path(self.work) / "var"
        settings = config.Settings(
            server=config.Server(data_dir=data_dir), domains=config.Domains(local=[LOCAL])
        )
        db = Database.open(data_dir / "kithmail.db")
        db.sync_domains(settings.domains.local)
        spool = Spool(data_dir / "spool")
        q = Quarantine(db, spool, policies=Policies(settings, db.tenant_of))
        user = f"ann@{LOCAL}"
        held_v = Verdict(Layer.COMMUNITY, Action.QUARANTINE, "community.unknown", "unknown")

        def hold(sender: str) -> list[str]:
            qids = []
            for i in range(HELD):
                env = Envelope(
                    received=time.time(),
                    client_ip="192.0.2.7",
                    helo="mail.example.net",
                    mail_from=sender,
                    recipients=(Recipient(user, Outcome.QUARANTINE, (held_v,)),),
                    tenant="default",
                )
                body = (
                    f"From: Pat <{sender}>\r\nSubject: held {i}\r\n"
                    "Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n\r\nbody\r\n"
                ).encode()
                qid = spool.accept_sync(env, body)
                q.index_sync(qid)
                qids.append(qid)
            spool.take_flush_requests_sync()
            return qids

        def verify(qids: list[str], what: str) -> None:
            states = [spool.load_sync(x).recipients[0].state for x in qids]
            flushed = set(spool.take_flush_requests_sync())
            if any(s is not State.PENDING for s in states) or flushed != set(qids):
                self.errors.append(f"release ({what}): not every copy pending and flushed")

        ours: list[float] = []
        floor: list[float] = []
        runs = a.release_runs
        idle = settle(min(a.wait_idle, 60.0)) if a.wait_idle else None
        log(f"release: {runs} runs of {HELD} held messages")
        for r in range(runs + 1):  # the first is a warm-up
            sender = f"pat{r}@sender{r}.example.net"
            qids = hold(sender)
            t0 = time.perf_counter()
            core.community.add(user, sender, "allow", "sav", T0)
            released = q.release_sender_sync(user, sender, actor="sav")
            el = time.perf_counter() - t0
            if len(released) != HELD:
                self.errors.append(f"release: {len(released)} released, not {HELD}")
            verify(qids, "ours")
            if core.community.member(user, sender).status != "allowed":
                self.errors.append("release: the sav entry is not in the community")
            # The floor: the spool's durable part alone, no index, no audit.
            qids = hold(f"floor{r}@sender{r}.example.net")
            t0 = time.perf_counter()
            for x in qids:
                spool.mark_sync(x, 0, State.PENDING, "released from quarantine by sav")
                spool.request_flush_sync(x)
            fl = time.perf_counter() - t0
            verify(qids, "floor")
            if r:
                ours.append(el)
                floor.append(fl)
        db.close()
        om, fm = statistics.median(ours), statistics.median(floor)
        log(f"  ours {om * 1e3:.1f} ms, spool alone {fm * 1e3:.1f} ms")
        return {
            "held": HELD,
            "runs": runs,
            "idle_before": idle,
            "ours": {
                "what": "core.community.add (source sav) + Quarantine.release_sender_sync",
                "median_ms": round(om * 1e3, 2),
                "runs_ms": [round(x * 1e3, 2) for x in ours],
                "per_copy_ms": round(om * 1e3 / HELD, 3),
            },
            "floor": {
                "what": "Spool.mark_sync(PENDING) + request_flush_sync per copy, nothing else",
                "median_ms": round(fm * 1e3, 2),
                "runs_ms": [round(x * 1e3, 2) for x in floor],
                "per_copy_ms": round(fm * 1e3 / HELD, 3),
            },
            "ratio": round(om / fm, 2),
        }

    def run(self) -> dict[str, Any]:
        a = self.a
        background = settle(a.wait_idle) if a.wait_idle else {"busy": busy_share(1.0)}
        log(f"background before the run: {background}")
        core_dir, base_dir = os.path.join(self.work, "core"), os.path.join(self.work, "pylmdb")
        os.makedirs(core_dir)
        os.makedirs(base_dir)
        core = _core.Core(core_dir, map_size=MAP_SIZE)
        env = lmdb.open(base_dir, map_size=MAP_SIZE, max_dbs=2)
        base = PyLmdbCommunity(env, env.open_db(b"community"))
        pools = self.build(core, base)
        decisions = self.decisions(core, base, pools)
        release = self.release(core)
        core.flush()
        core.close()
        env.close()
        return {
            "benchmark": "community",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(self.work),
            "build_profile": a.profile,
            "kithmail": {"module": getattr(_core, "__file__", None)},
            "baselines": {"py-lmdb": getattr(lmdb, "__version__", None)},
            "command": [sys.executable, *sys.argv],
            "quick": a.quick,
            "seed": a.seed,
            "background": background,
            "sizes": {
                **self.sizes,
                "decisions_per_figure_run": a.decisions,
                "repeats": a.repeats,
                "release_runs": a.release_runs,
            },
            "load": self.load,
            "decisions": decisions,
            "release": release,
            "correct": not self.errors,
            "errors": self.errors,
        }


# --------------------------------------------------------------------------
# Output


def print_table(rep: dict[str, Any]) -> None:
    m, s = rep["machine"], rep["sizes"]["community"]
    print(
        f"kithmail community benchmark: {rep['build_profile']} build, {m['cpu']}, "
        f"{m['cores']} cores, {m['python']}, storage {m['storage']['fstype']}"
    )
    ld = rep["load"]
    print(
        f"table: {s['users']:,} users x {s['entries_per_user']} entries ({s['entries']:,}); "
        f"load {ld['ours']['seconds']:.1f} s ({fmt_rate(ld['ours']['entries_per_s'])} entries/s)"
        f", py-lmdb {ld['baseline']['seconds']:.1f} s "
        f"({fmt_rate(ld['baseline']['entries_per_s'])} entries/s)"
    )
    head = ["rcpts", "implementation", "decisions/s", "msgs/s", "p50/msg", "p99/msg", "ratio"]
    rows = []
    for d in rep["decisions"]:
        for i, f in enumerate([d["ours"], *d["baselines"]]):
            rows.append(
                [
                    str(d["recipients"]) if i == 0 else "",
                    f["name"],
                    fmt_rate(f["decisions_per_s"]),
                    fmt_rate(f["messages_per_s"]),
                    fmt_ns(f["p50_us"] * 1e3),
                    fmt_ns(f["p99_us"] * 1e3),
                    f"x{f['ratio']:.2f}" if "ratio" in f else "",
                ]
            )
    widths = [max(len(r[i]) for r in [*rows, head]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 1 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(head))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    for d in rep["decisions"]:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in d["verdict_shares"].items())
        print(f"{d['recipients']:>3} rcpts: {shares}; {d['mismatches']}/{d['checked']} differ")
    r = rep["release"]
    print(
        f"release of {r['held']} held messages (median of {r['runs']}): "
        f"{r['ours']['median_ms']:.1f} ms ({r['ours']['per_copy_ms']:.2f} ms/copy); "
        f"spool alone {r['floor']['median_ms']:.1f} ms; x{r['ratio']:.2f}"
    )
    if rep["errors"]:
        print("ERRORS: " + "; ".join(rep["errors"]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark layer 5 (the community) beside py-lmdb baselines.",
    )
    p.add_argument("--json", metavar="PATH", help="write the results here (atomically)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--users", type=int, help="users in the table (default 100,000; quick 2,000)")
    p.add_argument(
        "--decisions", type=int, help="decisions per timed run (default 100,000; quick 5,000)"
    )
    p.add_argument("--repeats", type=int, help="timed runs per figure (default 5; quick 2)")
    p.add_argument("--release-runs", type=int, help="release runs (default 5; quick 2)")
    p.add_argument("--profile", default="release", help="build profile to record (default release)")
    p.add_argument("--seed", type=int, default=20_240_607, help="data seed")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S s for the machine to be under 25%% busy before the run, "
        "and up to min(S, 60) s before each figure",
    )
    p.add_argument("--dir", help="parent of the temporary directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    a.users = a.users or (2_000 if a.quick else 100_000)
    a.decisions = a.decisions or (5_000 if a.quick else 100_000)
    a.repeats = a.repeats or (2 if a.quick else 5)
    a.release_runs = a.release_runs or (2 if a.quick else 5)
    if a.users < USERS_PER_TENANT:
        p.error(f"--users must be at least {USERS_PER_TENANT}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with workdir("community", args) as work:
        log(f"working in {work}")
        report = Bench(args, work).run()
    return finish(args, report, print_table)


if __name__ == "__main__":
    sys.exit(main())
