"""The kernel the harness's guests boot: the image's own (dom0's kernel and initrd, in
dom0's ``/boot``), or the user's ``--guest-kernel`` with its ``--guest-modules``.

A PV guest's kernel and initrd are files in dom0 that ``xl create`` reads. A user's
kernel is copied there; its modules go into dom0's ``/lib/modules`` so that dom0's own
``mkinitramfs`` makes it an initrd holding what a guest needs to reach its root and its
network (:data:`INITRD_MODULES`), and then into each guest's root, for everything it
loads later (``tpm_vtpm_proxy``, ``xen-tpmfront``...). Nothing is rebuilt: the images
stay as they are, and the saved booted machine carries it all (keyed by the pieces).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable

from harness.images import Images
from harness.own_build import PreparedBuild
from harness.ssh import SshHost

OWN_BOOT_DIR = "/var/lib/xenvtpm-own"  # in dom0: the user's guest kernel and its initrd
INITRD_MODULES = ("xen-blkfront", "xen-netfront", "ext4")  # root on xvda, SSH on eth0
MKINITRAMFS_TIMEOUT = 600.0  # seconds: tens under TCG


def guest_boot_files(prepared: PreparedBuild, images: Images) -> tuple[str, str]:
    """The guests' ``kernel=`` and ``ramdisk=`` in dom0."""
    kernel = prepared.guest_kernel
    if kernel is None:
        return images.dom0_kernel, images.dom0_initrd
    release = kernel.release
    ramdisk = images.dom0_initrd
    if prepared.guest_modules is not None:
        ramdisk = f"{OWN_BOOT_DIR}/initrd.img-{release}"
    return f"{OWN_BOOT_DIR}/vmlinuz-{release}", ramdisk


def install_in_dom0(
    dom0: SshHost, prepared: PreparedBuild, images: Images, say: Callable[[str], None]
) -> None:
    """The user's guest kernel into dom0, and with its modules, an initrd made there."""
    kernel = prepared.guest_kernel
    if kernel is None:
        return
    t0 = time.monotonic()
    image, ramdisk = guest_boot_files(prepared, images)
    dom0.check(f"mkdir -p {OWN_BOOT_DIR}")
    dom0.put(kernel.path, image)
    if prepared.guest_modules is None:
        say(f"guests boot {kernel.release} ({image}) with the image's initrd")
        return
    release = shlex.quote(kernel.release)
    say(f"guest kernel {kernel.release}: its modules into dom0, then mkinitramfs there")
    dom0.put(prepared.guest_modules, f"/lib/modules/{kernel.release}")
    conf = f"{OWN_BOOT_DIR}/initramfs-tools"
    dom0.check(
        f"set -e; rm -rf {conf}; cp -a /etc/initramfs-tools {conf}; "
        f"sed -i 's/^MODULES=.*/MODULES=list/' {conf}/initramfs.conf; "
        f"printf '%s\\n' {' '.join(INITRD_MODULES)} > {conf}/modules; "
        # mkinitramfs reads the kernel's config only to check that it unpacks a gzip
        # initrd, which every kernel with initrd support does: a user's kernel often
        # comes without its config, so one line stands in for it.
        f"config=/boot/config-{release}; [ -e $config ] || "
        f"echo 'CONFIG_RD_GZIP=y  # written by the xenvtpm harness' > $config; "
        f"depmod {release}; mkinitramfs -d {conf} -c gzip -o {ramdisk} {release}",
        timeout=MKINITRAMFS_TIMEOUT,
    )
    say(f"guest kernel {kernel.release} and its initrd ready in {time.monotonic() - t0:.0f} s")


def install_in_guest(guest: SshHost, prepared: PreparedBuild) -> None:
    """The user's guest kernel's modules into the guest's own root (then depmod)."""
    kernel = prepared.guest_kernel
    if kernel is None or prepared.guest_modules is None:
        return
    guest.put(prepared.guest_modules, f"/lib/modules/{kernel.release}")
    guest.check(f"depmod {shlex.quote(kernel.release)}", timeout=300)
