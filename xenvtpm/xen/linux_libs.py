"""Xen's own user-space libraries, loaded through ctypes, with every signature declared.

Why these libraries rather than hand-written ioctls or the pure-Python xenstore client:
they are the stable ABI Xen ships for exactly this (sonames ``libxenstore.so.4``,
``libxengnttab.so.1``, ``libxenevtchn.so.1``, Debian packages of the same names), they
hide the ioctl structures of ``/dev/xen/{gntalloc,gntdev,evtchn}`` that change between
kernels, and ``xs_open`` picks the transport itself: xenstored's unix socket in dom0, the
``/dev/xen/xenbus`` character device in a guest. One code path then serves both ends.

Every function that returns a pointer is declared ``restype = c_void_p``: ctypes'
default ``c_int`` would truncate 64-bit pointers (DESIGN.md 4, measured). Every library
is loaded with ``use_errno=True`` so ``ctypes.get_errno()`` is the errno of the last call.

Spec: tools/include/xenstore.h, xengnttab.h, xenevtchn.h (Xen 4.17).
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xenvtpm.errors import HypervisorUnavailable

c_void_p = ctypes.c_void_p
c_char_p = ctypes.c_char_p
c_uint = ctypes.c_uint
c_uint32 = ctypes.c_uint32
c_int = ctypes.c_int
c_bool = ctypes.c_bool
c_ulong = ctypes.c_ulong
P_uint = ctypes.POINTER(ctypes.c_uint)
P_uint32 = ctypes.POINTER(ctypes.c_uint32)


class XsPermissions(ctypes.Structure):
    """``struct xs_permissions``. Spec: tools/include/xenstore_lib.h."""

    _fields_ = (("id", c_uint), ("perms", c_uint))


P_perms = ctypes.POINTER(XsPermissions)

# xenstore_lib.h: XS_PERM_*
XS_PERM_NONE = 0x00
XS_PERM_READ = 0x01
XS_PERM_WRITE = 0x02
XBT_NULL = 0  # xenstore.h


@dataclass(frozen=True)
class Signature:
    restype: Any
    argtypes: tuple[Any, ...]


def _sig(restype: Any, *argtypes: Any) -> Signature:
    return Signature(restype, argtypes)


#: soname -> {function: signature}. Handles (``struct xs_handle *``...) are c_void_p.
SIGNATURES: Mapping[str, Mapping[str, Signature]] = {
    "libxenstore.so.4": {
        "xs_open": _sig(c_void_p, c_ulong),
        "xs_close": _sig(None, c_void_p),
        "xs_read": _sig(c_void_p, c_void_p, c_uint32, c_char_p, P_uint),
        "xs_write": _sig(c_bool, c_void_p, c_uint32, c_char_p, c_char_p, c_uint),
        "xs_mkdir": _sig(c_bool, c_void_p, c_uint32, c_char_p),
        "xs_rm": _sig(c_bool, c_void_p, c_uint32, c_char_p),
        "xs_directory": _sig(c_void_p, c_void_p, c_uint32, c_char_p, P_uint),
        "xs_get_permissions": _sig(c_void_p, c_void_p, c_uint32, c_char_p, P_uint),
        "xs_set_permissions": _sig(c_bool, c_void_p, c_uint32, c_char_p, P_perms, c_uint),
        "xs_watch": _sig(c_bool, c_void_p, c_char_p, c_char_p),
        "xs_unwatch": _sig(c_bool, c_void_p, c_char_p, c_char_p),
        "xs_fileno": _sig(c_int, c_void_p),
        "xs_check_watch": _sig(c_void_p, c_void_p),
        "xs_get_domain_path": _sig(c_void_p, c_void_p, c_uint),
        "xs_transaction_start": _sig(c_uint32, c_void_p),
        "xs_transaction_end": _sig(c_bool, c_void_p, c_uint32, c_bool),
    },
    "libxengnttab.so.1": {
        "xengntshr_open": _sig(c_void_p, c_void_p, c_uint),
        "xengntshr_close": _sig(c_int, c_void_p),
        "xengntshr_share_pages": _sig(c_void_p, c_void_p, c_uint32, c_int, P_uint32, c_int),
        "xengntshr_unshare": _sig(c_int, c_void_p, c_void_p, c_uint32),
        "xengnttab_open": _sig(c_void_p, c_void_p, c_uint),
        "xengnttab_close": _sig(c_int, c_void_p),
        "xengnttab_map_domain_grant_refs": _sig(
            c_void_p, c_void_p, c_uint32, c_uint32, P_uint32, c_int
        ),
        "xengnttab_unmap": _sig(c_int, c_void_p, c_void_p, c_uint32),
    },
    "libxenevtchn.so.1": {
        "xenevtchn_open": _sig(c_void_p, c_void_p, c_uint),
        "xenevtchn_close": _sig(c_int, c_void_p),
        "xenevtchn_fd": _sig(c_int, c_void_p),
        "xenevtchn_notify": _sig(c_int, c_void_p, c_uint32),
        "xenevtchn_bind_unbound_port": _sig(c_int, c_void_p, c_uint32),
        "xenevtchn_bind_interdomain": _sig(c_int, c_void_p, c_uint32, c_uint32),
        "xenevtchn_pending": _sig(c_int, c_void_p),
        "xenevtchn_unmask": _sig(c_int, c_void_p, c_uint32),
        "xenevtchn_unbind": _sig(c_int, c_void_p, c_uint32),
    },
}

#: The Debian package that ships each soname (for the error message).
PACKAGES = {
    "libxenstore.so.4": "libxenstore4",
    "libxengnttab.so.1": "libxengnttab1",
    "libxenevtchn.so.1": "libxenevtchn1",
}


def errno_name(num: int | None) -> str:
    """``EACCES`` for 13; ``EIO`` when the library left errno unset."""
    return errno_mod.errorcode.get(num, "EIO") if num else "EIO"


def last_error() -> OSError:
    """The errno of the last library call, as an ``OSError`` to chain errors from."""
    num = ctypes.get_errno() or errno_mod.EIO
    return OSError(num, os.strerror(num))


def declare(lib: ctypes.CDLL, signatures: Mapping[str, Signature]) -> None:
    """Set ``restype``/``argtypes`` of every function (AttributeError if one is missing)."""
    for name, sig in signatures.items():
        fn = getattr(lib, name)
        fn.restype = sig.restype
        fn.argtypes = sig.argtypes


class XenLibs:
    """The three libraries plus libc's ``free``, loaded once per process.

    ``names`` maps the canonical sonames to the files to load, so tests can point one at
    a library that does not exist and see the error a host without Xen gives.
    """

    _shared: XenLibs | None = None

    def __init__(self, names: Mapping[str, str] | None = None) -> None:
        names = dict(names or {})
        loaded: dict[str, ctypes.CDLL] = {}
        for soname, sigs in SIGNATURES.items():
            path = names.get(soname, soname)
            try:
                lib = ctypes.CDLL(path, use_errno=True)
                declare(lib, sigs)
            except (OSError, AttributeError) as exc:
                raise HypervisorUnavailable(
                    f"cannot load Xen's {soname} ({exc}): not a Xen domain, or the library "
                    f"is missing (Debian: apt-get install {' '.join(PACKAGES.values())})"
                ) from exc
            loaded[soname] = lib
        self.xs = loaded["libxenstore.so.4"]
        self.gnt = loaded["libxengnttab.so.1"]
        self.evtchn = loaded["libxenevtchn.so.1"]
        libc = ctypes.CDLL(None, use_errno=True)
        self.free = libc.free
        self.free.restype = None
        self.free.argtypes = (c_void_p,)

    @classmethod
    def shared(cls) -> XenLibs:
        """The process-wide instance (ctypes loads each library once anyway)."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared
