"""The delivery queue: takes accepted mail from the spool to its destinations.

One `Queue` runs in one process of the server (the others only accept
into the shared spool). It schedules every message with a recipient to
deliver (state PENDING or DEFERRED; HELD is the quarantine's), routes each
recipient by its domain — a `[domains] local` domain to `downstream`,
anything else to `outbound` — and runs at most `[queue] concurrency`
attempts at once, an attempt being one message's due recipients, one
transaction per destination (see `kithmail.queue.transports`).

Outcomes go to the spool, which is the only truth: a 2xx is marked
DELIVERED after the reply (a crash in between means a duplicate, never a
loss: RFC 5321 §6.1); a 4xx, a broken connection or `[queue] timeout` is
DEFERRED with ``attempt <n> via <relay>: <reply>`` in the detail, and the
next attempt comes `[queue] backoff[n-1]` after it (the last delay
repeats) — so attempt numbers and next-attempt times are read back from
the state records after a restart, never kept only in memory; a 5xx, or a
deferral once `[queue] lifetime` has passed since the message arrived, is
BOUNCED, and the sender gets one DSN per attempt (`kithmail.queue.dsn`),
spooled before the recipients are marked, as a new message delivered by
this same queue. When every recipient is final the message is removed.

Finding work: `notify(id)` from the SMTP listener of this process, and a
scan of the spool every `scan_interval` (0.5 s) for what other processes
accepted — cheap: one stat of ``active/``, listed only when it changed
(or changed recently, as directory times are coarse). The same scan reads
the admin controls `kith queue` leaves in the spool (`Spool.hold_sync`,
`Spool.request_flush_sync`): a message on hold is not attempted; a flush
request makes its messages due now. Whoever moves a recipient back to
PENDING (a quarantine release) calls `notify` or `request_flush_sync`.

Trusts the spool (checksummed) and the settings; every string from a
message or a server that reaches a log line is quoted and escaped. Metric
labels are closed sets, never an address, IP or queue id.

Standards: RFC 5321 (§4.5.4.1 retry strategy, §6.1 reliable delivery),
RFC 3464 (DSN), RFC 3463 (status codes).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from kithmail import config
from kithmail.dns import Resolver
from kithmail.queue import dsn
from kithmail.queue.transports import (
    Job,
    Result,
    Target,
    deferred,
    deliver,
    fold_domain,
    parse_target,
    split_address,
)
from kithmail.spool import (
    CorruptMessageError,
    MessageNotFoundError,
    QueueId,
    RecipientStatus,
    Spool,
    SpooledMessage,
    SpoolError,
    State,
    StateError,
)

__all__ = ["Queue", "attempts_of", "next_attempt"]

log = logging.getLogger("kithmail.queue")

DELIVERABLE = frozenset({State.PENDING, State.DEFERRED})
_ATTEMPT = re.compile(r"\battempt (\d+)\b")
# Messages loaded per trip to a thread: a restart over a big spool keeps
# dispatching between batches instead of reading everything first.
LOAD_BATCH = 256
# Directory times are coarse (a clock tick): a listing is skipped only when
# active/ did not change since the last one and not within this many seconds.
_MTIME_SLACK = 2.0


def attempts_of(status: RecipientStatus) -> int:
    """Delivery attempts made so far for a recipient, as its state records say."""
    if status.state is not State.DEFERRED:
        return 0
    m = _ATTEMPT.search(status.detail)
    return int(m.group(1)) if m else 1


def next_attempt(status: RecipientStatus, backoff: Sequence[float], expires: float) -> float:
    """When a PENDING or DEFERRED recipient is due (seconds since the epoch).

    PENDING is due at once; DEFERRED `backoff[n-1]` after its last attempt
    (the last delay repeats), but never after the message `expires`, so
    that the last attempt and the bounce come on time.
    """
    if status.state is not State.DEFERRED or status.at is None:
        return 0.0
    delays = backoff or (60.0,)
    n = attempts_of(status)
    return min(status.at + delays[min(max(n, 1), len(delays)) - 1], expires)


def _q(value: object) -> str:
    s = str(value)
    if s and s.isprintable() and not any(c in s for c in ' "=\\'):
        return s
    return json.dumps(s)


def _kv(**fields: object) -> str:
    return " ".join(f"{k}={_q(v)}" for k, v in fields.items())


@dataclass(frozen=True, slots=True)
class _Route:
    key: str  # one transaction per key: "downstream", "outbound", "mx:<domain>"
    target: Target


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "kithmail_delivery_attempts",
            "Delivery attempts per recipient, by result: delivered, deferred, bounced.",
            ["result"],
            registry=registry,
        )
        self.messages = Gauge(
            "kithmail_queue_messages",
            "Messages in the queue with a recipient still to deliver.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.oldest = Gauge(
            "kithmail_queue_oldest_seconds",
            "Age of the oldest message in the queue with a recipient still to deliver.",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.dsn_sent = Counter(
            "kithmail_dsn_sent",
            "Delivery status notifications (bounces) spooled for senders.",
            registry=registry,
        )
        for result in ("delivered", "deferred", "bounced"):
            self.attempts.labels(result)


class Queue:
    """The delivery queue over one spool. See the module docstring.

    `resolver` serves `outbound = "mx"` (without one, MX delivery defers).
    `clock` gives the time of attempts and due times (seconds since the
    epoch, like `Envelope.received`). `scan_interval` is how often the spool
    is looked at for work from other processes and `kith queue`; `mx_port`
    is the port MX hosts are reached on (25; tests use another).
    """

    def __init__(
        self,
        spool: Spool,
        settings: config.Settings,
        *,
        resolver: Resolver | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        scan_interval: float = 0.5,
        mx_port: int = 25,
    ) -> None:
        self._spool = spool
        self._settings = settings
        self._resolver = resolver
        self._clock = clock
        self._scan_interval = scan_interval
        self._mx_port = mx_port
        self._local = frozenset(settings.domains.local)
        self._downstream = parse_target(settings.domains.downstream)
        self._outbound = parse_target(settings.domains.outbound)
        self._metrics = _Metrics(REGISTRY if registry is None else registry)

        self._known: set[QueueId] = set()  # in active/ as of the last look
        self._incoming: set[QueueId] = set()  # to (re)load and schedule
        self._forced: set[QueueId] = set()  # flushed: every deliverable recipient, now
        self._again: set[QueueId] = set()  # due again while in flight
        self._due: dict[QueueId, float] = {}
        self._heap: list[tuple[float, QueueId]] = []
        self._received: dict[QueueId, float] = {}  # messages with a recipient to deliver
        self._inflight: dict[QueueId, asyncio.Task[None]] = {}
        self._held: frozenset[QueueId] = frozenset()
        self._parked: set[QueueId] = set()  # due but on admin hold
        self._active_mtime = -1
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False

    # ------------------------------------------------------------ the face

    def reload(self, settings: config.Settings) -> None:
        """New settings (SIGHUP): lifetime, backoff, concurrency, timeout and routes.

        Deliveries in flight finish as they began; every attempt from now
        on follows the new settings.
        """
        self._settings = settings
        self._local = frozenset(settings.domains.local)
        self._downstream = parse_target(settings.domains.downstream)
        self._outbound = parse_target(settings.domains.outbound)

    async def start(self) -> None:
        """Schedule every message already in the spool and start delivering.

        Call `Spool.recover` first (the server does, once, before anything
        is accepted).
        """
        if self._runner is not None:
            raise RuntimeError("the queue is already running")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        ids = await self._spool.queue_ids()
        self._incoming.update(ids)
        self._runner = asyncio.create_task(self._run(), name="kithmail-queue")

    def notify(self, queue_id: str) -> None:
        """A message was just accepted: schedule it now. Never blocks; any thread."""
        qid = QueueId(queue_id)
        loop = self._loop
        if loop is None or self._stopping:
            return  # start() will find it in the spool
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._take(qid)
        else:
            loop.call_soon_threadsafe(self._take, qid)

    async def flush(self, queue_id: str | None = None) -> None:
        """Make one message (or every message) due now, whatever its backoff."""
        if queue_id is None:
            ids: Iterable[QueueId] = set(self._known) | set(self._due) | self._parked
        else:
            ids = (QueueId(queue_id),)
        for qid in ids:
            self._forced.add(qid)
            self._take(qid)

    async def stop(self, timeout: float) -> None:
        """Stop scheduling; let attempts in flight finish within `timeout`, cancel the rest.

        A cancelled attempt records nothing more: its recipients stay
        pending (or deferred) and are attempted again after a restart.
        """
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        tasks = list(self._inflight.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                log.info(_kv(event="stop", cancelled=len(pending)))

    # ------------------------------------------------------------ scheduling

    def _take(self, qid: QueueId) -> None:
        if self._stopping:
            return
        self._incoming.add(qid)
        if self._wake is not None:
            self._wake.set()

    def _set_due(self, qid: QueueId, due: float) -> None:
        self._due[qid] = due
        heapq.heappush(self._heap, (due, qid))

    def _forget(self, qid: QueueId) -> None:
        self._known.discard(qid)
        self._due.pop(qid, None)
        self._received.pop(qid, None)
        self._parked.discard(qid)
        self._forced.discard(qid)

    def _route(self, address: str) -> _Route:
        domain = fold_domain(split_address(address)[1])
        if not domain or domain in self._local:
            return _Route("downstream", self._downstream)
        if self._outbound.scheme == "mx":
            return _Route(f"mx:{domain}", self._outbound)
        return _Route("outbound", self._outbound)

    def _expires(self, msg: SpooledMessage) -> float:
        return msg.envelope.received + self._settings.queue.lifetime

    def _schedule(self, msg: SpooledMessage) -> None:
        """Put a freshly loaded message where its recipients' states say it belongs."""
        qid = msg.queue_id
        self._known.add(qid)
        todo = [r for r in msg.recipients if r.state in DELIVERABLE]
        if not todo:
            self._due.pop(qid, None)
            self._received.pop(qid, None)
            self._forced.discard(qid)
            if not msg.pending:
                self._set_due(qid, -math.inf)  # the attempt removes it
            return
        self._received[qid] = msg.envelope.received
        if qid in self._forced:
            due = -math.inf
        else:
            backoff, expires = self._settings.queue.backoff, self._expires(msg)
            due = min(next_attempt(r, backoff, expires) for r in todo)
        self._set_due(qid, due)

    async def _run(self) -> None:
        assert self._wake is not None
        next_scan = 0.0
        while not self._stopping:
            self._wake.clear()
            if time.monotonic() >= next_scan:
                await self._scan()
                next_scan = time.monotonic() + self._scan_interval
            if self._incoming:
                await self._load_some()
            self._dispatch()
            wait = next_scan - time.monotonic()
            if self._heap and len(self._inflight) < self._settings.queue.concurrency:
                wait = min(wait, self._heap[0][0] - self._clock())
            if self._incoming:
                wait = 0
            if wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            else:
                await asyncio.sleep(0)  # let notify() and finished attempts in

    async def _scan(self) -> None:
        try:
            ids, held, flushes = await asyncio.to_thread(self._scan_sync)
        except (OSError, SpoolError) as e:
            log.error(_kv(event="scan", error=e))
            return
        if ids is not None:
            now_there = set(ids)
            for qid in self._known - now_there:
                if qid not in self._inflight:
                    self._forget(qid)
            self._incoming.update(now_there - self._known)
        for qid in self._held - held:  # released: look at it afresh
            if qid in self._parked or qid in self._known:
                self._parked.discard(qid)
                self._incoming.add(qid)
        self._held = held
        for request in flushes:
            if request is None:
                await self.flush()
            else:
                await self.flush(request)
        self._metrics.messages.set(len(self._received))
        oldest = min(self._received.values(), default=None)
        self._metrics.oldest.set(0 if oldest is None else max(0.0, self._clock() - oldest))

    def _scan_sync(self) -> tuple[list[QueueId] | None, frozenset[QueueId], list[QueueId | None]]:
        st = os.stat(self._spool.root / "active")
        ids = None
        if st.st_mtime_ns != self._active_mtime or time.time() - st.st_mtime < _MTIME_SLACK:
            self._active_mtime = st.st_mtime_ns
            ids = self._spool.queue_ids_sync()
        return ids, self._spool.held_sync(), self._spool.take_flush_requests_sync()

    async def _load_some(self) -> None:
        batch = sorted(self._incoming)[:LOAD_BATCH]
        self._incoming.difference_update(batch)
        loaded = await asyncio.to_thread(self._load_sync, batch)
        for qid, msg in loaded:
            if msg is None:
                if qid not in self._inflight:
                    self._forget(qid)
            elif qid in self._inflight:
                self._again.add(qid)
            else:
                self._schedule(msg)

    def _load_sync(self, ids: list[QueueId]) -> list[tuple[QueueId, SpooledMessage | None]]:
        out: list[tuple[QueueId, SpooledMessage | None]] = []
        for qid in ids:
            try:
                out.append((qid, self._spool.load_sync(qid, verify=False)))
            except MessageNotFoundError:
                out.append((qid, None))
            except SpoolError as e:
                # Torn or unreadable: never delivered; recover() deals with it
                # at the next start. Known, so that it is not read every scan.
                log.error(_kv(event="load", queue_id=qid, error=e))
                self._known.add(qid)
        return out

    def _dispatch(self) -> None:
        now = self._clock()
        limit = self._settings.queue.concurrency
        while self._heap and self._heap[0][0] <= now and len(self._inflight) < limit:
            due, qid = heapq.heappop(self._heap)
            if self._due.get(qid) != due:
                continue  # superseded by a later schedule
            del self._due[qid]
            if qid in self._inflight:
                self._again.add(qid)
                continue
            if qid in self._held:
                self._parked.add(qid)
                continue
            task = asyncio.create_task(self._attempt(qid), name=f"kithmail-queue-{qid}")
            self._inflight[qid] = task

    # ------------------------------------------------------------ one attempt

    async def _attempt(self, qid: QueueId) -> None:
        forced = qid in self._forced
        self._forced.discard(qid)
        try:
            await self._attempt_message(qid, forced)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(_kv(event="attempt", queue_id=qid, error="internal"))
            backoff = self._settings.queue.backoff or [60.0]
            self._set_due(qid, self._clock() + backoff[0])
        finally:
            self._inflight.pop(qid, None)
            if qid in self._again:
                self._again.discard(qid)
                self._take(qid)
            if self._wake is not None:
                self._wake.set()

    async def _attempt_message(self, qid: QueueId, forced: bool) -> None:
        if self._spool.is_held(qid):  # put on hold since the last scan
            self._parked.add(qid)
            return
        try:
            msg = await self._spool.load(qid, verify=True)
        except MessageNotFoundError:
            self._forget(qid)
            return
        except CorruptMessageError as e:
            log.error(_kv(event="attempt", queue_id=qid, error=e))
            self._received.pop(qid, None)
            return
        now = self._clock()
        backoff, expires = self._settings.queue.backoff, self._expires(msg)
        todo = [
            r
            for r in msg.recipients
            if r.state in DELIVERABLE and (forced or next_attempt(r, backoff, expires) <= now)
        ]
        groups: dict[str, tuple[Target, list[RecipientStatus]]] = {}
        for r in todo:
            route = self._route(r.recipient.address)
            groups.setdefault(route.key, (route.target, []))[1].append(r)
        for target, recipients in groups.values():
            job = Job(
                msg,
                recipients,
                hostname=self._settings.server.hostname,
                timeout=self._settings.queue.timeout,
            )
            try:
                async with asyncio.timeout(self._settings.queue.timeout):
                    await deliver(target, job, resolver=self._resolver, mx_port=self._mx_port)
            except TimeoutError:
                t = self._settings.queue.timeout
                job.settle(deferred(f"451 4.4.2 [queue] timeout: no result within {t:g}s", ""))
            except Exception as e:  # a bug of ours must not lose the attempt's results
                log.exception(_kv(event="deliver", queue_id=qid, relay=str(target)))
                job.settle(deferred(f"451 4.3.0 internal error: {type(e).__name__}", ""))
            if not await self._record(msg, job):
                return  # the message went away under us (or was delivered and removed)
        await self._finish(qid)

    async def _finish(self, qid: QueueId) -> None:
        try:
            msg = await self._spool.load(qid, verify=False)
        except MessageNotFoundError:
            self._forget(qid)
            return
        if not msg.pending:
            with contextlib.suppress(MessageNotFoundError, StateError):
                await self._spool.remove(qid)
            self._forget(qid)
            log.info(_kv(event="removed", queue_id=qid))
            return
        self._schedule(msg)

    async def _record(self, msg: SpooledMessage, job: Job) -> bool:
        """Write each recipient's result to the spool; False if the message is gone."""
        qid, env = msg.queue_id, msg.envelope
        now = self._clock()
        expired = now >= self._expires(msg)
        failures: list[dsn.Failure] = []
        marks: list[tuple[RecipientStatus, State, str, Result]] = []
        for r in job.recipients:
            res = job.results.get(r.index) or deferred("451 4.4.2 no result", job.relay)
            relay = res.relay or job.relay or "-"
            n = attempts_of(r) + 1
            if res.state is State.DEFERRED and expired:
                status = res.status if res.status.startswith("4.") else "4.4.7"
                failures.append(dsn.Failure(r, status, res.reply, _remote(relay), expired=True))
                detail = f"expired after attempt {n} via {relay}: {res.reply}"
                marks.append((r, State.BOUNCED, detail, res))
            elif res.state is State.BOUNCED:
                failures.append(dsn.Failure(r, res.status, res.reply, _remote(relay)))
                marks.append((r, State.BOUNCED, f"attempt {n} via {relay}: {res.reply}", res))
            elif res.state is State.DELIVERED:
                marks.append((r, State.DELIVERED, f"attempt {n} via {relay}: {res.reply}", res))
            else:
                marks.append((r, State.DEFERRED, f"attempt {n} via {relay}: {res.reply}", res))

        # Every open recipient delivered in this one transaction (the common
        # case): removing the message records it, with no state line or
        # fsync per recipient. A crash before the removal reaches the disk
        # delivers it again: a duplicate, never a loss.
        open_now = {r.index for r in msg.recipients if not r.state.final}
        if (
            marks
            and all(state is State.DELIVERED for _, state, _, _ in marks)
            and {r.index for r, _, _, _ in marks} == open_now
        ):
            try:
                await self._spool.remove(qid, force=True, durable=False)
            except MessageNotFoundError:
                return False
            self._log_marks(msg, job, marks)
            self._forget(qid)
            log.info(_kv(event="removed", queue_id=qid))
            return False

        # Deliveries and deferrals first: the sooner a 2xx is on disk, the
        # smaller the window in which a crash makes a duplicate.
        if not await self._mark_all(msg, job, [m for m in marks if m[1] is not State.BOUNCED]):
            return False
        bounces = [m for m in marks if m[1] is State.BOUNCED]
        notify = [f for f in failures if dsn.should_notify(env, f.recipient.recipient)]
        if notify:
            try:
                await self._send_dsn(msg, notify, now)
            except SpoolError as e:
                # The bounce stays unrecorded, so that the sender is not left
                # uninformed: those recipients are deferred and tried again.
                log.error(_kv(event="dsn", queue_id=qid, error=e))
                waiting = {id(f.recipient) for f in notify}
                bounces = [
                    (r, State.DEFERRED, f"{detail}; DSN not spooled: {e}", res)
                    if id(r) in waiting
                    else (r, state, detail, res)
                    for r, state, detail, res in bounces
                ]
        return await self._mark_all(msg, job, bounces)

    async def _mark_all(
        self, msg: SpooledMessage, job: Job, marks: list[tuple[RecipientStatus, State, str, Result]]
    ) -> bool:
        qid, now = msg.queue_id, self._clock()
        for r, state, detail, res in marks:
            try:
                await self._spool.mark(qid, r.index, state, detail)
            except MessageNotFoundError:
                return False
            except StateError as e:
                # Made final elsewhere meanwhile (`kith queue delete`).
                log.warning(_kv(event="mark", queue_id=qid, rcpt=r.recipient.address, error=e))
                continue
            except SpoolError as e:
                log.error(_kv(event="mark", queue_id=qid, rcpt=r.recipient.address, error=e))
                continue
            self._log_marks(msg, job, [(r, state, detail, res)], now)
        return True

    def _log_marks(
        self,
        msg: SpooledMessage,
        job: Job,
        marks: list[tuple[RecipientStatus, State, str, Result]],
        now: float | None = None,
    ) -> None:
        now = self._clock() if now is None else now
        for r, state, _, res in marks:
            self._metrics.attempts.labels(state.value).inc()
            log.info(
                _kv(
                    queue_id=msg.queue_id,
                    rcpt=r.recipient.address,
                    relay=res.relay or job.relay or "-",
                    reply=res.reply,
                    state=state.value,
                    delay=f"{max(0.0, now - msg.envelope.received):.1f}",
                    attempt=attempts_of(r) + 1,
                )
            )

    async def _send_dsn(self, msg: SpooledMessage, failures: list[dsn.Failure], now: float) -> None:
        host = self._settings.server.hostname
        headers = await asyncio.to_thread(dsn.header_block, msg)
        data = dsn.compose(hostname=host, message=msg, failures=failures, headers=headers, now=now)
        env = dsn.envelope_for(msg.envelope, now=now, hostname=host)
        dsn_id = await self._spool.accept(env, data)
        self._metrics.dsn_sent.inc()
        log.info(_kv(event="dsn", queue_id=msg.queue_id, dsn_id=dsn_id, failed=len(failures)))
        self._take(dsn_id)


def _remote(relay: str) -> str:
    """The Remote-MTA of a relay as we name it ("host[ip]:port" → host)."""
    if relay in ("maildir", "-") or relay.startswith("mx:"):
        return ""
    host = relay.split("[", 1)[0] if "[" in relay and not relay.startswith("[") else relay
    return host.rsplit(":", 1)[0].strip("[]")
