"""The handoff pipe: other workers' accepted mail reaches worker 0's queue at once.

Real pipes and a real fork: a child process writes queue ids as a worker
does after accepting a message, and the parent's event loop, as worker 0,
gets each one whole. What worker 0 must not trust, it drops: a line that
is not a queue id, an over-long rest. And a worker never blocks on it: a
full pipe drops the hint (the spool scan finds the message anyway).
"""

from __future__ import annotations

import asyncio
import os
import time

from kithmail.handoff import Handoff

IDS = [f"{n:011d}abcdefgh" for n in range(200)]  # the form of queue ids: 19 of [0-9a-z]


def _receive(handoff: Handoff, want: int) -> list[str]:
    async def main() -> list[str]:
        got: list[str] = []
        done = asyncio.Event()

        def notify(qid: str) -> None:
            got.append(qid)
            if len(got) >= want:
                done.set()

        handoff.receive(asyncio.get_running_loop(), notify)
        await asyncio.wait_for(done.wait(), 30)
        return got

    return asyncio.run(main())


def _worker(handoff: Handoff, ids: list[str]) -> int:
    """A forked process that hands on `ids` as a worker does, then exits 0; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            send = handoff.sender()
            for qid in ids:
                send(qid)
            code = 0
        finally:
            os._exit(code)
    return pid


def test_ids_written_by_another_process_arrive_whole_and_in_order() -> None:
    handoff = Handoff()
    pid = _worker(handoff, IDS)
    try:
        assert _receive(handoff, len(IDS)) == IDS
    finally:
        _, status = os.waitpid(pid, 0)
        handoff.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_what_is_not_a_queue_id_is_dropped_and_a_cut_line_is_joined() -> None:
    handoff = Handoff()
    w = handoff._w  # the raw pipe: what a broken or hostile writer could put there
    os.write(w, b"../../etc/passwd\n" + b"X" * 1000 + b"\n" + IDS[0].encode()[:7])
    os.write(w, IDS[0].encode()[7:] + b"\nNOT-AN-ID\n" + IDS[1].encode() + b"\n")
    try:
        assert _receive(handoff, 2) == IDS[:2]
    finally:
        handoff.close()


def _exit_code(pid: int, seconds: float) -> int | None:
    """The child's exit code, or None if it is still running after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return None


def test_a_full_pipe_never_blocks_the_worker() -> None:
    handoff = Handoff()
    many = [f"{n:011d}abcdefgh" for n in range(20_000)]  # 400 kB; a pipe holds 64 kB
    pid = _worker(handoff, many)  # while worker 0 reads nothing
    code = None
    try:
        code = _exit_code(pid, 60)
        assert code == 0, "the worker blocked on a full pipe" if code is None else code
        got = _receive(handoff, 1)
        # What fitted arrives whole and in order; the rest was dropped, never half-written.
        assert got == many[: len(got)]
    finally:
        if code is None:  # still running: stop it
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        handoff.close()
