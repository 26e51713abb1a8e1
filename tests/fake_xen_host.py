"""A Xen host for the ``ssh://`` target without Xen: real SSH (paramiko's server side,
in this process) in front of a fake dom0 and fake guests.

What is real: the SSH handshake (so the client's host-key checks run as against any
sshd), the root login, exec channels, and the ``direct-tcpip`` channel through which the
harness reaches a guest from dom0 (``ssh -J``). What is faked: the commands. dom0's
shell knows ``xl domid``/``xl list``/``xl network-list``/``xl reboot`` (a new domid
for the guest, as xl makes a new domain), ``xenstore-read``/``-list``
over a dict of nodes (both dom0's and the guests' own, as a guest writes them) and
``ip neigh show``; any other command succeeds with no output (the target's checks print
only what is missing). A guest's shell answers ``hostname``, so a test can see which
machine it reached.

    with FakeXenHost(guests=[FakeGuest("web", 5, "00:16:3e:00:00:05", "169.254.1.5")]) as h:
        target = XenHostTarget(..., url=h.url, ...)

Every server has its own ECDSA host key (fast to make); ``known_hosts_line`` gives the
line a user's ``~/.ssh/known_hosts`` would hold for it.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import paramiko

Shell = Callable[[str], tuple[int, str, str]]


class _Interface(paramiko.ServerInterface):
    """Root may log in with any public key (the client's checks are under test, not
    the server's); exec and ``direct-tcpip`` are the only channels."""

    def __init__(self, server: SshServer) -> None:
        self.server = server
        self.commands: dict[int, str] = {}
        self.destinations: dict[int, tuple[str, int]] = {}

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL if username == "root" else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_direct_tcpip_request(
        self, chanid: int, origin: tuple[str, int], destination: tuple[str, int]
    ) -> int:
        self.server.opened.append(destination)
        if destination[0] not in self.server.routes or destination[1] != 22:
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        self.destinations[chanid] = destination
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        text = command.decode()
        self.server.commands.append(text)
        threading.Thread(target=self.server.execute, args=(channel, text), daemon=True).start()
        return True


class SshServer:
    """One SSH endpoint: a host key, a shell, and (for dom0) the addresses it can open
    ``direct-tcpip`` channels to (``routes``). ``opened`` lists every destination asked
    for, reachable or not; ``commands`` every command run."""

    def __init__(self, name: str, shell: Shell, host_key: paramiko.PKey | None = None) -> None:
        self.name = name
        self.shell = shell
        self.host_key = host_key or paramiko.ECDSAKey.generate()
        self.routes: dict[str, SshServer] = {}
        self.opened: list[tuple[str, int]] = []
        self.commands: list[str] = []
        self._transports: list[paramiko.Transport] = []
        self._lock = threading.Lock()

    def serve(self, sock: Any) -> None:
        """Run the server side of one connection over ``sock`` (a socket, or a channel
        of dom0's), until the client leaves."""
        transport = paramiko.Transport(sock)
        with self._lock:
            self._transports.append(transport)
        transport.add_server_key(self.host_key)
        interface = _Interface(self)
        try:
            transport.start_server(server=interface)
        except (paramiko.SSHException, EOFError, OSError):
            transport.close()
            return
        while transport.is_active():
            channel = transport.accept(0.2)
            if channel is None:
                continue
            destination = interface.destinations.pop(channel.get_id(), None)
            if destination is not None:
                guest = self.routes[destination[0]]
                threading.Thread(target=guest.serve, args=(channel,), daemon=True).start()

    def execute(self, channel: paramiko.Channel, command: str) -> None:
        """Answer one exec request. The client sends EOF only once it has the reply to
        its request, so output sent after EOF cannot overtake that reply."""
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            while channel.recv(65536):
                pass
            rc, out, err = self.shell(command)
            channel.sendall(out.encode())
            channel.sendall_stderr(err.encode())
            channel.send_exit_status(rc)
            channel.close()

    def close(self) -> None:
        with self._lock:
            transports, self._transports = self._transports, []
        for transport in transports:
            # A guest's transport runs over a channel of dom0's, which may be gone.
            with contextlib.suppress(EOFError, OSError, paramiko.SSHException):
                transport.close()

    def known_hosts_line(self, address: str, port: int = 22) -> str:
        """This server's key as a known_hosts line for ``address`` (``[address]:port``
        unless the port is 22, as OpenSSH and paramiko write it)."""
        name = address if port == 22 else f"[{address}]:{port}"
        return f"{name} {self.host_key.get_name()} {self.host_key.get_base64()}"


@dataclass
class FakeGuest:
    """A running domain: its xl name and domid, the MAC xl gave its vif, and the address
    it really has (``None``: it answers nowhere)."""

    name: str
    domid: int
    mac: str
    address: str | None
    server: SshServer = field(init=False)

    def __post_init__(self) -> None:
        self.server = SshServer(self.name, self._shell)

    def _shell(self, command: str) -> tuple[int, str, str]:
        if command.strip() == "hostname":
            return 0, f"{self.name}\n", ""
        return 0, "", ""


class FakeDom0:
    """dom0's shell over a xenstore dict and a neighbour table.

    ``xenstore`` holds every node: the toolstack's (``/local/domain/0/backend/vif/D/N/mac``,
    ``/libxl/D/device/vif/N/mac``, ``/local/domain/D/domid``) and whatever a guest wrote
    in its own ``/local/domain/D/`` tree. ``xl network-list`` reads the toolstack's MACs,
    as xl does (from libxl's own path, never from the guest's).
    """

    def __init__(self, guests: Iterable[FakeGuest], neighbours: str = "") -> None:
        self.guests = {g.name: g for g in guests}
        self.neighbours = neighbours
        self.xenstore: dict[str, str] = {}
        self.commands: list[str] = []  # every command dom0 was given, in order
        for g in self.guests.values():
            self._domain_nodes(g)

    def _domain_nodes(self, g: FakeGuest) -> None:
        self.xenstore[f"/local/domain/{g.domid}/domid"] = str(g.domid)
        self.xenstore[f"/local/domain/0/backend/vif/{g.domid}/0/mac"] = g.mac
        self.xenstore[f"/local/domain/0/backend/vif/{g.domid}/0/frontend-id"] = str(g.domid)
        self.xenstore[f"/libxl/{g.domid}/device/vif/0/mac"] = g.mac
        self.xenstore[f"/local/domain/{g.domid}/device/vif/0/mac"] = g.mac

    def _reboot(self, name: str) -> tuple[int, str, str]:
        """xl reboot: the guest comes back as a new domain; the old one's nodes go."""
        guest = self.guests.get(name)
        if guest is None:
            return 1, "", f"{name} is an invalid domain identifier\n"
        old = guest.domid
        for path in [p for p in self.xenstore if f"/{old}/" in p or p.endswith(f"/{old}")]:
            del self.xenstore[path]
        guest.domid = old + 100
        self._domain_nodes(guest)
        return 0, "", ""

    def __call__(self, command: str) -> tuple[int, str, str]:
        self.commands.append(command)
        try:
            argv = shlex.split(command)
        except ValueError:
            return 0, "", ""
        if any(word in (";", "|", "&&", "||") or "$" in word for word in argv):
            return 0, "", ""  # a script (the target's checks): nothing missing
        match argv:
            case ["xl", "domid", name]:
                guest = self.guests.get(name)
                if guest is None:
                    return 1, "", f"Can't get domid of domain name '{name}'\n"
                return 0, f"{guest.domid}\n", ""
            case ["xl", "network-list", name]:
                return self._network_list(name)
            case ["xl", "reboot", name]:
                return self._reboot(name)
            case ["xenstore-read", path]:
                if path not in self.xenstore:
                    return 1, "", f"xenstore-read: couldn't read path {path}\n"
                return 0, self.xenstore[path] + "\n", ""
            case ["xenstore-list", path]:
                prefix = path.rstrip("/") + "/"
                below = [p[len(prefix) :] for p in self.xenstore if p.startswith(prefix)]
                children = {rest.split("/")[0] for rest in below}
                if not children:
                    return 1, "", f"xenstore-list: couldn't list path {path}\n"
                return 0, "".join(f"{c}\n" for c in sorted(children)), ""
            case ["ip", "neigh", *_]:
                return 0, self.neighbours, ""
        return 0, "", ""

    def _network_list(self, name: str) -> tuple[int, str, str]:
        guest = self.guests.get(name)
        if guest is None:
            return 1, "", f"{name} is an invalid domain identifier\n"
        mac = self.xenstore[f"/libxl/{guest.domid}/device/vif/0/mac"]
        backend = f"/local/domain/0/backend/vif/{guest.domid}/0"
        header = "Idx BE Mac Addr.         handle state evt-ch   tx-/rx-ring-ref BE-path\n"
        return 0, header + f"0   0  {mac}     0     4      6   1280/1281 {backend}\n", ""


class FakeXenHost:
    """dom0's SSH server on 127.0.0.1 (a free port), reaching each guest that has an
    address through ``direct-tcpip``, plus any ``others`` (address -> server: machines
    that answer at an address but are not the guest named)."""

    def __init__(
        self,
        guests: Iterable[FakeGuest],
        neighbours: str = "",
        others: dict[str, SshServer] | None = None,
    ) -> None:
        self.guests = list(guests)
        self.dom0_shell = FakeDom0(self.guests, neighbours)
        self.dom0 = SshServer("dom0", self.dom0_shell)
        for g in self.guests:
            if g.address is not None:
                self.dom0.routes[g.address] = g.server
        self.dom0.routes.update(others or {})
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.dom0.serve, args=(conn,), daemon=True).start()

    def known_hosts(self, path: Path, *, dom0: bool = True, guests: bool = True) -> Path:
        """Write a known_hosts file with dom0's key and (``guests``) every guest's, each
        under the address it answers at, as a user who logged in before would have."""
        lines = [self.dom0.known_hosts_line("127.0.0.1", self.port)] if dom0 else []
        if guests:
            lines += [s.known_hosts_line(a) for a, s in self.dom0.routes.items()]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in lines))
        return path

    def __enter__(self) -> FakeXenHost:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._listener.close()
        # Guests first: their transports run over channels of dom0's, whose threads
        # would otherwise fail (EOFError) writing to a channel that dom0 closed.
        for server in [*self.dom0.routes.values(), self.dom0]:
            server.close()
