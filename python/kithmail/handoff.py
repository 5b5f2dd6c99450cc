"""Mail accepted by the other workers, handed to worker 0's queue at once.

Only worker 0 runs the delivery queue. Without a word from the others it
would find their accepted mail only at its next spool scan (`[queue]`'s
scan, every 0.5 s): that was the p99 of the delay from 250 to the
downstream with two workers. So the parent makes one pipe before it
forks: a worker that accepts a message writes the queue id and a newline
to it, and worker 0's event loop reads the ids and schedules each at
once.

The pipe is a hint, never the record: the message is already in the
spool when its id is written. A write that would block (the pipe full,
worker 0 busy) or fail is dropped, and the scan finds the message as
before. Worker 0 trusts nothing it reads: a line that is not a queue id
is ignored, and what it keeps of a line cut by a read is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from kithmail.spool import is_queue_id

__all__ = ["Handoff"]

log = logging.getLogger("kithmail.handoff")

_LINE = 64  # longer than any queue id and its newline: a longer rest is dropped


class Handoff:
    """One pipe from every worker to worker 0 (made in the parent, before the fork)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._rest = b""

    def sender(self) -> Callable[[str], None]:
        """For workers 1..n: closes this worker's read end; the function that hands an id on."""
        with contextlib.suppress(OSError):
            os.close(self._r)
        w = self._w

        def send(queue_id: str) -> None:
            # One write of under PIPE_BUF bytes: whole or not at all, never interleaved.
            with contextlib.suppress(OSError):  # full (EAGAIN) or gone: the scan finds it
                os.write(w, queue_id.encode("ascii") + b"\n")

        return send

    def receive(self, loop: asyncio.AbstractEventLoop, notify: Callable[[str], None]) -> None:
        """For worker 0: read the ids in ``loop`` and ``notify`` each (`Queue.notify`)."""
        with contextlib.suppress(OSError):
            os.close(self._w)
        loop.add_reader(self._r, self._read, notify)

    def _read(self, notify: Callable[[str], None]) -> None:
        try:
            data = os.read(self._r, 65536)
        except BlockingIOError:
            return
        except OSError as e:
            log.warning("handoff pipe: %s; the spool scan finds the others' mail", e)
            asyncio.get_running_loop().remove_reader(self._r)
            return
        if not data:  # every writer has gone
            asyncio.get_running_loop().remove_reader(self._r)
            return
        lines = (self._rest + data).split(b"\n")
        rest = lines.pop()
        self._rest = rest if len(rest) <= _LINE else b""
        for line in lines:
            text = line.decode("ascii", "replace")
            if is_queue_id(text):
                notify(text)

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
