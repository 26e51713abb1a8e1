"""SSH and SFTP (paramiko) to dom0 through QEMU's hostfwd, and to guests through dom0.

dom0 is reached on 127.0.0.1:PORT (QEMU user networking, ``restrict=on``); a guest is
reached by a ``direct-tcpip`` channel that dom0's sshd opens to the guest's link-local
address on the ``xenbr0`` bridge (what ``ssh -J`` does), so nothing but dom0's port is
ever exposed on the host. Every command has a timeout; a connection that cannot be made
before its deadline is a TargetNotReady with the last error.

Host keys. A real host (``--target ssh://``) passes a ``HostKeyCheck``: known keys
only, unknown ones on the user's explicit word, changed ones never (``harness.hostkeys``).
The harness's own QEMU machines (``host_keys=None``) take the key they offer: dom0 is
the far end of a loopback-only hostfwd of a QEMU process this harness started (while
it runs no one else can listen on that port), the guests are reached through that login
on a bridge inside the VM that only the harness's own guests join, and the disks are
the harness's own images on throw-away copies: nothing there is another party's.

    host.run("xl list") -> (rc, stdout, stderr)
    host.put(local, remote)     a file, or a directory tree (e.g. the xenvtpm/ package)
"""

from __future__ import annotations

import contextlib
import io
import logging
import shlex
import stat
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import paramiko

from harness.deadline import Deadline
from harness.errors import HarnessError, TargetNotReady
from harness.hostkeys import HostKeyCheck, known_hosts_name
from xenvtpm.lifecycle import Closeable

log = logging.getLogger(__name__)
# paramiko logs every refused channel while a guest boots; connect() reports the outcome.
logging.getLogger("paramiko").setLevel(logging.CRITICAL)

# One login attempt. A closed port fails at once; once sshd listens, a handshake under
# TCG on a loaded host can take tens of seconds, and giving up on it only starts over.
CONNECT_TIMEOUT = 90.0


class SshError(HarnessError):
    """A command could not be run over SSH (not: it ran and failed, see ``run``)."""


class CommandFailed(SshError):
    """``run(..., check=True)`` and the command exited non-zero: carries its output."""

    def __init__(self, host: str, command: str, rc: int, out: str, err: str) -> None:
        super().__init__(
            f"{host}: {command!r} exited {rc}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-2000:]}"
        )
        self.host, self.command, self.rc, self.out, self.err = host, command, rc, out, err


class SshHost(Closeable):
    """A root login on one machine (dom0, or a guest when ``via`` is dom0)."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        key_path: Path | None,
        *,
        via: SshHost | None = None,
        user: str = "root",
        host_keys: HostKeyCheck | None = None,
    ) -> None:
        """``key_path`` None: the user's default keys and agent (a real host); otherwise
        only that key. ``host_keys`` (a real host, already up): its rules decide the host
        key (see the module docstring for None), and a refused login fails at once."""
        self.name = name
        self.host = host
        self.port = port
        self.key_path = key_path
        self.via = via
        self.user = user
        self.host_keys = host_keys
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self.log = log.getChild(name)

    # -- connection ----------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        if self._client is None:
            return False
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def _connect_once(self, timeout: float) -> paramiko.SSHClient:
        sock: Any = None
        if self.via is not None:
            transport = self.via.client().get_transport()
            assert transport is not None
            sock = transport.open_channel(
                "direct-tcpip", (self.host, self.port), ("127.0.0.1", 0), timeout=timeout
            )
        client = paramiko.SSHClient()
        if self.host_keys is not None:
            self.host_keys.prepare(client, self.name)
        else:
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # our own VMs
        default_keys = self.key_path is None
        try:
            client.connect(
                self.host,
                self.port,
                username=self.user,
                key_filename=None if default_keys else str(self.key_path),
                sock=sock,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                allow_agent=default_keys,
                look_for_keys=default_keys,
            )
            transport = client.get_transport()
            if transport is not None and self.host_keys is not None:
                key = transport.get_remote_server_key()
                self.host_keys.connected(self.name, self._known_name, key)
        except paramiko.BadHostKeyException as e:
            client.close()
            if self.host_keys is None:
                raise
            raise self.host_keys.changed(self.name, self._known_name, e) from e
        except BaseException:
            client.close()
            raise
        if transport is not None:
            transport.set_keepalive(15)
        return client

    @property
    def _known_name(self) -> str:
        """This host's name in known_hosts (what paramiko looks up)."""
        return known_hosts_name(self.host, self.port)

    def connect(self, deadline: Deadline, alive: Callable[[], None] | None = None) -> Self:
        """Retry until a login works or ``deadline`` expires; ``alive`` may raise to stop
        early (e.g. QEMU died or the console showed a panic)."""
        last: BaseException | None = None
        while not self.connected:
            if alive is not None:
                alive()
            try:
                self._client = self._connect_once(min(CONNECT_TIMEOUT, max(deadline.remaining, 1)))
            except (paramiko.SSHException, OSError, EOFError) as e:
                if self._fatal(e):
                    raise TargetNotReady(  # retrying cannot help
                        f"ssh to {self.name} ({self.user}@{self.host}:{self.port})", repr(e)
                    ) from e
                last = e
                self.log.debug("ssh %s:%d not ready: %s", self.host, self.port, e)
                if deadline.expired:
                    raise TargetNotReady(
                        f"ssh to {self.name} ({self.host}:{self.port})",
                        f"no login within {deadline.seconds:.0f} s; last error: {e!r}",
                    ) from e
                time.sleep(min(1.0, deadline.remaining))
        del last
        return self

    def _fatal(self, error: BaseException) -> bool:
        """On a host that is already up (``host_keys``), a changed host key or a refused
        key will not change by retrying; while a VM boots, only a changed key is final.
        (A refused host key on a real host is a HostKeyRefused, raised as it is.)"""
        if isinstance(error, paramiko.BadHostKeyException):
            return True
        return (
            self.host_keys is not None
            and isinstance(error, paramiko.AuthenticationException)
            and "timeout" not in str(error)
        )

    def client(self) -> paramiko.SSHClient:
        if not self.connected or self._client is None:
            raise SshError(f"{self.name}: not connected")
        return self._client

    def close(self) -> None:
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._sftp = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    # -- commands ------------------------------------------------------------------------
    def run(
        self, command: str, timeout: float = 60.0, *, check: bool = False, stdin: bytes = b""
    ) -> tuple[int, str, str]:
        """Run ``command`` through the login shell: (exit code, stdout, stderr)."""
        client = self.client()
        try:
            chan_in, chan_out, chan_err = client.exec_command(command, timeout=timeout)
            if stdin:
                chan_in.write(stdin)
            chan_in.channel.shutdown_write()
            out = chan_out.read().decode(errors="replace")
            err = chan_err.read().decode(errors="replace")
            rc = chan_out.channel.recv_exit_status()
        except (TimeoutError, paramiko.SSHException, OSError) as e:
            raise SshError(f"{self.name}: {command!r}: {e!r}") from e
        self.log.debug("%s -> %d", command, rc)
        if check and rc != 0:
            raise CommandFailed(self.name, command, rc, out, err)
        return rc, out, err

    def check(self, command: str, timeout: float = 60.0) -> str:
        """Run, raise CommandFailed unless it exits 0, return stdout."""
        return self.run(command, timeout, check=True)[1]

    def stream(self, command: str) -> paramiko.Channel:
        """Start ``command`` on a channel of its own and return the channel, to read its
        output as it comes (``tail -F``); closing the channel ends the command."""
        transport = self.client().get_transport()
        if transport is None:
            raise SshError(f"{self.name}: not connected")
        try:
            channel = transport.open_session()
            channel.exec_command(command)
        except (paramiko.SSHException, OSError) as e:
            raise SshError(f"{self.name}: {command!r}: {e!r}") from e
        return channel

    # -- files ---------------------------------------------------------------------------
    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self.client().open_sftp()
        return self._sftp

    def put(self, local: Path | str, remote: str) -> None:
        """Copy a file, or a directory tree (skipping ``__pycache__``), to ``remote``.

        A tree goes as one tar stream into ``tar x`` there: one round trip instead of
        one SFTP request per file (20-30 s for the package into a TCG guest).
        """
        local = Path(local)
        if local.is_dir():
            q = shlex.quote(remote)
            self.run(f"mkdir -p {q} && tar -xzf - -C {q}", stdin=tree_tarball(local), check=True)
        else:
            sftp = self.sftp()
            sftp.put(str(local), remote)
            sftp.chmod(remote, stat.S_IMODE(local.stat().st_mode))

    def get(self, remote: str, local: Path | str) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self.sftp().get(remote, str(local))

    def __repr__(self) -> str:
        via = f" via {self.via.name}" if self.via is not None else ""
        return f"SshHost({self.name} {self.user}@{self.host}:{self.port}{via})"


def tree_tarball(root: Path) -> bytes:
    """``root``'s files (no ``__pycache__``, ``*.pyc``, ``*.tmp``) as a gzipped tar, with
    paths relative to ``root``."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        name = Path(info.name)
        if "__pycache__" in name.parts or name.suffix in (".pyc", ".tmp"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for child in sorted(root.iterdir()):
            tar.add(child, arcname=child.name, filter=keep)
    return buf.getvalue()


def ssh_argv(
    key: Path, port: int, *, guest_ip: str | None = None, command: list[str] | None = None
) -> list[str]:
    """An OpenSSH command line for a person: dom0, or a guest with dom0 as the jump host."""
    opts = [
        "-i",
        str(key),
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "IdentitiesOnly=yes",
    ]
    argv = ["ssh", *opts]
    if guest_ip is None:
        argv += ["-p", str(port), "root@127.0.0.1"]
    else:
        jump = " ".join(["ssh", *opts, "-p", str(port), "-W", "%h:%p", "root@127.0.0.1"])
        argv += ["-o", f"ProxyCommand={jump}", f"root@{guest_ip}"]
    return argv + (command or [])
