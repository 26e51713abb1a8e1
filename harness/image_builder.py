"""How a cold build makes each image (:mod:`harness.images` decides when to build):
debootstrap, the configuration of dom0 and the guest, the kernel's TPM selftests, and
mke2fs. Every step runs in its own process group, logs to ``build.log`` and is judged
by its exit status, never by the end of its output (issue 19: a step killed in the gap
between the two failed builds at random).

Part of the image recipe: :func:`harness.images.recipe_key` hashes this module too.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from harness.errors import ImageBuildError
from harness.paths import REPO_ROOT
from harness.process import tail

log = logging.getLogger(__name__)

RECIPES = REPO_ROOT / "images"
SUITE = "bookworm"
STEP_EXIT_TIMEOUT = 300  # seconds from a step's end of output to its exit
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


def upstream_version(debian_version: str) -> str:
    """``[epoch:]upstream[-revision]`` -> upstream: 6.1.176-1 -> 6.1.176.

    Spec: deb-version(7).
    """
    version = debian_version.split(":", 1)[-1]
    return version.rsplit("-", 1)[0] if "-" in version else version


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
