"""The guest's ``/dev/tpmN`` on real Xen: a Linux vTPM proxy device served by the frontend.

``ioctl(open("/dev/vtpmx"), VTPM_PROXY_IOC_NEW_DEV)`` creates ``/dev/tpmN`` and
``/dev/tpmrmN`` and returns an anonymous fd. The kernel then hands that fd each command
a TPM client writes to ``/dev/tpmN``: one ``read()`` is one whole command, one
``write()`` is its whole response. Closing the fd removes the device.

Facts (DESIGN.md 4, measured in a PV domU): at creation the kernel probes the chip at
once (SET_LOCALITY, SelfTest, Startup, GetCapability, GetRandom) and times a short
command out after about 2 s, so the device is created only once the ring is connected
(the frontend starts this endpoint on Connected), and only after a warm-up command
(a full SelfTest) came back through the ring with success: the vTPM instance may still be
starting (swtpm_setup takes 20-30 s in a TCG dom0), and a probe that fails or times out
makes the kernel give the chip up. The warm-up is repeated every few seconds until the
vTPM answers. ``TPM2_CC_SET_LOCALITY`` is the proxy's own vendor command: the fd
owner answers it, it never goes to the vTPM.

The kernel sends one command at a time, and sends the next only after the previous one
was answered or timed out. A new command therefore retires the previous client: its
late response must not be written, or the kernel would take it for the new command's.

If the kernel's probe fails anyway (``tpm_chip_register`` fails), it marks the fd closed:
reads fail with EPIPE and ``/dev/tpmN`` disappears (measured). The endpoint then closes
that fd, warms up again and creates a new device, a few times at most.

Spec: linux include/uapi/linux/vtpm_proxy.h; drivers/char/tpm/tpm_vtpm_proxy.c.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from xenvtpm import tpm
from xenvtpm.errors import MalformedMessage, VTPMError
from xenvtpm.lifecycle import Closeable
from xenvtpm.loop import Loop, Timer

log = logging.getLogger(__name__)

VTPMX = "/dev/vtpmx"
XEN_TPMFRONT_DRIVER = "/sys/bus/xen/drivers/vtpm"  # drivers/char/tpm/xen-tpmfront.c
TPM_BUFSIZE = 4096  # drivers/char/tpm/tpm.h: the proxy's buffer; no command is larger
WARM_UP_RETRY = 2.0  # seconds between warm-ups while the vTPM answers with an error
MAX_RECREATE = 5  # times a lost device is created again before giving up


class VtpmProxyIoctl(IntEnum):
    """include/uapi/linux/vtpm_proxy.h"""

    NEW_DEV = 0xC014A100  # _IOWR(0xa1, 0x00, struct vtpm_proxy_new_dev)


class VtpmProxyFlag(IntEnum):
    """include/uapi/linux/vtpm_proxy.h, enum vtpm_proxy_flags"""

    TPM2 = 0x1


#: struct vtpm_proxy_new_dev { __u32 flags, tpm_num, fd, major, minor; }
_NEW_DEV_5I = struct.Struct("<5I")


@dataclass(frozen=True)
class ProxyDevice:
    """What ``VTPM_PROXY_IOC_NEW_DEV`` returned: the fd we serve and the chip it made."""

    fd: int
    tpm_num: int
    major: int = 0
    minor: int = 0

    @property
    def name(self) -> str:
        return f"/dev/tpm{self.tpm_num}"


def create_proxy_device(vtpmx: str = VTPMX) -> ProxyDevice:
    """Create a TPM 2.0 proxy device. Raises VTPMError saying why (e.g. no module)."""
    try:
        ctl = os.open(vtpmx, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise VTPMError(f"cannot open {vtpmx}: {exc.strerror} (modprobe tpm_vtpm_proxy)") from exc
    try:
        buf = bytearray(_NEW_DEV_5I.pack(VtpmProxyFlag.TPM2, 0, 0, 0, 0))
        fcntl.ioctl(ctl, VtpmProxyIoctl.NEW_DEV, buf, True)
    except OSError as exc:
        raise VTPMError(f"VTPM_PROXY_IOC_NEW_DEV on {vtpmx}: {exc.strerror}") from exc
    finally:
        os.close(ctl)  # the device lives as long as the returned fd
    _flags, tpm_num, fd, major, minor = _NEW_DEV_5I.unpack(buf)
    os.set_inheritable(fd, False)
    return ProxyDevice(fd, tpm_num, major, minor)


def unbind_kernel_frontend(devid: int, driver_dir: str = XEN_TPMFRONT_DRIVER) -> bool:
    """Unbind the kernel's own xen-tpmfront from ``device/vtpm/<devid>``; True if it was bound.

    Measured on Xen 4.17 / Linux 6.1: as soon as the toolstack writes ``device/vtpm/N``
    into a domain's xenstore, udev loads xen-tpmfront (modalias ``xen:vtpm``), which binds
    the device and speaks protocol v2 over the same keys (``ring-ref``, ``event-channel``,
    ``state``, plus ``feature-protocol-v2``). (That measurement predates the backend's
    v2 support: the backend then mapped its page as a 2006 ring and failed; now it
    serves it as v2.) A guest that wants this frontend (``--device``) instead must take
    the device back: blacklisting xen-tpmfront in the guest is the real fix; this is the
    frontend's second line. The ``feature-protocol-v2 = 1`` xen-tpmfront leaves behind
    is overwritten with 0 when the frontend publishes its ring.
    """
    name = f"vtpm-{devid}"
    if not os.path.exists(os.path.join(driver_dir, name)):
        return False
    try:
        with open(os.path.join(driver_dir, "unbind"), "w") as f:
            f.write(name)
    except OSError as exc:
        raise VTPMError(
            f"xen-tpmfront holds device/vtpm/{devid} and could not be unbound: {exc}"
        ) from exc
    return True


class ProxyClient:
    """The kernel's one outstanding command; ``reply`` writes its response once."""

    def __init__(self, endpoint: VtpmProxyEndpoint) -> None:
        self._endpoint = endpoint
        self.alive = True

    def reply(self, response: bytes | memoryview) -> None:
        """Write the response, unless the kernel has moved on (or the device is gone)."""
        if not self.alive:
            return
        self.alive = False
        self._endpoint.write_response(response)

    def retire(self) -> None:
        self.alive = False


class _WarmUp:
    """The endpoint's own first command: its answer (any answer) creates the device."""

    def __init__(self, done: Callable[[bytes], None]) -> None:
        self._done = done
        self.alive = True

    def reply(self, response: bytes | memoryview) -> None:
        if self.alive:
            self.alive = False
            self._done(bytes(response))


#: TPM2_SelfTest(fullTest=YES). Spec: TCG TPM2 Part 3, 10.2. The kernel's probe starts
#: with SelfTest, bounded by its ~2 s timeout; a fresh swtpm's first full self test takes
#: longer than that in a TCG guest (measured: the probe timed out once after a GetRandom
#: warm-up), so the warm-up runs it first, with no such bound.
WARM_UP_COMMAND = struct.pack(">HIIB", tpm.TPM_ST.NO_SESSIONS, 11, tpm.TPM_CC.SelfTest, 1)

CommandHandler = Callable[[ProxyClient | _WarmUp, memoryview], None]
DeviceFactory = Callable[[], ProxyDevice]


class VtpmProxyEndpoint(Closeable):
    """Serves the commands of one vTPM proxy device, with ``SocketEndpoint``'s shape.

    ``start(loop, on_command)`` creates the device (through ``create_device``, a fake in
    tests) and reads commands from its fd in ``loop``; ``close()`` closes the fd, which
    removes ``/dev/tpmN``. The memoryview passed to ``on_command`` is valid only during
    the call (the buffer is reused), as with ``SocketEndpoint``.
    """

    def __init__(
        self,
        max_command: int = TPM_BUFSIZE,
        vtpmx: str = VTPMX,
        create_device: DeviceFactory | None = None,
        warm_up_retry: float = WARM_UP_RETRY,
    ) -> None:
        self.vtpmx = vtpmx
        self.warm_up_retry = warm_up_retry
        self._create = create_device or (lambda: create_proxy_device(vtpmx))
        self._buffer = bytearray(max(max_command, TPM_BUFSIZE) + 1)
        self._device: ProxyDevice | None = None
        self._loop: Loop | None = None
        self._on_command: CommandHandler | None = None
        self._client: ProxyClient | None = None
        self._warm_up: _WarmUp | None = None
        self.warm_up_seconds: float | None = None
        self.warm_ups = 0
        self.commands = 0
        self.recreated = 0
        self._active = False
        self._retry: Timer | None = None

    @property
    def device(self) -> ProxyDevice | None:
        return self._device

    def start(self, loop: Loop, on_command: CommandHandler) -> None:
        """Warm up (the device is created once the vTPM answers). Idempotent."""
        self._loop, self._on_command = loop, on_command
        self._active = True
        self._warm()

    def _warm(self) -> None:
        """Send the warm-up through the ring unless one is in flight or due, or a device is up."""
        if not self._active or self._device is not None or self._warm_up is not None:
            return
        if self._retry is not None and self._retry.callback is not None:
            return
        assert self._on_command is not None
        self._retry = None
        self.warm_ups += 1
        started = time.monotonic()

        def warmed(response: bytes) -> None:
            self._warm_up = None
            if not self._active:
                return
            try:
                rc = tpm.response_code(response)
            except MalformedMessage:
                rc = -1
            if rc != tpm.TPM_RC.SUCCESS:
                if self.warm_ups == 1 or self.warm_ups % 30 == 0:
                    log.warning(
                        "vTPM not answering yet (warm-up %d: rc %#x): retrying every %.0f s",
                        self.warm_ups,
                        rc,
                        self.warm_up_retry,
                    )
                assert self._loop is not None
                self._retry = self._loop.call_later(self.warm_up_retry, self._warm)
                return
            self.warm_up_seconds = time.monotonic() - started
            log.info("vTPM answered the warm-up in %.2f s", self.warm_up_seconds)
            self._create_device()

        self._warm_up = _WarmUp(warmed)
        self._on_command(self._warm_up, memoryview(WARM_UP_COMMAND))

    def _create_device(self) -> None:
        """Create the device and serve it at once (the kernel probes it right away)."""
        if self._device is not None or self._loop is None or not self._active:
            return
        device = self._create()
        self._device = device
        try:
            self._loop.add_reader(device.fd, self._receive)
        except BaseException:
            self.close()
            raise
        log.info("created %s (and /dev/tpmrm%d)", device.name, device.tpm_num)

    def close(self) -> None:
        """Close the proxy fd: the kernel removes the device. Idempotent."""
        self._active = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._drop_device()

    def _drop_device(self) -> None:
        device, self._device = self._device, None
        if self._warm_up is not None:
            self._warm_up.alive = False
            self._warm_up = None
        if self._client is not None:
            self._client.retire()
            self._client = None
        if device is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(device.fd)
        with contextlib.suppress(OSError):
            os.close(device.fd)
        log.info("closed %s", device.name)

    # -- the fd ----------------------------------------------------------------------

    def _receive(self) -> None:
        device = self._device
        assert device is not None and self._on_command is not None
        try:
            n = os.readv(device.fd, [self._buffer])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(device, str(exc))  # EPIPE: the kernel gave the chip up
            return
        if n == 0:
            self._lost(device, "end of file")
            return
        command = memoryview(self._buffer)[:n]
        if self._client is not None:
            self._client.retire()  # the kernel gave up on it: drop its late response
        self.commands += 1
        client = ProxyClient(self)
        self._client = client
        if self._is_set_locality(command):
            client.reply(tpm.success_response())
            return
        self._on_command(client, command)

    @staticmethod
    def _is_set_locality(command: memoryview) -> bool:
        try:
            return tpm.TpmHeader.from_bytes(command).code == tpm.VTPM_PROXY_CC_SET_LOCALITY
        except MalformedMessage:
            return False

    def _lost(self, device: ProxyDevice, why: str) -> None:
        """The kernel closed its side (a failed probe): drop the fd, make a new device."""
        self._drop_device()
        if self._loop is None or not self._active:
            return
        if self.recreated >= MAX_RECREATE:
            log.error("%s lost (%s) %d times: giving up", device.name, why, self.recreated + 1)
            return
        self.recreated += 1
        log.warning("%s lost (%s): warming up to create it again", device.name, why)
        self._warm()

    def write_response(self, response: bytes | memoryview) -> None:
        """One write = one response. EIO means the kernel no longer waits for one."""
        device = self._device
        if device is None:
            return
        try:
            os.write(device.fd, response)
        except OSError as exc:
            level = logging.INFO if exc.errno == errno.EIO else logging.WARNING
            log.log(level, "response dropped by %s: %s", device.name, exc)
