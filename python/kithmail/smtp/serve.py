"""Running the services: build them from settings, serve, stop cleanly.

Trusts its settings (validated by `config`). On SIGTERM or SIGINT the
listeners close, connections in flight finish their request, and the core's
group-commit buffer is flushed before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kithmail import config
from kithmail.dns import Resolver
from kithmail.handoff import Handoff
from kithmail.heap import ARENAS, limit_arenas
from kithmail.layers.reputation import Reputation
from kithmail.metrics import Metrics, multiprocess_dir, retention_deleted, serve_metrics
from kithmail.runtime import open_core, setup_logging
from kithmail.smtp.policy import PolicyService
from kithmail.spf import SpfChecker

log = logging.getLogger("kithmail.serve")


def serve_policy(settings: config.Settings) -> int:
    """Run the policy service on `[server] listeners.policy`; 0 after a clean stop.

    /metrics is served on the first `[server] listeners.web` address.

    With `[server] workers` > 1 the process forks that many workers, each
    opening the core after the fork (LMDB must not cross a fork) and binding
    every listener with SO_REUSEPORT; the parent forwards SIGTERM/SIGINT and
    waits for them.
    """
    setup_logging(settings)
    n = settings.server.workers
    web = settings.server.listeners.web[0]
    if n <= 1:
        serve_metrics(web, multiprocess=False)
        log.info("metrics on http://%s/metrics", web)
        return _worker(settings, reuse_port=False)
    multiprocess_dir(settings.server.data_dir)
    serve_metrics(web, multiprocess=True)
    log.info("metrics on http://%s/metrics (merged from %d workers)", web, n)
    return fork_workers(n, lambda _i: _worker(settings, reuse_port=True))


def fork_workers(n: int, work: Callable[[int], int]) -> int:
    """Fork `n` workers running `work(index)`, forward SIGTERM/SIGINT/SIGHUP, wait for them all.

    Returns the worst exit status. Each worker opens what must not cross a
    fork (the LMDB environment, the event loop) itself, after the fork.

    The workers stand or fall together: when one exits before the parent
    was told to stop (an error at start, a crash, the OOM killer), the log
    says which and why, the others are stopped, and the status is not 0, so
    that the supervisor (systemd's Restart=on-failure) starts the whole
    server again. Worker 0 alone runs the queue and the web listener: a
    server left with the others would accept mail it never delivers.
    """
    children: dict[int, int] = {}  # pid -> worker index
    # Until a worker's event loop takes SIGHUP over (or for good, in the
    # parent until `forward` is set), a SIGHUP is ignored, never fatal.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = work(i)
            except Exception:
                # os._exit below skips the interpreter's own report: without
                # this line a worker that fails (at start: a module that will
                # not import, a port in use) vanishes without a word.
                log.exception("worker %d (pid %d) failed", i, os.getpid())
            finally:
                os._exit(code)
        children[pid] = i
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or sig != signal.SIGHUP
        for c in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)  # each worker reloads its settings
    worst = 0
    while children:
        # Whichever worker ends first (waiting for them in order would wait
        # on a live worker for ever while another is already gone).
        pid, status = os.wait()
        index = children.pop(pid, None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        worst = max(worst, code & 0xFF)
        if stopping:
            continue
        stopping = True
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        log.log(
            logging.INFO if code == 0 else logging.ERROR,
            "worker %d (pid %d) %s; stopping the other workers",
            index,
            pid,
            how,
        )
        for c in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(c, signal.SIGTERM)
    return worst


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _worker(settings: config.Settings, *, reuse_port: bool) -> int:
    core = open_core(settings)
    try:
        resolver = Resolver.from_settings(settings.dns)
        service = PolicyService(
            settings,
            core,
            Reputation.from_settings(core, settings, resolver),
            SpfChecker(settings.dns.nameservers, settings.dns.timeout),
            metrics=Metrics("policy"),
        )
        asyncio.run(_run(service, settings.server.listeners.policy, reuse_port))
    finally:
        core.flush()
        core.close()
    return 0


async def _run(service: PolicyService, listeners: list[str], reuse_port: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(
        signal.SIGHUP,
        lambda: log.warning(
            "SIGHUP: kith policy does not reload; restart it (pid %d)", os.getpid()
        ),
    )
    servers = await service.start(listeners, reuse_port=reuse_port)
    for spec in listeners:
        log.info("policy service listening on %s (pid %d)", spec, os.getpid())
    await stop.wait()
    log.info("policy service stopping (pid %d)", os.getpid())
    for s in servers:
        s.close()
    for s in servers:
        await s.wait_closed()


# ---------------------------------------------------------------- kith serve


class TestClock:
    """The movable clock of `kith serve --test-hooks` (DESIGN.md: test hooks).

    The time is the wall clock plus the seconds in `<data_dir>/test-clock`
    (a number; a missing file is 0), read at most every 20 ms, so a test
    moves the server's time by writing the file. Never used without the flag.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0.0
        self._read = 0.0

    def __call__(self) -> float:
        now = time.time()
        if now - self._read > 0.02:
            self._read = now
            try:
                self._offset = float(self.path.read_text().strip() or 0)
            except (OSError, ValueError):
                self._offset = 0.0
        return now + self._offset


def serve_gateway(settings: config.Settings, *, test_hooks: bool = False) -> int:
    """`kith serve`: the inbound SMTP listener, the queue, the policy service, /metrics.

    Before any worker exists the parent prepares what must happen once:
    the database (migrated; the first admin account, whose password is
    printed once), the spool's recovery after a crash, and the TLS
    certificate. Each worker then opens the core after the fork. With
    `[server] workers` > 1 every worker binds each listener with
    SO_REUSEPORT and worker 0 also runs the delivery queue.

    `test_hooks` (`kith serve --test-hooks`, for tests only) makes the
    server's clock movable through `<data_dir>/test-clock` (`TestClock`).
    """
    from kithmail import db as dbmod
    from kithmail import tls
    from kithmail.spool import Spool

    setup_logging(settings)
    # Before any thread or worker exists: glibc's malloc arenas (`kithmail.heap`);
    # said once the start can no longer fail on the database or the spool.
    arenas_limited = limit_arenas()
    # A SIGHUP before the workers' event loops take it over is ignored.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    data_dir = settings.server.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    database = dbmod.Database.open(data_dir / "kithmail.db")
    try:
        database.sync_domains(settings.domains.local)
        password = database.ensure_admin(settings.domains.local[0])
    finally:
        database.close()
    if password is not None:
        print(
            f"kithmail: created the admin account admin@{settings.domains.local[0]} "
            f"with password {password} (shown once; change it with kith user passwd)",
            flush=True,
        )
    spool = Spool(data_dir / "spool", reserve_bytes=settings.server.spool_reserve)
    rec = spool.recover_sync()
    log.info(
        "spool recovered: pending=%d finished=%d corrupt=%d unacknowledged=%d",
        len(rec.pending),
        len(rec.finished),
        len(rec.corrupt),
        len(rec.unacknowledged),
    )
    for name, why in rec.corrupt:
        log.error("spool: %s moved to corrupt/: %s", name, why)
    _reconcile_quarantine(settings, spool)
    context = tls.server_context(settings)
    load_local_lists(settings)
    clock: Callable[[], float] = time.time
    if test_hooks:
        clock = TestClock(data_dir / "test-clock")
        log.warning("test hooks on: the clock follows %s", data_dir / "test-clock")

    if arenas_limited:
        log.info("malloc: at most %d arenas per process (MALLOC_ARENA_MAX overrides)", ARENAS)
    n = settings.server.workers
    # Worker 0 serves the web listener (UI, API, /healthz, /readyz, /metrics);
    # with several workers /metrics merges their multiprocess files.
    if n <= 1:
        return _gateway_worker(settings, context, clock, index=0, reuse_port=False)
    multiprocess_dir(data_dir)
    handoff = Handoff()  # the other workers' accepted mail to worker 0's queue at once
    return fork_workers(
        n,
        lambda i: _gateway_worker(
            settings, context, clock, index=i, reuse_port=True, handoff=handoff
        ),
    )


def _reconcile_quarantine(settings: config.Settings, spool: Any) -> None:
    """The quarantine index made to match the spool (its truth), before any worker runs.

    A crash between accepting a held message and indexing it leaves the
    message held but unindexed; this is where it is found, once.
    """
    from kithmail import db as dbmod
    from kithmail.quarantine import Quarantine
    from kithmail.tenants import Policies

    database = dbmod.Database.open(settings.server.data_dir / "kithmail.db")
    try:
        q = Quarantine(database, spool, policies=Policies(settings, database.tenant_of))
        r = q.reconcile_sync()
        log.info("quarantine reconciled: held=%d added=%d removed=%d", r.held, r.added, r.removed)
    finally:
        database.close()


def load_local_lists(settings: config.Settings) -> None:
    """Load `[reputation] local_lists` into the core, each replacing its list at once.

    Runs in the parent before any worker forks, with the core opened and
    closed again here (LMDB must not cross a fork). A list that cannot be
    read or parsed stops the start with a message naming the file and line.
    """
    lists = settings.reputation.local_lists
    if not lists:
        return
    core = open_core(settings)
    try:
        load_lists(core, settings)
    finally:
        core.close()
        del core
        gc.collect()  # every reference gone before the fork


def load_lists(core: Any, settings: config.Settings) -> None:
    """Each of `[reputation] local_lists` read into the open core, replacing its list at once.

    Lists loaded by other means (`kith reputation load`) are left alone.
    """
    now = int(time.time())
    for ll in settings.reputation.local_lists:
        n = core.reputation.load_file(
            ll.name, ll.kind, str(ll.path), action=ll.action, score=ll.score, now=now
        )
        log.info("reputation list %s loaded from %s: %d prefixes", ll.name, ll.path, n)
    core.flush()


def _gateway_worker(
    settings: config.Settings,
    context: Any,
    clock: Callable[[], float],
    *,
    index: int,
    reuse_port: bool,
    handoff: Handoff | None = None,
) -> int:
    core = open_core(settings)
    try:
        asyncio.run(
            _run_gateway(
                settings,
                core,
                context,
                clock,
                index=index,
                reuse_port=reuse_port,
                handoff=handoff,
            )
        )
    finally:
        core.flush()
        core.close()
    return 0


async def _run_gateway(
    settings: config.Settings,
    core: Any,
    context: Any,
    clock: Callable[[], float],
    *,
    index: int,
    reuse_port: bool,
    handoff: Handoff | None = None,
) -> None:
    from kithmail import db as dbmod
    from kithmail.layers import Action, Layer, Verdict
    from kithmail.layers.antivirus import Antivirus
    from kithmail.layers.community import Community
    from kithmail.layers.spoofing import Spoofing
    from kithmail.layers.spoofing.spf import for_pipeline as spf_layer
    from kithmail.metrics import SmtpMetrics
    from kithmail.overrides import Overrides
    from kithmail.pipeline import MessageContext, Pipeline
    from kithmail.public import make_app, serve_public
    from kithmail.quarantine import Quarantine
    from kithmail.queue import Queue
    from kithmail.sav import Sav
    from kithmail.sav.rules import header_fields
    from kithmail.smtp.inbound import Gateway
    from kithmail.smtp.submission import Submission
    from kithmail.spool import Envelope, Outcome, Spool
    from kithmail.stats import Stats
    from kithmail.tenants import Policies, TenantPolicy

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reload_requested = asyncio.Event()  # SIGHUP (`kithmail.reload`)
    loop.add_signal_handler(signal.SIGHUP, reload_requested.set)
    data_dir = settings.server.data_dir
    database = dbmod.Database.open(data_dir / "kithmail.db")
    database.sync_domains(settings.domains.local)
    resolver = Resolver.from_settings(settings.dns)
    spf = SpfChecker(settings.dns.nameservers, settings.dns.timeout)
    metrics = Metrics("smtp")
    antivirus = Antivirus()
    spoofing = Spoofing(resolver)
    community = Community(core, psl=spoofing.psl)

    def make_pipeline(s: config.Settings) -> Pipeline:
        return Pipeline(
            s,
            core,
            resolver,
            spf,
            metrics=metrics,
            spf_layer=spf_layer(spf),
            message_layers=[spoofing.message, antivirus],
            trusted_message_layers=[antivirus],
            community=community,
        )

    pipeline = make_pipeline(settings)
    spool = Spool(data_dir / "spool", reserve_bytes=settings.server.spool_reserve)
    queue = Queue(spool, settings, resolver=resolver, clock=clock) if index == 0 else None
    # What this worker accepted, to the queue: its own (worker 0) or worker 0's by the
    # handoff pipe; else (no pipe) worker 0's spool scan finds it.
    to_queue: Callable[[str], None] | None = None
    if queue is not None:
        to_queue = queue.notify
    elif handoff is not None:
        to_queue = handoff.sender()
    callahead = None
    if settings.domains.verify_recipients == "downstream":
        from kithmail.queue.callahead import CallAhead

        callahead = CallAhead(
            settings.domains.downstream,
            hostname=settings.server.hostname,
            ttl=settings.domains.callahead_ttl,
            negative_ttl=settings.domains.callahead_negative_ttl,
            timeout=settings.domains.callahead_timeout,
        ).check
    # Policy: the file's settings, then the database's global and tenant
    # overrides over them (`kithmail.overrides`); a SIGHUP swaps the file's.
    overrides = Overrides(database, lambda: policies.settings)
    policies = Policies(settings, database.tenant_of, overrides)
    quarantine = Quarantine(database, spool, policies=policies, clock=clock)
    stats = Stats(clock, lambda d: p.tenant if (p := policies.for_domain(d)) else None)
    flusher = asyncio.create_task(_flush_stats(stats, database))
    sav = Sav(database, settings, clock=clock)
    sav.settings_for = lambda tenant: policies.for_tenant(tenant).settings

    def user_of(address: str) -> str:
        found = database.find_user(address)
        if found is not None:
            return found.address
        local, _, domain = address.lower().rpartition("@")
        return f"{local.split('+', 1)[0]}@{domain}"

    async def may_hold(addresses: list[str], size: int) -> str | None:
        for address in addresses:
            ok, why = await quarantine.hold_allowed(address, size)
            if not ok:
                return why
        return None

    async def on_held(queue_id: str, envelope: Envelope, ctx: MessageContext) -> None:
        await quarantine.index(queue_id)
        headers = header_fields(b"".join(ctx.header) + b"\r\n")
        for r in envelope.recipients:
            acting = [v for v in r.verdicts if v.acts]
            # Only a copy the community held is challenged: one that an
            # earlier layer held (a softfail, a virus) never is.
            if r.outcome is not Outcome.QUARANTINE or not acting:
                continue
            if acting[0].reason != "community.unknown":
                continue
            challenge_id, why = await sav.challenge(
                spool,
                tenant=envelope.tenant,
                user=user_of(r.address),
                sender=envelope.mail_from,
                queue_id=queue_id,
                headers=headers,
                auth=ctx.auth,
            )
            log.info(
                "sav queue_id=%s rcpt=%s challenge=%s reason=%s",
                queue_id,
                r.address,
                challenge_id or "-",
                why,
            )
            if challenge_id is not None and to_queue is not None:
                to_queue(challenge_id)

    async def on_verified(tenant: str, user: str, sender: str) -> None:
        core.community.add(user, sender, "allow", "sav", int(clock()))
        released = await quarantine.release_sender(user, sender, actor="sav")
        log.info("sav verified user=%s sender=%s released=%d", user, sender, len(released))

    def sav_token_ok(token: str) -> bool:
        return not isinstance(sav.check(token), str)

    async def sav_reply(token: str, sender: str, ctx: MessageContext) -> Verdict:
        headers = header_fields(b"".join(ctx.header) + b"\r\n")
        data, reason = await asyncio.to_thread(sav.verify_reply, token, sender, ctx.auth, headers)
        if data is None:
            return Verdict(Layer.COMMUNITY, Action.DISCARD, reason, "a reply that does not count")
        ok = await sav.confirm(data, on_verified)
        return Verdict(
            Layer.COMMUNITY,
            Action.DISCARD,
            "sav.verified" if ok else "sav.token_used",
            f"the challenge to {data.sender} for {data.user}",
        )

    gw = Gateway(
        settings=settings,
        pipeline=pipeline,
        policies=policies,
        spool=spool,
        find_user=database.find_user,
        metrics=SmtpMetrics(),
        tls_context=context,
        callahead=callahead,
        on_accepted=to_queue,
        on_held=on_held,
        may_hold=may_hold,
        sav_token_ok=sav_token_ok,
        sav_reply=sav_reply,
        clock=clock,
        stats=stats,
    )
    submission = Submission(gateway=gw, database=database, core=core, data_dir=data_dir)
    gw.journal = submission.journal  # BCC journal copies on the inbound listener
    # Worker 0's web and public listeners are bound here, before any SMTP
    # one and not in their tasks: a port in use stops the start with its
    # error, where a task that failed would go unseen (it is awaited only at
    # stop) while the log said the UI was served.
    web_sockets = _bind(settings.server.listeners.web) if index == 0 else []
    public_sockets = _bind(settings.server.listeners.public) if queue is not None else []
    servers: list[asyncio.Server] = []
    for spec in settings.server.listeners.submission:
        host, _, port = spec.rpartition(":")
        servers.append(
            await loop.create_server(
                submission.factory,
                host.strip("[]"),
                int(port),
                reuse_address=True,
                reuse_port=reuse_port,
            )
        )
        log.info("submission on %s (pid %d)", spec, os.getpid())
    for spec in settings.server.listeners.inbound:
        host, _, port = spec.rpartition(":")
        servers.append(
            await loop.create_server(
                gw.factory,
                host.strip("[]"),
                int(port),
                reuse_address=True,
                reuse_port=reuse_port,
            )
        )
        log.info("inbound SMTP on %s (pid %d)", spec, os.getpid())
    policy: PolicyService | None = None
    if settings.server.listeners.policy:
        policy = PolicyService(
            settings,
            core,
            Reputation.from_settings(core, settings, resolver),
            spf,
            clock=clock,
            metrics=Metrics("policy"),
        )
        # Recon and SPF by the recipient's tenant, overrides included.
        policy.settings_for = lambda domain: (
            p.settings if (p := policies.for_domain(domain)) else overrides.effective(None)
        )
        policy.reputation_for = lambda s: gw.pipeline.reputation(TenantPolicy("", s))
        servers += await policy.start(settings.server.listeners.policy, reuse_port=reuse_port)
        for spec in settings.server.listeners.policy:
            log.info("policy service on %s (pid %d)", spec, os.getpid())
    sweeper: asyncio.Task[None] | None = None
    digests: asyncio.Task[None] | None = None
    public: asyncio.Task[None] | None = None
    web: asyncio.Task[None] | None = None

    async def policy_changed() -> None:
        # This worker at once; the others within a second (the generations).
        overrides.refresh()

    if index == 0 and settings.server.listeners.web:
        from kithmail.web import Services, serve_web, web_tls_files
        from kithmail.web import make_app as make_web_app

        services = Services(
            settings=lambda: policies.settings,
            policies=lambda: policies,
            database=database,
            quarantine=quarantine,
            spool=spool,
            core=core,
            clock=clock,
            data_dir=data_dir,
            multiprocess_metrics=settings.server.workers > 1,
            overrides=overrides,
            on_policy_change=policy_changed,
        )
        web_app = make_web_app(services)
        web_app.state.stats = stats  # the dashboard flushes this worker's counts before reading
        cert_key = web_tls_files(settings)  # [web] tls: HTTPS with the server's certificate
        web = asyncio.create_task(
            serve_web(
                web_app,
                settings.server.listeners.web,
                ssl_certfile=cert_key[0] if cert_key else None,
                ssl_keyfile=cert_key[1] if cert_key else None,
                sockets=web_sockets,
            )
        )
        web.add_done_callback(_log_failure("the web listener"))
        for spec in settings.server.listeners.web:
            scheme = "https" if cert_key else "http"
            log.info("web UI, API and /metrics on %s://%s (pid %d)", scheme, spec, os.getpid())
    if queue is not None:
        await queue.start()
        if handoff is not None:
            handoff.receive(loop, queue.notify)
        sweeper = asyncio.create_task(
            _sweep_quarantine(
                quarantine,
                sav,
                core.recon,
                clock,
                reputation=core.reputation,
                database=database,
                settings=lambda: policies.settings,
            )
        )
        from kithmail.digest import Digest, run_scheduler

        digest = Digest(database, quarantine, settings, core=core, clock=clock, signer=sav.signer)
        digests = asyncio.create_task(run_scheduler(digest, spool, queue.notify, clock=clock))
        if settings.server.listeners.public:
            # The confirmation pages: one worker serves them (uvicorn).
            app = make_app(settings, database, on_verified, sav=sav, digest=digest, clock=clock)
            public = asyncio.create_task(
                serve_public(app, settings.server.listeners.public, sockets=public_sockets)
            )
            public.add_done_callback(_log_failure("the public pages' listener"))
            for spec in settings.server.listeners.public:
                log.info("public pages on http://%s (pid %d)", spec, os.getpid())

    async def apply_settings(new: config.Settings) -> None:
        """A reload's new settings into every part of this worker (`kithmail.reload`)."""
        from kithmail import tls

        # What can fail comes first, so a failure leaves the old settings whole.
        context = await asyncio.to_thread(tls.server_context, new)
        if index == 0:  # one worker loads the lists into the shared core
            await asyncio.to_thread(load_lists, core, new)
        await asyncio.to_thread(database.sync_domains, new.domains.local)
        policies.update(new)
        lim = new.limits
        gw.conn_rate.limit = lim.connections_per_ip_per_minute
        gw.ip_msg_rate.limit = lim.messages_per_ip_per_minute
        gw.sender_rate.limit = lim.messages_per_sender_per_minute
        gw.budget.limit = lim.data_memory
        gw.tls_context = context
        gw.pipeline = make_pipeline(new)
        gw.settings = new
        sav.settings = new
        if queue is not None:
            queue.reload(new)
            digest.settings = new  # its schedule, links and [digest] enabled
        if policy is not None:
            policy.settings = new
            policy.reputation = Reputation.from_settings(core, new, resolver)

    from kithmail.reload import watch as watch_reloads

    reloads = asyncio.create_task(
        watch_reloads(reload_requested, lambda: policies.settings, apply_settings)
    )
    log.info("kithmail ready (pid %d)", os.getpid())
    await stop.wait()
    log.info("kithmail stopping (pid %d): no new connections, finishing sessions", os.getpid())
    gw.closing = True
    reloads.cancel()
    for s in servers:
        s.close()
    deadline = loop.time() + 30
    while gw.sessions > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for task in (sweeper, digests, public, web):
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if queue is not None:
        await queue.stop(10)
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await flusher
    with contextlib.suppress(Exception):
        await asyncio.to_thread(stats.flush_sync, database)
    database.close()


def _bind(listeners: list[str]) -> list[Any]:
    """`kithmail.asgi.bind`, its error naming the addresses."""
    from kithmail.asgi import bind

    try:
        return bind(listeners)
    except OSError as e:
        raise OSError(e.errno, f"{', '.join(listeners)}: {e.strerror or e}") from e


def _log_failure(what: str) -> Callable[[asyncio.Task[None]], None]:
    """A task's done-callback that logs the exception it ended with (awaited only at stop)."""

    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error("%s failed (pid %d): %s", what, os.getpid(), e, exc_info=e)

    return done


async def _flush_stats(stats: Any, database: Any, every: float = 10.0) -> None:
    """The dashboard's counters (`kithmail.stats`) into the database, every few seconds."""
    while True:
        await asyncio.sleep(every)
        try:
            await asyncio.to_thread(stats.flush_sync, database)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("stats flush failed; the counts are kept for the next one")


async def _sweep_quarantine(
    quarantine: Any,
    sav: Any,
    recon: Any = None,
    clock: Callable[[], float] = time.time,
    every: float = 60.0,
    *,
    reputation: Any = None,
    database: Any = None,
    settings: Callable[[], config.Settings] | None = None,
) -> None:
    """Retention: expired held copies, challenges, Recon rows, learned counters and
    audit rows go, a bounded batch at a time.

    Recon rows (masked source addresses) are kept while their pass is valid
    (`pass_ttl` after the last accepted mail) or, never retried, for
    `retry_window`; a source's learned reputation counters for
    `[reputation] learned_ttl` after its last counted event; audit rows for
    `[web] audit_retention` (docs/retention.md). The TTLs are read from the
    settings in force at each pass, so a reload changes them.
    """
    limit = 10000
    while True:
        try:
            await asyncio.to_thread(sav.sweep)
            # A batch that was full and did not come round the table means more rows
            # than one pass scans a minute (a flood of new sources): come back at once
            # rather than fall behind.
            more_now = False
            if recon is not None:
                rows = await asyncio.to_thread(recon.sweep, int(clock()), limit)
                retention_deleted("recon", rows.removed)
                more_now = rows.scanned >= limit and not rows.wrapped
            if settings is not None:
                current = settings()
                if reputation is not None:
                    ttl = int(current.reputation.learned_ttl)
                    learned = await asyncio.to_thread(reputation.sweep, int(clock()), ttl, limit)
                    retention_deleted("learned", learned.removed)
                    if learned.removed:
                        log.info("reputation sweep: %d stale counters forgotten", learned.removed)
                    more_now = more_now or (learned.scanned >= limit and not learned.wrapped)
                if database is not None:
                    keep = current.web.audit_retention
                    gone = await asyncio.to_thread(
                        database.expire_audit, keep, now=clock(), limit=limit
                    )
                    retention_deleted("audit", gone)
                    if gone:
                        log.info("audit sweep: %d rows deleted (past [web] audit_retention)", gone)
                    more_now = more_now or gone >= limit
            swept = await quarantine.sweep()
            if swept.deleted:
                log.info("quarantine sweep: %d expired copies deleted", swept.deleted)
            await asyncio.sleep(1.0 if swept.more or more_now else every)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("quarantine sweep failed; trying again later")
            await asyncio.sleep(every)
