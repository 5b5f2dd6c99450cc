"""The config file: every key optional, every mistake named with its key and file."""

from pathlib import Path

import pytest

from kithmail import config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "kithmail.toml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str) -> str:
    p = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as ei:
        config.load(p)
    msg = str(ei.value)
    assert str(p) in msg, "the error names the file"
    return msg


def test_embedded_default_is_the_design_default() -> None:
    s = config.load(None)
    assert s.server.listeners.inbound == ["127.0.0.1:2525"]
    assert s.server.listeners.submission == ["127.0.0.1:2587"]
    assert s.server.listeners.web == ["127.0.0.1:8025"]
    assert s.server.listeners.public == ["127.0.0.1:8026"]
    assert s.server.listeners.policy == ["127.0.0.1:10023"]
    assert s.domains.local == ["example.test"]
    assert s.domains.downstream == "maildir:./var/mail"
    assert s.domains.trusted_networks == ["127.0.0.1/32", "::1/128"]
    assert (s.recon.min_delay, s.recon.retry_window, s.recon.pass_ttl) == (60, 86400, 30 * 86400)
    assert (s.spf.softfail, s.spf.fail) == ("quarantine", "reject")
    assert s.community.quarantine_days == 28
    assert s.queue.lifetime == 5 * 86400
    assert s.core_dir == Path("var/core")


def test_an_empty_file_is_the_default(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, "")) == config.Settings(
        source=str(tmp_path / "kithmail.toml")
    )


def test_values_as_people_write_them(tmp_path: Path) -> None:
    s = config.load(
        write(
            tmp_path,
            """
[server]
data_dir = "/srv/kithmail"
listeners = { inbound = ["0.0.0.0:25", "[::]:25"] }
[domains]
local = ["Example.COM", "bücher.example"]
downstream = "lmtp://127.0.0.1:24"
[limits]
max_message_size = "10MiB"
[recon]
min_delay = "5m"
retry_window = "12h"
pass_ttl = "1w"
commit_window = "250ms"
exempt_networks = ["2001:db8::/32"]
[spf]
pass = "accept"
softfail = "tag"
fail = "quarantine"
""",
        )
    )
    assert s.server.listeners.inbound == ["0.0.0.0:25", "[::]:25"]
    assert s.domains.local == ["example.com", "xn--bcher-kva.example"]
    assert s.limits.max_message_size == 10 * 1024 * 1024
    assert (s.recon.min_delay, s.recon.retry_window, s.recon.pass_ttl) == (300, 43200, 604800)
    assert s.recon.commit_window == pytest.approx(0.25)
    assert (s.spf.softfail, s.spf.fail) == ("tag", "quarantine"), "softfail and fail apart"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[recon]\nmin_dealy = "60s"\n',
            "unknown key `recon.min_dealy` (did you mean `min_delay`?)",
        ),
        ('[recno]\nmin_delay = "60s"\n', "unknown key `recno` (did you mean `recon`?)"),
        ('[recon]\nmin_delay = "60x"\n', "`recon.min_delay`: invalid duration '60x'"),
        (
            '[recon]\nmin_delay = "2d"\nretry_window = "1d"\n',
            "min_delay is longer than retry_window",
        ),
        (
            '[recon]\nexempt_networks = ["10.0.0.1/8"]\n',
            "`recon.exempt_networks.0`: invalid network",
        ),
        ('[domains]\ndownstream = "smtp://mail"\n', "`domains.downstream`: invalid downstream"),
        ('[domains]\ndownstream = "ftp://a:21"\n', "`domains.downstream`: invalid downstream"),
        ('[domains]\noutbound = "smtp://smarthost"\n', "`domains.outbound`: invalid outbound"),
        ('[server]\npublic_url = "javascript:alert(1)"\n', "`server.public_url`: invalid URL"),
        ('[server]\nlisteners = { inbound = ["localhost:25"] }\n', "invalid listener"),
        ('[server]\nlisteners = { inbound = ["127.0.0.1:70000"] }\n', "port out of range"),
        ('[server]\ntls_cert = "/a.pem"\n', "tls_cert and tls_key go together"),
        ('[spf]\nsoftfail = "bounce"\n', "`spf.softfail`: Input should be"),
        ('[limits]\nmax_message_size = "lots"\n', "`limits.max_message_size`: invalid size"),
        ('[dns]\nnameservers = ["dns.example:53"]\n', "`dns.nameservers.0`"),
        ("recon = 5\n", "`recon`"),
        ("[recon\n", "not valid TOML"),
    ],
)
def test_each_mistake_names_its_key(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_every_mistake_is_reported_at_once(tmp_path: Path) -> None:
    msg = error_of(tmp_path, '[recon]\nmin_dealy = 1\nretry_window = "x"\n[spf]\nfail = "no"\n')
    assert len(msg.splitlines()) == 3


def test_an_open_relay_must_be_asked_for(tmp_path: Path) -> None:
    msg = error_of(tmp_path, '[domains]\ntrusted_networks = ["0.0.0.0/0"]\n')
    assert "allow_open_relay" in msg
    s = config.load(
        write(tmp_path, '[domains]\ntrusted_networks = ["0.0.0.0/0"]\nallow_open_relay = true\n')
    )
    assert s.domains.trusted_networks == ["0.0.0.0/0"]


def test_a_missing_or_binary_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.toml")
    p = tmp_path / "bin.toml"
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(config.ConfigError, match="not UTF-8"):
        config.load(p)


def test_settings_are_immutable() -> None:
    s = config.load(None)
    with pytest.raises(Exception, match="frozen"):
        s.recon.min_delay = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60), ("5m", 300), ("24h", 86400), ("30d", 2592000), ("1w", 604800), (90, 90)],
)
def test_durations(text: str | int, seconds: int) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5 minutes", "-1s", -3, True, "1.5h"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        config.parse_duration(bad)


def test_the_config_reference_is_current() -> None:
    """docs/config.md is made from the models; regenerate it when a key changes:
    python -c "from kithmail import config; open('docs/config.md','w').write(config.reference())"
    """
    doc = Path(__file__).parent.parent / "docs" / "config.md"
    assert doc.read_text() == config.reference()
