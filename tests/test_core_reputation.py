"""Reputation table (layer 2): allow/block prefix lists and event counters.

The longest-prefix match is checked against a reference built on the
`ipaddress` module: random nested and overlapping prefixes of both families,
queried at every interval edge (network address, broadcast address, one
below, one above) and at random addresses.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

import kithmail
from kithmail._core import RepMatch, Reputation

OpenCore = Callable[..., kithmail.Core]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

MAP_SIZE = 256 << 20
MAPPED = ipaddress.ip_network("::ffff:0:0/96")


@dataclass(frozen=True)
class ListSpec:
    name: str
    kind: str
    action: str
    score: int
    prefixes: frozenset[Network]


def address(ip: str | bytes) -> Address:
    a = ipaddress.ip_address(ip)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


def expected(lists: Iterable[ListSpec], ip: str) -> set[tuple[str, str, str, int, str]]:
    """Every answer the rules of docs/core.md allow; empty means None.

    Any allow match wins; otherwise the longest matching block prefix across
    all block lists (a tie between lists may be answered by either).
    """
    a = address(ip)
    matches = [
        (spec, n) for spec in lists for n in spec.prefixes if n.version == a.version and a in n
    ]
    allow = [m for m in matches if m[0].kind == "allow"]
    if allow:
        chosen = allow
    else:
        if not matches:
            return set()
        longest = max(n.prefixlen for _, n in matches)
        chosen = [m for m in matches if m[1].prefixlen == longest]
    return {(s.kind, s.name, s.action, s.score, str(n)) for s, n in chosen}


def answer(m: RepMatch | None) -> tuple[str, str, str, int, str] | None:
    if m is None:
        return None
    return (m.kind, m.list, m.action, m.score, m.prefix)


def edges(n: Network) -> list[str]:
    """The addresses where a prefix's interval begins and ends, and next door."""
    top = 2**32 - 1 if n.version == 4 else 2**128 - 1
    lo, hi = int(n.network_address), int(n.broadcast_address)
    cls = ipaddress.IPv4Address if n.version == 4 else ipaddress.IPv6Address
    return [str(cls(x)) for x in {lo, hi, max(lo - 1, 0), min(hi + 1, top)}]


def assert_lookups(rep: Reputation, lists: Iterable[ListSpec], queries: list[str]) -> None:
    lists = list(lists)
    many = rep.lookup_many(queries)
    assert len(many) == len(queries)
    for q, m in zip(queries, many, strict=True):
        one = rep.lookup(q)
        assert answer(m) == answer(one), f"lookup_many differs from lookup for {q}"
        want = expected(lists, q)
        if not want:
            assert one is None, f"{q}: want no match, got {answer(one)}"
        else:
            assert answer(one) in want, f"{q}: want one of {sorted(want)}, got {answer(one)}"


def queries_for(lists: Iterable[ListSpec], extra: Iterable[str]) -> list[str]:
    qs: list[str] = list(extra)
    for spec in lists:
        for n in spec.prefixes:
            qs.extend(edges(n))
    # Every IPv4 query also in its IPv4-mapped IPv6 form.
    qs += [f"::ffff:{q}" for q in qs if ":" not in q]
    return qs


# ---------------------------------------------------------------------------
# Strategies: prefixes dense enough to nest and overlap

V4_ANCHORS = [0, int(ipaddress.ip_address("10.0.0.0")), int(ipaddress.ip_address("192.0.2.0"))]
V6_ANCHORS = [
    0,
    int(ipaddress.ip_address("2001:db8::")),
    int(ipaddress.ip_address("2001:db8:ffff:ffff::")),
    2**128 - 2**64,
]


def near(anchors: list[int], bits: int) -> st.SearchStrategy[int]:
    offset = st.integers(0, bits).flatmap(lambda b: st.integers(0, 2**b - 1))
    return st.one_of(
        st.integers(0, 2**bits - 1),
        st.tuples(st.sampled_from(anchors), offset).map(lambda t: (t[0] + t[1]) % 2**bits),
        st.sampled_from([0, 2**bits - 1]),
    )


def v4_net(addr: int, plen: int) -> Network:
    return ipaddress.ip_network((addr, plen), strict=False)


def v6_net(addr: int, plen: int) -> Network:
    return ipaddress.ip_network((ipaddress.IPv6Address(addr), plen), strict=False)


def not_mapped(n: Network) -> bool:
    # An IPv6 prefix inside ::ffff:0:0/96 is an IPv4 prefix in disguise.
    return not (n.version == 6 and n.prefixlen >= 96 and n.subnet_of(MAPPED))  # type: ignore[arg-type]


def chains(addrs: st.SearchStrategy[int], maxlen: int, mk: Callable[[int, int], Network]):  # type: ignore[no-untyped-def]
    """Single prefixes, and nested chains of prefixes of one address."""
    lens = st.one_of(st.integers(0, maxlen), st.sampled_from([0, maxlen]))
    return st.tuples(addrs, st.lists(lens, min_size=1, max_size=5)).map(
        lambda t: [mk(t[0], plen) for plen in t[1]]
    )


v4_prefixes = chains(near(V4_ANCHORS, 32), 32, v4_net)
v6_prefixes = chains(near(V6_ANCHORS, 128), 128, v6_net)

prefix_sets = st.lists(st.one_of(v4_prefixes, v6_prefixes), max_size=6).map(
    lambda groups: frozenset(n for g in groups for n in g if not_mapped(n))
)

names = st.sampled_from(["drop", "edrop", "local", "partners"])
kinds = st.sampled_from(["allow", "block", "block"])
actions = st.sampled_from(["reject", "defer", "tag"])
scores = st.integers(-100, 100)

random_queries = st.lists(
    st.one_of(
        near(V4_ANCHORS, 32).map(lambda a: str(ipaddress.IPv4Address(a))),
        near(V6_ANCHORS, 128).map(lambda a: str(ipaddress.IPv6Address(a))),
    ),
    max_size=20,
)


def specs_strategy() -> st.SearchStrategy[list[ListSpec]]:
    spec = st.builds(ListSpec, names, kinds, actions, scores, prefix_sets)
    return st.lists(spec, max_size=4, unique_by=lambda s: s.name)


def load(rep: Reputation, spec: ListSpec, now: int = 0) -> int:
    return rep.load(
        spec.name,
        spec.kind,  # type: ignore[arg-type]
        [str(n) for n in spec.prefixes],
        action=spec.action,
        score=spec.score,
        now=now,
    )


class TempCore:
    """A Core in a temporary directory, for one hypothesis example."""

    def __enter__(self) -> kithmail.Core:
        self.dir = tempfile.mkdtemp(prefix="kithmail-rep-")
        self.core = kithmail.Core(self.dir, map_size=MAP_SIZE)
        return self.core

    def __exit__(self, *exc: object) -> None:
        self.core.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# No explain phase: on a failure it alone can outlast the per-test timeout.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]


@settings(
    max_examples=150,
    deadline=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(specs=specs_strategy(), extra=random_queries)
def test_lookup_is_the_longest_prefix_match(specs: list[ListSpec], extra: list[str]) -> None:
    with TempCore() as core:
        for spec in specs:
            assert load(core.reputation, spec) == len(spec.prefixes)
        assert_lookups(core.reputation, specs, queries_for(specs, extra))


class ReputationMachine(RuleBasedStateMachine):
    """Loads replace a named list, drops remove it; lookups follow the model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kithmail-rep-")
        self.core = kithmail.Core(self.dir, map_size=MAP_SIZE)
        self.lists: dict[str, ListSpec] = {}
        self.seen: set[Network] = set()  # every prefix ever loaded

    @initialize()
    def start(self) -> None:
        assert self.core.reputation.lists() == []

    @rule(
        name=names,
        kind=kinds,
        action=actions,
        score=scores,
        prefixes=prefix_sets,
        now=st.integers(0, 2**40),
    )
    def load(
        self, name: str, kind: str, action: str, score: int, prefixes: frozenset[Network], now: int
    ) -> None:
        spec = ListSpec(name, kind, action, score, prefixes)
        assert load(self.core.reputation, spec, now) == len(prefixes)
        self.lists[name] = spec
        self.seen |= prefixes
        got = {rl.name: rl for rl in self.core.reputation.lists()}
        rl = got[name]
        assert (rl.kind, rl.action, rl.score, rl.prefixes, rl.loaded_at) == (
            kind,
            action,
            score,
            len(prefixes),
            now,
        )

    @rule(name=names)
    def drop(self, name: str) -> None:
        assert self.core.reputation.drop(name) is (name in self.lists)
        self.lists.pop(name, None)
        assert sorted(rl.name for rl in self.core.reputation.lists()) == sorted(self.lists)

    @rule(extra=random_queries)
    def lookups(self, extra: list[str]) -> None:
        # Old lists' prefixes too: whatever was replaced or dropped is gone.
        old = ListSpec("", "block", "", 0, frozenset(self.seen))
        assert_lookups(
            self.core.reputation,
            self.lists.values(),
            queries_for([*self.lists.values(), old], extra),
        )

    def teardown(self) -> None:
        self.core.close()
        shutil.rmtree(self.dir, ignore_errors=True)


ReputationMachine.TestCase.settings = settings(
    phases=PHASES,
    max_examples=60,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestReputationModel = ReputationMachine.TestCase


# ---------------------------------------------------------------------------
# Direct cases


def test_nested_prefixes_in_one_list(core: kithmail.Core) -> None:
    rep = core.reputation
    rep.load("drop", "block", ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32"])
    cases = {
        "10.1.2.3": "10.1.2.3/32",
        "10.1.2.4": "10.1.2.0/24",
        "10.1.2.2": "10.1.2.0/24",
        "10.1.2.255": "10.1.2.0/24",
        "10.1.3.0": "10.1.0.0/16",
        "10.1.1.255": "10.1.0.0/16",
        "10.2.0.0": "10.0.0.0/8",
        "10.0.0.0": "10.0.0.0/8",
        "10.255.255.255": "10.0.0.0/8",
    }
    for ip, prefix in cases.items():
        m = rep.lookup(ip)
        assert m is not None, ip
        assert (m.kind, m.list, m.prefix) == ("block", "drop", prefix), ip
    assert rep.lookup("9.255.255.255") is None
    assert rep.lookup("11.0.0.0") is None


def test_allow_beats_a_longer_block(core: kithmail.Core) -> None:
    rep = core.reputation
    rep.load("drop", "block", ["192.0.2.0/24", "2001:db8::/32"], action="reject", score=10)
    rep.load("partners", "allow", ["192.0.0.0/16", "2001:db8:1::/48"], action="accept")
    m = rep.lookup("192.0.2.7")
    assert m is not None
    assert (m.kind, m.list, m.action, m.prefix) == ("allow", "partners", "accept", "192.0.0.0/16")
    m = rep.lookup("2001:db8:1::5")
    assert m is not None
    assert (m.kind, m.list, m.prefix) == ("allow", "partners", "2001:db8:1::/48")
    m = rep.lookup("2001:db8:2::5")
    assert m is not None
    assert (m.kind, m.list, m.action, m.score, m.prefix) == (
        "block",
        "drop",
        "reject",
        10,
        "2001:db8::/32",
    )


def test_longest_block_across_lists(core: kithmail.Core) -> None:
    rep = core.reputation
    rep.load("wide", "block", ["10.0.0.0/8", "0.0.0.0/0"], action="tag", score=1)
    rep.load("narrow", "block", ["10.1.0.0/16"], action="defer", score=5)
    rep.load("host", "block", ["10.1.2.3/32"], action="reject", score=9)
    got = {ip: answer(rep.lookup(ip)) for ip in ("10.1.2.3", "10.1.2.4", "10.2.0.0", "8.8.8.8")}
    assert got == {
        "10.1.2.3": ("block", "host", "reject", 9, "10.1.2.3/32"),
        "10.1.2.4": ("block", "narrow", "defer", 5, "10.1.0.0/16"),
        "10.2.0.0": ("block", "wide", "tag", 1, "10.0.0.0/8"),
        "8.8.8.8": ("block", "wide", "tag", 1, "0.0.0.0/0"),
    }
    assert rep.lookup("2001:db8::1") is None


def test_ipv6_zero_prefix_does_not_match_ipv4(core: kithmail.Core) -> None:
    core.reputation.load("v6all", "block", ["::/0"])
    m = core.reputation.lookup("2001:db8::1")
    assert m is not None
    assert m.prefix == "::/0"
    assert core.reputation.lookup("192.0.2.1") is None
    assert core.reputation.lookup("::ffff:192.0.2.1") is None


def test_host_routes_and_full_ranges(core: kithmail.Core) -> None:
    rep = core.reputation
    rep.load("v4", "block", ["255.255.255.255/32", "0.0.0.0/32"])
    rep.load("v6", "block", ["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", "::/128"])
    assert answer(rep.lookup("255.255.255.255")) == (
        "block",
        "v4",
        "reject",
        0,
        "255.255.255.255/32",
    )
    assert rep.lookup("255.255.255.254") is None
    assert answer(rep.lookup("0.0.0.0")) == ("block", "v4", "reject", 0, "0.0.0.0/32")
    m = rep.lookup("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
    assert m is not None
    assert m.prefix == "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"
    m = rep.lookup("::")
    assert m is not None
    assert m.prefix == "::/128"
    assert rep.lookup("::1") is None


def test_lookup_accepts_packed_and_mapped_addresses(core: kithmail.Core) -> None:
    core.reputation.load("drop", "block", ["192.0.2.0/24", "2001:db8::/32"])
    for ip in (
        "::ffff:192.0.2.9",
        bytes([192, 0, 2, 9]),
        ipaddress.ip_address("::ffff:192.0.2.9").packed,
    ):
        m = core.reputation.lookup(ip)
        assert m is not None, ip
        assert m.prefix == "192.0.2.0/24"
    m = core.reputation.lookup(ipaddress.ip_address("2001:db8::9").packed)
    assert m is not None
    assert m.prefix == "2001:db8::/32"


def test_load_replaces_the_list(core: kithmail.Core) -> None:
    rep = core.reputation
    assert rep.load("feed", "block", ["10.0.0.0/8", "192.0.2.0/24"], score=3, now=100) == 2
    assert rep.load("other", "block", ["172.16.0.0/12"]) == 1
    assert rep.load("feed", "block", ["198.51.100.0/24"], action="defer", score=4, now=200) == 1
    assert rep.lookup("10.1.1.1") is None
    assert rep.lookup("192.0.2.1") is None
    assert answer(rep.lookup("198.51.100.1")) == ("block", "feed", "defer", 4, "198.51.100.0/24")
    assert answer(rep.lookup("172.16.0.1")) == ("block", "other", "reject", 0, "172.16.0.0/12")
    lists = {rl.name: rl for rl in rep.lists()}
    assert set(lists) == {"feed", "other"}
    feed = lists["feed"]
    assert (feed.kind, feed.action, feed.score, feed.prefixes, feed.loaded_at) == (
        "block",
        "defer",
        4,
        1,
        200,
    )
    assert feed.intervals >= 1


def test_intervals_count_the_flattened_prefixes(core: kithmail.Core) -> None:
    core.reputation.load("n", "block", ["10.0.0.0/8", "10.1.0.0/16"])
    (rl,) = core.reputation.lists()
    # 10.0.0.0-10.0.255.255, 10.1.0.0/16, 10.2.0.0-10.255.255.255
    assert (rl.prefixes, rl.intervals) == (2, 3)


def test_a_failed_load_keeps_the_old_list(core: kithmail.Core) -> None:
    rep = core.reputation
    rep.load("feed", "block", ["10.0.0.0/8"])
    with pytest.raises(kithmail.InvalidInputError, match=re.escape("10.0.0.0/33")):
        rep.load("feed", "block", ["192.0.2.0/24", "10.0.0.0/33"])
    assert answer(rep.lookup("10.1.1.1")) == ("block", "feed", "reject", 0, "10.0.0.0/8")
    assert rep.lookup("192.0.2.1") is None
    with pytest.raises(kithmail.InvalidInputError, match=re.escape("10.0.0.1/8")):
        rep.load("new", "block", ["10.0.0.1/8"])
    assert [rl.name for rl in rep.lists()] == ["feed"]


def test_load_an_empty_list(core: kithmail.Core) -> None:
    assert core.reputation.load("empty", "block", []) == 0
    assert core.reputation.lookup("192.0.2.1") is None
    assert [rl.prefixes for rl in core.reputation.lists()] == [0]


def test_load_takes_any_iterable(core: kithmail.Core) -> None:
    gen = (f"10.{i}.0.0/16" for i in range(256))
    assert core.reputation.load("gen", "block", gen) == 256
    m = core.reputation.lookup("10.200.1.1")
    assert m is not None
    assert m.prefix == "10.200.0.0/16"


def test_drop(core: kithmail.Core) -> None:
    rep = core.reputation
    rep.load("a", "block", ["10.0.0.0/8"])
    rep.load("b", "allow", ["10.1.0.0/16"])
    assert rep.drop("b") is True
    assert rep.drop("b") is False
    assert answer(rep.lookup("10.1.0.1")) == ("block", "a", "reject", 0, "10.0.0.0/8")
    assert rep.drop("a") is True
    assert rep.lookup("10.1.0.1") is None
    assert rep.lists() == []


def test_lists_survive_reopen(open_core: OpenCore) -> None:
    core = open_core()
    core.reputation.load("feed", "block", ["10.0.0.0/8"], action="defer", score=2, now=5)
    core.close()
    del core
    again = open_core()
    assert answer(again.reputation.lookup("10.0.0.1")) == (
        "block",
        "feed",
        "defer",
        2,
        "10.0.0.0/8",
    )
    assert [(rl.name, rl.loaded_at) for rl in again.reputation.lists()] == [("feed", 5)]


def test_load_file(core: kithmail.Core, tmp_path: Path) -> None:
    f = tmp_path / "drop.txt"
    f.write_text("10.0.0.0/8\n192.0.2.0/24\n2001:db8::/32\n")
    assert core.reputation.load_file("drop", "block", str(f), action="reject", score=7) == 3
    assert answer(core.reputation.lookup("192.0.2.4")) == (
        "block",
        "drop",
        "reject",
        7,
        "192.0.2.0/24",
    )
    m = core.reputation.lookup("2001:db8::4")
    assert m is not None
    assert m.prefix == "2001:db8::/32"


def test_load_file_missing(core: kithmail.Core, tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(kithmail.CoreError, match=re.escape("nope.txt")):
        core.reputation.load_file("drop", "block", str(missing))
    assert core.reputation.lists() == []


def test_lookup_many_equals_lookup(core: kithmail.Core) -> None:
    core.reputation.load("a", "block", ["10.0.0.0/8", "2001:db8::/32"])
    core.reputation.load("b", "allow", ["10.9.0.0/16"])
    ips: list[str | bytes] = [
        "10.0.0.1",
        "10.9.9.9",
        "11.0.0.0",
        "2001:db8::1",
        bytes([10, 9, 0, 1]),
        "::ffff:10.0.0.1",
    ]
    many = core.reputation.lookup_many(ips)
    assert [answer(m) for m in many] == [answer(core.reputation.lookup(ip)) for ip in ips]
    assert [m is None for m in many] == [False, False, True, False, False, False]
    assert core.reputation.lookup_many([]) == []


# ---------------------------------------------------------------------------
# Event counters


def test_counters_per_address_and_per_24(core: kithmail.Core) -> None:
    rep = core.reputation
    rep.record("192.0.2.1", "spam", 100)
    rep.record("192.0.2.1", "spam", 101)
    rep.record("192.0.2.2", "spam", 102, n=3)
    rep.record("192.0.3.1", "spam", 103)
    rep.record("::ffff:192.0.2.1", "ham", 104)
    assert rep.counters("192.0.2.1") == {"spam": (2, 5), "ham": (1, 1)}
    assert rep.counters("192.0.2.2") == {"spam": (3, 5), "ham": (0, 1)}
    assert rep.counters("192.0.2.200") == {"spam": (0, 5), "ham": (0, 1)}
    assert rep.counters("192.0.3.1") == {"spam": (1, 1)}
    assert rep.counters("198.51.100.1") == {}


def test_counters_per_address_and_per_48(core: kithmail.Core) -> None:
    rep = core.reputation
    rep.record("2001:db8:1:2::1", "virus", 10)
    rep.record("2001:db8:1:ffff::1", "virus", 11, n=2)
    rep.record("2001:db8:2::1", "virus", 12)
    assert rep.counters("2001:db8:1:2::1") == {"virus": (1, 3)}
    assert rep.counters(ipaddress.ip_address("2001:db8:1:ffff::1").packed) == {"virus": (2, 3)}
    assert rep.counters("2001:db8:1::") == {"virus": (0, 3)}
    assert rep.counters("2001:db8:2::1") == {"virus": (1, 1)}


def test_counters_survive_flush_and_reopen(open_core: OpenCore) -> None:
    core = open_core(commit_window_ms=60_000)
    core.reputation.record("192.0.2.1", "spam", 1)
    assert core.reputation.counters("192.0.2.1") == {"spam": (1, 1)}
    core.flush()
    core.reputation.record("192.0.2.1", "spam", 2)
    assert core.reputation.counters("192.0.2.1") == {"spam": (2, 2)}
    core.flush()
    core.close()
    del core
    again = open_core()
    assert again.reputation.counters("192.0.2.1") == {"spam": (2, 2)}


# ---------------------------------------------------------------------------
# Malformed input


def names_value(msg: str, value: str) -> bool:
    if value == "":
        return "''" in msg or '""' in msg
    head = value[:20]
    return any(form in msg for form in (head, head.replace("\x00", "\\0"), repr(head)[1:-1]))


@pytest.mark.parametrize("name", ["", "a\x00b", "n" * 1_000_000])
def test_bad_list_names(core: kithmail.Core, name: str) -> None:
    for call in (
        lambda: core.reputation.load(name, "block", ["10.0.0.0/8"]),
        lambda: core.reputation.drop(name),
    ):
        with pytest.raises(kithmail.InvalidInputError) as e:
            call()
        assert names_value(str(e.value), name), str(e.value)[:200]
        assert len(str(e.value)) < 1000
    assert core.reputation.lists() == []


@pytest.mark.parametrize("event", ["", "sp\x00am", "e" * 1_000_000])
def test_bad_event_names(core: kithmail.Core, event: str) -> None:
    with pytest.raises(kithmail.InvalidInputError) as e:
        core.reputation.record("192.0.2.1", event, 0)
    assert names_value(str(e.value), event), str(e.value)[:200]
    assert len(str(e.value)) < 1000
    assert core.reputation.counters("192.0.2.1") == {}


def test_bad_kind(core: kithmail.Core) -> None:
    with pytest.raises(kithmail.InvalidInputError, match="grey"):
        core.reputation.load("feed", "grey", ["10.0.0.0/8"])  # type: ignore[arg-type]
    assert core.reputation.lists() == []


def test_reputation_wrong_types(core: kithmail.Core) -> None:
    rep = core.reputation
    with pytest.raises(TypeError):
        rep.load("feed", "block", ["10.0.0.0/8", 167772160])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        rep.load("feed", "block", 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        rep.load(5, "block", ["10.0.0.0/8"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        rep.lookup(167772161)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        rep.lookup_many([None])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        rep.record("10.0.0.1", 5, 0)  # type: ignore[arg-type]
    assert rep.lists() == []


def test_load_file_rejects_a_bad_line(core: kithmail.Core, tmp_path: Path) -> None:
    f = tmp_path / "feed.txt"
    f.write_text("10.0.0.0/8\n10.0.0.0/33\n")
    with pytest.raises(kithmail.InvalidInputError, match=re.escape("10.0.0.0/33")):
        core.reputation.load_file("feed", "block", str(f))
    assert core.reputation.lists() == []
