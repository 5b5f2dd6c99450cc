"""A real Postfix (Debian's) as a test peer, and `kith policy` as a subprocess.

`postfix_instance(policy_port)` starts a private Postfix instance — never the
system one: its own config dir, queue_directory and data_directory, all in a
fresh directory under the system temp dir (Postfix's unprivileged daemons
must traverse it, and pytest's tmp_path is 0700). Its smtpd listens on
127.0.0.1 at a free port and asks `check_policy_service
inet:127.0.0.1:POLICY_PORT` at RCPT; mail it accepts for `example.test` is
relayed to Postfix's `smtp-sink` (started here too), which keeps each
message as a file, so a test counts deliveries as files. Only 127.0.0.1/32
is in mynetworks: clients bound to 127.0.0.2..254 are outsiders. Postfix
logs only to `maillog` (postlogd); every start error carries its tail.

Start (~0.25 s): `postfix -c DIR check` once (creates the queue
directories), then `master -c DIR -d` in a new session; ready when the smtpd
port sends its 220 (asked, never slept for). main.cf and master.cf are dated
a minute back: Postfix waits for a main.cf younger than a second to "settle"
(about 2 s per start otherwise). Stop: SIGTERM to master, SIGKILL to what is left
of its process group after 5 s; the same for smtp-sink.

`kith_policy(tmp_path)` writes a kithmail config (Recon `min_delay` 2 s,
policy listener on a free port, trusted network 127.0.0.1/32) and runs
`kith policy -c CONFIG` until the test ends; ready when it answers a policy
request (for 192.0.2.254, an address no test can send from).

`make test` installs postfix and swaks (DEB_PACKAGES); by hand:
`DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends
postfix swaks` (no debconf preseeding needed; policy-rc.d keeps the system
instance from starting, and nothing here needs it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ports import free_port

POSTFIX = "/usr/sbin/postfix"
MASTER = "/usr/lib/postfix/sbin/master"
SMTP_SINK = "/usr/sbin/smtp-sink"
SWAKS = "/usr/bin/swaks"
KITH = Path(sys.executable).parent / "kith"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

# The domain Postfix relays to the sink.
DOMAIN = "example.test"


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path} not written)"
    return "\n".join(lines[-n:]) or f"({path} empty)"


def _stop(proc: subprocess.Popen[bytes], *, group: bool) -> None:
    """SIGTERM, then SIGKILL (to its whole process group if `group`)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if group:
        # Daemons master forked and that outlived it (they leave by
        # themselves when master goes; this is for the ones that did not).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_greeting(
    proc: subprocess.Popen[bytes], port: int, what: str, log: Path
) -> tuple[float, str]:
    """Connect until the server on `port` sends a 220 line; (seconds taken, line)."""
    started = time.monotonic()
    deadline = started + START_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = f"exited with {proc.returncode}"
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                line = s.makefile("rb").readline().decode(errors="replace").strip()
                if line.startswith("220"):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                    return time.monotonic() - started, line
                last = f"greeted with {line!r}"
        except ConnectionRefusedError:  # not bound yet: pace on its exit instead
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.02)
        except OSError as e:
            last = str(e)
    raise RuntimeError(
        f"{what} did not greet on 127.0.0.1:{port} ({last or 'timed out'}); "
        f"{log.name} ends:\n{_tail(log)}"
    )


# ---------------------------------------------------------------- Postfix


def _main_cf(root: Path, smtpd_port: int, sink_port: int, policy_port: int) -> str:
    return f"""\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = mx.kithmail.test
mydomain = kithmail.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
relay_domains = {DOMAIN}
transport_maps = inline:{{ {DOMAIN}=smtp:[127.0.0.1]:{sink_port} }}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions =
    check_policy_service inet:127.0.0.1:{policy_port},
    permit_mynetworks,
    reject_unauth_destination
smtpd_policy_service_timeout = 10s
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
in_flow_delay = 0s
biff = no
"""


# Every chroot column `n`: the daemons run in the real filesystem.
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
    """One running private Postfix instance and its smtp-sink."""

    root: Path
    port: int  # smtpd on 127.0.0.1
    sink_port: int
    master: subprocess.Popen[bytes]
    sink: subprocess.Popen[bytes]
    check_seconds: float  # `postfix check`
    ready_seconds: float  # master started → smtpd's 220

    @property
    def conf(self) -> Path:
        return self.root / "conf"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    @property
    def sink_dir(self) -> Path:
        return self.root / "sink"

    def delivered(self) -> list[Path]:
        """The messages the sink has received so far, one file each."""
        return sorted(p for p in self.sink_dir.iterdir() if p.is_file())

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def wait_log(self, text: str, timeout: float = START_TIMEOUT) -> str:
        """Poll the maillog (postlogd writes it asynchronously) for a line holding `text`."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log().splitlines():
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the maillog; it ends:\n{_tail(self.maillog)}")
            time.sleep(0.05)  # polling a log file for a line, not guessing a duration

    def wait_sent(self, queue_id: str, timeout: float = START_TIMEOUT) -> str:
        """Poll the maillog until `queue_id` was relayed to the sink; its log line."""
        pattern = re.compile(rf"^.*\b{re.escape(queue_id)}: to=<.*\bstatus=(\w+).*$", re.M)
        deadline = time.monotonic() + timeout
        while True:
            found = {m[1]: m[0] for m in pattern.finditer(self.log())}
            if "sent" in found:
                return found["sent"]
            if found.keys() - {"deferred"} or time.monotonic() > deadline:
                raise AssertionError(
                    f"{queue_id} not relayed to the sink; maillog ends:\n{_tail(self.maillog)}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        _stop(self.master, group=True)
        _stop(self.sink, group=False)


def _prepare(root: Path, smtpd_port: int, sink_port: int, policy_port: int) -> None:
    conf = root / "conf"
    for d in (conf, root / "queue", root / "data", root / "sink"):
        d.mkdir()
    for d in (root / "data", root / "sink"):
        shutil.chown(d, "postfix", "postfix")
    (conf / "main.cf").write_text(_main_cf(root, smtpd_port, sink_port, policy_port))
    (conf / "master.cf").write_text(f"127.0.0.1:{smtpd_port} inet n - n - - smtpd\n" + _MASTER_CF)
    # Postfix will not read a main.cf modified within the last second (it
    # waits in 0.3 s steps for an editor to finish: ~2 s per start), so the
    # files are dated a minute back.
    past = time.time() - 60
    for name in ("main.cf", "master.cf"):
        os.utime(conf / name, (past, past))


def _start(root: Path, policy_port: int) -> Postfix:
    smtpd_port, sink_port = free_port(), free_port()
    _prepare(root, smtpd_port, sink_port, policy_port)
    conf, maillog = root / "conf", root / "maillog"

    t0 = time.monotonic()
    check = subprocess.run(
        [POSTFIX, "-c", str(conf), "check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    check_seconds = time.monotonic() - t0
    if check.returncode != 0:
        raise RuntimeError(
            f"postfix check failed ({check.returncode}): {check.stdout}{check.stderr}\n"
            f"maillog ends:\n{_tail(maillog)}"
        )

    sink_log = root / "smtp-sink.log"
    with sink_log.open("wb") as out:
        sink = subprocess.Popen(
            [SMTP_SINK, "-u", "postfix", "-d", f"{root}/sink/%M.", f"127.0.0.1:{sink_port}", "10"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_greeting(sink, sink_port, "smtp-sink", sink_log)
    except BaseException:
        _stop(sink, group=False)
        raise

    master_log = root / "master.out"
    t0 = time.monotonic()
    with master_log.open("wb") as out:
        master = subprocess.Popen(
            [MASTER, "-c", str(conf), "-d"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_greeting(master, smtpd_port, "Postfix smtpd", maillog)
    except RuntimeError as e:
        _stop(master, group=True)
        _stop(sink, group=False)
        # Before postlogd runs, master logs only to syslog (no /dev/log here),
        # so its likeliest fatal error, a taken port, is diagnosed here.
        hint = ""
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", smtpd_port))
            except OSError as err:
                hint = f"\n127.0.0.1:{smtpd_port} cannot be bound: {err.strerror}"
        raise RuntimeError(f"{e}\nmaster's own output:\n{_tail(master_log)}{hint}") from None
    except BaseException:
        _stop(master, group=True)
        _stop(sink, group=False)
        raise
    return Postfix(root, smtpd_port, sink_port, master, sink, check_seconds, time.monotonic() - t0)


@contextlib.contextmanager
def postfix_instance(policy_port: int, keep_logs: Path | None = None) -> Iterator[Postfix]:
    """Yield a running private Postfix asking the policy service on `policy_port`.

    Its files live in a temp dir removed on exit; the maillog is first
    copied into `keep_logs` (a test's tmp_path) when given.
    """
    for tool in (POSTFIX, MASTER, SMTP_SINK):
        if not Path(tool).exists():
            raise RuntimeError(
                f"{tool} is missing: apt-get install -y --no-install-recommends postfix swaks"
            )
    if os.geteuid() != 0:
        raise RuntimeError("a private Postfix instance needs root (master binds, setuid postfix)")
    root = Path(tempfile.mkdtemp(prefix="kith-postfix-"))
    root.chmod(0o755)  # the daemons run as postfix and must reach their queue
    try:
        for attempt in range(3):
            try:
                pf = _start(root, policy_port)
                break
            except RuntimeError:
                # A port taken between probe and bind: start over, afresh.
                if attempt == 2:
                    raise
                shutil.rmtree(root)
                root.mkdir(mode=0o755)
        try:
            yield pf
        finally:
            pf.stop()
            if keep_logs is not None:
                for name in ("maillog", "smtp-sink.log", "master.out"):
                    with contextlib.suppress(OSError):
                        shutil.copy(root / name, keep_logs / f"postfix-{name}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- swaks


@dataclass
class Attempt:
    """One SMTP transaction as swaks saw it."""

    output: str
    rcpt_code: int  # the reply to RCPT TO
    rcpt_reply: str  # its full text, code included
    queue_id: str | None  # Postfix's, when the message was queued

    def __str__(self) -> str:
        return self.rcpt_reply


_RCPT = re.compile(r"^ -> RCPT TO:.*\n<(?:-|\*\*) +((\d{3})[ -].*)$", re.M)
_QUEUED = re.compile(r"^<- +250 .*queued as (\w+)", re.M)


def swaks(
    pf: Postfix, source: str, *, sender: str, to: str, subject: str, timeout: float = 60
) -> Attempt:
    """Send one message to `pf`'s smtpd from the loopback address `source`."""
    if not Path(SWAKS).exists():
        raise RuntimeError("swaks is missing: apt-get install -y --no-install-recommends swaks")
    done = subprocess.run(
        [
            SWAKS,
            "--server",
            f"127.0.0.1:{pf.port}",
            "--local-interface",
            source,
            "--helo",
            "client.example",
            "--from",
            sender,
            "--to",
            to,
            "--header",
            f"Subject: {subject}",
            "--timeout",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    out = done.stdout + done.stderr
    m = _RCPT.search(out)
    if m is None:
        raise AssertionError(f"swaks got no reply to RCPT (exit {done.returncode}):\n{out}")
    q = _QUEUED.search(out)
    return Attempt(out, int(m[2]), m[1], q[1] if q else None)


# ---------------------------------------------------------------- kith policy


@dataclass
class KithPolicy:
    """A running `kith policy -c config`."""

    config: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def kith(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `kith -c CONFIG ARGS...` against the same data dir; must succeed."""
        done = subprocess.run(
            [str(KITH), "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"kith {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done

    def stop(self) -> None:
        _stop(self.proc, group=False)


READY_REQUEST = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.254\n"
    b"sender=ready@ready.invalid\nrecipient=ready@example.test\n\n"
)


def _ask_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = f"exited with {proc.returncode}"
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(READY_REQUEST)
                answer = s.makefile("rb").readline().decode(errors="replace")
                if answer.startswith("action="):
                    return
                last = f"answered {answer!r}"
        except ConnectionRefusedError:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.02)
        except OSError as e:
            last = str(e)
    raise RuntimeError(
        f"kith policy did not answer on 127.0.0.1:{port} ({last or 'timed out'}); "
        f"its log ends:\n{_tail(log)}"
    )


@contextlib.contextmanager
def kith_policy(tmp_path: Path, *, min_delay: str = "2s") -> Iterator[KithPolicy]:
    """Yield a running `kith policy` with its own config and data dir in tmp_path."""
    port, web = free_port(), free_port()
    config = tmp_path / "kithmail.toml"
    config.write_text(
        f"""\
[server]
data_dir = "{tmp_path / "var"}"
listeners = {{ policy = ["127.0.0.1:{port}"], web = ["127.0.0.1:{web}"] }}

[domains]
local = ["{DOMAIN}"]
trusted_networks = ["127.0.0.1/32"]

[dns]
# Nothing listens there: a lookup (an SPF check for a pool-aware retry)
# fails at once instead of waiting on a resolver.
nameservers = ["127.0.0.1:9"]
timeout = "250ms"

[recon]
min_delay = "{min_delay}"

[policy]
policy_clients = ["127.0.0.1/32"]
"""
    )
    log = tmp_path / "kith-policy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(KITH), "policy", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = KithPolicy(config, port, proc, log)
    try:
        _ask_ready(proc, port, log)
        yield server
    finally:
        server.stop()
