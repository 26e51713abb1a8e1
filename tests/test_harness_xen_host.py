"""The ``ssh://`` target's pieces that need no host: addresses, guest names, lookups,
the registry, and pytest's usage errors. The target itself runs against a Xen host
(``nox -s certify``; tested here against the QEMU dom0's forwarded port)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import paramiko
import pytest
from fake_xen_host import FakeGuest, FakeXenHost

import xenvtpm
from harness.deadline import Deadline
from harness.driver_record import driver_build
from harness.errors import HarnessError, TargetNotReady, UnsupportedOperation
from harness.paths import REPO_ROOT
from harness.ssh import SshHost
from harness.target import Capability
from harness.targets import TARGETS, capabilities_of, make_target, target_class
from harness.targets.host_spec import (
    GuestSpec,
    HostSpec,
    address_from_neighbours,
    parse_guests,
    parse_macs,
    parse_xl_info,
    resolve_key,
)
from harness.targets.xen_host import (
    XenHostTarget,
    guest_checks,
    stop_daemons_command,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ssh://root@xen1.example:2222", HostSpec("root", "xen1.example", 2222)),
        ("ssh://xen1", HostSpec("root", "xen1", 22)),
        ("admin@10.0.0.5", HostSpec("admin", "10.0.0.5", 22)),
        ("ssh://root@[fe80::1]:2200/", HostSpec("root", "fe80::1", 2200)),
    ],
)
def test_host_spec(url: str, expected: HostSpec) -> None:
    assert HostSpec.parse(url) == expected


def test_host_spec_rejects_and_prints() -> None:
    for bad in ("ssh://", "ssh://root@", "ssh://a:b:c"):
        with pytest.raises(ValueError, match="not an SSH address"):
            HostSpec.parse(bad)
    assert str(HostSpec("root", "h", 22)) == "root@h"
    assert str(HostSpec("root", "127.0.0.1", 40022)) == "root@127.0.0.1:40022"


def test_guest_specs() -> None:
    assert GuestSpec.parse("guest0") == GuestSpec("guest0", None)
    assert GuestSpec.parse("web-1=10.1.2.3") == GuestSpec("web-1", "10.1.2.3")
    for bad in ("", "a b", "g=", "=1.2.3.4"):
        with pytest.raises(ValueError, match="NAME\\[=ADDRESS\\]"):
            GuestSpec.parse(bad)
    with pytest.raises(ValueError, match="--host-guest NAME"):
        parse_guests([])
    with pytest.raises(ValueError, match="twice"):
        parse_guests(["g", "g=1.2.3.4"])


def test_key_from_option_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "id"
    key.write_text("k")
    monkeypatch.delenv("XENVTPM_SSH_KEY", raising=False)
    assert resolve_key(None) is None
    assert resolve_key(str(key)) == key
    monkeypatch.setenv("XENVTPM_SSH_KEY", str(key))
    assert resolve_key(None) == key
    with pytest.raises(ValueError, match="does not exist"):
        resolve_key(tmp_path / "nope")


def test_xl_info_and_address_lookups() -> None:
    info = parse_xl_info(
        "host                   : dom0\nxen_major              : 4\nxen_minor              : 17\n"
        "xen_extra              : .6-pre\nxen_version            : 4.17.6-pre\n"
        "xen_commandline        : dom0_mem=1024M,max:1024M console=com1\n"
    )
    assert info["xen_version"] == "4.17.6-pre" and info["xen_extra"] == ".6-pre"
    assert info["xen_commandline"] == "dom0_mem=1024M,max:1024M console=com1"
    macs = parse_macs(
        "Idx BE Mac Addr.         handle state evt-ch   tx-/rx-ring-ref BE-path\n"
        "0   0  00:16:3E:78:00:01     0     4      6   1280/1281 /local/domain/0/backend/vif/1/0\n"
    )
    assert macs == ["00:16:3e:78:00:01"]
    neighbours = (
        "10.0.2.2 dev eth0 lladdr 52:55:0a:00:02:02 REACHABLE\n"
        "169.254.9.9 dev xenbr0 lladdr 00:16:3e:78:00:01 FAILED\n"
        "fe80::216:3eff:fe78:1 dev xenbr0 lladdr 00:16:3e:78:00:01 STALE\n"
        "169.254.1.1 dev xenbr0 lladdr 00:16:3e:78:00:01 STALE\n"
        "169.254.1.7 dev xenbr0 INCOMPLETE\n"
    )
    assert address_from_neighbours(neighbours, macs) == "169.254.1.1"
    assert (
        address_from_neighbours(neighbours.replace("169.254.1.1 ", "x "), ["00:00:00:00:00:09"])
        is None
    )
    v6_only = "fe80::1 dev xenbr0 lladdr 00:16:3e:78:00:01 STALE\n"
    assert address_from_neighbours(v6_only, macs) == "fe80::1"


def test_registry_knows_ssh_urls_only_with_a_scheme() -> None:
    assert "ssh" not in TARGETS and "xen" in TARGETS
    assert target_class("ssh://root@h") is XenHostTarget
    with pytest.raises(ValueError, match="ssh://"):
        target_class("ssh")
    assert capabilities_of("ssh://root@h", 2) == {"multi-guest", "shared-clients", "traffic-trace"}
    # never reboot a user's guest
    assert capabilities_of("ssh://root@h", 1) == {"shared-clients", "traffic-trace"}


def test_capabilities_follow_the_guest_kind_and_the_owners_consent() -> None:
    """xen-tpmfront guests lose /dev/tpmrm0 and the restarts they cannot survive;
    ``destructive`` adds the restarts, killed swtpm and ``xl reboot``, never a destroy
    or a create (a user's host has no toolstack part beyond its reboots)."""
    url, base = "ssh://root@h", {"multi-guest", "traffic-trace"}
    assert capabilities_of(url, 2, guest_kind="kernel") == base
    faults = {"restart-manager", "kill-swtpm", "reboot"}
    ours = faults | {"restart-backend", "restart-frontend", "shared-clients"}
    assert capabilities_of(url, 2, destructive=True) == base | ours
    assert capabilities_of(url, 2, guest_kind="kernel", destructive=True) == base | faults
    with pytest.raises(ValueError, match="guest kind 'rust'"):
        XenHostTarget(url=url, host_guests=["a"], guest_kind="rust")


def test_kernel_guests_are_checked_for_xen_tpmfront_not_our_frontends_needs() -> None:
    """A stock guest needs python3 (the relay) and the xen-tpmfront module; not
    tpm_vtpm_proxy nor Xen's libraries, which only our frontend uses."""
    for kind, wanted, unwanted in [
        ("kernel", "xen-tpmfront", ("tpm_vtpm_proxy", "ctypes")),
        ("python", "tpm_vtpm_proxy", ("xen-tpmfront",)),
    ]:
        target = XenHostTarget(url="ssh://root@h", host_guests=["web"], guest_kind=kind)
        checks = "\n".join(test for test, _ in guest_checks(target.frontend))
        assert f"modprobe -n -q {wanted}" in checks and "python3 -c" in checks, checks
        assert not [u for u in unwanted if u in checks], checks
        size = 4096 - 8 if kind == "kernel" else 4096  # xen-tpmfront's one page
        assert target.guests[0].max_command_size == size
        target.close()
        target.remove_run_dir()


def test_make_target_passes_the_url_and_guests(tmp_path: Path) -> None:
    t = make_target(
        "ssh://root@127.0.0.1:40022", 5, tmp_path / "run", host_guests=["a=1.2.3.4", "b"]
    )
    assert isinstance(t, XenHostTarget)
    assert [g.name for g in t.guests] == ["a", "b"] and t.guest_count == 2
    assert [g.instance for g in t.guests] == [1000, 1001]
    assert t.guests[0].ip == "1.2.3.4" and t.guests[1].ip == ""
    assert t.describe()["ssh"] == {"host": "127.0.0.1", "port": 40022, "key": None, "user": "root"}
    t.close()  # never started: nothing to stop, no login made


def test_stop_command_is_anchored_and_ends_well() -> None:
    command = stop_daemons_command("^python3 -m xenvtpm( |$)", grace=1)
    assert "pgrep -f '^python3 -m xenvtpm( |$)'" in command
    assert "kill -9" in command and command.endswith("true")
    # Run it for a pattern that matches nothing here: it exits 0 and prints nothing.
    out = subprocess.run(
        ["bash", "-c", stop_daemons_command("^no-such-process-xenvtpm-test ", 1)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == ""


def test_driver_build_names_a_commit() -> None:
    build = driver_build(REPO_ROOT)
    assert len(build["commit"]) == 40 or build["commit"].startswith("unknown")
    assert isinstance(build["dirty"], bool)


def test_pytest_says_how_to_name_the_guests() -> None:
    """No --host-guest: a usage error naming the option, before anything connects."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    argv = ["scenarios/test_smoke.py", "--collect-only", "--target", "ssh://root@127.0.0.1:1"]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 4, result.stdout + result.stderr
    assert "--host-guest NAME[=ADDRESS]" in result.stderr


# -- a guest's address: only from what dom0 controls (issue 14, point 7) ------------------
WEB = ("web", 5, "00:16:3e:00:00:05", "169.254.1.5")
DB = ("db", 6, "00:16:3e:00:00:06", "169.254.1.6")
NEIGHBOURS = (
    "169.254.1.5 dev xenbr0 lladdr 00:16:3e:00:00:05 REACHABLE\n"
    "169.254.1.6 dev xenbr0 lladdr 00:16:3e:00:00:06 STALE\n"
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user with an SSH key and a home of their own (their ``~/.ssh/known_hosts``),
    and the target's artifacts under ``tmp_path``."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XENVTPM_ARTIFACTS", str(tmp_path / "artifacts"))
    (tmp_path / "artifacts").mkdir()
    monkeypatch.delenv("XENVTPM_SSH_KEY", raising=False)
    paramiko.ECDSAKey.generate().write_private_key_file(str(home / ".ssh" / "id_test"))
    return home


def host_target(host: FakeXenHost, home: Path, guests: list[str], **options: Any) -> XenHostTarget:
    return XenHostTarget(
        url=host.url,
        host_guests=guests,
        ssh_key=home / ".ssh" / "id_test",
        run_dir=home.parent / "run",
        **options,
    )


def lie_about_web(host: FakeXenHost) -> None:
    """What a hostile ``web`` can write in its own xenstore tree: db's address where
    guest agents publish an address, and db's MAC in its own vif frontend."""
    xs = host.dom0_shell.xenstore
    xs["/local/domain/5/attr/vif/0/ipv4/0"] = DB[3]
    xs["/local/domain/5/data/ipv4"] = DB[3]
    xs["/local/domain/5/device/vif/0/mac"] = DB[2]


def test_a_guests_own_xenstore_cannot_redirect_certify(home: Path) -> None:
    """web claims db's address in the nodes it may write; certify still logs in to web,
    at the address dom0's neighbour table gives for the MAC xl gave web's vif."""
    with FakeXenHost([FakeGuest(*WEB), FakeGuest(*DB)], NEIGHBOURS) as host:
        host.known_hosts(home / ".ssh" / "known_hosts")
        lie_about_web(host)
        target = host_target(host, home, ["web"])
        try:
            target.connect_host()
            target.find_guests()
            web = target.guests[0]
            assert web.ip == WEB[3]
            assert web.host().check("hostname").strip() == "web"
            assert host.dom0.opened == [(WEB[3], 22)]
        finally:
            target.close()


def test_no_neighbour_entry_asks_for_the_address_and_ignores_the_guests_claim(
    home: Path,
) -> None:
    """dom0 has not seen web's MAC: a clear error naming --host-guest web=ADDRESS, and
    no login anywhere (in particular not at the address web wrote for itself)."""
    neighbours = "169.254.1.6 dev xenbr0 lladdr 00:16:3e:00:00:06 STALE\n"
    with FakeXenHost([FakeGuest(*WEB), FakeGuest(*DB)], neighbours) as host:
        host.known_hosts(home / ".ssh" / "known_hosts")
        lie_about_web(host)
        target = host_target(host, home, ["web"])
        try:
            target.connect_host()
            with pytest.raises(TargetNotReady, match=r"--host-guest web=ADDRESS") as caught:
                target.find_guests()
            assert DB[3] not in str(caught.value)
            assert host.dom0.opened == []
        finally:
            target.close()


def test_two_addresses_for_the_guests_mac_are_not_guessed_between(home: Path) -> None:
    """Two IPv4 neighbours for web's MAC (one could be forged by ARP): the error names
    both and asks for the address; nothing is logged in to."""
    neighbours = NEIGHBOURS + "169.254.1.66 dev xenbr0 lladdr 00:16:3e:00:00:05 STALE\n"
    with FakeXenHost([FakeGuest(*WEB), FakeGuest(*DB)], neighbours) as host:
        host.known_hosts(home / ".ssh" / "known_hosts")
        target = host_target(host, home, ["web"])
        try:
            target.connect_host()
            with pytest.raises(TargetNotReady, match=r"169\.254\.1\.5.*169\.254\.1\.66"):
                target.find_guests()
            assert host.dom0.opened == []
        finally:
            target.close()


def test_an_address_the_user_gives_is_used_as_given(home: Path) -> None:
    with FakeXenHost([FakeGuest(*WEB), FakeGuest(*DB)], "") as host:
        host.known_hosts(home / ".ssh" / "known_hosts")
        lie_about_web(host)
        target = host_target(host, home, [f"web={WEB[3]}"])
        try:
            target.connect_host()
            target.find_guests()
            assert target.guests[0].host().check("hostname").strip() == "web"
            assert host.dom0.opened == [(WEB[3], 22)]
        finally:
            target.close()


# -- host keys: known ones checked, unknown ones refused unless the user says so ----------
def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``ssh-keygen -l`` form, computed here from the key blob."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def test_an_unknown_dom0_key_is_refused_with_its_fingerprint(home: Path) -> None:
    """Nothing in known_hosts and no flag: no command runs in dom0, and the error names
    the host, the key's type and fingerprint, and the flag that would accept it."""
    with FakeXenHost([FakeGuest(*WEB)], NEIGHBOURS) as host:
        target = host_target(host, home, ["web"])
        try:
            with pytest.raises(HarnessError) as caught:
                target.connect_host()
            message = str(caught.value)
            assert f"[127.0.0.1]:{host.port}" in message
            assert "ecdsa-sha2-nistp256" in message and fingerprint(host.dom0.host_key) in message
            assert "--accept-new-host-keys" in message
            assert host.dom0.commands == []
        finally:
            target.close()


def test_an_unknown_guest_key_is_refused_with_its_fingerprint(home: Path) -> None:
    """dom0 is known, web is not: web is refused before any command runs there."""
    with FakeXenHost([FakeGuest(*WEB)], NEIGHBOURS) as host:
        host.known_hosts(home / ".ssh" / "known_hosts", guests=False)
        target = host_target(host, home, ["web"])
        web = host.guests[0].server
        try:
            target.connect_host()
            with pytest.raises(HarnessError) as caught:
                target.find_guests()
            message = str(caught.value)
            assert "web" in message and WEB[3] in message
            assert fingerprint(web.host_key) in message and "--accept-new-host-keys" in message
            assert web.commands == []
        finally:
            target.close()


@pytest.mark.parametrize("accept_new", [False, True])
def test_a_changed_dom0_key_is_refused_naming_both_fingerprints(
    home: Path, accept_new: bool
) -> None:
    """known_hosts holds another key for dom0's address: refused, with or without the
    flag, and the error names the host, the key known and the key offered."""
    with FakeXenHost([FakeGuest(*WEB)], NEIGHBOURS) as host:
        known = home / ".ssh" / "known_hosts"
        host.known_hosts(known)
        old = paramiko.ECDSAKey.generate()
        mine = host.dom0.known_hosts_line("127.0.0.1", host.port)
        name = mine.split()[0]
        known.write_text(
            known.read_text().replace(mine, f"{name} {old.get_name()} {old.get_base64()}")
        )
        flag = {"accept_new_host_keys": True} if accept_new else {}
        target = host_target(host, home, ["web"], **flag)
        try:
            with pytest.raises(HarnessError) as caught:
                target.connect_host()
            message = str(caught.value)
            assert name in message and "changed" in message.lower()
            assert fingerprint(old) in message and fingerprint(host.dom0.host_key) in message
            assert host.dom0.commands == []
        finally:
            target.close()


def test_a_changed_guest_key_is_refused_even_when_new_keys_are_accepted(home: Path) -> None:
    with FakeXenHost([FakeGuest(*WEB)], NEIGHBOURS) as host:
        known = home / ".ssh" / "known_hosts"
        host.known_hosts(known, guests=False)
        old = paramiko.ECDSAKey.generate()
        with known.open("a") as f:
            f.write(f"{WEB[3]} {old.get_name()} {old.get_base64()}\n")
        target = host_target(host, home, ["web"], accept_new_host_keys=True)
        try:
            target.connect_host()
            with pytest.raises(HarnessError) as caught:
                target.find_guests()
            message = str(caught.value)
            assert WEB[3] in message and "changed" in message.lower()
            assert fingerprint(old) in message
            assert fingerprint(host.guests[0].server.host_key) in message
            assert host.guests[0].server.commands == []
        finally:
            target.close()


def test_new_keys_accepted_on_request_are_recorded_and_can_be_pinned(
    home: Path, tmp_path: Path
) -> None:
    """With the flag, dom0's and web's unknown keys are used and recorded (type, SHA256,
    how trusted) in versions.json and as known_hosts lines; a second run that names that
    file needs no flag and records the keys as known."""
    with FakeXenHost([FakeGuest(*WEB)], NEIGHBOURS) as host:
        dom0_name = f"[127.0.0.1]:{host.port}"
        keys = {"dom0": host.dom0.host_key, "web": host.guests[0].server.host_key}
        target = host_target(host, home, ["web"], accept_new_host_keys=True)
        try:
            target.connect_host()
            target.find_guests()
            target.record_versions()
        finally:
            target.close()
        artifacts = tmp_path / "artifacts"
        package = json.loads((artifacts / "versions.json").read_text())["package"]
        assert package == {"version": xenvtpm.__version__, "installed": ""}
        recorded = json.loads((artifacts / "versions.json").read_text())["host_keys"]
        assert [(k["login"], k["host"], k["trust"]) for k in recorded] == [
            ("dom0", dom0_name, "accepted-new"),
            ("web", WEB[3], "accepted-new"),
        ]
        for k in recorded:
            assert k["type"] == "ecdsa-sha2-nistp256"
            assert k["fingerprint"] == fingerprint(keys[k["login"]])
        pinned = tmp_path / "pinned_known_hosts"
        pinned.write_text((artifacts / "known_hosts").read_text())
        assert paramiko.HostKeys(str(pinned)).lookup(dom0_name) is not None

        again = host_target(host, home, ["web"], known_hosts=[pinned])
        try:
            again.connect_host()
            again.find_guests()
            again.record_versions()
        finally:
            again.close()
        recorded = json.loads((artifacts / "versions.json").read_text())["host_keys"]
        assert [(k["login"], k["trust"]) for k in recorded] == [
            ("dom0", "known_hosts"),
            ("web", "known_hosts"),
        ]


def test_hashed_known_hosts_entries_are_known(home: Path) -> None:
    """``HashKnownHosts yes`` (Debian's default) writes ``|1|salt|hash`` names."""
    with FakeXenHost([FakeGuest(*WEB)], NEIGHBOURS) as host:
        known = host.known_hosts(home / ".ssh" / "known_hosts")
        hashed = []
        for line in known.read_text().splitlines():
            name, rest = line.split(" ", 1)
            hashed.append(f"{paramiko.HostKeys.hash_host(name)} {rest}\n")
        known.write_text("".join(hashed))
        target = host_target(host, home, ["web"])
        try:
            target.connect_host()
            target.find_guests()
            assert [k.trust for k in target.host_keys.seen] == ["known_hosts", "known_hosts"]
        finally:
            target.close()


def test_marker_and_broken_lines_in_known_hosts_do_not_stop_the_run(home: Path) -> None:
    """A user's known_hosts may hold ``@cert-authority`` lines (host certificates, not
    used here) and lines OpenSSH skips; the other entries still count."""
    with FakeXenHost([FakeGuest(*WEB)], NEIGHBOURS) as host:
        known = host.known_hosts(home / ".ssh" / "known_hosts")
        ca = paramiko.ECDSAKey.generate()
        extra = f"@cert-authority *.example {ca.get_name()} {ca.get_base64()}\n"
        extra += "# a comment\n\nnot a line\nbroken ssh-ed25519 AAAA!\nbad ssh-rsa AAAAA\n"
        known.write_text(extra + known.read_text())
        target = host_target(host, home, ["web"])
        try:
            target.connect_host()
            target.find_guests()
            assert [k.trust for k in target.host_keys.seen] == ["known_hosts", "known_hosts"]
        finally:
            target.close()


@pytest.mark.parametrize("also_known", [False, True])
def test_a_revoked_key_is_refused_even_when_new_keys_are_accepted(
    home: Path, also_known: bool
) -> None:
    """``@revoked`` (OpenSSH) wins over the flag and over a plain entry for the key."""
    with FakeXenHost([FakeGuest(*WEB)], NEIGHBOURS) as host:
        known = host.known_hosts(home / ".ssh" / "known_hosts", dom0=also_known)
        key = host.dom0.host_key
        with known.open("a") as f:
            f.write(f"@revoked * {key.get_name()} {key.get_base64()}\n")
        target = host_target(host, home, ["web"], accept_new_host_keys=True)
        try:
            with pytest.raises(HarnessError, match="revoked") as caught:
                target.connect_host()
            assert fingerprint(key) in str(caught.value)
            assert host.dom0.commands == []
        finally:
            target.close()


def test_the_harness_own_machines_keep_trusting_their_keys(home: Path) -> None:
    """The QEMU targets' logins (no host-key check: their own VMs behind a loopback
    hostfwd) still connect, even where known_hosts has another key for the address."""
    with FakeXenHost([FakeGuest(*WEB)], NEIGHBOURS) as host:
        other = paramiko.ECDSAKey.generate()
        (home / ".ssh" / "known_hosts").write_text(
            f"[127.0.0.1]:{host.port} {other.get_name()} {other.get_base64()}\n"
        )
        with SshHost("dom0", "127.0.0.1", host.port, home / ".ssh" / "id_test") as dom0:
            dom0.connect(Deadline(20))
            assert dom0.check("xl domid web").strip() == "5"


def test_pytest_refuses_a_known_hosts_file_that_does_not_exist(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    missing = tmp_path / "nope"
    argv = ["scenarios/test_smoke.py", "--collect-only", "--target", "ssh://root@127.0.0.1:1"]
    argv += ["--host-guest", "g", "--accept-new-host-keys", "--known-hosts", str(missing)]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"known_hosts file {missing} does not exist" in result.stderr


# -- reboot on a user's host, with the owner's consent (issue 16, point 5) ---------------
def test_without_consent_there_is_no_reboot_at_all(home: Path) -> None:
    """No --destructive: no REBOOT capability and no part that could reboot."""
    with FakeXenHost([FakeGuest(*WEB)], NEIGHBOURS) as host:
        target = host_target(host, home, ["web"])
        try:
            assert Capability.REBOOT not in target.capabilities
            assert target.reboots is None
            with pytest.raises(UnsupportedOperation):
                target.reboot(target.guests[0])
        finally:
            target.close()


def test_a_consented_reboot_is_xl_reboot_then_the_same_vtpm_on_the_new_domain(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--destructive: ``xl reboot web``, the new domain's id from xl, the old domain's
    vTPM detached, web logged in to again at the address found before, and its vTPM attached
    to the new domain."""
    with FakeXenHost([FakeGuest(*WEB), FakeGuest(*DB)], NEIGHBOURS) as host:
        host.known_hosts(home / ".ssh" / "known_hosts")
        target = host_target(host, home, ["web"], destructive=True)
        assert Capability.REBOOT in target.capabilities
        attached: list[int | None] = []
        monkeypatch.setattr(target, "connect_vtpm", lambda g: attached.append(g.domid))
        monkeypatch.setattr(target, "wait_for_device", lambda g: 0.1)
        try:
            target.connect_host()
            target.find_guests()
            web = target.guests[0]
            target.reboot(web)
            assert web.domid == WEB[1] + 100 and attached == [WEB[1] + 100]
            commands = host.dom0_shell.commands
            reboot = commands.index("xl reboot web")
            detach = next(i for i, c in enumerate(commands) if f"detach --domid {WEB[1]}" in c)
            assert reboot < detach
            assert web.host().check("hostname").strip() == "web"
        finally:
            target.close()
