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
from collections.abc import Iterator
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


ELF64_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Spec: elf(5), Elf64_Ehdr
ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")  # Spec: elf(5), Elf64_Shdr
ELFCLASS64, ELFDATA2LSB = 2, 1  # e_ident[EI_CLASS], e_ident[EI_DATA]


def _sections(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(name, offset, size) of each section of an ELF64 little-endian file."""
    ehdr = ELF64_EHDR.unpack_from(data)
    shoff, shentsize, shnum, shstrndx = ehdr[6], *ehdr[11:14]
    headers = [ELF64_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4] if shstrndx < shnum else len(data)
    for sh_name, _, _, _, offset, size, *_ in headers:
        start = strtab + sh_name
        yield data[start : data.index(b"\0", start)], offset, size


def module_info(ko: Path, flag: str = "--tpmfront") -> dict[str, str]:
    """A module's ``.modinfo`` (what modinfo(8) shows: name, vermagic, depends ...).

    The section is NUL-separated ``key=value`` strings; a repeated key (alias, parm)
    has its values joined by newlines. Pure Python: the host has no modinfo.
    """
    try:
        data = ko.read_bytes()
    except OSError as e:
        raise BadFile(flag, ko, f"cannot read: {e}") from e
    if data[:4] != b"\x7fELF":
        raise BadFile(flag, ko, "not an ELF file")
    if data[4:6] != bytes((ELFCLASS64, ELFDATA2LSB)):
        raise BadFile(flag, ko, "not a 64-bit little-endian ELF file")
    try:
        found = [(o, s) for n, o, s in _sections(data) if n == b".modinfo"]
    except (struct.error, ValueError) as e:
        raise BadFile(flag, ko, f"malformed ELF section headers: {e}") from e
    if not found:
        raise BadFile(flag, ko, "no .modinfo section: not a kernel module")
    offset, size = found[0]
    if offset + size > len(data):
        raise BadFile(flag, ko, ".modinfo runs past the end of the file")
    info: dict[str, str] = {}
    for entry in data[offset : offset + size].split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            info[key] = f"{info[key]}\n{value}" if key in info else value
    return info
