"""What a file a user hands the harness really is, read from its own headers: a Xen
that QEMU can boot, a Linux kernel and its release, a tree of modules for a release.

A flag that names the wrong file (a text file as a kernel, Xen's ``xen.efi`` instead of
the multiboot ``xen``, modules of another kernel) must fail here, before QEMU starts,
with what the file is instead: otherwise it shows as a boot that hangs minutes later.
"""

from __future__ import annotations

import gzip
import re
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

MULTIBOOT_MAGIC = 0x1BADB002  # QEMU's -kernel boots multiboot (version 1) images only
MULTIBOOT_SEARCH = 8192  # the header lies in the first 8 KiB, 4-byte aligned
BZIMAGE_MAGIC = b"HdrS"  # Linux's x86 boot protocol header, at 0x202
BZIMAGE_MAGIC_AT = 0x202
BZIMAGE_VERSION_PTR_AT = 0x20E  # kernel_version: offset - 0x200 of the version string
ELF_MAGIC = b"\x7fELF"
GZIP_MAGIC = b"\x1f\x8b"
LINUX_BANNER = re.compile(rb"Linux version (\S+) \(")  # linux_banner in an ELF vmlinux


class BadFile(HarnessError):
    """A file given for a piece of the build is not that piece."""

    def __init__(self, flag: str, path: Path, why: str) -> None:
        super().__init__(f"{flag} {path}: {why}")
        self.flag = flag
        self.path = path


def describe_bytes(head: bytes) -> str:
    """A few words on what a file starts with, for the error that refuses it."""
    if not head:
        return "an empty file"
    if head.startswith(ELF_MAGIC):
        return "an ELF file"
    if head.startswith(GZIP_MAGIC):
        return "gzip data"
    if head.startswith(b"MZ"):
        return "a PE/EFI executable"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head[:512]):
        return "a text file"
    return "data of an unknown kind"


def read_maybe_gzip(path: Path, limit: int | None = None) -> bytes:
    """The file's bytes, decompressed if it is gzip (Xen builds ship ``xen.gz``)."""
    with path.open("rb") as f:
        magic = f.read(2)
    opener = gzip.open if magic == GZIP_MAGIC else open
    with opener(path, "rb") as f:
        return f.read() if limit is None else f.read(limit)


def has_multiboot_header(data: bytes) -> bool:
    """A multiboot header (magic, flags, checksum summing to 0) where QEMU looks."""
    for offset in range(0, min(len(data), MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, offset)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return True
    return False


def check_xen(path: Path, flag: str = "--xen") -> None:
    """A hypervisor QEMU can boot with ``-kernel``: a multiboot image (``xen``, or
    ``xen.gz`` which the caller unzips), not ``xen.efi`` nor ``xen-syms``."""
    require_file(path, flag)
    head = read_maybe_gzip(path, MULTIBOOT_SEARCH)
    if not has_multiboot_header(head):
        raise BadFile(
            flag,
            path,
            f"not a multiboot image ({describe_bytes(head)} without a multiboot header in "
            "its first 8 KiB): give the hypervisor QEMU boots, xen/xen or xen.gz of a build",
        )


@dataclass(frozen=True)
class KernelImage:
    """A Linux kernel file and the release (``uname -r``) it reports."""

    path: Path
    release: str
    banner: str
    format: str  # "bzImage" or "ELF vmlinux"


def kernel_image(path: Path, flag: str) -> KernelImage:
    """The kernel in ``path`` (bzImage, or an ELF vmlinux, gzip allowed) and its
    release, from the boot header's version string or the ELF's ``linux_banner``."""
    require_file(path, flag)
    data = read_maybe_gzip(path)
    if data[BZIMAGE_MAGIC_AT : BZIMAGE_MAGIC_AT + 4] == BZIMAGE_MAGIC:
        (pointer,) = struct.unpack_from("<H", data, BZIMAGE_VERSION_PTR_AT)
        start = pointer + 0x200
        end = data.find(b"\0", start, start + 512)
        text = data[start:end].decode(errors="replace") if pointer and end > start else ""
        if not text.split():
            raise BadFile(flag, path, "a bzImage without a kernel version string")
        return KernelImage(path, text.split()[0], text, "bzImage")
    if data.startswith(ELF_MAGIC):
        found = LINUX_BANNER.search(data)
        if found is None:
            raise BadFile(flag, path, "an ELF file without a Linux version banner: not a kernel")
        return KernelImage(path, found.group(1).decode(), found.group(0).decode(), "ELF vmlinux")
    raise BadFile(
        flag, path, f"not a Linux kernel ({describe_bytes(data[:512])}, no bzImage header)"
    )


def require_file(path: Path, flag: str) -> None:
    if not path.is_file():
        raise BadFile(flag, path, "no such file" if not path.exists() else "not a file")


def modules_release_dir(root: Path, release: str, flag: str) -> Path:
    """The directory of ``release``'s modules under ``root``: ``root`` itself when it
    is named ``RELEASE``, or ``RELEASE/``, ``modules/RELEASE/``, ``lib/modules/RELEASE/``
    below it (what ``make modules_install INSTALL_MOD_PATH=`` and a ``.deb`` make)."""
    candidates = [
        root,
        root / release,
        root / "modules" / release,
        root / "lib" / "modules" / release,
        root / "usr" / "lib" / "modules" / release,
    ]
    for candidate in candidates:
        if candidate.name == release and (candidate / "kernel").is_dir():
            return candidate
    found = sorted({p.parent.name for p in root.rglob("modules.order")})
    hint = f"it has modules for {', '.join(found)}" if found else "it has no modules.order"
    raise BadFile(flag, root, f"no modules for kernel {release} ({hint})")


def unpack_modules(archive: Path, dest: Path, flag: str) -> Path:
    """Unpack a tar of modules (any compression tarfile reads) into ``dest``, refusing
    members that would land outside it."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise BadFile(flag, archive, f"not a readable tar of modules: {e}") from e
    return dest


def module_info(path: Path, flag: str = "--tpmfront") -> dict[str, str]:
    """A kernel module's ``.modinfo`` (name, vermagic, depends, srcversion...), read
    from its ELF section headers: the host has no ``modinfo``, and needs none."""
    require_file(path, flag)
    data = path.read_bytes()
    if not data.startswith(ELF_MAGIC) or len(data) < 64 or data[4] != 2 or data[5] != 1:
        raise BadFile(flag, path, f"not a 64-bit little-endian ELF module ({describe_bytes(data)})")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    try:
        headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
        names_at = headers[shstrndx][4]
    except (struct.error, IndexError) as e:
        raise BadFile(flag, path, f"an ELF file with broken section headers ({e})") from e
    for name_offset, _type, _flags, _addr, offset, size in headers:
        end = data.find(b"\0", names_at + name_offset)
        if data[names_at + name_offset : end] == b".modinfo":
            fields = (f.decode(errors="replace") for f in data[offset : offset + size].split(b"\0"))
            pairs = (f.partition("=") for f in fields if "=" in f)
            return {key: value for key, _, value in pairs}
    raise BadFile(flag, path, "an ELF file without a .modinfo section: not a kernel module")
