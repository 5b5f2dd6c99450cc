"""pyspf's RFC 7208 test suite, through kithmail's SPF adapter and a real DNS server.

Every case of tests/data/rfc7208-tests.yml (the openspf.org suite that
ships with pyspf's sources) is checked by `SpfChecker` — kithmail's
resolver path, pyspf's evaluation — against the zone data of its scenario,
served by Debian's Knot DNS on loopback (tests/spf_suite.py says how the
suite's conventions become zone files). A case passes when the result is
the one the suite prefers (or, where it allows several and says live DNS
may give another, the one listed in SECOND_CHOICE), and, for a `fail`
whose explanation the suite names, when the explanation is that text.

A case that cannot pass here is in EXPECTED, with what it gets instead and
why; those cases are asserted to behave exactly as listed, so the table
fails the moment one starts passing or changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import spf as pyspf
from knot_server import knot_servers
from spf_suite import Case, load, zones

from kithmail.spf import SpfChecker

SUITE_FILE = Path(__file__).parent / "data" / "rfc7208-tests.yml"
# Of test/rfc7208-tests.yml in pyspf-2.0.14.tar.gz, as it was before our header.
SUITE_SHA256 = "901f561a6e2b1c1590a40a61b1ac7601226fd7045a7aae591a4d25421358d6f9"
HEADER_END = b"# ---- the suite as distributed follows ----\n#\n"

SCENARIOS = load(SUITE_FILE)
CASES = [c for s in SCENARIOS for c in s.cases]

# id -> (the result kithmail gets, why it differs from the suite). Empty: every
# case passes, TIMEOUT ones included (tests/spf_suite.py serves them as SERVFAIL).
EXPECTED: dict[str, tuple[str, str]] = {}

# Cases where the suite allows more than one result and live DNS gives its
# second choice, as the suite itself says it may; every other case gets the
# suite's first (preferred) result.
SECOND_CHOICE: dict[str, tuple[str, str]] = {
    "multispf1": (
        "fail",
        "two identical TXT records are one RRset to a real server: Knot serves one",
    ),
    "ptr-limit": (
        "pass",
        "which 10 of the PTR names are looked at depends on their order, which live DNS "
        "does not keep",
    ),
}

# The default explanation of a fail, as the suite's `explanation: DEFAULT` means it.
DEFAULT_EXPLANATION = pyspf.EXPLANATIONS["fail"]


def test_the_vendored_suite_is_the_published_one() -> None:
    data = SUITE_FILE.read_bytes()
    assert HEADER_END in data
    suite = data.split(HEADER_END, 1)[1]
    assert hashlib.sha256(suite).hexdigest() == SUITE_SHA256
    assert len(SCENARIOS) == 16 and len(CASES) == 203


def test_the_exception_tables_name_real_cases() -> None:
    ids = {c.id for c in CASES}
    assert set(EXPECTED) <= ids and set(SECOND_CHOICE) <= ids
    assert len(ids) == len(CASES), "case ids are unique across scenarios"


@pytest.fixture(scope="module")
def server_for(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[int], str]]:
    """The address of the DNS server of a scenario, started when first asked for."""
    running: dict[int, str] = {}
    with knot_servers(tmp_path_factory.mktemp("knot")) as start:

        def address(index: int) -> str:
            if index not in running:
                running[index] = start(zones(SCENARIOS[index])).address
            return running[index]

        yield address


@pytest.mark.parametrize("case", CASES, ids=[f"{c.scenario}-{c.id}" for c in CASES])
def test_rfc7208_case(server_for: Callable[[int], str], case: Case) -> None:
    checker = SpfChecker([server_for(case.scenario)], timeout=2.0)
    got = checker.evaluate_sync(case.host, case.mailfrom, case.helo)
    if case.id in EXPECTED:
        assert got.result == EXPECTED[case.id][0], EXPECTED[case.id][1]
        assert got.result not in case.results
        return
    assert got.result in case.results, f"{case.spec}: {got}"
    if case.id in SECOND_CHOICE:
        assert got.result == SECOND_CHOICE[case.id][0] != case.results[0]
    else:
        assert got.result == case.results[0], f"{case.spec}: {got}"
    if case.explanation is not None and got.result == "fail":
        want = DEFAULT_EXPLANATION if case.explanation == "DEFAULT" else case.explanation
        assert got.explanation == want
