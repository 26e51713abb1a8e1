"""The floor of the driver's architecture on this machine: three do-nothing relays.

The driver puts three processes (frontend, backend, manager) between the client and
swtpm. Issue 6 calls "three process hops against one" the floor. This measures it:
three Python processes that only ``recv`` and ``send`` (blocking, no event loop, no
parsing), chained by SOCK_SEQPACKET socketpairs, the last one connected to the same
swtpm the direct path uses. The driver can approach this number, never beat it; the
gap between the two is what the driver's own code costs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness.bench import procs
from harness.bench.latency import GET_RANDOM_16, sample, watchdog
from harness.bench.stats import Summary

HOPS = 3
_RELAY = """
import socket, sys
up = socket.socket(fileno=int(sys.argv[1]))
if sys.argv[2].isdigit():
    down = socket.socket(fileno=int(sys.argv[2]))
else:
    down = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    down.connect(sys.argv[2])
while True:
    data = up.recv(65536)
    if not data:
        break
    down.sendall(data)
    up.sendall(down.recv(65536))
"""


def _roundtrip(sock: socket.socket) -> bytes:
    sock.send(GET_RANDOM_16)
    return sock.recv(65536)


def measure(
    swtpm_socket: Path, swtpm_pid: int, n: int, warmup: int, rounds: int = 3
) -> dict[str, Any]:
    """GetRandom(16) through ``HOPS`` relays to swtpm, pinned to CPU 0 and unpinned.
    swtpm serves one connection at a time: nothing else may be connected to it."""
    relays: list[subprocess.Popen[bytes]] = []
    down, down_sock = str(swtpm_socket), None
    try:
        for _ in range(HOPS):  # from swtpm back towards the client
            near, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            fds = [far.fileno()] + ([down_sock.fileno()] if down_sock is not None else [])
            argv = [sys.executable, "-c", _RELAY, str(far.fileno()), down]
            relays.append(subprocess.Popen(argv, pass_fds=fds))
            far.close()
            if down_sock is not None:
                down_sock.close()
            down_sock, down = near, str(near.fileno())
        assert down_sock is not None
        client = down_sock
        client.settimeout(10.0)
        if len(_roundtrip(client)) < 10:  # the chain is up
            raise RuntimeError("relay chain gave a short answer")
        client.settimeout(None)
        pids = [swtpm_pid, *(r.pid for r in relays)]
        out: dict[str, Any] = {"hops": HOPS}
        for mode in ("pinned", "unpinned"):
            cpus = {procs.PIN_CPU} if mode == "pinned" else procs.all_cpus()
            procs.set_affinity([*pids, os.getpid()], cpus)
            lat: list[int] = []
            busy = 0.0
            for _ in range(rounds):
                with watchdog(60.0, "relay chain"):
                    got, took = sample(lambda: _roundtrip(client), n, warmup)
                lat += got
                busy += took
            out[mode] = Summary.from_ns(lat, busy).to_json()
        return out
    finally:
        procs.set_affinity([r.pid for r in relays], procs.all_cpus())
        if down_sock is not None:
            down_sock.close()
        for r in relays:
            r.kill()
            r.wait()
