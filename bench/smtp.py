#!/usr/bin/env python3
"""Benchmark of kithmail's SMTP gateway (`kith serve`) beside Postfix and two floors.

One run measures, on the same machine and with the same client:

- **kithmail**: the whole inbound path for a source Recon already knows
  (passed by a real retry), with a clean reputation, SPF and DMARC answered
  by a local dnsmasq, the sender in the recipient's community, and delivery
  to Postfix's `smtp-sink` (`[domains] downstream`). Messages per second at
  20 concurrent sessions, reusing connections (``smtp-source -d``) and with
  a new connection per message, and the p50/p99 of one transaction.
- the **deferral path**: a flood of never-seen sources (each connection binds
  its own 127.x.y.z) answered ``451 4.7.1`` at RCPT; connections per second.
- **baselines**, in the same run, with the same load generator:
  Postfix doing the same job (smtpd → fsync'd queue → smtp → smtp-sink; for
  the flood, Postfix asking Postgrey at RCPT); Postfix's C `smtp-sink` alone;
  a bare aiosmtpd sink (a handler that answers 250 and discards; for the
  flood, 451 at RCPT). kithmail ÷ bare aiosmtpd is the cost of kithmail's
  own work over the library it is built on.

The load generator is Postfix's `smtp-source` for every server. It gives no
per-transaction times, so a small asyncio probe (bench/_smtp_client.py)
runs sequential transactions beside it and times each; the flood is that
module's own client, as `smtp-source` cannot bind a source address. With two
or more cores the generator side (this process, smtp-source, the downstream
sink and dnsmasq) runs on core 0 and each measured server on core 1 (taskset);
kithmail is then run again with `[server] workers = 2`, unpinned.

Correctness is checked, never timing: every message the generator sent
must be counted at the sink (after the queue drains), every flood
connection must get 451 4.7.1 (4xx for Postgrey), and no flood message may
arrive. A failure is listed in `errors` and makes the exit status 1.

Trusts: nothing outside this machine; all traffic is on 127.0.0.0/8. Names
are under .test/.example (RFC 2606). Needs root (Postfix, smtp-sink -u).

Run ``bench/smtp.py --help``; bench/README.md says how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _smtp_client as client
import _smtp_peers as peers
from core import finish, fmt_rate, log, machine, workdir
from policy import source_tree

SENDER_DOMAIN = "bench.example"
SENDER = f"newsletter@{SENDER_DOMAIN}"
HELO = f"mta.{SENDER_DOMAIN}"
LOCAL_DOMAIN = "example.test"
RCPT = f"user@{LOCAL_DOMAIN}"
FLOOD_DOMAIN = "flood.example"
SPF = "v=spf1 ip4:127.0.0.0/8 -all"
DMARC = "v=DMARC1; p=reject"
DEFER_REPLY = "451 4.7.1 Try again later"
SERVERS = ("kithmail", "postfix", "aiosmtpd", "smtp-sink")


def read_cpu() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                parts = line.split()
                v = [int(x) for x in parts[1:]]
                # busy: user nice system irq softirq; not idle, iowait or steal
                # (time the hypervisor gave to another guest).
                busy = v[0] + v[1] + v[2] + v[5] + v[6]
                out[int(parts[0][3:])] = (busy, sum(v[:8]))
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def foreign_snapshot() -> dict[int, tuple[int, int]]:
    """CPU jiffies and start time of every process outside this run's process tree."""
    ours = {os.getpid(), *peers.descendants(os.getpid())}
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in ours:
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(d)] = (int(fields[11]) + int(fields[12]), int(fields[19]))
        except (OSError, IndexError, ValueError):
            continue
    return out


def foreign_cpu(a: dict[int, tuple[int, int]], b: dict[int, tuple[int, int]], wall: float) -> float:
    """Cores' worth of CPU other jobs used between two snapshots (a lower bound)."""
    used = 0
    for pid, (cpu, start) in b.items():
        prev = a.get(pid)
        used += cpu - prev[0] if prev and prev[1] == start else cpu
    return round(used / _TICK / wall, 3) if wall else 0.0


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def background(seconds: float = 1.0) -> dict[str, Any]:
    """How busy the cores are before anything of ours runs (another job skews every figure)."""
    c0 = read_cpu()
    time.sleep(seconds)  # a measuring window, not a wait for readiness
    return {"seconds": seconds, **cpu_busy(c0, read_cpu()), "loadavg": loadavg()}


def cpu_busy(a: dict[int, tuple[int, int]], b: dict[int, tuple[int, int]]) -> dict[str, float]:
    out = {}
    for c in sorted(b):
        busy, tot = b[c][0] - a[c][0], b[c][1] - a[c][1]
        out[f"cpu{c}"] = round(busy / tot, 3) if tot else 0.0
    return out


class Bench:
    def __init__(self, args: argparse.Namespace, work: str) -> None:
        self.a = args
        self.work = work
        self.errors: list[str] = []
        self.rng = random.Random(args.seed)
        ncpu = len(os.sched_getaffinity(0))
        self.pinned = ncpu >= 2 and shutil.which("taskset") is not None and not args.no_pin
        self.gen_cpus = "0" if self.pinned else ""
        self.srv_cpus = "1" if self.pinned else ""
        # Children inherit this process's affinity: the unpinned run names all cores.
        self.all_cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        if self.pinned:
            os.sched_setaffinity(0, {0})
        self.msg = client.message(self.rng, args.size, SENDER, RCPT, HELO)
        self.msg_file = os.path.join(work, "message.txt")
        with open(self.msg_file, "wb") as f:
            # smtp-source -F sends each line with CRLF appended.
            f.write(self.msg.replace(b"\r\n", b"\n"))
        self.flood_sources = iter(client.flood_sources(self.rng, args.flood_sources))
        self.procs: list[Any] = []

    # ---------------------------------------------------------------- load

    async def _smtp_source(
        self, port: int, sessions: int, count: int, reuse: bool
    ) -> tuple[int, float, float, str]:
        """Run smtp-source; (exit status, wall seconds, its CPU seconds, output tail)."""
        argv = [peers.SMTP_SOURCE, "-F", self.msg_file, "-M", HELO, "-f", SENDER, "-t", RCPT]
        argv += ["-s", str(sessions), "-m", str(count)]
        if reuse:
            argv.append("-d")
        argv.append(f"127.0.0.1:{port}")
        out_path = os.path.join(self.work, "smtp-source.out")
        with open(out_path, "wb") as out:
            t0 = time.perf_counter()
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = t0 + max(120.0, 20 * self.a.seconds)
        status, cpu = -1, 0.0
        while True:
            pid, st, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                status = os.waitstatus_to_exitcode(st)
                cpu = ru.ru_utime + ru.ru_stime
                p.returncode = status
                break
            if time.perf_counter() > deadline:
                p.kill()
                p.wait()
                status = -9
                break
            await asyncio.sleep(0.005)
        wall = time.perf_counter() - t0
        with open(out_path, "rb") as f:
            tail = f.read()[-500:].decode("latin-1")
        return status, wall, cpu, tail

    async def _load(
        self, port: int, sessions: int, count: int, reuse: bool, with_probe: bool
    ) -> dict[str, Any]:
        stop = asyncio.Event()
        probe_task = None
        if with_probe:
            probe_task = asyncio.create_task(
                client.probe(
                    "127.0.0.1",
                    port,
                    mode="reuse" if reuse else "new",
                    sender=SENDER,
                    rcpt=RCPT,
                    helo=HELO,
                    data=self.msg,
                    stop=stop,
                )
            )
        f0 = foreign_snapshot()
        c0, g0 = read_cpu(), time.process_time()
        status, wall, cpu, tail = await self._smtp_source(port, sessions, count, reuse)
        c1, g1 = read_cpu(), time.process_time()
        foreign = foreign_cpu(f0, foreign_snapshot(), wall)
        stop.set()
        probe = await probe_task if probe_task else None
        out: dict[str, Any] = {
            "smtp_source_status": status,
            "smtp_source_output": tail.strip()[-300:],
            "seconds": round(wall, 3),
            "messages": count,
            "cpu": {
                **cpu_busy(c0, c1),
                "smtp_source_s_per_s": round(cpu / wall, 3),
                "probe_process_s_per_s": round((g1 - g0) / wall, 3),
                "foreign": foreign,
            },
        }
        if probe is not None:
            out["probe"] = probe.as_json()
            out["probe_transactions"] = probe.transactions
        return out

    def measure(
        self,
        server: str,
        port: int,
        reuse: bool,
        sessions: int,
        count_fn: Callable[[], int],
        setting: str,
    ) -> dict[str, Any]:
        """Calibrate, then one timed smtp-source run with the probe alongside; check the sink."""
        a = self.a
        variant = "reuse" if reuse else "new"
        label = f"{server} {setting} {variant} x{sessions}"
        before = count_fn()
        sent = 0
        load = loadavg()
        warm = asyncio.run(self._load(port, sessions, a.warmup_messages, reuse, False))
        sent += a.warmup_messages
        rate = a.warmup_messages / warm["seconds"] if warm["seconds"] else 1000.0
        count = int(min(max(rate * a.seconds, sessions * 10), a.max_messages))
        if warm["smtp_source_status"] != 0:
            self.errors.append(f"{label}: warm-up smtp-source failed: {warm['smtp_source_output']}")
            count = sessions * 10
        settled = self.settle()
        r = asyncio.run(self._load(port, sessions, count, reuse, True))
        r["settle_s"] = settled
        sent += count + r.get("probe_transactions", 0)
        if r["smtp_source_status"] != 0:
            self.errors.append(
                f"{label}: smtp-source exited {r['smtp_source_status']}: {r['smtp_source_output']}"
            )
        if r["probe"]["errors"]:
            self.errors.append(f"{label}: probe errors {r['probe']['errors']}")
        t_end = time.perf_counter()
        counted = self.drain(count_fn, before + sent)
        drain_s = time.perf_counter() - t_end
        delivered = counted - before
        ok = delivered == sent
        if not ok:
            self.errors.append(f"{label}: {sent} messages sent, {delivered} counted at the sink")
        total = count + r.get("probe_transactions", 0)
        r.update(
            {
                "server": server,
                "setting": setting,
                "variant": variant,
                "sessions": sessions,
                "probe_sessions": 1,
                "msgs_per_s": round(total / r["seconds"], 1),
                "smtp_source_msgs_per_s": round(count / r["seconds"], 1),
                "warmup": {"messages": a.warmup_messages, "seconds": warm["seconds"]},
                "sink": {
                    "sent": sent,
                    "counted": delivered,
                    "correct": ok,
                    "drain_s": round(drain_s, 3),
                    "end_to_end_msgs_per_s": round(total / (r["seconds"] + drain_s), 1),
                },
                "bound": self.bound(r["cpu"]),
                "loadavg_before": load,
            }
        )
        p = r["probe"]
        log(
            f"{label:<36} {fmt_rate(r['msgs_per_s']):>7} msg/s  probe p50 {p['p50_ms']} ms "
            f"p99 {p['p99_ms']} ms  cpu {r['cpu']}  sink {delivered}/{sent} "
            f"(drained in {drain_s:.2f} s)"
        )
        return r

    def drain(self, count_fn: Callable[[], int], want: int, stall: float = 30.0) -> int:
        """Poll the sink's counter until it reaches `want` or stops moving for `stall` s."""
        deadline = time.monotonic() + self.a.drain_timeout
        last, last_change = -1, time.monotonic()
        while True:
            n = count_fn()
            if n >= want:
                return n
            now = time.monotonic()
            if n != last:
                last, last_change = n, now
            if now > deadline or now - last_change > stall:
                return n
            time.sleep(0.02)  # polling a counter, not waiting for a guessed time

    def settle(self) -> float:
        """Before a figure: wait (up to --wait-idle, at most 60 s) for both cores to idle."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < min(self.a.wait_idle, 60.0):
            c0 = read_cpu()
            time.sleep(0.5)  # a measuring window, not a wait for readiness
            if max(cpu_busy(c0, read_cpu()).values()) < 0.25:
                break
        return round(time.monotonic() - t0, 1)

    def bound(self, cpu: dict[str, float]) -> str:
        if cpu.get("foreign", 0) >= 0.1:
            return f"other jobs used {cpu['foreign']:.2f} cores: the figure is not clean"
        if self.pinned:
            if cpu.get("cpu1", 0) >= 0.9:
                return "server core (cpu1) saturated"
            if cpu.get("cpu0", 0) >= 0.9:
                return "generator core (cpu0) saturated"
            return "neither core saturated (waiting: disk, round trips)"
        busy = [v for k, v in cpu.items() if k.startswith("cpu")]
        if busy and min(busy) >= 0.9:
            return "both cores saturated"
        return "cores not saturated (waiting: disk, round trips)"

    def sequential(
        self, server: str, port: int, setting: str, count_fn: Callable[[], int]
    ) -> dict[str, Any]:
        """The probe alone: one session, sequential transactions, new connection each."""
        before = count_fn()

        async def go() -> client.ProbeResult:
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(self.a.seq_seconds, stop.set)
            return await client.probe(
                "127.0.0.1",
                port,
                mode="new",
                sender=SENDER,
                rcpt=RCPT,
                helo=HELO,
                data=self.msg,
                stop=stop,
            )

        c0 = read_cpu()
        r = asyncio.run(go())
        j = r.as_json()
        j.update({"server": server, "setting": setting, "cpu": cpu_busy(c0, read_cpu())})
        counted = self.drain(count_fn, before + r.transactions) - before
        j["sink"] = {"sent": r.transactions, "counted": counted}
        if counted != r.transactions:
            self.errors.append(
                f"{server} {setting} sequential: {r.transactions} sent, {counted} at the sink"
            )
        if r.errors:
            self.errors.append(f"{server} {setting} sequential: {dict(r.errors)}")
        log(
            f"{server} {setting} sequential new-connection: {j['tps']} tx/s "
            f"p50 {j['p50_ms']} ms p99 {j['p99_ms']} ms"
        )
        return j

    def flood(
        self, server: str, port: int, setting: str, want: str, count_fn: Callable[[], int] | None
    ) -> dict[str, Any]:
        a = self.a
        before = count_fn() if count_fn else 0
        settled = self.settle()
        f0 = foreign_snapshot()
        c0, g0 = read_cpu(), time.process_time()
        r = asyncio.run(
            client.flood(
                "127.0.0.1",
                port,
                self.flood_sources,
                concurrency=a.flood_concurrency,
                seconds=a.flood_seconds,
                limit=a.flood_sources,
                sender_domain=FLOOD_DOMAIN,
                rcpt=RCPT,
            )
        )
        c1, g1 = read_cpu(), time.process_time()
        j = r.as_json()
        matched = sum(n for k, n in r.answers.items() if k.startswith(want))
        ok = matched == r.connections and not r.errors and r.connections > 0
        j.update(
            {
                "server": server,
                "setting": setting,
                "concurrency": a.flood_concurrency,
                "expected_reply": want,
                "settle_s": settled,
                "answered_as_expected": matched,
                "cpu": {
                    **cpu_busy(c0, c1),
                    "generator_process_s_per_s": round((g1 - g0) / r.seconds, 3),
                    "foreign": foreign_cpu(f0, foreign_snapshot(), r.seconds),
                },
            }
        )
        j["bound"] = self.bound(j["cpu"])
        if count_fn:
            leaked = count_fn() - before
            j["messages_at_sink"] = leaked
            if leaked:
                ok = False
        j["correct"] = ok
        if not ok:
            self.errors.append(
                f"{server} {setting} flood: {matched}/{r.connections} answered {want!r}, "
                f"errors {dict(r.errors)} {r.examples[:2]}"
            )
        if r.sources_used >= a.flood_sources:
            self.errors.append(f"{server} {setting} flood ran out of sources (--flood-sources)")
        log(
            f"{server} {setting} flood: {j['cps']} conn/s answered {dict(r.answers)} "
            f"p50 {j['p50_ms']} ms p99 {j['p99_ms']} ms cpu {j['cpu']}"
        )
        return j

    # ---------------------------------------------------------------- servers

    def run_server(
        self,
        server: str,
        port: int,
        count_fn: Callable[[], int],
        setting: str,
        out: dict[str, list[dict[str, Any]]],
    ) -> None:
        out["sequential"].append(self.sequential(server, port, setting, count_fn))
        for reuse in (True, False):
            for s in self.a.sessions:
                out["throughput"].append(self.measure(server, port, reuse, s, count_fn, setting))

    def kith_config(self, workers: int, sink_port: int, dns_port: int) -> tuple[str, int, str, int]:
        port, web = peers.free_port(), peers.free_port()
        data_dir = os.path.join(self.work, "kithmail")
        text = f"""\
# bench/smtp.py: the gateway as measured
[server]
data_dir = "{data_dir}"
hostname = "kithmail.bench.test"
workers = {workers}

[server.listeners]
inbound = ["127.0.0.1:{port}"]
web = ["127.0.0.1:{web}"]
submission = ["127.0.0.1:{peers.free_port()}"]
public = ["127.0.0.1:{peers.free_port()}"]
policy = ["127.0.0.1:{peers.free_port()}"]

[domains]
local = ["{LOCAL_DOMAIN}"]
downstream = "smtp://127.0.0.1:{sink_port}"
# Nothing on loopback is trusted: smtp-source cannot bind an address, so it
# sends from 127.0.0.1, and Recon, Reputation and SPF must run for it.
trusted_networks = ["192.0.2.1/32"]
verify_recipients = "users"

[dns]
nameservers = ["127.0.0.1:{dns_port}"]
timeout = "2s"

[recon]
min_delay = "1s"

[limits]
pregreet_wait = "0s"
max_connections = 2000
max_connections_per_ip = 1000
connections_per_ip_per_minute = 10000000
messages_per_ip_per_minute = 10000000
messages_per_sender_per_minute = 10000000
"""
        path = os.path.join(self.work, f"kithmail-{workers}.toml")
        with open(path, "w") as f:
            f.write(text)
        return path, port, data_dir, web

    def kith(self, cfg: str, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.a.kith, "-c", cfg, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kith {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done

    def layer_metrics(self, web: int) -> dict[str, Any]:
        """kithmail's own time per layer and per session, from its /metrics (since start)."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError as e:
            return {"error": str(e)}
        sums: dict[str, dict[str, float]] = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            for fam in ("kithmail_layer_seconds", "kithmail_session_seconds"):
                for part in ("_sum", "_count"):
                    head = fam + part + "{"
                    if name.startswith(head):
                        key = name[len(head) : -1]
                        sums.setdefault(key, {})[part[1:]] = float(value)
        out = {}
        for key, v in sorted(sums.items()):
            n, total = v.get("count", 0.0), v.get("sum", 0.0)
            out[key] = {
                "count": int(n),
                "sum_s": round(total, 3),
                "mean_ms": round(1000 * total / n, 3) if n else None,
            }
        return out

    async def once(self, port: int) -> tuple[int, str]:
        return await client.transact_once(
            "127.0.0.1",
            port,
            source="127.0.0.1",
            sender=SENDER,
            rcpt=RCPT,
            helo=HELO,
            data=self.msg,
        )

    def pass_recon(self, port: int) -> dict[str, Any]:
        """Make 127.0.0.1 known to Recon the real way: deferred, then a retry that passes."""
        steps: list[str] = []
        t0 = time.monotonic()

        code, text = asyncio.run(self.once(port))
        steps.append(text)
        first = code
        while code != 250 and time.monotonic() - t0 < 60:
            if code != 451:
                break
            time.sleep(0.25)  # retry pacing: Recon's min_delay is 1 s
            code, text = asyncio.run(self.once(port))
            steps.append(text)
        out = {
            "first_reply": steps[0],
            "retries": len(steps) - 1,
            "passed_after_s": round(time.monotonic() - t0, 2),
            "final_reply": steps[-1],
            "passed": code == 250,
        }
        if first != 451:
            self.errors.append(f"Recon did not defer the first message: {steps[0]!r}")
        if code != 250:
            self.errors.append(f"Recon never passed 127.0.0.1: {steps[-3:]}")
        log(f"recon: {out}")
        return out

    def run(self) -> dict[str, Any]:
        a = self.a
        out: dict[str, list[dict[str, Any]]] = {"sequential": [], "throughput": [], "flood": []}
        info: dict[str, Any] = {}
        t0 = time.monotonic()
        while True:
            self.background = background()
            busy = max(v for k, v in self.background.items() if k.startswith("cpu"))
            if busy < 0.25 or time.monotonic() - t0 >= a.wait_idle:
                break
            log(f"waiting for an idle machine (--wait-idle): {self.background}")
        self.background["waited_s"] = round(time.monotonic() - t0 - 1.0, 1)
        log(f"background load before the run: {self.background}")
        dns, dns_port = peers.start_dnsmasq(
            self.work,
            self.gen_cpus,
            [
                (SENDER_DOMAIN, SPF),
                (HELO, SPF),
                (f"_dmarc.{SENDER_DOMAIN}", DMARC),
            ],
            [SENDER_DOMAIN, LOCAL_DOMAIN, FLOOD_DOMAIN],
        )
        self.procs.append(dns)
        down = peers.SmtpSink(self.work, "downstream-sink", self.gen_cpus)
        self.procs.append(down)
        log(f"dnsmasq on 127.0.0.1:{dns_port}, downstream smtp-sink on 127.0.0.1:{down.port}")
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("smtp-sink", lambda: self.bench_smtp_sink(out)),
            ("aiosmtpd", lambda: self.bench_aiosmtpd(out)),
            ("postfix", lambda: self.bench_postfix(out, down)),
            ("kithmail", lambda: self.bench_kithmail(out, down, dns_port)),
        ]
        try:
            for name, step in steps:
                if name not in a.servers:
                    continue
                try:
                    info[name] = step()
                except (peers.StartError, RuntimeError, OSError) as e:
                    self.errors.append(f"{name}: {e}")
                    log(f"{name} failed: {e}")
        finally:
            down.stop()
            dns.stop()
        return self.report(out, info)

    def bench_smtp_sink(self, out: dict[str, list[dict[str, Any]]]) -> None:
        s = peers.SmtpSink(self.work, "smtp-sink", self.srv_cpus)
        try:
            self.run_server("smtp-sink", s.port, s.count, "C, one process", out)
        finally:
            s.stop()
        d = peers.SmtpSink(self.work, "smtp-sink-defer", self.srv_cpus, reject_rcpt=DEFER_REPLY)
        try:
            out["flood"].append(self.flood("smtp-sink", d.port, "-r RCPT (451)", "451", None))
        finally:
            d.stop()

    def bench_aiosmtpd(self, out: dict[str, list[dict[str, Any]]]) -> None:
        p, port = peers.start_aiosmtpd_sink(self.work, self.srv_cpus)
        try:
            self.run_server(
                "aiosmtpd", port, lambda: peers.aiosmtpd_count(port)[0], "bare handler", out
            )
        finally:
            p.stop()
        p, port = peers.start_aiosmtpd_sink(self.work, self.srv_cpus, defer=True)
        try:
            r = self.flood("aiosmtpd", port, "451 at RCPT", "451 4.7.1", None)
            deferred = peers.aiosmtpd_count(port)[1]
            r["server_deferred"] = deferred
            if deferred != r["connections"]:
                self.errors.append(f"aiosmtpd flood: {deferred} deferred, {r['connections']} seen")
            out["flood"].append(r)
        finally:
            p.stop()

    def bench_postfix(
        self, out: dict[str, list[dict[str, Any]]], down: peers.SmtpSink
    ) -> dict[str, Any]:
        pg, pg_port = peers.start_postgrey(self.work, self.srv_cpus)
        pf = peers.start_postfix(
            os.path.join(self.work, "postfix"), down.port, self.srv_cpus, pg_port
        )
        log(
            f"postfix smtpd on 127.0.0.1:{pf.port} (flood: {pf.flood_port}), ready {pf.ready_s:.2f} s"
        )
        try:
            self.run_server("postfix", pf.port, down.count, "smtpd+queue", out)
            out["flood"].append(
                self.flood("postfix", pf.flood_port, "smtpd+postgrey", "45", down.count)
            )
            left = pf.queued()
            if left:
                self.errors.append(f"postfix: {left} messages still queued at the end")
        finally:
            rc = pf.stop()
            rc_pg = pg.stop()
        with open(os.path.join(self.work, "postfix", "conf", "main.cf")) as f:
            main_cf = f.read()
        return {
            "version": peers.postfix_version(),
            "postgrey_version": peers.deb_version("postgrey"),
            "main_cf": main_cf,
            "exit_status": rc,
            "postgrey_exit_status": rc_pg,
            "durability": "queue file fsync'd before 250 (Postfix's default)",
            "flood": "second smtpd asking Postgrey (--delay=60, BerkeleyDB synced per request) "
            "at RCPT; Postfix answers its DEFER_IF_PERMIT with 450 4.2.0",
        }

    def bench_kithmail(
        self, out: dict[str, list[dict[str, Any]]], down: peers.SmtpSink, dns_port: int
    ) -> dict[str, Any]:
        a = self.a
        info: dict[str, Any] = {"server": a.kith}
        probe = subprocess.run(
            [a.kith, "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        if probe.returncode != 0:
            self.errors.append(f"{a.kith} has no 'serve' command (exit {probe.returncode})")
            info["available"] = False
            return info
        info["available"] = True
        cfg, port, data_dir, web = self.kith_config(1, down.port, dns_port)
        os.makedirs(data_dir, exist_ok=True)
        self.kith(cfg, "user", "add", RCPT)
        with open(cfg) as f:
            info["config"] = f.read()
        logpath = os.path.join(self.work, "kithmail-1.log")
        k = peers.start_kith(a.kith, cfg, port, logpath, self.srv_cpus, 1)
        try:
            # Recon first, with the sender not yet in the community: a member
            # would pass at once (Recon's "members at RCPT" path) and the
            # source would never be deferred. The passing retry may be held
            # in quarantine (an unknown sender) or delivered: 1 or 2 at the sink.
            before = down.count()
            info["recon"] = self.pass_recon(port)
            self.kith(cfg, "community", "add", RCPT, f"@{SENDER_DOMAIN}")
            code, text = asyncio.run(self.once(port))
            got = self.drain(down.count, before + 2, stall=3.0) - before
            info["member_check"] = {
                "reply": text,
                "at_sink": got,
                "passing_retry_delivered": got == 2,
            }
            if code != 250 or got not in (1, 2):
                self.errors.append(
                    f"kithmail: a member's message got {text!r}, {got} at the sink (want 1 or 2)"
                )
            log(f"member check: {info['member_check']}")
            self.run_server("kithmail", port, down.count, "1 worker, pinned", out)
            info["metrics_before_flood"] = self.layer_metrics(web)
            out["flood"].append(
                self.flood("kithmail", port, "1 worker, pinned", "451 4.7.1", down.count)
            )
            info["metrics"] = self.layer_metrics(web)
        finally:
            info["exit_status"] = k.stop()
            info["log_tail"] = k.tail(1500)
        if info["exit_status"] not in (0, None):
            self.errors.append(f"kithmail exited {info['exit_status']}")
        if a.workers > 1:
            cfg2, port2, _, _ = self.kith_config(a.workers, down.port, dns_port)
            k2 = peers.start_kith(
                a.kith,
                cfg2,
                port2,
                os.path.join(self.work, "kithmail-w.log"),
                self.all_cpus if self.pinned else "",
                a.workers,
            )
            setting = f"{a.workers} workers, unpinned"
            try:
                for reuse in (True, False):
                    for s in a.sessions:
                        out["throughput"].append(
                            self.measure("kithmail", port2, reuse, s, down.count, setting)
                        )
                out["flood"].append(self.flood("kithmail", port2, setting, "451 4.7.1", down.count))
            finally:
                rc = k2.stop()
            if rc not in (0, None):
                self.errors.append(f"kithmail {a.workers} workers exited {rc}")
        return info

    # ---------------------------------------------------------------- report

    def report(self, out: dict[str, list[dict[str, Any]]], info: dict[str, Any]) -> dict[str, Any]:
        a = self.a
        try:
            import aiosmtpd

            aiosmtpd_version = aiosmtpd.__version__
        except ImportError:
            aiosmtpd_version = "?"
        try:
            from kithmail import _core

            kith_version = getattr(_core, "__version__", None)
        except ImportError:
            kith_version = None
        return {
            "benchmark": "smtp",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(self.work),
            "build_profile": a.profile,
            "command": [sys.executable, *sys.argv],
            "source": source_tree(),
            "quick": a.quick,
            "seed": a.seed,
            "versions": {
                "postfix": peers.postfix_version(),
                "postgrey": peers.deb_version("postgrey"),
                "dnsmasq": peers.deb_version("dnsmasq-base"),
                "aiosmtpd": aiosmtpd_version,
                "kithmail": kith_version,
            },
            "message": {
                "bytes": len(self.msg),
                "recipients": 1,
                "sender": SENDER,
                "recipient": RCPT,
                "note": "one seeded text/plain message, the same bytes for every server and "
                "client (smtp-source -F, the probe); no DKIM signature",
            },
            "generator": {
                "load": "smtp-source (Postfix) -F message -s SESSIONS -m COUNT [-d]: HELO, MAIL, "
                "RCPT, DATA, QUIT; -d keeps each session's connection for all its messages",
                "probe": "bench/_smtp_client.py: 1 more session beside smtp-source, sequential "
                "transactions with EHLO, each timed",
                "flood": f"bench/_smtp_client.py: {a.flood_concurrency} concurrent connections, "
                "each from a never-seen 127.x.y.z",
            },
            "pinning": {
                "applied": self.pinned,
                "generator_cpus": [0] if self.pinned else "any",
                "server_cpus": [1] if self.pinned else "any",
                "note": "core 0: this process (probe, flood), smtp-source, the downstream "
                "smtp-sink and dnsmasq; core 1: the measured server (taskset -c 1; Postfix's "
                "master and all its daemons, Postgrey with it). The workers run is unpinned (taskset -c with every core)."
                if self.pinned
                else "not pinned (fewer than 2 cores, no taskset, or --no-pin)",
            },
            "sizes": {
                "sessions": a.sessions,
                "seconds": a.seconds,
                "warmup_messages": a.warmup_messages,
                "max_messages": a.max_messages,
                "sequential_seconds": a.seq_seconds,
                "flood_seconds": a.flood_seconds,
                "flood_concurrency": a.flood_concurrency,
            },
            "background": {
                **self.background,
                "note": "both cores' use over 1 s before any server started; the figures "
                "assume an idle machine",
            },
            "servers": info,
            "results": out,
            "ratios": ratios(out),
            "correct": not self.errors,
            "errors": self.errors,
        }


def _find(rows: list[dict[str, Any]], server: str, setting: str | None = None, **kw: Any) -> Any:
    for r in rows:
        if r["server"] != server or (setting and r["setting"] != setting):
            continue
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x and y else None


def ratios(out: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """kithmail (1 worker, pinned) ÷ each baseline, per figure."""
    res: dict[str, Any] = {"throughput": [], "flood": {}, "sequential": {}}
    setting = "1 worker, pinned"
    for r in out["throughput"]:
        if r["server"] != "kithmail" or r["setting"] != setting:
            continue
        row: dict[str, Any] = {"variant": r["variant"], "sessions": r["sessions"]}
        for b in ("postfix", "aiosmtpd", "smtp-sink"):
            base = _find(out["throughput"], b, variant=r["variant"], sessions=r["sessions"])
            if base:
                row[f"msgs_per_s_vs_{b}"] = _ratio(r["msgs_per_s"], base["msgs_per_s"])
                row[f"p99_vs_{b}"] = _ratio(r["probe"]["p99_ms"], base["probe"]["p99_ms"])
        res["throughput"].append(row)
    k = _find(out["flood"], "kithmail", setting)
    if k:
        for b in ("postfix", "aiosmtpd", "smtp-sink"):
            base = _find(out["flood"], b)
            if base:
                res["flood"][f"cps_vs_{b}"] = _ratio(k["cps"], base["cps"])
    k = _find(out["sequential"], "kithmail", setting)
    if k:
        for b in ("postfix", "aiosmtpd", "smtp-sink"):
            base = _find(out["sequential"], b)
            if base:
                res["sequential"][f"p50_vs_{b}"] = _ratio(k["p50_ms"], base["p50_ms"])
    return res


# --------------------------------------------------------------------------
# Output


def print_table(rep: dict[str, Any]) -> None:
    m, v = rep["machine"], rep["versions"]
    print(
        f"kithmail SMTP benchmark: {rep['build_profile']} build, {m['cpu']}, {m['cores']} cores, "
        f"{m['python']}, kernel {m['kernel']}, storage {m['storage']['fstype']}; postfix "
        f"{v['postfix']}, aiosmtpd {v['aiosmtpd']}; message {rep['message']['bytes']} B"
    )
    print(f"pinning: {rep['pinning']['note']}")
    res = rep["results"]
    head = [
        "server",
        "setting",
        "conn",
        "sess",
        "msgs/s",
        "p50",
        "p99",
        "cpu0/cpu1",
        "other",
        "sink",
    ]
    rows = []
    for r in res["throughput"]:
        p = r["probe"]
        rows.append(
            [
                r["server"],
                r["setting"],
                r["variant"],
                str(r["sessions"]),
                fmt_rate(r["msgs_per_s"]),
                f"{p['p50_ms']}ms",
                f"{p['p99_ms']}ms",
                f"{r['cpu'].get('cpu0', 0):.2f}/{r['cpu'].get('cpu1', 0):.2f}",
                f"{r['cpu'].get('foreign', 0):.2f}",
                "ok" if r["sink"]["correct"] else f"{r['sink']['counted']}/{r['sink']['sent']}",
            ]
        )
    _table(head, rows)
    print()
    head = ["server", "setting", "seq tx/s", "p50", "p99"]
    rows = [
        [r["server"], r["setting"], f"{r['tps']}", f"{r['p50_ms']}ms", f"{r['p99_ms']}ms"]
        for r in res["sequential"]
    ]
    _table(head, rows)
    print()
    head = ["flood: server", "setting", "conn/s", "p50", "p99", "cpu0/cpu1", "other", "answers"]
    rows = [
        [
            r["server"],
            r["setting"],
            fmt_rate(r["cps"]),
            f"{r['p50_ms']}ms",
            f"{r['p99_ms']}ms",
            f"{r['cpu'].get('cpu0', 0):.2f}/{r['cpu'].get('cpu1', 0):.2f}",
            f"{r['cpu'].get('foreign', 0):.2f}",
            ", ".join(f"{k}: {n}" for k, n in r["answers"].items()),
        ]
        for r in res["flood"]
    ]
    _table(head, rows)
    ra = rep["ratios"]
    for r in ra["throughput"]:
        parts = [
            f"{k.replace('msgs_per_s_vs_', 'x ')} {val:.2f}"
            for k, val in r.items()
            if k.startswith("msgs_per_s_vs_") and val
        ]
        print(f"kithmail msgs/s {r['variant']} x{r['sessions']}: " + ", ".join(parts))
    if ra["flood"]:
        print(
            "kithmail flood conn/s: "
            + ", ".join(
                f"{k.replace('cps_vs_', 'x ')} {val:.2f}" for k, val in ra["flood"].items() if val
            )
        )
    if rep["errors"]:
        print("ERRORS: " + "; ".join(rep["errors"]))


def _table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(head))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark kithmail's SMTP gateway beside Postfix, smtp-sink and aiosmtpd."
    )
    p.add_argument("--json", metavar="PATH", help="write the results here (atomically)")
    p.add_argument("--quick", action="store_true", help="a smoke run: about 2 s per figure")
    p.add_argument("--seconds", type=float, help="target seconds per throughput figure (10)")
    p.add_argument(
        "--sessions",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[20],
        help="smtp-source sessions, comma-separated (default 20)",
    )
    p.add_argument("--size", type=int, default=5120, help="message bytes on the wire (5120)")
    p.add_argument("--warmup-messages", type=int, help="per figure, before it (default 500)")
    p.add_argument("--max-messages", type=int, default=200_000, help="a bound per figure")
    p.add_argument("--seq-seconds", type=float, help="the probe alone, per server (default 5)")
    p.add_argument("--flood-seconds", type=float, help="per flood figure (default 10)")
    p.add_argument("--flood-concurrency", type=int, default=20, help="(default 20)")
    p.add_argument(
        "--flood-sources",
        type=int,
        default=2_000_000,
        help="never-seen addresses to draw from (default 2,000,000)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the sink to count everything",
    )
    p.add_argument(
        "--servers",
        type=lambda s: s.split(","),
        default=list(SERVERS),
        help=f"a subset of {','.join(SERVERS)}",
    )
    p.add_argument("--workers", type=int, default=2, help="kithmail's unpinned run (0/1: skip)")
    p.add_argument("--kith", help="the kith to serve with (default: beside this python)")
    p.add_argument("--profile", default="release", help="build profile to record")
    p.add_argument("--seed", type=int, default=20_240_601, help="data seed")
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="wait up to this many seconds for both cores under 25%% busy before starting",
    )
    p.add_argument("--dir", help="parent of the temporary directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    a.seconds = a.seconds or (2.0 if a.quick else 10.0)
    a.warmup_messages = a.warmup_messages or (100 if a.quick else 500)
    a.seq_seconds = a.seq_seconds or (1.0 if a.quick else 5.0)
    a.flood_seconds = a.flood_seconds or (2.0 if a.quick else 10.0)
    if a.quick:
        a.flood_sources = min(a.flood_sources, 200_000)
    bad = [s for s in a.servers if s not in SERVERS]
    if bad:
        p.error(f"unknown servers {bad}; choose from {SERVERS}")
    a.kith = a.kith or os.path.join(os.path.dirname(sys.executable), "kith")
    if "kithmail" in a.servers and not os.access(a.kith, os.X_OK):
        p.error(f"{a.kith} not found: make bench installs it, or leave kithmail out (--servers)")
    if os.geteuid() != 0:
        p.error("run as root: Postfix's master and smtp-sink -u need it")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with workdir("smtp", args, shared=True) as work:
        report = Bench(args, work).run()
    return finish(args, report, print_table)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
