"""What every long-running kithmail process builds from its settings.

One place that turns validated settings into the open core, the resolver and
the layers, so `kith policy` and (later) `kith serve` build them alike.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from kithmail import Core, config


def open_core(settings: config.Settings) -> Core:
    """The core at `<data_dir>/core`, with the settings' prefixes and timings.

    A core built with other prefix lengths raises ConfigMismatchError, which
    names both: the server never re-keys the Recon table silently.
    """
    r = settings.recon
    settings.core_dir.mkdir(parents=True, exist_ok=True)
    return Core(
        str(settings.core_dir),
        map_size=settings.server.core_map_size,
        ipv4_prefix=r.ipv4_prefix,
        ipv6_prefix=r.ipv6_prefix,
        min_delay=int(r.min_delay),
        retry_window=int(r.retry_window),
        pass_ttl=int(r.pass_ttl),
        commit_window_ms=int(r.commit_window * 1000),
        ipv6_new_per_48=r.ipv6_new_per_48,
    )


# C0 controls, DEL and the C1 range, and the Unicode line and paragraph
# separators: whatever a log reader could take for the end of a line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(text: str) -> str:
    """`text` on one line: every control character escaped (\\n, \\r, \\t, \\xNN, \\uNNNN).

    Backslashes are left alone (messages carry JSON details whose escapes
    would double): this keeps a line one event, it is not a reversible encoding.
    """

    def one(m: re.Match[str]) -> str:
        c = m.group()
        named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c)
        if named is not None:
            return named
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return _CONTROL.sub(one, text)


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER[PID] MESSAGE`, one line per event whatever the message holds.

    Client strings (a HELO, an address) reach log messages; a CR or LF in
    one must not start a forged line, so the whole line — message and any
    traceback — is escaped here, once, for every logger.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        return _escape(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, pid, msg, and exc when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": TextFormatter.formatTime(TextFormatter(), record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # ensure_ascii: no raw U+2028 either; json escapes every control character.
        return json.dumps(out, ensure_ascii=True)


def setup_logging(settings: config.Settings | None = None) -> None:
    """One line per event on stderr, as journald and log shippers take it.

    `[server] log_format` chooses `TextFormatter` (the default) or
    `JsonFormatter`; `[server] log_level` the least severe level written.
    Calling it again (a reload) replaces the handler.
    """
    fmt = settings.server.log_format if settings is not None else "text"
    level = settings.server.log_level if settings is not None else "info"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_kithmail", False):
            root.removeHandler(h)
    handler._kithmail = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiosmtpd logs every peer and command at INFO under "mail.log"; the
    # listener writes its own line per transaction instead.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
