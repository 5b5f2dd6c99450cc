"""Community table (layer 5): each user's allowed and blocked senders.

`member` probes user address, user @domain, user list:, then the org's
address, @domain, list:, and the first match decides (docs/core.md). The
order is checked against a reference over every combination of present,
allowed and blocked entries; folding (case, IDN) and the bookkeeping calls
are checked directly.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import kithmail
from kithmail._core import Membership, normalize_address, normalize_entry

OpenCore = Callable[..., kithmail.Core]

MAP_SIZE = 256 << 20
USER = "ann@example.test"
ORG = "tenant:example.test"
SOURCES = ["outbound", "sav", "manual", "import", "admin", "journal"]

# The six probes in docs/core.md order: (scope, entry matching the sender).
SLOTS = [
    ("user", "bob@example.com"),
    ("user", "@example.com"),
    ("user", "list:news.example.org"),
    ("org", "bob@example.com"),
    ("org", "@example.com"),
    ("org", "list:news.example.org"),
]
# Entries that match nothing asked below.
DECOYS = ["carol@example.com", "@example.net", "list:other.example.org", "bob@example.co"]


def m(x: Membership) -> tuple[str, str | None, str | None, str | None]:
    return (x.status, x.entry, x.scope, x.source)


def case_variants(s: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(s), max_size=len(s)).map(
        lambda ups: "".join(c.upper() if u else c for c, u in zip(s, ups, strict=True))
    )


slot_state = st.one_of(
    st.none(), st.tuples(st.sampled_from(["allow", "block"]), st.sampled_from(SOURCES))
)


@settings(
    max_examples=200,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    slots=st.lists(slot_state, min_size=6, max_size=6),
    decoys=st.lists(
        st.tuples(
            st.sampled_from(["user", "org"]),
            st.sampled_from(DECOYS),
            st.sampled_from(["allow", "block"]),
        ),
        max_size=4,
    ),
    sender=case_variants("bob@example.com"),
    with_list=st.booleans(),
    with_org=st.booleans(),
)
def test_first_match_decides_in_order(
    slots: list[tuple[str, str] | None],
    decoys: list[tuple[str, str, str]],
    sender: str,
    with_list: bool,
    with_org: bool,
) -> None:
    d = tempfile.mkdtemp(prefix="kithmail-community-")
    core = kithmail.Core(d, map_size=MAP_SIZE)
    try:
        c = core.community
        for scope, entry, kind in decoys:
            c.add(USER if scope == "user" else ORG, entry, kind, "manual", 1)  # type: ignore[arg-type]
        for (scope, entry), state in zip(SLOTS, slots, strict=True):
            if state is not None:
                kind, src = state
                c.add(USER if scope == "user" else ORG, entry, kind, src, 2)  # type: ignore[arg-type]
        want: tuple[str, str | None, str | None, str | None] = ("unknown", None, None, None)
        for (scope, entry), state in zip(SLOTS, slots, strict=True):
            if state is None:
                continue
            if entry.startswith("list:") and not with_list:
                continue
            if scope == "org" and not with_org:
                continue
            kind, src = state
            want = ("allowed" if kind == "allow" else "blocked", entry, scope, src)
            break
        got = c.member(
            USER,
            sender,
            "news.example.org" if with_list else None,
            ORG if with_org else None,
        )
        assert m(got) == want
    finally:
        core.close()
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------
# Direct cases


def test_unknown_without_entries(core: kithmail.Core) -> None:
    assert m(core.community.member(USER, "bob@example.com")) == ("unknown", None, None, None)


def test_user_block_beats_org_allow(core: kithmail.Core) -> None:
    c = core.community
    c.add(ORG, "@example.com", "allow", "admin")
    c.add(USER, "bob@example.com", "block", "manual")
    assert m(c.member(USER, "bob@example.com", None, ORG)) == (
        "blocked",
        "bob@example.com",
        "user",
        "manual",
    )
    assert m(c.member(USER, "eve@example.com", None, ORG)) == (
        "allowed",
        "@example.com",
        "org",
        "admin",
    )
    # Without the org, the org's entries are not consulted.
    assert c.member(USER, "eve@example.com").status == "unknown"


def test_user_domain_block_beats_org_address_allow(core: kithmail.Core) -> None:
    c = core.community
    c.add(ORG, "bob@example.com", "allow", "admin")
    c.add(USER, "@example.com", "block", "manual")
    assert c.member(USER, "bob@example.com", None, ORG).status == "blocked"


def test_user_address_allow_beats_user_domain_block(core: kithmail.Core) -> None:
    c = core.community
    c.add(USER, "@example.com", "block")
    c.add(USER, "bob@example.com", "allow", "outbound")
    assert m(c.member(USER, "bob@example.com")) == (
        "allowed",
        "bob@example.com",
        "user",
        "outbound",
    )
    assert c.member(USER, "eve@example.com").status == "blocked"


def test_list_entries_match_only_with_a_list_id(core: kithmail.Core) -> None:
    c = core.community
    c.add(USER, "list:news.example.org", "allow", "manual")
    assert c.member(USER, "editor@example.org").status == "unknown"
    assert c.member(USER, "editor@example.org", "news.example.org").status == "allowed"
    assert c.member(USER, "editor@example.org", "other.example.org").status == "unknown"


def test_users_are_apart(core: kithmail.Core) -> None:
    core.community.add(USER, "bob@example.com")
    assert core.community.member("joe@example.test", "bob@example.com").status == "unknown"
    assert core.community.count("joe@example.test") == 0
    assert core.community.list("joe@example.test") == []


def test_local_part_is_case_insensitive(core: kithmail.Core) -> None:
    c = core.community
    c.add(USER, "Bob.Smith@Example.COM")
    for sender in ("bob.smith@example.com", "BOB.SMITH@EXAMPLE.COM", "bOb.SmItH@eXaMpLe.CoM"):
        r = c.member(USER, sender)
        assert (r.status, r.entry) == ("allowed", "bob.smith@example.com"), sender
    assert [e.entry for e in c.list(USER)] == ["bob.smith@example.com"]
    assert c.add(USER, "BOB.SMITH@example.com") is False
    assert c.count(USER) == 1


def test_non_ascii_local_part_folds(core: kithmail.Core) -> None:
    core.community.add(USER, "jörg@example.com")
    assert core.community.member(USER, "JÖRG@example.com").status == "allowed"


def test_idn_domains_compare_in_a_label_form(core: kithmail.Core) -> None:
    c = core.community
    c.add(USER, "@bücher.example", "allow", "manual")
    assert [e.entry for e in c.list(USER)] == ["@xn--bcher-kva.example"]
    for sender in ("anna@bücher.example", "anna@xn--bcher-kva.example", "Anna@BÜCHER.example"):
        r = c.member(USER, sender)
        assert (r.status, r.entry) == ("allowed", "@xn--bcher-kva.example"), sender
    c.add(USER, "max@xn--mller-kva.example", "block")
    assert c.member(USER, "Max@müller.example").status == "blocked"
    assert c.remove(USER, "@XN--BCHER-KVA.example") is True
    assert c.member(USER, "anna@bücher.example").status == "unknown"


def test_normalize() -> None:
    assert normalize_address("Bob@Example.COM") == "bob@example.com"
    assert normalize_address("Anna@Bücher.Example") == "anna@xn--bcher-kva.example"
    assert normalize_entry("@Bücher.Example") == "@xn--bcher-kva.example"
    assert normalize_entry("Bob@Example.COM") == "bob@example.com"
    assert normalize_entry("list:news.example.org") == "list:news.example.org"
    with pytest.raises(kithmail.InvalidInputError, match="no-at-sign"):
        normalize_address("no-at-sign")


def test_add_remove_list_count(core: kithmail.Core) -> None:
    c = core.community
    assert c.add(USER, "bob@example.com", "allow", "outbound", 10) is True
    assert c.add(USER, "bob@example.com", "allow", "outbound", 10) is False
    assert c.add(USER, "@example.net", "block", "sav", 12) is True
    assert c.add(USER, "list:news.example.org", "allow", "journal", 13) is True
    assert c.count(USER) == 3
    got = sorted((e.entry, e.kind, e.source, e.added) for e in c.list(USER))
    assert got == [
        ("@example.net", "block", "sav", 12),
        ("bob@example.com", "allow", "outbound", 10),
        ("list:news.example.org", "allow", "journal", 13),
    ]
    assert c.remove(USER, "BOB@example.com") is True
    assert c.remove(USER, "bob@example.com") is False
    assert c.count(USER) == 2
    assert c.member(USER, "bob@example.com").status == "unknown"
    assert c.member(USER, "x@example.net").status == "blocked"


def test_add_many(core: kithmail.Core) -> None:
    c = core.community
    entries = [f"user{i}@example.com" for i in range(500)] + ["@example.org"]
    assert c.add_many(USER, entries, "allow", "import", 7) == 501
    assert c.count(USER) == 501
    # Entries already there (in any case) are not added twice.
    more = (e.upper() for e in ["user1@example.com", "new@example.com"])
    assert c.add_many(USER, more, "allow", "import", 7) == 1
    assert c.count(USER) == 502
    r = c.member(USER, "user499@example.com")
    assert m(r) == ("allowed", "user499@example.com", "user", "import")
    assert {e.added for e in c.list(USER) if e.entry.startswith("user")} == {7}


def test_add_many_with_a_bad_entry_adds_nothing(core: kithmail.Core) -> None:
    with pytest.raises(kithmail.InvalidInputError, match="not an entry"):
        core.community.add_many(USER, ["ok@example.com", "not an entry"])
    assert core.community.count(USER) == 0


def test_member_many_equals_member(core: kithmail.Core) -> None:
    c = core.community
    c.add(USER, "bob@example.com", "allow", "outbound")
    c.add(USER, "@spam.example", "block", "manual")
    c.add(ORG, "@example.com", "block", "admin")
    c.add(ORG, "list:news.example.org", "allow", "admin")
    queries: list[tuple[str, str, str | None, str | None]] = [
        (USER, "bob@example.com", None, None),
        (USER, "eve@example.com", None, ORG),
        (USER, "eve@example.com", None, None),
        (USER, "x@spam.example", "news.example.org", ORG),
        (USER, "x@lists.example.org", "news.example.org", ORG),
        ("joe@example.test", "bob@example.com", None, ORG),
    ]
    many = c.member_many(queries)
    assert [m(x) for x in many] == [m(c.member(*q)) for q in queries]
    assert [x.status for x in many] == [
        "allowed",
        "blocked",
        "unknown",
        "blocked",
        "allowed",
        "blocked",
    ]
    assert c.member_many([]) == []


def test_community_writes_commit_at_once(open_core: OpenCore) -> None:
    core = open_core(commit_window_ms=60_000)
    core.community.add(USER, "bob@example.com")
    again_path = core.path
    core.close()
    del core
    again = open_core(again_path)
    assert again.community.member(USER, "bob@example.com").status == "allowed"


# ---------------------------------------------------------------------------
# Malformed input


def names(msg: str, value: str) -> bool:
    """Does an error message name `value` (or the start of a huge one)?"""
    if value == "":
        return "''" in msg or '""' in msg
    head = value[:20]
    return any(form in msg for form in (head, head.replace("\x00", "\\0"), repr(head)[1:-1]))


@pytest.mark.parametrize("user", ["", "ann\x00@example.test", "x" * 1_000_000])
def test_bad_user(core: kithmail.Core, user: str) -> None:
    for call in (
        lambda: core.community.add(user, "bob@example.com"),
        lambda: core.community.member(user, "bob@example.com"),
        lambda: core.community.list(user),
        lambda: core.community.count(user),
    ):
        with pytest.raises(kithmail.InvalidInputError) as e:
            call()
        assert "user" in str(e.value)
        assert names(str(e.value), user), str(e.value)[:200]
        assert len(str(e.value)) < 1000


@pytest.mark.parametrize(
    "entry",
    ["", "@", "bob@", "bob", "list:", "bob@@example.com", "bob\x00@example.com", "b" * 1_000_000],
)
def test_bad_entry(core: kithmail.Core, entry: str) -> None:
    with pytest.raises(kithmail.InvalidInputError) as e:
        core.community.add(USER, entry)
    msg = str(e.value)
    assert len(msg) < 1000
    # "@" and "list:" name the empty domain or List-Id after the prefix.
    assert names(msg, entry) or names(msg, entry.removeprefix("list:").removeprefix("@")), msg
    assert core.community.count(USER) == 0


@pytest.mark.parametrize("sender", ["bob", "bob@", "@example.com", "x" * 1_000_000 + "@a.example"])
def test_bad_sender(core: kithmail.Core, sender: str) -> None:
    with pytest.raises(kithmail.InvalidInputError) as e:
        core.community.member(USER, sender)
    assert len(str(e.value)) < 1000
    assert names(str(e.value), sender), str(e.value)[:200]


def test_bad_kind_and_source(core: kithmail.Core) -> None:
    with pytest.raises(kithmail.InvalidInputError, match="maybe"):
        core.community.add(USER, "bob@example.com", "maybe")  # type: ignore[arg-type]
    with pytest.raises(kithmail.InvalidInputError, match="rumour"):
        core.community.add(USER, "bob@example.com", "allow", "rumour")  # type: ignore[arg-type]
    assert core.community.count(USER) == 0


def test_wrong_types(core: kithmail.Core) -> None:
    c = core.community
    with pytest.raises(TypeError):
        c.add(1, "bob@example.com")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        c.add(USER, b"bob@example.com")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        c.member(USER, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        c.add_many(USER, ["ok@example.com", 5])  # type: ignore[list-item]
    with pytest.raises((TypeError, ValueError)):  # a short tuple does not unpack
        c.member_many([(USER, "bob@example.com")])  # type: ignore[list-item]
    assert c.count(USER) == 0
