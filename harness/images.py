"""Build (or reuse) the dom0 and guest disk images that boot Xen under QEMU.

Recipe: ``images/`` (package lists, configuration trees copied into each root file
system, the xl template) plus this module's own code. The cache key is a hash of all of
it, the mirror and the harness's SSH public key, so changing any of them rebuilds and a
warm run rebuilds nothing (and says so).

Layout under ``$XENVTPM_CACHE/images`` (default ``~/.cache/xenvtpm/images``)::

    ssh/id_ed25519{,.pub}   the harness key pair (root's authorized_keys in both images)
    debs/                   debootstrap's package cache, shared by both builds
    <key>/                  one finished build, renamed into place when complete
        dom0.img guest.img  ext4 file systems (no partition table): /dev/vda, /dev/xvda
        xen.bin             Debian's xen-4.17-amd64.gz, unzipped (multiboot for -kernel)
        vmlinuz initrd.img  dom0's kernel and initrd (QEMU multiboot modules; guests
                            boot the same files from inside dom0 via xl kernel=)
        manifest.json       kernel version (and the kernel source the selftests come
                            from), paths inside dom0, timings

Both root file systems carry ``/opt/tpm2-selftests``: the kernel's TPM 2.0 selftests
(``tools/testing/selftests/tpm2``) from Debian's ``linux-source-6.1`` of the same mirror
as the kernel, checked to be the kernel's own upstream version (scenarios/test_external.py).

Nothing is mounted: ``debootstrap --variant=minbase`` into a directory, configure it
there, then ``mke2fs -t ext4 -d ROOTFS IMG SIZE``. Spec: DESIGN.md section 4.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from harness.errors import HarnessError
from harness.paths import REPO_ROOT
from harness.process import tail

log = logging.getLogger(__name__)

RECIPES = REPO_ROOT / "images"
CACHE_ENV = "XENVTPM_CACHE"
SUITE = "bookworm"
STEP_EXIT_TIMEOUT = 300  # seconds from a step's end of output to its exit
KEEP_BUILDS = 2  # older recipe builds are deleted after a new one is made
DOM0_SIZE = "3G"
GUEST_SIZE = "1536M"
# The kernel's TPM 2.0 selftests: where they are in linux-source-6.1's tarball (in dom0's
# rootfs after debootstrap) and where both images get them.
KERNEL_SOURCE_PACKAGE = "linux-source-6.1"
XEN_PACKAGE = "xen-hypervisor-4.17-amd64"  # its exact version goes into the manifest
KERNEL_SOURCE_TARBALL = "usr/src/linux-source-6.1.tar.xz"
SELFTESTS_MEMBER = "linux-source-6.1/tools/testing/selftests/tpm2"
SELFTESTS_DIR = "opt/tpm2-selftests"
# Module trees a PV guest never needs (keeps guest.img small); depmod runs afterwards.
GUEST_MODULE_SKIP = (
    "kernel/drivers/gpu",
    "kernel/drivers/media",
    "kernel/drivers/net/wireless",
    "kernel/drivers/infiniband",
    "kernel/drivers/staging",
    "kernel/drivers/iio",
    "kernel/drivers/usb",
    "kernel/drivers/bluetooth",
    "kernel/drivers/hid",
    "kernel/drivers/input",
    "kernel/drivers/scsi",
    "kernel/drivers/isdn",
    "kernel/drivers/mtd",
    "kernel/sound",
    "kernel/net/wireless",
    "kernel/net/mac80211",
    "kernel/net/bluetooth",
)

# Units that only cost boot time under TCG: nothing waits for "network online" (a
# bridge without carrier would stall boot for minutes), no VGA ttys, no periodic jobs.
MASKED_UNITS = (
    "systemd-networkd-wait-online.service",
    "getty-static.service",
    "getty@tty1.service",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)

Progress = Callable[[str], None]


class ImageBuildError(HarnessError):
    """An image could not be built; says which step and where its log is."""


class MirrorUnreachable(ImageBuildError):
    """The apt mirror from the host's sources cannot be reached."""


def upstream_version(debian_version: str) -> str:
    """``[epoch:]upstream[-revision]`` -> upstream: 6.1.176-1 -> 6.1.176.

    Spec: deb-version(7).
    """
    version = debian_version.split(":", 1)[-1]
    return version.rsplit("-", 1)[0] if "-" in version else version


def cache_root() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    base = Path(explicit) if explicit else Path.home() / ".cache" / "xenvtpm"
    return base / "images"


# -- the mirror -------------------------------------------------------------------------
def host_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The first Debian mirror of the host's own apt sources (deb822 or one-line).

    Spec: sources.list(5). Files disabled by renaming (``*.disabled*``) are ignored, as
    apt itself does; security and third-party repositories are skipped because
    debootstrap takes one mirror holding the main suite.
    """
    files = [sources_dir / "sources.list"]
    files += sorted((sources_dir / "sources.list.d").glob("*.list"))
    files += sorted((sources_dir / "sources.list.d").glob("*.sources"))
    candidates: list[tuple[str, list[str]]] = []
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split() and fields.get("enabled") != "no":
                    suites = fields.get("suites", "").split()
                    candidates += [(uri, suites) for uri in fields.get("uris", "").split()]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    candidates.append((words[1], [words[2]]))
    for uri, suites in candidates:
        if SUITE in suites and "security" not in uri:
            return uri.rstrip("/")
    raise ImageBuildError(
        f"no apt source for Debian {SUITE} in {sources_dir}/sources.list(.d): "
        "debootstrap needs the machine's own Debian mirror"
    )


def check_mirror(mirror: str, timeout: float = 20.0) -> None:
    url = f"{mirror}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            pass
    except (urllib.error.URLError, OSError) as e:
        raise MirrorUnreachable(
            f"cannot reach the apt mirror {mirror} (from the host's apt sources): "
            f"HEAD {url} failed: {e}"
        ) from e


# -- the recipe -------------------------------------------------------------------------
def read_packages(path: Path) -> list[str]:
    return [w for line in path.read_text().splitlines() for w in line.split("#", 1)[0].split()]


def ensure_ssh_key(root: Path) -> tuple[Path, str]:
    """The harness's key pair (created once): private key path, public key line."""
    key_dir = root / "ssh"
    private = key_dir / "id_ed25519"
    public = key_dir / "id_ed25519.pub"
    if not (private.exists() and public.exists()):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        tmp = private.with_suffix(".tmp")
        tmp.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
        tmp.chmod(0o600)
        pub = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        public.write_text(pub.decode() + " xenvtpm-harness\n")
        tmp.replace(private)
    return private, public.read_text().strip()


def recipe_files(recipes: Path = RECIPES) -> list[Path]:
    return sorted(p for p in recipes.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def recipe_key(recipes: Path, mirror: str, pubkey: str) -> str:
    """Hash of everything an image is made from: recipe files, this code, mirror, key."""
    h = hashlib.sha256()
    for path in [*recipe_files(recipes), Path(__file__).resolve()]:
        h.update(str(path.relative_to(path.parent.parent)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
        h.update(oct(path.stat().st_mode & 0o111).encode())
    h.update(f"{SUITE}\0{mirror}\0{pubkey}\0{DOM0_SIZE}\0{GUEST_SIZE}".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Images:
    """A finished build: the files QEMU and the xen target use."""

    dir: Path
    dom0: Path
    guest: Path
    xen: Path
    kernel: Path
    initrd: Path
    ssh_key: Path
    kernel_version: str
    # Where the same kernel and initrd are inside dom0 (xl kernel=/ramdisk=).
    dom0_kernel: str
    dom0_initrd: str
    built: bool  # False when the cache was reused

    @classmethod
    def load(cls, directory: Path, ssh_key: Path, built: bool) -> Images:
        manifest: dict[str, Any] = json.loads((directory / "manifest.json").read_text())
        return cls(
            dir=directory,
            dom0=directory / "dom0.img",
            guest=directory / "guest.img",
            xen=directory / "xen.bin",
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.img",
            ssh_key=ssh_key,
            kernel_version=str(manifest["kernel_version"]),
            dom0_kernel=str(manifest["dom0_kernel"]),
            dom0_initrd=str(manifest["dom0_initrd"]),
            built=built,
        )


# -- building ---------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / "lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a second build waits for the first, then reuses it
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def stop_step(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a step's process group (it has its own session), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Builder:
    """One cold build into ``work``; every step logs to ``work/build.log``."""

    def __init__(self, work: Path, mirror: str, debs: Path, pubkey: str, say: Progress) -> None:
        self.work = work
        self.mirror = mirror
        self.debs = debs
        self.pubkey = pubkey
        self.say = say
        self.log_path = work / "build.log"
        self.timings: dict[str, float] = {}

    def run(self, what: str, argv: Sequence[str], *, progress: bool = False) -> None:
        """Run a build step; ImageBuildError with the command and log tail on failure."""
        with self.log_path.open("ab") as logf:
            logf.write(f"=== {what}: {' '.join(argv)}\n".encode())
            logf.flush()
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
            proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own group: an interrupt stops all of it
            )
            assert proc.stdout is not None
            followed = False
            try:
                self._follow(what, proc, logf, progress)
                followed = True
                # End of output is not the exit: the status may follow a moment later.
                rc = proc.wait(STEP_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                stop_step(proc)
                raise ImageBuildError(
                    f"{what} closed its output but did not exit within {STEP_EXIT_TIMEOUT} s"
                    f"\ncommand: {' '.join(argv)}\nlog: {self.log_path}"
                ) from None
            finally:
                if not followed:  # interrupted: never leave a debootstrap behind
                    stop_step(proc)
                proc.stdout.close()
        if rc != 0:
            raise ImageBuildError(
                f"{what} failed with exit code {rc}\ncommand: {' '.join(argv)}\n"
                f"log: {self.log_path}\nlog tail:\n{tail(self.log_path, 25)}"
            )

    def _follow(
        self, what: str, proc: subprocess.Popen[bytes], logf: IO[bytes], progress: bool
    ) -> None:
        """Copy the step's output to the log; progress lines for debootstrap's stages."""
        assert proc.stdout is not None
        counts: dict[str, int] = {}
        for raw in proc.stdout:
            logf.write(raw)
            line = raw.decode(errors="replace").strip()
            if not progress or not line.startswith("I: "):
                continue
            # One line per stage (Retrieving, Validating, Unpacking, Configuring...)
            # and then one per 50 packages, with the count so far.
            stage = line[3:].split(" ", 1)[0]
            counts[stage] = n = counts.get(stage, 0) + 1
            if n == 1 or n % 50 == 0:
                self.say(f"{what}: {line[3:]}" + (f" ({n} so far)" if n > 1 else ""))

    def debootstrap(self, name: str, packages: list[str]) -> Path:
        rootfs = self.work / f"{name}.rootfs"
        t0 = time.monotonic()
        self.say(
            f"{name}: debootstrap {SUITE} minbase + {len(packages)} packages from {self.mirror}"
        )
        self.run(
            f"{name} debootstrap",
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(packages)}",
                f"--cache-dir={self.debs}",
                SUITE,
                str(rootfs),
                self.mirror,
            ],
            progress=True,
        )
        self.timings[f"{name}_debootstrap_s"] = round(time.monotonic() - t0, 1)
        return rootfs

    def configure_common(self, rootfs: Path, name: str, root_dev: str) -> None:
        """Recipe files, SSH key, fstab, hostname, password-less root on the console."""
        shutil.copytree(RECIPES / "common", rootfs, dirs_exist_ok=True, symlinks=True)
        shutil.copytree(RECIPES / name, rootfs, dirs_exist_ok=True, symlinks=True)
        ssh = rootfs / "root" / ".ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text(self.pubkey + "\n")
        (ssh / "authorized_keys").chmod(0o600)
        (rootfs / "etc" / "fstab").write_text(
            f"# {name} image: the whole disk is one ext4 file system\n"
            f"{root_dev} / ext4 defaults,errors=remount-ro 0 0\n"
        )
        (rootfs / "etc" / "hostname").write_text(f"{name}\n")
        (rootfs / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {name}\n")
        # Root logs in on the console without a password (autologin); SSH needs the key.
        shadow = rootfs / "etc" / "shadow"
        shadow.write_text(re.sub(r"^root:[^:]*:", "root::", shadow.read_text(), flags=re.M))
        systemctl = ["chroot", str(rootfs), "systemctl"]
        self.run(f"{name} enable", [*systemctl, "enable", *self._units(name)])
        self.run(f"{name} mask", [*systemctl, "mask", *MASKED_UNITS])
        # Nothing from the mirror is needed at run time; keep the image small.
        for leftover in (rootfs / "var" / "cache" / "apt" / "archives").glob("*.deb"):
            leftover.unlink()

    @staticmethod
    def _units(name: str) -> list[str]:
        if name == "dom0":
            return ["systemd-networkd.service", "systemd-networkd.socket"]
        return ["xenvtpm-net.service"]

    def configure_dom0(self, rootfs: Path) -> dict[str, str]:
        """Xen's guest console logging, and the kernel/initrd/xen the host boots."""
        self.configure_common(rootfs, "dom0", "/dev/vda")
        # The initrd was made at install time with MODULES=most; remake it small.
        self.run("dom0 initrd", ["chroot", str(rootfs), "update-initramfs", "-u", "-k", "all"])
        # xenconsoled writes each guest's console to /var/log/xen/console/guest-NAME.log
        # (Debian's /etc/init.d/xen passes XENCONSOLED_ARGS; XENCONSOLED_TRACE is unused).
        defaults = rootfs / "etc" / "default" / "xen"
        text = defaults.read_text() if defaults.exists() else ""
        text = re.sub(r"^#?XENCONSOLED_(TRACE|ARGS)=.*$", "", text, flags=re.M)
        defaults.write_text(
            text.rstrip() + '\nXENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"\n'
        )
        (rootfs / "var" / "log" / "xen" / "console").mkdir(parents=True, exist_ok=True)
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise ImageBuildError(f"no kernel in {rootfs}/boot (log: {self.log_path})")
        version = kernels[-1].name.removeprefix("vmlinuz-")
        initrd = rootfs / "boot" / f"initrd.img-{version}"
        xen = sorted((rootfs / "boot").glob("xen-4.17*.gz"))
        if not initrd.exists() or not xen:
            raise ImageBuildError(
                f"dom0 rootfs lacks initrd.img-{version} or xen-4.17*.gz in /boot "
                f"(log: {self.log_path})"
            )
        shutil.copy2(kernels[-1], self.work / "vmlinuz")
        shutil.copy2(initrd, self.work / "initrd.img")
        with gzip.open(xen[-1]) as src, (self.work / "xen.bin").open("wb") as dst:
            shutil.copyfileobj(src, dst)
        return {
            "kernel_version": version,
            "dom0_kernel": f"/boot/vmlinuz-{version}",
            "dom0_initrd": f"/boot/initrd.img-{version}",
            "xen": xen[-1].name,
            "xen_package_version": self.package_version(rootfs, XEN_PACKAGE),
        }

    def package_version(self, rootfs: Path, package: str) -> str:
        """The installed version of ``package`` in ``rootfs`` (dpkg's database there)."""
        argv = ["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W", "-f=${Version}", package]
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0 or not result.stdout.strip():
            raise ImageBuildError(
                f"{package} is not installed in {rootfs.name}: {' '.join(argv)} exited "
                f"{result.returncode}: {result.stderr.strip()} (log: {self.log_path})"
            )
        return result.stdout.strip()

    def install_selftests(self, rootfs: Path, kernel_version: str) -> dict[str, str]:
        """The kernel's tpm2 selftests into dom0's ``/opt/tpm2-selftests``, from
        linux-source-6.1, whose big tarball is then deleted (the image stays small).

        The selftests test the kernel's TPM driver, so they must be the booted kernel's
        own: a source version other than the kernel's upstream version stops the build.
        """
        kernel = self.package_version(rootfs, f"linux-image-{kernel_version}")
        source = self.package_version(rootfs, KERNEL_SOURCE_PACKAGE)
        if upstream_version(kernel) != upstream_version(source):
            raise ImageBuildError(
                f"{KERNEL_SOURCE_PACKAGE} {source} does not match the kernel "
                f"linux-image-{kernel_version} {kernel} (upstream {upstream_version(source)} "
                f"!= {upstream_version(kernel)}): the mirror {self.mirror} is mid-update? "
                "Build again later; the tpm2 selftests must come from the booted kernel's source"
            )
        tarball = rootfs / KERNEL_SOURCE_TARBALL
        dest = rootfs / SELFTESTS_DIR
        dest.mkdir(parents=True, exist_ok=True)
        self.say(f"dom0: tpm2 selftests from {KERNEL_SOURCE_PACKAGE} {source} -> /{SELFTESTS_DIR}")
        t0 = time.monotonic()
        strip = len(Path(SELFTESTS_MEMBER).parts)
        self.run(
            "dom0 tpm2 selftests",
            [
                "tar",
                "-xJf",
                str(tarball),
                "-C",
                str(dest),
                f"--strip-components={strip}",
                SELFTESTS_MEMBER,
            ],
        )
        if not (dest / "tpm2_tests.py").exists():
            raise ImageBuildError(
                f"{SELFTESTS_MEMBER} of {tarball} has no tpm2_tests.py (log: {self.log_path})"
            )
        (dest / "SOURCE").write_text(
            f"{KERNEL_SOURCE_PACKAGE} {source} {SELFTESTS_MEMBER.split('/', 1)[1]}\n"
        )
        tarball.unlink()
        self.timings["selftests_extract_s"] = round(time.monotonic() - t0, 1)
        return {"kernel_package_version": kernel, "kernel_source_version": source}

    def configure_guest(self, rootfs: Path, dom0_rootfs: Path, version: str) -> None:
        """dom0's kernel modules (the guest boots dom0's kernel), then depmod; dom0's
        tpm2 selftests (the same kernel's)."""
        self.configure_common(rootfs, "guest", "/dev/xvda")
        shutil.copytree(dom0_rootfs / SELFTESTS_DIR, rootfs / SELFTESTS_DIR, symlinks=True)
        src = dom0_rootfs / "lib" / "modules" / version
        dst = rootfs / "lib" / "modules" / version
        skip = {src / s for s in GUEST_MODULE_SKIP}
        shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if Path(d) / n in skip])
        self.run("guest depmod", ["chroot", str(rootfs), "depmod", version])

    def mkfs(self, rootfs: Path, image: Path, size: str, label: str) -> None:
        t0 = time.monotonic()
        self.say(f"{label}: mke2fs -t ext4 -d {rootfs.name} {image.name} {size}")
        self.run(
            f"{label} mke2fs",
            ["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-d", str(rootfs), str(image), size],
        )
        self.timings[f"{label}_mke2fs_s"] = round(time.monotonic() - t0, 1)


def cached_build(root: Path, recipes: Path, pubkey: str) -> Path | None:
    """The newest cached build of the current recipe, from whichever mirror it was
    built: a cache hit needs no apt source (an offline host, or one without bookworm)."""
    manifests = sorted(root.glob("*/manifest.json"), key=lambda m: m.stat().st_mtime, reverse=True)
    for manifest in manifests:
        try:
            mirror = str(json.loads(manifest.read_text())["mirror"])
        except (OSError, ValueError, KeyError):
            continue
        if recipe_key(recipes, mirror, pubkey) == manifest.parent.name:
            return manifest.parent
    return None


def build_images(
    say: Progress | None = None,
    *,
    rebuild: bool = False,
    recipes: Path = RECIPES,
    sources: Path = Path("/etc/apt"),
) -> Images:
    """The images for the current recipe: from the cache, or built now (cold ~3 min).
    The host's apt ``sources`` are read only to build."""
    out: Progress = say or (lambda m: log.info("%s", m))
    root = cache_root()
    ssh_key, pubkey = ensure_ssh_key(root)
    with _locked(root):
        hit = None if rebuild else cached_build(root, recipes, pubkey)
        if hit is not None:
            out(f"images: cache hit {hit} (recipe {hit.name}): nothing to rebuild")
            prune(root, keep=KEEP_BUILDS)
            return Images.load(hit, ssh_key, built=False)
        mirror = host_mirror(sources)
        key = recipe_key(recipes, mirror, pubkey)
        final = root / key
        missing = [t for t in ("debootstrap", "mke2fs", "chroot") if shutil.which(t) is None]
        if missing:
            raise ImageBuildError(
                f"missing host tools {missing}; as root: apt-get install -y "
                "--no-install-recommends debootstrap e2fsprogs"
            )
        if os.geteuid() != 0:
            raise ImageBuildError("debootstrap needs root to build the images")
        out(f"images: building recipe {key} into {final} (cold build: a few minutes)")
        check_mirror(mirror)
        t0 = time.monotonic()
        work = root / f"{key}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        debs = root / "debs"
        debs.mkdir(exist_ok=True)
        b = Builder(work, mirror, debs, pubkey, out)
        try:
            dom0_root = b.debootstrap("dom0", read_packages(recipes / "dom0.packages"))
            manifest: dict[str, Any] = b.configure_dom0(dom0_root)
            manifest.update(b.install_selftests(dom0_root, manifest["kernel_version"]))
            guest_root = b.debootstrap("guest", read_packages(recipes / "guest.packages"))
            b.configure_guest(guest_root, dom0_root, manifest["kernel_version"])
            b.mkfs(dom0_root, work / "dom0.img", DOM0_SIZE, "dom0")
            b.mkfs(guest_root, work / "guest.img", GUEST_SIZE, "guest")
            b.timings["total_s"] = round(time.monotonic() - t0, 1)
            manifest.update(
                recipe=key, mirror=mirror, suite=SUITE, timings=b.timings, built=time.time()
            )
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            for rootfs in (dom0_root, guest_root):
                shutil.rmtree(rootfs)
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
        except BaseException:
            out(f"images: build failed; its log stays in {b.log_path}")
            raise
        out(f"images: built in {time.monotonic() - t0:.0f} s: {final}")
        prune(root, keep=KEEP_BUILDS)
        return Images.load(final, ssh_key, built=True)


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest builds (a running QEMU keeps its open files),
    and what interrupted builds left. Called with the cache's lock held."""
    builds = sorted(
        (p.parent for p in root.glob("*/manifest.json")),
        key=lambda d: (d / "manifest.json").stat().st_mtime,
        reverse=True,
    )
    for old in builds[keep:]:
        log.info("images: removing old build %s", old)
        shutil.rmtree(old, ignore_errors=True)
    for half_built in root.glob("*.tmp"):  # an interrupted build's; ours holds the lock
        if half_built.is_dir():
            log.info("images: removing the half-built %s", half_built)
            shutil.rmtree(half_built, ignore_errors=True)


def main() -> int:  # pragma: no cover - ``python -m harness.images`` / ``nox -s images``
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="build or reuse the Xen images")
    parser.add_argument("--rebuild", action="store_true", help="ignore the cache")
    args = parser.parse_args()

    def say(message: str) -> None:
        print(f"[images] {message}", file=sys.stderr, flush=True)

    try:
        images = build_images(say, rebuild=args.rebuild)
    except HarnessError as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: str(v) for k, v in images.__dict__.items()}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
