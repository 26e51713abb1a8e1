"""One swtpm process per vTPM instance: manufacture, launch, control channel, shutdown.

The manager owns one :class:`Swtpm` per instance.  ``start()`` blocks (swtpm_setup takes
about a second the first time), so the manager calls it from a worker thread; every
other method is cheap.  ``close()`` may be called from any thread at any time, also
while ``start()`` runs in another one: it aborts the start and kills what it spawned.

Channels are socketpairs handed to swtpm, not filesystem sockets: ``--server
type=tcp,fd=N`` (the fd is an already connected stream socket, exactly as swtpm_setup
drives swtpm itself) and ``--ctrl type=unixio,clientfd=M``, with ``--terminate``.  So
there is no socket path to clean up or keep under 108 bytes, no connect race, no
second client can reach the TPM, and if the manager dies, even by SIGKILL, swtpm sees
its data connection close and exits: nothing leaks.

Measured on swtpm 0.7.1: swtpm does not frame by commandSize (one write is one command
of at most 4096 bytes); ctrl CMD_INIT keeps the data connection and leaves the TPM
needing TPM2_Startup (TPM_RC_INITIALIZE until then); ``--terminate`` exits when the
data connection closes.

Spec: swtpm include/swtpm/tpm_ioctl.h ("Commands used by the non-CUSE TPMs");
swtpm(8), swtpm_setup(8), swtpm_localca(8).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from xenvtpm.errors import InstanceStartError, VTPMError
from xenvtpm.manager.confinement import Confinement

__all__ = [
    "PERMALL",
    "PTM_CMD",
    "PTM_INIT_FLAG_DELETE_VOLATILE",
    "Swtpm",
    "SwtpmConfig",
    "write_ca_config",
]

log = logging.getLogger(__name__)


class PTM_CMD(IntEnum):
    """Control-channel commands: a 4-byte big-endian code, then the request payload.

    Spec: swtpm include/swtpm/tpm_ioctl.h, enum CMD_* (non-CUSE TPMs).
    """

    GET_CAPABILITY = 0x01
    INIT = 0x02
    SHUTDOWN = 0x03
    GET_TPMESTABLISHED = 0x04
    SET_LOCALITY = 0x05
    HASH_START = 0x06
    HASH_DATA = 0x07
    HASH_END = 0x08
    CANCEL_TPM_CMD = 0x09
    STORE_VOLATILE = 0x0A
    RESET_TPMESTABLISHED = 0x0B
    GET_STATEBLOB = 0x0C
    SET_STATEBLOB = 0x0D
    STOP = 0x0E
    GET_CONFIG = 0x0F
    SET_DATAFD = 0x10
    SET_BUFFERSIZE = 0x11
    GET_INFO = 0x12


#: tpm_ioctl.h ``INIT_FLAG_DELETE_VOLATILE``: discard saved volatile state on CMD_INIT.
PTM_INIT_FLAG_DELETE_VOLATILE = 0x1
#: The file swtpm keeps a manufactured TPM 2.0's permanent state in.
PERMALL = "tpm2-00.permall"

_CTRL_CMD_I = struct.Struct(">I")  # CMD_GET_CAPABILITY request; ptm_res answers
_CTRL_INIT_II = struct.Struct(">II")  # CMD_INIT: code, init_flags
_CTRL_CAP_Q = struct.Struct(">Q")  # CMD_GET_CAPABILITY answer: ptm_cap only (no ptm_res)

_LOG_TAIL_BYTES = 3000

# One lock per CA directory: swtpm_localca keeps a serial number file there.
_ca_locks: dict[str, threading.Lock] = {}
_ca_locks_guard = threading.Lock()


def _ca_lock(ca_dir: Path) -> threading.Lock:
    with _ca_locks_guard:
        return _ca_locks.setdefault(str(ca_dir), threading.Lock())


def _write_if_changed(path: Path, text: str) -> None:
    """Atomically, and safe against concurrent writers (threads of a manager starting
    instances, or several processes on one state root): each writes its own temporary
    file, and the last rename wins with the same contents."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_ca_config(state_root: Path) -> Path:
    """Create ``<state_root>/ca/`` with a local CA configuration; return swtpm_setup's.

    Never the system ``/etc`` configuration or ``/var/lib/swtpm-localca``: one CA per
    state root, created by swtpm_localca on first use.
    Spec: swtpm_setup.conf(5), swtpm-localca.conf(5), swtpm-localca.options(5).
    """
    ca = state_root / "ca"
    ca.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_if_changed(
        ca / "localca.conf",
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\n"
        f"issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n",
    )
    _write_if_changed(
        ca / "localca.options",
        "--platform-manufacturer xenvtpm\n--platform-version 2.1\n--platform-model xenvtpm\n",
    )
    setup_conf = ca / "swtpm_setup.conf"
    _write_if_changed(
        setup_conf,
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {ca}/localca.conf\n"
        f"create_certs_tool_options = {ca}/localca.options\n"
        "active_pcr_banks = sha256\n",
    )
    return setup_conf


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - _LOG_TAIL_BYTES, 0))
            return f.read().decode(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"


@dataclass(frozen=True)
class SwtpmConfig:
    """How to run swtpm for every instance under one state root."""

    state_root: Path
    swtpm: str = "swtpm"
    swtpm_setup: str = "swtpm_setup"
    start_timeout: float = 120.0  # swtpm_setup takes 20-30 s in a TCG dom0 (measured)
    ctrl_timeout: float = 5.0
    stop_timeout: float = 2.0
    log_level: int | None = None
    confinement: Confinement | None = None  # --confine-swtpm: a uid, no network, a limit

    def __post_init__(self) -> None:
        # swtpm splits its option values at ',' and '=': such a path cannot be passed.
        if "," in str(self.state_root):
            raise VTPMError(f"state root {self.state_root} contains ',' (swtpm option syntax)")


class Swtpm:
    """One swtpm process, its state directory and its two channels.

    After ``start()``: ``data`` is the connected TPM command socket (the manager sets it
    non-blocking and owns all I/O on it), ``ctrl`` the control socket (blocking, with a
    timeout, used only from the manager's thread).
    """

    def __init__(self, instance: int, config: SwtpmConfig) -> None:
        self.instance = instance
        self.config = config
        self.state_dir = config.state_root / str(instance)
        self.log_path = self.state_dir / "swtpm.log"
        self.setup_log_path = self.state_dir / "swtpm_setup.log"
        self.pid_path = self.state_dir / "swtpm.pid"
        self.log = log.getChild(f"instance{instance}")
        self.data: socket.socket | None = None
        self.ctrl: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._child: subprocess.Popen[bytes] | None = None  # swtpm_setup while it runs
        self._lock = threading.Lock()
        self._closing = False
        self._started = False

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    def __enter__(self) -> Swtpm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- start ------------------------------------------------------------------------

    def start(self) -> None:
        """Manufacture the TPM if needed, launch swtpm and wait until it answers.

        Idempotent.  Raises :class:`InstanceStartError` (command, exit code, log tail);
        a failed start leaves nothing running.  Blocking: call from a worker thread.
        """
        if self._started:
            return
        try:
            self.manufacture()
            self._launch()
        except BaseException:
            self.close()
            raise
        self._started = True

    def manufacture(self) -> bool:
        """Make this instance's TPM (swtpm_setup) unless its state exists; True if made.

        Blocking (20-30 s in a TCG dom0); ``start`` calls it, ``provision`` ahead of time.
        """
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (self.state_dir / PERMALL).exists():
            return False
        self._manufacture()
        return True

    def _check_not_closing(self, command: list[str]) -> None:
        if self._closing:
            raise InstanceStartError(self.instance, command, None, "aborted: closing")

    def _manufacture(self) -> None:
        """Run swtpm_setup: EK, EK certificate and platform certificate, NVRAM locked.

        Spec: swtpm_setup(8) --createek --create-ek-cert --create-platform-cert.
        """
        setup_conf = write_ca_config(self.config.state_root)
        cmd = [
            self.config.swtpm_setup, "--tpm2", "--tpmstate", str(self.state_dir),
            "--createek", "--create-ek-cert", "--create-platform-cert",
            "--config", str(setup_conf), "--lock-nvram",
        ]  # fmt: skip
        ca_dir = setup_conf.parent
        self.log.info("manufacturing TPM in %s", self.state_dir)
        t0 = time.monotonic()
        with _ca_lock(ca_dir), (ca_dir / ".lock").open("a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)  # other processes sharing this CA
            with self.setup_log_path.open("wb") as out:
                with self._lock:
                    self._check_not_closing(cmd)
                    try:
                        # its own process group: swtpm_setup runs a swtpm of its own,
                        # which must die with it (see terminate)
                        self._child = subprocess.Popen(
                            cmd,
                            stdin=subprocess.DEVNULL,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    except OSError as exc:
                        raise InstanceStartError(self.instance, cmd, None, str(exc)) from exc
                child = self._child
                try:
                    rc = child.wait(timeout=self.config.start_timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)
                    rc = child.wait()
                finally:
                    with self._lock:
                        self._child = None
        if rc != 0 or self._closing:
            # a half-made TPM must not be mistaken for a manufactured one next time
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / PERMALL).unlink()
            raise InstanceStartError(self.instance, cmd, rc, _tail(self.setup_log_path))
        self.log.info("manufactured in %.2f s", time.monotonic() - t0)

    def _command(self, data_fd: int, ctrl_fd: int) -> list[str]:
        log_opt = f"file={self.log_path}"
        if self.config.log_level is not None:
            log_opt += f",level={self.config.log_level}"
        return [
            self.config.swtpm, "socket", "--tpm2",
            "--tpmstate", f"dir={self.state_dir},mode=0600",
            "--server", f"type=tcp,fd={data_fd}",
            "--ctrl", f"type=unixio,clientfd={ctrl_fd}",
            "--flags", "not-need-init,startup-clear",
            "--pid", f"file={self.pid_path}",
            "--log", log_opt,
            "--terminate",
        ]  # fmt: skip

    def _launch(self) -> None:
        data, data_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ctrl, ctrl_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.data, self.ctrl = data, ctrl
        cmd = self._command(data_peer.fileno(), ctrl_peer.fileno())
        confinement = self.config.confinement
        if confinement is not None:
            cmd = confinement.wrap(cmd, self.instance)
        try:
            with self._lock:
                self._check_not_closing(cmd)
                with self.log_path.open("ab") as out:
                    try:
                        if confinement is not None:  # the log just made is its uid's too
                            confinement.prepare(
                                self.config.state_root, self.state_dir, self.instance
                            )
                        self._proc = subprocess.Popen(
                            cmd,
                            stdin=subprocess.DEVNULL,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            pass_fds=(data_peer.fileno(), ctrl_peer.fileno()),
                        )
                    except OSError as exc:
                        raise InstanceStartError(self.instance, cmd, None, str(exc)) from exc
        finally:
            data_peer.close()
            ctrl_peer.close()
        # swtpm answers the control channel once libtpms is initialised and started up
        try:
            ctrl.settimeout(self.config.start_timeout)
            self._ctrl_exchange(_CTRL_CMD_I.pack(PTM_CMD.GET_CAPABILITY), _CTRL_CAP_Q.size)
        except (OSError, VTPMError) as exc:
            # A closed channel means swtpm is exiting: wait for its status, which may
            # come a moment after; a silent swtpm (timeout) is stopped by start().
            grace = 0.0 if isinstance(exc, TimeoutError) else self.config.stop_timeout
            rc = self._exit_status(grace)
            raise InstanceStartError(
                self.instance, cmd, rc, f"{exc}\n{_tail(self.log_path)}"
            ) from exc
        ctrl.settimeout(self.config.ctrl_timeout)
        confined = self.config.confinement
        self.log.info(
            "swtpm pid %s serving %s%s",
            self.pid,
            self.state_dir,
            f" as uid {confined.uid(self.instance)}, offline" if confined else "",
        )

    def _exit_status(self, grace: float) -> int | None:
        """swtpm's exit status, waiting up to ``grace`` s for it; None if it still runs."""
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            return None

    # -- control channel --------------------------------------------------------------

    def _ctrl_exchange(self, request: bytes, answer_size: int) -> bytes:
        ctrl = self.ctrl
        if ctrl is None:
            raise VTPMError(f"instance {self.instance}: swtpm not started")
        ctrl.sendall(request)
        answer = bytearray()
        while len(answer) < answer_size:
            chunk = ctrl.recv(answer_size - len(answer))
            if not chunk:
                raise VTPMError(f"instance {self.instance}: swtpm closed its control channel")
            answer += chunk
        return bytes(answer)

    def ctrl_init(self, flags: int = 0) -> None:
        """CMD_INIT: re-initialise the TPM as a power cycle does (PCRs reset once
        TPM2_Startup(CLEAR) follows).  Raises :class:`VTPMError` on a non-zero result.

        Spec: tpm_ioctl.h CMD_INIT / struct ptm_init (init_flags -> ptm_res).
        """
        try:
            answer = self._ctrl_exchange(_CTRL_INIT_II.pack(PTM_CMD.INIT, flags), 4)
        except OSError as exc:
            raise VTPMError(f"instance {self.instance}: CMD_INIT failed: {exc}") from exc
        (result,) = _CTRL_CMD_I.unpack(answer)
        if result != 0:
            raise VTPMError(f"instance {self.instance}: CMD_INIT answered 0x{result:x}")

    # -- stop -------------------------------------------------------------------------

    def terminate(self) -> None:
        """Begin a soft stop without waiting: close both channels (``--terminate`` makes
        swtpm exit) and send SIGTERM.  Aborts a concurrent ``start()``."""
        with self._lock:
            self._closing = True
            child = self._child
            proc = self._proc
        if child is not None and child.poll() is None:
            # swtpm_setup and the swtpm it drives: their state is discarded anyway
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        for sock in (self.data, self.ctrl):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
                sock.close()
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def close(self, timeout: float | None = None) -> int | None:
        """Stop swtpm: soft (channels closed, SIGTERM), then SIGKILL after ``timeout``
        (default ``config.stop_timeout``).  Idempotent; returns the exit status."""
        self.terminate()
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(self.config.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self.log.warning("swtpm pid %s ignored SIGTERM: killing it", proc.pid)
            proc.kill()
            return proc.wait()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.pid_path.unlink()

    def log_tail(self) -> str:
        return _tail(self.log_path)
