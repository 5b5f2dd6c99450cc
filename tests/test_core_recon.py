"""Recon table (layer 1): the greylisting state machine of docs/core.md.

A small reference model in Python replays the rules of docs/core.md (exempt,
known with a renewal only when it moves the pass by more than a day, new,
too_early, passed, expiry) and a hypothesis state machine drives the real
table and the model with the same checks and clock steps; the direct tests
below pin the edges one by one.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

import kithmail
from kithmail._core import Recon, ReconResult

OpenCore = Callable[..., kithmail.Core]

MAP_SIZE = 256 << 20
DAY = 86_400

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def address(ip: str | bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address as Recon sees it: an IPv4-mapped IPv6 address is IPv4."""
    a = ipaddress.ip_address(ip)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def source(ip: str | bytes, v4: int, v6: int) -> Network:
    a = address(ip)
    return ipaddress.ip_network((a, v4 if a.version == 4 else v6), strict=False)


@dataclass
class Row:
    first_seen: int
    pass_until: int = 0  # 0: has not passed


@dataclass(frozen=True)
class Config:
    ipv4_prefix: int
    ipv6_prefix: int
    min_delay: int
    retry_window: int
    pass_ttl: int


class Model:
    """docs/core.md, Recon, rules 1-5, over masked sources."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rows: dict[Network, Row] = {}
        self.exempt: set[Network] = set()

    def key(self, ip: str | bytes) -> Network:
        return source(ip, self.cfg.ipv4_prefix, self.cfg.ipv6_prefix)

    def is_exempt(self, ip: str | bytes) -> bool:
        a = address(ip)
        return any(a.version == n.version and a in n for n in self.exempt)

    def expired(self, row: Row, now: int) -> bool:
        """A check at `now` would start this row over (answer `new`)."""
        if row.pass_until:
            return row.pass_until <= now
        return now - row.first_seen > self.cfg.retry_window

    def check(self, ip: str | bytes, now: int) -> tuple[str, int, int]:
        """(status, first_seen, pass_until) of a check, updating the model."""
        if self.is_exempt(ip):
            return ("exempt", 0, 0)
        k = self.key(ip)
        row = self.rows.get(k)
        if row is not None and row.pass_until > now:
            renewed = now + self.cfg.pass_ttl
            if renewed - row.pass_until > DAY:
                row.pass_until = renewed
            return ("known", row.first_seen, row.pass_until)
        if row is None or self.expired(row, now):
            self.rows[k] = Row(first_seen=now)
            return ("new", now, 0)
        if now - row.first_seen < self.cfg.min_delay:
            return ("too_early", row.first_seen, 0)
        row.pass_until = now + self.cfg.pass_ttl
        return ("passed", row.first_seen, row.pass_until)

    def live(self, now: int) -> int:
        return sum(not self.expired(r, now) for r in self.rows.values())


def assert_matches(got: ReconResult, want: tuple[str, int, int], what: str) -> None:
    status, first_seen, pass_until = want
    assert (got.status, got.first_seen) == (status, first_seen), what
    if status in ("passed", "known"):
        assert got.pass_until == pass_until, what
    if status == "new":
        assert got.recorded, what


# ---------------------------------------------------------------------------
# The state machine


# IPv4 sources that are one /24, and their IPv4-mapped forms; IPv6 sources in
# one /64, another /64 of the same /48, another /48; packed forms of some.
POOL: list[str | bytes] = [
    "192.0.2.1",
    "192.0.2.200",
    "::ffff:192.0.2.1",
    "::FFFF:192.0.2.200",
    "198.51.100.7",
    "::ffff:198.51.100.7",
    "203.0.113.9",
    "2001:db8:1:2::1",
    "2001:db8:1:2:ffff:ffff:ffff:ffff",
    "2001:db8:1:3::1",
    "2001:DB8:2::1",
    ipaddress.ip_address("192.0.2.1").packed,
    ipaddress.ip_address("::ffff:203.0.113.9").packed,
    ipaddress.ip_address("2001:db8:1:2::77").packed,
]

EXEMPT_POOL = ["198.51.100.0/24", "203.0.113.9/32", "2001:db8:1:3::/64", "2001:db8:2::/48"]

CONFIGS = [
    Config(32, 64, 5, 50, 200),
    Config(24, 64, 5, 50, 200),
    Config(24, 48, 5, 50, 200),
    Config(32, 64, 0, 50, 200),
    # pass_ttl over a day, so that known checks renew the pass.
    Config(24, 64, 5, 50, 100_000),
]

steps = st.one_of(
    st.integers(0, 10),
    st.integers(0, 60),
    st.integers(0, 260),
    st.sampled_from([DAY - 1, DAY, DAY + 1, 13_600, 99_999, 100_000]),
)


class ReconMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kithmail-recon-")
        self.now = 1_700_000_000
        self.core: kithmail.Core | None = None
        self.model = Model(CONFIGS[0])

    @initialize(
        cfg=st.sampled_from(CONFIGS),
        window=st.sampled_from([0, 100, 60_000]),
    )
    def open(self, cfg: Config, window: int) -> None:
        self.model = Model(cfg)
        self.core = kithmail.Core(
            self.dir,
            map_size=MAP_SIZE,
            ipv4_prefix=cfg.ipv4_prefix,
            ipv6_prefix=cfg.ipv6_prefix,
            min_delay=cfg.min_delay,
            retry_window=cfg.retry_window,
            pass_ttl=cfg.pass_ttl,
            commit_window_ms=window,
        )

    @property
    def recon(self) -> Recon:
        assert self.core is not None
        return self.core.recon

    @rule(step=steps)
    def advance(self, step: int) -> None:
        self.now += step

    @rule(ip=st.sampled_from(POOL))
    def check(self, ip: str | bytes) -> None:
        want = self.model.check(ip, self.now)
        assert_matches(self.recon.check(ip, self.now), want, f"check({ip!r}, {self.now})")

    @rule(ip=st.sampled_from(POOL))
    def peek(self, ip: str | bytes) -> None:
        # What check would answer, on a copy of the model: peek records nothing.
        want = copy.deepcopy(self.model).check(ip, self.now)
        assert_matches(self.recon.peek(ip, self.now), want, f"peek({ip!r}, {self.now})")

    @rule(ips=st.lists(st.sampled_from(POOL), min_size=1, max_size=5))
    def check_many(self, ips: list[str | bytes]) -> None:
        # One address per masked source here: the order of answers for two
        # attempts of one source in one batch is its own test below.
        unique: dict[Network, str | bytes] = {}
        for ip in ips:
            unique.setdefault(self.model.key(ip), ip)
        batch = list(unique.values())
        got = self.recon.check_many(batch, self.now)
        assert len(got) == len(batch)
        for ip, r in zip(batch, got, strict=True):
            assert_matches(r, self.model.check(ip, self.now), f"check_many: {ip!r} at {self.now}")

    @rule(ip=st.sampled_from(POOL))
    def show(self, ip: str | bytes) -> None:
        k = self.model.key(ip)
        row = self.model.rows.get(k)
        entry = self.recon.show(ip)
        if row is None:
            assert entry is None
        elif not self.model.expired(row, self.now):
            assert entry is not None
            assert ipaddress.ip_network(entry.network) == k
            assert (entry.first_seen, entry.pass_until) == (row.first_seen, row.pass_until)

    @rule()
    def flush(self) -> None:
        assert self.core is not None
        self.core.flush()
        assert len(self.recon) == len(self.model.rows)

    def forget_swept(self) -> None:
        """Drop from the model the expired rows a partial sweep removed."""
        for k, row in list(self.model.rows.items()):
            if (
                self.model.expired(row, self.now)
                and self.recon.show(str(k.network_address)) is None
            ):
                del self.model.rows[k]

    @rule(limit=st.sampled_from([1, 2, 3]))
    def sweep_a_little(self, limit: int) -> None:
        assert self.core is not None
        self.core.flush()
        r = self.recon.sweep(self.now, limit)
        assert r.removed <= r.scanned
        # Rows a check would still answer from must all survive.
        assert len(self.recon) >= self.model.live(self.now)
        self.forget_swept()

    @rule()
    def sweep_all(self) -> None:
        assert self.core is not None
        self.core.flush()
        # From wherever the cursor stands, two full-size calls cover every row.
        for _ in range(2):
            self.recon.sweep(self.now, 10_000)
        live = self.model.live(self.now)
        assert len(self.recon) == live
        self.model.rows = {
            k: r for k, r in self.model.rows.items() if not self.model.expired(r, self.now)
        }

    @rule(net=st.sampled_from(EXEMPT_POOL))
    def toggle_exempt(self, net: str) -> None:
        n = ipaddress.ip_network(net)
        if n in self.model.exempt:
            assert self.recon.exempt_remove(net) is True
            self.model.exempt.discard(n)
        else:
            assert self.recon.exempt_add(net) is True
            self.model.exempt.add(n)
        got = {ipaddress.ip_network(s) for s in self.recon.exempt_list()}
        assert got == self.model.exempt

    @rule()
    def reopen(self) -> None:
        assert self.core is not None
        self.core.close()
        self.core = None
        cfg = self.model.cfg
        self.core = kithmail.Core(
            self.dir,
            map_size=MAP_SIZE,
            ipv4_prefix=cfg.ipv4_prefix,
            ipv6_prefix=cfg.ipv6_prefix,
            min_delay=cfg.min_delay,
            retry_window=cfg.retry_window,
            pass_ttl=cfg.pass_ttl,
            commit_window_ms=60_000,
        )

    def teardown(self) -> None:
        if self.core is not None:
            self.core.close()
        shutil.rmtree(self.dir, ignore_errors=True)


ReconMachine.TestCase.settings = settings(
    # The explain phase alone can outlast the per-test timeout on a failure.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestReconModel = ReconMachine.TestCase


# ---------------------------------------------------------------------------
# The cycle, edge by edge (min_delay 5, retry_window 50, pass_ttl 200)


def test_cycle_new_too_early_passed_known_expired(core: kithmail.Core) -> None:
    r = core.recon.check("192.0.2.1", 1000)
    assert (r.status, r.first_seen, r.recorded) == ("new", 1000, True)
    r = core.recon.check("192.0.2.1", 1004)
    assert (r.status, r.first_seen) == ("too_early", 1000)
    r = core.recon.check("192.0.2.1", 1005)
    assert (r.status, r.first_seen, r.pass_until) == ("passed", 1000, 1205)
    r = core.recon.check("192.0.2.1", 1204)
    assert (r.status, r.first_seen, r.pass_until) == ("known", 1000, 1205)
    r = core.recon.check("192.0.2.1", 1205)
    assert (r.status, r.first_seen) == ("new", 1205)


def test_too_early_never_moves_first_seen(core: kithmail.Core) -> None:
    core.recon.check("192.0.2.1", 0)
    for t in range(1, 5):
        r = core.recon.check("192.0.2.1", t)
        assert (r.status, r.first_seen) == ("too_early", 0)
    assert core.recon.check("192.0.2.1", 5).status == "passed"


def test_retry_window_is_inclusive(core: kithmail.Core) -> None:
    core.recon.check("192.0.2.1", 100)
    core.recon.check("192.0.2.2", 100)
    r = core.recon.check("192.0.2.1", 150)
    assert (r.status, r.first_seen) == ("passed", 100)
    r = core.recon.check("192.0.2.2", 151)
    assert (r.status, r.first_seen) == ("new", 151)
    r = core.recon.check("192.0.2.2", 156)
    assert (r.status, r.first_seen) == ("passed", 151)


def test_known_renews_only_when_it_moves_more_than_a_day(open_core: OpenCore) -> None:
    core = open_core(pass_ttl=3 * DAY)
    core.recon.check("192.0.2.1", 0)
    r = core.recon.check("192.0.2.1", 10)
    assert (r.status, r.pass_until) == ("passed", 10 + 3 * DAY)
    r = core.recon.check("192.0.2.1", 10 + DAY)
    assert (r.status, r.pass_until) == ("known", 10 + 3 * DAY)
    assert core.recon.show("192.0.2.1") is not None
    r = core.recon.check("192.0.2.1", 10 + DAY + 1)
    assert (r.status, r.first_seen, r.pass_until) == ("known", 0, 11 + 4 * DAY)
    entry = core.recon.show("192.0.2.1")
    assert entry is not None
    assert entry.pass_until == 11 + 4 * DAY
    core.flush()
    entry = core.recon.show("192.0.2.1")
    assert entry is not None
    assert entry.pass_until == 11 + 4 * DAY


@pytest.mark.parametrize("window", [0, 60_000])
def test_expired_pass_starts_over_across_commits(open_core: OpenCore, window: int) -> None:
    """After a pass expires the source is new, and its retry passes again.

    A commit between the two (the group-commit thread, or flush) must not
    bring the expired pass back.
    """
    core = open_core(commit_window_ms=window)
    core.recon.check("192.0.2.1", 0)
    assert core.recon.check("192.0.2.1", 10).status == "passed"  # pass_until 210
    core.flush()
    r = core.recon.check("192.0.2.1", 300)
    assert (r.status, r.first_seen) == ("new", 300)
    core.flush()
    entry = core.recon.show("192.0.2.1")
    assert entry is not None
    assert (entry.first_seen, entry.pass_until) == (300, 0)
    r = core.recon.check("192.0.2.1", 310)
    assert (r.status, r.first_seen) == ("passed", 300)


def test_min_delay_zero_passes_the_next_attempt(open_core: OpenCore) -> None:
    core = open_core(min_delay=0)
    assert core.recon.check("192.0.2.1", 7).status == "new"
    r = core.recon.check("192.0.2.1", 7)
    assert (r.status, r.first_seen) == ("passed", 7)


def test_configure_changes_timings_in_place(core: kithmail.Core) -> None:
    core.recon.configure(min_delay=20)
    core.recon.check("192.0.2.1", 0)
    assert core.recon.check("192.0.2.1", 19).status == "too_early"
    assert core.recon.check("192.0.2.1", 20).status == "passed"
    core.recon.configure(retry_window=30, pass_ttl=1000)
    core.recon.check("192.0.2.2", 0)
    assert core.recon.check("192.0.2.2", 31).status == "new"
    r = core.recon.check("192.0.2.2", 51)
    assert (r.status, r.pass_until) == ("passed", 1051)
    with pytest.raises(kithmail.InvalidInputError, match="min_delay"):
        core.recon.configure(min_delay=31)


# ---------------------------------------------------------------------------
# Sources: masking, IPv4-mapped, packed


def test_ipv4_prefix_24_makes_one_source(open_core: OpenCore) -> None:
    core = open_core(ipv4_prefix=24)
    assert core.recon.check("192.0.2.1", 0).status == "new"
    r = core.recon.check("192.0.2.200", 5)
    assert (r.status, r.first_seen) == ("passed", 0)
    assert core.recon.check("192.0.2.99", 6).status == "known"
    assert core.recon.check("192.0.3.1", 6).status == "new"
    assert len(core.recon) == 2
    entry = core.recon.show("192.0.2.255")
    assert entry is not None
    assert ipaddress.ip_network(entry.network) == ipaddress.ip_network("192.0.2.0/24")


def test_ipv4_prefix_32_keeps_addresses_apart(core: kithmail.Core) -> None:
    core.recon.check("192.0.2.1", 0)
    assert core.recon.check("192.0.2.2", 5).status == "new"
    entry = core.recon.show("192.0.2.1")
    assert entry is not None
    assert ipaddress.ip_network(entry.network) == ipaddress.ip_network("192.0.2.1/32")


def test_ipv6_sources_are_masked_to_64(core: kithmail.Core) -> None:
    assert core.recon.check("2001:db8:1:2::1", 0).status == "new"
    r = core.recon.check("2001:db8:1:2:ffff:ffff:ffff:ffff", 5)
    assert (r.status, r.first_seen) == ("passed", 0)
    assert core.recon.check("2001:db8:1:3::1", 5).status == "new"
    entry = core.recon.show("2001:db8:1:2:abcd::")
    assert entry is not None
    assert ipaddress.ip_network(entry.network) == ipaddress.ip_network("2001:db8:1:2::/64")
    assert len(core.recon) == 2


def test_ipv6_prefix_48(open_core: OpenCore) -> None:
    core = open_core(ipv6_prefix=48)
    core.recon.check("2001:db8:1:2::1", 0)
    assert core.recon.check("2001:db8:1:ffff::1", 5).status == "passed"
    assert core.recon.check("2001:db8:2::1", 5).status == "new"


def test_ipv4_mapped_is_the_ipv4_address(core: kithmail.Core) -> None:
    assert core.recon.check("::ffff:192.0.2.1", 0).status == "new"
    r = core.recon.check("192.0.2.1", 5)
    assert (r.status, r.first_seen) == ("passed", 0)
    assert core.recon.check(bytes([192, 0, 2, 1]), 6).status == "known"
    mapped = ipaddress.ip_address("::ffff:192.0.2.1").packed
    assert len(mapped) == 16
    assert core.recon.check(mapped, 6).status == "known"
    assert core.recon.check("::FFFF:c000:201", 6).status == "known"
    assert len(core.recon) == 1
    entry = core.recon.show("::ffff:192.0.2.1")
    assert entry is not None
    assert ipaddress.ip_network(entry.network) == ipaddress.ip_network("192.0.2.1/32")


def test_packed_ipv6(core: kithmail.Core) -> None:
    packed = ipaddress.ip_address("2001:db8::1").packed
    core.recon.check(packed, 0)
    assert core.recon.check("2001:db8::2", 5).status == "passed"


def test_ipv6_new_sources_are_capped_per_48(open_core: OpenCore) -> None:
    core = open_core(ipv6_new_per_48=3)
    got = [core.recon.check(f"2001:db8:7:{i}::1", 0) for i in range(5)]
    assert [(r.status, r.recorded) for r in got] == [("new", True)] * 3 + [("new", False)] * 2
    # The refused ones were not remembered: their retry is deferred again.
    assert core.recon.check("2001:db8:7:0::1", 5).status == "passed"
    assert core.recon.check("2001:db8:7:4::1", 5).status == "new"
    assert core.recon.show("2001:db8:7:4::1") is None
    # Another /48 and IPv4 are not affected.
    assert core.recon.check("2001:db8:8::1", 5).recorded
    assert core.recon.check("192.0.2.1", 5).recorded
    assert len(core.recon) == 5


# ---------------------------------------------------------------------------
# Batches


def test_check_many_equals_sequential_checks(open_core: OpenCore, tmp_path: Path) -> None:
    ips: list[str | bytes] = [
        "192.0.2.200",
        "2001:db8::1",
        "192.0.2.1",
        "::ffff:192.0.2.1",
        "198.51.100.1",
        "2001:db8::2",
    ]
    a = open_core(tmp_path / "a", ipv4_prefix=24)
    b = open_core(tmp_path / "b", ipv4_prefix=24)
    for now in (0, 3, 5, 6, 300):
        many = a.recon.check_many(ips, now)
        one = [b.recon.check(ip, now) for ip in ips]
        assert [(r.status, r.first_seen, r.pass_until) for r in many] == [
            (r.status, r.first_seen, r.pass_until) for r in one
        ], f"at {now}"


def test_check_many_empty(core: kithmail.Core) -> None:
    assert core.recon.check_many([], 0) == []


# ---------------------------------------------------------------------------
# Exempt networks


def test_exempt_networks(core: kithmail.Core) -> None:
    assert core.recon.exempt_add("198.51.100.0/24") is True
    assert core.recon.exempt_add("198.51.100.0/24") is False
    assert core.recon.exempt_add("2001:db8:e::/48") is True
    assert {ipaddress.ip_network(n) for n in core.recon.exempt_list()} == {
        ipaddress.ip_network("198.51.100.0/24"),
        ipaddress.ip_network("2001:db8:e::/48"),
    }
    for ip in ("198.51.100.0", "198.51.100.255", "::ffff:198.51.100.7", "2001:db8:e:ffff::1"):
        r = core.recon.check(ip, 0)
        assert (r.status, r.first_seen) == ("exempt", 0), ip
    # Nothing written for an exempt source.
    assert len(core.recon) == 0
    assert core.recon.show("198.51.100.7") is None
    # Neighbours are not exempt.
    assert core.recon.check("198.51.101.0", 0).status == "new"
    assert core.recon.check("198.51.99.255", 0).status == "new"
    assert core.recon.check("2001:db8:f::1", 0).status == "new"

    assert core.recon.exempt_remove("198.51.100.0/24") is True
    assert core.recon.exempt_remove("198.51.100.0/24") is False
    assert core.recon.check("198.51.100.7", 0).status == "new"
    assert [ipaddress.ip_network(n) for n in core.recon.exempt_list()] == [
        ipaddress.ip_network("2001:db8:e::/48")
    ]


def test_exempt_nested_networks_removing_the_outer_keeps_the_inner(core: kithmail.Core) -> None:
    core.recon.exempt_add("10.0.0.0/8")
    core.recon.exempt_add("10.1.0.0/16")
    core.recon.exempt_remove("10.0.0.0/8")
    assert core.recon.check("10.1.2.3", 0).status == "exempt"
    assert core.recon.check("10.2.0.0", 0).status == "new"


def test_exempt_ipv6_network_does_not_cover_ipv4(core: kithmail.Core) -> None:
    core.recon.exempt_add("::/0")
    assert core.recon.check("2001:db8::1", 0).status == "exempt"
    assert core.recon.check("192.0.2.1", 0).status == "new"


def test_exempt_survives_reopen(open_core: OpenCore, core_path: Path) -> None:
    core = open_core()
    core.recon.exempt_add("192.0.2.0/24")
    core.close()
    del core
    again = open_core()
    assert again.recon.check("192.0.2.9", 0).status == "exempt"


# ---------------------------------------------------------------------------
# Pending deferrals


def test_pending_keeps_the_first_deferral_within_the_window(core: kithmail.Core) -> None:
    assert core.recon.pending_get("example.com", "ann@example.test", 100) is None
    core.recon.pending_add("example.com", "ann@example.test", 100)
    core.recon.pending_add("example.com", "ann@example.test", 120)
    assert core.recon.pending_get("example.com", "ann@example.test", 120) == 100
    assert core.recon.pending_get("example.com", "ann@example.test", 150) == 100
    assert core.recon.pending_get("example.com", "ann@example.test", 151) is None
    # Other keys are apart.
    assert core.recon.pending_get("example.com", "bob@example.test", 120) is None
    assert core.recon.pending_get("example.org", "ann@example.test", 120) is None
    core.flush()
    assert core.recon.pending_get("example.com", "ann@example.test", 149) == 100


@pytest.mark.parametrize("flush_between", [False, True])
def test_pending_starts_over_after_expiry(open_core: OpenCore, flush_between: bool) -> None:
    core = open_core(commit_window_ms=60_000)
    core.recon.pending_add("example.com", "ann@example.test", 0)
    if flush_between:
        core.flush()
    assert core.recon.pending_get("example.com", "ann@example.test", 100) is None
    core.recon.pending_add("example.com", "ann@example.test", 100)
    assert core.recon.pending_get("example.com", "ann@example.test", 101) == 100
    core.flush()
    assert core.recon.pending_get("example.com", "ann@example.test", 101) == 100


def test_pending_is_swept(core: kithmail.Core) -> None:
    core.recon.pending_add("example.com", "ann@example.test", 0)
    core.flush()
    core.recon.sweep(10, 10_000)
    assert core.recon.pending_get("example.com", "ann@example.test", 10) == 0
    core.recon.sweep(51, 10_000)
    assert core.recon.pending_get("example.com", "ann@example.test", 50) is None


# ---------------------------------------------------------------------------
# Sweep


def test_sweep_removes_expired_rows_and_keeps_live_ones(core: kithmail.Core) -> None:
    r = core.recon
    r.check("192.0.2.1", 0)  # new, never retried: expired after 50
    r.check("192.0.2.2", 0)
    r.check("192.0.2.2", 10)  # passed: pass_until 210
    r.check("192.0.2.3", 100)  # new at 100: live until 150
    r.check("192.0.2.4", 0)
    r.check("192.0.2.4", 5)  # passed: pass_until 205
    core.flush()
    assert len(r) == 4
    res = r.sweep(120, 10_000)
    assert (res.scanned, res.removed, res.wrapped) == (4, 1, True)
    assert len(r) == 3
    assert r.show("192.0.2.1") is None
    res = r.sweep(206, 10_000)
    assert (res.removed, len(r)) == (2, 1)  # .3 (no retry by 150) and .4 (pass ended 205)
    assert r.show("192.0.2.2") is not None
    assert r.check("192.0.2.2", 206).status == "known"
    res = r.sweep(210, 10_000)
    assert (res.removed, len(r)) == (1, 0)


def test_sweep_is_incremental_and_resumes(core: kithmail.Core) -> None:
    for i in range(10):
        core.recon.check(f"192.0.2.{i}", 0)
    for i in range(5):
        core.recon.check(f"192.0.2.{i}", 5)  # these five pass
    core.flush()
    removed, calls = 0, 0
    while True:
        res = core.recon.sweep(60, 3)
        calls += 1
        assert res.scanned <= 3
        removed += res.removed
        if res.wrapped:
            break
        assert calls < 10
    assert removed == 5
    assert len(core.recon) == 5
    assert all(core.recon.check(f"192.0.2.{i}", 60).status == "known" for i in range(5))


# ---------------------------------------------------------------------------
# Durability and group commit


def test_unflushed_rows_are_seen_at_once_in_the_same_process(open_core: OpenCore) -> None:
    core = open_core(commit_window_ms=60_000)
    core.recon.check("192.0.2.1", 0)
    core.recon.check("2001:db8::1", 0)
    assert len(core.recon) == 2
    entry = core.recon.show("192.0.2.1")
    assert entry is not None
    assert entry.first_seen == 0
    r = core.recon.check("192.0.2.1", 3)
    assert (r.status, r.first_seen) == ("too_early", 0)
    assert core.recon.check("2001:db8::1", 5).status == "passed"
    assert core.recon.check("2001:db8::1", 6).status == "known"


def test_flush_then_reopen_sees_the_rows(open_core: OpenCore) -> None:
    core = open_core(commit_window_ms=60_000)
    core.recon.check("192.0.2.1", 0)
    core.recon.check("192.0.2.2", 0)
    core.recon.check("192.0.2.2", 5)
    core.recon.check("2001:db8::1", 0)
    core.flush()
    core.close()
    del core
    again = open_core(commit_window_ms=60_000)
    assert len(again.recon) == 3
    r = again.recon.check("192.0.2.1", 6)
    assert (r.status, r.first_seen) == ("passed", 0)
    assert again.recon.check("192.0.2.2", 6).status == "known"
    assert again.recon.check("2001:db8::1", 1).status == "too_early"


def test_close_commits_the_buffer(open_core: OpenCore) -> None:
    core = open_core(commit_window_ms=60_000)
    core.recon.check("192.0.2.1", 0)
    core.close()
    del core
    again = open_core()
    assert again.recon.check("192.0.2.1", 5).status == "passed"


def test_a_closed_core_refuses_calls(core: kithmail.Core) -> None:
    core.close()
    with pytest.raises(kithmail.CoreError, match="closed"):
        core.recon.check("192.0.2.1", 0)
    core.close()  # twice is fine


def test_reopen_needs_the_closed_core_dropped(open_core: OpenCore, core_path: Path) -> None:
    first = open_core()
    first.recon.check("192.0.2.1", 0)
    first.close()
    with pytest.raises(kithmail.StorageError, match="still referenced") as e:
        open_core()
    assert str(core_path) in str(e.value)
    del first
    second = open_core()
    assert second.recon.check("192.0.2.1", 5).status == "passed"


def test_path_and_stats(core: kithmail.Core, core_path: Path) -> None:
    assert Path(core.path).resolve() == core_path.resolve()
    stats = core.stats()
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in stats.items())


# ---------------------------------------------------------------------------
# Malformed input: a clear exception naming the value, never a crash


def names(msg: str, value: str) -> bool:
    """Does an error message name `value` (or the start of a huge one)?"""
    if value == "":
        return "''" in msg or '""' in msg
    head = value[:20]
    return any(form in msg for form in (head, head.replace("\x00", "\\0"), repr(head)[1:-1]))


BAD_IPS = [
    "",
    "1.2.3",
    "300.1.1.1",
    "1.2.3.4.5",
    "::gg",
    "1.2.3.4/24",
    "2001:db8::/64",
    " 192.0.2.1",
    "192.0.2.1\x00",
    "localhost",
    "1" * 1_000_000,
]


@pytest.mark.parametrize("ip", BAD_IPS, ids=lambda s: repr(s[:20]))
def test_bad_ip_strings(core: kithmail.Core, ip: str) -> None:
    calls = [
        lambda: core.recon.check(ip, 0),
        lambda: core.recon.check_many(["192.0.2.1", ip], 0),
        lambda: core.recon.show(ip),
        lambda: core.reputation.lookup(ip),
        lambda: core.reputation.lookup_many([ip]),
        lambda: core.reputation.record(ip, "spam", 0),
        lambda: core.reputation.counters(ip),
    ]
    for call in calls:
        with pytest.raises(kithmail.InvalidInputError) as e:
            call()
        assert isinstance(e.value, ValueError)
        msg = str(e.value)
        assert names(msg, ip), msg[:200]
        assert len(msg) < 1000
    # Nothing was recorded by the failed batch.
    assert len(core.recon) == 0


@pytest.mark.parametrize("packed", [b"", b"\x01", b"\x01\x02\x03", b"\x01" * 5, b"\x01" * 17])
def test_bad_packed_ips(core: kithmail.Core, packed: bytes) -> None:
    for call in (
        lambda: core.recon.check(packed, 0),
        lambda: core.recon.show(packed),
        lambda: core.reputation.lookup(packed),
    ):
        with pytest.raises(kithmail.InvalidInputError, match=rf"\b{len(packed)} octets"):
            call()


BAD_CIDRS = [
    "10.0.0.0/33",
    "10.0.0.1/8",
    "::/129",
    "2001:db8::1/32",
    "10.0.0.0/",
    "10.0.0.0/-1",
    "10.0.0.0/8/8",
    "/8",
    "",
    "10.0.0.0/08x",
    "10.0.0.0/8\x00",
    "1" * 1_000_000,
]


@pytest.mark.parametrize("cidr", BAD_CIDRS, ids=lambda s: repr(s[:20]))
def test_bad_cidrs(core: kithmail.Core, cidr: str) -> None:
    for call in (
        lambda: core.recon.exempt_add(cidr),
        lambda: core.recon.exempt_remove(cidr),
        lambda: core.reputation.load("feed", "block", ["192.0.2.0/24", cidr]),
    ):
        with pytest.raises(kithmail.InvalidInputError) as e:
            call()
        msg = str(e.value)
        assert names(msg, cidr), msg[:200]
        assert len(msg) < 1000
    assert core.recon.exempt_list() == []
    assert core.reputation.lists() == []


def test_host_bits_set_are_refused(core: kithmail.Core) -> None:
    with pytest.raises(kithmail.InvalidInputError, match=re.escape("10.0.0.1/8")):
        core.recon.exempt_add("10.0.0.1/8")


@pytest.mark.parametrize("part", ["", "a\x00b", "x" * 1_000_000])
def test_bad_pending_keys(core: kithmail.Core, part: str) -> None:
    for call in (
        lambda: core.recon.pending_add(part, "ann@example.test", 0),
        lambda: core.recon.pending_add("example.com", part, 0),
        lambda: core.recon.pending_get(part, "ann@example.test", 0),
    ):
        with pytest.raises(kithmail.InvalidInputError) as e:
            call()
        assert names(str(e.value), part)
        assert len(str(e.value)) < 1000


def test_wrong_types_raise_type_error(core: kithmail.Core) -> None:
    r = core.recon
    with pytest.raises(TypeError):
        r.check(3221225985, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        r.check(None, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        r.check("192.0.2.1", "0")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        r.check("192.0.2.1", 1.5)  # type: ignore[arg-type]
    # A str or bytes is iterable, but one address is not a batch of them.
    with pytest.raises(TypeError, match="sequence of addresses"):
        r.check_many("192.0.2.1", 0)
    with pytest.raises(TypeError, match="sequence of addresses"):
        core.reputation.lookup_many(b"\xc0\x00\x02\x01")
    with pytest.raises(TypeError):
        r.check_many(["192.0.2.1", 7], 0)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        r.exempt_add(b"10.0.0.0/8")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        r.configure(min_delay="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        kithmail.Core(7)  # type: ignore[arg-type]
    assert len(r) == 0


@pytest.mark.parametrize("now", [-1, 2**64, -(2**70)])
def test_out_of_range_times(core: kithmail.Core, now: int) -> None:
    with pytest.raises((OverflowError, ValueError)):
        core.recon.check("192.0.2.1", now)
    with pytest.raises((OverflowError, ValueError)):
        core.recon.sweep(now)
    assert len(core.recon) == 0


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"ipv4_prefix": 33}, "ipv4_prefix"),
        ({"ipv4_prefix": 0}, "ipv4_prefix"),
        ({"ipv6_prefix": 129}, "ipv6_prefix"),
        ({"ipv6_prefix": 0}, "ipv6_prefix"),
        ({"min_delay": 100, "retry_window": 50}, "min_delay"),
    ],
)
def test_bad_core_settings(core_path: Path, kw: dict[str, int], word: str) -> None:
    with pytest.raises(kithmail.InvalidInputError, match=word):
        kithmail.Core(str(core_path), map_size=MAP_SIZE, **kw)  # type: ignore[arg-type]


def test_other_prefix_lengths_are_refused(open_core: OpenCore) -> None:
    core = open_core(ipv4_prefix=24, ipv6_prefix=64)
    core.recon.check("192.0.2.1", 0)
    core.close()
    del core
    with pytest.raises(kithmail.ConfigMismatchError, match="ipv4_prefix") as e:
        open_core(ipv4_prefix=32)
    assert isinstance(e.value, kithmail.CoreError)
    assert "24" in str(e.value)
    with pytest.raises(kithmail.ConfigMismatchError, match="ipv6_prefix"):
        open_core(ipv4_prefix=24, ipv6_prefix=48)
    # Timings are not part of the environment: other values open fine.
    again = open_core(ipv4_prefix=24, min_delay=1, retry_window=10, pass_ttl=20)
    assert again.recon.check("192.0.2.9", 1).status == "passed"


def test_none_adopts_the_stored_prefix_lengths(open_core: OpenCore) -> None:
    core = open_core(ipv4_prefix=24, ipv6_prefix=48)
    core.recon.check("192.0.2.1", 0)
    core.recon.check("2001:db8:1:2::1", 0)
    core.close()
    del core
    again = open_core(ipv4_prefix=None, ipv6_prefix=None)
    assert again.recon.check("192.0.2.77", 5).status == "passed"
    assert again.recon.check("2001:db8:1:ffff::1", 5).status == "passed"
    again.close()
    del again
    with pytest.raises(kithmail.ConfigMismatchError, match="ipv6_prefix"):
        open_core(ipv4_prefix=None, ipv6_prefix=64)


def test_other_prefix_lengths_are_refused_while_open(open_core: OpenCore) -> None:
    open_core(ipv4_prefix=24)
    with pytest.raises(kithmail.ConfigMismatchError, match="ipv4_prefix"):
        open_core(ipv4_prefix=32)
