"""Configuration: the TOML file of DESIGN.md, validated into typed settings.

Trusts nothing in the file: every key is known (an unknown one is an error
naming it, with the closest known key), every value is parsed once here —
durations as people write them ("60s", "30d"), sizes ("25MiB"), networks,
listener addresses and downstream URLs. With no file, the embedded default
serves (`make run`). Settings are immutable; a reload builds new ones.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

__all__ = ["ConfigError", "Settings", "load", "parse_duration", "parse_size"]


class ConfigError(Exception):
    """A config file that cannot serve; the message names the file and key."""


# ---------------------------------------------------------------- value types

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(v: Any) -> float:
    """ "60s", "5m", "24h", "30d", "1w", "250ms" or a number of seconds."""
    if isinstance(v, bool):
        raise ValueError("a duration is a number of seconds or a string like '60s'")
    if isinstance(v, int | float):
        if v < 0:
            raise ValueError("a duration cannot be negative")
        return float(v)
    if isinstance(v, str):
        m = _DURATION.match(v)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"invalid duration {v!r} (use e.g. '250ms', '60s', '5m', '24h', '30d')")


_SIZE = re.compile(r"^\s*(\d+)\s*(B|K|KB|KiB|M|MB|MiB|G|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "K": 1024,
    "KB": 1000,
    "KiB": 1024,
    "M": 1024**2,
    "MB": 1000**2,
    "MiB": 1024**2,
    "G": 1024**3,
    "GB": 1000**3,
    "GiB": 1024**3,
}


def parse_size(v: Any) -> int:
    """ "25MiB", "10M", "512KB" or a number of bytes."""
    if isinstance(v, bool):
        raise ValueError("a size is a number of bytes or a string like '25MiB'")
    if isinstance(v, int):
        if v < 0:
            raise ValueError("a size cannot be negative")
        return v
    if isinstance(v, str):
        m = _SIZE.match(v)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f"invalid size {v!r} (use e.g. '25MiB', '512KiB', or bytes)")


def _network(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("a network is a string like '192.0.2.0/24'")
    try:
        return str(ipaddress.ip_network(v.strip(), strict=True))
    except ValueError as e:
        raise ValueError(f"invalid network {v!r}: {e}") from None


def _listener(v: Any) -> str:
    """ "127.0.0.1:2525" or "[::1]:2525"."""
    if not isinstance(v, str):
        raise ValueError("a listener is a string like '127.0.0.1:2525'")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([0-9.]+):(\d+)", v.strip())
    if not m:
        raise ValueError(f"invalid listener {v!r} (want 'IP:PORT' or '[IPv6]:PORT')")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"invalid listener {v!r}: {host!r} is not an IP address") from None
    if not 0 < port < 65536:
        raise ValueError(f"invalid listener {v!r}: port out of range")
    return v.strip()


def _hostport_url(v: Any, schemes: tuple[str, ...]) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    u = urlsplit(v)
    if u.scheme not in schemes or not u.hostname or u.port is None:
        raise ValueError(
            f"invalid URL {v!r} (want {' or '.join(s + '://HOST:PORT' for s in schemes)})"
        )
    if u.path not in ("", "/") or u.query or u.fragment or u.username:
        raise ValueError(f"invalid URL {v!r}: only scheme://HOST:PORT")
    return v


def _downstream(v: Any) -> str:
    if isinstance(v, str) and v.startswith("maildir:"):
        if not v[len("maildir:") :]:
            raise ValueError("maildir: needs a directory, e.g. 'maildir:./var/mail'")
        return v
    try:
        return _hostport_url(v, ("smtp", "lmtp"))
    except ValueError:
        raise ValueError(
            f"invalid downstream {v!r} (want 'maildir:DIR', 'smtp://HOST:PORT' or 'lmtp://HOST:PORT')"
        ) from None


def _outbound(v: Any) -> str:
    if v == "mx":
        return "mx"
    try:
        return _hostport_url(v, ("smtp",))
    except ValueError:
        raise ValueError(f"invalid outbound {v!r} (want 'mx' or 'smtp://HOST:PORT')") from None


def _public_url(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a URL string")
    u = urlsplit(v)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"invalid URL {v!r} (want http:// or https://)")
    return v.rstrip("/")


def _domain(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("a domain is a non-empty string")
    try:
        d = v.strip().rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"invalid domain {v!r}") from None
    if not re.fullmatch(r"(?=.{1,253}$)([a-z0-9_]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9-]{1,63}", d):
        raise ValueError(f"invalid domain {v!r}")
    return d


def _journal_address(v: Any) -> str:
    """A plain ``local@domain``, folded as recipients are compared (lower case, A-labels)."""
    if not isinstance(v, str) or v.count("@") != 1:
        raise ValueError("a journal address is a plain address like 'journal@example.test'")
    local, _, domain = v.strip().partition("@")
    if not re.fullmatch(r"[A-Za-z0-9!#$&'*/=?^_`{|}~-]+(\.[A-Za-z0-9!#$&'*/=?^_`{|}~-]+)*", local):
        raise ValueError(
            f"invalid journal address {v!r}: the local part must be plain (no quotes, +, % or !)"
        )
    return f"{local.lower()}@{_domain(domain)}"


def _nameserver(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("a nameserver is 'IP' or 'IP:PORT'")
    s = v.strip()
    try:
        ipaddress.ip_address(s)
        return s
    except ValueError:
        return _listener(s)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Network = Annotated[str, BeforeValidator(_network)]
Listener = Annotated[str, BeforeValidator(_listener)]
Domain = Annotated[str, BeforeValidator(_domain)]
Nameserver = Annotated[str, BeforeValidator(_nameserver)]
Action = Literal["accept", "tag", "quarantine", "defer", "reject"]
Mode = Literal["enforce", "shadow"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- sections


class Listeners(_Section):
    inbound: list[Listener] = Field(["127.0.0.1:2525"], description="Port-25 listeners")
    submission: list[Listener] = Field(["127.0.0.1:2587"], description="Submission (AUTH)")
    web: list[Listener] = Field(["127.0.0.1:8025"], description="Web UI, API, /metrics")
    public: list[Listener] = Field(["127.0.0.1:8026"], description="SAV and digest pages")
    policy: list[Listener] = Field(["127.0.0.1:10023"], description="Postfix policy service")


class Server(_Section):
    hostname: str = Field("kithmail.example.test", description="Name in the greeting")
    data_dir: Path = Field(Path("./var"), description="Spool, core tables, database")
    listeners: Listeners = Field(default_factory=Listeners)
    public_url: Annotated[str, BeforeValidator(_public_url)] = Field(
        "http://127.0.0.1:8026", description="Base URL of the public pages"
    )
    tls_cert: Path | None = Field(None, description="PEM certificate; self-signed when unset")
    tls_key: Path | None = Field(None, description="PEM private key")
    tls_min_version: Literal["1.2", "1.3"] = Field("1.2", description="Oldest TLS version offered")
    trusted_upstreams: list[Network] = Field(
        [], description="May pass the client address by PROXY or XCLIENT"
    )
    core_map_size: Size = Field(64 << 30, description="LMDB map size (sparse)")
    workers: int = Field(1, ge=1, le=64, description="Worker processes sharing each port")
    proxy_protocol: bool = Field(
        False, description="Trusted upstreams open each connection with a PROXY header (v1 or v2)"
    )
    spool_reserve: Size = Field(
        64 * 1024**2, description="Free space the spool keeps; below it, 452 4.3.1"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines on stderr: text (one escaped line per event) or json (one object)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Least severe level logged"
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> Server:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        return self


class Domains(_Section):
    local: list[Domain] = Field(["example.test"], description="Domains we accept mail for")
    downstream: Annotated[str, BeforeValidator(_downstream)] = Field(
        "maildir:./var/mail",
        description="Where accepted mail goes: maildir:DIR, smtp:// or lmtp://",
    )
    outbound: Annotated[str, BeforeValidator(_outbound)] = Field(
        "mx", description="How outbound mail leaves: mx, or smtp://SMARTHOST:PORT"
    )
    trusted_networks: list[Network] = Field(
        ["127.0.0.1/32", "::1/128"], description="Skip Recon and Reputation; may relay"
    )
    verify_recipients: Literal["users", "downstream"] = Field(
        "users", description="Check recipients against local users, or by call-ahead"
    )
    callahead_ttl: Duration = Field(3600.0, description="How long a call-ahead 'exists' is kept")
    callahead_negative_ttl: Duration = Field(
        600.0, description="How long a call-ahead 'no such user' is kept"
    )
    callahead_timeout: Duration = Field(30.0, description="Deadline of one call-ahead")
    allow_open_relay: bool = Field(
        False, description="Must be true to trust a network wider than /8 (IPv4) or /32 (IPv6)"
    )

    @model_validator(mode="after")
    def _no_accidental_relay(self) -> Domains:
        for n in self.trusted_networks:
            net = ipaddress.ip_network(n)
            wide = net.prefixlen < (8 if net.version == 4 else 32)
            if wide and not self.allow_open_relay:
                raise ValueError(
                    f"trusted_networks contains {n}: mail from it is relayed anywhere. "
                    "Set allow_open_relay = true if that is really meant"
                )
        return self


class Limits(_Section):
    max_message_size: Size = 25 * 1024**2
    max_recipients: int = Field(100, ge=1, le=10000)
    max_connections: int = Field(500, ge=1)
    max_connections_per_ip: int = Field(20, ge=1)
    max_line_length: int = Field(1000, ge=512, le=65536)
    command_timeout: Duration = 300.0
    data_timeout: Duration = 600.0
    messages_per_ip_per_minute: int = Field(120, ge=1)
    connections_per_ip_per_minute: int = Field(60, ge=1)
    messages_per_sender_per_minute: int = Field(120, ge=1)
    pregreet_wait: Duration = Field(
        1.0,
        description="Sources Recon has not passed wait this long for the greeting; "
        "talking first is refused (0 turns it off)",
    )
    bare_newlines: Literal["reject", "normalize"] = Field(
        "reject", description="A bare CR or LF in DATA: refuse the message, or make it CRLF"
    )
    data_memory: Size = Field(
        512 * 1024**2, description="Message data held in memory at once, all sessions together"
    )
    max_bad_commands: int = Field(20, ge=1, description="Bad commands before 421 and hang-up")


class Queue(_Section):
    lifetime: Duration = 5 * 86400.0
    backoff: list[Duration] = Field(
        [60.0, 300.0, 900.0, 1800.0, 3600.0], description="Retry delays, the last repeats"
    )
    concurrency: int = Field(20, ge=1, le=1000, description="Deliveries in flight at once")
    timeout: Duration = Field(300.0, description="Deadline of one delivery attempt")


class Dns(_Section):
    nameservers: list[Nameserver] = ["127.0.0.1:5353"]
    timeout: Duration = 5.0


class Recon(_Section):
    enabled: bool = True
    mode: Mode = "enforce"
    min_delay: Duration = 60.0
    retry_window: Duration = 86400.0
    pass_ttl: Duration = 30 * 86400.0
    commit_window: Duration = 0.1
    ipv4_prefix: int = Field(32, ge=1, le=32)
    ipv6_prefix: int = Field(64, ge=1, le=128)
    ipv6_new_per_48: int = Field(4096, ge=1)
    exempt_networks: list[Network] = []
    exempt_senders: list[str] = Field([], description="Exempt when SPF passes for them")
    exempt_recipients: list[str] = []

    @model_validator(mode="after")
    def _order(self) -> Recon:
        if self.min_delay > self.retry_window:
            raise ValueError("min_delay is longer than retry_window: no retry could ever pass")
        return self


class LocalList(_Section):
    name: str
    path: Path
    kind: Literal["allow", "block"] = "block"
    action: Action = "reject"
    score: int = 0


class Reputation(_Section):
    mode: Mode = "enforce"
    dnsbl: list[Domain] = []
    on_listed: Action = "reject"
    local_lists: list[LocalList] = []
    learned_action: Action = "defer"
    learned_threshold: int = Field(20, ge=1)
    learned_ttl: Duration = Field(
        30 * 86400.0,
        gt=0,
        description="A source's learned counters are forgotten this long after its last "
        "counted event (one for all tenants: the counters are shared)",
    )


class Spf(_Section):
    mode: Mode = "enforce"
    pass_: Action = Field("accept", alias="pass")
    fail: Action = "reject"
    softfail: Action = "quarantine"
    neutral: Action = "accept"
    none: Action = "accept"
    temperror: Action = "defer"
    permerror: Action = "quarantine"

    def action_for(self, result: str) -> Action:
        """The configured action for an SPF result."""
        return self.pass_ if result == "pass" else getattr(self, result, self.permerror)


class Dkim(_Section):
    mode: Mode = "enforce"
    fail: Action = "quarantine"
    max_signatures: int = Field(5, ge=1, le=50)
    selector: str = Field(
        "kithmail",
        pattern=r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$",
        description="Selector of the keys that sign our own mail (challenges, digests, DSNs); "
        "`kith dkim keygen DOMAIN` makes one",
    )


class Dmarc(_Section):
    mode: Mode = "enforce"
    enforce: bool = True


class Arc(_Section):
    trusted_sealers: list[Domain] = []
    max_sets: int = Field(10, ge=1, le=50)


class Spoofing(_Section):
    mode: Mode = "enforce"
    own_domains: Action = Field(
        "reject", description="Mail from outside claiming a local domain, unauthenticated"
    )


def _clamd(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str) and v.startswith("unix:"):
        if not v[len("unix:") :].startswith("/"):
            raise ValueError(f"invalid clamd {v!r}: want an absolute path, 'unix:/run/clamd.ctl'")
        return v
    try:
        return _hostport_url(v, ("tcp",))
    except ValueError:
        raise ValueError(
            f"invalid clamd {v!r} (want 'unix:/path/to/clamd.ctl' or 'tcp://127.0.0.1:3310')"
        ) from None


class Antivirus(_Section):
    mode: Mode = Field("enforce", description="shadow: scan and record, never act")
    clamd: Annotated[str | None, BeforeValidator(_clamd)] = Field(
        None, description="'unix:/path' or 'tcp://127.0.0.1:3310'; unset: the layer is off"
    )
    on_virus: Action = Field("reject", description="clamd found a signature")
    on_error: Action = Field(
        "defer", description="clamd down, slower than timeout, or an answer not understood"
    )
    on_unscannable: Action | None = Field(
        None,
        description="An archive clamd could not fully scan (encrypted, over its limits); "
        "unset: as on_virus",
    )
    max_size: Size = Field(
        25 * 1024**2,
        description="Larger messages are not sent to clamd; keep it below clamd's StreamMaxLength",
    )
    on_oversize: Action = Field("accept", description="A message over max_size")
    timeout: Duration = Field(30.0, description="Deadline of one scan, connect to verdict")


class Community(_Section):
    mode: Mode = "enforce"
    sav: bool = True
    require_auth: bool = True
    quarantine_days: int = Field(28, ge=1, le=3650)
    challenge_interval: Duration = 86400.0
    challenge_rate_per_domain: int = Field(20, ge=0)
    challenge_rate_global: int = Field(1000, ge=0)
    quarantine_quota: Size = 500 * 1024**2
    token_ttl: Duration = Field(
        7 * 86400.0, description="How long a SAV challenge can be answered (reply or page)"
    )
    challenge_from: str = Field(
        "postmaster",
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
        description="Local part of the From address of challenges, at the recipient's domain",
    )


class Digest(_Section):
    """The daily quarantine digest: to each user, what was newly held for them."""

    enabled: bool = Field(True, description="Send digests (each user may still opt out)")
    at: str = Field(
        "08:00",
        pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$",
        description="Time of day (HH:MM, the server's local time) the daily digest is sent",
    )
    link_ttl: Duration = Field(
        72 * 3600.0, description="How long a digest's release links work (each works once)"
    )
    max_items: int = Field(
        50, ge=1, le=500, description="Held messages listed in one digest; the rest are counted"
    )
    from_local: str = Field(
        "quarantine",
        pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$",
        description="Local part of the digest's From address, at the user's domain",
    )


class Submission(_Section):
    journal_address: Annotated[str, BeforeValidator(_journal_address)] | None = Field(
        None,
        description="Accepts BCC journal copies from trusted_networks on the inbound listener; "
        "their recipients join the sender's community, the copy is discarded (unset: off)",
    )
    auth_failures_per_ip_per_hour: int = Field(
        10, ge=1, description="Failed AUTH attempts from one IP per hour before 421 and hang-up"
    )
    auth_failures_per_account_per_hour: int = Field(
        10, ge=1, description="Failed AUTH attempts for one account per hour before 421"
    )
    messages_per_user_per_hour: int = Field(
        200, ge=1, description="Messages one authenticated user may send per hour (then 451 4.7.1)"
    )


class Policy(_Section):
    policy_clients: list[Network] = ["127.0.0.1/32"]
    spf: bool = Field(
        False, description="Also check SPF for MAIL FROM and act by [spf] (one lookup per message)"
    )


class Web(_Section):
    """The internal web listener's UI and API: sessions, logins, uploads, TLS."""

    tls: bool = Field(
        False,
        description="Serve the web listener over HTTPS with [server] tls_cert/tls_key "
        "(self-signed when unset); session cookies are then Secure",
    )
    https_proxy: bool = Field(
        False,
        description="A reverse proxy in front serves the UI over HTTPS: cookies are Secure "
        "and the browser's origin is https://<Host> although this listener speaks HTTP",
    )
    session_ttl: Duration = Field(
        12 * 3600.0, description="A login lasts at most this long, however active"
    )
    idle_timeout: Duration = Field(
        3600.0, description="A session unused this long ends (the user logs in again)"
    )
    login_window: Duration = Field(
        900.0, description="The window in which failed logins are counted"
    )
    login_failures_per_ip: int = Field(
        30, ge=1, description="Failed logins from one IP per window before 429"
    )
    login_failures_per_account: int = Field(
        10, ge=1, description="Failed logins for one account per window before 429"
    )
    max_upload: Size = Field(1024**2, description="Largest community CSV import accepted (bytes)")
    audit_retention: Duration = Field(
        365 * 86400.0,
        gt=0,
        description="Audit log rows (who released, deleted, allowed or blocked what) are "
        "deleted this long after the action",
    )


class Settings(_Section):
    """Everything a kithmail process needs to know, validated once."""

    server: Server = Field(default_factory=Server)
    domains: Domains = Field(default_factory=Domains)
    limits: Limits = Field(default_factory=Limits)
    queue: Queue = Field(default_factory=Queue)
    dns: Dns = Field(default_factory=Dns)
    recon: Recon = Field(default_factory=Recon)
    reputation: Reputation = Field(default_factory=Reputation)
    spf: Spf = Field(default_factory=Spf)
    dkim: Dkim = Field(default_factory=Dkim)
    dmarc: Dmarc = Field(default_factory=Dmarc)
    arc: Arc = Field(default_factory=Arc)
    spoofing: Spoofing = Field(default_factory=Spoofing)
    antivirus: Antivirus = Field(default_factory=Antivirus)
    community: Community = Field(default_factory=Community)
    digest: Digest = Field(default_factory=Digest)
    submission: Submission = Field(default_factory=Submission)
    policy: Policy = Field(default_factory=Policy)
    web: Web = Field(default_factory=Web)
    source: str = Field("<embedded default>", exclude=True)

    @property
    def core_dir(self) -> Path:
        return self.server.data_dir / "core"


# ---------------------------------------------------------------- loading


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Settings
    for part in loc:
        if model is None or not isinstance(part, str):
            return None
        field = model.model_fields.get(part)
        if field is None:
            return model
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _describe(e: dict[str, Any], where: str) -> str:
    loc = tuple(e["loc"])
    key = ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        hint = ""
        if parent is not None:
            names = [f.alias or n for n, f in parent.model_fields.items()]
            close = difflib.get_close_matches(str(loc[-1]), names, n=1)
            if close:
                hint = f" (did you mean `{close[0]}`?)"
        return f"{where}: unknown key `{key}`{hint}"
    msg = e["msg"].removeprefix("Value error, ")
    return f"{where}: `{key}`: {msg}" if key else f"{where}: {msg}"


def from_mapping(data: Mapping[str, Any], where: str = "<config>") -> Settings:
    """Validate a parsed config; raise ConfigError naming each bad key."""
    try:
        return Settings.model_validate({**data, "source": where})
    except ValidationError as exc:
        lines = [_describe(dict(e), where) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load(path: str | Path | None = None) -> Settings:
    """Read and validate the TOML file at `path`; the embedded default if None."""
    if path is None:
        return Settings()
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    if "source" in data:
        raise ConfigError(f"{p}: unknown key `source`")
    return from_mapping(data, str(p))


# ---------------------------------------------------------------- reference


def _default_text(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if value is None:
        return "(unset)"
    if isinstance(value, BaseModel):
        return "(table)"
    if isinstance(value, Path):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value).replace("'", '"')


def reference() -> str:
    """The config reference (docs/config.md), made from the models themselves."""
    lines = [
        "# kithmail.toml — every key",
        "",
        "Generated from `python/kithmail/config.py` (`kithmail.config.reference()`);",
        "a test keeps the two equal. Every key is optional. Durations are written",
        '`"250ms"`, `"60s"`, `"5m"`, `"24h"`, `"30d"`, `"1w"` or as seconds; sizes',
        '`"25MiB"`, `"512KiB"`, `"10MB"` or as bytes. Actions are `accept`, `tag`,',
        "`quarantine`, `defer`, `reject`. `kith check-config -c FILE` checks a file.",
        "",
    ]

    def section(title: str, model: type[BaseModel]) -> None:
        lines.extend([f"## [{title}]", "", "| key | default | meaning |", "|---|---|---|"])
        nested: list[tuple[str, type[BaseModel]]] = []
        for name, f in model.model_fields.items():
            if name == "source":
                continue
            key = f.alias or name
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                nested.append((f"{title}.{key}", ann))
                continue
            desc = (f.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | `{_default_text(f)}` | {desc} |")
        lines.append("")
        for t, m in nested:
            section(t, m)

    for name, f in Settings.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            section(name, ann)
    lines.extend(
        [
            "## [[reputation.local_lists]]",
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
    )
    for name, f in LocalList.model_fields.items():
        lines.append(f"| `{name}` | `{_default_text(f)}` | {f.description or ''} |")
    return "\n".join(lines) + "\n"
