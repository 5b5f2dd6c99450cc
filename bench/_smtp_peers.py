"""The processes bench/smtp.py measures and talks to, each started on loopback.

- `SmtpSink`: Postfix's C `smtp-sink`, counting what it receives (``-c``
  prints "sess=.. quit=.. mesg=N" on stdout; nothing is written to disk).
  Optionally answering every RCPT with a 4xx (``-r RCPT -b REPLY``).
- `start_postfix`: a private Postfix instance (its own config, queue and
  data directories under the benchmark's temp dir, never the system one).
  Its smtpd on one port relays `example.test` to a sink (queue files fsync'd
  as Postfix always does); optionally a second smtpd asks Postgrey at RCPT.
- `start_postgrey`, `start_dnsmasq`, `start_aiosmtpd_sink`, `start_kith`.

Every start waits for the service to answer (an SMTP 220 greeting, a DNS
answer, an accepted TCP connection), polling, never sleeping a fixed time,
and fails with the tail of the service's log. `Proc.stop` sends SIGTERM,
then SIGKILL after a timeout (to the process group for Postfix's master).

`taskset -c CPUS` is put in front of a server's argv when `cpus` is given;
its children (Postfix's daemons, kithmail's workers) inherit the affinity.

Trusts: the binaries at their Debian paths. Needs root (Postfix's master,
smtp-sink -u, Postgrey's user switch).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

POSTFIX = "/usr/sbin/postfix"
MASTER = "/usr/lib/postfix/sbin/master"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
POSTGREY = "/usr/sbin/postgrey"
DNSMASQ = "/usr/sbin/dnsmasq"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children of every thread, recursively)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


@dataclass
class Proc:
    """A started service: its Popen, log file and the CPUs it is pinned to."""

    label: str
    argv: list[str]
    logpath: str
    cpus: str = ""
    group: bool = False  # in its own session: stop kills the process group too
    proc: subprocess.Popen[bytes] = field(init=False)

    def __post_init__(self) -> None:
        argv = ["taskset", "-c", self.cpus, *self.argv] if self.cpus else self.argv
        self.argv = argv
        with open(self.logpath, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=self.group,
            )

    def pids(self) -> list[int]:
        return [self.proc.pid, *descendants(self.proc.pid)]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 2000) -> str:
        try:
            with open(self.logpath, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


class StartError(RuntimeError):
    pass


def wait_greeting(p: Proc, port: int, logpath: str | None = None) -> float:
    """Poll 127.0.0.1:port until it greets with 220; the seconds it took."""
    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < START_TIMEOUT:
        if not p.alive():
            last = f"exited with {p.proc.returncode}"
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                line = s.makefile("rb").readline().decode("latin-1").strip()
                if line.startswith("220"):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                    return time.monotonic() - t0
                last = f"greeted with {line!r}"
        except ConnectionRefusedError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout=0.02)  # paces the poll on the process's exit
        except OSError as e:
            last = str(e)
    tail = p.tail() if logpath is None else _tail_file(logpath)
    raise StartError(f"{p.label} did not greet on 127.0.0.1:{port} ({last or 'timeout'}):\n{tail}")


def wait_listening(p: Proc, port: int) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < START_TIMEOUT:
        if not p.alive():
            raise StartError(f"{p.label} exited with {p.proc.returncode}:\n{p.tail()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return time.monotonic() - t0
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(timeout=0.02)
    raise StartError(f"{p.label} not listening on 127.0.0.1:{port}:\n{p.tail()}")


def _tail_file(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return f"({path} not written)"


# --------------------------------------------------------------------------
# smtp-sink

_COUNTER = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1:port, counting messages on its stdout."""

    def __init__(self, work: str, name: str, cpus: str, reject_rcpt: str = "") -> None:
        self.port = free_port()
        self.logpath = os.path.join(work, f"{name}.out")
        argv = [SMTP_SINK, "-u", "postfix", "-c", "-h", f"{name}.bench.test"]
        if reject_rcpt:
            argv += ["-r", "RCPT", "-b", reject_rcpt]
        argv += [f"127.0.0.1:{self.port}", "1024"]
        self.p = Proc(name, argv, self.logpath, cpus)
        self.ready_s = wait_greeting(self.p, self.port)

    def count(self) -> int:
        """Messages received ("." seen) since start."""
        tail = _tail_file(self.logpath, 400).encode()
        found = _COUNTER.findall(tail)
        return int(found[-1][2]) if found else 0

    def stop(self) -> int:
        return self.p.stop()


# --------------------------------------------------------------------------
# Postfix


def _main_cf(root: str, sink_port: int) -> str:
    return f"""\
# bench/smtp.py: a private Postfix relaying example.test to smtp-sink
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
relay_domains = example.test
transport_maps = inline:{{ example.test=smtp:[127.0.0.1]:{sink_port} }}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
# Accept as fast as clients send (the default 1s slows clients when the
# queue grows faster than it drains): the same as kithmail, which has none.
in_flow_delay = 0s
default_process_limit = 200
smtpd_client_connection_count_limit = 0
smtpd_policy_service_timeout = 30s
biff = no
"""


_MASTER_CF = """\
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class Postfix:
    root: str
    port: int  # smtpd: relays example.test to the sink
    flood_port: int  # smtpd asking Postgrey at RCPT (0: none)
    master: Proc
    check_s: float
    ready_s: float

    @property
    def maillog(self) -> str:
        return os.path.join(self.root, "maillog")

    def queued(self) -> int:
        """Files in the incoming/active/deferred queues: 0 once all is delivered."""
        n = 0
        for q in ("incoming", "active", "deferred", "maildrop"):
            for _, _, files in os.walk(os.path.join(self.root, "queue", q)):
                n += len(files)
        return n

    def stop(self) -> int:
        return self.master.stop()


def start_postfix(root: str, sink_port: int, cpus: str, postgrey_port: int = 0) -> Postfix:
    """A private Postfix in `root` (made here); its daemons pinned to `cpus`."""
    for tool in (POSTFIX, MASTER, SMTP_SINK, SMTP_SOURCE):
        if not os.path.exists(tool):
            raise StartError(f"{tool} missing: apt-get install --no-install-recommends postfix")
    os.makedirs(root)
    os.chmod(root, 0o755)  # the daemons run as postfix and must reach their queue
    conf = os.path.join(root, "conf")
    for d in (conf, f"{root}/queue", f"{root}/data"):
        os.makedirs(d)
    shutil.chown(f"{root}/data", "postfix", "postfix")
    port = free_port()
    flood_port = free_port() if postgrey_port else 0
    with open(os.path.join(conf, "main.cf"), "w") as f:
        f.write(_main_cf(root, sink_port))
    master_cf = f"127.0.0.1:{port} inet n - n - - smtpd\n"
    if postgrey_port:
        # The greylisting rival of Recon: Postgrey asked at RCPT, as its
        # README says; everything else as above.
        master_cf += (
            f"127.0.0.1:{flood_port} inet n - n - - smtpd\n"
            "  -o smtpd_recipient_restrictions="
            f"reject_unauth_destination,check_policy_service,inet:127.0.0.1:{postgrey_port}\n"
        )
    with open(os.path.join(conf, "master.cf"), "w") as f:
        f.write(master_cf + _MASTER_CF)
    # Postfix waits for a main.cf younger than a second to settle: date them back.
    past = time.time() - 60
    for name in ("main.cf", "master.cf"):
        os.utime(os.path.join(conf, name), (past, past))
    t0 = time.monotonic()
    chk = subprocess.run(
        [POSTFIX, "-c", conf, "check"], capture_output=True, text=True, timeout=120, check=False
    )
    check_s = time.monotonic() - t0
    if chk.returncode != 0:
        raise StartError(f"postfix check failed: {chk.stdout}{chk.stderr}")
    master = Proc(
        "postfix master",
        [MASTER, "-c", conf, "-d"],
        os.path.join(root, "master.out"),
        cpus,
        group=True,
    )
    try:
        ready = wait_greeting(master, port, os.path.join(root, "maillog"))
        if flood_port:
            wait_greeting(master, flood_port, os.path.join(root, "maillog"))
    except BaseException:
        master.stop()
        raise
    return Postfix(root, port, flood_port, master, check_s, ready)


def postfix_version() -> str:
    out = subprocess.run(
        ["/usr/sbin/postconf", "-d", "-h", "mail_version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return out.stdout.strip() or "?"


def deb_version(pkg: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", pkg],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


# --------------------------------------------------------------------------
# Postgrey, dnsmasq, the aiosmtpd sink, kithmail


def start_postgrey(work: str, cpus: str, delay: int = 60) -> tuple[Proc, int]:
    if not os.path.exists(POSTGREY):
        raise StartError(f"{POSTGREY} missing: apt-get install --no-install-recommends postgrey")
    port = free_port()
    db = os.path.join(work, "postgrey")
    os.makedirs(db)
    argv = [POSTGREY, f"--inet=127.0.0.1:{port}", f"--dbdir={db}", f"--delay={delay}"]
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgrey")
        os.chown(db, pw.pw_uid, pw.pw_gid)
    else:
        argv += [f"--user={pwd.getpwuid(os.getuid()).pw_name}", f"--group={os.getgid()}"]
    p = Proc("postgrey", argv, os.path.join(work, "postgrey.log"), cpus)
    wait_listening(p, port)
    return p, port


def start_dnsmasq(
    work: str, cpus: str, records: list[tuple[str, str]], zones: list[str]
) -> tuple[Proc, int]:
    """dnsmasq answering TXT `records` and NXDOMAIN for anything else in `zones`."""
    port = free_port()
    argv = [
        DNSMASQ,
        "-k",
        "--no-resolv",
        "--no-hosts",
        f"--port={port}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--pid-file=",
        "--user=root",
        "--cache-size=0",
        "--log-facility=-",
    ]
    argv += [f"--local=/{z}/" for z in zones]
    argv += [f"--txt-record={name},{text}" for name, text in records]
    p = Proc("dnsmasq", argv, os.path.join(work, "dnsmasq.log"), cpus)
    import dns.message
    import dns.query

    t0 = time.monotonic()
    name = records[0][0]
    while True:
        if not p.alive():
            raise StartError(f"dnsmasq exited {p.proc.returncode}:\n{p.tail()}")
        try:
            ans = dns.query.udp(dns.message.make_query(name, "TXT"), "127.0.0.1", 0.5, port=port)
            if ans.answer:
                return p, port
        except (OSError, dns.exception.Timeout):
            pass
        if time.monotonic() - t0 > START_TIMEOUT:
            p.stop()
            raise StartError(f"dnsmasq does not answer TXT {name}:\n{p.tail()}")


def start_aiosmtpd_sink(work: str, cpus: str, defer: bool = False) -> tuple[Proc, int]:
    port = free_port()
    name = "aiosmtpd-defer" if defer else "aiosmtpd"
    argv = [sys.executable, os.path.join(HERE, "_smtp_sink.py"), "127.0.0.1", str(port)]
    if defer:
        argv.append("--defer")
    p = Proc(name, argv, os.path.join(work, f"{name}.log"), cpus)
    wait_greeting(p, port)
    return p, port


def aiosmtpd_count(port: int) -> tuple[int, int]:
    """(messages, deferred) from the aiosmtpd sink's NOOP count."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"NOOP count\r\n")
        line = f.readline().decode("latin-1")
        s.sendall(b"QUIT\r\n")
    m = re.search(r"messages=(\d+) deferred=(\d+)", line)
    if not m:
        raise RuntimeError(f"aiosmtpd sink answered {line!r} to NOOP count")
    return int(m[1]), int(m[2])


def start_kith(
    kith: str, config_path: str, port: int, logpath: str, cpus: str, workers: int
) -> Proc:
    p = Proc(
        f"kithmail ({workers} worker{'s' if workers > 1 else ''})",
        [kith, "serve", "-c", config_path],
        logpath,
        cpus,
    )
    wait_greeting(p, port)
    if workers > 1:
        t0 = time.monotonic()
        while len(descendants(p.proc.pid)) < workers and time.monotonic() - t0 < START_TIMEOUT:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout=0.05)
    return p
