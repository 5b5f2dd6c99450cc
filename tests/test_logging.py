"""Log output as journald and a log shipper take it: one line per event, nothing forged.

A client's string (a HELO, an address, a policy request's field) may hold
CR, LF or other controls; written into a log line as it is, it would start
a line of its own that a reader takes for our event. `kithmail.runtime`'s
formatters escape every control character, tracebacks included; `[server]
log_format = "json"` writes one JSON object a line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway import Client, Gateway, message, run, running_gateway, send

from kithmail import config
from kithmail.runtime import JsonFormatter, TextFormatter, setup_logging

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+\[\d+\] \S"
)
HOSTILE = "evil.example\r\nINFO kithmail.smtp[1] forged\u2028also\x1b[31m"


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nthing")
        except ValueError as e:
            exc_info = (type(e), e, e.__traceback__)
    return logging.LogRecord("kithmail.smtp", logging.INFO, __file__, 1, msg, args, exc_info)


def test_text_lines_escape_every_control_character() -> None:
    out = TextFormatter().format(_record("helo=%s", HOSTILE))
    assert "\n" not in out and "\r" not in out and "\u2028" not in out and "\x1b" not in out
    assert LINE.match(out), out
    assert out.endswith(
        "helo=evil.example\\r\\nINFO kithmail.smtp[1] forged\\u2028also\\x1b[31m"
    ), out

    # A traceback stays on the line of its event.
    out = TextFormatter().format(_record("session error", exc=True))
    assert "\n" not in out
    assert "session error\\nTraceback (most recent call last):" in out
    assert "ValueError: bad\\nthing" in out


def test_json_lines_are_one_object_each() -> None:
    out = JsonFormatter().format(_record("helo=%s", HOSTILE, exc=True))
    assert "\n" not in out and "\r" not in out and "\u2028" not in out
    got = json.loads(out)
    assert set(got) == {"ts", "level", "logger", "pid", "msg", "exc"}
    assert got["msg"] == "helo=" + HOSTILE  # nothing lost, only encoded
    assert got["level"] == "info" and got["logger"] == "kithmail.smtp"
    assert got["exc"].startswith("Traceback") and got["exc"].endswith("ValueError: bad\nthing")


def test_setup_logging_follows_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        settings = config.Settings.model_validate(
            {"server": {"log_format": "json", "log_level": "warning"}}
        )
        setup_logging(settings)
        setup_logging(settings)  # again, as a reload does: still one handler
        logging.getLogger("kithmail.test").info("not written")
        logging.getLogger("kithmail.test").warning("written %s", "once")
        lines = capsys.readouterr().err.splitlines()
        assert [json.loads(line)["msg"] for line in lines] == ["written once"]
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])


def _events(gw: Gateway) -> list[str]:
    # The first start prints the admin account's password once on stdout
    # (the same file here); every other line is a log event.
    return [
        line
        for line in gw.log_text().splitlines()
        if line and not line.startswith("kithmail: created the admin account")
    ]


async def _hostile_session(port: int) -> None:
    c, _ = await Client.connect(port, "127.0.0.2")
    try:
        await c.cmd(b"EHLO evil\rINFO kithmail.forged[1] injected")
        await c.cmd(b"EHLO evil.example")
        await c.cmd(b"MAIL FROM:<a\rb@x.test>")
        await c.cmd(b"MAIL FROM:<bob@remote.test>")
        await c.cmd(b"RCPT TO:<ann@example.test\x1b>")
        await c.cmd(b"QUIT")
    finally:
        await c.close()


@pytest.fixture(params=["text", "json"])
def gw_format(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Gateway, str]]:
    fmt: str = request.param
    with running_gateway(tmp_path / "gw", sections={"server": {"log_format": fmt}}) as g:
        yield g, fmt


def test_every_line_of_a_running_gateway_is_one_event(gw_format: tuple[Gateway, str]) -> None:
    gw, fmt = gw_format
    run(_hostile_session(gw.port))
    r = run(send(gw.port, "127.0.0.1", "bob@remote.test", ["ann@example.test"], message()))
    assert r[-1].code == 250
    gw.wait_for("the transaction's line", lambda: "kithmail.smtp.transaction" in gw.log_text())
    events = _events(gw)
    assert len(events) > 5
    if fmt == "json":
        parsed = [json.loads(line) for line in events]
        assert {tuple(sorted(p)) for p in parsed} <= {
            ("level", "logger", "msg", "pid", "ts"),
            ("exc", "level", "logger", "msg", "pid", "ts"),
        }
        assert any(p["msg"].startswith("kithmail ready") for p in parsed)
        assert any(p["logger"] == "kithmail.smtp.transaction" for p in parsed)
    else:
        for line in events:
            assert LINE.match(line), line
