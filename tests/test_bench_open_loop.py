"""The open-loop driver's bookkeeping (harness/bench/open_loop.py) against fake TPM
endpoints: what it counts as due, answered and failed. No benchmark runs here, and
nothing is timed but the schedule the driver keeps itself."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from harness.bench import open_loop
from xenvtpm import tpm

_RANDOM_16 = bytes.fromhex("80010000001c00000000" + "0010") + bytes(16)


@contextlib.contextmanager
def endpoints(
    tmp_path: Path, answers: list[Callable[[bytes], bytes | None]]
) -> Iterator[list[Path]]:
    """One SOCK_SEQPACKET endpoint per ``answers`` entry, served by one thread; an
    answer of None closes that client's connection."""
    sel = selectors.DefaultSelector()
    paths, listeners = [], []
    for i, answer in enumerate(answers):
        path = tmp_path / f"tpm{i}.sock"
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        lst.bind(str(path))
        lst.listen(4)
        sel.register(lst, selectors.EVENT_READ, ("listen", answer))
        paths.append(path)
        listeners.append(lst)
    stop_r, stop_w = socket.socketpair()
    sel.register(stop_r, selectors.EVENT_READ, ("stop", None))

    def serve() -> None:
        while True:
            for key, _ in sel.select():
                kind, answer = key.data
                if kind == "stop":
                    return
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if kind == "listen":
                    conn, _ = sock.accept()
                    sel.register(conn, selectors.EVENT_READ, ("conn", answer))
                    continue
                command = sock.recv(4096)
                reply = answer(command) if command else None
                if reply is None:
                    sel.unregister(sock)
                    sock.close()
                else:
                    sock.send(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield paths
    finally:
        stop_w.send(b"x")
        thread.join(5)
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
        stop_w.close()


def test_every_due_command_is_answered_or_counted_unsent(tmp_path: Path) -> None:
    """Each command due in the window is accounted for: answered (with its latency), or
    counted as unsent when this host fell behind (a loaded machine sends fewer in time:
    a benchmark's finding, not this test's)."""
    with endpoints(tmp_path, [lambda c: _RANDOM_16] * 4) as paths:
        res = open_loop.drive(paths, rate=50.0, duration=0.4, warmup=0.1)
    assert res.due == 4 * 20  # 50/s for 0.4 s on each of 4 guests
    assert res.answered + res.unsent == res.due and len(res.latencies_ns) == res.answered
    assert res.answered > 0 and res.errors == 0
    assert res.sent >= res.answered + 4 * 5 - 4  # the warm-up's commands were sent too


def test_failed_answers_and_closed_endpoints_are_errors(tmp_path: Path) -> None:
    failure = tpm.error_response(tpm.TPM_RC.FAILURE)
    answers: list[Callable[[bytes], bytes | None]] = [
        lambda c: _RANDOM_16,
        lambda c: failure,
        lambda c: None,  # hangs up on the first command
    ]
    with endpoints(tmp_path, answers) as paths:
        res = open_loop.drive(paths, rate=50.0, duration=0.2, warmup=0.0)
    assert res.answered == 10  # the healthy guest's 50/s for 0.2 s
    assert res.errors == 10 + 1  # every failure answer, and the one hang-up
    assert any("80010000000a00000101" in e for e in res.error_samples)
    assert "endpoint closed the connection" in res.error_samples


def test_the_goal_level_is_judged_on_p99_and_errors() -> None:
    entry = {"guests": 128, "rate_per_guest": 20.0, "p99_us": 19_000.0, "errors": 0}
    assert open_loop.goal_met([entry]) == (True, entry)
    assert open_loop.goal_met([entry | {"errors": 1}])[0] is False
    assert open_loop.goal_met([entry | {"p99_us": 21_000.0}])[0] is False
    assert open_loop.goal_met([entry | {"guests": 32}]) == (None, None)


def test_an_overloaded_level_ends_with_its_window_and_counts_the_backlog(
    tmp_path: Path,
) -> None:
    def slow(command: bytes) -> bytes:
        time.sleep(0.05)  # 20 answers a second, for 100 a second due
        return _RANDOM_16

    with endpoints(tmp_path, [slow]) as paths:
        res = open_loop.drive(paths, rate=100.0, duration=0.3, warmup=0.0)
    assert res.due == 30
    assert res.unsent > 0 and res.late_sends > 0 and res.errors == 0
    assert res.answered + res.unsent == res.due
