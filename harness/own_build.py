"""Bring your own build: for one run, a user's hypervisor, kernels, modules,
``xen-tpmfront`` or driver tree replaces the bundled piece.

``nox -s xen``, ``harness up`` and (for what a real host lets us change) ``certify``
take the flags below. Each piece is

- **checked first**, before QEMU starts (:mod:`harness.binaries`): a file that is not
  what its flag says, or a module built for another kernel, is a clear error;
- **recorded**: its origin and sha256 go to ``own-build.json`` in the artifacts, into
  ``harness up``'s JSON and into the certify report;
- **dropped into what is cached**, never a rebuild: the images stay as built, QEMU
  boots the user's Xen and dom0 kernel, dom0 serves the guests the user's kernel, the
  modules and the driver are copied in. The saved booted machine is keyed by the
  pieces it has booted (:meth:`PreparedBuild.machine_key`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import binaries
from harness.binaries import BadFile, KernelImage
from harness.errors import HarnessError
from harness.paths import REPO_ROOT

RECORD_FILE = "own-build.json"
BUNDLED_DRIVER = REPO_ROOT / "xenvtpm"
# Flag -> field; the order is the order of the record.
FLAGS = {
    "--xen": "xen",
    "--dom0-kernel": "dom0_kernel",
    "--guest-kernel": "guest_kernel",
    "--guest-modules": "guest_modules",
    "--tpmfront": "tpmfront",
    "--tpmfront-source": "tpmfront_source",
    "--driver": "driver",
}
HELP = {  # flag -> (metavar, help)
    "--xen": ("FILE", "boot this hypervisor (multiboot xen, or xen.gz) instead of Debian's"),
    "--dom0-kernel": (
        "FILE",
        "boot dom0 on this kernel (bzImage); what dom0 needs must be built in, or be the "
        "image's own modules",
    ),
    "--guest-kernel": (
        "FILE",
        "boot the guests on this kernel (bzImage or vmlinux); --guest-modules too unless it "
        "is the image's own release",
    ),
    "--guest-modules": (
        "DIR|TAR",
        "the guest kernel's modules (a modules_install tree, a .deb's unpacked root, or a "
        "tar of either); dom0 makes its initrd",
    ),
    "--tpmfront": ("FILE.ko", "stock guests load this xen-tpmfront instead of their own"),
    "--tpmfront-source": (
        "DIR",
        "build xen-tpmfront from these sources against the guest kernel's headers (out of "
        "tree, seconds) and load it in stock guests",
    ),
    "--driver": ("GITREF|DIR", "deploy this xenvtpm package into dom0 and the guests"),
}
# What a user's own Xen host lets a run change: its Xen and kernels are the host's.
# (--tpmfront-source needs the headers of the host's guest kernel, which only the user has.)
ON_A_HOST = frozenset({"driver", "tpmfront"})
# What a run boots: these are in a saved booted machine's memory and disks.
BOOTED = ("xen", "dom0_kernel", "guest_kernel", "guest_modules")
MODULE_NAME = "xen_tpmfront"
TPMFRONT_KINDS = frozenset({"kernel", "kernel-tpm2"})  # the guest kinds that load it


class OwnBuildError(HarnessError):
    """The flags of a user's own build do not fit together or this target."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: Path) -> str:
    """One hash over a tree's relative paths and contents (no ``__pycache__``)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if "__pycache__" not in p.parts):
        if path.is_file() and not path.is_symlink():
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(sha256_file(path).encode())
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


@dataclass(frozen=True)
class Piece:
    """One replaced piece, as the record shows it."""

    flag: str
    origin: str  # what the user named: a path, or a git ref
    path: str  # the file or tree used
    sha256: str
    what: str  # what it was found to be (a kernel's release, a module's vermagic...)


@dataclass
class PreparedBuild:
    """The pieces, checked and ready for the target to use."""

    pieces: list[Piece] = field(default_factory=list)
    xen: Path | None = None
    dom0_kernel: Path | None = None
    dom0_kernel_release: str | None = None
    guest_kernel: KernelImage | None = None
    guest_modules: Path | None = None  # the release's directory
    tpmfront: Path | None = None
    tpmfront_info: dict[str, str] = field(default_factory=dict)
    driver: Path = BUNDLED_DRIVER

    def machine_key(self) -> str:
        """Of the pieces a saved booted machine has booted; "" when it has none."""
        booted = [p for p in self.pieces if FLAGS[p.flag] in BOOTED]
        if not booted:
            return ""
        blob = json.dumps([[p.flag, p.sha256] for p in booted]).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def to_json(self) -> list[dict[str, str]]:
        return [asdict(p) for p in self.pieces]

    def record(self, artifacts: Path) -> None:
        """``own-build.json`` in the artifacts: every piece's origin and sha256."""
        artifacts.mkdir(parents=True, exist_ok=True)
        (artifacts / RECORD_FILE).write_text(json.dumps(self.to_json(), indent=2) + "\n")


@dataclass(frozen=True)
class OwnBuild:
    """What the user asked for, by flag; nothing is read until :meth:`check`."""

    xen: Path | None = None
    dom0_kernel: Path | None = None
    guest_kernel: Path | None = None
    guest_modules: Path | None = None
    tpmfront: Path | None = None
    tpmfront_source: Path | None = None
    driver: str | None = None

    @classmethod
    def from_flags(cls, values: Mapping[str, str | None]) -> OwnBuild:
        """From ``{"--xen": "path", ...}`` (missing or None: the bundled piece)."""
        kwargs: dict[str, Any] = {}
        for flag, name in FLAGS.items():
            value = values.get(flag)
            if value:
                kwargs[name] = value if name == "driver" else Path(value).expanduser().resolve()
        return cls(**kwargs)

    def given(self) -> dict[str, str]:
        return {
            flag: str(getattr(self, name)) for flag, name in FLAGS.items() if getattr(self, name)
        }

    def __bool__(self) -> bool:
        return bool(self.given())

    def check(self, *, on_a_host: bool = False, guest_kind: str = "python") -> None:
        """What can be judged without the images: the flags fit together and this kind
        of target, and every file is what its flag says (before anything starts)."""
        given = {FLAGS[f]: v for f, v in self.given().items()}
        if on_a_host and set(given) - ON_A_HOST:
            refused = [f for f, n in FLAGS.items() if n in set(given) - ON_A_HOST]
            raise OwnBuildError(
                f"{', '.join(refused)}: a real Xen host boots its own hypervisor and kernels; "
                "on an ssh:// target only --driver and --tpmfront (a module you built for "
                "the guests' kernel) apply"
            )
        if self.tpmfront and self.tpmfront_source:
            raise OwnBuildError("--tpmfront and --tpmfront-source: give one of them")
        if (self.tpmfront or self.tpmfront_source) and guest_kind not in TPMFRONT_KINDS:
            raise OwnBuildError(
                "--tpmfront/--tpmfront-source replace the stock guests' xen-tpmfront: use "
                "them with the stock-guest kind (--target xen-kernel, nox -s xen -- --kind "
                "kernel, certify --guest-kind kernel)"
            )
        if self.guest_modules and not self.guest_kernel:
            raise OwnBuildError("--guest-modules: give the kernel they are for, --guest-kernel")
        if self.xen:
            binaries.check_xen(self.xen)
        if self.dom0_kernel:
            binaries.kernel_image(self.dom0_kernel, "--dom0-kernel")
        if self.guest_kernel:
            binaries.kernel_image(self.guest_kernel, "--guest-kernel")
        if self.guest_modules and not self.guest_modules.exists():
            raise BadFile("--guest-modules", self.guest_modules, "no such file or directory")
        if self.tpmfront:
            binaries.module_info(self.tpmfront)
        if self.tpmfront_source and not self.tpmfront_source.is_dir():
            raise BadFile("--tpmfront-source", self.tpmfront_source, "not a directory")

    def prepare(
        self,
        work: Path,
        kernel_release: str,
        build_module: Callable[[Path], Path] | None = None,
    ) -> PreparedBuild:
        """Check each piece against the others and against the image's kernel
        (``kernel_release``), unpack or build what needs it under ``work``. Call
        :meth:`check` first, with the target's kind."""
        out = PreparedBuild()
        if self.xen:
            out.xen = self._xen_binary(work)
            out.pieces.append(self._piece("--xen", self.xen, "multiboot Xen"))
        if self.dom0_kernel:
            dom0 = binaries.kernel_image(self.dom0_kernel, "--dom0-kernel")
            # A copy: QEMU's multiboot module list cannot take a comma or space in a path.
            work.mkdir(parents=True, exist_ok=True)
            out.dom0_kernel, out.dom0_kernel_release = work / "dom0-vmlinuz", dom0.release
            shutil.copyfile(dom0.path, out.dom0_kernel)
            out.pieces.append(self._piece("--dom0-kernel", dom0.path, _kernel_what(dom0)))
        guest_release = kernel_release
        if self.guest_kernel:
            out.guest_kernel = binaries.kernel_image(self.guest_kernel, "--guest-kernel")
            guest_release = out.guest_kernel.release
            out.pieces.append(
                self._piece("--guest-kernel", self.guest_kernel, _kernel_what(out.guest_kernel))
            )
            if self.guest_modules is None and guest_release != kernel_release:
                raise OwnBuildError(
                    f"--guest-kernel {self.guest_kernel} is release {guest_release}, the "
                    f"image's modules are for {kernel_release}: give its --guest-modules"
                )
        if self.guest_modules:
            out.guest_modules = self._modules(work, guest_release)
            out.pieces.append(
                self._piece("--guest-modules", self.guest_modules, f"modules for {guest_release}")
            )
        source = self.tpmfront
        if self.tpmfront_source:
            if build_module is None:
                raise OwnBuildError("--tpmfront-source: this target cannot build modules")
            source = build_module(self.tpmfront_source)
            out.pieces.append(
                self._piece("--tpmfront-source", self.tpmfront_source, f"built: {source}")
            )
        if source is not None:
            out.tpmfront, out.tpmfront_info = source, self._tpmfront(source, guest_release)
            what = f"{MODULE_NAME}, vermagic {out.tpmfront_info.get('vermagic', '?')}"
            if srcversion := out.tpmfront_info.get("srcversion"):
                what += f", srcversion {srcversion}"
            out.pieces.append(self._piece("--tpmfront", source, what))
        if self.driver:
            out.driver, what = self._driver(work)
            out.pieces.append(
                Piece("--driver", self.driver, str(out.driver), sha256_tree(out.driver), what)
            )
        return out

    # -- each piece --------------------------------------------------------------------------
    @staticmethod
    def _piece(flag: str, path: Path, what: str) -> Piece:
        return Piece(flag, str(path), str(path), sha256_of(path), what)

    def _xen_binary(self, work: Path) -> Path:
        """The hypervisor as QEMU takes it: ``xen.gz`` is unzipped into ``work``."""
        assert self.xen is not None
        binaries.check_xen(self.xen)
        with self.xen.open("rb") as f:
            if f.read(2) != binaries.GZIP_MAGIC:
                return self.xen
        work.mkdir(parents=True, exist_ok=True)
        unzipped = work / "xen.bin"
        unzipped.write_bytes(binaries.read_maybe_gzip(self.xen))
        return unzipped

    def _modules(self, work: Path, release: str) -> Path:
        assert self.guest_modules is not None
        root = self.guest_modules
        if root.is_file():
            dest = work / "guest-modules"
            shutil.rmtree(dest, ignore_errors=True)
            root = binaries.unpack_modules(root, dest, "--guest-modules")
        return binaries.modules_release_dir(root, release, "--guest-modules")

    @staticmethod
    def _tpmfront(ko: Path, release: str) -> dict[str, str]:
        """The module's modinfo, which must say xen_tpmfront built for ``release``."""
        info = binaries.module_info(ko)
        if info.get("name") != MODULE_NAME:
            raise BadFile(
                "--tpmfront", ko, f"is module {info.get('name', '(unnamed)')}, not {MODULE_NAME}"
            )
        built_for = (info.get("vermagic") or "?").split()[0]
        if built_for != release:
            raise BadFile(
                "--tpmfront",
                ko,
                f"built for kernel {built_for} (vermagic {info.get('vermagic')!r}); the "
                f"guests run {release}",
            )
        return info

    def _driver(self, work: Path) -> tuple[Path, str]:
        """The ``xenvtpm`` package: a directory (the package, or a checkout holding it),
        or a git ref of this repository, exported into ``work``."""
        assert self.driver is not None
        local = Path(self.driver).expanduser()
        if local.is_dir():
            package = local / "xenvtpm" if (local / "xenvtpm" / "__main__.py").exists() else local
            if not (package / "__main__.py").exists():
                raise BadFile("--driver", local, "not the xenvtpm package (no __main__.py)")
            return package.resolve(), f"directory {package.resolve()}"
        commit = _git("rev-parse", "--verify", "--quiet", f"{self.driver}^{{commit}}")
        if not commit:
            raise OwnBuildError(
                f"--driver {self.driver}: neither a directory nor a git ref of {REPO_ROOT}"
            )
        dest = work / f"driver-{commit[:12]}"
        if not (dest / "xenvtpm" / "__main__.py").exists():
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            archive = subprocess.run(
                ["git", "-C", str(REPO_ROOT), "archive", commit, "xenvtpm"],
                capture_output=True,
                check=True,
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return dest / "xenvtpm", f"git commit {commit}"


def _git(*args: str) -> str:
    result = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def _kernel_what(kernel: KernelImage) -> str:
    return f"{kernel.format}, release {kernel.release}"
