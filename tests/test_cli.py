"""The `kith` console script, run for real against a temporary data directory.

Each test runs the installed script (``.venv/bin/kith``) as a subprocess, as
an operator would, and checks what it prints, its exit status and the state
it leaves in the core (read back through ``kithmail.Core`` in this process).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kith_cli import Kith, Run, run_kith

import kithmail
from kithmail import Core

DAY = 86400


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fields(out: str) -> dict[str, str]:
    """``recon show``'s "name  value" lines as a dict."""
    result = {}
    for line in out.splitlines():
        name, _, value = line.partition("  ")
        result[name.strip()] = value.strip()
    return result


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


@pytest.fixture
def kith(tmp_path: Path, data_dir: Path) -> Kith:
    """Run ``kith --data-dir DATA_DIR ARGS...``; ``data_dir=None`` leaves the option out."""

    def run(
        *args: str,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path = tmp_path,
        data_dir: Path | None = data_dir,
    ) -> Run:
        head = ["--data-dir", str(data_dir)] if data_dir is not None else []
        return run_kith([*head, *args], cwd=cwd, stdin=stdin, env=env)

    return run


@pytest.fixture
def server_core(data_dir: Path) -> Iterator[Callable[[], Core]]:
    """Open the data dir's core in this process, as the server would; closed at the end."""
    opened: list[Core] = []

    def open_() -> Core:
        (data_dir / "core").mkdir(parents=True, exist_ok=True)
        core = Core(str(data_dir / "core"))
        opened.append(core)
        return core

    yield open_
    for core in opened:
        core.close()


def assert_one_line_error(r: Run, code: int, *needles: str) -> None:
    assert r.code == code, r
    assert r.out == ""
    assert "Traceback" not in r.err
    assert len(r.err.splitlines()) == 1, r.err
    for needle in needles:
        assert needle in r.err, r.err


# --- global options --------------------------------------------------------------------------


def test_version(kith: Kith) -> None:
    r = kith("--version", data_dir=None)
    assert (r.code, r.out, r.err) == (0, f"kith {kithmail.__version__}\n", "")


def test_data_dir_option_env_and_default(kith: Kith, tmp_path: Path) -> None:
    # --data-dir also works after the command's name.
    r = kith("recon", "exempt", "192.0.2.0/24", "--data-dir", str(tmp_path / "opt"), data_dir=None)
    assert r.code == 0, r
    assert (tmp_path / "opt" / "core").is_dir()

    env_dir = tmp_path / "from-env"
    r = kith("recon", "exempt", "--list", env={"KITHMAIL_DATA_DIR": str(env_dir)}, data_dir=None)
    assert r.code == 0, r
    assert (env_dir / "core").is_dir()

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = kith("recon", "exempt", "--list", cwd=cwd, data_dir=None)
    assert r.code == 0, r
    assert (cwd / "var" / "core").is_dir()
    # Each was a separate environment: the exempt network went only into the first.
    assert r.out == ""
    assert kith("recon", "exempt", "--list", data_dir=tmp_path / "opt").out == "192.0.2.0/24\n"


# --- recon -----------------------------------------------------------------------------------


def test_exempt_add_list_show_remove(kith: Kith) -> None:
    r = kith("recon", "exempt", "192.0.2.0/24")
    assert (r.code, r.out) == (0, "added exempt network 192.0.2.0/24\n")
    assert kith("recon", "exempt", "2001:db8::/32").code == 0
    r = kith("recon", "exempt", "192.0.2.0/24")
    assert (r.code, r.out) == (0, "192.0.2.0/24 is already exempt\n")

    r = kith("recon", "exempt", "--list")
    assert r.code == 0
    assert sorted(r.out.split()) == ["192.0.2.0/24", "2001:db8::/32"]

    r = kith("recon", "show", "192.0.2.7")
    assert r.code == 0, r
    f = fields(r.out)
    assert f["network"] == "192.0.2.7/32"
    assert f["entry"] == "none"
    assert f["exempt"] == "192.0.2.0/24"
    assert f["status now"] == "exempt"

    r = kith("recon", "exempt", "--remove", "192.0.2.0/24")
    assert (r.code, r.out) == (0, "removed exempt network 192.0.2.0/24\n")
    assert kith("recon", "exempt", "--list").out == "2001:db8::/32\n"
    r = kith("recon", "show", "192.0.2.7")
    assert (r.code, r.out) == (1, "192.0.2.7: no entry (network 192.0.2.7/32)\n")

    r = kith("recon", "exempt", "--remove", "192.0.2.0/24")
    assert_one_line_error(r, 1, "192.0.2.0/24 is not an exempt network")

    # An IPv4-mapped network is the IPv4 network, for the CLI as for the core.
    r = kith("recon", "exempt", "::ffff:198.51.100.0/120")
    assert (r.code, r.out) == (0, "added exempt network 198.51.100.0/24\n")
    assert fields(kith("recon", "show", "198.51.100.9").out)["exempt"] == "198.51.100.0/24"


def test_recon_show_checked_sources(kith: Kith, server_core: Callable[[], Core]) -> None:
    now = int(time.time())
    core = server_core()
    assert core.recon.check("198.51.100.7", now - 200).status == "new"
    assert core.recon.check("198.51.100.7", now - 100).status == "passed"
    assert core.recon.check("198.51.100.8", now - 120).status == "new"
    assert core.recon.check("2001:db8:1:2::5", now - 10).status == "new"
    core.flush()

    r = kith("recon", "show", "198.51.100.7")
    assert r.code == 0, r
    f = fields(r.out)
    assert f == {
        "network": "198.51.100.7/32",
        "first seen": iso(now - 200),
        "last seen": iso(now - 100),
        "pass until": iso(now - 100 + 30 * DAY),
        "attempts": "2",
        "passes": "1",
        "exempt": "no",
        "status now": "known",
    }

    # Seen once two minutes ago: its retry now would pass.
    f = fields(kith("recon", "show", "198.51.100.8").out)
    assert (f["pass until"], f["passes"], f["status now"]) == ("-", "0", "passed")

    # Another address of the same /64 shows the /64's row; seen 10 s ago, too early.
    r = kith("recon", "show", "2001:db8:1:2::99")
    assert r.code == 0, r
    f = fields(r.out)
    assert f["network"] == "2001:db8:1:2::/64"
    assert f["first seen"] == iso(now - 10)
    assert f["status now"] == "too_early"

    r = kith("recon", "show", "203.0.113.9")
    assert (r.code, r.out, r.err) == (1, "203.0.113.9: no entry (network 203.0.113.9/32)\n", "")


def test_cli_writes_while_another_process_holds_the_environment(
    kith: Kith, server_core: Callable[[], Core]
) -> None:
    core = server_core()  # stays open, as the server's would
    assert core.recon.exempt_list() == []
    assert core.community.add("ann@example.test", "bob@example.com")
    core.flush()

    r = kith("recon", "exempt", "10.0.0.0/8")
    assert r.code == 0, r
    assert core.recon.exempt_list() == ["10.0.0.0/8"]
    assert core.recon.check("10.1.2.3", int(time.time())).status == "exempt"

    r = kith("community", "list", "ann@example.test", "--json")
    assert r.code == 0, r
    assert [e["entry"] for e in json.loads(r.out)] == ["bob@example.com"]


# --- reputation ------------------------------------------------------------------------------

BLOCK_FILE = """\
# a test feed: IPv4 networks (one nested in another), an address, an IPv6 network
203.0.113.0/24
  203.0.113.128/25

# addresses are their /32
198.51.100.5
2001:db8:bad::/48
"""


def test_reputation_load_lookup_lists_drop(kith: Kith, tmp_path: Path) -> None:
    feed = tmp_path / "drop.txt"
    feed.write_text(BLOCK_FILE)
    r = kith("reputation", "load", str(feed), "--name", "drop", "--score", "5")
    assert r.code == 0, r
    assert r.out.startswith("loaded 4 prefixes into block list 'drop' (action reject, score 5) in ")
    assert r.out.endswith(" s\n")

    allow = tmp_path / "allow.txt"
    allow.write_text("203.0.113.7\n")
    r = kith("reputation", "load", str(allow), "--name", "partners", "--kind", "allow")
    assert r.code == 0, r
    assert "into allow list 'partners' (action accept, score 0)" in r.out

    def lookup(ip: str) -> Run:
        return kith("reputation", "lookup", ip)

    assert lookup("203.0.113.5").out == (
        "203.0.113.5: block list 'drop' prefix 203.0.113.0/24 action reject score 5\n"
    )
    assert "prefix 203.0.113.128/25 " in lookup("203.0.113.200").out  # longest prefix wins
    assert "prefix 198.51.100.5/32 " in lookup("198.51.100.5").out
    assert "prefix 2001:db8:bad::/48 " in lookup("2001:db8:bad:1::1").out
    assert lookup("203.0.113.7").out.startswith("203.0.113.7: allow list 'partners' ")
    r = lookup("192.0.2.1")
    assert (r.code, r.out) == (1, "192.0.2.1: not listed\n")

    r = kith("reputation", "lists")
    assert r.code == 0, r
    rows = [line.split() for line in r.out.splitlines()]
    assert rows[0] == ["name", "kind", "action", "score", "prefixes", "intervals", "loaded"]
    assert [row[:5] for row in rows[1:]] == [
        ["drop", "block", "reject", "5", "4"],
        ["partners", "allow", "accept", "0", "1"],
    ]

    r = kith("reputation", "drop", "drop")
    assert (r.code, r.out) == (0, "dropped reputation list 'drop'\n")
    assert lookup("203.0.113.5").code == 1
    assert_one_line_error(kith("reputation", "drop", "drop"), 1, "no reputation list named 'drop'")


def test_reputation_bad_line_fails_the_whole_load(kith: Kith, tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("203.0.113.0/24\n")
    assert kith("reputation", "load", str(good), "--name", "feed").code == 0

    bad = tmp_path / "bad.txt"
    bad.write_text("# comment\n198.51.100.0/24\nnot-a-network\n2001:db8::/32\n")
    r = kith("reputation", "load", str(bad), "--name", "feed")
    assert_one_line_error(r, 1, f"{bad}:3: ", "not-a-network")

    # The old list stands, untouched.
    assert "prefix 203.0.113.0/24 " in kith("reputation", "lookup", "203.0.113.1").out
    assert kith("reputation", "lookup", "198.51.100.1").code == 1


# --- community -------------------------------------------------------------------------------


def community(kith: Kith, user: str) -> list[dict[str, str]]:
    r = kith("community", "list", user, "--json")
    assert r.code == 0, r
    entries: list[dict[str, str]] = json.loads(r.out)
    return sorted(entries, key=lambda e: e["entry"])


def test_community_add_list_remove(kith: Kith) -> None:
    ann = "ann@example.test"
    before = int(time.time())
    r = kith("community", "add", ann, "Bob@Example.COM")
    assert (r.code, r.out) == (0, "bob@example.com is now on the allow list of ann@example.test\n")
    r = kith("community", "add", ann, "bob@example.com")
    assert (r.code, r.out) == (
        0,
        "bob@example.com was already on the allow list of ann@example.test; unchanged\n",
    )
    assert kith("community", "add", ann, "@spam.example", "--block", "--source", "admin").code == 0
    assert kith("community", "add", ann, "list:<news.example.org>").code == 0

    entries = community(kith, ann)
    assert [(e["entry"], e["kind"], e["source"]) for e in entries] == [
        ("@spam.example", "block", "admin"),
        ("bob@example.com", "allow", "manual"),
        ("list:news.example.org", "allow", "manual"),
    ]
    assert all(iso(before) <= e["added"] <= iso(int(time.time())) for e in entries)

    r = kith("community", "list", ann)
    assert r.code == 0
    lines = r.out.splitlines()
    assert lines[0].split() == ["entry", "kind", "source", "added"]
    assert len(lines) == 4

    r = kith("community", "remove", ann, "BOB@example.com")
    assert (r.code, r.out) == (0, "removed bob@example.com for ann@example.test\n")
    assert [e["entry"] for e in community(kith, ann)] == [
        "@spam.example",
        "list:news.example.org",
    ]
    assert_one_line_error(kith("community", "remove", ann, "bob@example.com"), 1, "no entry")

    # Adding an entry of the other kind moves it.
    r = kith("community", "add", ann, "@spam.example")
    assert (r.code, r.out) == (0, "@spam.example is now on the allow list of ann@example.test\n")
    assert community(kith, ann)[0]["kind"] == "allow"

    # Users are apart; an empty community is not an error.
    r = kith("community", "list", "carl@example.test")
    assert (r.code, r.out) == (0, "")
    assert kith("community", "list", "carl@example.test", "--json").out == "[]\n"


def test_community_import_plain_csv_and_stdin(kith: Kith, tmp_path: Path) -> None:
    ann = "ann@example.test"
    plain = tmp_path / "plain.txt"
    plain.write_text("# my contacts\nbob@example.com\n\n@partner.example\nBOB@example.com\n")
    r = kith("community", "import", ann, str(plain))
    assert (r.code, r.out) == (
        0,
        "imported 2 allow entries for ann@example.test: 2 added or changed, 0 already there\n",
    )

    csv_file = tmp_path / "contacts.csv"
    csv_file.write_bytes(
        b'\xef\xbb\xbfemail,name\r\ncarol@example.net,"Carol, C."\r\n'
        b'bob@example.com,Bob\r\n"list:<dev.example.org>",Dev list\r\n'
    )
    r = kith("community", "import", ann, str(csv_file))
    assert (r.code, r.out) == (
        0,
        "imported 3 allow entries for ann@example.test: 2 added or changed, 1 already there\n",
    )

    r = kith("community", "import", ann, "-", "--block", stdin="mallory@evil.example\n")
    assert (r.code, r.out) == (
        0,
        "imported 1 block entries for ann@example.test: 1 added or changed, 0 already there\n",
    )

    assert [(e["entry"], e["kind"], e["source"]) for e in community(kith, ann)] == [
        ("@partner.example", "allow", "import"),
        ("bob@example.com", "allow", "import"),
        ("carol@example.net", "allow", "import"),
        ("list:dev.example.org", "allow", "import"),
        ("mallory@evil.example", "block", "import"),
    ]


def test_community_import_bad_line_imports_nothing(kith: Kith, tmp_path: Path) -> None:
    f = tmp_path / "contacts.txt"
    f.write_text("bob@example.com\nnot an entry\ncarol@example.net\n")
    r = kith("community", "import", "ann@example.test", str(f))
    assert_one_line_error(r, 1, f"{f}:2: ", "'not an entry'", "nothing imported")
    assert community(kith, "ann@example.test") == []

    r = kith("community", "import", "ann@example.test", "-", stdin="# only a comment\n")
    assert_one_line_error(r, 1, "<stdin>: no entries found")


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["recon"], "the following arguments are required: ACTION"),
        (["recon", "frob"], "invalid choice: 'frob'"),
        (["recon", "show", "999.1.1.1"], "not an IP address: '999.1.1.1'"),
        (["recon", "show", "fe80::1%eth0"], "not an IP address"),
        (["recon", "exempt", "banana"], "not a CIDR network: 'banana'"),
        (["recon", "exempt", "192.0.2.1/24"], "did you mean 192.0.2.0/24?"),
        (["recon", "exempt", "10.0.0.0/33"], "not a CIDR network"),
        (["recon", "exempt"], "give a CIDR to add, --remove CIDR, or --list"),
        (["recon", "exempt", "--remove"], "give a CIDR"),
        (["recon", "exempt", "--list", "10.0.0.0/8"], "--list takes no CIDR"),
        (["reputation", "load", "feed.txt"], "the following arguments are required: --name"),
        (["reputation", "load", "f", "--name", "x", "--action", "boom"], "invalid choice: 'boom'"),
        (["reputation", "load", "f", "--name", "x", "--score", "high"], "invalid int value"),
        (["reputation", "lookup", "1.2.3.4.5"], "not an IP address"),
        (["community", "add", "ann@example.test"], "required: ENTRY"),
        (["community", "add", "a@b.test", "c@d.test", "--source", "x"], "invalid choice: 'x'"),
    ],
)
def test_usage_errors_exit_2(kith: Kith, args: list[str], needle: str) -> None:
    assert_one_line_error(kith(*args), 2, needle)


def test_runtime_errors_exit_1(kith: Kith, tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    r = kith("reputation", "load", str(missing), "--name", "x")
    assert_one_line_error(r, 1, f"no such file: {missing}")
    r = kith("reputation", "load", str(tmp_path), "--name", "x")
    assert_one_line_error(r, 1, "is a directory")
    r = kith("community", "import", "ann@example.test", str(missing))
    assert_one_line_error(r, 1, str(missing), "No such file")

    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes(b"b\xf6b@example.com\n")
    r = kith("community", "import", "ann@example.test", str(not_utf8))
    assert_one_line_error(r, 1, "not UTF-8")

    # The core's own InvalidInputError, word for word from Rust, on one line.
    r = kith("community", "add", "ann@example.test", "not an entry")
    assert_one_line_error(r, 1, "kith: error: ", "not an entry")

    # A data dir that cannot be one.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = kith("recon", "exempt", "--list", data_dir=blocker)
    assert_one_line_error(r, 1, "kith: error: ", str(blocker))


def test_cli_adopts_the_servers_prefix_lengths(kith: Kith, data_dir: Path) -> None:
    """A server that masks IPv4 to /24 built the core; the CLI needs no flag to read it."""
    now = int(time.time())
    core = Core(str(data_dir / "core"), ipv4_prefix=24)
    core.recon.check("198.51.100.7", now - 10)
    core.flush()
    core.close()
    del core
    r = kith("recon", "show", "198.51.100.200")
    assert r.code == 0, r.err
    f = fields(r.out)
    assert f["network"] == "198.51.100.0/24"
    assert f["status now"] == "too_early"
    r = kith("recon", "show", "198.51.101.1")
    assert (r.code, r.out.strip()) == (1, "198.51.101.1: no entry (network 198.51.101.0/24)")


def test_check_config_names_every_mistake(kith: Kith, tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[recon]\nmin_delay = "5m"\n[spf]\nsoftfail = "tag"\n')
    r = kith("check-config", "-c", str(good), data_dir=None)
    assert (r.code, r.out.strip(), r.err) == (0, f"{good}: OK", "")
    r = kith("check-config", data_dir=None)
    assert (r.code, r.out.strip()) == (0, "<embedded default>: OK")
    bad = tmp_path / "bad.toml"
    bad.write_text('[recon]\nmin_dealy = "60s"\n[domains]\ndownstream = "smtp://nowhere"\n')
    r = kith("check-config", "-c", str(bad), data_dir=None)
    assert r.code == 1
    lines = r.err.strip().splitlines()
    assert len(lines) == 2, r.err
    assert f"{bad}: unknown key `recon.min_dealy` (did you mean `min_delay`?)" in lines
    assert any(line.startswith(f"{bad}: `domains.downstream`") for line in lines)
    assert "Traceback" not in r.err


def test_config_file_gives_data_dir_and_prefix_lengths(kith: Kith, tmp_path: Path) -> None:
    """With -c, the CLI opens the server's data dir with the server's prefix lengths."""
    data = tmp_path / "srv"
    cfg = tmp_path / "kithmail.toml"
    cfg.write_text(f'[server]\ndata_dir = "{data}"\n[recon]\nipv4_prefix = 24\n')
    r = kith("-c", str(cfg), "recon", "exempt", "192.0.2.0/24", data_dir=None)
    assert r.code == 0, r.err
    assert (data / "core" / "data.mdb").exists()
    r = kith("-c", str(cfg), "recon", "show", "192.0.2.9", data_dir=None)
    assert (r.code, fields(r.out)["network"]) == (0, "192.0.2.0/24")
    # The same core under a config asking for /32 masking is refused, naming the setting.
    other = tmp_path / "other.toml"
    other.write_text(f'[server]\ndata_dir = "{data}"\n[recon]\nipv4_prefix = 32\n')
    r = kith("-c", str(other), "recon", "show", "192.0.2.9", data_dir=None)
    assert r.code == 1
    assert "ipv4_prefix = 24" in r.err and "Traceback" not in r.err
    # A broken config file is one clear error too.
    broken = tmp_path / "broken.toml"
    broken.write_text("[recon\n")
    r = kith("-c", str(broken), "recon", "exempt", "--list", data_dir=None)
    assert r.code == 1 and "not valid TOML" in r.err
