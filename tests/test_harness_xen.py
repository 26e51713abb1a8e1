"""Fast checks of the xen target's pieces that need no QEMU: apt sources, recipe hash,
QEMU command line, console stage/failure matching (over a socketpair), SSH argv.

The boot itself runs in ``nox -s xen`` (minutes under TCG), never here.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness.deadline import Deadline
from harness.errors import TargetNotReady
from harness.images import host_mirror, read_packages, recipe_key
from harness.qemu import MachineConfig


def test_mirror_from_deb822_sources_skips_security_and_disabled(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.debian.org/archive/debian/x\n"
        "URIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    (d / "other.list.disabled-by-farm").write_text("deb http://elsewhere/ bookworm main\n")
    assert host_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n"
    )
    assert host_mirror(tmp_path) == "http://m.example/debian"


def test_recipe_key_changes_with_any_recipe_file(tmp_path: Path) -> None:
    (tmp_path / "dom0.packages").write_text("# dom0\npython3 kmod  # inline\n")
    first = recipe_key(tmp_path, "http://m", "ssh-ed25519 AAA")
    assert recipe_key(tmp_path, "http://m", "ssh-ed25519 AAA") == first
    assert read_packages(tmp_path / "dom0.packages") == ["python3", "kmod"]
    (tmp_path / "dom0.packages").write_text("python3\n")
    assert recipe_key(tmp_path, "http://m", "ssh-ed25519 AAA") != first
    assert recipe_key(tmp_path, "http://other", "ssh-ed25519 AAA") != first


def machine_config(tmp_path: Path, **extra: Any) -> MachineConfig:
    """A machine over files in ``tmp_path`` (argv only: nothing is started)."""
    return MachineConfig(
        xen=tmp_path / "xen.bin",
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "initrd.img",
        dom0_disk=tmp_path / "dom0.img",
        guest_disks=[tmp_path / "guest.img"] * 2,
        run_dir=tmp_path,
        console_log=tmp_path / "console.log",
        ssh_port=2222,
        **extra,
    )


def test_qemu_argv_has_design_flags(tmp_path: Path) -> None:
    cfg = machine_config(tmp_path)
    argv = cfg.argv()
    joined = " ".join(argv)
    assert argv[argv.index("-cpu") + 1] == "qemu64" and "tcg" in argv
    assert "-snapshot" in argv and "-no-reboot" in argv
    assert "restrict=on,hostfwd=tcp:127.0.0.1:2222-:22" in joined
    assert argv.count("-drive") == 3
    assert f"{tmp_path}/vmlinuz root=/dev/vda" in joined
    assert "dom0_mem=1024M,max:1024M" in joined
    cfg.initrd = tmp_path / "a,b"
    with pytest.raises(ValueError, match="comma"):
        cfg.argv()


def _console_pair(tmp_path: Path, chunks: list[bytes], hold: bool = True) -> Path:
    """A unix socket server that writes ``chunks`` to the first client, like QEMU's;
    ``hold``: until the client closes, else it closes itself after 0.3 s, as a QEMU
    that died."""
    path = tmp_path / "console.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            for chunk in chunks:
                conn.sendall(chunk)
            if hold:
                conn.recv(1)  # hold the connection until the client closes it
            else:
                time.sleep(0.3)  # with the client's input unread: ECONNRESET there
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return path


def test_console_walks_stages_and_fails_at_once_on_a_panic(tmp_path: Path) -> None:
    console = pytest.importorskip("harness.console")
    sock = _console_pair(
        tmp_path,
        [
            b"(XEN) Xen version 4.17.5 (Debian)\r\n",
            b"[ 1.0] Linux version 6.1.0\r\n",
            b"[ 9.9] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n",
        ],
    )
    with console.SerialConsole(sock, None, "test console") as con:
        seen = con.walk(console.DOM0_STAGES[:2], Deadline(5))
        assert list(seen) == ["xen hypervisor", "dom0 kernel"]
        with pytest.raises(console.ConsoleFailure, match=r"kernel panic.*VFS"):
            con.expect(rb"login: ", Deadline(5), "dom0 login")


def test_console_timeout_names_the_stage(tmp_path: Path) -> None:
    console = pytest.importorskip("harness.console")
    sock = _console_pair(tmp_path, [b"nothing useful\r\n"])
    with (
        console.SerialConsole(sock, None, "c") as con,
        pytest.raises(TargetNotReady, match=r"dom0 login.*timed out"),
    ):
        con.expect(rb"login: ", Deadline(0.3), "dom0 login")


def test_ssh_argv_jumps_through_dom0() -> None:
    ssh = pytest.importorskip("harness.ssh")
    argv = ssh.ssh_argv(Path("/k"), 2222, guest_ip="169.254.1.1", command=["uname"])
    proxy = next(a for a in argv if a.startswith("ProxyCommand="))
    assert "-p 2222 -W %h:%p root@127.0.0.1" in proxy
    assert argv[-2:] == ["root@169.254.1.1", "uname"]
    assert ssh.ssh_argv(Path("/k"), 2222)[-2:] == ["2222", "root@127.0.0.1"]


def test_qemu_argv_with_overlays_and_saved_state(tmp_path: Path) -> None:
    overlays = [tmp_path / f"disk{i}.qcow2" for i in range(3)]
    argv = machine_config(tmp_path, overlays=overlays, incoming=tmp_path / "state").argv()
    assert "-snapshot" not in argv  # the overlays are the run's private copies
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == [f"file={o},if=virtio,format=qcow2" for o in overlays]
    assert argv[argv.index("-incoming") + 1] == f"exec:cat {tmp_path / 'state'}"


def test_unreachable_mirror_is_named() -> None:
    from harness.errors import MirrorUnreachable
    from harness.images import check_mirror

    with pytest.raises(MirrorUnreachable, match=r"127\.0\.0\.1:9/debian"):
        check_mirror("http://127.0.0.1:9/debian", timeout=5)


def test_a_reset_console_connection_is_a_closed_console(tmp_path: Path) -> None:
    """QEMU dying under the KVM trial resets the console socket; that must read as a
    closed console (TargetNotReady, so boot falls back to TCG), not ConnectionResetError
    (which ended a fresh machine's whole Xen run: every scenario errored)."""
    console = pytest.importorskip("harness.console")
    path = _console_pair(tmp_path, [b"(XEN) Xen version 4.17.5 (Debian)\r\n"], hold=False)
    with console.SerialConsole(path, None, "c") as con:
        con.expect(rb"Xen version", Deadline(5), "xen")
        os.write(con._spawn.child_fd, b"\r")  # bytes QEMU never read before it died
        with pytest.raises(TargetNotReady, match=r"dom0 login.*console closed"):
            con.expect(rb"login: ", Deadline(5), "dom0 login")
