"""Time GetRandom(16) round trips on one TPM, where the TPM is: inside a Xen domain.

``harness.bench.xen`` feeds this file to ``python3 -`` over SSH, in a guest (against its
``/dev/tpm0``: frontend, ring, backend, manager, swtpm) and in dom0 (against a swtpm's
unix socket, reached directly), so both clocks are the domain's own and SSH is not in
the timed path. Standard library only: nothing is installed in the domains for it.

    python3 - device /dev/tpm0 N WARMUP
    python3 - socket /tmp/xvbench/swtpm.sock N WARMUP

One JSON object on stdout: ``samples_ns`` (N round trips, write to complete response)
and ``busy_s`` (the wall time of the N). A failed command exits 1 with the evidence.
Spec: TPM 2.0 Part 3, 16.1 TPM2_GetRandom.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time

# tag TPM_ST_NO_SESSIONS, commandSize 12, TPM_CC_GetRandom (0x17B), bytesRequested 16
GET_RANDOM_16 = bytes.fromhex("80010000000c0000017b0010")
HEADER = struct.Struct(">HII")  # tag, size, responseCode
MAX_RESPONSE = 4096


class TimingError(Exception):
    """A round trip that did not give a successful GetRandom response."""


class Device:
    """A TPM character device: one write, one read gives the whole response."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)

    def roundtrip(self, command: bytes) -> bytes:
        os.write(self.fd, command)
        return os.read(self.fd, MAX_RESPONSE)

    def close(self) -> None:
        os.close(self.fd)


class UnixStream:
    """swtpm's data socket: a stream, so read until the header's size is complete."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def roundtrip(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        reply = b""
        size = HEADER.size
        while len(reply) < size:
            chunk = self.sock.recv(MAX_RESPONSE)
            if not chunk:
                raise TimingError(f"EOF after {len(reply)} bytes")
            reply += chunk
            if len(reply) >= HEADER.size:
                size = HEADER.unpack_from(reply)[1]
        return reply

    def close(self) -> None:
        self.sock.close()


def check(reply: bytes) -> None:
    if len(reply) < HEADER.size:
        raise TimingError(f"short response {reply.hex()}")
    _, size, rc = HEADER.unpack_from(reply)
    if rc != 0 or size != len(reply) or len(reply) != 28:
        raise TimingError(f"GetRandom(16) failed: rc 0x{rc:x}, response {reply.hex()}")


def measure(tpm: Device | UnixStream, n: int, warmup: int) -> tuple[list[int], float]:
    """``warmup`` untimed round trips, then ``n`` timed ones (ns) and their wall time."""
    for _ in range(warmup):
        check(tpm.roundtrip(GET_RANDOM_16))
    samples = []
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(n):
        start = clock()
        reply = tpm.roundtrip(GET_RANDOM_16)
        samples.append(clock() - start)
        check(reply)
    return samples, (clock() - t0) / 1e9


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in ("device", "socket"):
        print("usage: python3 - device|socket PATH N WARMUP", file=sys.stderr)
        return 2
    kind, path, n, warmup = argv[0], argv[1], int(argv[2]), int(argv[3])
    tpm = Device(path) if kind == "device" else UnixStream(path)
    try:
        samples, busy = measure(tpm, n, warmup)
    except (TimingError, OSError) as e:
        print(f"tpm_timing: {kind} {path}: {e}", file=sys.stderr)
        return 1
    finally:
        tpm.close()
    print(json.dumps({"kind": kind, "path": path, "samples_ns": samples, "busy_s": busy}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
