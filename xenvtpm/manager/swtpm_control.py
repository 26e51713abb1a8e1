"""swtpm's control channel, driven by the manager's loop without ever blocking it.

The manager serves every instance on one thread. A control request (CMD_INIT to
power-cycle on a reboot, CMD_CANCEL_TPM_CMD, CMD_STORE_VOLATILE) goes to one swtpm,
and a hung or stopped swtpm would hold that thread for the whole timeout, stalling
every other guest's vTPM (issue 14, point 4). So requests are queued per swtpm and
written without waiting; the answer is read when the socket becomes readable, and a
request that outlives its timeout fails (the manager then treats that swtpm as failed).

swtpm answers control requests in order, one at a time, and (measured on 0.7.1, socket
mode) only between TPM commands: its main loop is single-threaded, so a request sent
during a long command is answered when the command ends.

Spec: swtpm include/swtpm/tpm_ioctl.h (ptm_res, struct ptm_init, ...) and
man/man3/swtpm_ioctls.pod ("the control channel ... one request at a time").
"""

from __future__ import annotations

import functools
import logging
import selectors
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from xenvtpm.manager.swtpm import PTM_CMD

log = logging.getLogger(__name__)

#: Called once with the answer bytes, or None when the request failed (timeout, channel
#: closed or broken). Runs on the manager's loop thread.
ControlDone = Callable[[bytes | None], None]

_CMD_I = struct.Struct(">I")
#: ptm_res, the 4-byte result most control commands answer with.
RESULT_SIZE = 4


@dataclass
class _Request:
    message: bytes
    answer_size: int
    done: ControlDone
    timeout: float
    deadline: float = field(default=0.0)


class ControlChannel:
    """Ordered, non-blocking control requests to one swtpm.

    The owner registers :meth:`fileno` for reading in its selector, calls
    :meth:`on_readable` when it is, and :meth:`expire` with the current time; both
    return False once the channel is unusable (the swtpm is to be treated as failed).
    """

    def __init__(self, sock: socket.socket, instance: int) -> None:
        self._sock = sock
        self._sock.setblocking(False)
        self.instance = instance
        self._queue: deque[_Request] = deque()
        self._answer = bytearray()
        self._broken = False

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def deadline(self) -> float | None:
        """When the request in flight times out (None: nothing in flight)."""
        return self._queue[0].deadline if self._queue else None

    def request(
        self,
        command: PTM_CMD,
        payload: bytes,
        done: ControlDone,
        *,
        timeout: float,
        answer_size: int = RESULT_SIZE,
    ) -> None:
        """Queue ``command``; ``done`` gets its answer (never called from here)."""
        req = _Request(_CMD_I.pack(command) + payload, answer_size, done, timeout)
        self._queue.append(req)
        if len(self._queue) == 1:
            self._send_head()

    def on_readable(self) -> bool:
        """Read what swtpm answered; complete the request in flight when it is whole."""
        try:
            chunk = self._sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:
            log.error("instance %d: swtpm control channel failed: %s", self.instance, exc)
            return self._break()
        if not chunk:
            return self._break()
        if not self._queue:
            log.error("instance %d: %d unsolicited control bytes", self.instance, len(chunk))
            return self._break()
        self._answer += chunk
        while self._queue and len(self._answer) >= self._queue[0].answer_size:
            req = self._queue.popleft()
            answer = bytes(self._answer[: req.answer_size])
            del self._answer[: req.answer_size]
            req.done(answer)
            if self._broken:
                return False
            if self._queue:
                self._send_head()
        return not self._broken

    def expire(self, now: float) -> bool:
        """Fail everything if the request in flight outlived its timeout."""
        if self._queue and self._queue[0].deadline <= now:
            req = self._queue[0]
            log.error(
                "instance %d: swtpm did not answer control command 0x%x in %.1f s",
                self.instance,
                _CMD_I.unpack_from(req.message)[0],
                req.timeout,
            )
            return self._break()
        return True

    def fail_all(self) -> None:
        """The channel is going away: every waiting request fails (``done(None)``)."""
        queue, self._queue = self._queue, deque()
        for req in queue:
            req.done(None)

    def _send_head(self) -> None:
        req = self._queue[0]
        req.deadline = time.monotonic() + req.timeout
        try:
            sent = self._sock.send(req.message)
        except OSError as exc:  # BlockingIOError included: a few bytes never fill it
            log.error("instance %d: swtpm control channel send failed: %s", self.instance, exc)
            sent = -1
        if sent != len(req.message):
            # Fail on the owner's next expire(), never from inside request().
            req.deadline = 0.0

    def _break(self) -> bool:
        self._broken = True
        self.fail_all()
        return False


def store_volatile(channels: dict[int, ControlChannel], deadline: float) -> list[int]:
    """CMD_STORE_VOLATILE to every swtpm at once (``tpm2-00.volatilestate`` in its state
    directory, loaded by its next start), then wait for the answers until ``deadline``.
    Returns the instances that saved. Blocking: for a planned stop, after the loop."""
    saved: list[int] = []
    waiting = dict(channels)

    def done(instance: int, answer: bytes | None) -> None:
        waiting.pop(instance, None)
        if answer == bytes(RESULT_SIZE):
            saved.append(instance)
        else:
            log.error("instance %d: CMD_STORE_VOLATILE failed (%s)", instance, answer)

    timeout = max(0.1, deadline - time.monotonic())
    for instance, channel in channels.items():
        channel.request(
            PTM_CMD.STORE_VOLATILE, b"", functools.partial(done, instance), timeout=timeout
        )
    with selectors.DefaultSelector() as sel:
        for channel in channels.values():
            sel.register(channel.fileno(), selectors.EVENT_READ, channel)
        while waiting:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                key.data.on_readable()
            for channel in list(waiting.values()):
                channel.expire(time.monotonic())
    return saved
