"""A TPM client on the host, against a guest endpoint of ``python -m harness up``.

    python -m harness up --target xen --guests 2 > env.json      # or --target sim
    python examples/endpoint_client.py "$(jq -r '.guests[0].tpm' env.json)"

The endpoint is a unix SOCK_SEQPACKET socket: one message is one TPM command, the
answer one message with its response. On sim it is the guest's frontend; on Xen a
relay to the guest's /dev/tpm0 (``harness/endpoint.py``). tpm2-pytss needs nothing
more than this ``PyTCTI``; any other TPM client needs the same two calls.
"""

from __future__ import annotations

import socket
import sys

from tpm2_pytss import ESAPI, PyTCTI, TSS2_Exception
from tpm2_pytss.constants import TPM2_RC, TPM2_SU
from tpm2_pytss.types import TPML_PCR_SELECTION


class EndpointTCTI(PyTCTI):  # type: ignore[misc]  # tpm2_pytss has no type information
    def __init__(self, path: str) -> None:
        super().__init__(max_size=4096)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(300)  # a TCG guest's RSA key generation takes a while
        self.sock.connect(path)

    def do_transmit(self, command: bytes) -> None:
        self.sock.send(command)

    def do_receive(self, timeout: int) -> bytes:
        response = self.sock.recv(4096)
        if not response:
            raise ConnectionError("the endpoint closed the connection (see its log)")
        return response

    def do_finalize(self) -> None:
        self.sock.close()


def main(path: str) -> int:
    with ESAPI(EndpointTCTI(path)) as ctx:
        try:
            ctx.startup(TPM2_SU.CLEAR)
        except TSS2_Exception as e:
            if e.rc != TPM2_RC.INITIALIZE:  # already started: fine
                raise
        print("random:", bytes(ctx.get_random(16)).hex())
        _, _, digests = ctx.pcr_read(TPML_PCR_SELECTION.parse("sha256:0"))
        print("PCR 0 (sha256):", bytes(digests[0]).hex())
        key = ctx.create_primary(None, "ecc256")[0]  # a P-256 primary key, then gone
        ctx.flush_context(key)
        print("ECC P-256 primary key created and flushed")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} ENDPOINT")
    sys.exit(main(sys.argv[1]))
