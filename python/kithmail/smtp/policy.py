"""The Postfix SMTPD policy-delegation service: Recon, Reputation (and SPF).

An ISP that already runs Postfix adds kithmail as it would Postgrey:
`check_policy_service inet:127.0.0.1:10023` in smtpd_recipient_restrictions.
Each request is `name=value` lines ended by an empty line, many on one
persistent connection; each answer is `action=...` and an empty line. The
decisions are the same layer modules and core tables the SMTP listener uses.

Trusts only the clients in `[policy] policy_clients` (anyone else could mark
sources as passed); everything they send is bounded (line length, attribute
count, request size, time to finish a request) and parsed as data. Values
written back (header text, reply text) are ours, never echoed client input.
Standards: Postfix SMTPD_POLICY_README (protocol), access(5) (actions),
RFC 3463 (enhanced status codes), RFC 7208 §9.1 (Received-SPF).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kithmail import Core, InvalidInputError, config
from kithmail._core import normalize_address
from kithmail.layers import Action, Verdict
from kithmail.layers import recon as recon_layer
from kithmail.layers.recon import SpfCheck
from kithmail.layers.reputation import Reputation
from kithmail.layers.spoofing import spf as spf_layer
from kithmail.layers.spoofing.results import AuthResults
from kithmail.metrics import Metrics
from kithmail.spf import SpfChecker

__all__ = ["Limits", "PolicyService"]

log = logging.getLogger("kithmail.policy")


@dataclass(frozen=True, slots=True)
class Limits:
    max_line: int = 4096  # Postfix's longest attributes (ccert_*) fit well inside
    max_attributes: int = 128
    max_request: int = 64 * 1024
    idle_timeout: float = 600.0  # Postfix closes idle policy connections itself
    request_timeout: float = 10.0  # from the first line of a request to its end


DUNNO = "DUNNO"
_SAFE = str.maketrans({c: "?" for c in map(chr, [*range(32), 127])})


def _shown(value: str, n: int = 120) -> str:
    """A client-supplied value as it may appear in a log line."""
    return repr(value[:n].translate(_SAFE))


class _Malformed(Exception):
    pass


class PolicyService:
    """Answers Postfix policy requests with kithmail's layer decisions."""

    def __init__(
        self,
        settings: config.Settings,
        core: Core,
        reputation: Reputation,
        spf: SpfCheck,
        *,
        clock: Callable[[], float] = time.time,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.core = core
        self.reputation = reputation
        self.spf = spf
        # Layer 3's SPF needs the full checker (both identities, the domain
        # evaluated); a plain SpfCheck (tests give Recon a stand-in) gets one
        # built from [dns], so SPF queries still go to kithmail's nameservers.
        self._spf_checker = (
            spf
            if isinstance(spf, SpfChecker)
            else SpfChecker(settings.dns.nameservers, settings.dns.timeout)
        )
        self.clock = clock
        self.limits = limits or Limits()
        self.metrics = metrics
        self._clients = [ipaddress.ip_network(n) for n in settings.policy.policy_clients]
        self._trusted = [ipaddress.ip_network(n) for n in settings.domains.trusted_networks]
        # The settings in force for a recipient's domain (a tenant's, with
        # the database's overrides, under `kith serve`); None: `settings`.
        # Recon and SPF follow them, and Reputation too when
        # `reputation_for` gives the layer for such settings.
        self.settings_for: Callable[[str], config.Settings] | None = None
        self.reputation_for: Callable[[config.Settings], Reputation] | None = None
        # Headers already prepended per Postfix `instance` (one per message):
        # Postfix asks once per recipient, a header belongs once per message.
        self._prepended: collections.OrderedDict[str, set[str]] = collections.OrderedDict()

    # ------------------------------------------------------------ decisions

    async def decide(self, attrs: dict[str, str]) -> str:
        """The `action=` value for one request."""
        if attrs.get("request") != "smtpd_access_policy":
            log.warning("policy: unknown request type %s", _shown(attrs.get("request", "")))
            return DUNNO
        if attrs.get("protocol_state", "").upper() != "RCPT":
            return DUNNO
        client = attrs.get("client_address", "")
        try:
            addr = ipaddress.ip_address(client)
        except ValueError:
            log.warning("policy: no usable client_address %s", _shown(client))
            return DUNNO
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        ip = str(addr)
        if any(addr in n for n in self._trusted if n.version == addr.version):
            return DUNNO
        sender = attrs.get("sender", "")
        recipient = attrs.get("recipient", "")
        instance = attrs.get("instance", "")
        now = int(self.clock())

        try:
            folded_rcpt = normalize_address(recipient)
        except InvalidInputError:
            folded_rcpt = recipient.lower() or "<>"
        policy = self.settings
        reputation = self.reputation
        if self.settings_for is not None:
            policy = self.settings_for(folded_rcpt.rpartition("@")[2])
            if self.reputation_for is not None:
                reputation = self.reputation_for(policy)

        # A local allow-list match ends the question, Recon included.
        # (In shadow mode the match is recorded but does not skip Recon.)
        allow = reputation.allowlisted(addr)
        if allow is not None and not allow.shadow:
            return self._log(attrs, allow, DUNNO)
        t0 = time.perf_counter()
        rv = await recon_layer.check(
            self.core,
            policy.recon,
            [],
            client_ip=ip,
            mail_from=sender,
            recipient=folded_rcpt,
            now=now,
            spf=self.spf,
        )
        self._timed("recon", t0)
        if rv.acts:
            return self._log(attrs, rv, _action(rv))

        t0 = time.perf_counter()
        rep = await reputation.check(addr)
        self._timed("reputation", t0)
        if rep.acts:
            return self._log(attrs, rep, _action(rep))

        if self.settings.policy.spf:
            sv, header = await self._spf(ip, sender, attrs.get("helo_name", ""), policy.spf)
            if sv.acts:
                return self._log(attrs, sv, _action(sv))
            if header:
                return self._log(attrs, sv, self._prepend(instance, "Received-SPF", header))
        if rv.reason == "recon.passed":
            return self._log(attrs, rv, self._prepend(instance, "X-Kithmail-Recon", "passed"))
        return self._log(attrs, rv, DUNNO)

    async def _spf(
        self, ip: str, sender: str, helo: str, spf: config.Spf | None = None
    ) -> tuple[Verdict, str]:
        """Layer 3's SPF check (MAIL FROM, and HELO), as `[spf]` says to act on it.

        Returns the verdict and a Received-SPF value (RFC 7208 §9.1) to
        prepend; the client's strings go into it only when they are plain
        (no quotes, spaces or control characters), never as given.
        """
        v = await spf_layer.check(
            self._spf_checker,
            spf or self.settings.spf,
            AuthResults(),
            client_ip=ip,
            helo=helo,
            mail_from=sender,
        )
        res = v.reason.removeprefix("spf.")
        parts = [f"{res} (kithmail) client-ip={ip};"]
        if sender and _plain(sender):
            parts.append(f'envelope-from="{sender}";')
        if helo and _plain(helo):
            parts.append(f"helo={helo};")
        return v, " ".join(parts)

    def _prepend(self, instance: str, name: str, value: str) -> str:
        if not instance:
            return f"PREPEND {name}: {value}"
        done = self._prepended.setdefault(instance, set())
        self._prepended.move_to_end(instance)
        while len(self._prepended) > 10_000:
            self._prepended.popitem(last=False)
        if name in done:
            return DUNNO
        done.add(name)
        return f"PREPEND {name}: {value}"

    def _timed(self, layer: str, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.layer_seconds.labels("policy", layer).observe(time.perf_counter() - t0)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(result).inc()

    def _log(self, attrs: dict[str, str], v: Verdict, action: str) -> str:
        if self.metrics is not None:
            self.metrics.verdict(str(v.layer), str(v.action), v.shadow)
        # Every decision that changes what Postfix does is logged; a plain
        # DUNNO (the bulk, at thousands a second) only at debug level.
        level = logging.DEBUG if action == DUNNO else logging.INFO
        if not log.isEnabledFor(level):
            return action
        log.log(
            level,
            "policy client=%s helo=%s sender=%s rcpt=%s layer=%s reason=%s%s action=%s",
            attrs.get("client_address", ""),
            _shown(attrs.get("helo_name", "")),
            _shown(attrs.get("sender", "")),
            _shown(attrs.get("recipient", "")),
            v.layer,
            v.reason,
            " shadow" if v.shadow else "",
            action.split(" ", 1)[0],
        )
        return action

    # ------------------------------------------------------------ protocol

    def _parse(self, request: bytes) -> dict[str, str]:
        """`name=value` lines into attributes; every line bounded and checked."""
        lim = self.limits
        attrs: dict[str, str] = {}
        for line in request.split(b"\n"):
            line = line.rstrip(b"\r")
            if not line:
                continue
            if len(line) > lim.max_line:
                raise _Malformed(f"line longer than {lim.max_line} bytes")
            name, eq, value = line.partition(b"=")
            if not eq or not name:
                raise _Malformed(f"line without name=value: {_shown(line.decode('latin-1'))}")
            if len(attrs) >= lim.max_attributes:
                raise _Malformed(f"more than {lim.max_attributes} attributes")
            # Postfix sends UTF-8 (SMTPUTF8) or ASCII; anything else is kept
            # as escapes rather than refused: it is data to match, not to run.
            attrs[name.decode("ascii", "replace")] = value.decode("utf-8", "backslashreplace")
        return attrs

    def _allowed(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in n for n in self._clients if n.version == addr.version)

    async def answer(self, attrs: dict[str, str], host: str) -> bytes:
        """The wire answer to one parsed request; a failure is a 4xx, never a pass."""
        try:
            action = await self.decide(attrs)
            self._count("answered")
        except Exception:
            log.exception("policy: could not decide for %s", host)
            self._count("error")
            action = "DEFER_IF_PERMIT 4.3.0 Policy service error, try again later"
        return f"action={action}\n\n".encode()

    async def start(
        self, listeners: Sequence[str], *, reuse_port: bool = False
    ) -> list[asyncio.Server]:
        """Listen on each "IP:PORT" / "[IPv6]:PORT"; the servers are returned running.

        `reuse_port` lets several worker processes share each port
        (SO_REUSEPORT: the kernel spreads connections across them).
        """
        servers = []
        for spec in listeners:
            host, _, port = spec.rpartition(":")
            servers.append(
                await asyncio.get_running_loop().create_server(
                    lambda: _Connection(self),
                    host.strip("[]"),
                    int(port),
                    reuse_address=True,
                    reuse_port=reuse_port,
                )
            )
        return servers


class _Connection(asyncio.Protocol):
    """One Postfix connection: requests in, answers out, strictly in order.

    A protocol rather than streams: the read path is the service's hot loop,
    and this costs one buffer search per block read and one task per burst
    of requests, not a task and a timer per line. Timers: `idle_timeout`
    while no request is pending, `request_timeout` from the first byte of a
    request to its empty line.
    """

    def __init__(self, service: PolicyService) -> None:
        self.svc = service
        self.lim = service.limits
        self.buf = bytearray()
        self.pending: collections.deque[bytes] = collections.deque()
        self.worker: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.host = "?"
        self.closed = False
        self.in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.host = str(peer[0]) if peer else "?"
        if not self.svc._allowed(self.host):
            log.warning("policy: refused connection from %s (not in policy_clients)", self.host)
            self.svc._count("refused")
            self.closed = True
            transport.close()
            return
        self._arm(self.lim.idle_timeout, "idle too long")

    def _arm(self, seconds: float, why: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self._drop, why)

    def _drop(self, why: str) -> None:
        if self.closed:
            return
        log.warning("policy: closing connection from %s: %s", self.host, why)
        self.svc._count("malformed")
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        start = max(0, len(self.buf) - 1)
        self.buf += data
        while True:
            end = self.buf.find(b"\n\n", start)
            if end < 0:
                break
            self.pending.append(bytes(self.buf[: end + 1]))
            del self.buf[: end + 2]
            self.in_request = False
            start = 0
        if len(self.buf) > self.lim.max_request:
            self._drop(f"request over {self.lim.max_request} bytes")
            return
        # The request deadline runs from a request's first byte and is not
        # pushed back by later bytes of the same request (no slow drip).
        if self.buf and not self.in_request:
            self.in_request = True
            self._arm(self.lim.request_timeout, "request not finished in time")
        elif not self.buf:
            self.in_request = False
            self._arm(self.lim.idle_timeout, "idle too long")
        if self.pending and (self.worker is None or self.worker.done()):
            self.worker = asyncio.get_running_loop().create_task(self._work())
        if len(self.pending) > 64 and self.transport is not None:
            self.transport.pause_reading()  # a client far ahead of its answers

    async def _work(self) -> None:
        while self.pending and not self.closed:
            raw = self.pending.popleft()
            try:
                attrs = self.svc._parse(raw)
            except _Malformed as e:
                self._drop(str(e))
                return
            out = await self.svc.answer(attrs, self.host)
            if self.closed or self.transport is None:
                return
            self.transport.write(out)
            if len(self.pending) <= 64:
                self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        if self.buf and not self.closed:
            self._drop("connection closed in the middle of a request")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.worker is not None and not self.worker.done():
            self.worker.cancel()


def _plain(value: str) -> bool:
    """Safe to quote into a header: printable ASCII, no quote, space or backslash."""
    return len(value) <= 254 and all(33 <= ord(c) <= 126 and c not in '"\\;' for c in value)


def _action(v: Verdict) -> str:
    """A verdict as a Postfix access(5) action."""
    text = str(v.reply) if v.reply else ""
    detail = v.reply.text if v.reply else v.reason
    match v.action:
        case Action.DEFER:
            # DEFER_IF_PERMIT: defer only if no later restriction rejects.
            status = v.reply.status if v.reply else "4.7.1"
            return f"DEFER_IF_PERMIT {status} {detail}"
        case Action.REJECT:
            return text or f"REJECT 5.7.1 {detail}"
        case Action.QUARANTINE:
            return f"HOLD {v.reason}"
        case Action.TAG:
            return f"PREPEND X-Kithmail-{str(v.layer).capitalize()}: {v.reason}"
        case _:
            return DUNNO
