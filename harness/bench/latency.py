"""Latency of one client's commands on the two paths, side by side.

* **direct**: a plain swtpm (the ``direct`` target), one persistent connection to its
  data socket (SOCK_STREAM; swtpm serves one connection at a time, so raw commands and
  the ESAPI context share it).
* **driver**: a guest of the ``sim`` target, one persistent connection to its TPM
  endpoint (the frontend's SOCK_SEQPACKET socket), through frontend, ring, backend,
  manager and the manager's swtpm.

Both paths use the same client code: raw commands are one blocking ``send`` and
``recv`` (no timeout, so no extra ``poll``; a watchdog timer interrupts a hang), and
ESAPI goes through the harness's ``TransportTCTI`` over the same connection. Rounds
alternate the order of the two paths so that drift on a shared machine hits both.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from harness import tpmwire
from harness.errors import TransportClosed, TransportError, TransportTimeout
from harness.transport import DEFAULT_TIMEOUT
from xenvtpm.lifecycle import Closeable

MAX_RESPONSE = 65536
_HEADER = struct.Struct(">HII")
GET_RANDOM_16 = tpmwire.get_random(16)
WATCHDOG_S = 60.0


class Link(Closeable):
    """One persistent connection to a TPM; a ``RawTransport`` for the TCTI as well.

    ``roundtrip`` is the benchmark's raw operation; ``transmit`` (RawTransport) adds
    the timeout the TCTI asks for. ``stream`` links read until the response header's
    size is complete (swtpm does not frame); seqpacket links get one message.
    """

    def __init__(self, path: Path, kind: int) -> None:
        self.path = Path(path)
        self.stream = kind == socket.SOCK_STREAM
        self._sock = socket.socket(socket.AF_UNIX, kind)
        self._sock.settimeout(10.0)
        try:
            self._sock.connect(str(path))
        except OSError as e:
            self._sock.close()
            raise TransportClosed(f"connect {path}: {e}") from e
        self._timeout: float | None = 10.0
        self._closed = False

    def set_timeout(self, seconds: float | None) -> None:
        if seconds != self._timeout:
            self._sock.settimeout(seconds)
            self._timeout = seconds

    def roundtrip(self, cmd: bytes) -> bytes:
        sock = self._sock
        sock.send(cmd)
        reply = sock.recv(MAX_RESPONSE)
        if not reply:
            raise TransportClosed(f"{self.path}: closed by the peer")
        if self.stream:
            while len(reply) < _HEADER.size or len(reply) < _HEADER.unpack_from(reply)[1]:
                more = sock.recv(MAX_RESPONSE)
                if not more:
                    raise TransportClosed(f"{self.path}: closed mid-response")
                reply += more
        return reply

    def transmit(self, cmd: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        if self._closed:
            raise TransportClosed(f"{self.path}: closed")
        self.set_timeout(timeout)
        try:
            return self.roundtrip(cmd)
        except TimeoutError as e:
            raise TransportTimeout(f"{self.path}: no response in {timeout} s") from e
        except OSError as e:
            raise TransportClosed(f"{self.path}: {e}") from e

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()


@contextlib.contextmanager
def watchdog(seconds: float, what: str) -> Iterator[None]:
    """Interrupt a blocking loop that hangs (SIGALRM; main thread only)."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise TransportTimeout(f"{what}: no progress in {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_success(reply: bytes) -> None:
    if len(reply) < _HEADER.size:
        raise TransportError(f"short response {reply.hex()}")
    code = _HEADER.unpack_from(reply)[2]
    if code != 0:
        raise TransportError(f"TPM answered 0x{code:x}")


@dataclass
class PathClient:
    """Everything one path needs for the four workloads: the link, an ESAPI context on
    it, and two signing keys (primary keys in the NULL hierarchy: nothing persists)."""

    name: str
    link: Link
    esapi: Any = None
    ecc_key: Any = None
    rsa_key: Any = None

    def setup(self) -> None:
        from tpm2_pytss import ESAPI, ESYS_TR, TPM2B_PUBLIC

        from harness.tcti import TransportTCTI

        check_success(self.link.transmit(GET_RANDOM_16))
        self.esapi = ESAPI(TransportTCTI(self.link))
        attrs = "userwithauth|sign|fixedtpm|fixedparent|sensitivedataorigin"
        for attr, alg in (("ecc_key", "ecc256:ecdsa-sha256"), ("rsa_key", "rsa2048:rsassa-sha256")):
            public = TPM2B_PUBLIC.parse(alg, objectAttributes=attrs)
            handle = self.esapi.create_primary(None, public, ESYS_TR.NULL)[0]
            setattr(self, attr, handle)

    def ops(self) -> dict[str, Callable[[], object]]:
        from tpm2_pytss import (
            TPM2_ALG,
            TPM2_RH,
            TPM2_ST,
            TPM2B_DIGEST,
            TPMT_SIG_SCHEME,
            TPMT_TK_HASHCHECK,
        )

        digest = TPM2B_DIGEST(bytes(range(32)))
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)  # the key's own scheme
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        esapi, link = self.esapi, self.link
        return {
            "getrandom_raw": lambda: link.roundtrip(GET_RANDOM_16),
            "getrandom_esapi": lambda: esapi.get_random(16),
            "ecc_sign": lambda: esapi.sign(self.ecc_key, digest, scheme, ticket),
            "rsa_sign": lambda: esapi.sign(self.rsa_key, digest, scheme, ticket),
        }

    def close(self) -> None:
        if self.esapi is not None:
            for handle in (self.ecc_key, self.rsa_key):
                if handle is not None:
                    with contextlib.suppress(Exception):
                        self.esapi.flush_context(handle)
            with contextlib.suppress(Exception):
                self.esapi.close()
            self.esapi = None
        self.link.close()


def sample(op: Callable[[], object], n: int, warmup: int) -> tuple[list[int], float]:
    """Run ``op`` ``warmup`` times unmeasured, then ``n`` times; (latencies ns, wall s)."""
    clock = time.perf_counter_ns
    for _ in range(warmup):
        op()
    out = [0] * n
    start = clock()
    for i in range(n):
        t = clock()
        op()
        out[i] = clock() - t
    return out, (clock() - start) / 1e9


@dataclass(frozen=True)
class Plan:
    """Operations per round and path, per workload; rounds alternate path order."""

    ops: dict[str, int]
    rounds: int
    warmup: int

    @classmethod
    def for_mode(cls, quick: bool) -> Plan:
        if quick:
            ops = {"getrandom_raw": 2000, "getrandom_esapi": 500, "ecc_sign": 120, "rsa_sign": 30}
            return cls(ops, rounds=3, warmup=20)
        ops = {"getrandom_raw": 6000, "getrandom_esapi": 1500, "ecc_sign": 400, "rsa_sign": 100}
        return cls(ops, rounds=5, warmup=50)


def measure_workload(
    clients: dict[str, PathClient], workload: str, plan: Plan
) -> dict[str, tuple[list[int], float]]:
    """Interleaved rounds of one workload on every path: path -> (latencies, busy s)."""
    ops = {name: c.ops()[workload] for name, c in clients.items()}
    names = list(clients)
    pooled: dict[str, tuple[list[int], float]] = {n: ([], 0.0) for n in names}
    n = plan.ops[workload]
    for c in clients.values():  # raw: plain blocking I/O; ESAPI: the TCTI's timeout
        c.link.set_timeout(None if workload == "getrandom_raw" else DEFAULT_TIMEOUT)
    for r in range(plan.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            with watchdog(WATCHDOG_S, f"{workload} on {name}"):
                lat, busy = sample(ops[name], n, plan.warmup)
            pooled[name][0].extend(lat)
            pooled[name] = (pooled[name][0], pooled[name][1] + busy)
    return pooled
