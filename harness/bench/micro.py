"""What each per-command step of the driver costs in Python, measured in-process.

The same helpers the frontend and backend call for every command, on a private ring
and data pages (anonymous mmaps, as the simulated grant pages are), timed with
``timeit`` (best of 5). Per command the frontend writes the request and reads the
response, the backend reads the request and writes the response: each of
``write_packet`` and ``read_packet`` runs twice per command in the driver pair.
"""

from __future__ import annotations

import mmap
import socket
import timeit
from collections.abc import Callable
from typing import Any

from harness.bench.latency import GET_RANDOM_16

PAGE = 4096
_RESPONSE = bytes.fromhex("80010000001c00000000" + "0010") + bytes(16)


def best_us(fn: Callable[[], object], number: int = 5000) -> float:
    return round(min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6, 2)


def hot_path_steps() -> dict[str, Any]:
    """Microseconds per call of each per-command step (and per command, in total)."""
    from xenvtpm import tpm, tpmif
    from xenvtpm.loop import Loop
    from xenvtpm.xen.interface import MAX_CONSUME_ROUNDS

    maps = [mmap.mmap(-1, PAGE) for _ in range(1 + tpmif.TPMIF_TX_RING_SIZE)]
    ring, data = memoryview(maps[0]), [memoryview(m) for m in maps[1:]]
    refs = tuple(range(8, 8 + len(data)))
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    loop = Loop()

    def read_packet() -> bytes:
        entries = tpmif.read_ring(ring)
        return tpmif.gather(data, tpmif.packet_length(entries, len(data)))

    def notify_consume() -> None:  # as SimEventChannel: one byte, one bounded recv
        a.send(b"\x01", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        b.recv(MAX_CONSUME_ROUNDS)

    def timer() -> None:
        loop.call_later(180.0, lambda: None).cancel()
        loop._next_due()

    try:
        tpmif.write_packet(ring, data, refs, GET_RANDOM_16)
        steps = {
            "tpmif.write_packet": best_us(
                lambda: tpmif.write_packet(ring, data, refs, GET_RANDOM_16)
            ),
            "tpmif.read_ring+packet_length+gather": best_us(read_packet),
            "tpm.validate_command": best_us(lambda: tpm.validate_command(GET_RANDOM_16)),
            "tpm.validate_response": best_us(lambda: tpm.validate_response(_RESPONSE)),
            "event channel notify+consume": best_us(notify_consume),
            "Loop.call_later+cancel": best_us(timer),
        }
    finally:
        loop.close()
        a.close()
        b.close()
        for view in (ring, *data):
            view.release()
        for m in maps:
            m.close()
    ring_us = 2 * (steps["tpmif.write_packet"] + steps["tpmif.read_ring+packet_length+gather"])
    return {
        "us_per_call": steps,
        "ring_us_per_command": round(ring_us, 2),
        "note": "frontend and backend each write and read the ring once per command",
    }
