"""A host-side endpoint for a Xen guest's TPM: sim's contract, a real guest behind it.

``harness up --target xen`` leaves one of these running per guest, so that a bug found
on sim is reproduced on real Xen with the same client: a unix ``SOCK_SEQPACKET`` socket
on this host where one message is one TPM command and the answer is one message with
the response. Behind it, ``python3 -m xenvtpm relay`` in the guest (over OpenSSH, dom0
as the jump host) writes the command to the guest's ``/dev/tpm0``: each command goes
through the guest kernel's TPM driver, the frontend, the ring, the backend and the
manager to swtpm, as the scenarios' do.

Clients are served one at a time, in the order they connect (``/dev/tpm0`` admits one
opener; the next client waits in the listen queue). Each client gets its own relay,
started at its first command (python3 takes seconds to start in a TCG guest: a client
pays it once) and ended when it disconnects, so that the device is free between
clients for whoever else opens it in the guest (tpm2-tools over ``harness ssh``,
``pytest --attach``). A command the guest's kernel refuses (EINVAL for a malformed
size, ETIME when the TPM outlasts its budget) or a relay that breaks ends that client's
connection (the client reads end of file) with the reason in this endpoint's log.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from harness.deadline import Deadline
from harness.errors import HarnessError, TransportError
from harness.paths import REPO_ROOT
from harness.process import ManagedProcess
from harness.relay_pool import end_relay
from harness.transport import DEFAULT_TIMEOUT
from harness.transport_ssh import RelayTransport, relay_command

log = logging.getLogger("harness.endpoint")
MAX_COMMAND = 65536  # larger than any TPM's: the guest's kernel judges the size


class Endpoint:
    """Serves one socket path in front of relays made by ``open_relay``."""

    def __init__(
        self,
        path: Path,
        open_relay: Callable[[], RelayTransport],
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.path = path
        self._open_relay = open_relay
        self.timeout = timeout
        self._relay: RelayTransport | None = None
        self._closed = False
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.listener.bind(str(path))
        self.listener.listen(16)

    def serve_forever(self) -> None:
        """Until ``close`` (from another thread, or a signal)."""
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                if self._closed:
                    return
                raise
            with client:
                try:
                    self.serve_client(client)
                finally:
                    self.end_relay()

    def serve_client(self, client: socket.socket) -> None:
        """Until the client closes, or a command of it could not be answered."""
        while True:
            command = client.recv(MAX_COMMAND)
            if not command:
                return
            response = self.transmit(command)
            if response is None:
                return  # the client reads end of file; the log says why
            client.send(response)

    def transmit(self, command: bytes) -> bytes | None:
        try:
            if self._relay is None:
                self._relay = self._open_relay()
            return self._relay.transmit(command, self.timeout)
        except TransportError as e:
            log.warning("command 0x%s not answered: %s", command[6:10].hex(), e)
            return None
        except HarnessError as e:
            log.warning("no relay to the guest: %s", e)
            return None

    def end_relay(self) -> None:
        """The client is gone: end its relay, which closes the guest's device."""
        relay, self._relay = self._relay, None
        if relay is not None:
            end_relay(relay)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
        self.end_relay()
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def ssh_relay(ssh_argv: list[str], device: str, name: str) -> RelayTransport:
    """``python3 -m xenvtpm relay`` in the guest through OpenSSH, on a socketpair."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [*ssh_argv, relay_command(device)],
        stdin=theirs.fileno(),
        stdout=theirs.fileno(),
        stderr=subprocess.PIPE,
    )
    theirs.close()

    def stderr() -> str:
        if proc.poll() is None or proc.stderr is None:
            return ""
        return proc.stderr.read().decode(errors="replace")

    try:
        return RelayTransport(ours, name, stderr=stderr)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def start_endpoint(
    path: Path,
    *,
    key: Path,
    port: int,
    guest_ip: str,
    device: str,
    name: str,
    log_path: Path,
    die_with_parent: bool,
    timeout: float = 30.0,
) -> ManagedProcess:
    """This module as a daemon, listening on ``path`` when this returns."""
    argv = [sys.executable, "-m", "harness.endpoint", "--socket", str(path), "--key", str(key)]
    argv += ["--port", str(port), "--guest-ip", guest_ip, "--device", device, "--name", name]
    process = ManagedProcess(
        f"endpoint-{name}",
        argv,
        log_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        ready=path.exists,
        die_with_parent=die_with_parent,
    )
    process.start().wait_ready(Deadline(timeout))
    return process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.endpoint",
        description="A unix SOCK_SEQPACKET socket in front of a Xen guest's TPM device "
        "(started by harness up --target xen, one per guest).",
    )
    p.add_argument("--socket", required=True, type=Path, help="where to listen")
    p.add_argument("--key", required=True, type=Path, help="the SSH key of dom0 and guests")
    p.add_argument("--port", required=True, type=int, help="dom0's SSH port on this host")
    p.add_argument("--guest-ip", required=True, help="the guest's address, seen from dom0")
    p.add_argument("--device", default="/dev/tpm0", help="the guest's TPM device")
    p.add_argument("--name", default="guest", help="the guest's name, for the log")
    return p


def main(argv: list[str] | None = None) -> int:
    from harness.ssh import ssh_argv

    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # each relay's ssh is reaped at its exit
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    command = ssh_argv(args.key, args.port, guest_ip=args.guest_ip)
    endpoint = Endpoint(args.socket, lambda: ssh_relay(command, args.device, args.name))
    log.info("%s: %s in front of %s on %s", os.getpid(), args.socket, args.device, args.name)
    try:
        endpoint.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
